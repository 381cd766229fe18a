//! Statistics, as `vmstat -i` and `vmstat -s` would show them.
//!
//! [`snapshot`] reads every counter (any thread, any time; counters are
//! relaxed atomics, so a snapshot of a running kernel is approximate), and
//! the snapshot formats itself as a table.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};
use core::sync::atomic::Ordering::Relaxed;

use crate::cpu::{CpuStats, bit_level};
use crate::ipl::Ipl;
use crate::kernel::kernel;

/// One CPU's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    /// CPU number.
    pub cpu: usize,
    /// Signals taken.
    pub traps: u64,
    /// Signals that found nothing to run.
    pub traps_idle: u64,
    /// Signals that interrupted an allocator.
    pub traps_in_alloc: u64,
    /// Hardware handler runs.
    pub intr: u64,
    /// Interrupts replayed by splx.
    pub splx_replays: u64,
    /// Interrupts run by the idle loop.
    pub idle_dispatch: u64,
    /// Posts coalesced with a pending one.
    pub posts_coalesced: u64,
    /// Posts that sent a signal.
    pub kicks_intr: u64,
    /// Posts by the target CPU's own thread code (no signal).
    pub posts_self: u64,
    /// Wakeups of an idle CPU.
    pub kicks_wake: u64,
    /// Softint handler runs (in interrupt context).
    pub softints: u64,
    /// Softint passes out of budget.
    pub softint_overruns: u64,
    /// Softint handler runs by the daemon.
    pub softints_daemon: u64,
    /// Thread switches.
    pub switches: u64,
    /// AST frames pushed.
    pub ast_pushed: u64,
    /// Interrupt returns that left an AST pending.
    pub ast_deferred: u64,
    /// ASTs delivered at a safe point.
    pub ast_safepoint: u64,
    /// AST handler runs.
    pub ast_handlers: u64,
    /// AST handlers entered while their thread was inside the host
    /// allocator (must stay 0: see `kern::malloc`).
    pub ast_in_malloc: u64,
    /// Host allocator calls made in interrupt context (must stay 0).
    pub intr_mallocs: u64,
    /// Idle sleeps.
    pub idle_sleeps: u64,
    /// Idle periods.
    pub idle_periods: u64,
    /// statclock samples by part id ([`crate::statclock::Part`]).
    pub parts: [u64; crate::statclock::Part::COUNT],
}

impl CpuSnapshot {
    fn read(cpu: usize, s: &CpuStats) -> Self {
        Self {
            cpu,
            traps: s.traps.get(),
            traps_idle: s.traps_idle.get(),
            traps_in_alloc: s.traps_in_alloc.get(),
            intr: s.intr.iter().map(|c| c.get()).sum(),
            splx_replays: s.splx_replays.get(),
            idle_dispatch: s.idle_dispatch.get(),
            posts_coalesced: s.posts_coalesced.load(Relaxed),
            kicks_intr: s.kicks_intr.load(Relaxed),
            posts_self: s.posts_self.load(Relaxed),
            kicks_wake: s.kicks_wake.load(Relaxed),
            softints: s.softints.get(),
            softint_overruns: s.softint_overruns.get(),
            softints_daemon: s.softints_daemon.get(),
            switches: s.switches.get(),
            ast_pushed: s.ast_pushed.get(),
            ast_deferred: s.ast_deferred.get(),
            ast_safepoint: s.ast_safepoint.get(),
            ast_handlers: s.ast_handlers.get(),
            ast_in_malloc: s.ast_in_malloc.get(),
            intr_mallocs: s.intr_mallocs.get(),
            idle_sleeps: s.idle_sleeps.get(),
            idle_periods: s.idle_periods.get(),
            parts: core::array::from_fn(|i| s.parts[i].get()),
        }
    }
}

/// An interrupt vector's counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VectorSnapshot {
    /// Handler name.
    pub name: &'static str,
    /// Its level.
    pub level: Ipl,
    /// Runs per CPU.
    pub per_cpu: Vec<u64>,
}

/// A DMA tag's counters (one driver instance's DVMA).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagSnapshot {
    /// Tag name (the driver instance).
    pub name: &'static str,
    /// DVMA mode.
    pub mode: &'static str,
    /// Loads.
    pub loads: u64,
    /// `slots` loads that wrote no PTE.
    pub loads_no_pte: u64,
    /// Loads refused for lack of space.
    pub no_space: u64,
    /// Loads that slept for space.
    pub waits: u64,
    /// Loads deferred to the FIFO.
    pub deferred: u64,
    /// IOMMU map calls.
    pub enters: u64,
    /// IOMMU unmap calls.
    pub removes: u64,
    /// DMA faults reported by its devices.
    pub faults: u64,
    /// Pages it keeps mapped now.
    pub pages_held: u64,
    /// The most it kept mapped.
    pub pages_peak: u64,
}

/// Every counter of the kernel core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per CPU.
    pub cpus: Vec<CpuSnapshot>,
    /// Per established interrupt vector.
    pub vectors: Vec<VectorSnapshot>,
    /// (name, runs) per softint.
    pub softints: Vec<(&'static str, u64)>,
    /// (name, runs) per AST.
    pub asts: Vec<(&'static str, u64)>,
    /// kmem: allocations, frees, failures, corruptions.
    pub kmem: [u64; 4],
    /// DMA tags.
    pub dvma: Vec<TagSnapshot>,
    /// DVMA window pages mapped now, and the peak.
    pub dvma_pages: (u64, u64),
    /// Physical memory pages in use now, and the peak.
    pub phys_pages: (u64, u64),
}

impl Snapshot {
    /// Sum of a per-CPU counter.
    pub fn total(&self, f: impl Fn(&CpuSnapshot) -> u64) -> u64 {
        self.cpus.iter().map(f).sum()
    }
}

/// Read every counter.
pub fn snapshot() -> Snapshot {
    let k = kernel();
    let cpus = k
        .cpus()
        .iter()
        .map(|c| CpuSnapshot::read(c.index(), &c.stats))
        .collect();
    let mut vectors = Vec::new();
    for bit in 0..64u32 {
        if let Some(name) = k.vectors.name(bit) {
            vectors.push(VectorSnapshot {
                name,
                level: bit_level(bit),
                per_cpu: k
                    .cpus()
                    .iter()
                    .map(|c| c.stats.intr[bit as usize].get())
                    .collect(),
            });
        }
    }
    let mut softints = Vec::new();
    k.softints.for_each(|n, r| softints.push((n, r)));
    let mut asts = Vec::new();
    k.asts.for_each(|n, r| asts.push((n, r)));
    let ks = &k.kmem.stats;
    let dvma = crate::bus_dma::tags()
        .map(|t| {
            let s = &t.stats;
            TagSnapshot {
                name: t.name(),
                mode: t.mode().name(),
                loads: s.loads.get(),
                loads_no_pte: s.loads_no_pte.get(),
                no_space: s.no_space.load(Relaxed),
                waits: s.waits.load(Relaxed),
                deferred: s.deferred.load(Relaxed),
                enters: s.enters.load(Relaxed),
                removes: s.removes.load(Relaxed),
                faults: s.faults.load(Relaxed),
                pages_held: s.pages_held.load(Relaxed),
                pages_peak: s.pages_peak.load(Relaxed),
            }
        })
        .collect();
    let ps = &k.physmem().stats;
    Snapshot {
        dvma,
        dvma_pages: crate::bus_dma::domain_pages(),
        phys_pages: (ps.pages_used.load(Relaxed), ps.pages_peak.load(Relaxed)),
        cpus,
        vectors,
        softints,
        asts,
        kmem: [
            ks.allocs.load(Relaxed),
            ks.frees.load(Relaxed),
            ks.failures.load(Relaxed),
            ks.corruptions.load(Relaxed),
        ],
    }
}

impl fmt::Display for Snapshot {
    /// `vmstat -i`, then the per-CPU event counters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hdr = String::new();
        let _ = write!(hdr, "{:<24} {:<6}", "interrupt", "ipl");
        for c in &self.cpus {
            let _ = write!(hdr, " {:>12}", alloc::format!("cpu{}", c.cpu));
        }
        writeln!(f, "{hdr} {:>12}", "total")?;
        for v in &self.vectors {
            write!(f, "{:<24} {:<6}", v.name, v.level.name())?;
            for n in &v.per_cpu {
                write!(f, " {n:>12}")?;
            }
            writeln!(f, " {:>12}", v.per_cpu.iter().sum::<u64>())?;
        }
        for (n, r) in &self.softints {
            writeln!(f, "{:<24} {:<6} {r:>12}  (softint)", n, "soft")?;
        }
        for (n, r) in &self.asts {
            writeln!(f, "{:<24} {:<6} {r:>12}  (ast)", n, "none")?;
        }
        type Row = (&'static str, fn(&CpuSnapshot) -> u64);
        let rows: [Row; 21] = [
            ("traps (signals)", |c| c.traps),
            ("traps with nothing to run", |c| c.traps_idle),
            ("traps inside an allocator", |c| c.traps_in_alloc),
            ("interrupts replayed by splx", |c| c.splx_replays),
            ("interrupts run by idle loop", |c| c.idle_dispatch),
            ("posts coalesced", |c| c.posts_coalesced),
            ("posts that signalled", |c| c.kicks_intr),
            ("posts by the CPU itself", |c| c.posts_self),
            ("idle wakeups", |c| c.kicks_wake),
            ("softints", |c| c.softints),
            ("softint passes over budget", |c| c.softint_overruns),
            ("softints run by daemon", |c| c.softints_daemon),
            ("context switches", |c| c.switches),
            ("ASTs pushed", |c| c.ast_pushed),
            ("ASTs deferred", |c| c.ast_deferred),
            ("ASTs at safe points", |c| c.ast_safepoint),
            ("AST handler runs", |c| c.ast_handlers),
            ("ASTs inside malloc (must be 0)", |c| c.ast_in_malloc),
            ("mallocs in interrupts (0)", |c| c.intr_mallocs),
            ("idle periods", |c| c.idle_periods),
            ("idle sleeps", |c| c.idle_sleeps),
        ];
        writeln!(f)?;
        for (name, get) in rows {
            write!(f, "{name:<31}")?;
            for c in &self.cpus {
                write!(f, " {:>12}", get(c))?;
            }
            writeln!(f, " {:>12}", self.total(get))?;
        }
        writeln!(
            f,
            "kmem: {} allocs, {} frees, {} failures, {} corruptions detected",
            self.kmem[0], self.kmem[1], self.kmem[2], self.kmem[3]
        )?;
        if !self.dvma.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "{:<12} {:<10} {:>10} {:>10} {:>8} {:>7} {:>8} {:>10} {:>10} {:>7} {:>9} {:>9}",
                "dvma tag",
                "mode",
                "loads",
                "no-PTE",
                "nospace",
                "waits",
                "deferred",
                "maps",
                "unmaps",
                "faults",
                "pages",
                "peak"
            )?;
            for t in &self.dvma {
                writeln!(
                    f,
                    "{:<12} {:<10} {:>10} {:>10} {:>8} {:>7} {:>8} {:>10} {:>10} {:>7} {:>9} {:>9}",
                    t.name,
                    t.mode,
                    t.loads,
                    t.loads_no_pte,
                    t.no_space,
                    t.waits,
                    t.deferred,
                    t.enters,
                    t.removes,
                    t.faults,
                    t.pages_held,
                    t.pages_peak
                )?;
            }
        }
        writeln!(
            f,
            "DVMA window: {} pages mapped (peak {}); physical memory: {} pages in use (peak {})",
            self.dvma_pages.0, self.dvma_pages.1, self.phys_pages.0, self.phys_pages.1
        )
    }
}
