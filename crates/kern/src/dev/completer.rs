//! A driver's completion path, in one of the four modes of the mail.
//!
//! A driver gives a [`Completer`] its *work* function (reap completions,
//! finish bufs, start the next ones) and calls [`Completer::interrupt`] from
//! its device's interrupt handler. Where the work then runs is the mode:
//!
//! | mode | the interrupt handler | the work runs |
//! |---|---|---|
//! | `intr` | does the work | right there, at the device's IPL, on the interrupt stack |
//! | `softint` | schedules a softint | at softbio, on the interrupt's return (or the next `splx`) |
//! | `ast` | pushes an AST | as the interrupted kernel thread, at its next safe point |
//! | `thread` | wakes the driver's thread | in the driver's own kernel thread, which may sleep |
//!
//! The work receives a [`WorkCtx`] naming its context, so that it may, for
//! instance, wait for DVMA space only when it runs in a thread.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::*};

use crate::ast::{AstError, AstHandle, ast_establish, ast_push};
use crate::completion::Completion;
use crate::ctx::{IntrCtx, SoftCtx, ThreadCtx};
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::once::Once;
use crate::sched::{KThread, SchedError, kthread_create, sleep_interlocked, wakeup, wchan};
use crate::softint::{SoftintError, SoftintHandle, softint_establish, softint_schedule};

/// Errors of [`Completer::attach`]: the mode's mechanism could not be set
/// up for driver `unit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// `softint`: no softint could be established.
    #[error("{unit}: completion softint: {source}")]
    Softint {
        /// The driver unit.
        unit: &'static str,
        /// Why.
        #[source]
        source: SoftintError,
    },
    /// `ast`: no AST could be established.
    #[error("{unit}: completion AST: {source}")]
    Ast {
        /// The driver unit.
        unit: &'static str,
        /// Why.
        #[source]
        source: AstError,
    },
    /// `thread`: the driver's completion thread could not be created.
    #[error("{unit}: completion thread on cpu{cpu}: {source}")]
    Thread {
        /// The driver unit.
        unit: &'static str,
        /// The CPU it was to run on.
        cpu: usize,
        /// Why.
        #[source]
        source: SchedError,
    },
}

/// The context the work runs in.
pub enum WorkCtx<'a> {
    /// A hardware interrupt handler.
    Intr(&'a IntrCtx),
    /// A soft interrupt.
    Soft(&'a SoftCtx),
    /// A kernel thread (the driver's own, or the one an AST interrupted).
    Thread(&'a ThreadCtx),
}

impl WorkCtx<'_> {
    /// The thread context, if the work may sleep.
    pub fn thread(&self) -> Option<&ThreadCtx> {
        match self {
            WorkCtx::Thread(t) => Some(t),
            _ => None,
        }
    }
}

type Work = dyn Fn(WorkCtx<'_>) + Send + Sync;

/// One driver instance's completion path.
pub struct Completer {
    mode: Completion,
    /// `softint`: the handle, set once at attach (the handler refers back
    /// to the completer, so it exists only after the completer is shared).
    softint: Once<SoftintHandle>,
    /// `ast`: likewise.
    ast: Once<AstHandle>,
    /// `thread`: work is pending (set under `lock`, so the thread's test and
    /// sleep cannot miss it).
    kicked: AtomicBool,
    lock: SpinMutex<()>,
    chan: AtomicU32,
    stop: AtomicBool,
    thread: SpinMutex<Option<KThread>>,
    work: Box<Work>,
}

impl Completer {
    /// Set up the completion path of driver `name` in `mode`; its thread (in
    /// `thread` mode) runs on `cpu`. Thread or host context (attach).
    pub fn attach(
        name: &'static str,
        mode: Completion,
        cpu: usize,
        work: impl Fn(WorkCtx<'_>) + Send + Sync + 'static,
    ) -> Result<&'static Completer, AttachError> {
        let c: &'static Completer = Box::leak(Box::new(Completer {
            mode,
            softint: Once::new(),
            ast: Once::new(),
            kicked: AtomicBool::new(false),
            lock: SpinMutex::new(Ipl::High, ()),
            chan: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            thread: SpinMutex::new(Ipl::None, None),
            work: Box::new(work),
        }));
        match mode {
            Completion::Intr => {}
            Completion::Softint => {
                let h =
                    softint_establish(Ipl::SoftBio, name, move |ctx| c.work_in(WorkCtx::Soft(ctx)))
                        .map_err(|source| AttachError::Softint { unit: name, source })?;
                let _ = c.softint.set(h); // the only set: cannot fail
            }
            Completion::Ast => {
                let h = ast_establish(name, move |ctx| c.work_in(WorkCtx::Thread(ctx)))
                    .map_err(|source| AttachError::Ast { unit: name, source })?;
                let _ = c.ast.set(h); // the only set: cannot fail
            }
            Completion::Thread => {
                let t = kthread_create(Some(cpu), name, move |ctx| c.thread_main(ctx)).map_err(
                    |source| AttachError::Thread {
                        unit: name,
                        cpu,
                        source,
                    },
                )?;
                *c.thread.lock() = Some(t);
            }
        }
        Ok(c)
    }

    /// The mode.
    pub fn mode(&self) -> Completion {
        self.mode
    }

    fn work_in(&self, ctx: WorkCtx<'_>) {
        (self.work)(ctx)
    }

    /// The device interrupted: run or defer the work, per the mode.
    /// Interrupt context.
    pub fn interrupt(&self, ctx: &IntrCtx) {
        match self.mode {
            Completion::Intr => self.work_in(WorkCtx::Intr(ctx)),
            Completion::Softint => {
                if let Some(h) = self.softint.get() {
                    softint_schedule(h);
                }
            }
            Completion::Ast => {
                if let Some(h) = self.ast.get() {
                    ast_push(ctx, h);
                }
            }
            Completion::Thread => self.kick(),
        }
    }

    /// Defer the work per the mode, from any context on a CPU, without an
    /// interrupt context token (a stacking driver's `iodone`). In `intr`
    /// mode it does nothing: the caller runs the work inline.
    pub fn post(&self) {
        match self.mode {
            Completion::Intr => {}
            Completion::Softint => {
                if let Some(h) = self.softint.get() {
                    softint_schedule(h);
                }
            }
            Completion::Ast => {
                if let Some(h) = self.ast.get() {
                    crate::ast::ast_post(h);
                }
            }
            Completion::Thread => self.kick(),
        }
    }

    /// `thread` mode: there is work for the driver's thread (completions,
    /// or new bufs to start). Any context. Other modes: nothing.
    pub fn kick(&self) {
        if self.mode == Completion::Thread {
            let g = self.lock.lock();
            self.kicked.store(true, Release);
            drop(g);
            wakeup(wchan(&self.chan));
        }
    }

    fn thread_main(&self, ctx: &ThreadCtx) {
        loop {
            let g = self.lock.lock();
            if !self.kicked.swap(false, AcqRel) {
                if self.stop.load(Acquire) {
                    return;
                }
                if sleep_interlocked(ctx, wchan(&self.chan), g).is_err() {
                    return;
                }
                continue;
            }
            drop(g);
            self.work_in(WorkCtx::Thread(ctx));
        }
    }

    /// Stop the driver's thread (detach). Thread context.
    pub fn detach(&self, ctx: &ThreadCtx) {
        self.stop.store(true, Release);
        wakeup(wchan(&self.chan));
        let t = self.thread.lock().take();
        if let Some(t) = t {
            let _ = t.join(ctx);
        }
    }
}
