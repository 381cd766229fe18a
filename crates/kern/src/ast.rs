//! ASTs: the "kernel signal" of the 1995 mail.
//!
//! > If you have a separate interrupt stack, then you can `push' a frame
//! > onto the non-interrupt stack, such that another function is called
//! > before you return to what you were doing.
//!
//! An interrupt handler calls [`ast_push`]: the AST becomes pending on the
//! CPU. When the outermost interrupt returns, if the interrupted context is
//! a **safe point**, the machine edits the saved context so that the
//! interrupted kernel thread first calls [`upcall`] (through a trampoline
//! that preserves every register, the flags and the full extended state)
//! and then resumes where it was. The AST handler runs as that thread, with
//! a [`ThreadCtx`]: it may sleep.
//!
//! > However, if this can sleep for a significant period of time, you have
//! > to be very careful about interactions with things like file system
//! > locking.
//!
//! So a frame is pushed only when the interrupted context
//! 1. is kernel-thread code (not the scheduler, the idle loop, a coroutine
//!    switch or another interrupt handler),
//! 2. runs at IPL none,
//! 3. holds no spin mutex,
//! 4. is not in a region marked unsafe (`no_ast`: the host allocator, see
//!    [`crate::malloc`]; kmem under the `safepoint` protection),
//! 5. is not already in an upcall, nor in the trampoline or the machine's
//!    trap entry and exit code, with no upcall pushed and not yet entered,
//! 6. has stack room left.
//!
//! Otherwise the AST stays pending and is delivered, by a plain call, at
//! the thread's next safe point: `splx` back to none, the release of its
//! last spin mutex, the end of a `no_ast` region, a sleep or a yield, or a
//! switch back in. A CPU that goes idle with ASTs pending hands them to its
//! softint daemon. Every back-to-back interrupt therefore finds either no
//! upcall or one in progress: frames never nest.
//!
//! # Contexts
//! [`ast_establish`]: thread or host context. [`ast_push`]: interrupt
//! context (hard or soft). Handlers: thread context of whichever thread
//! the CPU was running.

use alloc::boxed::Box;
use core::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};

use crate::cpu::{AST_BIT, Cpu, curcpu, curcpu_opt};
use crate::ctx::{InterruptContext, ThreadCtx};
use crate::intr::TrapFrame;
use crate::kernel::kernel;
use crate::once::Once;
use crate::statclock::{self, Part};

/// The most ASTs a kernel may establish.
pub const MAX_ASTS: usize = 64;

/// Stack room an upcall needs below the interrupted stack pointer.
pub const AST_STACK_RESERVE: usize = 32 * 1024;

/// Errors of [`ast_establish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AstError {
    /// All handles are taken.
    Full,
}

impl core::error::Error for AstError {}

impl core::fmt::Display for AstError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "ast_establish: all {MAX_ASTS} handles taken")
    }
}

/// An established AST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AstHandle {
    id: u8,
}

pub(crate) struct AstHandler {
    f: Box<dyn Fn(&ThreadCtx) + Send + Sync>,
    pub(crate) name: &'static str,
    pub(crate) runs: AtomicU64,
}

/// The AST handlers: each slot set once (by `ast_establish`), read
/// lock-free by the upcall, dropped with the kernel.
pub(crate) struct Asts {
    slots: [Once<AstHandler>; MAX_ASTS],
}

impl Asts {
    pub(crate) fn new() -> Self {
        Self {
            slots: [const { Once::new() }; MAX_ASTS],
        }
    }

    pub(crate) fn for_each(&self, mut f: impl FnMut(&'static str, u64)) {
        for h in self.slots.iter().filter_map(Once::get) {
            f(h.name, h.runs.load(Relaxed));
        }
    }
}

/// Establish an AST handler. Thread or host context.
pub fn ast_establish(
    name: &'static str,
    handler: impl Fn(&ThreadCtx) + Send + Sync + 'static,
) -> Result<AstHandle, AstError> {
    let k = kernel();
    let mut h = AstHandler {
        f: Box::new(handler),
        name,
        runs: AtomicU64::new(0),
    };
    for (id, slot) in k.asts.slots.iter().enumerate() {
        match slot.set(h) {
            Ok(()) => return Ok(AstHandle { id: id as u8 }),
            Err(back) => h = back,
        }
    }
    Err(AstError::Full)
}

/// Push AST `h` onto whatever kernel thread this interrupt interrupted (or
/// the next one to reach a safe point). Interrupt context; never blocks.
pub fn ast_push<C: InterruptContext>(_ctx: &C, h: &AstHandle) {
    let cpu = curcpu();
    let _part = statclock::mark(cpu, Part::Dispatch);
    cpu.ast_pending.fetch_or(1 << h.id, Release);
    cpu.line.set_local(AST_BIT);
}

/// Post an AST from kernel code that has no context token at hand (a
/// stacking driver's `iodone`, called in its component's completion
/// context). In an interrupt it is pushed at the trap's exit; otherwise it
/// runs at the next safe point, as any pending AST.
pub(crate) fn ast_post(h: &AstHandle) {
    let cpu = curcpu();
    let _part = statclock::mark(cpu, Part::Dispatch);
    cpu.ast_pending.fetch_or(1 << h.id, Release);
    cpu.line.set_local(AST_BIT);
    safepoint(cpu);
}

/// Interrupt return: push the upcall frame if this is a safe point.
pub(crate) fn at_trap_exit(cpu: &Cpu, s: u8, frame: &mut dyn TrapFrame) {
    if cpu.ast_pending.load(Acquire) == 0 {
        return;
    }
    let _part = statclock::mark(cpu, Part::Dispatch);
    if frame_push_ok(cpu, s, frame) {
        cpu.ast_armed.store(true, Relaxed);
        frame.push_upcall();
        cpu.stats.ast_pushed.inc();
    } else {
        cpu.stats.ast_deferred.inc();
    }
}

fn frame_push_ok(cpu: &Cpu, s: u8, frame: &dyn TrapFrame) -> bool {
    if s != 0
        || cpu.depth.get() != 0
        || !cpu.in_kthread.load(Relaxed)
        || cpu.mtx_count.get() != 0
        || cpu.no_ast.get() != 0
        || cpu.ast_armed.load(Relaxed)
        || frame.interrupted_trap()
    {
        return false;
    }
    let Some(t) = crate::sched::curthread_opt(kernel(), cpu) else {
        return false;
    };
    if t.in_upcall.load(Relaxed) {
        return false;
    }
    let sp = frame.sp();
    let (lo, hi) = t.stack_bounds();
    sp > lo + AST_STACK_RESERVE && sp <= hi
}

/// The upcall: what the machine's AST trampoline calls on the interrupted
/// thread's stack. Runs every pending AST, then returns into the
/// trampoline, which resumes the thread.
pub fn upcall() {
    let Some(cpu) = curcpu_opt() else { return };
    let _part = statclock::mark(cpu, Part::Dispatch);
    cpu.ast_armed.store(false, Relaxed);
    let t = crate::sched::curthread(kernel(), cpu);
    t.in_upcall.store(true, Relaxed);
    run_pending(cpu);
    debug_assert_eq!(cpu.line.ipl(), 0, "AST handler returned at a raised IPL");
    debug_assert_eq!(cpu.mtx_count.get(), 0, "AST handler kept a spin mutex");
    t.in_upcall.store(false, Relaxed);
}

/// A safe point in thread code: deliver pending ASTs by a plain call if
/// the conditions of the module docs hold.
pub(crate) fn safepoint(cpu: &Cpu) {
    if cpu.line.pending() & AST_BIT == 0
        || cpu.line.ipl() != 0
        || !cpu.in_kthread.load(Relaxed)
        || cpu.depth.get() != 0
        || cpu.mtx_count.get() != 0
        || cpu.no_ast.get() != 0
    {
        return;
    }
    let t = crate::sched::curthread(kernel(), cpu);
    if t.in_upcall.load(Relaxed) {
        return;
    }
    t.in_upcall.store(true, Relaxed);
    cpu.stats.ast_safepoint.inc();
    run_pending(cpu);
    t.in_upcall.store(false, Relaxed);
}

fn run_pending(cpu: &Cpu) {
    let _part = statclock::mark(cpu, Part::Dispatch);
    let k = kernel();
    let ctx = ThreadCtx::new();
    if cpu.in_malloc.get() != 0 {
        cpu.stats.ast_in_malloc.inc();
    }
    loop {
        // Clear the bit first: a push after this sets both again.
        cpu.line.claim(AST_BIT);
        let bits = cpu.ast_pending.swap(0, Acquire);
        if bits == 0 {
            return;
        }
        let mut b = bits;
        while b != 0 {
            let id = b.trailing_zeros() as usize;
            b &= b - 1;
            if let Some(h) = k.asts.slots[id].get() {
                (h.f)(&ctx);
                h.runs.fetch_add(1, Relaxed);
                cpu.stats.ast_handlers.inc();
            }
        }
    }
}

/// Mark the calling thread's code as *not* an AST safe point until the
/// guard drops (then deliver what is pending). Any context on a CPU.
pub fn no_ast() -> NoAst {
    let cpu = curcpu();
    cpu.no_ast.inc();
    NoAst {
        cpu,
        _not_send: core::marker::PhantomData,
    }
}

/// See [`no_ast`].
pub struct NoAst {
    cpu: &'static Cpu,
    _not_send: core::marker::PhantomData<*const ()>,
}

impl Drop for NoAst {
    fn drop(&mut self) {
        if self.cpu.no_ast.dec_is_zero() {
            safepoint(self.cpu);
        }
    }
}
