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
//! In front of glibc's malloc, each thread keeps freed blocks of up to
//! 8 KiB by size class for its next allocations ([`Spare`], 256 KiB at
//! most). glibc's own thread cache keeps 7 blocks per size and none over
//! 1 KiB, while a connection frees a few dozen blocks together (hyper's four
//! 8 KiB buffers, its 5.5 KB task) and the next connection makes the same
//! ones: most went through glibc's bins. Per request on a new connection,
//! malloc and free took 6,300 instructions with only 8 KiB blocks kept, and
//! take 2,200 with this cache (callgrind).
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

/// glibc's malloc behind a per-thread cache of freed blocks ([`Spare`]),
/// with over-aligned blocks carved out of plain `malloc`.
pub struct Allocator;

// SAFETY: every block is a malloc block, or lies inside one. A block aligned
// to at most MALLOC_ALIGN is the malloc block itself. A block with a larger
// alignment A (a power of two) lies in a malloc block of `size + A` bytes, at
// the first A-aligned address past its start; malloc's own 16-byte alignment
// puts that at least 16 bytes in, so the word before it holds the address
// malloc returned, which `dealloc` frees. Callers pass the same layout to
// `dealloc` as to `alloc` (the GlobalAlloc contract), so the two kinds never
// mix. A malloc block of a size in a [`Class`] has at least the class's
// whole size (`alloc`, `alloc_zeroed` and `realloc` ask malloc for that),
// so a kept block serves any size of its class.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            return malloc(layout.size());
        }
        let Some(total) = layout.size().checked_add(layout.align()) else {
            return std::ptr::null_mut();
        };
        let raw = malloc(total);
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
            unsafe { free(ptr, layout.size()) };
        } else {
            let raw = unsafe { ptr.cast::<*mut u8>().sub(1).read_unaligned() };
            unsafe { free(raw, layout.size() + layout.align()) };
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            return unsafe { libc::calloc(1, Class::malloc_size(layout.size())) }.cast();
        }
        let ptr = unsafe { self.alloc(layout) };
        if !ptr.is_null() {
            unsafe { ptr.write_bytes(0, layout.size()) };
        }
        ptr
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            let size = Class::malloc_size(new_size);
            return unsafe { libc::realloc(ptr.cast(), size) }.cast();
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

/// A malloc block of at least `size` bytes: a kept one if the thread has one.
///
/// Not inlined: every allocation in legate and its crates goes through here,
/// and inlined copies made the binary 1.2 MB larger, and more of it resident.
#[inline(never)]
fn malloc(size: usize) -> *mut u8 {
    let Some(class) = Class::of(size) else {
        return unsafe { libc::malloc(size) }.cast();
    };
    if let Some(block) = Spare::take(class) {
        return block;
    }
    unsafe { libc::malloc(class.size()) }.cast()
}

/// Frees a malloc block made for `size` bytes, or keeps it for the thread.
///
/// # Safety
/// `block` came from [`malloc`], `alloc_zeroed` or `realloc` for `size`, and
/// is not used again.
#[inline(never)]
unsafe fn free(block: *mut u8, size: usize) {
    if let Some(class) = Class::of(size)
        && Spare::keep(class, block)
    {
        return;
    }
    unsafe { libc::free(block.cast()) };
}

/// The largest block glibc's thread cache keeps.
const SMALL_MAX: usize = 1032;
/// Classes up to SMALL_MAX: glibc's own block sizes, 16 bytes apart
/// (`16n + 8` usable bytes), so keeping a block by class costs no memory.
const SMALL: usize = (SMALL_MAX + 7) / 16 + 1;
/// Above SMALL_MAX the classes are 512 bytes apart, up to hyper's 8 KiB
/// connection buffers.
const LARGE_STEP: usize = 512;
const LARGE_MAX: usize = 8192;
/// Whole LARGE_STEPs at or below SMALL_MAX, which the large classes skip.
const SKIPPED: usize = SMALL_MAX / LARGE_STEP;
const CLASSES: usize = SMALL + LARGE_MAX / LARGE_STEP - SKIPPED;
/// Blocks kept per class.
const PER_CLASS: u16 = 64;
/// Bytes kept per thread, at most.
const SPARE_BYTES: usize = 256 * 1024;

/// The size class of a block of up to 8 KiB ([`Spare`]).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Class(usize);

impl Class {
    fn of(size: usize) -> Option<Class> {
        if size <= SMALL_MAX {
            Some(Class((size + 7) / 16))
        } else if size <= LARGE_MAX {
            Some(Class(SMALL + (size - 1) / LARGE_STEP - SKIPPED))
        } else {
            None
        }
    }

    /// The largest size of the class: what malloc is asked for.
    fn size(self) -> usize {
        if self.0 < SMALL {
            16 * self.0 + 8
        } else {
            (self.0 - SMALL + SKIPPED + 1) * LARGE_STEP
        }
    }

    /// What to ask malloc for when a block of `size` is made or resized
    /// outside [`malloc`]: a block in a class has its class's whole size.
    fn malloc_size(size: usize) -> usize {
        Class::of(size).map_or(size, Class::size)
    }
}

/// A thread's freed blocks of up to 8 KiB, kept by [`Class`] for its next
/// allocations (see the module's comment), and freed when the thread ends.
/// What it keeps is not free to `malloc_trim`: after a burst, up to
/// SPARE_BYTES per worker stays resident. Each class is a list threaded
/// through its blocks' first word.
struct Spare {
    heads: [*mut u8; CLASSES],
    counts: [u16; CLASSES],
    /// The sum of `counts` times their class sizes, kept rather than summed
    /// over 79 classes at each free.
    bytes: usize,
}

thread_local! {
    static SPARE: RefCell<Spare> = const {
        RefCell::new(Spare { heads: [std::ptr::null_mut(); CLASSES], counts: [0; CLASSES], bytes: 0 })
    };
}

impl Spare {
    /// A kept block of `class`, if this thread has one. Falls back to malloc
    /// (None) while the thread's storage is being torn down.
    fn take(class: Class) -> Option<*mut u8> {
        SPARE
            .try_with(|s| {
                let mut s = s.try_borrow_mut().ok()?;
                let block = s.heads[class.0];
                if block.is_null() {
                    return None;
                }
                // SAFETY: a kept block is owned by this list; its first word
                // is the next one.
                s.heads[class.0] = unsafe { block.cast::<*mut u8>().read() };
                s.counts[class.0] -= 1;
                s.bytes -= class.size();
                Some(block)
            })
            .ok()
            .flatten()
    }

    /// Keeps `block` if there is room; false means the caller frees it.
    fn keep(class: Class, block: *mut u8) -> bool {
        SPARE
            .try_with(|s| {
                let Ok(mut s) = s.try_borrow_mut() else {
                    return false;
                };
                if s.counts[class.0] == PER_CLASS || s.bytes + class.size() > SPARE_BYTES {
                    return false;
                }
                // SAFETY: the block is at least 8 bytes and 8-aligned (malloc's),
                // and no longer used by anyone else.
                unsafe { block.cast::<*mut u8>().write(s.heads[class.0]) };
                s.heads[class.0] = block;
                s.counts[class.0] += 1;
                s.bytes += class.size();
                true
            })
            .unwrap_or(false)
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        for &head in &self.heads {
            let mut block = head;
            while !block.is_null() {
                // SAFETY: each kept block came from malloc and is owned here alone.
                let next = unsafe { block.cast::<*mut u8>().read() };
                unsafe { libc::free(block.cast()) };
                block = next;
            }
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

    /// Empties this thread's spares: the test thread may have kept blocks already.
    fn empty_spares() {
        for class in (0..CLASSES).map(Class) {
            while let Some(b) = Spare::take(class) {
                unsafe { libc::free(b.cast()) };
            }
        }
    }

    fn kept(class: Class) -> u16 {
        SPARE.with(|s| s.borrow().counts[class.0])
    }

    #[test]
    fn classes_are_glibcs_sizes_then_512_byte_steps_to_8k() {
        let sizes: Vec<usize> = (0..CLASSES).map(|c| Class(c).size()).collect();
        assert_eq!(&sizes[..3], [8, 24, 40]);
        assert_eq!(sizes[SMALL - 1], SMALL_MAX);
        assert_eq!(&sizes[SMALL..SMALL + 2], [1536, 2048]);
        assert_eq!(sizes[CLASSES - 1], LARGE_MAX);
        for size in 1..=LARGE_MAX {
            let class = Class::of(size).unwrap();
            assert!(class.size() >= size, "{size}");
            assert!(class.0 == 0 || Class(class.0 - 1).size() < size, "{size}");
        }
        assert_eq!(Class::of(LARGE_MAX + 1), None);
    }

    #[test]
    fn freed_blocks_are_reused_by_their_thread_up_to_the_limits() {
        let a = Allocator;
        let layout = Layout::from_size_align(100, 8).unwrap();
        let class = Class::of(100).unwrap();
        unsafe {
            empty_spares();
            let n = usize::from(PER_CLASS);
            let blocks: Vec<*mut u8> = (0..n + 2).map(|_| a.alloc(layout)).collect();
            for &b in &blocks {
                b.write_bytes(1, 100);
                a.dealloc(b, layout);
            }
            assert_eq!(kept(class), PER_CLASS);
            // Last kept, first given: the block freed last within the limit.
            let again = a.alloc(layout);
            assert_eq!(again, blocks[n - 1]);
            assert_eq!(kept(class), PER_CLASS - 1);
            // A kept block is a malloc block: realloc moves or grows it.
            let grown = a.realloc(again, layout, 30_000);
            assert!((8..100).all(|i| *grown.add(i) == 1));
            a.dealloc(grown, Layout::from_size_align(30_000, 8).unwrap());
            // Another thread has its own (empty) spares.
            let other = std::thread::spawn(|| SPARE.with(|s| s.borrow().bytes))
                .join()
                .unwrap();
            assert_eq!(other, 0);
            // The thread keeps SPARE_BYTES at most, over all classes.
            empty_spares();
            let big = Layout::from_size_align(LARGE_MAX, 8).unwrap();
            let blocks: Vec<*mut u8> = (0..SPARE_BYTES / LARGE_MAX + 1)
                .map(|_| a.alloc(big))
                .collect();
            for &b in &blocks {
                a.dealloc(b, big);
            }
            let kept_bytes = SPARE.with(|s| s.borrow().bytes);
            assert_eq!(kept_bytes, SPARE_BYTES);
            // Full: a small block is freed, not kept.
            let small = a.alloc(layout);
            a.dealloc(small, layout);
            assert_eq!(kept(class), 0);
            empty_spares();
        }
    }

    #[test]
    fn a_kept_block_holds_every_size_of_its_class_however_it_was_made() {
        let a = Allocator;
        unsafe {
            empty_spares();
            // Made by alloc, realloc and alloc_zeroed at sizes below the
            // class's top, each is given out again for the top size.
            let top = Layout::from_size_align(2048, 8).unwrap();
            let small = Layout::from_size_align(100, 8).unwrap();
            let by_alloc = a.alloc(Layout::from_size_align(1864, 8).unwrap());
            let by_realloc = a.realloc(a.alloc(small), small, 1600);
            let by_zeroed = a.alloc_zeroed(Layout::from_size_align(1700, 8).unwrap());
            a.dealloc(by_alloc, Layout::from_size_align(1864, 8).unwrap());
            a.dealloc(by_realloc, Layout::from_size_align(1600, 8).unwrap());
            a.dealloc(by_zeroed, Layout::from_size_align(1700, 8).unwrap());
            for made in [by_zeroed, by_realloc, by_alloc] {
                let b = a.alloc(top);
                assert_eq!(b, made);
                assert!(libc::malloc_usable_size(b.cast()) >= 2048);
                b.write_bytes(7, 2048);
            }
            for b in [by_zeroed, by_realloc, by_alloc] {
                a.dealloc(b, top);
            }
            // An over-aligned block is kept by its malloc block's size.
            let task = Layout::from_size_align(5376, 128).unwrap();
            let t = a.alloc(task);
            a.dealloc(t, task);
            assert_eq!(kept(Class::of(5376 + 128).unwrap()), 1);
            let t2 = a.alloc(task);
            assert_eq!(t2 as usize % 128, 0);
            t2.write_bytes(3, 5376);
            a.dealloc(t2, task);
            empty_spares();
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
