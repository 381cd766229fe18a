//! `dvma bench kernel`: every DVMA mode × every completion mode, measured
//! inside the kernel, with no network and no client.
//!
//! For each pair a machine is booted fresh: one `sd0` on a zero-latency
//! DMA disk ([`machine::dev::RamDisk`]: commands complete from memory on
//! the doorbell, still through the DVMA window) or, with `--medium file`,
//! on the DMA disk over a backing file. An in-kernel load generator
//! ([`kern::loadgen`]) then runs each workload (4 KiB random reads and
//! writes at each queue depth) as a closed loop on CPU 0, after a short
//! warm-up: by default its kernel thread issues every I/O and each
//! completion hands the buf back to it (`--issue thread`), so every I/O
//! pays for its completion mode's way back to a thread. Over each measured window the bench reads the vCPU threads'
//! CPU time (their thread CPU clocks) and the kernel's counters; per I/O
//! that gives the kernel's CPU ns, host signals taken, kernel context
//! switches and ASTs pushed.
//!
//! Pairs are interleaved across repetitions (every pair once per
//! repetition, in reverse order on odd ones), and each figure is reported
//! with its median and range. Pairs whose ranges of CPU ns per I/O
//! overlap are ties ([`rank`]). `report` writes `kernel.md`,
//! `kernel.json` and the plots.
//!
//! The split of CPU ns per I/O by part: while the workloads run, the
//! machine's statclock ([`machine::statclock`]) samples each vCPU every
//! `--statclock-us` of its CPU time (at most once per host tick) and
//! counts the kernel part it interrupted ([`kern::statclock`]). A
//! window's share of samples per part times its CPU ns per I/O is the
//! part's ns per I/O. The statclock's own cost is measured on the first
//! workload of every pair: one more window with it off and one with it on
//! (in alternating order), after the measured ones.
//!
//! The curve: after the repetitions, the best pairs (lowest geometric mean
//! of their median CPU ns per I/O over the workloads, `--curve-pairs`) run
//! the first workload at each of `--curve-depths`, each pair booted fresh
//! per repetition, without the statclock; their I/Os per second per vCPU
//! against the depth are the report's second plot.
//!
//! The mail's questions: in every repetition, interleaved with the pairs,
//! a reference pair (`--ref-pair`, default `permanent/intr`) is booted
//! three more times: as it is (interrupt stack on, spl `lazy`), with the
//! interrupt stack off, and with spl `mask` ([`VARIANTS`]), and runs every
//! workload with the statclock. [`verdict`] turns those runs and the
//! pairs' figures into one paragraph per question, and the shape against
//! the published IOMMU measurements.
//!
//! Who calls what: `dvma bench kernel` calls [`main`] (through
//! [`run_into`]); `dvma bench` (the matrix) runs `dvma bench kernel` as a
//! child process and turns its `kernel.md` into a section of `report.md`
//! with [`as_section`]. Everything runs from host context (the CLI's
//! thread); each boot's load generator runs on the booted machine's CPU 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use kern::Completion;
use kern::bio::{BlockDev, BufOp, bio_init};
use kern::bus_dma::{DvmaMode, TagConfig};
use kern::dev::sd::{Sd, SdConfig};
use kern::loadgen::{Issuer, LoadGen, Pattern, Workload};
use kern::statclock::Part;
use machine::dev::{DiskConfig, DmaDisk, RamDisk, RamDiskConfig};
use machine::{Machine, MachineConfig};
use serde::Serialize;

pub mod rank;
mod report;
pub mod verdict;

/// A machine variant the reference pair runs under (the mail's questions:
/// the interrupt stack, the spl implementation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Variant {
    /// Its name in the report.
    pub name: &'static str,
    /// Interrupts on a per-CPU `sigaltstack` (the machine's default).
    pub intr_stack: bool,
    /// spl with the host signal mask (`mask`) instead of the per-CPU word
    /// (`lazy`, the default).
    pub spl_mask: bool,
}

/// The variants, the reference (the machine's defaults) first.
pub const VARIANTS: [Variant; 3] = [
    Variant {
        name: "base",
        intr_stack: true,
        spl_mask: false,
    },
    Variant {
        name: "intr-stack off",
        intr_stack: false,
        spl_mask: false,
    },
    Variant {
        name: "spl mask",
        intr_stack: true,
        spl_mask: true,
    },
];

/// Arguments of `dvma bench kernel`.
#[derive(clap::Args, Debug, Clone)]
pub struct KernelArgs {
    /// The quick run: 3 repetitions of 60 ms windows (under a minute with
    /// the split's extra windows, the reference pair's variants and the
    /// curve). Without it: 7 repetitions of 400 ms windows (about 9
    /// minutes by the windows' count).
    #[arg(long)]
    quick: bool,
    /// Where `kernel.md` and `kernel.json` go.
    #[arg(long, default_value = "dvma-bench")]
    out: PathBuf,
    /// Also print the JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Repetitions (overrides --quick's).
    #[arg(long)]
    reps: Option<usize>,
    /// Measured milliseconds per workload (overrides --quick's).
    #[arg(long)]
    ms: Option<u64>,
    /// The disk's medium: `ram` (zero latency, the kernel's own cost) or
    /// `file` (the DMA disk on a backing file in --out, thread engine).
    #[arg(long, default_value = "ram")]
    medium: String,
    /// Only these DVMA modes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Only these completion modes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    completions: Vec<String>,
    /// Queue depths (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32])]
    depths: Vec<usize>,
    /// Workloads (comma-separated: randread, randwrite, seqread, seqwrite).
    #[arg(long, value_delimiter = ',', default_values_t = ["randread".to_string(), "randwrite".to_string()])]
    workloads: Vec<String>,
    /// I/O size, bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Who issues the next I/O: `thread` (the load generator's kernel
    /// thread, woken by each completion: every I/O pays for its
    /// completion mode's way back to a thread) or `completion` (the
    /// completion's `iodone` callback, in the completion's own context:
    /// with the zero-latency disk the whole loop then runs inside one
    /// completion context and the modes' own costs vanish).
    #[arg(long, default_value = "thread")]
    issue: String,
    /// After the measured workloads, write a pattern, overwrite part of
    /// it at random and read it all back, checking every byte (per pair,
    /// per repetition; not timed).
    #[arg(long)]
    verify: bool,
    /// The statclock's period, microseconds of a vCPU's CPU time (with
    /// perf sampling, any period; with the fallback timer, at most one
    /// sample per host scheduler tick: 4 ms at 250 Hz). 0: no statclock
    /// and no split.
    #[arg(long, default_value_t = 200)]
    statclock_us: u64,
    /// What samples: `timer` (a CPU-clock timer per vCPU: at most one
    /// sample per host tick, cheap) or `perf` (perf_event_open task-clock
    /// sampling: any period, but each sample costs the host a timer
    /// interrupt and an irq_work, which on a VM means exits; falls back to
    /// the timer where perf is refused).
    #[arg(long, default_value = "timer")]
    statclock_source: String,
    /// How many of the best pairs run the IOPS-vs-depth curve (0: none).
    #[arg(long, default_value_t = 4)]
    curve_pairs: usize,
    /// The curve's queue depths (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 32])]
    curve_depths: Vec<usize>,
    /// The reference pair (`dvma/completion`) that also runs with the
    /// interrupt stack off and with spl `mask`, interleaved with the
    /// pairs (the mail's questions); `none`: skip them.
    #[arg(long, default_value = "permanent/intr")]
    ref_pair: String,
    /// The host CPU the whole run is pinned to (the load generator's
    /// vCPU, the machine's clock thread, everything the run starts):
    /// `last` (the last CPU this process may use; CPU 0 takes more of the
    /// host's interrupts), a CPU number, or `none`. Unpinned, the clock
    /// thread wakes on the other CPU and leaves this process's address
    /// space live there, so an unmap's TLB flush must sometimes signal it
    /// and sometimes not, which widens strict mode's spread. Pinned, an
    /// unmap flushes the local TLB only, as a one-CPU kernel's with a
    /// device on the same CPU would (`bench dvma`'s live device measures
    /// the cross-CPU shootdown).
    #[arg(long, default_value = "last")]
    pin: String,
}

/// The disk's size (the span of every workload).
const DISK_BYTES: u64 = 64 << 20;
/// The span of the verify pass.
const VERIFY_BYTES: u64 = 4 << 20;

/// One measured window of one workload.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// I/Os completed.
    pub ios: u64,
    /// I/Os that failed.
    pub errors: u64,
    /// ns of the window (first issue to last completion).
    pub elapsed_ns: u64,
    /// CPU ns of the vCPU threads over the window.
    pub cpu_ns: u64,
    /// Host signals the kernel took (traps).
    pub signals: u64,
    /// Kernel thread switches.
    pub switches: u64,
    /// AST frames pushed (at a trap's exit, onto the interrupted thread).
    pub asts: u64,
    /// AST handler runs (pushed frames, and ASTs delivered by a plain call
    /// at a safe point).
    pub ast_runs: u64,
    /// Interrupt handler runs.
    pub intrs: u64,
    /// IOMMU map calls (PTE writes into the DVMA window) by sd's tag.
    pub maps: u64,
    /// statclock samples over the window, by part id
    /// ([`kern::statclock::Part`]).
    pub parts: [u64; Part::COUNT],
}

impl Sample {
    fn per_io(&self, x: u64) -> f64 {
        x as f64 / self.ios.max(1) as f64
    }
    /// I/Os per second per vCPU.
    pub fn iops_per_cpu(&self, ncpu: usize) -> f64 {
        self.ios as f64 * 1e9 / self.elapsed_ns.max(1) as f64 / ncpu.max(1) as f64
    }
    /// The vCPUs' CPU time over the window's wall time, per vCPU: below 1
    /// when a vCPU idled or the host ran something else on its core.
    pub fn busy(&self, ncpu: usize) -> f64 {
        self.cpu_ns as f64 / self.elapsed_ns.max(1) as f64 / ncpu.max(1) as f64
    }
}

/// What one boot of one pair measured: a sample per workload, in order.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairRun {
    /// Per workload (the `Plan::workloads` order).
    pub samples: Vec<Sample>,
    /// DVMA pages the tag held at its peak.
    pub pages_peak: u64,
    /// IOVA pages it reserves whether used or not.
    pub pages_reserved: u64,
    /// The verify pass: (I/Os, errors, mismatches), if run.
    pub verify: Option<(u64, u64, u64)>,
    /// The statclock's cost on the first workload: CPU ns per I/O with it
    /// on and with it off (one window each), if it ran.
    pub overhead: Option<(f64, f64)>,
    /// What sampled ([`machine::statclock::Source`]), if anything did.
    pub statclock_source: Option<&'static str>,
}

/// A workload of the plan.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadSpec {
    /// `randread` etc.
    pub name: String,
    /// Queue depth.
    pub depth: usize,
    #[serde(skip)]
    op: BufOp,
    #[serde(skip)]
    pattern: Pattern,
}

impl WorkloadSpec {
    /// `randread qd32`.
    pub fn label(&self) -> String {
        format!("{} qd{}", self.name, self.depth)
    }
}

/// What a run measures.
#[derive(Clone, Debug)]
pub struct Plan {
    pairs: Vec<(DvmaMode, Completion)>,
    workloads: Vec<WorkloadSpec>,
    reps: usize,
    ms: u64,
    medium: Medium,
    size: usize,
    verify: bool,
    quick: bool,
    out: PathBuf,
    issuer: Issuer,
    statclock_us: u64,
    statclock_clock: machine::statclock::Clock,
    curve_pairs: usize,
    curve_depths: Vec<usize>,
    ref_pair: Option<(DvmaMode, Completion)>,
    /// The host CPU the run is pinned to, if any.
    pin: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Medium {
    Ram,
    File,
}

impl Medium {
    fn name(self) -> &'static str {
        match self {
            Medium::Ram => "ram",
            Medium::File => "file",
        }
    }
}

fn plan(a: &KernelArgs) -> Result<Plan, String> {
    let modes = if a.modes.is_empty() {
        DvmaMode::ALL.to_vec()
    } else {
        a.modes
            .iter()
            .map(|n| DvmaMode::from_name(n).ok_or_else(|| format!("unknown DVMA mode `{n}`")))
            .collect::<Result<_, _>>()?
    };
    let comps = if a.completions.is_empty() {
        Completion::ALL.to_vec()
    } else {
        a.completions
            .iter()
            .map(|n| Completion::from_name(n).ok_or_else(|| format!("unknown completion `{n}`")))
            .collect::<Result<_, _>>()?
    };
    let mut workloads = Vec::new();
    for w in &a.workloads {
        let (op, pattern) = match w.as_str() {
            "randread" => (BufOp::Read, Pattern::Random),
            "randwrite" => (BufOp::Write, Pattern::Random),
            "seqread" => (BufOp::Read, Pattern::Sequential),
            "seqwrite" => (BufOp::Write, Pattern::Sequential),
            _ => return Err(format!("unknown workload `{w}`")),
        };
        for &depth in &a.depths {
            if depth == 0 || depth > 64 {
                return Err(format!("queue depth {depth}: 1 to 64"));
            }
            workloads.push(WorkloadSpec {
                name: w.clone(),
                depth,
                op,
                pattern,
            });
        }
    }
    if workloads.is_empty() {
        return Err("no workload".into());
    }
    let medium = match a.medium.as_str() {
        "ram" => Medium::Ram,
        "file" => Medium::File,
        m => return Err(format!("unknown medium `{m}` (ram, file)")),
    };
    let issuer = match a.issue.as_str() {
        "thread" => Issuer::Thread,
        "completion" => Issuer::Completion,
        i => return Err(format!("unknown issuer `{i}` (thread, completion)")),
    };
    for &d in &a.curve_depths {
        if d == 0 || d > 64 {
            return Err(format!("curve queue depth {d}: 1 to 64"));
        }
    }
    let statclock_clock = match a.statclock_source.as_str() {
        "timer" => machine::statclock::Clock::CpuTimer,
        "perf" => machine::statclock::Clock::Cpu,
        s => return Err(format!("unknown statclock source `{s}` (timer, perf)")),
    };
    let ref_pair = if a.ref_pair == "none" {
        None
    } else {
        let (m, c) = a
            .ref_pair
            .split_once('/')
            .ok_or_else(|| format!("--ref-pair `{}`: dvma/completion or none", a.ref_pair))?;
        Some((
            DvmaMode::from_name(m).ok_or_else(|| format!("unknown DVMA mode `{m}`"))?,
            Completion::from_name(c).ok_or_else(|| format!("unknown completion `{c}`"))?,
        ))
    };
    let allowed = machine::host::Affinity::current().cpus();
    let pin = match a.pin.as_str() {
        "none" => None,
        "last" => allowed.last().copied(),
        n => {
            let c: usize = n
                .parse()
                .map_err(|_| format!("--pin `{n}`: last, none or a CPU number"))?;
            if !allowed.contains(&c) {
                return Err(format!("--pin {c}: this process may use CPUs {allowed:?}"));
            }
            Some(c)
        }
    };
    let (reps, ms) = if a.quick { (3, 60) } else { (7, 400) };
    Ok(Plan {
        pairs: modes
            .iter()
            .flat_map(|&m| comps.iter().map(move |&c| (m, c)))
            .collect(),
        workloads,
        reps: a.reps.unwrap_or(reps).max(1),
        ms: a.ms.unwrap_or(ms).max(1),
        medium,
        size: a.size,
        verify: a.verify,
        quick: a.quick,
        out: a.out.clone(),
        issuer,
        statclock_us: a.statclock_us,
        statclock_clock,
        curve_pairs: a.curve_pairs,
        curve_depths: a.curve_depths.clone(),
        ref_pair,
        pin,
    })
}

struct Mark {
    cpu_ns: u64,
    signals: u64,
    switches: u64,
    asts: u64,
    ast_runs: u64,
    intrs: u64,
    parts: [u64; Part::COUNT],
}

fn mark(tids: &[i32]) -> Mark {
    let s = kern::stats::snapshot();
    let parts = std::array::from_fn(|i| s.total(|c| c.parts[i]));
    Mark {
        cpu_ns: tids.iter().map(|&t| machine::thread_cpu_ns(t)).sum(),
        signals: s.total(|c| c.traps),
        switches: s.total(|c| c.switches),
        asts: s.total(|c| c.ast_pushed),
        ast_runs: s.total(|c| c.ast_handlers),
        intrs: s.total(|c| c.intr),
        parts,
    }
}

impl Mark {
    /// The window from `self` to `b`.
    fn window(&self, b: &Mark, r: &kern::loadgen::LoadResult, maps: u64) -> Sample {
        Sample {
            ios: r.ios,
            errors: r.errors,
            elapsed_ns: r.elapsed_ns,
            cpu_ns: b.cpu_ns - self.cpu_ns,
            signals: b.signals - self.signals,
            switches: b.switches - self.switches,
            asts: b.asts - self.asts,
            ast_runs: b.ast_runs - self.ast_runs,
            intrs: b.intrs - self.intrs,
            maps,
            parts: std::array::from_fn(|i| b.parts[i] - self.parts[i]),
        }
    }
}

/// The disk of one boot: stopped before the machine goes down.
enum Disk {
    Ram(&'static RamDisk),
    File(&'static DmaDisk),
}

impl Disk {
    fn stop(&self) {
        match self {
            Disk::Ram(d) => d.stop(),
            Disk::File(d) => d.stop(),
        }
    }
}

/// What one boot measures.
#[derive(Clone, Copy, Debug)]
enum What {
    /// Every workload of the plan, with the statclock (repetition `rep`).
    Main { rep: usize },
    /// The curve: the first workload at each curve depth, no statclock.
    Curve,
}

/// Boot a machine with `sd0` in `mode` × `comp`, run `what`, take it down.
/// Host context.
fn run_pair(
    p: &Plan,
    mode: DvmaMode,
    comp: Completion,
    what: What,
    v: &Variant,
) -> Result<PairRun, String> {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = 1;
    cfg.intr_stack = v.intr_stack;
    if v.spl_mask {
        cfg.kernel.spl = machine::SplImpl::Mask;
    }
    let m = Machine::boot(cfg).map_err(|e| e.to_string())?;
    let r = (|| {
        bio_init(crate::system::NBUF);
        let window = m.window();
        let disk = match p.medium {
            Medium::Ram => {
                let d = RamDisk::open(window, RamDiskConfig::new(DISK_BYTES))
                    .map_err(|e| e.to_string())?;
                Disk::Ram(RamDisk::leak(d))
            }
            Medium::File => {
                let path = p.out.join("kernel-bench-sd0.img");
                let d = DmaDisk::open(window, DiskConfig::new(&path, DISK_BYTES))
                    .map_err(|e| e.to_string())?;
                Disk::File(DmaDisk::leak(d))
            }
        };
        let r = run_on(p, &m, &disk, mode, comp, what);
        disk.stop();
        r
    })();
    let down = m.shutdown().map_err(|e| e.to_string());
    let r = r?;
    down?;
    Ok(r)
}

fn run_on(
    p: &Plan,
    m: &Machine,
    disk: &Disk,
    mode: DvmaMode,
    comp: Completion,
    what: What,
) -> Result<PairRun, String> {
    let mut tag = TagConfig::new(mode);
    tag.maxsize = 64 << 10;
    tag.slots = 64;
    tag.pool_bytes = 8 << 20;
    let sdcfg = SdConfig {
        name: "sd0",
        parent: match disk {
            Disk::Ram(_) => "ramdisk0",
            Disk::File(_) => "dmadisk0",
        },
        dma: tag,
        completion: comp,
        cpu: 0,
        bufq: kern::bio::BufqStrategy::Disksort,
        read_only: false,
    };
    let sd: &'static Sd = match disk {
        Disk::Ram(d) => Sd::attach(sdcfg, *d),
        Disk::File(d) => Sd::attach(sdcfg, *d),
    }
    .map_err(|e| e.to_string())?;
    let tids = m.cpu_tids();
    let p2 = p.clone();
    let sc = m.statclock();
    let out = m
        .run(0, "loadgen", move |ctx| -> Result<PairRun, String> {
            let dev: &'static dyn BlockDev = sd;
            let mut run = PairRun::default();
            let period = std::time::Duration::from_micros(p2.statclock_us);
            let statclock = |on: bool| -> Result<(), String> {
                if on && p2.statclock_us > 0 {
                    sc.start_on(p2.statclock_clock, period)
                        .map_err(|e| format!("statclock: {e}"))
                } else {
                    sc.stop();
                    Ok(())
                }
            };
            let enters = || {
                sd.tag()
                    .stats
                    .enters
                    .load(std::sync::atomic::Ordering::Relaxed)
            };
            // One workload at `depth`: a warm-up (unless `warm`), then a
            // measured window.
            let window =
                |w: &WorkloadSpec, depth: usize, seed: u64, warm: bool| -> Result<Sample, String> {
                    let mut lg =
                        LoadGen::new(ctx, dev, p2.size, depth).map_err(|e| e.to_string())?;
                    let mut wl = Workload {
                        op: w.op,
                        pattern: w.pattern,
                        span: DISK_BYTES,
                        ios: 0,
                        duration_ns: (p2.ms * 1_000_000 / 5).max(1_000_000),
                        verify: false,
                        seed,
                        issuer: p2.issuer,
                    };
                    if !warm {
                        lg.run(ctx, &wl).map_err(|e| e.to_string())?;
                    }
                    wl.duration_ns = p2.ms * 1_000_000;
                    let (a, e0) = (mark(&tids), enters());
                    let r = lg.run(ctx, &wl).map_err(|e| e.to_string())?;
                    let (b, e1) = (mark(&tids), enters());
                    Ok(a.window(&b, &r, e1 - e0))
                };
            match what {
                What::Curve => {
                    statclock(false)?;
                    let w = &p2.workloads[0];
                    for (seed, &depth) in (1u64..).zip(&p2.curve_depths) {
                        run.samples.push(window(w, depth, seed, false)?);
                    }
                    return Ok(run);
                }
                What::Main { rep } => {
                    statclock(true)?;
                    run.statclock_source = sc.source().map(|s| s.name());
                    for (seed, w) in (1u64..).zip(&p2.workloads) {
                        run.samples.push(window(w, w.depth, seed, false)?);
                    }
                    if p2.statclock_us > 0 {
                        // Its own cost: the first workload once more with
                        // it off and once with it on, warm, in alternating
                        // order.
                        let w = &p2.workloads[0];
                        let mut on_off = [0.0; 2];
                        for on in [rep % 2 == 0, rep % 2 == 1] {
                            statclock(on)?;
                            let x = window(w, w.depth, 99, true)?;
                            on_off[usize::from(!on)] = x.per_io(x.cpu_ns);
                        }
                        run.overhead = Some((on_off[0], on_off[1]));
                    }
                    statclock(false)?;
                }
            }
            if p2.verify {
                let mut lg = LoadGen::new(ctx, dev, p2.size, 8).map_err(|e| e.to_string())?;
                let (mut ios, mut errors, mut bad) = (0, 0, 0);
                let seed = 0xd5a1;
                let pre = lg
                    .prefill(ctx, VERIFY_BYTES, seed)
                    .map_err(|e| e.to_string())?;
                let n = VERIFY_BYTES / p2.size as u64;
                let mut wl = Workload {
                    op: BufOp::Write,
                    pattern: Pattern::Random,
                    span: VERIFY_BYTES,
                    ios: n / 2,
                    duration_ns: 0,
                    verify: true,
                    seed,
                    issuer: p2.issuer,
                };
                let w = lg.run(ctx, &wl).map_err(|e| e.to_string())?;
                wl.op = BufOp::Read;
                wl.pattern = Pattern::Sequential;
                wl.ios = n;
                let r = lg.run(ctx, &wl).map_err(|e| e.to_string())?;
                for x in [pre, w, r] {
                    ios += x.ios;
                    errors += x.errors;
                    bad += x.mismatches;
                }
                run.verify = Some((ios, errors, bad));
            }
            Ok(run)
        })
        .map_err(|e| e.to_string())??;
    let mut out = out;
    out.pages_peak = sd
        .tag()
        .stats
        .pages_peak
        .load(std::sync::atomic::Ordering::Relaxed);
    out.pages_reserved = sd.tag().pages_reserved();
    Ok(out)
}

/// Everything measured: `runs[pair][rep]`, and the curve.
pub struct Measured {
    plan: Plan,
    runs: Vec<Vec<PairRun>>,
    /// The curve: (pair index, its runs per repetition: a sample per curve
    /// depth).
    curve: Vec<(usize, Vec<PairRun>)>,
    /// The reference pair under each of [`VARIANTS`]: runs per repetition
    /// (empty without a reference pair).
    variants: Vec<(Variant, Vec<PairRun>)>,
    seconds: f64,
}

/// The best `n` pairs: lowest geometric mean over the workloads of their
/// median CPU ns per I/O.
fn best_pairs(p: &Plan, runs: &[Vec<PairRun>], n: usize) -> Vec<usize> {
    let score = |pi: usize| -> f64 {
        let logs: Vec<f64> = (0..p.workloads.len())
            .map(|wi| {
                let v: Vec<f64> = runs[pi]
                    .iter()
                    .map(|r| r.samples[wi].per_io(r.samples[wi].cpu_ns))
                    .collect();
                rank::Spread::of(&v).median.max(1e-9).ln()
            })
            .collect();
        logs.iter().sum::<f64>() / logs.len().max(1) as f64
    };
    let mut idx: Vec<(usize, f64)> = (0..p.pairs.len()).map(|i| (i, score(i))).collect();
    idx.sort_by(|a, b| a.1.total_cmp(&b.1));
    idx.into_iter().take(n).map(|(i, _)| i).collect()
}

fn measure(p: &Plan, progress: &dyn Fn(&str)) -> Result<Measured, String> {
    let t0 = Instant::now();
    let mut runs: Vec<Vec<PairRun>> = vec![Vec::new(); p.pairs.len()];
    let mut variants: Vec<(Variant, Vec<PairRun>)> = match p.ref_pair {
        Some(_) => VARIANTS.iter().map(|&v| (v, Vec::new())).collect(),
        None => Vec::new(),
    };
    // Every boot of a repetition: a pair (index < pairs) or a variant of
    // the reference pair (index - pairs), spread among the pairs.
    let n = p.pairs.len() + variants.len();
    let base = VARIANTS[0];
    for rep in 0..p.reps {
        let mut order: Vec<usize> = (0..p.pairs.len()).collect();
        for (k, vi) in (p.pairs.len()..n).enumerate() {
            let at = (k + 1) * order.len() / (variants.len() + 1) + k;
            order.insert(at.min(order.len()), vi);
        }
        if rep % 2 == 1 {
            order.reverse();
        }
        for i in order {
            if i < p.pairs.len() {
                let (mode, comp) = p.pairs[i];
                progress(&format!("rep {}/{}: {mode} {comp}", rep + 1, p.reps));
                let r = run_pair(p, mode, comp, What::Main { rep }, &base)
                    .map_err(|e| format!("{mode} {comp}: {e}"))?;
                runs[i].push(r);
            } else if let Some((mode, comp)) = p.ref_pair {
                let v = variants[i - p.pairs.len()].0;
                progress(&format!(
                    "rep {}/{}: {mode} {comp} ({})",
                    rep + 1,
                    p.reps,
                    v.name
                ));
                let r = run_pair(p, mode, comp, What::Main { rep }, &v)
                    .map_err(|e| format!("{mode} {comp} ({}): {e}", v.name))?;
                variants[i - p.pairs.len()].1.push(r);
            }
        }
    }
    let top = if p.curve_depths.is_empty() {
        Vec::new()
    } else {
        best_pairs(p, &runs, p.curve_pairs)
    };
    let mut curve: Vec<(usize, Vec<PairRun>)> = top.iter().map(|&i| (i, Vec::new())).collect();
    for rep in 0..p.reps {
        let mut order: Vec<usize> = (0..curve.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for ci in order {
            let (mode, comp) = p.pairs[curve[ci].0];
            progress(&format!("curve rep {}/{}: {mode} {comp}", rep + 1, p.reps));
            let r = run_pair(p, mode, comp, What::Curve, &base)
                .map_err(|e| format!("curve {mode} {comp}: {e}"))?;
            curve[ci].1.push(r);
        }
    }
    Ok(Measured {
        plan: p.clone(),
        runs,
        curve,
        variants,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What [`run_into`] wrote.
pub struct Written {
    /// `kernel.md`'s text.
    pub markdown: String,
    /// `kernel.json`'s text.
    pub json: String,
    /// Whether any I/O failed or the verify pass found a mismatch.
    pub failed: bool,
}

/// Run the kernel bench `a` (progress lines to `progress`) and write
/// `kernel.md`, `kernel.json` and the plots into `a.out`. Host context.
pub fn run_into(a: &KernelArgs, progress: &dyn Fn(&str)) -> Result<Written, String> {
    let p = plan(a)?;
    std::fs::create_dir_all(&p.out).map_err(|e| format!("{}: {e}", p.out.display()))?;
    // Threads inherit their creator's affinity: pinning this thread pins
    // every machine the run boots; it gets its own affinity back after.
    let before = machine::host::Affinity::current();
    if let Some(c) = p.pin
        && !machine::host::pin_current_thread(c)
    {
        return Err(format!("--pin {c}: the host refused"));
    }
    let m = measure(&p, progress);
    before.restore();
    let m = m?;
    if p.medium == Medium::File {
        let _ = std::fs::remove_file(p.out.join("kernel-bench-sd0.img"));
    }
    let mut rep = report::build(&m);
    let (markdown, json) = report::write(&mut rep, &p.out)?;
    let failed = rep.results.iter().any(|r| r.errors > 0)
        || rep.verify.iter().any(|v| v.errors > 0 || v.mismatches > 0);
    Ok(Written {
        markdown,
        json,
        failed,
    })
}

/// Demote `kernel.md` into a section of another report: its title becomes
/// `title` (a `## ` heading), every other heading goes one level down,
/// and relative links to its plots are prefixed with `dir` (the kernel
/// report's directory, relative to the other report).
pub fn as_section(kernel_md: &str, title: &str, dir: &str) -> String {
    let mut out = format!("## {title}\n");
    let mut in_code = false;
    for line in kernel_md.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with("# ") {
            continue;
        }
        let line = if !in_code && line.starts_with('#') {
            format!("#{line}")
        } else {
            line.to_string()
        };
        let line = line.replace("](kernel-", &format!("]({dir}/kernel-"));
        out.push_str(&line);
        out.push('\n');
    }
    out.push('\n');
    out
}

pub fn main(a: KernelArgs) -> Result<ExitCode, String> {
    let quiet = a.json;
    let w = run_into(&a, &|s| {
        if !quiet {
            eprintln!("{s}");
        }
    })?;
    let (md, json) = (w.markdown, w.json);
    if a.json {
        println!("{json}");
    } else {
        print!("{md}");
        eprintln!(
            "wrote {} and {}",
            a.out.join("kernel.md").display(),
            a.out.join("kernel.json").display()
        );
    }
    Ok(if w.failed {
        eprintln!("dvma bench kernel: I/O errors or verify mismatches (see the report)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kernel.md` as a section: its title replaced, headings one level
    /// down (not inside code blocks), plot links into its directory.
    #[test]
    fn kernel_md_as_a_section() {
        let md = "# dvma bench kernel\n\nNoise: 3%.\n\n## The answer\n\n**Q?** 12 ns.\n\n\
                  ### randread qd1: CPU ns per I/O by part\n\n\
                  ![split](kernel-split-randread-qd1.svg)\n\n```sh\n# a comment\n```\n";
        let s = as_section(md, "The answer inside", "kernel");
        assert!(s.starts_with("## The answer inside\n"), "{s}");
        assert!(!s.contains("# dvma bench kernel"), "{s}");
        assert!(s.contains("\n### The answer\n"), "{s}");
        assert!(s.contains("\n#### randread qd1: CPU ns"), "{s}");
        assert!(s.contains("](kernel/kernel-split-randread-qd1.svg)"), "{s}");
        assert!(s.contains("\n# a comment\n"), "{s}");
        assert!(s.contains("**Q?** 12 ns."));
    }
}
