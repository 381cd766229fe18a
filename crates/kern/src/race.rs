//! `dvma race`: the ccd/vnd race of the 1995 mail, reproduced.
//!
//! > Chris changed them to malloc() and free() struct buf's, but the free()
//! > is done at interrupt time when the I/O request is completed.
//!
//! A ccd-like pseudo-driver on one CPU allocates a component buf in thread
//! context for every request and frees it when a pseudo-device completes
//! the request, through each [`Completion`] mode. The bufs come from
//! [`crate::kmem`] or, under the `pool` protection, from an IPL_BIO
//! [`Pool`].
//!
//! Every allocation is an **injection**: inside the allocator, between
//! reading and writing a free-list head (the hook of `Kmem::set_inject`),
//! the pseudo-device completes an outstanding request and raises its
//! interrupt on this CPU, a real signal that lands right there. An optional
//! storm adds a device thread raising the interrupt as fast as it can.
//! After every allocation the allocator is audited.
//!
//! | protection | what it is |
//! |---|---|
//! | `none` | the 1995 i386: kmem blocks nothing |
//! | `splimp` | the 1995 kluge: kmem raises to IPL_VM, which blocks bio |
//! | `pool` | component bufs from a pool bound to IPL_BIO |
//! | `safepoint` | kmem is not an AST safe point (protects against ASTs only) |
//!
//! Expected: `none` corrupts with `intr`, `softint` and `ast`, since all
//! three run the free on top of the interrupted allocation (the softint on
//! the interrupt's return, the AST on the interrupted thread's own stack);
//! `safepoint` still corrupts with `intr` and `softint`, which it does not
//! address; `thread` never corrupts: in a non-preemptive kernel the driver
//! thread cannot run until the allocating thread lets it.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use core::ptr::NonNull;
use core::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst},
};

use crate::ast::{AstError, AstHandle, ast_establish, ast_push};
use crate::completion::Completion;
use crate::cpu::curcpu;
use crate::ctx::ThreadCtx;
use crate::intr::{IntrError, IntrHandle, intr_establish, intr_post};
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::kmem::{Kmem, KmemProtect};
use crate::pool::Pool;
use crate::sched::{KThread, SchedError, kthread_create, tsleep, wakeup, wchan, yield_now};
use crate::softint::{SoftintError, SoftintHandle, softint_establish, softint_schedule};

/// How the allocator is protected in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protection {
    /// Nothing (1995 i386).
    None,
    /// kmem raises to IPL_VM (`splimp` blocking bio).
    Splimp,
    /// An IPL_BIO pool instead of kmem.
    Pool,
    /// kmem is not an AST safe point.
    SafePoint,
}

impl Protection {
    /// Every protection.
    pub const ALL: [Protection; 4] = [
        Protection::None,
        Protection::Splimp,
        Protection::Pool,
        Protection::SafePoint,
    ];

    /// Its name.
    pub const fn name(self) -> &'static str {
        match self {
            Protection::None => "none",
            Protection::Splimp => "splimp",
            Protection::Pool => "pool",
            Protection::SafePoint => "safepoint",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// Does `completion` under `protection` corrupt the allocator? (The
/// mechanism's prediction, which the run must match.)
pub const fn expected_corrupt(completion: Completion, protection: Protection) -> bool {
    match (protection, completion) {
        (_, Completion::Thread) => false,
        (Protection::None, _) => true,
        (Protection::Splimp | Protection::Pool, _) => false,
        (Protection::SafePoint, Completion::Ast) => false,
        (Protection::SafePoint, _) => true,
    }
}

/// One row of the race table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaceRow {
    /// Completion mode.
    pub completion: Completion,
    /// Protection.
    pub protection: Protection,
    /// Interrupts raised while the thread was inside the allocator.
    pub injections: u64,
    /// Of those, raised by the storm device.
    pub storm_injections: u64,
    /// Corruptions detected.
    pub corruptions: u64,
    /// Requests completed.
    pub completions: u64,
    /// The prediction.
    pub expected_corrupt: bool,
    /// The first corruption, described.
    pub first_corruption: Option<String>,
}

impl RaceRow {
    /// Did the row behave as predicted, with at least one injection?
    pub fn ok(&self) -> bool {
        self.injections > 0 && (self.corruptions > 0) == self.expected_corrupt
    }
}

/// Size of a component buf.
pub const BUFSZ: usize = 256;
/// A done slot being filled (tokens are never all ones).
const RESERVED: usize = usize::MAX;
/// Each row's kmem arena.
const ARENA: usize = 1 << 20;
const SLOTS: usize = 64;

/// The pseudo-driver's state: one per boot, owned by the kernel
/// (`Kernel::race`), attached by [`RaceKit::attach`].
pub(crate) struct RaceState {
    cpu: usize,
    intr: IntrHandle,
    softint: SoftintHandle,
    ast: AstHandle,
    pool: Pool<[u8; BUFSZ]>,
    completion: AtomicU8,
    pool_mode: AtomicBool,
    outstanding: [AtomicUsize; SLOTS],
    done: [AtomicUsize; SLOTS],
    armed: AtomicBool,
    injections: AtomicU64,
    storm_injections: AtomicU64,
    completions: AtomicU64,
    thread_chan: AtomicU32,
    stop: AtomicBool,
    /// The storm device may complete requests (only during the storm phase).
    storming: AtomicBool,
    /// Storm ticks in progress (the row waits for none before draining).
    ticking: AtomicU32,
    /// The rows' allocator: every row starts on an empty arena
    /// ([`Kmem::reset`]), since the corrupting rows leak what the lost frees
    /// held.
    kmem: Kmem,
}

/// This boot's race state, if attached. Any context.
fn state() -> Option<&'static RaceState> {
    crate::kernel::try_kernel()?.race.get().copied()
}

impl RaceState {
    fn kmem(&self) -> &Kmem {
        &self.kmem
    }

    fn complete_all(&self) {
        for d in &self.done {
            let tok = d.load(Acquire);
            if tok != 0 && tok != RESERVED && d.compare_exchange(tok, 0, AcqRel, Relaxed).is_ok() {
                self.free_token(tok);
                self.completions.fetch_add(1, Relaxed);
            }
        }
    }

    fn has_done(&self) -> bool {
        self.done
            .iter()
            .any(|d| !matches!(d.load(Relaxed), 0 | RESERVED))
    }

    fn free_token(&self, tok: usize) {
        if tok & 1 == 1 {
            // Odd tokens are `into_raw` indices of this pool, shifted; each
            // is taken out of its slot by exactly one `swap`, so it is
            // rebuilt once (the pool refuses a second rebuild).
            drop(self.pool.from_raw((tok >> 1) as u32));
        } else if let Some(p) = NonNull::new(tok as *mut u8) {
            self.kmem().free(p, BUFSZ);
        }
    }

    fn alloc_token(&self) -> Option<usize> {
        if self.pool_mode.load(Relaxed) {
            self.pool
                .get_nowait()
                .map(|it| ((it.into_raw() as usize) << 1) | 1)
        } else {
            self.kmem().alloc(BUFSZ).map(|p| p.as_ptr() as usize)
        }
    }

    fn push_outstanding(&self, tok: usize) -> bool {
        for o in &self.outstanding {
            if o.compare_exchange(0, tok, AcqRel, Relaxed).is_ok() {
                return true;
            }
        }
        false
    }

    /// The pseudo-device finishes one outstanding request: reserve a done
    /// slot first, then take a request, so that nothing is ever put back.
    fn device_complete_one(&self) -> bool {
        let Some(slot) = self
            .done
            .iter()
            .find(|d| d.compare_exchange(0, RESERVED, AcqRel, Relaxed).is_ok())
        else {
            return false;
        };
        for o in &self.outstanding {
            let tok = o.swap(0, AcqRel);
            if tok != 0 {
                slot.store(tok, Release);
                return true;
            }
        }
        slot.store(0, Release);
        false
    }

    fn mode(&self) -> Completion {
        Completion::ALL[self.completion.load(Relaxed) as usize % 4]
    }
}

/// The deterministic injection (kmem and pool hook): complete a request and
/// raise the device interrupt on this CPU, now, in the middle of the
/// allocator.
fn inject() {
    let Some(st) = state() else { return };
    if !st.armed.swap(false, Relaxed) {
        return;
    }
    if st.device_complete_one() {
        st.injections.fetch_add(1, Relaxed);
        intr_post(curcpu().index(), st.intr);
    }
}

/// Errors of [`RaceKit::attach`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// The pseudo-driver is attached already (once per boot).
    #[error("race pseudo-driver already attached")]
    AlreadyAttached,
    /// Its interrupt could not be established.
    #[error("race0: interrupt: {source}")]
    Intr {
        /// Why.
        #[source]
        source: IntrError,
    },
    /// Its softint could not be established.
    #[error("race0: softint: {source}")]
    Softint {
        /// Why.
        #[source]
        source: SoftintError,
    },
    /// Its AST could not be established.
    #[error("race0: AST: {source}")]
    Ast {
        /// Why.
        #[source]
        source: AstError,
    },
    /// Its thread could not be created.
    #[error("race0: thread on cpu{cpu}: {source}")]
    Thread {
        /// The CPU.
        cpu: usize,
        /// Why.
        #[source]
        source: SchedError,
    },
}

/// The race pseudo-driver, attached once per boot.
pub struct RaceKit {
    st: &'static RaceState,
    daemon: KThread,
}

impl RaceKit {
    /// Attach the pseudo-driver on CPU `cpu`: its interrupt vector, softint,
    /// AST, pool and completion thread. Once per boot (its state belongs to
    /// the kernel, and stays after `detach`, inert). Thread or host context.
    pub fn attach(cpu: usize) -> Result<Self, AttachError> {
        if state().is_some() {
            return Err(AttachError::AlreadyAttached);
        }
        let intr = intr_establish(Ipl::Bio, "race0", |ctx| {
            let Some(st) = state() else { return };
            match st.mode() {
                Completion::Intr => st.complete_all(),
                Completion::Softint => softint_schedule(&st.softint),
                Completion::Ast => ast_push(ctx, &st.ast),
                Completion::Thread => {
                    wakeup(wchan(&st.thread_chan));
                }
            }
        })
        .map_err(|source| AttachError::Intr { source })?;
        let softint = softint_establish(Ipl::SoftBio, "race0 softbio", |_| {
            if let Some(st) = state() {
                st.complete_all();
            }
        })
        .map_err(|source| AttachError::Softint { source })?;
        let ast = ast_establish("race0 ast", |_| {
            if let Some(st) = state() {
                st.complete_all();
            }
        })
        .map_err(|source| AttachError::Ast { source })?;
        let st: &'static RaceState = Box::leak(Box::new(RaceState {
            cpu,
            intr,
            softint,
            ast,
            pool: Pool::new("racebuf", Ipl::Bio, 2 * SLOTS + 8, |_| [0u8; BUFSZ]),
            completion: AtomicU8::new(0),
            pool_mode: AtomicBool::new(false),
            outstanding: [const { AtomicUsize::new(0) }; SLOTS],
            done: [const { AtomicUsize::new(0) }; SLOTS],
            armed: AtomicBool::new(false),
            injections: AtomicU64::new(0),
            storm_injections: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            thread_chan: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            storming: AtomicBool::new(false),
            ticking: AtomicU32::new(0),
            kmem: Kmem::new(ARENA, kernel().ncpu()),
        }));
        if kernel().race.set(st).is_err() {
            return Err(AttachError::AlreadyAttached);
        }
        st.pool.set_inject(Some(inject));
        let daemon = kthread_create(Some(cpu), "race0 thread", move |ctx| {
            // The driver's own thread: sleeps for its interrupt, cleans up.
            loop {
                let s = crate::spl::splbio();
                while !st.has_done() && !st.stop.load(Relaxed) {
                    if tsleep(ctx, wchan(&st.thread_chan)).is_err() {
                        return;
                    }
                }
                drop(s);
                st.complete_all();
                if st.stop.load(Relaxed) {
                    return;
                }
            }
        })
        .map_err(|source| AttachError::Thread { cpu, source })?;
        Ok(Self { st, daemon })
    }

    /// The CPU the pseudo-driver runs on.
    pub fn cpu(&self) -> usize {
        self.st.cpu
    }

    /// Storm device, one tick (any host thread): complete a request and post
    /// the interrupt. Returns whether it posted.
    pub fn device_tick(&self) -> bool {
        let k = kernel();
        let st = self.st;
        st.ticking.fetch_add(1, SeqCst);
        let posted = st.storming.load(SeqCst) && st.device_complete_one();
        if posted {
            if k.cpu(st.cpu).in_alloc.get() != 0 {
                st.storm_injections.fetch_add(1, Relaxed);
            }
            intr_post(st.cpu, st.intr);
        }
        st.ticking.fetch_sub(1, SeqCst);
        posted
    }

    /// Run one row: `iterations` injected allocations, then `storm_ns` of
    /// allocation under whatever the storm device raises. Thread context,
    /// on the kit's CPU.
    pub fn run_row(
        &self,
        ctx: &ThreadCtx,
        completion: Completion,
        protection: Protection,
        iterations: u32,
        storm_ns: u64,
    ) -> RaceRow {
        let k = kernel();
        let st = self.st;
        assert_eq!(ctx.cpu(), st.cpu, "run_row on the kit's CPU");
        // An empty arena for the row: nothing is outstanding between rows
        // (the last row drained everything) and no storm runs, so no CPU is
        // inside the allocator.
        let kmem = st.kmem();
        kmem.reset();
        st.completion.store(
            Completion::ALL
                .iter()
                .position(|c| *c == completion)
                .unwrap_or(0) as u8,
            Relaxed,
        );
        st.pool_mode.store(protection == Protection::Pool, Relaxed);
        kmem.set_protection(match protection {
            Protection::None | Protection::Pool => KmemProtect::None,
            Protection::Splimp => KmemProtect::Spl(Ipl::Vm),
            Protection::SafePoint => KmemProtect::SafePoint,
        });
        kmem.set_inject(Some(inject));
        st.injections.store(0, Relaxed);
        st.storm_injections.store(0, Relaxed);
        st.completions.store(0, Relaxed);
        let c0 = kmem.stats.corruptions.load(Relaxed) + st.pool.stats.corruptions.load(Relaxed);
        let mut first: Option<String> = None;
        let audit = |first: &mut Option<String>| {
            if st.pool_mode.load(Relaxed) {
                if let Err(e) = st.pool.audit() {
                    first.get_or_insert_with(|| alloc::format!("pool: {e:?}"));
                }
            } else if let Err(e) = kmem.audit() {
                first.get_or_insert_with(|| e.to_string());
            }
        };

        // Deterministic injections.
        for _ in 0..iterations {
            if st.outstanding.iter().all(|o| o.load(Relaxed) == 0)
                && let Some(t) = st.alloc_token()
            {
                st.push_outstanding(t);
            }
            st.armed.store(true, Relaxed);
            let tok = st.alloc_token();
            st.armed.store(false, Relaxed);
            if let Some(t) = tok
                && !st.push_outstanding(t)
            {
                st.free_token(t);
            }
            // Let the thread completion run, and reach a safe point.
            yield_now(ctx);
            audit(&mut first);
        }

        // The storm: allocate and free as fast as possible while the device
        // completes and interrupts.
        if storm_ns > 0 {
            st.storming.store(true, Release);
            let until = k.md().nanotime() + storm_ns;
            let mut n = 0u64;
            while k.md().nanotime() < until {
                match st.alloc_token() {
                    Some(t) => {
                        if !st.push_outstanding(t) {
                            st.free_token(t);
                        }
                    }
                    None => yield_now(ctx),
                }
                n += 1;
                if n.is_multiple_of(32) {
                    yield_now(ctx);
                    audit(&mut first);
                }
            }
        }

        st.storming.store(false, SeqCst);
        while st.ticking.load(SeqCst) != 0 {
            core::hint::spin_loop();
        }
        // Drain: complete everything from thread context (the done ring may
        // be full, so alternate until both rings are empty).
        loop {
            while st.device_complete_one() {}
            st.complete_all();
            yield_now(ctx);
            st.complete_all();
            if st.outstanding.iter().all(|o| o.load(Acquire) == 0)
                && st.done.iter().all(|d| d.load(Acquire) == 0)
            {
                break;
            }
        }
        audit(&mut first);
        kmem.set_inject(None);
        kmem.set_protection(KmemProtect::None);

        let c1 = kmem.stats.corruptions.load(Relaxed) + st.pool.stats.corruptions.load(Relaxed);
        if first.is_none() && c1 > c0 {
            first = kmem.last_corruption().map(|c| c.to_string());
        }
        let storm = st.storm_injections.load(Relaxed);
        RaceRow {
            completion,
            protection,
            injections: st.injections.load(Relaxed) + storm,
            storm_injections: storm,
            corruptions: c1 - c0,
            completions: st.completions.load(Relaxed),
            expected_corrupt: expected_corrupt(completion, protection),
            first_corruption: first,
        }
    }

    /// Stop the pseudo-driver's thread and wait for it. Thread context.
    pub fn detach(self, ctx: &ThreadCtx) {
        self.st.stop.store(true, Relaxed);
        wakeup(wchan(&self.st.thread_chan));
        let _ = self.daemon.join(ctx);
        self.st.pool.set_inject(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prediction_table() {
        use Completion::*;
        use Protection as P;
        let corrupt: &[(Completion, Protection)] = &[
            (Intr, P::None),
            (Softint, P::None),
            (Ast, P::None),
            (Intr, P::SafePoint),
            (Softint, P::SafePoint),
        ];
        for c in Completion::ALL {
            for p in Protection::ALL {
                assert_eq!(
                    expected_corrupt(c, p),
                    corrupt.contains(&(c, p)),
                    "{c} {p:?}"
                );
            }
        }
    }
}
