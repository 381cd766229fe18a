//! spl(9): raising and lowering the interrupt priority level.
//!
//! ```ignore
//! let s = spl::splbio();      // block bio and everything below
//! /* ... touch what the disk interrupt handler touches ... */
//! drop(s);                    // splx: restore, and run what became runnable
//! ```
//!
//! [`raise`] never lowers: it returns a guard holding the previous level,
//! and dropping the guard (or [`splx`]) restores it. Restoring to a lower
//! level runs, right there and in interrupt context, every interrupt and
//! soft interrupt that arrived meanwhile and is no longer blocked, highest
//! first; restoring to IPL none is also an AST safe point.
//!
//! # Two implementations, one API
//! Chosen at boot ([`crate::KernelConfig::spl`]):
//!
//! * **`lazy`** (the "optimistic" IPL): the level is a per-CPU word. Raising
//!   is a store. A hardware interrupt that arrives while it is blocked is
//!   recorded in the CPU's pending word and the handler returns at once;
//!   `splx` replays it. Cost: a few instructions per pair.
//! * **`mask`**: hardware levels are enforced by the host's signal mask
//!   (one signal per level, `sigprocmask` on every change of the hard part
//!   of the level), as a kernel would program an interrupt controller. The
//!   per-CPU word is kept as well, for soft levels and for assertions.
//!
//! Both are a statclock part ([`Part::Spl`]): the time inside `splraise`
//! and `splx` themselves (not the time spent at the raised level; what
//! `splx` replays marks its own parts).
//!
//! # Contexts
//! Any context on a CPU. On a host thread that is not a CPU the guards do
//! nothing: there are no interrupts to block there.

use core::marker::PhantomData;
use core::sync::atomic::{Ordering::Relaxed, compiler_fence};

use crate::cpu::{AST_BIT, Cpu, curcpu_opt, unmasked};
use crate::ipl::Ipl;
use crate::statclock::{self, Part};

/// A saved IPL: dropping it restores the level (splx).
#[must_use = "dropping the guard lowers the IPL again at once"]
pub struct Spl {
    old: u8,
    cpu: Option<&'static Cpu>,
    _not_send: PhantomData<*const ()>,
}

impl Spl {
    /// The level this guard restores.
    pub fn saved(&self) -> Ipl {
        Ipl::from_u8(self.old).unwrap_or(Ipl::None)
    }
}

impl Drop for Spl {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(cpu) = self.cpu {
            splx_cpu(cpu, self.old);
        }
    }
}

/// Raise the IPL to at least `level` (splraise); returns the guard.
#[inline(always)]
pub fn raise(level: Ipl) -> Spl {
    let cpu = curcpu_opt();
    let old = match cpu {
        Some(c) => splraise_cpu(c, level as u8),
        None => 0,
    };
    Spl {
        old,
        cpu,
        _not_send: PhantomData,
    }
}

/// Restore a saved level (the same as dropping the guard).
#[inline(always)]
pub fn splx(s: Spl) {
    drop(s)
}

/// The current IPL (`Ipl::None` on a host thread).
pub fn current() -> Ipl {
    curcpu_opt().map(|c| c.ipl()).unwrap_or(Ipl::None)
}

macro_rules! named {
    ($($(#[$m:meta])* $name:ident => $lvl:expr;)*) => {$(
        $(#[$m])*
        #[inline(always)]
        pub fn $name() -> Spl { raise($lvl) }
    )*};
}

named! {
    /// `splsoftclock()`.
    splsoftclock => Ipl::SoftClock;
    /// `splsoftbio()`.
    splsoftbio => Ipl::SoftBio;
    /// `splsoftnet()`.
    splsoftnet => Ipl::SoftNet;
    /// `splsoftserial()`.
    splsoftserial => Ipl::SoftSerial;
    /// `splbio()`: block disk interrupts.
    splbio => Ipl::Bio;
    /// `splnet()`.
    splnet => Ipl::Net;
    /// `spltty()`.
    spltty => Ipl::Tty;
    /// `splvm()`, once `splimp()`: block every interrupt that allocates.
    splvm => Ipl::Vm;
    /// `splsched()`.
    splsched => Ipl::Sched;
    /// `splhigh()`: block everything.
    splhigh => Ipl::High;
}

// ---- the implementation, per CPU ---------------------------------------

/// The hardware level the host mask must block for IPL `l` (0: none).
#[inline(always)]
fn hard_part(l: u8) -> u8 {
    if l >= Ipl::Bio as u8 { l } else { 0 }
}

/// Raise `cpu` to `level` if it is below; returns the previous level.
#[inline(always)]
pub(crate) fn splraise_cpu(cpu: &Cpu, level: u8) -> u8 {
    let part = statclock::enter_cpu(cpu, Part::Spl);
    let old = cpu.line.ipl();
    if level > old {
        if cpu.mask_mode {
            mask_raise(cpu, level);
        } else {
            cpu.line.set_ipl_relaxed(level);
        }
        compiler_fence(core::sync::atomic::Ordering::SeqCst);
    }
    statclock::leave_cpu(cpu, part);
    old
}

/// Set `cpu` to `level` (restore), and run what is pending above it.
#[inline(always)]
pub(crate) fn splx_cpu(cpu: &Cpu, level: u8) {
    let part = statclock::enter_cpu(cpu, Part::Spl);
    if cpu.mask_mode {
        mask_lower(cpu, level);
    } else {
        cpu.line.set_ipl_relaxed(level);
    }
    compiler_fence(core::sync::atomic::Ordering::SeqCst);
    if cpu.line.pending_relaxed() & unmasked(level) != 0 {
        spl_dispatch(cpu, level);
    }
    statclock::leave_cpu(cpu, part);
}

/// `mask` spl, raising: block at the host first, then record the level.
#[cold]
#[inline(never)]
fn mask_raise(cpu: &Cpu, level: u8) {
    mask_sync(cpu, level);
    cpu.line.set_ipl_relaxed(level);
}

/// `mask` spl, lowering: record the level first, then unblock at the host
/// (which may deliver a blocked signal right there, at the new level).
#[cold]
#[inline(never)]
fn mask_lower(cpu: &Cpu, level: u8) {
    cpu.line.set_ipl_relaxed(level);
    compiler_fence(core::sync::atomic::Ordering::SeqCst);
    mask_sync(cpu, level);
}

/// `mask` mode: make the host signal mask block exactly the hard part of
/// `level`. Async-signal-safe.
#[inline]
pub(crate) fn mask_sync(cpu: &Cpu, level: u8) {
    let want = hard_part(level);
    if cpu.hw_blocked.load(Relaxed) != want {
        crate::kernel::kernel()
            .md()
            .hw_mask(Ipl::from_u8(want).unwrap_or(Ipl::None));
        cpu.hw_blocked.store(want, Relaxed);
    }
}

/// The slow path of `splx`: something is pending above the new level.
#[cold]
#[inline(never)]
fn spl_dispatch(cpu: &Cpu, level: u8) {
    if cpu.line.pending() & unmasked(level) & !AST_BIT != 0 {
        crate::intr::dispatch(cpu, level, crate::intr::Origin::Splx);
    }
    if level == Ipl::None as u8 && cpu.line.pending() & AST_BIT != 0 {
        crate::ast::safepoint(cpu);
    }
}
