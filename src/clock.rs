//! A monotonic millisecond clock that fits in an atomic: what health, pools
//! and connection watchdogs store to say "when", without a lock. A leaf.
//!
//! A connection reads it several times per request (a head begins, a
//! request ends, a write blocks), and every deadline it feeds is in
//! milliseconds to minutes, so it reads the kernel's coarse monotonic clock:
//! the time of the last tick (1-4 ms old), read from the vDSO without
//! touching the hardware counter, in whole milliseconds without `Instant`'s
//! checked subtraction.
#![allow(unsafe_code)]

use std::sync::LazyLock;

static EPOCH: LazyLock<u64> = LazyLock::new(raw_ms);

/// Milliseconds on a monotonic clock (since the first call), up to a tick
/// behind the precise one.
pub fn now_ms() -> u64 {
    raw_ms().saturating_sub(*EPOCH)
}

#[cfg(target_os = "linux")]
fn raw_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write; CLOCK_MONOTONIC_COARSE exists
    // on every Linux legate runs on (2.6.32+), so this cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(not(target_os = "linux"))]
fn raw_ms() -> u64 {
    static START: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
    START.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_precise_clock_within_a_tick() {
        let before = now_ms();
        let start = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let took = now_ms() - before;
        let precise = start.elapsed().as_millis() as u64;
        // A coarse reading is at most one tick (4 ms at HZ=250, 10 ms at
        // HZ=100) behind; each end may be off by one.
        assert!(
            took + 20 >= precise && took <= precise + 20,
            "{took} vs {precise}"
        );
    }
}
