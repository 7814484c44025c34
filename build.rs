//! Link-time layout only: on x86_64 Linux, where rustc links with lld, the
//! functions legate runs at start-up and per request (deploy/symbol-order.txt,
//! written by benches/symbol-order.sh) are placed first and together, so the
//! kernel maps ~2 MB of code instead of most of the 8.4 MB `.text`. The list
//! is grouped by phase (start-up, HTTP/1.1 and TCP requests, h2c, admin), so
//! an idle legate maps only the first group (idle RSS 8.1 -> 5.5 MB). Names
//! the linker does not find are ignored.
//! `LEGATE_SYMBOL_ORDER=0` turns it off (for a linker other than lld).

fn main() {
    println!("cargo:rerun-if-changed=deploy/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=LEGATE_SYMBOL_ORDER");
    let lld_by_default = std::env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let wanted = std::env::var("LEGATE_SYMBOL_ORDER").map_or(true, |v| v != "0");
    let order = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/symbol-order.txt");
    if lld_by_default && wanted && order.exists() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
