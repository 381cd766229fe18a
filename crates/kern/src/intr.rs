//! Hardware interrupts: establishing handlers, posting, dispatching.
//!
//! * [`intr_establish`] (attach time, thread or host context) gives a
//!   handler a vector at a hardware IPL.
//! * [`intr_disestablish`] (detach time, thread context) takes it back:
//!   when it returns the handler runs on no CPU and never will again, and
//!   the vector is free for the next `intr_establish`.
//! * [`intr_post`] (any thread: a device) marks the vector pending on a CPU
//!   and kicks the CPU only if it would not notice otherwise
//!   ([`crate::pending`]).
//! * [`trap`] is what the machine calls from its interrupt entry (a signal
//!   handler): it runs every source pending above the interrupted IPL,
//!   highest first, then soft interrupts whose level is above the
//!   interrupted IPL, then decides whether to push an AST frame.
//!
//! `trap` and the dispatch loop are the statclock part
//! [`Part::IntrEntry`]; the handlers' bodies mark their own parts.
//!
//! Handlers nest by IPL: while a handler runs the CPU is at the handler's
//! level, so only strictly higher sources preempt it; equal or lower ones
//! stay pending and run when it returns. A handler may be called when its
//! device has nothing to report (a coalesced or replayed post): it must
//! tolerate that, as a shared interrupt line's handler does.
//!
//! # Rules for handlers (interrupt context)
//! A handler receives an [`IntrCtx`]. It must not sleep (the sleeping APIs
//! take a [`crate::ThreadCtx`], which it does not have), must not allocate
//! from the host allocator, must not print, and may take only spin mutexes
//! ([`crate::lock::SpinMutex`]) whose IPL is at least its own level: thread
//! code holding such a mutex has raised the CPU to that level, so the
//! handler cannot interrupt it on the same CPU and only spins briefly
//! against other CPUs. It may call [`crate::sched::wakeup`],
//! [`crate::softint::softint_schedule`], [`crate::ast::ast_push`] and
//! `Pool::get_nowait`.

use alloc::boxed::Box;
use core::sync::atomic::AtomicPtr;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};

use crate::cpu::{AST_BIT, Cpu, bit_level, curcpu_opt, hard_bits, unmasked};
use crate::ctx::{IntrCtx, ThreadCtx};
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::pending::Post;
use crate::statclock::{self, Part};

/// Errors of [`intr_establish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntrError {
    /// The level is not a hardware level.
    NotHardLevel {
        /// The level asked for.
        level: Ipl,
    },
    /// Every vector of the level is taken.
    NoVector {
        /// The level asked for.
        level: Ipl,
    },
}

impl core::error::Error for IntrError {}

impl core::fmt::Display for IntrError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IntrError::NotHardLevel { level } => {
                write!(
                    f,
                    "intr_establish: {level} is not a hardware interrupt level"
                )
            }
            IntrError::NoVector { level } => {
                write!(f, "intr_establish: no free vector at {level}")
            }
        }
    }
}

/// An established interrupt vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntrHandle {
    bit: u8,
}

impl IntrHandle {
    /// The vector's IPL.
    pub fn level(&self) -> Ipl {
        bit_level(self.bit as u32)
    }
    /// The vector's bit in the pending word.
    pub fn bit(&self) -> u32 {
        self.bit as u32
    }
}

pub(crate) struct Handler {
    f: Box<dyn Fn(&IntrCtx) + Send + Sync>,
    pub(crate) name: &'static str,
    /// The next handler on the retired list ([`Vectors::retire`]).
    next: AtomicPtr<Handler>,
}

/// The vector table: a handler per pending-word bit, read lock-free by
/// `dispatch`.
///
/// A slot holds a `Box<Handler>` turned into a raw pointer, or null.
/// `intr_establish` fills a null slot (compare-and-swap);
/// `intr_disestablish` swaps it back to null and puts the handler on the
/// retired list, which is only ever pushed to: a handler, once in the
/// table, is freed only when the table is dropped with the kernel (when no
/// CPU can run one any more). So a pointer loaded from a slot stays valid
/// however long the dispatch that loaded it takes, and statistics may read
/// a handler's name at any time; a retired handler costs its box (a few
/// dozen bytes) until the kernel is torn down.
pub(crate) struct Vectors {
    slots: [AtomicPtr<Handler>; 64],
    retired: AtomicPtr<Handler>,
}

impl Vectors {
    pub(crate) fn new() -> Self {
        Self {
            slots: [const { AtomicPtr::new(core::ptr::null_mut()) }; 64],
            retired: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// The handler of `bit`, if one is established.
    #[inline]
    fn get(&self, bit: u32) -> Option<&Handler> {
        let p = self.slots[bit as usize].load(Acquire);
        // SAFETY: a non-null slot holds a pointer from `Box::into_raw` of
        // a handler that is freed only by `Drop` (see the type's docs):
        // it lives as long as `self`.
        unsafe { p.as_ref() }
    }

    pub(crate) fn name(&self, bit: u32) -> Option<&'static str> {
        self.get(bit).map(|h| h.name)
    }

    /// Keep `h` (taken out of its slot) until the table is dropped.
    fn retire(&self, h: *mut Handler) {
        // SAFETY: `h` came out of a slot (so from `Box::into_raw`, live
        // until `Drop`), and the swap that took it out gave it to us
        // alone: nobody else writes its `next`.
        let hr = unsafe { &*h };
        let mut head = self.retired.load(Acquire);
        loop {
            hr.next.store(head, Relaxed);
            match self.retired.compare_exchange_weak(head, h, AcqRel, Acquire) {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }
}

impl Drop for Vectors {
    fn drop(&mut self) {
        let free = |p: *mut Handler| {
            if !p.is_null() {
                // SAFETY: every non-null pointer in a slot or on the
                // retired list came from `Box::into_raw` and is on exactly
                // one of them; `&mut self` means no CPU reads them now.
                drop(unsafe { Box::from_raw(p) });
            }
        };
        for s in &mut self.slots {
            free(*s.get_mut());
        }
        let mut p = *self.retired.get_mut();
        while !p.is_null() {
            // SAFETY: as above; `next` is read before the box is freed.
            let next = unsafe { (*p).next.load(Relaxed) };
            free(p);
            p = next;
        }
    }
}

/// Establish `handler` for a new vector at hardware level `level`.
///
/// Thread or host context. The handler runs in interrupt context on
/// whichever CPU the vector is posted to.
pub fn intr_establish(
    level: Ipl,
    name: &'static str,
    handler: impl Fn(&IntrCtx) + Send + Sync + 'static,
) -> Result<IntrHandle, IntrError> {
    if !level.is_hard() {
        return Err(IntrError::NotHardLevel { level });
    }
    let (first, n) = hard_bits(level);
    let h = Box::into_raw(Box::new(Handler {
        f: Box::new(handler),
        name,
        next: AtomicPtr::new(core::ptr::null_mut()),
    }));
    let k = kernel();
    for bit in first..first + n {
        if k.vectors.slots[bit as usize]
            .compare_exchange(core::ptr::null_mut(), h, AcqRel, Acquire)
            .is_ok()
        {
            return Ok(IntrHandle { bit: bit as u8 });
        }
    }
    // SAFETY: `h` is the box made above, which no slot took.
    drop(unsafe { Box::from_raw(h) });
    Err(IntrError::NoVector { level })
}

/// Take vector `h` back from its handler (a driver's detach).
///
/// Thread context (it waits). When it returns, the handler is not running
/// on any CPU and will never be called again; the vector is free for the
/// next [`intr_establish`] (which may get it before this returns: its
/// handler may then be called for a post meant for the old one, as a
/// shared line's handler can be, and must tolerate it). The caller must
/// make sure its device no longer posts `h` for it, or accept that those
/// posts reach the vector's next owner.
///
/// How it waits: the slot is emptied, then every other CPU runs a short
/// kernel thread and this one waits for them all (NetBSD's
/// `intr_disestablish` waits the same way, with a cross-call). A CPU that
/// runs thread code is not inside any interrupt dispatch (handlers never
/// sleep or switch, and a dispatch runs to its end before the interrupted
/// code resumes), so every dispatch that could have loaded the old
/// handler has finished, and every later one finds the slot empty. This
/// CPU needs no thread: its caller is thread code. The handler itself is
/// retired, not freed: kept until the kernel is torn down, so that a
/// dispatch or the statistics can still read it. Disestablishing a vector
/// that is not established does nothing.
pub fn intr_disestablish(ctx: &ThreadCtx, h: IntrHandle) {
    let k = kernel();
    let old = k.vectors.slots[h.bit as usize].swap(core::ptr::null_mut(), AcqRel);
    if old.is_null() {
        return;
    }
    k.vectors.retire(old);
    quiesce(ctx);
}

/// Wait until every CPU has run thread code since the call (see
/// [`intr_disestablish`]). Thread context.
fn quiesce(ctx: &ThreadCtx) {
    let k = kernel();
    let me = ctx.cpu();
    for c in 0..k.ncpu() {
        if c == me {
            continue;
        }
        // Without a thread (the kernel shutting down, no stacks left) the
        // CPU is not waited for: at shutdown nothing posts any more.
        if let Ok(t) = crate::sched::kthread_create(Some(c), "intrquiesce", |_| {}) {
            let _ = t.join(ctx);
        }
    }
}

/// Post vector `h` on CPU `cpu`: any thread, any context (devices call it).
///
/// Sets the vector pending and kicks the CPU only when it would not notice
/// by itself; a vector already pending coalesces. A post by the target
/// CPU's own thread code interrupts it with a signal, as a self-IPI would
/// (the micro-benchmarks and `dvma race` rely on that); see
/// [`intr_post_inline`] for the device that would rather not.
pub fn intr_post(cpu: usize, h: IntrHandle) {
    post(cpu, h, false)
}

/// [`intr_post`] for a device whose completion the target CPU noticed
/// itself (a doorbell that reaped it inline): from thread code of that CPU
/// the interrupt is taken right here, as the signal would have been taken
/// on its return, or, if the IPL blocks it, by the `splx` that lowers the
/// IPL, as a deferred signal would be; no signal is sent. From anywhere
/// else, the same as [`intr_post`]. Any context.
pub fn intr_post_inline(cpu: usize, h: IntrHandle) {
    post(cpu, h, true)
}

fn post(cpu: usize, h: IntrHandle, inline: bool) {
    let k = kernel();
    let c = k.cpu(cpu);
    match c.line.post(1u64 << h.bit, h.level()) {
        Post::Coalesced => {
            c.stats.posts_coalesced.fetch_add(1, Relaxed);
        }
        Post::Noticed => {}
        Post::Kick(crate::md::Kick::Interrupt(level)) if inline && self_post(c) => {
            c.stats.posts_self.fetch_add(1, Relaxed);
            let ipl = c.line.ipl();
            if level as u8 > ipl {
                crate::spl::splx_cpu(c, ipl);
            }
        }
        Post::Kick(kick) => {
            match kick {
                crate::md::Kick::Interrupt(_) => c.stats.kicks_intr.fetch_add(1, Relaxed),
                crate::md::Kick::Wake => c.stats.kicks_wake.fetch_add(1, Relaxed),
            };
            k.md().kick(cpu, kick);
        }
    }
}

/// Is the caller thread code of CPU `c` (not one of its interrupt
/// handlers, not its idle loop, not another CPU or a host thread)?
fn self_post(c: &Cpu) -> bool {
    curcpu_opt().is_some_and(|me| core::ptr::eq(me, c))
        && c.intr_depth() == 0
        && c.in_kthread.load(Relaxed)
}

/// What the machine knows about an interrupted context (a signal frame).
pub trait TrapFrame {
    /// The hardware level whose signal brought us here: the host blocks it
    /// and everything below it while the handler runs (`mask` spl).
    fn signal_level(&self) -> Ipl;
    /// The interrupted stack pointer.
    fn sp(&self) -> usize;
    /// Did we interrupt another trap (a signal handler), or the machine's
    /// entry, exit or AST trampoline code?
    fn interrupted_trap(&self) -> bool;
    /// Make the interrupted context call the AST upcall before it resumes:
    /// push a frame onto its stack (edit the saved context).
    fn push_upcall(&mut self);
}

/// Where a dispatch pass was entered from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A trap (signal).
    Trap,
    /// `splx` replaying what the IPL deferred.
    Splx,
    /// The idle loop, which polls instead of taking signals.
    Idle,
}

/// The interrupt entry: called by the machine's signal handler.
///
/// Interrupt context. Runs what is pending above the interrupted IPL, then,
/// at the outermost trap, pushes an AST frame if an AST is pending and the
/// interrupted context is a safe point.
///
/// Returns true when it ran handlers in the idle loop's sleep window
/// (the CPU's state said `SLEEP`): they may have queued a thread on this
/// CPU, which changes no word the machine's [`crate::md::Md::idle_wait`]
/// looks at, so a machine whose wait cannot be entered atomically with
/// its look at the word (a system call after a load) must make that wait
/// return at once. A machine that looks with interrupts disabled and
/// sleeps with `sti; hlt` may ignore it.
pub fn trap(frame: &mut dyn TrapFrame) -> bool {
    let Some(cpu) = curcpu_opt() else {
        return false;
    };
    let part = statclock::enter_cpu(cpu, Part::IntrEntry);
    let asleep = cpu.line.state() == crate::pending::SLEEP;
    cpu.stats.traps.inc();
    if cpu.in_alloc.get() != 0 {
        cpu.stats.traps_in_alloc.inc();
    }
    let s = cpu.line.ipl();
    // `mask` spl: the host blocks up to the signal's level until we change it.
    let hw_saved = cpu.hw_blocked.load(Relaxed);
    if cpu.mask_mode {
        let sig = frame.signal_level() as u8;
        if sig > hw_saved {
            cpu.hw_blocked.store(sig, Relaxed);
        }
    }
    let ran = if cpu.line.pending() & unmasked(s) & !AST_BIT != 0 {
        dispatch(cpu, s, Origin::Trap)
    } else {
        false
    };
    if !ran {
        cpu.stats.traps_idle.inc();
    }
    if cpu.mask_mode {
        // sigreturn restores the interrupted mask.
        cpu.hw_blocked.store(hw_saved, Relaxed);
    }
    if cpu.line.pending() & AST_BIT != 0 {
        crate::ast::at_trap_exit(cpu, s, frame);
    }
    statclock::leave_cpu(cpu, part);
    asleep && ran
}

/// Run every source pending above `s`, highest first, until none is left.
/// Returns whether anything ran. Interrupt context (depth is raised).
pub(crate) fn dispatch(cpu: &Cpu, s: u8, origin: Origin) -> bool {
    let k = kernel();
    let runnable = unmasked(s) & !AST_BIT;
    let part = statclock::enter_cpu(cpu, Part::IntrEntry);
    let prev = cpu.line.enter_intr();
    cpu.depth.inc();
    let mut ran = false;
    loop {
        loop {
            let p = cpu.line.pending() & runnable;
            if p == 0 {
                break;
            }
            let b = 63 - p.leading_zeros();
            let bit = 1u64 << b;
            if !cpu.line.claim(bit) {
                continue; // a nested dispatch took it
            }
            let level = bit_level(b);
            set_level(cpu, level as u8);
            if level.is_hard() {
                if let Some(h) = k.vectors.get(b) {
                    (h.f)(&IntrCtx::new(level));
                }
                cpu.stats.intr[b as usize].inc();
                match origin {
                    Origin::Splx => cpu.stats.splx_replays.inc(),
                    Origin::Idle => cpu.stats.idle_dispatch.inc(),
                    Origin::Trap => {}
                };
            } else {
                crate::softint::run_level(cpu, level);
            }
            // Lower before looking at the pending word again (pending.rs).
            cpu.line.set_ipl_sync(s);
            ran = true;
        }
        if cpu.line.leave_intr(prev, runnable) == 0 {
            break;
        }
        cpu.line.enter_intr();
    }
    cpu.depth.dec();
    if cpu.mask_mode && origin != Origin::Trap {
        crate::spl::mask_sync(cpu, s);
    }
    statclock::leave_cpu(cpu, part);
    ran
}

/// Raise (or set) the CPU's level inside the dispatch loop.
#[inline]
fn set_level(cpu: &Cpu, level: u8) {
    if cpu.mask_mode {
        crate::spl::mask_sync(cpu, level);
    }
    cpu.line.set_ipl_sync(level);
}
