//! # machine: the dvma kernel as a Linux process
//!
//! This crate is the machine-dependent layer: the only crate with
//! host-specific unsafe code. It runs the `kern` core on Linux:
//!
//! | kernel notion | here |
//! |---|---|
//! | CPU | a host thread running `kern::sched::cpu_run` |
//! | kernel thread | a stackful coroutine on it (`kern::sched`) |
//! | device interrupt | a real-time signal, one per hardware IPL (`signals`) |
//! | IPI | `tgkill` of another CPU's thread |
//! | interrupt stack | a `sigaltstack` per CPU, switched on or off at boot |
//! | `hlt` | `epoll_wait` on the CPU's set: a wake-up eventfd and the devices attached to the CPU (module `hlt`, [`dev::Nic`]) |
//! | AST frame push | an edit of the signal's saved context (`arch`) |
//! | `curcpu()` | a thread-local pointer ([`md`]) |
//! | statclock | a CPU-time sampler per vCPU thread (a CPU-clock timer or perf) and a signal no spl blocks ([`statclock`]) |
//!
//! [`Machine::boot`] starts one; [`Machine::shutdown`] stops it. One machine
//! runs at a time in a process (signal handlers are process-wide), and
//! `boot` waits for the previous one to be shut down.
#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

pub(crate) mod arch;
pub mod dev;
pub mod dvma;
pub(crate) mod hlt;
pub mod host;
pub mod md;
pub mod mem;
pub(crate) mod signals;
pub mod statclock;
pub(crate) mod sys;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Acquire, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use arch::{AstSave, XsaveInfo};
/// Devices (NICs) that may report to one CPU's idle wait.
pub use hlt::MAX_DEVS as MAX_CPU_DEVICES;
use kern::ThreadCtx;
pub use kern::kernel::{KernelConfig, SplImpl};
use kern::sched::{KThread, SchedError};

/// The host allocator (glibc malloc), wrapped so that a CPU inside it is
/// never an AST safe point (`kern::malloc`): a signal that lands in malloc
/// leaves its AST pending until malloc returns. Every program that links
/// this crate allocates through it.
#[global_allocator]
static ALLOC: kern::malloc::KernAlloc<std::alloc::System> =
    kern::malloc::KernAlloc::new(std::alloc::System);

/// How to build the machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// The kernel core's configuration (CPUs, spl, ...).
    pub kernel: KernelConfig,
    /// Take interrupts on a per-CPU `sigaltstack` (the "separate interrupt
    /// stack" of the mail) or on whatever stack was running.
    pub intr_stack: bool,
    /// Size of each interrupt stack.
    pub intr_stack_size: usize,
    /// Which AST trampoline (only tests pick `Partial`).
    pub ast_save: AstSave,
    /// RAM (the memfd), bytes.
    pub ram_bytes: u64,
    /// The DVMA window (IOVA space), bytes.
    pub window_bytes: u64,
    /// Clock tick (callouts), nanoseconds.
    pub tick_ns: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            kernel: KernelConfig {
                ncpu: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
                ..KernelConfig::default()
            },
            intr_stack: true,
            intr_stack_size: 256 * 1024,
            ast_save: AstSave::Full,
            ram_bytes: 256 << 20,
            window_bytes: 4 << 30,
            tick_ns: 10_000_000,
        }
    }
}

/// Machine errors.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The kernel core refused to boot.
    #[error("boot: {0}")]
    Boot(kern::kernel::BootError),
    /// Installing the interrupt signal handlers failed.
    #[error("installing interrupt handlers: {0}")]
    Signals(std::io::Error),
    /// A host thread could not be created.
    #[error("starting cpu{cpu}: {source}")]
    Thread {
        /// The CPU.
        cpu: usize,
        /// The error.
        source: std::io::Error,
    },
    /// Creating a kernel thread failed.
    #[error("{0}")]
    Sched(SchedError),
    /// Physical memory or the DVMA window could not be set up.
    #[error("setting up RAM and the DVMA window: {0}")]
    Memory(std::io::Error),
    /// A CPU's idle wait (`epoll` set and eventfd) could not be made.
    #[error("creating a CPU's idle wait: {0}")]
    Hlt(std::io::Error),
    /// A CPU died of a panic (in a kernel thread or the kernel).
    #[error("cpu{cpu} panicked: {message}")]
    CpuPanicked {
        /// The CPU.
        cpu: usize,
        /// The panic message.
        message: String,
    },
    /// Shutdown timed out with threads still alive.
    #[error("shutdown timed out; still alive: {threads:?}")]
    Stuck {
        /// The live threads.
        threads: Vec<String>,
    },
}

static BOOT: Mutex<()> = Mutex::new(());

struct Shared {
    panics: Mutex<Vec<(usize, String)>>,
    failed: AtomicBool,
}

/// The running machine's shared state (for panics caught in kernel threads).
static SHARED: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

/// Record a panic of a kernel thread: the machine is failed from now on.
/// Thread context (it takes a host lock; a kernel thread that panicked is
/// about to exit).
pub(crate) fn record_panic(cpu: usize, msg: String) {
    if let Some(sh) = SHARED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        sh.panics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((cpu, msg));
        sh.failed.store(true, Relaxed);
    }
}

/// A running machine.
pub struct Machine {
    _guard: MutexGuard<'static, ()>,
    md: &'static md::LinuxMd,
    cpus: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    cfg: MachineConfig,
    xsave: XsaveInfo,
    clock: Option<JoinHandle<()>>,
    clock_stop: Arc<AtomicBool>,
    statclock: Arc<statclock::Statclock>,
    down: bool,
}

/// Signals vCPU threads always block, so that process-directed signals go
/// to a host thread.
fn base_mask() -> u64 {
    [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGPIPE,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGCHLD,
        libc::SIGWINCH,
        libc::SIGALRM,
    ]
    .iter()
    .map(|s| sys::sigbit(*s))
    .fold(0, |a, b| a | b)
}

pub(crate) fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_string()
    }
}

fn cpu_main(i: usize, md: &'static md::LinuxMd, altstack: Option<usize>, shared: Arc<Shared>) {
    let k = kern::kernel();
    sys::sigsetmask(md.masks[0]);
    let alt = altstack.and_then(|size| {
        let (addr, len) = mem::map_stack(size)?;
        let ss = libc::stack_t {
            ss_sp: (addr + mem::PAGE) as *mut libc::c_void,
            ss_flags: 0,
            ss_size: len - mem::PAGE,
        };
        // SAFETY: `ss` describes our own fresh mapping (guard page excluded).
        if unsafe { libc::sigaltstack(&ss, core::ptr::null_mut()) } != 0 {
            // SAFETY: our own mapping, unused.
            unsafe { mem::unmap(addr, len) };
            return None;
        }
        Some((addr, len))
    });
    md::set_curcpu(k.cpu(i));
    md.tids[i].store(sys::gettid(), Relaxed);
    let r = std::panic::catch_unwind(kern::sched::cpu_run);
    md.tids[i].store(0, Relaxed);
    // No interrupt may arrive on this thread any more.
    sys::sigsetmask(md.masks[0] | signals::all_set() | sys::sigbit(signals::statclock_sig()));
    md::set_curcpu(core::ptr::null());
    if let Some((addr, len)) = alt {
        let ss = libc::stack_t {
            ss_sp: core::ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        // SAFETY: disabling our own alternate stack, then unmapping it;
        // interrupt signals are blocked, so nothing runs on it.
        unsafe {
            libc::sigaltstack(&ss, core::ptr::null_mut());
            mem::unmap(addr, len);
        }
    }
    if let Err(e) = r {
        let msg = panic_message(&*e);
        shared
            .panics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((i, msg));
        shared.failed.store(true, Relaxed);
        kern::kernel::shutdown();
    }
}

impl Machine {
    /// Boot a machine: the kernel core, its CPUs and their idle loops.
    /// Waits while another machine of this process is running.
    pub fn boot(cfg: MachineConfig) -> Result<Self, MachineError> {
        let guard = BOOT.lock().unwrap_or_else(PoisonError::into_inner);
        let ncpu = cfg.kernel.ncpu;
        let xsave = arch::init_trampoline(cfg.ast_save);
        let ram = dvma::Ram::new(cfg.ram_bytes).map_err(MachineError::Memory)?;
        let window = match dvma::Window::new(&ram, cfg.window_bytes) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: nothing uses the fresh RAM yet.
                unsafe { ram.release() };
                return Err(MachineError::Memory(e));
            }
        };
        let hlt: Result<Vec<hlt::Hlt>, _> = (0..ncpu.max(1)).map(|_| hlt::Hlt::new()).collect();
        let hlt = match hlt {
            Ok(h) => h.into_boxed_slice(),
            Err(e) => {
                // SAFETY: nothing uses the fresh RAM and window yet.
                unsafe {
                    window.release();
                    ram.release();
                }
                return Err(MachineError::Hlt(e));
            }
        };
        let md: &'static md::LinuxMd = Box::leak(Box::new(md::LinuxMd::new(
            ncpu.max(1),
            base_mask(),
            ram,
            window,
            hlt,
        )));
        signals::install(cfg.kernel.spl == SplImpl::Mask, cfg.intr_stack)
            .map_err(MachineError::Signals)?;
        kern::kernel::boot(md, cfg.kernel.clone()).map_err(MachineError::Boot)?;
        let shared = Arc::new(Shared {
            panics: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
        });
        *SHARED.lock().unwrap_or_else(PoisonError::into_inner) = Some(shared.clone());
        let mut cpus = Vec::with_capacity(ncpu);
        for i in 0..ncpu {
            let sh = shared.clone();
            let alt = cfg.intr_stack.then_some(cfg.intr_stack_size);
            let h = std::thread::Builder::new()
                .name(format!("cpu{i}"))
                .stack_size(2 << 20)
                .spawn(move || cpu_main(i, md, alt, sh));
            match h {
                Ok(h) => cpus.push(h),
                Err(source) => {
                    kern::kernel::shutdown();
                    for h in cpus {
                        let _ = h.join();
                    }
                    // SAFETY: every CPU thread has returned; no device exists.
                    unsafe { kern::kernel::teardown() };
                    return Err(MachineError::Thread { cpu: i, source });
                }
            }
        }
        while md.tids.iter().any(|t| t.load(Relaxed) == 0) {
            std::thread::yield_now();
        }
        let statclock = Arc::new(statclock::Statclock::new(
            md.tids.iter().map(|t| t.load(Relaxed)).collect(),
        ));
        // The clock: a device that interrupts CPU 0 every tick.
        let clock_stop = Arc::new(AtomicBool::new(false));
        let cs = clock_stop.clone();
        let tick = Duration::from_nanos(cfg.tick_ns.max(100_000));
        let vector = kern::kernel().clock_vector();
        let clock = std::thread::Builder::new()
            .name("clock".into())
            .spawn(move || {
                while !cs.load(Relaxed) {
                    std::thread::sleep(tick);
                    kern::intr::intr_post(0, vector);
                }
            })
            .ok();
        Ok(Self {
            _guard: guard,
            md,
            cpus,
            shared,
            cfg,
            xsave,
            clock,
            clock_stop,
            statclock,
            down: false,
        })
    }

    /// Number of CPUs.
    pub fn ncpu(&self) -> usize {
        self.cfg.kernel.ncpu
    }

    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.cfg
    }

    /// What the CPU's extended state looks like (for the AST trampoline).
    pub fn xsave(&self) -> XsaveInfo {
        self.xsave
    }

    /// The DVMA window (devices use it to reach memory).
    pub fn window(&self) -> &'static dvma::Window {
        &self.md.window
    }

    /// Signals that could not be delivered (tgkill failures).
    pub fn kicks_failed(&self) -> u32 {
        self.md.kicks_failed.load(Relaxed)
    }

    /// The host thread ids of the vCPU threads, by CPU (for reading their
    /// CPU time from the host: `/proc` or the thread CPU clocks). Any
    /// thread.
    pub fn cpu_tids(&self) -> Vec<i32> {
        self.md.tids.iter().map(|t| t.load(Relaxed)).collect()
    }

    /// The CPU time of each vCPU thread so far, ns, by CPU
    /// ([`thread_cpu_ns`] of [`Machine::cpu_tids`]). Any thread.
    pub fn cpu_times_ns(&self) -> Vec<u64> {
        self.cpu_tids().into_iter().map(thread_cpu_ns).collect()
    }

    /// The statclock: a CPU-time profiling timer per vCPU, off until
    /// started ([`statclock::Statclock::start`]). The handle may be used
    /// from any thread, kernel threads included; the machine stops it at
    /// shutdown.
    pub fn statclock(&self) -> Arc<statclock::Statclock> {
        self.statclock.clone()
    }

    /// Nanoseconds on the machine's clock.
    pub fn nanotime(&self) -> u64 {
        self.md.clock.now()
    }

    /// Start a kernel thread.
    pub fn spawn(
        &self,
        cpu: Option<usize>,
        name: &'static str,
        f: impl FnOnce(&ThreadCtx) + Send + 'static,
    ) -> Result<KThread, MachineError> {
        kern::sched::kthread_create(cpu, name, f).map_err(MachineError::Sched)
    }

    /// Wait (host thread) for a kernel thread to exit.
    pub fn wait(&self, t: &KThread) -> Result<(), MachineError> {
        let (w, g) = t.exit_word();
        while w.load(Acquire) == g {
            self.check()?;
            sys::futex_wait_timeout(w, g, 50_000_000);
        }
        Ok(())
    }

    /// Run `f` in a kernel thread on CPU `cpu` and return its result.
    pub fn run<R: Send + 'static>(
        &self,
        cpu: usize,
        name: &'static str,
        f: impl FnOnce(&ThreadCtx) -> R + Send + 'static,
    ) -> Result<R, MachineError> {
        let slot = Arc::new(Mutex::new(None));
        let s2 = slot.clone();
        let t = self.spawn(Some(cpu), name, move |ctx| {
            let r = f(ctx);
            *s2.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        })?;
        self.wait(&t)?;
        let r = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        match r {
            Some(r) => Ok(r),
            None => {
                self.check()?;
                Err(MachineError::CpuPanicked {
                    cpu,
                    message: format!("{name} exited without a result"),
                })
            }
        }
    }

    /// Fail if a CPU has died.
    pub fn check(&self) -> Result<(), MachineError> {
        if self.shared.failed.load(Relaxed) {
            let p = self
                .shared
                .panics
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((cpu, message)) = p.first() {
                return Err(MachineError::CpuPanicked {
                    cpu: *cpu,
                    message: message.clone(),
                });
            }
        }
        Ok(())
    }

    /// The kernel's counters now.
    pub fn stats(&self) -> kern::stats::Snapshot {
        kern::stats::snapshot()
    }

    /// Stop the machine: wake every sleeper, wait for the threads to exit
    /// and the CPUs to stop, and return the final counters.
    pub fn shutdown(mut self) -> Result<kern::stats::Snapshot, MachineError> {
        self.stop()
    }

    /// [`Machine::shutdown`] for a machine held inside another structure;
    /// idempotent (a second call returns empty counters).
    pub fn shutdown_ref(&mut self) -> Result<kern::stats::Snapshot, MachineError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<kern::stats::Snapshot, MachineError> {
        if self.down {
            return Ok(kern::stats::Snapshot::default());
        }
        self.down = true;
        self.statclock.stop();
        self.clock_stop.store(true, Relaxed);
        if let Some(c) = self.clock.take() {
            let _ = c.join();
        }
        kern::kernel::shutdown();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cpus.iter().any(|h| !h.is_finished()) {
            if Instant::now() > deadline {
                let mut threads = Vec::new();
                kern::sched::live_threads(|tid, name, cpu, state| {
                    threads.push(format!("{tid} {name} cpu{cpu} {state}"))
                });
                return Err(MachineError::Stuck { threads });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for h in self.cpus.drain(..) {
            let _ = h.join();
        }
        let snap = kern::stats::snapshot();
        *SHARED.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if let Err(e) = self.check() {
            // Threads of a dead CPU may still be suspended: leak the kernel.
            kern::kernel::abandon();
            return Err(e);
        }
        // SAFETY: every CPU thread has returned from `cpu_run`, the clock is
        // stopped; devices are the caller's and must be stopped before
        // shutdown (documented).
        unsafe { kern::kernel::teardown() };
        // SAFETY: the kernel is gone; nothing maps RAM or the window now.
        unsafe {
            self.md.window.release();
            self.md.ram.release();
        }
        for h in &self.md.hlt {
            // SAFETY: every CPU thread has returned; devices attached to a
            // CPU are stopped before shutdown (documented).
            unsafe { h.release() };
        }
        Ok(snap)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.stop();
        }
    }
}

/// The CPU time of host thread `tid` of this process so far, ns (its
/// thread CPU clock, `clock_gettime`); 0 if there is no such thread. Any
/// thread, any context (a vDSO-less system call; `errno` is set only on
/// failure).
pub fn thread_cpu_ns(tid: i32) -> u64 {
    if tid <= 0 {
        return 0;
    }
    // Linux's per-thread CPU clock id: MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED).
    let clk: libc::clockid_t = ((!tid) << 3) | 6;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; an invalid clock id is an error return.
    if unsafe { libc::clock_gettime(clk, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A counter a test device can wait on (futex) — used by devices and tests.
pub fn futex_wait(word: &AtomicU32, expect: u32, timeout: Duration) {
    sys::futex_wait_timeout(word, expect, timeout.as_nanos() as u64);
}
