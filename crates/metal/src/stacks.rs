//! Kernel-thread stacks with an unmapped guard page.
//!
//! The boot page tables identity-map RAM with 2 MiB pages, which cannot
//! leave a 4 KiB hole. Stacks therefore live in a region of their own,
//! [`REGION`] (PML4 slot 1: 512 GiB up), mapped with 4 KiB pages: each
//! stack is a slot of virtual space whose lowest page stays unmapped (the
//! guard) and whose other pages map a block of heap RAM. A thread that
//! runs off its stack faults on the guard at once; the page-fault handler
//! (`trap.rs`) recognises an address in this region and reports a kernel
//! stack overflow.
//!
//! All CPUs share the boot page tables, so a mapping made here is seen by
//! every CPU; the region's intermediate tables are never freed.
//!
//! kern keeps a dead thread's stack for its next thread and frees stacks
//! only at teardown, so [`free`] is rare. Slots are never returned to the
//! virtual space. With one CPU a freed
//! slot is kept on a free list and reused by the next stack of the same
//! size, its page tables with it; with more ([`set_reuse`]`(false)`) a
//! freed slot is never used again, since another CPU may still hold a
//! translation of it in its TLB and there is no shootdown yet (the page
//! tables of freed slots stay: 4 KiB per 2 MiB of stacks ever made). Page tables of the region come from the heap
//! (zeroed, 4 KiB aligned; the heap is identity-mapped, so their address
//! is their physical address).
//!
//! # Contexts
//! [`alloc()`] and [`free`]: thread context only (kern creates and reaps
//! threads there); they allocate from the heap. Their lock is taken with
//! interrupts disabled, and no interrupt handler takes it. A removed
//! mapping is invalidated with `invlpg` on the freeing CPU only; another
//! CPU may keep a stale translation, which is why slots are reused only
//! while one CPU runs.

use alloc::vec::Vec;
use core::alloc::Layout;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use crate::x86;

/// Reuse freed slots (one CPU only).
static REUSE: AtomicBool = AtomicBool::new(true);

/// Whether freed slots may be reused: only while a single CPU runs.
/// Boot, before the other CPUs start.
pub fn set_reuse(on: bool) {
    REUSE.store(on, Relaxed);
}

/// The stacks' virtual region: `[REGION, REGION + REGION_SIZE)`.
pub const REGION: usize = 0x80_0000_0000;
/// Its size (one PML4 slot).
pub const REGION_SIZE: usize = 1 << 39;
/// The guard below every stack.
pub const GUARD: usize = 4096;
const PAGE: usize = 4096;

const PRESENT: u64 = 1;
const WRITE: u64 = 2;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

struct State {
    /// The next unused virtual address of the region.
    next: usize,
    /// Freed slots: (start, bytes including the guard).
    free: Vec<(usize, usize)>,
}

struct Stacks {
    lock: AtomicBool,
    st: UnsafeCell<State>,
}

// SAFETY: `st` is only touched with `lock` held (interrupts off).
unsafe impl Sync for Stacks {}

static STACKS: Stacks = Stacks {
    lock: AtomicBool::new(false),
    st: UnsafeCell::new(State {
        next: REGION,
        free: Vec::new(),
    }),
};

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    // The region allocates (page tables, the free list) with the lock
    // held: no AST may run inside the allocator's exit there (it could
    // create a thread and come back here), so the whole region is a
    // `no_ast` one, delivered when the guard drops, after the lock.
    let _no_ast = kern::cpu::curcpu_opt().map(|_| kern::ast::no_ast());
    x86::without_interrupts(|| {
        while STACKS
            .lock
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held: the only reference.
        let r = f(unsafe { &mut *STACKS.st.get() });
        STACKS.lock.store(false, Release);
        r
    })
}

unsafe extern "C" {
    /// The boot PML4 (`boot.rs`), which CR3 points at.
    static mut dvma_boot_pml4: [u64; 512];
}

/// The page-table entry that maps `va` (in [`REGION`]), creating the
/// intermediate tables. Caller holds the lock.
fn pte(va: usize) -> Option<*mut u64> {
    let mut table = (&raw mut dvma_boot_pml4) as *mut u64;
    for shift in [39, 30, 21] {
        let i = (va >> shift) & 511;
        // SAFETY: `table` is the boot PML4 or a table this module made
        // (4 KiB, identity-mapped); entry `i` is inside it; only this
        // module, under its lock, writes the entries of the region.
        unsafe {
            let e = table.add(i);
            if *e & PRESENT == 0 {
                let l = Layout::from_size_align(PAGE, PAGE).ok()?;
                let t = alloc::alloc::alloc_zeroed(l);
                if t.is_null() {
                    return None;
                }
                e.write(t as u64 | PRESENT | WRITE);
            }
            table = (*e & ADDR) as *mut u64;
        }
    }
    // SAFETY: as above, the page table of `va`.
    Some(unsafe { table.add((va >> 12) & 511) })
}

/// A stack of `size` usable bytes (rounded up to pages) above an unmapped
/// guard page: `(guard start, top)`.
pub fn alloc(size: usize) -> Option<(usize, usize)> {
    let size = size.next_multiple_of(PAGE);
    let layout = Layout::from_size_align(size, PAGE).ok()?;
    // SAFETY: a non-zero-sized layout.
    let ram = unsafe { alloc::alloc::alloc(layout) } as usize;
    if ram == 0 {
        return None;
    }
    let slot = with(|st| {
        let va = match st.free.iter().position(|&(_, n)| n == size + GUARD) {
            Some(i) => st.free.swap_remove(i).0,
            None => {
                let va = st.next;
                if va + size + GUARD > REGION + REGION_SIZE {
                    return None;
                }
                st.next += size + GUARD;
                va
            }
        };
        for off in (0..size).step_by(PAGE) {
            let Some(e) = pte(va + GUARD + off) else {
                // Out of memory for page tables: unmap what was mapped.
                unmap(va, off);
                st.free.push((va, size + GUARD));
                return None;
            };
            // SAFETY: the entry of a page of this slot, which no one else
            // maps (the slot is ours until `free`).
            unsafe { e.write((ram + off) as u64 | PRESENT | WRITE | NX) };
        }
        Some(va)
    });
    match slot {
        Some(va) => Some((va, va + GUARD + size)),
        None => {
            // SAFETY: allocated above with this layout, mapped nowhere now.
            unsafe { alloc::alloc::dealloc(ram as *mut u8, layout) };
            None
        }
    }
}

/// Unmap `len` bytes of stack pages of the slot at `va`. Lock held.
fn unmap(va: usize, len: usize) {
    for off in (0..len).step_by(PAGE) {
        let a = va + GUARD + off;
        if let Some(e) = pte(a) {
            // SAFETY: the entry of a page of this slot (see `alloc`).
            unsafe { e.write(0) };
            // SAFETY: drops this CPU's translation of a page that is no
            // longer mapped.
            unsafe { core::arch::asm!("invlpg [{}]", in(reg) a, options(nostack)) };
        }
    }
}

/// Free a stack from [`alloc()`].
///
/// # Safety
/// 1. `(guard, top)` came from [`alloc()`] and is freed once.
/// 2. Nothing runs on the stack any more.
pub unsafe fn free(guard: usize, top: usize) {
    let size = top - guard - GUARD;
    let ram = with(|st| {
        let ram = pte(guard + GUARD).map(|e| {
            // SAFETY: the first page's entry, written by `alloc`.
            (unsafe { e.read() } & ADDR) as usize
        });
        unmap(guard, size);
        if REUSE.load(Relaxed) {
            st.free.push((guard, size + GUARD));
        }
        ram
    });
    if let Some(ram) = ram {
        let layout = Layout::from_size_align(size, PAGE).expect("stack layout");
        // SAFETY: the block `alloc` mapped into this slot, unmapped now.
        unsafe { alloc::alloc::dealloc(ram as *mut u8, layout) };
    }
}

/// Is `addr` a guard page of the stack region? (Any unmapped address of
/// the region is below some stack's lowest page or in an unused slot.)
pub fn in_region(addr: usize) -> bool {
    (REGION..REGION + REGION_SIZE).contains(&addr)
}
