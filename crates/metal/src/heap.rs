//! The kernel heap: what `alloc` (and so kern's `Box`, `Vec`) allocates
//! from on metal.
//!
//! A first-fit allocator over one region of identity-mapped RAM (set once
//! at boot by [`init`]): a list of free blocks sorted by address, each
//! block's header (its size and the next block's address) stored in the
//! block itself; freeing inserts in order and merges with both neighbours.
//! Every block is a multiple of 16 bytes on a 16-byte boundary.
//!
//! The program's `#[global_allocator]` is `kern::malloc::KernAlloc`
//! wrapping [`Heap`] (see `main.rs`), as on Linux it wraps glibc's malloc:
//! kern's AST protection for the allocator is the same.
//!
//! # Contexts
//! Any context may call it, but interrupt handlers must not (kern's rule;
//! `KernAlloc` counts those that do). The heap's lock is taken with
//! interrupts disabled, so an interrupt handler that broke the rule on the
//! same CPU would still find it free, never deadlock on it.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;
use core::sync::atomic::{
    AtomicBool, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};

use crate::x86;

const UNIT: usize = 16;

/// A free block's header, at its start.
#[repr(C)]
struct Free {
    size: usize,
    next: *mut Free,
}

struct Inner {
    head: *mut Free,
}

/// The kernel heap.
pub struct Heap {
    lock: AtomicBool,
    inner: UnsafeCell<Inner>,
    /// Bytes handed out and not freed.
    pub in_use: AtomicUsize,
    /// Bytes managed.
    pub size: AtomicUsize,
}

// SAFETY: `inner` is only touched with `lock` held (and interrupts off).
unsafe impl Sync for Heap {}

impl Heap {
    /// An empty heap (every allocation fails until [`init`]).
    pub const fn new() -> Self {
        Self {
            lock: AtomicBool::new(false),
            inner: UnsafeCell::new(Inner { head: null_mut() }),
            in_use: AtomicUsize::new(0),
            size: AtomicUsize::new(0),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        x86::without_interrupts(|| {
            while self
                .lock
                .compare_exchange_weak(false, true, Acquire, Relaxed)
                .is_err()
            {
                core::hint::spin_loop();
            }
            // SAFETY: the lock is held, so this is the only reference.
            let r = f(unsafe { &mut *self.inner.get() });
            self.lock.store(false, Release);
            r
        })
    }
}

/// The heap of this kernel.
pub static HEAP: Heap = Heap::new();

/// The global allocator's inner allocator: [`HEAP`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Global;

// SAFETY: forwards to `HEAP`, whose impl upholds the contract.
unsafe impl GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { HEAP.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { HEAP.dealloc(ptr, layout) }
    }
}

impl Default for Heap {
    fn default() -> Self {
        Self::new()
    }
}

/// Hand `[start, start + len)` to `heap`. Boot, once, before anything
/// allocates.
///
/// # Safety
/// 1. The range is RAM, mapped read-write, used by nothing else for the
///    rest of the kernel's life.
pub unsafe fn init(heap: &Heap, start: usize, len: usize) {
    let s = start.next_multiple_of(UNIT);
    let e = (start + len) & !(UNIT - 1);
    assert!(e > s + UNIT, "heap region too small");
    heap.with(|h| {
        let b = s as *mut Free;
        // SAFETY: by the contract the range is ours; `b` is 16-aligned.
        unsafe {
            b.write(Free {
                size: e - s,
                next: null_mut(),
            })
        };
        h.head = b;
    });
    heap.size.store(e - s, Relaxed);
}

fn round(layout: Layout) -> (usize, usize) {
    (
        layout.size().max(1).next_multiple_of(UNIT),
        layout.align().max(UNIT),
    )
}

impl Inner {
    /// First fit: carve `size` bytes aligned to `align` out of a free block.
    fn alloc(&mut self, size: usize, align: usize) -> *mut u8 {
        let mut prev: *mut *mut Free = &mut self.head;
        // SAFETY: every pointer on the list is a free block header written
        // by `init`, `alloc` or `dealloc`, inside the heap region, and only
        // this (locked) code touches them.
        unsafe {
            while !(*prev).is_null() {
                let b = *prev;
                let start = b as usize;
                let end = start + (*b).size;
                let mut at = start.next_multiple_of(align);
                if at != start && at - start < UNIT {
                    at = (start + UNIT).next_multiple_of(align);
                }
                if at + size <= end {
                    let next = (*b).next;
                    // The tail, if any, stays free after the front gap.
                    let tail = at + size;
                    let mut link = next;
                    if end - tail >= UNIT {
                        let t = tail as *mut Free;
                        t.write(Free {
                            size: end - tail,
                            next,
                        });
                        link = t;
                    }
                    if at > start {
                        (*b).size = at - start;
                        (*b).next = link;
                    } else {
                        *prev = link;
                    }
                    return at as *mut u8;
                }
                prev = &mut (*b).next;
            }
        }
        null_mut()
    }

    /// Put `[p, p + size)` back, in address order, merging neighbours.
    ///
    /// # Safety
    /// 1. The block came from `alloc` with this size and is not in use.
    unsafe fn dealloc(&mut self, p: *mut u8, size: usize) {
        let a = p as usize;
        let mut prev: *mut Free = null_mut();
        let mut cur = self.head;
        // SAFETY: as in `alloc`; `p` is a block of ours (the contract).
        unsafe {
            while !cur.is_null() && (cur as usize) < a {
                prev = cur;
                cur = (*cur).next;
            }
            let b = a as *mut Free;
            b.write(Free { size, next: cur });
            if !cur.is_null() && a + size == cur as usize {
                (*b).size += (*cur).size;
                (*b).next = (*cur).next;
            }
            if prev.is_null() {
                self.head = b;
            } else if prev as usize + (*prev).size == a {
                (*prev).size += (*b).size;
                (*prev).next = (*b).next;
            } else {
                (*prev).next = b;
            }
        }
    }
}

// SAFETY: `alloc` returns a block of at least `layout.size()` bytes aligned
// to `layout.align()` that no other live allocation overlaps (it was free
// and is taken off the free list under the lock); `dealloc` puts back the
// same rounded size that `alloc` carved.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = round(layout);
        let p = self.with(|h| h.alloc(size, align));
        if !p.is_null() {
            self.in_use.fetch_add(size, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (size, _) = round(layout);
        // SAFETY: `ptr` came from `alloc` with this layout (GlobalAlloc's
        // contract), so with this rounded size.
        self.with(|h| unsafe { h.dealloc(ptr, size) });
        self.in_use.fetch_sub(size, Relaxed);
    }
}
