//! Kernel threads: green threads on each CPU, tsleep/wakeup, the idle loop.
//!
//! A kernel thread is a stackful coroutine (corosensei) pinned to one CPU.
//! Each CPU runs [`cpu_run`] on its host thread: a loop that takes the next
//! thread from its run queue and resumes it, and idles when there is none.
//! The kernel is non-preemptive: a thread runs until it sleeps, yields or
//! exits. Interrupts still run on top of it (they are signals), and the
//! only way anything else runs in its context is an AST ([`crate::ast`]).
//!
//! | call | context | |
//! |---|---|---|
//! | [`kthread_create`] | thread or host | a new thread on a CPU (round-robin by default) |
//! | [`tsleep`] | thread | sleep on a wait channel until [`wakeup`] |
//! | [`sleep_interlocked`] | thread | the same, releasing a spin mutex atomically (use it when the waker runs on another CPU) |
//! | [`wakeup`], [`wakeup_one`] | any | make the sleepers of a channel runnable |
//! | [`yield_now`] | thread | let the other runnable threads of this CPU run |
//! | [`KThread::join`] | thread | wait for a thread to exit |
//!
//! `tsleep` at a raised IPL is the BSD idiom for a waker on the *same* CPU
//! (`s = splbio(); while (!done) tsleep(); splx(s)`): the IPL is saved per
//! thread across the switch, so the interrupt cannot run between the test
//! and the sleep. For a waker on another CPU use [`sleep_interlocked`].
//!
//! # The idle loop
//! With nothing to run, a CPU polls its pending word (dispatching
//! interrupts itself, without any signal) and its run queue for
//! [`crate::KernelConfig::idle_poll_ns`], then sleeps on its state word
//! (a futex) until a device or a wakeup moves it back to polling.
//!
//! # Teardown
//! Threads end by returning. At shutdown every sleeper is woken with
//! `Err(Interrupted)`, and a CPU leaves [`cpu_run`] once its last thread
//! is gone. Suspended coroutines are never dropped (that would unwind
//! through the AST trampoline).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::num::NonZeroUsize;
use core::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU8, AtomicU32, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release, SeqCst},
    compiler_fence,
};

use corosensei::stack::{Stack, StackPointer};
use corosensei::{Coroutine, CoroutineResult, Yielder};

use crate::cpu::{AST_BIT, Cpu, curcpu, curcpu_opt, unmasked};
use crate::ctx::ThreadCtx;
use crate::ipl::Ipl;
use crate::kernel::{Kernel, kernel};
use crate::lock::{SpinGuard, SpinMutex};
use crate::md::{Kick, StackMem};
use crate::pending::{Post, SLEEP};

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

const NIL: u32 = u32::MAX;

const FREE: u8 = 0;
const EMBRYO: u8 = 1;
const RUNNABLE: u8 = 2;
const ONPROC: u8 = 3;
const SLEEPING: u8 = 4;

/// A stack handed out by the machine, as corosensei wants it.
pub(crate) struct KStack(StackMem);

// SAFETY: `StackMem` comes from `Md::stack_alloc`, which promises a guard
// page below `limit` and at least the asked size between limit and base;
// base is 16-byte aligned (`StackMem` docs).
unsafe impl Stack for KStack {
    fn base(&self) -> StackPointer {
        NonZeroUsize::new(self.0.base).unwrap_or(NonZeroUsize::MIN)
    }
    fn limit(&self) -> StackPointer {
        NonZeroUsize::new(self.0.limit).unwrap_or(NonZeroUsize::MIN)
    }
}

type Co = Coroutine<(), (), (), KStack>;

/// A kernel thread's slot in the thread table.
pub struct Thread {
    tid: u32,
    name: UnsafeCell<&'static str>,
    cpu: AtomicUsize,
    state: AtomicU8,
    wchan: AtomicUsize,
    /// Run-queue or sleep-queue link (a thread is on at most one).
    link: AtomicU32,
    saved_ipl: AtomicU8,
    saved_no_ast: AtomicU32,
    pub(crate) in_upcall: AtomicBool,
    interrupted: AtomicBool,
    exit_gen: AtomicU32,
    stack_lo: AtomicUsize,
    stack_hi: AtomicUsize,
    co: UnsafeCell<Option<Co>>,
    yielder: AtomicPtr<Yielder<(), ()>>,
}

// SAFETY: `name` is written only while the slot is EMBRYO (owned by its
// creator) and read afterwards; `co` is written by the creator before the
// thread is published on a run queue (the run-queue lock orders it), and
// afterwards touched only by the scheduler of the thread's own CPU.
unsafe impl Sync for Thread {}

impl Thread {
    fn new(tid: u32) -> Self {
        Self {
            tid,
            name: UnsafeCell::new(""),
            cpu: AtomicUsize::new(0),
            state: AtomicU8::new(FREE),
            wchan: AtomicUsize::new(0),
            link: AtomicU32::new(NIL),
            saved_ipl: AtomicU8::new(0),
            saved_no_ast: AtomicU32::new(0),
            in_upcall: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
            exit_gen: AtomicU32::new(0),
            stack_lo: AtomicUsize::new(0),
            stack_hi: AtomicUsize::new(0),
            co: UnsafeCell::new(None),
            yielder: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// Thread id (its slot).
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        // SAFETY: see `unsafe impl Sync for Thread`.
        unsafe { *self.name.get() }
    }
}

/// A CPU's run queue: a FIFO linked through the threads (no allocation, so
/// interrupt handlers may make threads runnable).
pub struct RunQueue {
    head: u32,
    tail: u32,
}

impl RunQueue {
    pub(crate) const fn new() -> Self {
        Self {
            head: NIL,
            tail: NIL,
        }
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

    fn get(&self, tid: u32) -> &Thread {
        &self.slots[tid as usize]
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

    /// Threads still alive (not FREE): (tid, name, cpu, state).
    pub(crate) fn live(&self) -> impl Iterator<Item = (&Thread, u8)> {
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
    // SAFETY: the slot is EMBRYO: we own it until it is published.
    unsafe { *t.name.get() = name };
    t.cpu.store(cpu, Relaxed);
    t.saved_ipl.store(0, Relaxed);
    t.saved_no_ast.store(0, Relaxed);
    t.in_upcall.store(false, Relaxed);
    t.interrupted.store(false, Relaxed);
    t.stack_lo.store(stack.limit, Relaxed);
    t.stack_hi.store(stack.base, Relaxed);
    let tid = t.tid;
    let co = Coroutine::with_stack(KStack(stack), move |y: &Yielder<(), ()>, ()| {
        thread_main(tid, y, f)
    });
    // SAFETY: as above; `setrunqueue` publishes it under the run-queue lock.
    unsafe { *t.co.get() = Some(co) };
    let generation = t.exit_gen.load(Acquire);
    k.cpu(cpu).nthreads.fetch_add(1, SeqCst);
    setrunqueue(k, t);
    Ok(KThread { tid, generation })
}

fn thread_main(tid: u32, y: &Yielder<(), ()>, f: impl FnOnce(&ThreadCtx)) {
    let k = kernel();
    let t = k.threads.get(tid);
    t.yielder
        .store(y as *const Yielder<(), ()> as *mut Yielder<(), ()>, Release);
    let cpu = curcpu();
    switched_in(cpu);
    f(&ThreadCtx::new());
    assert!(
        cpu.mtx_count.load(Relaxed) == 0,
        "kernel thread {} exited holding a spin mutex",
        t.name()
    );
    if cpu.line.ipl() != 0 {
        crate::spl::splx_cpu(cpu, 0);
    }
    compiler_fence(SeqCst);
    cpu.in_kthread.store(false, Relaxed);
    compiler_fence(SeqCst);
}

/// The current thread of `cpu` (thread context).
pub(crate) fn curthread(cpu: &Cpu) -> &'static Thread {
    let p = cpu.curthread.load(Relaxed);
    // SAFETY: non-null `curthread` points into the thread table of the
    // booted kernel.
    match unsafe { p.as_ref() } {
        Some(t) => t,
        None => panic!("no current kernel thread on cpu{}", cpu.index()),
    }
}

/// The current thread's id, if a kernel thread is running.
pub fn current_tid() -> Option<u32> {
    let cpu = curcpu_opt()?;
    if !cpu.in_kthread.load(Relaxed) {
        return None;
    }
    // SAFETY: as in `curthread`.
    unsafe { cpu.curthread.load(Relaxed).as_ref() }.map(|t| t.tid)
}

/// Back in thread code after a switch (or at the first run).
fn switched_in(cpu: &Cpu) {
    compiler_fence(SeqCst);
    cpu.in_kthread.store(true, Relaxed);
    compiler_fence(SeqCst);
    crate::ast::safepoint(cpu);
}

/// Switch from the current thread to the scheduler. The caller has put the
/// thread where it belongs (run queue, sleep queue) or lets it exit.
fn mi_switch(cpu: &Cpu, t: &Thread) {
    assert!(
        cpu.mtx_count.load(Relaxed) == 0,
        "{}: switching while holding a spin mutex",
        t.name()
    );
    t.saved_ipl.store(cpu.line.ipl(), Relaxed);
    compiler_fence(SeqCst);
    cpu.in_kthread.store(false, Relaxed);
    compiler_fence(SeqCst);
    t.saved_no_ast.store(cpu.no_ast.swap(0, Relaxed), Relaxed);
    let y = t.yielder.load(Acquire);
    // SAFETY: `y` was stored by `thread_main` from the yielder of this very
    // coroutine, which lives as long as the coroutine runs, and we are
    // running on that coroutine's stack.
    unsafe { (*y).suspend(()) };
    switched_in(cpu);
}

/// Make `t` runnable on its CPU and make that CPU notice.
fn setrunqueue(k: &Kernel, t: &Thread) {
    let cpu = k.cpu(t.cpu.load(Relaxed));
    t.state.store(RUNNABLE, Release);
    {
        let mut q = cpu.runq.lock();
        t.link.store(NIL, Relaxed);
        if q.tail == NIL {
            q.head = t.tid;
        } else {
            k.threads.get(q.tail).link.store(t.tid, Relaxed);
        }
        q.tail = t.tid;
        cpu.runq_len.fetch_add(1, SeqCst);
    }
    if let Post::Kick(kick) = cpu.line.notify(Ipl::None) {
        if kick == Kick::Wake {
            cpu.stats.kicks_wake.fetch_add(1, Relaxed);
        }
        k.md().kick(cpu.index(), kick);
    }
}

fn runq_pop(k: &Kernel, cpu: &Cpu) -> Option<&'static Thread> {
    if cpu.runq_len.load(SeqCst) == 0 {
        return None;
    }
    let mut q = cpu.runq.lock();
    if q.head == NIL {
        return None;
    }
    let t = k.threads.get(q.head);
    q.head = t.link.load(Relaxed);
    if q.head == NIL {
        q.tail = NIL;
    }
    cpu.runq_len.fetch_sub(1, SeqCst);
    // SAFETY: the thread table lives as long as the kernel, which outlives
    // every CPU loop; `kernel()` hands out `&'static`.
    Some(unsafe { &*(t as *const Thread) })
}

fn sleep_common(cpu: &Cpu, chan: WChan, release: impl FnOnce()) -> Result<(), Interrupted> {
    let k = kernel();
    let t = curthread(cpu);
    assert!(cpu.intr_depth() == 0, "tsleep from interrupt context");
    assert!(
        cpu.in_kthread.load(Relaxed) && !cpu.in_softint_thread.load(Relaxed),
        "tsleep outside a kernel thread"
    );
    // Deliver pending ASTs before sleeping, then none until switched out:
    // an AST that slept here would queue the thread twice.
    crate::ast::safepoint(cpu);
    cpu.no_ast.fetch_add(1, Relaxed);
    let b = bucket(k, chan);
    let mut q = b.lock();
    if k.is_shutting_down() {
        drop(q);
        release();
        cpu.no_ast.fetch_sub(1, Relaxed);
        return Err(Interrupted);
    }
    t.wchan.store(chan, Relaxed);
    t.state.store(SLEEPING, Release);
    t.link.store(*q, Relaxed);
    *q = t.tid;
    release();
    drop(q);
    mi_switch(cpu, t);
    cpu.no_ast.fetch_sub(1, Relaxed);
    crate::ast::safepoint(cpu);
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
    let k = kernel();
    let b = bucket(k, chan);
    let mut q = b.lock();
    let mut prev = NIL;
    let mut cur = *q;
    let mut n = 0;
    while cur != NIL {
        let t = k.threads.get(cur);
        let next = t.link.load(Relaxed);
        if t.wchan.load(Relaxed) == chan {
            if prev == NIL {
                *q = next;
            } else {
                k.threads.get(prev).link.store(next, Relaxed);
            }
            t.wchan.store(0, Relaxed);
            setrunqueue(k, t);
            n += 1;
            if !all {
                break;
            }
        } else {
            prev = cur;
        }
        cur = next;
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

/// Shutdown: wake every sleeper with `Err(Interrupted)`. The caller has
/// set the shutdown flag first; `sleep_common` tests it under the bucket
/// lock, so no thread can go to sleep after its bucket was emptied here.
pub(crate) fn interrupt_all(k: &Kernel) {
    for i in 0..SLEEPQ_BUCKETS {
        wake_bucket(k, i);
    }
}

fn wake_bucket(k: &Kernel, i: usize) {
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

/// Let the other runnable threads of this CPU run. Thread context.
pub fn yield_now(_ctx: &ThreadCtx) {
    let cpu = curcpu();
    let k = kernel();
    let t = curthread(cpu);
    crate::ast::safepoint(cpu);
    if cpu.runq_len.load(SeqCst) == 0 {
        return;
    }
    cpu.no_ast.fetch_add(1, Relaxed);
    setrunqueue(k, t);
    mi_switch(cpu, t);
    cpu.no_ast.fetch_sub(1, Relaxed);
    crate::ast::safepoint(cpu);
}

/// The scheduler of the calling CPU: runs threads until shutdown, idling
/// in between. Called by the machine on each CPU's host thread; returns
/// when the kernel shuts down and this CPU's last thread has exited.
pub fn cpu_run() {
    let k = kernel();
    let cpu = curcpu();
    loop {
        if let Some(t) = runq_pop(k, cpu) {
            switch_to(k, cpu, t);
            continue;
        }
        if k.is_shutting_down() && cpu.nthreads.load(SeqCst) == 0 {
            break;
        }
        idle(k, cpu);
    }
}

fn switch_to(k: &Kernel, cpu: &Cpu, t: &'static Thread) {
    cpu.curthread
        .store(t as *const Thread as *mut Thread, Relaxed);
    cpu.stack_lo.store(t.stack_lo.load(Relaxed), Relaxed);
    cpu.stack_hi.store(t.stack_hi.load(Relaxed), Relaxed);
    cpu.no_ast.store(t.saved_no_ast.load(Relaxed), Relaxed);
    t.state.store(ONPROC, Release);
    let lvl = t.saved_ipl.load(Relaxed);
    if lvl != 0 {
        crate::spl::splraise_cpu(cpu, lvl);
    }
    cpu.stats.switches.fetch_add(1, Relaxed);
    compiler_fence(SeqCst);
    // SAFETY: only this CPU's scheduler touches a published thread's
    // coroutine (see `unsafe impl Sync for Thread`).
    let co = unsafe { &mut *t.co.get() };
    let r = match co.as_mut() {
        Some(co) => co.resume(()),
        None => panic!("thread {} runnable without a coroutine", t.name()),
    };
    compiler_fence(SeqCst);
    cpu.curthread.store(core::ptr::null_mut(), Relaxed);
    cpu.stack_lo.store(0, Relaxed);
    cpu.stack_hi.store(0, Relaxed);
    cpu.no_ast.store(0, Relaxed);
    // The scheduler runs at IPL none: what the thread deferred runs now.
    crate::spl::splx_cpu(cpu, 0);
    if let CoroutineResult::Return(()) = r {
        reap(k, cpu, t, co);
    }
}

fn reap(k: &Kernel, cpu: &Cpu, t: &Thread, co: &mut Option<Co>) {
    if let Some(co) = co.take() {
        let stack = co.into_stack();
        k.threads.stacks.lock().push(stack.0);
    }
    {
        let _g = k.threads.join_lock.lock();
        t.exit_gen.fetch_add(1, Release);
    }
    t.state.store(FREE, Release);
    cpu.nthreads.fetch_sub(1, SeqCst);
    wakeup(wchan(&t.exit_gen));
    k.md().host_wake(&t.exit_gen);
}

fn idle(k: &Kernel, cpu: &Cpu) {
    let md = k.md();
    let poll = k.config().idle_poll_ns;
    let work = unmasked(0) & !AST_BIT;
    cpu.line.idle_poll();
    let mut until = md.nanotime() + poll;
    let mut handed_asts = false;
    loop {
        if cpu.line.pending() & work != 0 {
            crate::intr::dispatch(cpu, 0, crate::intr::Origin::Idle);
        }
        if cpu.runq_len.load(SeqCst) != 0 || k.is_shutting_down() {
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
                if cpu.line.pending() & work != 0
                    || cpu.runq_len.load(SeqCst) != 0
                    || k.is_shutting_down()
                {
                    cpu.line.idle_poll();
                    continue;
                }
                cpu.stats.idle_sleeps.fetch_add(1, Relaxed);
                md.idle_wait(cpu.index(), cpu.line.state_word(), SLEEP);
                cpu.line.idle_poll();
            }
            until = md.nanotime() + poll;
        }
        core::hint::spin_loop();
    }
    cpu.line.idle_end();
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
            _ => "?",
        };
        f(t.tid, t.name(), t.cpu.load(Relaxed), state);
    }
}
