//! callout(9), minimal: functions run once, at softclock, after a delay.
//!
//! The machine's clock device interrupts CPU 0 every tick at IPL_SCHED
//! ([`hardclock`]); due callouts are marked and the `softclock` soft
//! interrupt runs them, in soft-interrupt context. A callout is
//! established once (attach: thread or host context) into the kernel's
//! per-boot callout table and named by a [`CalloutHandle`]; scheduling it
//! needs no allocation (any context), and scheduling an armed callout
//! again keeps the earlier deadline. The table goes away with the kernel.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

use crate::ctx::{IntrCtx, SoftCtx};
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::once::{Once, Registry};
use crate::softint::{SoftintHandle, softint_establish, softint_schedule};

const IDLE: u64 = u64::MAX;

/// Callouts a boot may establish.
pub const MAXCALLOUT: usize = 128;

type CalloutFn = dyn Fn(&SoftCtx) + Send + Sync;

/// A callout.
struct Callout {
    f: Box<CalloutFn>,
    due: AtomicU64,
    fired: AtomicBool,
}

/// An established callout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalloutHandle(u16);

/// The callout table is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalloutsFull;

impl core::error::Error for CalloutsFull {}

impl core::fmt::Display for CalloutsFull {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "callout: more than {MAXCALLOUT} callouts")
    }
}

/// The kernel's per-boot callouts and the softclock softint.
pub(crate) struct Callouts {
    table: Registry<Callout, MAXCALLOUT>,
    softclock: Once<SoftintHandle>,
}

impl Callouts {
    pub(crate) const fn new() -> Self {
        Self {
            table: Registry::new(),
            softclock: Once::new(),
        }
    }
}

/// Establish a callout that runs `f`. Thread or host context (attach).
pub fn callout_establish(
    f: impl Fn(&SoftCtx) + Send + Sync + 'static,
) -> Result<CalloutHandle, CalloutsFull> {
    let c = Callout {
        f: Box::new(f),
        due: AtomicU64::new(IDLE),
        fired: AtomicBool::new(false),
    };
    match kernel().callouts.table.register(c) {
        Ok(i) => Ok(CalloutHandle(i as u16)),
        Err(_) => Err(CalloutsFull),
    }
}

/// Run `h` once, `delay_ns` from now (or at its earlier deadline if it is
/// already armed). Any context.
pub fn callout_schedule(h: CalloutHandle, delay_ns: u64) {
    let k = kernel();
    if let Some(c) = k.callouts.table.get(h.0 as usize) {
        let due = k.md().nanotime().saturating_add(delay_ns);
        c.due.fetch_min(due, AcqRel);
    }
}

/// The clock interrupt: mark due callouts and schedule softclock.
pub fn hardclock(_ctx: &IntrCtx) {
    let k = kernel();
    let now = k.md().nanotime();
    let mut any = false;
    for c in k.callouts.table.iter() {
        let d = c.due.load(Acquire);
        if d <= now && c.due.compare_exchange(d, IDLE, AcqRel, Relaxed).is_ok() {
            c.fired.store(true, Release);
            any = true;
        }
    }
    if any && let Some(h) = k.callouts.softclock.get() {
        softint_schedule(h);
    }
}

fn softclock(ctx: &SoftCtx) {
    for c in kernel().callouts.table.iter() {
        if c.fired.swap(false, AcqRel) {
            (c.f)(ctx);
        }
    }
}

/// Establish the clock vector and softclock (boot). Returns the vector the
/// machine's clock device posts to CPU 0 every tick.
pub fn clock_attach() -> Result<crate::intr::IntrHandle, crate::intr::IntrError> {
    let si = softint_establish(Ipl::SoftClock, "softclock", softclock).expect("softclock");
    // Boot calls this once per kernel, whose cell is empty.
    let _ = kernel().callouts.softclock.set(si);
    crate::intr::intr_establish(Ipl::Sched, "clock", hardclock)
}
