//! # kern: the dvma kernel core
//!
//! `kern` is the machine-independent half of dvma: interrupt priority levels
//! ([`spl`]), interrupts ([`intr`]), soft interrupts ([`softint`]), kernel
//! threads ([`sched`]), the "kernel signal" of the 1995 mail ([`ast`]),
//! spin mutexes bound to an IPL ([`lock`]), the 1995-style kernel malloc
//! ([`kmem`]) and IPL-bound pools ([`pool`]).
//!
//! It is `#![no_std]` + `alloc` and knows nothing of Linux. Everything
//! host-specific is behind the [`md`] interface, which the `machine` crate
//! implements (vCPUs as host threads, interrupts as real-time signals, the
//! AST trampoline in assembly).
//!
//! ## Contexts
//!
//! Code in this kernel runs in one of four contexts, and each kind of
//! handler receives a token naming its context ([`ctx`]):
//!
//! | context | token | may sleep | entered from |
//! |---|---|---|---|
//! | kernel thread | [`ThreadCtx`] | yes | [`sched::kthread_create`], AST upcalls |
//! | soft interrupt | [`SoftCtx`] | no | interrupt return, `splx`, the softint daemon |
//! | hard interrupt | [`IntrCtx`] | no | a signal, `splx` replay, the idle loop |
//! | host / boot | none | no | the machine, before or outside the CPUs |
//!
//! Functions that may sleep take `&ThreadCtx`; calling them from an
//! interrupt handler does not compile (see `tests/ui`).
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(any(test, loom))]
extern crate std;

#[macro_use]
mod addr;
#[cfg(target_arch = "x86_64")]
pub mod arch;
pub mod ast;
pub mod bio;
pub mod blksrv;
pub mod bus_dma;
pub mod callout;
pub mod combine;
pub mod completion;
pub mod cpu;
pub mod ctx;
pub mod dev;
#[cfg(all(test, not(loom)))]
mod fake;
pub mod haltpoll;
pub mod intr;
pub mod iommu;
pub mod ipl;
pub mod kernel;
pub mod kmem;
pub mod loadgen;
pub mod lock;
pub mod malloc;
pub mod md;
pub mod once;
pub mod pending;
pub mod percpu;
pub mod pool;
pub mod race;
pub mod sched;
pub mod slot;
pub mod softint;
pub mod spl;
pub mod statclock;
pub mod stats;
#[cfg(all(test, not(loom)))]
mod tests;
pub mod vm;

pub use completion::Completion;
pub use ctx::{IntrCtx, SoftCtx, ThreadCtx};
pub use ipl::Ipl;
pub use kernel::{Kernel, KernelConfig, kernel};
