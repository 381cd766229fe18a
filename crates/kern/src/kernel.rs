//! The kernel: configuration, boot and shutdown.
//!
//! The machine calls [`boot`] once (host context), starts one host thread
//! per CPU that calls [`crate::sched::cpu_run`], and later calls
//! [`shutdown`], waits for the CPU threads to return, and calls
//! [`teardown`]. One kernel exists at a time per process.
//!
//! # Who owns what per boot
//! The [`Kernel`] owns every piece of state that lives for one boot, layer
//! by layer: the core's CPUs, vectors, softints, ASTs, threads, kmem and
//! callouts; the DMA layer's [`Domain`] (the window, its pool, every tag and
//! the busdma softint); the block layer's buffer pool and device table
//! (`bio`). Drivers keep no table of their own: a unit reaches what it needs
//! through handles it got at attach (its tag, its callout, its completer).
//! State set after boot is kept in the cells of [`crate::once`], so
//! `teardown` (or `abandon`) ends it all by construction and the next boot
//! starts from nothing; no module static holds per-boot state.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering::Acquire, Ordering::SeqCst};

use crate::ast::Asts;
use crate::bio::BioState;
use crate::bus_dma::Domain;
use crate::callout::Callouts;
use crate::cpu::{Cpu, MAXCPU};
use crate::intr::Vectors;
use crate::kmem::Kmem;
use crate::md::Md;
use crate::once::Once;
use crate::sched::Threads;
use crate::softint::Softints;
use crate::vm::PhysMem;

/// Which spl implementation the CPUs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplImpl {
    /// A per-CPU IPL word; blocked interrupts are deferred and replayed.
    Lazy,
    /// The host signal mask.
    Mask,
}

impl SplImpl {
    /// Its name (`lazy`, `mask`).
    pub fn name(self) -> &'static str {
        match self {
            SplImpl::Lazy => "lazy",
            SplImpl::Mask => "mask",
        }
    }
}

/// Boot-time configuration of the kernel core.
#[derive(Clone, Debug)]
pub struct KernelConfig {
    /// Number of CPUs (1..=64).
    pub ncpu: usize,
    /// The spl implementation.
    pub spl: SplImpl,
    /// Size of the thread table.
    pub max_threads: usize,
    /// Usable bytes of each kernel-thread stack.
    pub stack_size: usize,
    /// Time budget of one soft-interrupt pass.
    pub softint_budget_ns: u64,
    /// Round budget of one soft-interrupt pass.
    pub softint_max_restarts: u32,
    /// How long an idle CPU polls before it sleeps.
    pub idle_poll_ns: u64,
    /// Size of the kmem arena.
    pub kmem_bytes: usize,
    /// The host allocator is not an AST safe point (`kern::malloc`). Only
    /// the test that shows the hazard turns this off.
    pub malloc_no_ast: bool,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            ncpu: 1,
            spl: SplImpl::Lazy,
            max_threads: 512,
            stack_size: 256 * 1024,
            softint_budget_ns: 2_000_000,
            softint_max_restarts: 10,
            idle_poll_ns: 50_000,
            kmem_bytes: 4 * 1024 * 1024,
            malloc_no_ast: true,
        }
    }
}

/// Errors of [`boot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootError {
    /// A kernel is already running in this process.
    AlreadyBooted,
    /// The CPU count is out of range.
    BadCpuCount {
        /// The count asked for.
        ncpu: usize,
    },
    /// A per-CPU daemon could not be created.
    Daemon(crate::sched::SchedError),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::AlreadyBooted => write!(f, "a kernel is already booted in this process"),
            BootError::BadCpuCount { ncpu } => {
                write!(f, "cannot boot with {ncpu} CPUs (1..={MAXCPU})")
            }
            BootError::Daemon(e) => write!(f, "creating the softint daemons: {e}"),
        }
    }
}

/// The kernel.
pub struct Kernel {
    cfg: KernelConfig,
    md: &'static dyn Md,
    cpus: Box<[Cpu]>,
    pub(crate) vectors: Vectors,
    pub(crate) softints: Softints,
    pub(crate) asts: Asts,
    pub(crate) threads: Threads,
    /// The kernel malloc.
    pub kmem: Kmem,
    physmem: PhysMem,
    dma: Domain,
    pub(crate) callouts: Callouts,
    pub(crate) bio: BioState,
    /// The race pseudo-driver, once attached (`dvma race`).
    pub(crate) race: Once<&'static crate::race::RaceState>,
    /// Set once by `boot`, once the kernel is reachable.
    clock: Once<crate::intr::IntrHandle>,
    shutdown: AtomicBool,
}

static KERNEL: AtomicPtr<Kernel> = AtomicPtr::new(core::ptr::null_mut());

/// The booted kernel. Panics if none is.
#[inline]
pub fn kernel() -> &'static Kernel {
    match try_kernel() {
        Some(k) => k,
        None => panic!("kern: no kernel booted"),
    }
}

/// The booted kernel, if any.
#[inline]
pub fn try_kernel() -> Option<&'static Kernel> {
    // SAFETY: a non-null pointer is a leaked `Box<Kernel>` that `teardown`
    // frees only after every CPU and device has stopped (its contract).
    unsafe { KERNEL.load(Acquire).as_ref() }
}

/// Boot the kernel core. Host context; the CPUs are not running yet.
pub fn boot(md: &'static dyn Md, cfg: KernelConfig) -> Result<&'static Kernel, BootError> {
    if cfg.ncpu == 0 || cfg.ncpu > MAXCPU {
        return Err(BootError::BadCpuCount { ncpu: cfg.ncpu });
    }
    let mask = cfg.spl == SplImpl::Mask;
    let k = Box::into_raw(Box::new(Kernel {
        md,
        cpus: (0..cfg.ncpu)
            .map(|i| Cpu::new(i, mask, cfg.malloc_no_ast))
            .collect(),
        vectors: Vectors::new(),
        softints: Softints::new(),
        asts: Asts::new(),
        threads: Threads::new(cfg.max_threads),
        kmem: Kmem::new(cfg.kmem_bytes, cfg.ncpu),
        physmem: {
            let (kva, size) = md.physmem();
            PhysMem::new(kva, size)
        },
        dma: Domain::new(md.iommu(), cfg.ncpu),
        callouts: Callouts::new(),
        bio: BioState::new(),
        race: Once::new(),
        // Set below, once the kernel is reachable.
        clock: Once::new(),
        shutdown: AtomicBool::new(false),
        cfg,
    }));
    if KERNEL
        .compare_exchange(core::ptr::null_mut(), k, SeqCst, SeqCst)
        .is_err()
    {
        // SAFETY: never published.
        drop(unsafe { Box::from_raw(k) });
        return Err(BootError::AlreadyBooted);
    }
    let clock = crate::callout::clock_attach().expect("clock vector");
    let kr = kernel();
    // The clock vector is a `Once` (set here, read by the machine): no
    // write through the raw pointer after the kernel is published.
    let _ = kr.clock.set(clock); // the only set
    for c in 0..kr.ncpu() {
        let name: &'static str = SOFTINTD_NAMES.get(c).copied().unwrap_or("softintd");
        if let Err(e) = crate::sched::kthread_create(Some(c), name, crate::softint::softintd) {
            KERNEL.store(core::ptr::null_mut(), SeqCst);
            // SAFETY: no CPU runs yet; nothing else holds the pointer.
            drop(unsafe { Box::from_raw(k) });
            return Err(BootError::Daemon(e));
        }
    }
    Ok(kr)
}

const SOFTINTD_NAMES: [&str; 8] = [
    "softintd/0",
    "softintd/1",
    "softintd/2",
    "softintd/3",
    "softintd/4",
    "softintd/5",
    "softintd/6",
    "softintd/7",
];

/// Begin shutdown: no new threads, every sleeper wakes with
/// `Err(Interrupted)`, and each CPU leaves `cpu_run` when its last thread
/// has exited. Any context.
pub fn shutdown() {
    let Some(k) = try_kernel() else { return };
    k.shutdown.store(true, SeqCst);
    crate::sched::interrupt_all(k);
    for c in k.cpus.iter() {
        if let crate::pending::Post::Kick(kick) = c.line.notify(crate::ipl::Ipl::None) {
            k.md.kick(c.index(), kick);
        }
    }
}

/// Free the kernel.
///
/// # Safety
/// 1. Every CPU has returned from `cpu_run` and no device thread will post
///    an interrupt any more.
/// 2. No reference obtained from [`kernel`] is used afterwards.
pub unsafe fn teardown() {
    let p = KERNEL.swap(core::ptr::null_mut(), SeqCst);
    if p.is_null() {
        return;
    }
    // SAFETY: `p` came from `Box::into_raw` in `boot`; by the contract no
    // one uses it any more.
    let k = unsafe { Box::from_raw(p) };
    k.threads.free_stacks(&k);
    // The per-boot state (tags, callouts, buffer pool, devices) goes with it.
    drop(k);
}

impl Kernel {
    /// The configuration it was booted with.
    pub fn config(&self) -> &KernelConfig {
        &self.cfg
    }

    /// The machine-dependent layer.
    #[inline]
    pub fn md(&self) -> &'static dyn Md {
        self.md
    }

    /// Number of CPUs.
    pub fn ncpu(&self) -> usize {
        self.cpus.len()
    }

    /// CPU `i`.
    #[inline]
    pub fn cpu(&self, i: usize) -> &Cpu {
        &self.cpus[i]
    }

    /// All CPUs.
    pub fn cpus(&self) -> &[Cpu] {
        &self.cpus
    }

    /// Physical memory.
    pub fn physmem(&self) -> &PhysMem {
        &self.physmem
    }

    /// The IOMMU domain.
    pub fn dma_domain(&self) -> &Domain {
        &self.dma
    }

    /// The clock vector, which the machine posts to CPU 0 every tick.
    pub fn clock_vector(&self) -> crate::intr::IntrHandle {
        match self.clock.get() {
            Some(&h) => h,
            None => panic!("kern: the clock vector is set at boot"),
        }
    }

    /// Has shutdown begun?
    #[inline]
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Acquire)
    }
}

/// Forget the kernel without freeing it (a CPU died with threads still
/// suspended on it: freeing them would unwind through foreign frames).
/// The process may boot a new kernel afterwards.
pub fn abandon() {
    // Its per-boot state is forgotten with it.
    KERNEL.store(core::ptr::null_mut(), SeqCst);
}
