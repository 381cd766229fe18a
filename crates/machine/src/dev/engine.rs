//! The engine the devices share: the two rings, the doorbell, the worker
//! threads, interrupt coalescing and the counters. A device is a
//! [`Medium`] (how one command is carried out) inside an [`Engine`].
//!
//! The rules (who calls what from where, and why nothing here blocks) are
//! in the parent module's documentation; the protocols are commented where
//! they are implemented.

use std::cell::UnsafeCell;
use std::io;
use std::mem::MaybeUninit;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release, SeqCst},
    fence,
};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use kern::dev::{DiskDone, DiskStatus};
use kern::intr::IntrHandle;

use crate::sys;

/// How a device carries out one command, on a worker thread (host
/// context: it may block in system calls, allocate and take host locks).
pub(crate) trait Medium: Send + Sync + 'static {
    /// The device's command.
    type Cmd: Copy + Send + 'static;
    /// The command's slot id (echoed in its completion).
    fn id(cmd: &Self::Cmd) -> u16;
    /// Do it. Count what is specific to the command in `stats`; the engine
    /// counts the status, the completion and the interrupt.
    fn execute(&self, cmd: &Self::Cmd, stats: &Counters) -> DiskStatus;
}

/// The engine's knobs (from the device's configuration).
pub(crate) struct Tuning {
    /// Prefix of the worker threads' names.
    pub name: &'static str,
    /// Commands outstanding at once (ring capacity).
    pub queue_depth: u16,
    /// Worker threads.
    pub workers: usize,
    /// Post after this many un-signalled completions.
    pub coalesce_count: u32,
    /// Post when the oldest un-signalled completion is this old.
    pub coalesce_ns: u64,
    /// Idle workers poll this long before sleeping.
    pub spin_ns: u64,
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $f:ident ),* $(,)?) => {
        /// The live counters (atomics, any context).
        #[derive(Default)]
        pub(crate) struct Counters {
            $( pub(crate) $f: AtomicU64, )*
        }

        /// A snapshot of a device's counters ([`DmaDisk::stats`],
        /// [`FileDev::stats`]). Counters are read one by one, so a snapshot
        /// taken while the device runs is not an atomic cut.
        ///
        /// [`DmaDisk::stats`]: super::DmaDisk::stats
        /// [`FileDev::stats`]: super::FileDev::stats
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct DeviceStats {
            $( $(#[$doc])* pub $f: u64, )*
        }

        impl DeviceStats {
            /// Every counter as (name, value), in declaration order (for
            /// tables).
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($f), self.$f), )* ]
            }
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> DeviceStats {
                DeviceStats { $( $f: self.$f.load(Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Commands accepted by `submit`.
    submitted,
    /// `submit` calls refused (queue depth reached, or the device stopped).
    refused,
    /// `doorbell` calls.
    doorbells,
    /// Futex wakes of a sleeping worker (by a doorbell or a sibling).
    wakeups,
    /// Times a worker went to sleep on the doorbell.
    sleeps,
    /// READ commands executed (valid or not).
    reads,
    /// WRITE commands executed (valid or not), FUA ones included.
    writes,
    /// WRITE commands with FUA set.
    fua_writes,
    /// WRITE commands the io_uring engine wrote itself, on the doorbell.
    inline_writes,
    /// FLUSH commands executed.
    flushes,
    /// Bytes moved from the medium to memory.
    bytes_read,
    /// Bytes moved from memory to the medium.
    bytes_written,
    /// `fdatasync` calls that succeeded (FLUSH and FUA).
    syncs,
    /// Completions pushed (every status, aborted ones included).
    completed,
    /// Completions with `Ok`.
    ok,
    /// Completions with `DmaFault`.
    dma_faults,
    /// Completions with `MediaError` (injected ones included, aborted ones not).
    media_errors,
    /// Media errors produced by `inject_media_error`.
    injected,
    /// Completions with `Invalid`.
    invalid,
    /// Commands completed with `MediaError(ESHUTDOWN)` by `stop`.
    aborted,
    /// Interrupts posted (`intr_post` calls).
    interrupts,
    /// Posts skipped because no kernel was booted or the CPU does not exist.
    interrupts_dropped,
    /// Nanoseconds workers spent executing commands (summed over workers).
    busy_ns,
}

impl Counters {
    #[inline]
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    #[inline]
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

/// Where the device posts its interrupt: a CPU and a vector, readable and
/// writable from any context without a lock.
///
/// `IntrHandle` cannot be built from its bit outside `kern`, so the handle
/// itself is kept, in a write-once slot per vector bit, and the current
/// target is one atomic word naming the bit and the CPU. A handle is its
/// bit (two handles with the same bit are equal), so a slot written once
/// holds the right handle for every later `set` of that bit.
pub(crate) struct IntrTarget {
    /// 0: none; else `VALID | cpu << 8 | bit`.
    packed: AtomicU64,
    slots: [HandleSlot; 64],
}

struct HandleSlot {
    state: AtomicU8,
    handle: UnsafeCell<MaybeUninit<IntrHandle>>,
}

const SLOT_EMPTY: u8 = 0;
const SLOT_WRITING: u8 = 1;
const SLOT_READY: u8 = 2;
const TARGET_VALID: u64 = 1 << 63;

// SAFETY: a slot's `handle` is written once, by the caller that moved its
// state EMPTY -> WRITING, and read only after a reader saw READY (Acquire,
// paired with the writer's Release store of READY). No two threads ever
// access it concurrently with a write in between.
unsafe impl Sync for IntrTarget {}

impl IntrTarget {
    pub(crate) fn new() -> Self {
        Self {
            packed: AtomicU64::new(0),
            slots: [const {
                HandleSlot {
                    state: AtomicU8::new(SLOT_EMPTY),
                    handle: UnsafeCell::new(MaybeUninit::uninit()),
                }
            }; 64],
        }
    }

    /// Any context; never waits.
    pub(crate) fn set(&self, cpu: usize, h: IntrHandle) {
        let bit = (h.bit() & 63) as usize;
        let s = &self.slots[bit];
        if s.state.load(Acquire) != SLOT_READY
            && s.state
                .compare_exchange(SLOT_EMPTY, SLOT_WRITING, Acquire, Relaxed)
                .is_ok()
        {
            // SAFETY: we won EMPTY -> WRITING: nobody else writes the slot,
            // and nobody reads it before we publish READY below.
            unsafe { (*s.handle.get()).write(h) };
            s.state.store(SLOT_READY, Release);
        }
        // Otherwise the slot holds (or is being given, by a caller we
        // interrupted) the very same handle: `get` waits for READY.
        #[cfg(debug_assertions)]
        if s.state.load(Acquire) == SLOT_READY {
            // SAFETY: READY was published after the write; never rewritten.
            let held = unsafe { (*s.handle.get()).assume_init() };
            debug_assert_eq!(held, h, "two interrupt handles share a vector bit");
        }
        self.packed.store(
            TARGET_VALID | ((cpu as u64 & 0xffff_ffff) << 8) | bit as u64,
            SeqCst,
        );
    }

    /// Worker threads (host context): may spin while a `set` that was
    /// interrupted between its two stores finishes.
    pub(crate) fn get(&self) -> Option<(usize, IntrHandle)> {
        let p = self.packed.load(SeqCst);
        if p & TARGET_VALID == 0 {
            return None;
        }
        let s = &self.slots[(p & 63) as usize];
        while s.state.load(Acquire) != SLOT_READY {
            std::hint::spin_loop();
        }
        // SAFETY: READY was published (Release) after the handle was
        // written, and we loaded it with Acquire; it is never written again.
        let h = unsafe { (*s.handle.get()).assume_init() };
        Some((((p >> 8) & 0xffff_ffff) as usize, h))
    }
}

/// A busy worker that took or finished a command less than this long ago
/// is making progress: a doorbell leaves the new command to it instead of
/// waking a sibling (see `Core::kick`). A 4 KiB read from the page cache
/// takes a few microseconds, a 1 MiB one a hundred or two: a stream of
/// large commands still gets a second worker.
const STALL_NS: u64 = 50_000;

/// The longest a sleeping worker leaves the ring unwatched while a sibling
/// is busy (see `Core::kick`).
const RESCUE_NS: u64 = 1_000_000;

/// The state shared by the device object and its workers.
pub(crate) struct Core<M: Medium> {
    pub(crate) medium: M,
    pub(crate) stats: Counters,
    sq: ArrayQueue<M::Cmd>,
    cq: ArrayQueue<DiskDone>,
    depth: u32,
    /// Commands between `submit` and the `reap` of their completion.
    outstanding: AtomicU32,
    /// `submit` calls in progress (so `stop` can wait them out).
    submitting: AtomicU32,
    stopping: AtomicBool,
    /// The doorbell futex word: bumped by every doorbell, wake and stop.
    bell: AtomicU32,
    /// Workers polling the submission ring (spinning, not asleep).
    polling: AtomicU32,
    /// Workers asleep on `bell` (or about to be).
    sleepers: AtomicU32,
    /// A wake was issued and the woken worker has not polled yet: further
    /// doorbells need not wake anybody (it will see their commands).
    waking: AtomicBool,
    /// Workers executing a command.
    busy: AtomicU32,
    /// Sleepers that will look at the ring again by themselves within
    /// [`RESCUE_NS`] (they went to sleep while a sibling was busy).
    timed_sleepers: AtomicU32,
    /// When a worker last took or finished a command (ns since `epoch`).
    progress_ns: AtomicU64,
    target: IntrTarget,
    coalesce_count: u32,
    coalesce_ns: u64,
    spin_ns: u64,
    /// Completions pushed and not yet covered by a post.
    unsignalled: AtomicU32,
    /// When the first of them was pushed (ns since `epoch`).
    first_unsignalled: AtomicU64,
    /// Injected latency per command (tests, experiments).
    delay_ns: AtomicU64,
    epoch: Instant,
}

impl<M: Medium> Core<M> {
    /// Put a command on the submission ring. Any context.
    pub(crate) fn submit(&self, cmd: M::Cmd) -> bool {
        self.submitting.fetch_add(1, SeqCst);
        let ok = !self.stopping.load(SeqCst) && self.reserve() && {
            match self.sq.push(cmd) {
                Ok(()) => true,
                Err(_) => {
                    // Cannot happen (the ring holds `depth` and at most
                    // `depth` are outstanding); refuse rather than lose it.
                    self.outstanding.fetch_sub(1, SeqCst);
                    false
                }
            }
        };
        self.submitting.fetch_sub(1, SeqCst);
        Counters::inc(if ok {
            &self.stats.submitted
        } else {
            &self.stats.refused
        });
        ok
    }

    fn reserve(&self) -> bool {
        reserve(&self.outstanding, self.depth)
    }

    /// Ring the doorbell. Any context: an atomic, and a futex wake only if
    /// every worker sleeps.
    pub(crate) fn doorbell(&self) {
        Counters::inc(&self.stats.doorbells);
        self.kick();
    }

    /// Wake one sleeping worker unless a worker is polling or one is
    /// already on its way.
    ///
    /// The handshake with a worker going to sleep (`next`): the worker reads
    /// `bell`, raises `sleepers`, lowers `polling`, clears `waking`,
    /// re-checks the ring, and waits on `bell` with the value it read; when
    /// the wait returns it raises `polling`, lowers `sleepers`, clears
    /// `waking` and polls. Here: `bell` is bumped (after the command was
    /// pushed), then `polling`, `sleepers` and `waking` are read. All
    /// SeqCst, so:
    /// * we see a sleeper and wake it (the futex either still holds the old
    ///   value and the wake finds the waiter, or holds the new one and the
    ///   wait returns at once), or the worker's re-check comes after our
    ///   bump and sees the command;
    /// * if we skip the wake because `waking` is set, the worker that will
    ///   clear it does so after our read, and its next step (a re-check or
    ///   a poll) sees the command. A flag left set by a wake that found no
    ///   waiter (its command was taken by a worker that started polling in
    ///   between) is cleared by that worker before it next sleeps; until
    ///   then it is awake and polls again when its command is done. A flag
    ///   is never left set with every worker blocked: the last one to block
    ///   cleared it, and a later set comes with a wake.
    ///
    /// Concurrency is managed as Linux's workqueues do (a second worker
    /// only when the first stops making progress), not by queue length: a
    /// worker busy with a command that started or ended less than
    /// [`STALL_NS`] ago will take the new command itself when it is done
    /// (it pops the ring before it polls or sleeps: its `busy` decrement
    /// comes after our push in the SeqCst order), so waking a sibling would
    /// only add a host context switch per batch. Wakes are skipped only
    /// while every sleeper is a timed one ([`RESCUE_NS`]), so a command
    /// queued behind a worker that then blocks for long (a FLUSH, a cold
    /// read) waits at most that long for a sibling, even if no further
    /// doorbell comes to notice the stall.
    fn kick(&self) {
        self.bell.fetch_add(1, SeqCst);
        if self.polling.load(SeqCst) == 0
            && self.sleepers.load(SeqCst) > 0
            && !self.progressing()
            && !self.waking.swap(true, SeqCst)
        {
            Counters::inc(&self.stats.wakeups);
            sys::futex_wake(&self.bell, 1);
        }
    }

    /// A busy worker will serve what is queued soon (see `kick`).
    fn progressing(&self) -> bool {
        self.busy.load(SeqCst) > 0
            && self.timed_sleepers.load(SeqCst) == self.sleepers.load(SeqCst)
            && self.now_ns().saturating_sub(self.progress_ns.load(Relaxed)) < STALL_NS
    }

    /// Take a completion. Any context.
    pub(crate) fn reap(&self) -> Option<DiskDone> {
        let d = self.cq.pop()?;
        self.outstanding.fetch_sub(1, SeqCst);
        Some(d)
    }

    /// Post `vector` on `cpu` from now on. Any context.
    pub(crate) fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        self.target.set(cpu, vector);
        // Pairs with the fence in `complete`: either the worker that pushed
        // a completion sees the target, or we see its completion here.
        fence(SeqCst);
        if !self.cq.is_empty() {
            self.unsignalled.swap(0, SeqCst);
            self.post(cpu, vector);
        }
    }

    /// Extra latency before every command. Any context.
    pub(crate) fn set_delay(&self, d: Duration) {
        self.delay_ns
            .store(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Has `stop` begun?
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Acquire)
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn push_done(&self, d: DiskDone) {
        let mut d = d;
        // Never fails: at most `depth` commands are outstanding and the
        // ring holds `depth`. Should it, wait for the driver to reap rather
        // than lose a completion.
        while let Err(back) = self.cq.push(d) {
            d = back;
            std::thread::yield_now();
        }
        Counters::inc(&self.stats.completed);
    }

    /// A worker finished a command: queue the completion and decide whether
    /// to interrupt now (see the parent module: count, empty ring, age).
    fn complete(&self, id: u16, status: DiskStatus) {
        let s = &self.stats;
        Counters::inc(match status {
            DiskStatus::Ok => &s.ok,
            DiskStatus::DmaFault => &s.dma_faults,
            DiskStatus::MediaError(_) => &s.media_errors,
            DiskStatus::Invalid => &s.invalid,
        });
        self.push_done(DiskDone { id, status });
        // The push is ordered before the reads of the rings and the target
        // below (pairs with the fence in `set_interrupt`).
        fence(SeqCst);
        let n = self.unsignalled.fetch_add(1, SeqCst) + 1;
        let now = self.now_ns();
        if n == 1 {
            self.first_unsignalled.store(now, Relaxed);
        }
        let due = n >= self.coalesce_count
            || self.sq.is_empty()
            || now.saturating_sub(self.first_unsignalled.load(Relaxed)) >= self.coalesce_ns;
        if due {
            self.signal();
        }
    }

    /// Post for every un-signalled completion, if an interrupt is set.
    ///
    /// Whoever swaps a non-zero count posts; a completion whose increment
    /// was swapped by another worker is covered by that worker's post,
    /// which comes after the swap, which comes after our push.
    fn signal(&self) {
        let Some((cpu, h)) = self.target.get() else {
            // No interrupt yet: completions are only queued. The count stays,
            // and `set_interrupt` posts if any are waiting.
            return;
        };
        if self.unsignalled.swap(0, SeqCst) == 0 {
            return;
        }
        self.post(cpu, h);
    }

    /// Nanoseconds until held completions are due for an interrupt (0:
    /// now), or `None` if none is held or no interrupt is set.
    fn held_due_in(&self) -> Option<u64> {
        if self.unsignalled.load(SeqCst) == 0 || self.target.packed.load(Relaxed) == 0 {
            return None;
        }
        let age = self
            .now_ns()
            .saturating_sub(self.first_unsignalled.load(Relaxed));
        Some(self.coalesce_ns.saturating_sub(age))
    }

    fn post(&self, cpu: usize, h: IntrHandle) {
        match kern::kernel::try_kernel() {
            Some(k) if cpu < k.ncpu() => {
                // Counted before it is posted: whoever sees the interrupt's
                // effect also sees it counted.
                Counters::inc(&self.stats.interrupts);
                kern::intr::intr_post(cpu, h);
            }
            _ => Counters::inc(&self.stats.interrupts_dropped),
        }
    }

    /// A worker's next command, or `None` when the device stops. Polls for
    /// `spin_ns`, then sleeps on the doorbell. An idle worker is also the
    /// coalescing timer: it posts for completions held longer than
    /// `coalesce_ns`, and sleeps no longer than until they are due.
    fn next(&self) -> Option<M::Cmd> {
        self.polling.fetch_add(1, SeqCst);
        let mut since = Instant::now();
        let mut spins = 0u32;
        let got = loop {
            if self.stopping.load(Acquire) {
                break None;
            }
            if let Some(c) = self.sq.pop() {
                break Some(c);
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(32) {
                std::hint::spin_loop();
                continue;
            }
            let due_in = self.held_due_in();
            if due_in == Some(0) {
                self.signal();
            }
            if (since.elapsed().as_nanos() as u64) < self.spin_ns {
                std::hint::spin_loop();
                continue;
            }
            // Going to sleep: see `kick` for the handshake. While commands
            // are outstanding, a sibling may take one and block with more
            // queued behind it: look again within RESCUE_NS (a timed
            // sleeper, counted first so that `kick` never sees more timed
            // sleepers than sleepers). An idle device sleeps untimed.
            let timed = self.outstanding.load(SeqCst) > 0;
            if timed {
                self.timed_sleepers.fetch_add(1, SeqCst);
            }
            let seq = self.bell.load(SeqCst);
            self.sleepers.fetch_add(1, SeqCst);
            self.polling.fetch_sub(1, SeqCst);
            self.waking.store(false, SeqCst);
            if self.sq.is_empty() && !self.stopping.load(SeqCst) {
                Counters::inc(&self.stats.sleeps);
                let limit = match due_in {
                    Some(ns) if ns > 0 => Some(ns),
                    _ => None,
                };
                let limit = match (limit, timed) {
                    (Some(ns), true) => Some(ns.min(RESCUE_NS)),
                    (None, true) => Some(RESCUE_NS),
                    (l, false) => l,
                };
                match limit {
                    Some(ns) => sys::futex_wait_timeout(&self.bell, seq, ns),
                    None => sys::futex_wait(&self.bell, seq),
                };
            }
            self.polling.fetch_add(1, SeqCst);
            self.sleepers.fetch_sub(1, SeqCst);
            if timed {
                self.timed_sleepers.fetch_sub(1, SeqCst);
            }
            self.waking.store(false, SeqCst);
            since = Instant::now();
            spins = 0;
        };
        if got.is_some() {
            // Busy before we stop polling: `kick` never sees a worker that
            // holds a command as neither.
            self.busy.fetch_add(1, SeqCst);
            self.progress_ns.store(self.now_ns(), Relaxed);
        }
        self.polling.fetch_sub(1, SeqCst);
        if got.is_some() && !self.sq.is_empty() {
            // More is queued: if nobody polls and we are not about to take
            // it ourselves (`kick`), wake a sibling to share it.
            self.kick();
        }
        got
    }
}

fn run_worker<M: Medium>(c: Arc<Core<M>>) {
    while let Some(cmd) = c.next() {
        let t0 = Instant::now();
        let delay = c.delay_ns.load(Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_nanos(delay));
        }
        // A bug in a medium must not lose the command (the driver would
        // wait for it forever): it completes with EIO.
        let status = catch_unwind(AssertUnwindSafe(|| c.medium.execute(&cmd, &c.stats)))
            .unwrap_or(DiskStatus::MediaError(libc::EIO));
        Counters::add(&c.stats.busy_ns, t0.elapsed().as_nanos() as u64);
        c.complete(M::id(&cmd), status);
        c.progress_ns.store(c.now_ns(), Relaxed);
        c.busy.fetch_sub(1, SeqCst);
    }
}

/// A running device: its core and its worker threads.
pub(crate) struct Engine<M: Medium> {
    core: Arc<Core<M>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl<M: Medium> Engine<M> {
    /// Allocate the rings and start the workers. Host or thread context.
    pub(crate) fn start(medium: M, t: &Tuning) -> io::Result<Self> {
        if t.queue_depth == 0 || t.workers == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: queue_depth ({}) and workers ({}) must be at least 1",
                    t.name, t.queue_depth, t.workers
                ),
            ));
        }
        let depth = t.queue_depth as usize;
        let core = Arc::new(Core {
            medium,
            stats: Counters::default(),
            sq: ArrayQueue::new(depth),
            cq: ArrayQueue::new(depth),
            depth: depth as u32,
            outstanding: AtomicU32::new(0),
            submitting: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            bell: AtomicU32::new(0),
            polling: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            waking: AtomicBool::new(false),
            busy: AtomicU32::new(0),
            timed_sleepers: AtomicU32::new(0),
            progress_ns: AtomicU64::new(0),
            target: IntrTarget::new(),
            coalesce_count: t.coalesce_count.max(1),
            coalesce_ns: t.coalesce_ns,
            spin_ns: t.spin_ns,
            unsignalled: AtomicU32::new(0),
            first_unsignalled: AtomicU64::new(0),
            delay_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let engine = Engine {
            core: core.clone(),
            workers: Mutex::new(Vec::with_capacity(t.workers)),
        };
        for i in 0..t.workers {
            let c = core.clone();
            let h = std::thread::Builder::new()
                .name(format!("{}/{i}", t.name))
                .spawn(move || run_worker(c))?; // `engine` drops: stops the others.
            engine
                .workers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(h);
        }
        Ok(engine)
    }

    /// The shared state.
    pub(crate) fn core(&self) -> &Core<M> {
        &self.core
    }

    /// Stop: refuse new commands, let the workers finish what they execute,
    /// join them, complete what is left in the ring with ESHUTDOWN and post
    /// once for it. Idempotent; a second caller waits for the first. Host
    /// or thread context, never an interrupt handler.
    pub(crate) fn stop(&self) {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        let c = &*self.core;
        c.stopping.store(true, SeqCst);
        c.bell.fetch_add(1, SeqCst);
        sys::futex_wake(&c.bell, i32::MAX);
        for h in workers.drain(..) {
            let _ = h.join();
        }
        // A `submit` that saw the device running may still be pushing.
        while c.submitting.load(SeqCst) != 0 {
            std::thread::yield_now();
        }
        let mut aborted = 0u32;
        while let Some(cmd) = c.sq.pop() {
            c.push_done(DiskDone {
                id: M::id(&cmd),
                status: DiskStatus::MediaError(libc::ESHUTDOWN),
            });
            Counters::inc(&c.stats.aborted);
            aborted += 1;
        }
        if aborted > 0 {
            c.unsignalled.fetch_add(aborted, SeqCst);
        }
        fence(SeqCst);
        if c.unsignalled.load(SeqCst) > 0 {
            c.signal();
        }
    }
}

impl<M: Medium> Drop for Engine<M> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Take one of `depth` command slots counted by `outstanding`; false when
/// all are taken (the controller refuses the command). Lock-free, any
/// context (every engine's `submit`).
pub(super) fn reserve(outstanding: &AtomicU32, depth: u32) -> bool {
    outstanding
        .fetch_update(SeqCst, Relaxed, |cur| (cur < depth).then_some(cur + 1))
        .is_ok()
}
