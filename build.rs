//! Link-time layout only: on x86_64 Linux, where rustc links with lld, the
//! functions legate runs at start-up and per request (deploy/symbol-order.txt,
//! written by benches/symbol-order.sh) are placed first and together, so the
//! kernel maps ~2 MB of code instead of most of the 8.4 MB `.text`. The list
//! is grouped by phase (start-up, HTTP/1.1 and TCP requests, h2c, admin), so
//! an idle legate maps only the first group (idle RSS 8.1 -> 4.8 MB). Names
//! the linker does not find are ignored.
//! `LEGATE_SYMBOL_ORDER=0` turns it off (for a linker other than lld).
//!
//! Relative relocations are packed (DT_RELR) where the build host's glibc
//! loads them (2.36 and later): the dynamic loader otherwise reads a 350 KB
//! `.rela.dyn` at every start, and those pages stay resident (RSS -0.28 MB).
//! A binary linked against a glibc already needs that glibc or a later one, so
//! this adds no requirement; an older loader refuses it by name
//! (`GLIBC_ABI_DT_RELR not found`) instead of misloading it. `LEGATE_RELR=0`
//! turns it off (cross-building for an older glibc than the host's).

fn main() {
    println!("cargo:rerun-if-changed=deploy/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=LEGATE_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=LEGATE_RELR");
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
    let relr = std::env::var("LEGATE_RELR").map_or(true, |v| v != "0");
    if lld_by_default && relr && glibc_has_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the build host's glibc is 2.36 or later (`getconf` says "glibc 2.36").
fn glibc_has_relr() -> bool {
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    let v = String::from_utf8_lossy(&out.stdout);
    let mut parts = v.trim().trim_start_matches("glibc ").split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (2, 36)
}
