//! Quick TCP bulk-throughput check: direct vs through legate, same run.
//!
//!   cargo bench --bench tcp_throughput            # 5 alternating runs of 1 GiB each way
//!   LEGATE_BENCH_MIB=64 LEGATE_BENCH_RUNS=1 cargo bench --bench tcp_throughput   # smoke
//!
//! A blocking client streams N MiB to a sink server that counts and acknowledges;
//! legate runs with one worker thread. Reports MiB/s medians (min–max) and the ratio.
//! The full comparison against HAProxy and nginx lives in its own benchmark.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHUNK: usize = 256 * 1024;

fn main() {
    let mib: usize = env_or("LEGATE_BENCH_MIB", 1024);
    let runs: usize = env_or("LEGATE_BENCH_RUNS", 5);
    let sink = start_sink();
    let (mut legate, proxied) = start_legate(sink);

    let mut direct = Vec::new();
    let mut through = Vec::new();
    for _ in 0..runs {
        direct.push(transfer(sink, mib));
        through.push(transfer(proxied, mib));
    }
    let _ = legate.kill();
    let _ = legate.wait();

    let (d, l) = (median(&mut direct), median(&mut through));
    println!("tcp bulk, {mib} MiB x {runs} runs, client -> server");
    println!(
        "  direct        {:>8.0} MiB/s  ({:.0}-{:.0})",
        d,
        direct[0],
        direct[runs - 1]
    );
    println!(
        "  via legate    {:>8.0} MiB/s  ({:.0}-{:.0})",
        l,
        through[0],
        through[runs - 1]
    );
    println!("  legate/direct {:>8.2}", l / d);
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A server that reads each connection to EOF and answers with the byte count.
fn start_sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind sink");
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; CHUNK];
                let mut total: u64 = 0;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes());
            });
        }
    });
    addr
}

/// Sends `mib` MiB to `addr`, waits for the acknowledgement, returns MiB/s.
fn transfer(addr: SocketAddr, mib: usize) -> f64 {
    let mut s = TcpStream::connect(addr).expect("connect");
    let buf = vec![0x5au8; CHUNK];
    let began = Instant::now();
    for _ in 0..(mib * 1024 * 1024 / CHUNK) {
        s.write_all(&buf).expect("write");
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).expect("ack");
    assert_eq!(u64::from_be_bytes(ack), (mib * 1024 * 1024) as u64);
    mib as f64 / began.elapsed().as_secs_f64()
}

fn start_legate(upstream: SocketAddr) -> (Child, SocketAddr) {
    let dir = std::env::temp_dir().join(format!("legate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(
        dir.join("bench.yaml"),
        format!(
            "listeners:\n  - {{ name: bench, listen: \"{listen}\", cluster: sink }}\nclusters:\n  - {{ name: sink, endpoints: [ \"{upstream}\" ] }}\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("--config")
        .arg(&dir)
        .args(["--admin", "127.0.0.1:0", "--threads", "1", "--log", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn legate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        assert!(Instant::now() < deadline, "legate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, listen)
}
