//! Giving freed memory back to the kernel, so RSS follows the load down.
//!
//! glibc's malloc keeps what a burst of connections freed: per-thread arenas
//! are only trimmed at their top, and its dynamic mmap threshold moves large
//! buffers into the heap after the first ones are freed. After 2,000
//! keep-alive connections closed, RSS stayed at the peak (3x idle) for good.
//! `malloc_trim(0)` releases every free page of every arena (MADV_DONTNEED,
//! so RSS drops at once). A task calls it every few seconds, only when the
//! arenas hold a worthwhile amount of free memory, so an idle or steady
//! sidecar pays nothing but a `mallinfo2` call.
#![allow(unsafe_code)]

use std::time::Duration;

/// How often the free memory is looked at.
const EVERY: Duration = Duration::from_secs(5);
/// Free bytes held by the allocator worth a trim.
const WORTH_TRIMMING: usize = 2 * 1024 * 1024;

/// Trims the allocator's free memory now and then, for the process's life.
pub async fn return_freed() {
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if free_bytes() >= WORTH_TRIMMING {
            trim();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_bytes() -> usize {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
    let info = unsafe { libc::mallinfo2() };
    info.fordblks
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; 0
    // keeps no padding at the top of the heap.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_bytes() -> usize {
    0
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
