//! Kernel threads: tsleep/wakeup, run queues, `cpu_switchto`, the idle loop.
//!
//! A kernel thread is a stack of its own, pinned to one CPU. Switching is
//! the machine's `cpu_switchto` (save the callee-saved registers and the
//! stack pointer, load the other's), called by the thread that gives up the
//! CPU, straight to the next runnable thread: thread to thread, with no
//! scheduler context in between. Each CPU's host stack is its *idle
//! context*, which [`cpu_run`] runs: it idles when nothing is runnable and
//! switches to whatever becomes so.
//!
//! The kernel is non-preemptive: a thread runs until it sleeps, yields or
//! exits. Interrupts still run on top of it (they are signals), and the
//! only way anything else runs in its context is an AST ([`crate::ast`]).
//!
//! | call | context | |
//! |---|---|---|
//! | [`kthread_create`] | thread or host | a new thread on a CPU (round-robin by default) |
//! | [`tsleep`] | thread | sleep on a wait channel until [`wakeup`] |
//! | [`sleep_interlocked`] | thread | the same, releasing a spin mutex atomically (use it when the waker runs on another CPU) |
//! | [`wakeup`], [`wakeup_one`] | any, at IPL_SCHED or below on the thread's CPU | make the sleepers of a channel runnable |
//! | [`yield_now`] | thread | let the other runnable threads of this CPU run |
//! | [`KThread::join`] | thread | wait for a thread to exit |
//!
//! `tsleep` at a raised IPL is the BSD idiom for a waker on the *same* CPU
//! (`s = splbio(); while (!done) tsleep(); splx(s)`): the level is restored
//! by the sleeper when it resumes, so the interrupt cannot run between the
//! test and the sleep. For a waker on another CPU use [`sleep_interlocked`].
//!
//! # The switch protocol (NetBSD's)
//! Every switch happens at IPL_SCHED or above: the switching thread raises
//! to IPL_SCHED, queues itself where it belongs (run queue, sleep queue,
//! the dead slot), and switches. The IPL belongs to the CPU, not to the
//! thread: the thread that resumes returns from its own switch and lowers to
//! the level *it* saved before switching (a new thread starts by lowering to
//! none). A thread that exits is reaped by whichever context runs next on
//! the CPU, once that context is off the dead thread's stack.
//!
//! # Run queues
//! A CPU's run queue is touched only by that CPU, at IPL_SCHED: no lock.
//! Other CPUs, and handlers above IPL_SCHED, make a thread runnable by
//! pushing it onto the CPU's lock-free *inbox*, which the CPU moves into its
//! run queue when it next picks a thread, and kick it if it idles.
//!
//! # The idle loop
//! With nothing to run, a CPU polls its pending word (dispatching
//! interrupts itself, without any signal), its run queue and its inbox for
//! a window that adapts to its idle periods, at most
//! [`crate::KernelConfig::idle_poll_ns`] ([`crate::haltpoll`]), then sleeps on its state word
//! until a device or a wakeup moves it back to polling. While it polls, and
//! after every sleep, it asks the machine to look at the host devices that
//! report to this CPU's wait ([`crate::md::Md::idle_poll`]: on Linux an
//! `epoll` set holding, e.g., a NIC's receive queue), which post their
//! interrupts on it: the wait is the CPU's `hlt`, and a device that has
//! something to say while the CPU sleeps ends the `hlt`.
//!
//! # Teardown
//! Threads end by returning. At shutdown every sleeper is woken with
//! `Err(Interrupted)`, and a CPU leaves [`cpu_run`] once its last thread
//! is gone.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release, SeqCst},
};

use crate::cpu::{AST_BIT, Cpu, curcpu, curcpu_opt, unmasked};
use crate::ctx::ThreadCtx;
use crate::ipl::Ipl;
use crate::kernel::{Kernel, kernel};
use crate::lock::{SpinGuard, SpinMutex};
use crate::md::{Kick, StackMem};
#[cfg(not(loom))]
use crate::pending::SLEEP;
use crate::pending::{LinkWord, Post};
use crate::statclock::{self, Part};

/// A wait channel: any address.
pub type WChan = usize;

/// The wait channel of an object (its address).
pub fn wchan<T: ?Sized>(r: &T) -> WChan {
    r as *const T as *const () as usize
}

/// The sleep was cut short because the kernel is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl core::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("sleep interrupted: the kernel is shutting down")
    }
}

/// Errors of [`kthread_create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchedError {
    /// No such CPU.
    NoSuchCpu {
        /// The CPU asked for.
        cpu: usize,
        /// How many there are.
        ncpu: usize,
    },
    /// The thread table is full.
    TooManyThreads {
        /// Its size.
        max: usize,
    },
    /// The machine could not allocate a stack.
    NoStack,
    /// The kernel is shutting down.
    ShuttingDown,
}

impl core::error::Error for SchedError {}

impl core::fmt::Display for SchedError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SchedError::NoSuchCpu { cpu, ncpu } => {
                write!(f, "kthread_create: no cpu{cpu} (there are {ncpu})")
            }
            SchedError::TooManyThreads { max } => {
                write!(f, "kthread_create: all {max} thread slots in use")
            }
            SchedError::NoStack => write!(f, "kthread_create: no stack"),
            SchedError::ShuttingDown => write!(f, "kthread_create: shutting down"),
        }
    }
}

pub(crate) const NIL: u32 = u32::MAX;

const FREE: u8 = 0;
const EMBRYO: u8 = 1;
const RUNNABLE: u8 = 2;
const ONPROC: u8 = 3;
const SLEEPING: u8 = 4;
const ZOMBIE: u8 = 5;

/// What a kernel thread runs.
type ThreadBody = Box<dyn FnOnce(&ThreadCtx) + Send>;

/// A kernel thread's slot in the thread table.
pub struct Thread {
    tid: u32,
    /// Set by `kthread_create`; read by anyone (diagnostics), so under a
    /// spin mutex (at IPL_HIGH: any context may read it).
    name: SpinMutex<&'static str>,
    cpu: AtomicUsize,
    state: AtomicU8,
    wchan: AtomicUsize,
    /// Run-queue, inbox or sleep-queue link (a thread is on at most one).
    link: LinkWord,
    /// The stack pointer saved by `cpu_switchto` while the thread is off CPU.
    sp: AtomicUsize,
    saved_no_ast: AtomicU32,
    pub(crate) in_upcall: AtomicBool,
    interrupted: AtomicBool,
    exit_gen: AtomicU32,
    stack_lo: AtomicUsize,
    stack_hi: AtomicUsize,
    /// Put by `kthread_create`, taken by the thread when it starts.
    body: SpinMutex<Option<ThreadBody>>,
}

impl Thread {
    fn new(tid: u32) -> Self {
        Self {
            tid,
            name: SpinMutex::new(Ipl::High, ""),
            cpu: AtomicUsize::new(0),
            state: AtomicU8::new(FREE),
            wchan: AtomicUsize::new(0),
            link: LinkWord::new(NIL),
            sp: AtomicUsize::new(0),
            saved_no_ast: AtomicU32::new(0),
            in_upcall: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
            exit_gen: AtomicU32::new(0),
            stack_lo: AtomicUsize::new(0),
            stack_hi: AtomicUsize::new(0),
            body: SpinMutex::new(Ipl::High, None),
        }
    }

    /// Thread id (its slot).
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        *self.name.lock()
    }

    /// Its stack's bounds (lowest, highest address).
    pub(crate) fn stack_bounds(&self) -> (usize, usize) {
        (self.stack_lo.load(Relaxed), self.stack_hi.load(Relaxed))
    }

    fn stack(&self) -> StackMem {
        StackMem {
            limit: self.stack_lo.load(Relaxed),
            base: self.stack_hi.load(Relaxed),
        }
    }
}

/// A CPU's run queue: a FIFO linked through the threads (no allocation, so
/// interrupt handlers may make threads runnable). Only its own CPU touches
/// it, at IPL_SCHED or above; the fields are atomics used as plain per-CPU
/// words (relaxed loads and stores).
pub struct RunQueue {
    head: AtomicU32,
    tail: AtomicU32,
    len: AtomicU32,
}

impl RunQueue {
    pub(crate) const fn new() -> Self {
        Self {
            head: AtomicU32::new(NIL),
            tail: AtomicU32::new(NIL),
            len: AtomicU32::new(0),
        }
    }

    fn len(&self) -> u32 {
        self.len.load(Relaxed)
    }

    fn push(&self, k: &Kernel, t: &Thread) {
        t.link.store(NIL, Relaxed);
        let tail = self.tail.load(Relaxed);
        if tail == NIL {
            self.head.store(t.tid, Relaxed);
        } else {
            k.threads.get(tail).link.store(t.tid, Relaxed);
        }
        self.tail.store(t.tid, Relaxed);
        self.len.store(self.len.load(Relaxed) + 1, Relaxed);
    }

    fn pop(&self, k: &'static Kernel) -> Option<&'static Thread> {
        let h = self.head.load(Relaxed);
        if h == NIL {
            return None;
        }
        let t = k.threads.get(h);
        let next = t.link.load(Relaxed);
        self.head.store(next, Relaxed);
        if next == NIL {
            self.tail.store(NIL, Relaxed);
        }
        self.len.store(self.len.load(Relaxed) - 1, Relaxed);
        Some(t)
    }
}

const SLEEPQ_BUCKETS: usize = 64;

/// The thread table, stacks and sleep queues.
pub(crate) struct Threads {
    slots: Box<[Thread]>,
    stacks: SpinMutex<Vec<StackMem>>,
    next_cpu: AtomicUsize,
    sleepq: Box<[SpinMutex<u32>]>,
    join_lock: SpinMutex<()>,
}

impl Threads {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            slots: (0..max as u32).map(Thread::new).collect(),
            stacks: SpinMutex::new(Ipl::Sched, Vec::with_capacity(max)),
            next_cpu: AtomicUsize::new(0),
            sleepq: (0..SLEEPQ_BUCKETS)
                .map(|_| SpinMutex::new(Ipl::Sched, NIL))
                .collect(),
            join_lock: SpinMutex::new(Ipl::Sched, ()),
        }
    }

    /// Thread `tid`: on the switch path (run queue, inbox, `curthread`),
    /// so without a bounds check.
    #[inline(always)]
    fn get(&self, tid: u32) -> &Thread {
        debug_assert!((tid as usize) < self.slots.len());
        // SAFETY: thread ids are slot indices handed out by this table
        // (`kthread_create`) and stored only in its own links and queues and
        // in the CPUs' `curthread`/`dead` words; none is ever out of range.
        unsafe { self.slots.get_unchecked(tid as usize) }
    }

    /// Free every pooled stack (teardown, host context).
    pub(crate) fn free_stacks(&self, k: &Kernel) {
        let stacks: Vec<StackMem> = core::mem::take(&mut *self.stacks.lock());
        for s in stacks {
            // SAFETY: pooled stacks came from `stack_alloc` and no thread
            // uses them.
            unsafe { k.md().stack_free(s) };
        }
    }

    fn live(&self) -> impl Iterator<Item = (&Thread, u8)> {
        self.slots
            .iter()
            .map(|t| (t, t.state.load(Acquire)))
            .filter(|(_, s)| *s != FREE)
    }
}

fn bucket(k: &Kernel, chan: WChan) -> &SpinMutex<u32> {
    let h = (chan >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
    &k.threads.sleepq[h % SLEEPQ_BUCKETS]
}

/// A created kernel thread.
#[derive(Debug, Clone, Copy)]
pub struct KThread {
    tid: u32,
    generation: u32,
}

impl KThread {
    /// Its thread id.
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// Has it exited?
    pub fn is_done(&self) -> bool {
        kernel().threads.get(self.tid).exit_gen.load(Acquire) != self.generation
    }

    /// Wait for it to exit. Thread context.
    pub fn join(&self, ctx: &ThreadCtx) -> Result<(), Interrupted> {
        let k = kernel();
        let t = k.threads.get(self.tid);
        loop {
            let g = k.threads.join_lock.lock();
            if t.exit_gen.load(Acquire) != self.generation {
                return Ok(());
            }
            sleep_interlocked(ctx, wchan(&t.exit_gen), g)?;
        }
    }

    /// The word a host thread can wait on (futex) for the exit: it changes
    /// from the returned value when the thread exits, and the machine's
    /// `Md::host_wake` is called on it.
    pub fn exit_word(&self) -> (&'static AtomicU32, u32) {
        (&kernel().threads.get(self.tid).exit_gen, self.generation)
    }
}

/// Create a kernel thread running `f`, on CPU `cpu` or round-robin.
///
/// Thread or host context (not interrupt context: it allocates).
pub fn kthread_create(
    cpu: Option<usize>,
    name: &'static str,
    f: impl FnOnce(&ThreadCtx) + Send + 'static,
) -> Result<KThread, SchedError> {
    let k = kernel();
    if let Some(c) = curcpu_opt() {
        assert!(c.intr_depth() == 0, "kthread_create from interrupt context");
    }
    if k.is_shutting_down() {
        return Err(SchedError::ShuttingDown);
    }
    let ncpu = k.ncpu();
    let cpu = match cpu {
        Some(c) if c < ncpu => c,
        Some(c) => return Err(SchedError::NoSuchCpu { cpu: c, ncpu }),
        None => k.threads.next_cpu.fetch_add(1, Relaxed) % ncpu,
    };
    let Some(t) = k.threads.slots.iter().find(|t| {
        t.state
            .compare_exchange(FREE, EMBRYO, Acquire, Relaxed)
            .is_ok()
    }) else {
        return Err(SchedError::TooManyThreads {
            max: k.threads.slots.len(),
        });
    };
    let pooled = k.threads.stacks.lock().pop();
    let Some(stack) = pooled.or_else(|| k.md().stack_alloc(k.config().stack_size)) else {
        t.state.store(FREE, Release);
        return Err(SchedError::NoStack);
    };
    *t.name.lock() = name;
    *t.body.lock() = Some(Box::new(f));
    t.cpu.store(cpu, Relaxed);
    t.saved_no_ast.store(0, Relaxed);
    t.in_upcall.store(false, Relaxed);
    t.interrupted.store(false, Relaxed);
    t.stack_lo.store(stack.limit, Relaxed);
    t.stack_hi.store(stack.base, Relaxed);
    t.sp.store(
        k.md().thread_init(stack, thread_start, t.tid as usize),
        Relaxed,
    );
    let generation = t.exit_gen.load(Acquire);
    k.cpu(cpu).nthreads.fetch_add(1, SeqCst);
    setrunqueue(k, t);
    Ok(KThread {
        tid: t.tid,
        generation,
    })
}

/// Where a new thread starts, on its own stack, switched to at IPL_SCHED.
extern "C" fn thread_start(tid: usize) -> ! {
    let k = kernel();
    let cpu = curcpu();
    let t = k.threads.get(tid as u32);
    after_switch(k, cpu);
    // A new context: nothing to restore; the thread's own code is `Thread`.
    statclock::set_cpu(cpu, Part::Thread);
    crate::spl::splx_cpu(cpu, 0);
    let mut body = t.body.lock().take();
    k.md().run_thread(&mut || {
        if let Some(f) = body.take() {
            f(&ThreadCtx::new());
        }
    });
    thread_exit(k, cpu, t)
}

fn thread_exit(k: &'static Kernel, cpu: &Cpu, t: &'static Thread) -> ! {
    if cpu.mtx_count.get() != 0 {
        // Only after a panic in the body (`run_thread` caught it and the
        // machine has failed): let the CPU carry on to shutdown.
        cpu.mtx_count.set(0);
    }
    statclock::set_cpu(cpu, Part::Dispatch);
    crate::spl::splraise_cpu(cpu, Ipl::Sched as u8);
    t.state.store(ZOMBIE, Release);
    cpu.dead.store(t.tid, Relaxed);
    let next = runq_take(k, cpu);
    switch(k, cpu, Some(t), next);
    unreachable!("exited thread {} resumed", t.name())
}

/// The kernel thread running on `cpu`, if one is (`cpu.curthread` holds
/// its tid). Any context.
pub(crate) fn curthread_opt(k: &'static Kernel, cpu: &Cpu) -> Option<&'static Thread> {
    match cpu.curthread.load(Relaxed) {
        NIL => None,
        tid => Some(k.threads.get(tid)),
    }
}

/// The current thread of `cpu` (thread context).
pub(crate) fn curthread(k: &'static Kernel, cpu: &Cpu) -> &'static Thread {
    match curthread_opt(k, cpu) {
        Some(t) => t,
        None => panic!("no current kernel thread on cpu{}", cpu.index()),
    }
}

/// The current thread's name, if a kernel thread is running.
pub fn current_name() -> Option<&'static str> {
    let cpu = curcpu_opt()?;
    if !cpu.in_kthread.load(Relaxed) {
        return None;
    }
    curthread_opt(crate::kernel::try_kernel()?, cpu).map(|t| t.name())
}

/// Switch from the running context (`me`, or the idle context) to `next`
/// (or the idle context). The caller runs at IPL_SCHED or above and has put
/// `me` where it belongs. Returns when something switches back to `me`.
#[inline(always)]
fn switch(k: &'static Kernel, cpu: &Cpu, me: Option<&Thread>, next: Option<&'static Thread>) {
    // statclock: every caller (sleep, yield, exit, the scheduler's loop)
    // is in the `Dispatch` part, so every context switches inside it and
    // finds its own part again, restored by its caller's guard, when it is
    // switched back to; a new thread sets its own (`thread_start`).
    let from = match me {
        Some(t) => {
            t.saved_no_ast.store(cpu.no_ast.get() as u32, Relaxed);
            t.sp.as_ptr()
        }
        None => cpu.idle_sp.as_ptr(),
    };
    let to = match next {
        Some(t) => {
            cpu.curthread.store(t.tid, Relaxed);
            cpu.no_ast.set(t.saved_no_ast.load(Relaxed) as u64);
            cpu.in_kthread.store(true, Relaxed);
            t.state.store(ONPROC, Relaxed);
            t.sp.load(Relaxed)
        }
        None => {
            cpu.curthread.store(NIL, Relaxed);
            cpu.no_ast.set(0);
            cpu.in_kthread.store(false, Relaxed);
            cpu.idle_sp.load(Relaxed)
        }
    };
    cpu.stats.switches.inc();
    // SAFETY: `from` is the saved-sp word of the running context (a thread
    // slot or this CPU's idle slot: both outlive the switch); `to` was saved
    // by an earlier switch on this CPU or made by `thread_init`, and has not
    // been resumed since (a thread is on at most one queue, and only this
    // CPU takes it off); the callers run at IPL_SCHED.
    unsafe { crate::md::cpu_switchto(from, to) };
    after_switch(k, cpu);
}

/// What runs after every switch: reap the thread that exited, if any.
#[inline(always)]
fn after_switch(k: &Kernel, cpu: &Cpu) {
    // Owner CPU only, at IPL_SCHED: a plain load and store, no `xchg`.
    let d = cpu.dead.load(Relaxed);
    if d != NIL {
        cpu.dead.store(NIL, Relaxed);
        // Set by `thread_exit` just before it switched away for good.
        reap(k, cpu, k.threads.get(d));
    }
}

/// The running thread gives up the CPU: run the next runnable thread, or
/// the idle context. The caller is at IPL_SCHED and has queued `me`.
#[inline(always)]
fn mi_switch(k: &'static Kernel, cpu: &Cpu, me: &Thread) {
    assert!(
        cpu.mtx_count.get() == 0,
        "{}: switching while holding a spin mutex",
        me.name()
    );
    let next = runq_take(k, cpu);
    if let Some(n) = next
        && core::ptr::eq(n, me)
    {
        me.state.store(ONPROC, Relaxed);
        return;
    }
    switch(k, cpu, Some(me), next);
}

#[cold]
#[inline(never)]
fn reap(k: &Kernel, cpu: &Cpu, t: &Thread) {
    k.threads.stacks.lock().push(t.stack());
    {
        let _g = k.threads.join_lock.lock();
        t.exit_gen.fetch_add(1, Release);
    }
    t.state.store(FREE, Release);
    cpu.nthreads.fetch_sub(1, SeqCst);
    wakeup(wchan(&t.exit_gen));
    k.md().host_wake(&t.exit_gen);
}

/// Make `t` runnable on its CPU and make that CPU notice.
fn setrunqueue(k: &Kernel, t: &Thread) {
    let target = t.cpu.load(Relaxed);
    t.state.store(RUNNABLE, Release);
    if let Some(c) = curcpu_opt()
        && c.index() == target
        && c.line.ipl() <= Ipl::Sched as u8
    {
        // Our own queue: no lock, only IPL_SCHED against our own handlers.
        let s = crate::spl::splraise_cpu(c, Ipl::Sched as u8);
        c.runq.push(k, t);
        if s < Ipl::Sched as u8 {
            crate::spl::splx_cpu(c, s);
        }
        return;
    }
    let cpu = k.cpu(target);
    cpu.inbox.push(t.tid, &t.link);
    if let Post::Kick(kick) = cpu.line.notify(Ipl::None) {
        if kick == Kick::Wake {
            cpu.stats.kicks_wake.fetch_add(1, Relaxed);
        }
        k.md().kick(cpu.index(), kick);
    }
}

/// Is anything runnable on `cpu` (owner)?
fn runnable(cpu: &Cpu) -> bool {
    cpu.runq.len() != 0 || !cpu.inbox.is_empty()
}

/// Move the inbox into the run queue, oldest first (owner, at IPL_SCHED).
#[cold]
fn drain_inbox(k: &Kernel, cpu: &Cpu) {
    let mut list = cpu.inbox.take_all();
    let mut rev = NIL;
    while list != NIL {
        let t = k.threads.get(list);
        let next = t.link.load(Relaxed);
        t.link.store(rev, Relaxed);
        rev = list;
        list = next;
    }
    while rev != NIL {
        let t = k.threads.get(rev);
        let next = t.link.load(Relaxed);
        cpu.runq.push(k, t);
        rev = next;
    }
}

/// Take the next runnable thread (owner CPU, at IPL_SCHED or above).
#[inline(always)]
fn runq_take(k: &'static Kernel, cpu: &Cpu) -> Option<&'static Thread> {
    if !cpu.inbox.is_empty() {
        drain_inbox(k, cpu);
    }
    cpu.runq.pop(k)
}

fn sleep_common(cpu: &Cpu, chan: WChan, release: impl FnOnce()) -> Result<(), Interrupted> {
    let _part = statclock::mark(cpu, Part::Dispatch);
    let k = kernel();
    let t = curthread(k, cpu);
    assert!(cpu.intr_depth() == 0, "tsleep from interrupt context");
    assert!(
        cpu.in_kthread.load(Relaxed) && !cpu.in_softint_thread.load(Relaxed),
        "tsleep outside a kernel thread"
    );
    // Deliver pending ASTs before sleeping.
    crate::ast::safepoint(cpu);
    // The level to come back to: the caller's, before its interlock if any.
    let s = if cpu.mtx_count.get() > 0 {
        cpu.mtx_oldspl.load(Relaxed)
    } else {
        cpu.line.ipl()
    };
    let b = bucket(k, chan);
    let mut q = b.lock();
    // Releasing the last spin mutex must leave us at IPL_SCHED until the
    // switch: nothing may run on this CPU between queueing and switching.
    cpu.mtx_oldspl.store(s.max(Ipl::Sched as u8), Relaxed);
    if k.is_shutting_down() {
        drop(q);
        release();
        crate::spl::splx_cpu(cpu, s);
        return Err(Interrupted);
    }
    t.wchan.store(chan, Relaxed);
    t.state.store(SLEEPING, Release);
    // At the tail: a wakeup takes the oldest sleeper first, so sleepers of
    // one channel are served in the order they came (no starvation of the
    // first under a stream of new ones). The walk is over one hash bucket.
    t.link.store(NIL, Relaxed);
    if *q == NIL {
        *q = t.tid;
    } else {
        let mut cur = k.threads.get(*q);
        loop {
            let next = cur.link.load(Relaxed);
            if next == NIL {
                break;
            }
            cur = k.threads.get(next);
        }
        cur.link.store(t.tid, Relaxed);
    }
    release();
    drop(q);
    mi_switch(k, cpu, t);
    crate::spl::splx_cpu(cpu, s);
    if t.interrupted.swap(false, Relaxed) {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// Sleep on `chan` until a [`wakeup`] of it. Thread context.
///
/// Returns `Err(Interrupted)` when the kernel shuts down. Wakeups are not
/// counted: re-test the condition after waking.
pub fn tsleep(_ctx: &ThreadCtx, chan: WChan) -> Result<(), Interrupted> {
    sleep_common(curcpu(), chan, || {})
}

/// Sleep on `chan`, releasing `guard` only once the thread is on the sleep
/// queue: a waker that changes the condition under the same mutex cannot be
/// missed, whatever CPU it runs on. Thread context.
pub fn sleep_interlocked<T>(
    _ctx: &ThreadCtx,
    chan: WChan,
    guard: SpinGuard<'_, T>,
) -> Result<(), Interrupted> {
    sleep_common(curcpu(), chan, move || drop(guard))
}

fn wake(chan: WChan, all: bool) -> usize {
    wake_on(chan, all, None, false)
}

/// Wake the sleepers on `chan`: all, or one (the first bound to CPU
/// `prefer` if there is one, else the first). One walk of the bucket.
fn wake_on(chan: WChan, all: bool, prefer: Option<usize>, only: bool) -> usize {
    let _part = statclock::enter(Part::Dispatch);
    let k = kernel();
    let b = bucket(k, chan);
    let mut q = b.lock();
    // Unlink `cur` (after `prev`) and make it runnable.
    let take = |q: &mut u32, prev: u32, cur: u32| {
        let t = k.threads.get(cur);
        let next = t.link.load(Relaxed);
        if prev == NIL {
            *q = next;
        } else {
            k.threads.get(prev).link.store(next, Relaxed);
        }
        t.wchan.store(0, Relaxed);
        setrunqueue(k, t);
    };
    // The first sleeper on `chan` and its predecessor: the one a single
    // wake-up takes when no sleeper is bound to `prefer`.
    let mut first: Option<(u32, u32)> = None;
    let mut prev = NIL;
    let mut cur = *q;
    let mut n = 0;
    while cur != NIL {
        let t = k.threads.get(cur);
        let next = t.link.load(Relaxed);
        if t.wchan.load(Relaxed) != chan {
            prev = cur;
        } else if all {
            take(&mut q, prev, cur);
            n += 1;
        } else if prefer.is_none_or(|c| t.cpu.load(Relaxed) == c) {
            take(&mut q, prev, cur);
            return 1;
        } else {
            first.get_or_insert((prev, cur));
            prev = cur;
        }
        cur = next;
    }
    if let Some((p, c)) = first
        && !only
    {
        take(&mut q, p, c);
        n = 1;
    }
    n
}

/// Wake every thread sleeping on `chan`; returns how many. Any context.
pub fn wakeup(chan: WChan) -> usize {
    wake(chan, true)
}

/// Wake one thread sleeping on `chan`; returns whether there was one.
pub fn wakeup_one(chan: WChan) -> bool {
    wake(chan, false) == 1
}

/// Wake one thread sleeping on `chan`, preferring one bound to the calling
/// CPU (no cross-CPU wake-up, which costs an inter-processor kick: a
/// system call and a host context switch), else any. Returns whether there
/// was one. Any context; on a host thread, the same as [`wakeup_one`].
pub fn wakeup_one_local(chan: WChan) -> bool {
    wake_on(chan, false, curcpu_opt().map(|c| c.index()), false) == 1
}

/// Wake one thread sleeping on `chan` that is bound to CPU `cpu`, and no
/// other. Returns whether there was one. Any context.
pub fn wakeup_one_on(chan: WChan, cpu: usize) -> bool {
    wake_on(chan, false, Some(cpu), true) == 1
}

/// Shutdown: wake every sleeper with `Err(Interrupted)`. The caller has
/// set the shutdown flag first; `sleep_common` tests it under the bucket
/// lock, so no thread can go to sleep after its bucket was emptied here.
pub(crate) fn interrupt_all(k: &Kernel) {
    for i in 0..SLEEPQ_BUCKETS {
        let mut q = k.threads.sleepq[i].lock();
        let mut cur = *q;
        *q = NIL;
        while cur != NIL {
            let t = k.threads.get(cur);
            let next = t.link.load(Relaxed);
            t.wchan.store(0, Relaxed);
            t.interrupted.store(true, Relaxed);
            setrunqueue(k, t);
            cur = next;
        }
    }
}

/// Let the other runnable threads of this CPU run. Thread context.
pub fn yield_now(_ctx: &ThreadCtx) {
    let cpu = curcpu();
    let _part = statclock::mark(cpu, Part::Dispatch);
    if cpu.line.pending() & AST_BIT != 0 {
        crate::ast::safepoint(cpu);
    }
    if !runnable(cpu) {
        return;
    }
    let k = kernel();
    let t = curthread(k, cpu);
    let s = crate::spl::splraise_cpu(cpu, Ipl::Sched as u8);
    t.state.store(RUNNABLE, Relaxed);
    cpu.runq.push(k, t);
    mi_switch(k, cpu, t);
    crate::spl::splx_cpu(cpu, s);
}

/// The idle context of the calling CPU: runs threads until shutdown, idling
/// in between. Called by the machine on each CPU's host thread; returns
/// when the kernel shuts down and this CPU's last thread has exited.
pub fn cpu_run() {
    let k = kernel();
    let cpu = curcpu();
    cpu.in_kthread.store(false, Relaxed);
    // The scheduler's loop is dispatch; `idle` marks its own part.
    statclock::set_cpu(cpu, Part::Dispatch);
    loop {
        let s = crate::spl::splraise_cpu(cpu, Ipl::Sched as u8);
        if let Some(t) = runq_take(k, cpu) {
            switch(k, cpu, None, Some(t));
            crate::spl::splx_cpu(cpu, s);
            continue;
        }
        crate::spl::splx_cpu(cpu, s);
        if k.is_shutting_down() && cpu.nthreads.load(SeqCst) == 0 {
            break;
        }
        idle(k, cpu);
    }
}

fn idle(k: &Kernel, cpu: &Cpu) {
    let _part = statclock::mark(cpu, Part::Idle);
    let md = k.md();
    let max = k.config().idle_poll_ns;
    // The window adapts to the idle periods seen (`haltpoll`); a CPU that
    // has not idled yet polls for all of `idle_poll_ns`.
    let hp = if cpu.stats.idle_periods.get() == 0 {
        crate::haltpoll::HaltPoll::new(max)
    } else {
        crate::haltpoll::HaltPoll {
            window_ns: cpu.halt_poll_ns.get(),
            long_streak: cpu.halt_poll_streak.get() as u32,
        }
    };
    let poll = hp.window_ns;
    let work = unmasked(0) & !AST_BIT;
    cpu.line.idle_poll();
    let start = md.nanotime();
    let mut until = start + poll;
    let mut handed_asts = false;
    loop {
        // Devices whose events come to this CPU's wait (`Md::idle_poll`).
        #[cfg(not(loom))]
        md.idle_poll(cpu.index());
        if cpu.line.pending() & work != 0 {
            crate::intr::dispatch(cpu, 0, crate::intr::Origin::Idle);
        }
        if runnable(cpu) || k.is_shutting_down() {
            break;
        }
        if !handed_asts && cpu.line.pending() & AST_BIT != 0 {
            // No thread to deliver it to: the softint daemon will.
            handed_asts = true;
            wakeup(wchan(&cpu.softintd_wchan));
            continue;
        }
        let now = md.nanotime();
        if now >= until {
            if cpu.line.idle_try_sleep() {
                if cpu.line.pending() & work != 0 || runnable(cpu) || k.is_shutting_down() {
                    cpu.line.idle_poll();
                    continue;
                }
                cpu.stats.idle_sleeps.inc();
                // (The loom build only runs the pending-word models; it never
                // idles a real CPU.)
                #[cfg(not(loom))]
                md.idle_wait(cpu.index(), cpu.line.state_word(), SLEEP);
                cpu.line.idle_poll();
            }
            until = md.nanotime() + poll;
        }
        core::hint::spin_loop();
    }
    cpu.line.idle_end();
    let idle_ns = md.nanotime().saturating_sub(start);
    let hp = hp.after(max, idle_ns);
    cpu.halt_poll_ns.set(hp.window_ns);
    cpu.halt_poll_streak.set(u64::from(hp.long_streak));
    cpu.stats.idle_periods.inc();
    if cpu.line.pending() & work != 0 {
        crate::intr::dispatch(cpu, 0, crate::intr::Origin::Idle);
    }
}

/// Names and states of live threads (diagnostics; host context).
pub fn live_threads(mut f: impl FnMut(u32, &'static str, usize, &'static str)) {
    for (t, s) in kernel().threads.live() {
        let state = match s {
            EMBRYO => "embryo",
            RUNNABLE => "runnable",
            ONPROC => "onproc",
            SLEEPING => "sleeping",
            ZOMBIE => "zombie",
            _ => "?",
        };
        f(t.tid, t.name(), t.cpu.load(Relaxed), state);
    }
}
