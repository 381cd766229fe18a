//! Context tokens: which kind of code is running, in the types.
//!
//! Every handler receives a token of its context, and the kernel's APIs ask
//! for the token that their rules require:
//!
//! * [`ThreadCtx`]: kernel-thread code. Needed to sleep
//!   ([`crate::sched::tsleep`]), to yield, to wait for a pool item
//!   (`Pool::get_wait`) or for an I/O. Given to the body of a kernel thread
//!   and to AST handlers (which run in the interrupted thread).
//! * [`SoftCtx`]: soft-interrupt handlers. May not sleep.
//! * [`IntrCtx`]: hardware-interrupt handlers. May not sleep; may push ASTs.
//!
//! Tokens cannot be built outside this crate, copied, cloned, sent to
//! another thread or shared: a `&ThreadCtx` cannot be captured by a
//! `'static` interrupt handler, so "sleeping in an interrupt handler" is a
//! compile error (`tests/ui`). [`might_sleep`] checks the same at run time,
//! like Linux's `might_sleep()`, for what the types cannot see (a spin
//! mutex held across a sleep).

use core::marker::PhantomData;

use crate::cpu::curcpu_opt;
use crate::ipl::Ipl;

/// Kernel-thread context: may sleep.
pub struct ThreadCtx {
    _not_send_sync: PhantomData<*mut ()>,
}

/// Soft-interrupt context: may not sleep.
pub struct SoftCtx {
    level: Ipl,
    _not_send_sync: PhantomData<*mut ()>,
}

/// Hardware-interrupt context: may not sleep.
pub struct IntrCtx {
    level: Ipl,
    _not_send_sync: PhantomData<*mut ()>,
}

impl ThreadCtx {
    pub(crate) fn new() -> Self {
        Self {
            _not_send_sync: PhantomData,
        }
    }

    /// The CPU this thread runs on (threads do not migrate).
    pub fn cpu(&self) -> usize {
        crate::cpu::curcpu().index()
    }
}

impl SoftCtx {
    pub(crate) fn new(level: Ipl) -> Self {
        Self {
            level,
            _not_send_sync: PhantomData,
        }
    }
    /// The soft level the handler runs at.
    pub fn level(&self) -> Ipl {
        self.level
    }
    /// The CPU.
    pub fn cpu(&self) -> usize {
        crate::cpu::curcpu().index()
    }
}

impl IntrCtx {
    pub(crate) fn new(level: Ipl) -> Self {
        Self {
            level,
            _not_send_sync: PhantomData,
        }
    }
    /// The hardware level the handler runs at.
    pub fn level(&self) -> Ipl {
        self.level
    }
    /// The CPU.
    pub fn cpu(&self) -> usize {
        crate::cpu::curcpu().index()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::IntrCtx {}
    impl Sealed for super::SoftCtx {}
}

/// An interrupt context (hard or soft): may push ASTs, may not sleep.
pub trait InterruptContext: sealed::Sealed {}
impl InterruptContext for IntrCtx {}
impl InterruptContext for SoftCtx {}

/// Assert that the caller may sleep: a kernel thread, not in an interrupt
/// handler, holding no spin mutex. Panics with the reason otherwise.
#[track_caller]
pub fn might_sleep() {
    let Some(cpu) = curcpu_opt() else {
        panic!("might_sleep: not on a CPU");
    };
    let depth = cpu.intr_depth();
    assert!(
        depth == 0,
        "might_sleep: in interrupt context (depth {depth})"
    );
    assert!(
        cpu.in_kthread.load(core::sync::atomic::Ordering::Relaxed),
        "might_sleep: not in a kernel thread"
    );
    let m = cpu.mtx_count.get();
    assert!(m == 0, "might_sleep: holding {m} spin mutex(es)");
    assert!(
        !cpu.in_softint_thread
            .load(core::sync::atomic::Ordering::Relaxed),
        "might_sleep: in a soft interrupt handler"
    );
}
