//! statclock: where each CPU's time goes, sampled as BSD's `statclock`
//! samples `cp_time`.
//!
//! Each CPU has a "current part" word ([`Part`]): the kernel's hot paths
//! store their part into it on the way in and restore the previous one on
//! the way out ([`enter`] returns a guard; the crate's own paths use
//! `enter_cpu`/`leave_cpu`), so parts nest (a `bus_dma` load inside
//! the driver, the driver inside an interrupt, the interrupt inside an
//! `splx`). A sampler interrupt ([`statclock`], driven by the machine's
//! profiling timer, which is not a kernel interrupt) reads the word of the
//! CPU it interrupted and counts one sample for that part. Over a window,
//! a part's share of the samples is its share of the CPU's time; times the
//! CPU ns per I/O that gives the part's ns per I/O ([`split`]).
//!
//! # Cost
//! A marker is one relaxed load of the previous part and two relaxed
//! stores of a byte in the [`Cpu`], which the marked paths already reach
//! (`spl` and the dispatch loop hold the `Cpu`; the others add one
//! `curcpu()`, a thread-pointer-relative load); no atomic
//! read-modify-write and no test of whether sampling is on: the markers
//! always run, and only the machine's sampler is switched on and off.
//! Compiler fences (`atomic_signal_fence`) keep each store where it is
//! written relative to the work it marks, and cost no instruction.
//!
//! # Contexts
//! * [`enter`], `enter_cpu`, `leave_cpu`: any context on a CPU (thread
//!   code, interrupt handlers, the idle loop); on a host thread that is
//!   not a CPU, [`enter`] does nothing. A guard must be dropped on the CPU
//!   and in the context that made it (it is not `Send`), in LIFO order,
//!   which Rust's scopes give. A kernel thread switch happens inside the
//!   `Dispatch` part, so each context finds its own part again when it
//!   resumes.
//! * [`statclock`]: interrupt context of the sampled CPU itself (a signal
//!   handler on its thread), at any IPL, including inside the kernel's own
//!   interrupt handlers. It allocates nothing, takes no lock, prints
//!   nothing and changes nothing but the CPU's own sample counters (one
//!   non-locked increment: [`crate::percpu::CpuLocal`]); it must not run
//!   interrupts, soft interrupts or ASTs.
//! * [`samples`]: any thread, any time (relaxed loads: a running CPU's
//!   counters are read approximately, as every statistic is).

use core::marker::PhantomData;
use core::sync::atomic::{Ordering, compiler_fence};

use crate::cpu::{Cpu, curcpu_opt};

/// Where a CPU's time goes. The parts of issue 14's split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Part {
    /// None of the others: boot, the machine's own host code on the CPU's
    /// thread before or after the kernel runs.
    Other = 0,
    /// Kernel thread code not in another part: the load generator (its
    /// thread and its `iodone` callbacks), blksrv, any thread body.
    Thread = 1,
    /// `splraise`/`splx` themselves (with `mask` spl: the host's
    /// `sigprocmask`); not the time spent at a raised level.
    Spl = 2,
    /// `bus_dma`: `dmamap_load`, `dmamap_unload` and the bounce copy of
    /// `dmamap_sync` (the IOMMU map and unmap included).
    BusDma = 3,
    /// Interrupt entry and exit: the machine's signal entry stub,
    /// `intr::trap` and the hardware-vector dispatch loop (not the
    /// handlers' bodies).
    IntrEntry = 4,
    /// Dispatching deferred work: soft interrupt passes, thread wake-ups,
    /// sleeps and switches (the scheduler), AST pushes, upcalls and safe
    /// points.
    Dispatch = 5,
    /// Drivers and the block layer: sd's strategy, start and completion
    /// work (reaping, finishing), `biodone`.
    Driver = 6,
    /// The device's own work done on the CPU: a doorbell (the zero-latency
    /// RAM disk copies each command's data there).
    Device = 7,
    /// The idle loop (polling and sleeping; a sleeping CPU uses no CPU
    /// time and takes no sample).
    Idle = 8,
}

impl Part {
    /// How many parts.
    pub const COUNT: usize = 9;
    /// Every part, in id order.
    pub const ALL: [Part; Part::COUNT] = [
        Part::Other,
        Part::Thread,
        Part::Spl,
        Part::BusDma,
        Part::IntrEntry,
        Part::Dispatch,
        Part::Driver,
        Part::Device,
        Part::Idle,
    ];

    /// Its name in reports (`bus_dma`, `intr_entry`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Part::Other => "other",
            Part::Thread => "thread",
            Part::Spl => "spl",
            Part::BusDma => "bus_dma",
            Part::IntrEntry => "intr_entry",
            Part::Dispatch => "dispatch",
            Part::Driver => "driver",
            Part::Device => "device",
            Part::Idle => "idle",
        }
    }

    /// The part of id `v` (`Other` for an unknown id).
    pub const fn from_u8(v: u8) -> Part {
        if (v as usize) < Part::COUNT {
            Part::ALL[v as usize]
        } else {
            Part::Other
        }
    }
}

impl core::fmt::Display for Part {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Enter `part` on `cpu`; returns the previous part for [`leave_cpu`].
/// Owning CPU only, any context.
#[inline(always)]
pub(crate) fn enter_cpu(cpu: &Cpu, part: Part) -> u8 {
    let prev = cpu.part.load(Ordering::Relaxed);
    cpu.part.store(part as u8, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
    prev
}

/// Leave a part entered by [`enter_cpu`]: restore `prev`. Owning CPU only.
#[inline(always)]
pub(crate) fn leave_cpu(cpu: &Cpu, prev: u8) {
    compiler_fence(Ordering::SeqCst);
    cpu.part.store(prev, Ordering::Relaxed);
}

/// Set `cpu`'s part without saving the previous one: the start of a
/// context that has no previous part of its own (a new kernel thread, the
/// idle loop). Owning CPU only.
#[inline(always)]
pub(crate) fn set_cpu(cpu: &Cpu, part: Part) {
    compiler_fence(Ordering::SeqCst);
    cpu.part.store(part as u8, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
}

/// A part entered: dropping it restores the previous part.
#[must_use = "dropping the guard leaves the part at once"]
pub struct PartGuard {
    cpu: Option<&'static Cpu>,
    prev: u8,
    _not_send: PhantomData<*const ()>,
}

impl Drop for PartGuard {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(cpu) = self.cpu {
            leave_cpu(cpu, self.prev);
        }
    }
}

/// Enter `part` on the current CPU until the guard is dropped (nothing on a
/// host thread that is not a CPU). Any context on a CPU.
#[inline(always)]
pub fn enter(part: Part) -> PartGuard {
    let cpu = curcpu_opt();
    let prev = match cpu {
        Some(c) => enter_cpu(c, part),
        None => 0,
    };
    PartGuard {
        cpu,
        prev,
        _not_send: PhantomData,
    }
}

/// The part the current CPU is in (`Other` on a host thread).
pub fn current() -> Part {
    curcpu_opt().map_or(Part::Other, |c| {
        Part::from_u8(c.part.load(Ordering::Relaxed))
    })
}

/// One statclock tick on the current CPU: count a sample for the part the
/// interrupted code is in, or for `at` when the machine knows better: it
/// interrupted the machine's own code outside every marker (its interrupt
/// entry and exit stubs are [`Part::IntrEntry`], its AST trampoline
/// [`Part::Dispatch`]).
///
/// Interrupt context of the sampled CPU only (see the module docs): it
/// allocates nothing, takes no lock and runs nothing else. On a host thread
/// that is not a CPU it does nothing.
#[inline]
pub fn statclock(at: Option<Part>) {
    let Some(cpu) = curcpu_opt() else { return };
    let part = match at {
        Some(p) => p as u8,
        None => cpu.part.load(Ordering::Relaxed),
    };
    cpu.stats.parts[(part as usize).min(Part::COUNT - 1)].inc();
}

/// CPU `cpu`'s samples so far, by part id (monotonic: a window's samples
/// are the difference of two readings). Any thread.
pub fn samples(cpu: usize) -> [u64; Part::COUNT] {
    let Some(k) = crate::kernel::try_kernel() else {
        return [0; Part::COUNT];
    };
    if cpu >= k.ncpu() {
        return [0; Part::COUNT];
    }
    let c = k.cpu(cpu);
    core::array::from_fn(|i| c.stats.parts[i].get())
}

/// Split `total` (say the CPU ns per I/O of a window) by the window's
/// samples per part: each part gets `total × its samples / all samples`.
/// All zeros when there is no sample. Pure arithmetic.
pub fn split(total: f64, counts: &[u64; Part::COUNT]) -> [f64; Part::COUNT] {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return [0.0; Part::COUNT];
    }
    core::array::from_fn(|i| total * counts[i] as f64 / n as f64)
}

/// [`enter_cpu`] with a guard, for the crate's functions with several
/// returns. Owning CPU only; dropped in the context that made it.
pub(crate) struct CpuPart<'a> {
    cpu: &'a Cpu,
    prev: u8,
}

impl Drop for CpuPart<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        leave_cpu(self.cpu, self.prev);
    }
}

/// Enter `part` on `cpu` until the guard is dropped.
#[inline(always)]
pub(crate) fn mark(cpu: &Cpu, part: Part) -> CpuPart<'_> {
    CpuPart {
        cpu,
        prev: enter_cpu(cpu, part),
    }
}
