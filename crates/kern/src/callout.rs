//! callout(9), minimal: functions run once, at softclock, after a delay.
//!
//! The machine's clock device interrupts CPU 0 every tick at IPL_SCHED
//! ([`hardclock`]); due callouts are marked and the `softclock` soft
//! interrupt runs them, in soft-interrupt context. A [`Callout`] is a static
//! (no allocation, any context may schedule it); scheduling an armed
//! callout again keeps the earlier deadline.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::*};

use crate::ctx::{IntrCtx, SoftCtx};
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::softint::{SoftintHandle, softint_establish, softint_schedule};

const IDLE: u64 = u64::MAX;

/// A callout.
pub struct Callout {
    f: fn(&SoftCtx),
    due: AtomicU64,
    fired: AtomicBool,
    registered: AtomicBool,
    next: AtomicPtr<Callout>,
}

impl Callout {
    /// A callout that runs `f`.
    pub const fn new(f: fn(&SoftCtx)) -> Self {
        Self {
            f,
            due: AtomicU64::new(IDLE),
            fired: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            next: AtomicPtr::new(core::ptr::null_mut()),
        }
    }
}

/// Every callout ever scheduled (append-only, lock-free).
static LIST: AtomicPtr<Callout> = AtomicPtr::new(core::ptr::null_mut());
static SOFTCLOCK: AtomicPtr<SoftintHandle> = AtomicPtr::new(core::ptr::null_mut());

fn each(mut f: impl FnMut(&'static Callout)) {
    let mut p = LIST.load(Acquire);
    // SAFETY: the list holds only `&'static Callout`s, never removed.
    while let Some(c) = unsafe { p.as_ref() } {
        f(c);
        p = c.next.load(Acquire);
    }
}

/// Run `c` once, `delay_ns` from now (or at its earlier deadline if it is
/// already armed). Any context.
pub fn callout_schedule(c: &'static Callout, delay_ns: u64) {
    if !c.registered.swap(true, AcqRel) {
        let me = c as *const Callout as *mut Callout;
        let mut head = LIST.load(Relaxed);
        loop {
            c.next.store(head, Relaxed);
            match LIST.compare_exchange_weak(head, me, AcqRel, Relaxed) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
    }
    let due = kernel().md().nanotime().saturating_add(delay_ns);
    c.due.fetch_min(due, AcqRel);
}

/// The clock interrupt: mark due callouts and schedule softclock.
pub fn hardclock(_ctx: &IntrCtx) {
    let now = kernel().md().nanotime();
    let mut any = false;
    each(|c| {
        let d = c.due.load(Acquire);
        if d <= now && c.due.compare_exchange(d, IDLE, AcqRel, Relaxed).is_ok() {
            c.fired.store(true, Release);
            any = true;
        }
    });
    if any {
        // SAFETY: set once at boot to a leaked handle.
        if let Some(h) = unsafe { SOFTCLOCK.load(Acquire).as_ref() } {
            softint_schedule(h);
        }
    }
}

fn softclock(ctx: &SoftCtx) {
    each(|c| {
        if c.fired.swap(false, AcqRel) {
            (c.f)(ctx);
        }
    });
}

/// Establish the clock vector and softclock (boot). Returns the vector the
/// machine's clock device posts to CPU 0 every tick.
pub fn clock_attach() -> Result<crate::intr::IntrHandle, crate::intr::IntrError> {
    let si = softint_establish(Ipl::SoftClock, "softclock", softclock).expect("softclock");
    let b = alloc::boxed::Box::into_raw(alloc::boxed::Box::new(si));
    let old = SOFTCLOCK.swap(b, AcqRel);
    if !old.is_null() {
        // SAFETY: the previous boot's handle, leaked by the previous call;
        // that kernel is gone, nothing uses it.
        drop(unsafe { alloc::boxed::Box::from_raw(old) });
    }
    crate::intr::intr_establish(Ipl::Sched, "clock", hardclock)
}
