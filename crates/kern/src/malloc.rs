//! The host allocator as the kernel's `malloc`: every call is a `no_ast`
//! region.
//!
//! `kern` allocates through `alloc` (`Box`, `Vec`), and on a machine that is
//! whatever `#[global_allocator]` the final program has: glibc's malloc on
//! Linux. That allocator is not reentrant. An AST pushed onto a kernel
//! thread that a signal interrupted *inside* malloc would run its handler,
//! which may allocate or sleep, on top of a half-updated free list or with
//! the arena lock held: the bug of the 1995 mail with glibc playing the part
//! of the i386's kmem.
//!
//! [`KernAlloc`] wraps the machine's allocator. While a CPU is inside it, the
//! CPU's `no_ast` count is raised, so the trap exit does not push an upcall
//! there ([`crate::ast`], safe-point rule 4); a pending AST is delivered by a
//! plain call as the allocation returns, once the allocator is consistent
//! again. The machine installs it:
//!
//! ```ignore
//! #[global_allocator]
//! static A: kern::malloc::KernAlloc<std::alloc::System> = kern::malloc::KernAlloc::new(std::alloc::System);
//! ```
//!
//! It also counts two things that must never happen, for the tests and the
//! statistics: allocations made in interrupt context
//! ([`crate::cpu::CpuStats::intr_mallocs`]; interrupt handlers allocate
//! nothing), and AST handlers entered while their thread was inside the
//! allocator ([`crate::cpu::CpuStats::ast_in_malloc`]).
//! [`crate::KernelConfig::malloc_no_ast`] `= false` turns the protection off
//! to show the hazard (`crates/machine/tests/ast_malloc.rs`).
//!
//! # Contexts
//! Any: host threads (no CPU: passed straight through), thread context,
//! and, although they must not, interrupt handlers (counted). It takes no
//! lock of its own and allocates nothing.

use core::alloc::{GlobalAlloc, Layout};

use crate::cpu::{AST_BIT, Cpu, curcpu_opt};

/// A global allocator that makes `A` a `no_ast` region (module docs).
#[derive(Debug)]
pub struct KernAlloc<A> {
    inner: A,
}

impl<A> KernAlloc<A> {
    /// Wrap `inner`.
    pub const fn new(inner: A) -> Self {
        Self { inner }
    }
}

/// Enter the allocator on the calling CPU, if it is one.
#[inline(always)]
fn enter() -> Option<&'static Cpu> {
    let cpu = curcpu_opt()?;
    // `no_ast` first and last: the region it covers contains the one that
    // `in_malloc` marks (a signal between the two sees no hazard).
    if cpu.malloc_no_ast {
        cpu.no_ast.inc();
    }
    cpu.in_malloc.inc();
    if cpu.depth.get() != 0 {
        cpu.stats.intr_mallocs.inc();
    }
    Some(cpu)
}

/// Leave it; deliver what became pending meanwhile if this is a safe point.
#[inline(always)]
fn exit(cpu: Option<&'static Cpu>) {
    let Some(cpu) = cpu else { return };
    cpu.in_malloc.dec();
    if cpu.malloc_no_ast && cpu.no_ast.dec_is_zero() && cpu.line.pending() & AST_BIT != 0 {
        crate::ast::safepoint(cpu);
    }
}

// SAFETY: every method forwards to `A` with the caller's arguments and
// returns what `A` returned; the bookkeeping around it touches only per-CPU
// counters and never allocates, so `A`'s contract is the caller's.
unsafe impl<A: GlobalAlloc> GlobalAlloc for KernAlloc<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let c = enter();
        // SAFETY: forwarded (see the impl).
        let p = unsafe { self.inner.alloc(layout) };
        exit(c);
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let c = enter();
        // SAFETY: forwarded (see the impl).
        unsafe { self.inner.dealloc(ptr, layout) };
        exit(c);
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let c = enter();
        // SAFETY: forwarded (see the impl).
        let p = unsafe { self.inner.alloc_zeroed(layout) };
        exit(c);
        p
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let c = enter();
        // SAFETY: forwarded (see the impl).
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        exit(c);
        p
    }
}
