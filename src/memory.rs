//! The allocator, and giving freed memory back to the kernel, so RSS follows
//! the load down.
//!
//! [`Allocator`] is glibc's malloc, except for over-aligned blocks: tokio
//! aligns each task and each socket's readiness slot to 128 bytes, and glibc
//! 2.36's `posix_memalign` takes a slow path (no thread cache, a split of a
//! larger chunk) that cost ~2,400 instructions per accepted connection, 5%
//! of a proxied request on a new connection. Those blocks are taken from
//! plain `malloc` with room to align them instead. mimalloc was measured as
//! the alternative: 10% fewer instructions per connection, but 6 MB more
//! RSS at idle (and, tuned to commit lazily, half the request rate).
//!
//! hyper gives each side of a connection an 8 KiB read and an 8 KiB write
//! buffer, and renews the read buffer per request while the last request's
//! head still points into it. glibc's thread cache stops at 1 KiB, so each
//! of those takes its bins (two to four times per request). A few freed
//! 8 KiB blocks wait per thread ([`Spare`]) for the next one: 2.9% fewer
//! instructions per keep-alive request, 2.2% per new connection.
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

use std::alloc::{GlobalAlloc, Layout};
use std::cell::RefCell;
use std::time::Duration;

/// What glibc's malloc aligns every block to on 64-bit targets.
const MALLOC_ALIGN: usize = 16;

/// glibc's malloc, with over-aligned blocks carved out of plain `malloc`.
pub struct Allocator;

// SAFETY: blocks aligned to at most MALLOC_ALIGN come straight from malloc,
// realloc and free. A block with a larger alignment A (a power of two) is
// `size + A` bytes from malloc, returned at the first A-aligned address past
// its start; malloc's own 16-byte alignment puts that at least 16 bytes in,
// so the word before it holds the address malloc returned, which `dealloc`
// frees. Callers pass the same layout to `dealloc` as to `alloc` (the
// GlobalAlloc contract), so the two kinds never mix.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            if layout.size() == SPARE_SIZE
                && let Some(block) = Spare::take()
            {
                return block;
            }
            return unsafe { libc::malloc(layout.size()) }.cast();
        }
        let Some(total) = layout.size().checked_add(layout.align()) else {
            return std::ptr::null_mut();
        };
        let raw = unsafe { libc::malloc(total) }.cast::<u8>();
        if raw.is_null() {
            return raw;
        }
        let offset = layout.align() - (raw as usize & (layout.align() - 1));
        // SAFETY: offset is in 16..=align, inside the `size + align` bytes.
        let aligned = unsafe { raw.add(offset) };
        unsafe { aligned.cast::<*mut u8>().sub(1).write_unaligned(raw) };
        aligned
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() <= MALLOC_ALIGN {
            if layout.size() == SPARE_SIZE && Spare::keep(ptr) {
                return;
            }
            unsafe { libc::free(ptr.cast()) };
        } else {
            let raw = unsafe { ptr.cast::<*mut u8>().sub(1).read_unaligned() };
            unsafe { libc::free(raw.cast()) };
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            return unsafe { libc::calloc(1, layout.size()) }.cast();
        }
        let ptr = unsafe { self.alloc(layout) };
        if !ptr.is_null() {
            unsafe { ptr.write_bytes(0, layout.size()) };
        }
        ptr
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            return unsafe { libc::realloc(ptr.cast(), new_size) }.cast();
        }
        // SAFETY: the caller guarantees new_size is valid for this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// The size of hyper's connection buffers, which [`Spare`] keeps.
const SPARE_SIZE: usize = 8192;
/// Blocks kept per thread: two connections' worth, 64 KiB at most.
const SPARE_MAX: usize = 8;

/// A thread's freed [`SPARE_SIZE`] blocks, each a block from `malloc` (so
/// `realloc` and `free` take it as their own), freed when the thread ends.
struct Spare {
    blocks: [*mut u8; SPARE_MAX],
    len: usize,
}

thread_local! {
    static SPARE: RefCell<Spare> = const {
        RefCell::new(Spare { blocks: [std::ptr::null_mut(); SPARE_MAX], len: 0 })
    };
}

impl Spare {
    /// A kept block, if this thread has one. Falls back to malloc (None)
    /// while the thread's storage is being torn down.
    fn take() -> Option<*mut u8> {
        SPARE
            .try_with(|s| {
                let mut s = s.try_borrow_mut().ok()?;
                let len = s.len.checked_sub(1)?;
                s.len = len;
                Some(s.blocks[len])
            })
            .ok()
            .flatten()
    }

    /// Keeps `block` if there is room; false means the caller frees it.
    fn keep(block: *mut u8) -> bool {
        SPARE
            .try_with(|s| {
                let Ok(mut s) = s.try_borrow_mut() else {
                    return false;
                };
                if s.len == SPARE_MAX {
                    return false;
                }
                let len = s.len;
                s.blocks[len] = block;
                s.len = len + 1;
                true
            })
            .unwrap_or(false)
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        for &block in &self.blocks[..self.len] {
            // SAFETY: each kept block came from malloc and is owned here alone.
            unsafe { libc::free(block.cast()) };
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_8k_blocks_are_reused_by_their_thread_up_to_the_limit() {
        let a = Allocator;
        let layout = Layout::from_size_align(SPARE_SIZE, 8).unwrap();
        unsafe {
            // Start empty: the test thread may have kept blocks already.
            while let Some(b) = Spare::take() {
                libc::free(b.cast());
            }
            let blocks: Vec<*mut u8> = (0..SPARE_MAX + 2).map(|_| a.alloc(layout)).collect();
            for &b in &blocks {
                b.write_bytes(1, SPARE_SIZE);
                a.dealloc(b, layout);
            }
            assert_eq!(SPARE.with(|s| s.borrow().len), SPARE_MAX);
            // Last kept, first given: the block freed last within the limit.
            let again = a.alloc(layout);
            assert_eq!(again, blocks[SPARE_MAX - 1]);
            // A kept block is a malloc block: realloc moves or grows it.
            let grown = a.realloc(again, layout, 3 * SPARE_SIZE);
            assert!((0..SPARE_SIZE).all(|i| *grown.add(i) == 1));
            a.dealloc(grown, Layout::from_size_align(3 * SPARE_SIZE, 8).unwrap());
            // Another thread has its own (empty) spares.
            let other = std::thread::spawn(|| SPARE.with(|s| s.borrow().len))
                .join()
                .unwrap();
            assert_eq!(other, 0);
        }
    }

    #[test]
    fn blocks_of_every_alignment_are_aligned_zeroed_and_kept_on_realloc() {
        let a = Allocator;
        for align in [1, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 64, 1000, 5000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc_zeroed(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "align {align} size {size}");
                    assert!((0..size).all(|i| *p.add(i) == 0));
                    p.write_bytes(0xa5, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert_eq!(q as usize % align, 0);
                    assert!((0..size).all(|i| *q.add(i) == 0xa5));
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                }
            }
        }
    }
}
