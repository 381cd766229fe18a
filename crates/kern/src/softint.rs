//! softint(9): soft interrupts, "scheduled to occur real soon now".
//!
//! * [`softint_establish`] (attach time) registers a handler at one of the
//!   four soft levels.
//! * [`softint_schedule`] (any context on a CPU) marks it pending on the
//!   current CPU. It runs when that CPU's IPL drops below its level: on the
//!   return from the interrupt that scheduled it, at the `splx` that
//!   lowers the level, or at once if scheduled from thread context below
//!   its level. Scheduling a pending softint again coalesces.
//!
//! Handlers run in soft-interrupt context ([`SoftCtx`]): at their level,
//! with hardware interrupts enabled above it, on the interrupt stack when
//! entered from a trap. They may not sleep.
//!
//! # Budget
//! One pass (one trap or `splx`) runs handlers until none is pending, but
//! at most [`crate::KernelConfig::softint_max_restarts`] rounds and
//! [`crate::KernelConfig::softint_budget_ns`] nanoseconds (Linux: 10
//! restarts, 2 ms). What is left goes to the CPU's softint daemon thread
//! (`softintd/N`, Linux's ksoftirqd), which runs it at the same level, in
//! soft-interrupt context, between other threads. The daemon also runs ASTs
//! left pending when the CPU goes idle.

use alloc::boxed::Box;
use core::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};

use crate::cpu::{Cpu, curcpu, soft_bit};
use crate::ctx::{SoftCtx, ThreadCtx};
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::once::Once;
use crate::statclock::{self, Part};

/// The most soft interrupts a kernel may establish.
pub const MAX_SOFTINTS: usize = 64;

/// Errors of [`softint_establish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SoftintError {
    /// The level is not a soft level.
    NotSoftLevel {
        /// The level asked for.
        level: Ipl,
    },
    /// All handles are taken.
    Full,
}

impl core::error::Error for SoftintError {}

impl core::fmt::Display for SoftintError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SoftintError::NotSoftLevel { level } => {
                write!(f, "softint_establish: {level} is not a soft level")
            }
            SoftintError::Full => write!(f, "softint_establish: all {MAX_SOFTINTS} handles taken"),
        }
    }
}

/// An established soft interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftintHandle {
    id: u8,
    level: Ipl,
}

impl SoftintHandle {
    /// Its level.
    pub fn level(&self) -> Ipl {
        self.level
    }
}

pub(crate) struct SoftHandler {
    f: Box<dyn Fn(&SoftCtx) + Send + Sync>,
    pub(crate) name: &'static str,
    pub(crate) runs: AtomicU64,
}

/// The softint handlers: each slot set once (by `softint_establish`), read
/// lock-free by whoever runs the softints, dropped with the kernel.
pub(crate) struct Softints {
    slots: [Once<SoftHandler>; MAX_SOFTINTS],
    /// Handle ids of each soft level.
    level_ids: [AtomicU64; 4],
}

impl Softints {
    pub(crate) fn new() -> Self {
        Self {
            slots: [const { Once::new() }; MAX_SOFTINTS],
            level_ids: [const { AtomicU64::new(0) }; 4],
        }
    }

    /// (name, runs) of every established softint.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&'static str, u64)) {
        for h in self.slots.iter().filter_map(Once::get) {
            f(h.name, h.runs.load(Relaxed));
        }
    }
}

/// Establish a soft interrupt at soft level `level`. Thread or host context.
pub fn softint_establish(
    level: Ipl,
    name: &'static str,
    handler: impl Fn(&SoftCtx) + Send + Sync + 'static,
) -> Result<SoftintHandle, SoftintError> {
    let Some(li) = level.soft_index() else {
        return Err(SoftintError::NotSoftLevel { level });
    };
    let k = kernel();
    let mut h = SoftHandler {
        f: Box::new(handler),
        name,
        runs: AtomicU64::new(0),
    };
    for (id, slot) in k.softints.slots.iter().enumerate() {
        match slot.set(h) {
            Ok(()) => {
                k.softints.level_ids[li].fetch_or(1 << id, Release);
                return Ok(SoftintHandle {
                    id: id as u8,
                    level,
                });
            }
            Err(back) => h = back,
        }
    }
    Err(SoftintError::Full)
}

/// Schedule `h` on the current CPU. Any context on a CPU; never blocks,
/// never allocates.
pub fn softint_schedule(h: &SoftintHandle) {
    let cpu = curcpu();
    let _part = statclock::mark(cpu, Part::Dispatch);
    cpu.soft_pending.schedule(1 << h.id);
    cpu.line.set_local(soft_bit(h.level));
    // From thread context below its level nothing else would run it soon:
    // do what the `splx` would.
    let ipl = cpu.line.ipl();
    if cpu.depth.get() == 0 && ipl < h.level as u8 {
        crate::intr::dispatch(cpu, ipl, crate::intr::Origin::Splx);
    }
}

fn run_bits(cpu: &Cpu, bits: u64, level: Ipl, daemon: bool) {
    let k = kernel();
    let mut b = bits;
    while b != 0 {
        let id = b.trailing_zeros() as usize;
        b &= b - 1;
        if let Some(h) = k.softints.slots[id].get() {
            (h.f)(&SoftCtx::new(level));
            h.runs.fetch_add(1, Relaxed);
            if daemon {
                cpu.stats.softints_daemon.inc();
            } else {
                cpu.stats.softints.inc();
            }
        }
    }
}

/// Run the softints of `level` pending on `cpu`, within the budget.
/// Called by the dispatch loop with the CPU at `level`.
pub(crate) fn run_level(cpu: &Cpu, level: Ipl) {
    let _part = statclock::mark(cpu, Part::Dispatch);
    let k = kernel();
    let Some(li) = level.soft_index() else { return };
    let mask = k.softints.level_ids[li].load(Acquire);
    let cfg = k.config();
    let start = k.md().nanotime();
    let mut rounds = 0u32;
    loop {
        let bits = cpu.soft_pending.take(mask);
        if bits == 0 {
            return;
        }
        run_bits(cpu, bits, level, false);
        rounds += 1;
        if rounds >= cfg.softint_max_restarts
            || k.md().nanotime().saturating_sub(start) >= cfg.softint_budget_ns
        {
            // Out of budget: whatever is pending now goes to the daemon.
            cpu.line.claim(soft_bit(level));
            let left = cpu.soft_pending.take(mask);
            if left != 0 {
                cpu.soft_deferred.schedule(left);
                cpu.stats.softint_overruns.inc();
                crate::sched::wakeup(crate::sched::wchan(&cpu.softintd_wchan));
            }
            return;
        }
    }
}

/// The softint daemon of the current CPU: runs deferred softints and ASTs
/// orphaned by an idle CPU, until shutdown.
pub(crate) fn softintd(ctx: &ThreadCtx) {
    let cpu = curcpu();
    let k = kernel();
    let chan = crate::sched::wchan(&cpu.softintd_wchan);
    loop {
        // The daemon's loop runs at IPL none: a level leaked by anything it
        // ran would keep every AST pending on this CPU while the loop spins
        // (non-preemptive: nothing else would run). Fail loudly instead.
        assert_eq!(
            cpu.line.ipl(),
            0,
            "softintd/{}: at a raised IPL at the top of its loop",
            cpu.index()
        );
        // Deferrals happen only on this CPU, in softint passes, which the
        // raised IPL keeps out while we look and go to sleep.
        let s = crate::spl::raise(Ipl::SoftSerial);
        while cpu.soft_deferred.peek() == 0 && cpu.line.pending() & crate::cpu::AST_BIT == 0 {
            if crate::sched::tsleep(ctx, chan).is_err() {
                return;
            }
        }
        drop(s);
        for level in Ipl::SOFT.iter().rev() {
            let li = level.soft_index().unwrap_or(0);
            let mask = k.softints.level_ids[li].load(Acquire);
            let bits = cpu.soft_deferred.take(mask);
            if bits != 0 {
                let s = crate::spl::raise(*level);
                cpu.in_softint_thread.store(true, Relaxed);
                run_bits(cpu, bits, *level, true);
                cpu.in_softint_thread.store(false, Relaxed);
                drop(s);
            }
        }
        // At IPL none, holding nothing: a safe point for orphaned ASTs.
        crate::ast::safepoint(cpu);
        if k.is_shutting_down() {
            return;
        }
    }
}
