//! `kernel.md` and `kernel.json`: the figures of `dvma bench kernel`, with
//! their spreads, ranked with ties.
//!
//! # `kernel.json`
//! * `schema`: `"dvma-bench-kernel/3"`.
//! * `machine`: `cpu_model` (from `/proc/cpuinfo`), `host_cores`, `vcpus`
//!   (the booted kernel's CPUs).
//! * `config`: `quick`, `reps`, `window_ms` (measured window per workload),
//!   `medium` (`ram`: zero latency; `file`), `issuer` (`thread`: the load
//!   generator's thread issues every I/O; `completion`: the completion's
//!   callback does), `io_size`, `workloads`
//!   (labels, e.g. `randread qd32`), `pairs`, `seconds` (the whole run),
//!   `pinned_cpu` (the host CPU every thread of the run was pinned to, or
//!   null: see `--pin`).
//! * `noise`: over every pair and workload, the range of CPU ns per I/O
//!   relative to its median ((max - min) / median): `cpu_ns_rel_range_median`,
//!   `cpu_ns_rel_range_max`; the same for I/Os per second:
//!   `iops_rel_range_median`.
//! * `protections`: DVMA mode → what a device can still reach after unload.
//! * `results[]`: one per pair and workload: `dvma`, `completion`,
//!   `workload`, `depth`; `rank` (1 + the pairs of that workload whose whole
//!   range of CPU ns per I/O is below this one's) and `tied_with` (pairs
//!   whose ranges overlap this one's); spreads (`median`, `min`, `max`, `n`
//!   over repetitions) of `cpu_ns_per_io` (vCPU thread CPU time over the
//!   window / I/Os), `iops_per_cpu`, `signals_per_io` (host signals the
//!   kernel took), `switches_per_io` (kernel thread switches),
//!   `asts_per_io` (AST frames pushed onto an interrupted thread at a
//!   trap's exit), `ast_runs_per_io` (AST handler runs: pushed frames and
//!   ASTs delivered by a plain call at a safe point), `intrs_per_io` (interrupt handler
//!   runs), `maps_per_io` (IOMMU map calls by the driver's tag: a PTE
//!   write into the DVMA window, an `mmap`), `vcpu_busy` (vCPU CPU time / wall time: below 1 when the vCPU
//!   idled or the host ran another thread on its core, which lowers
//!   `iops_per_cpu` but not `cpu_ns_per_io`); `dvma_pages_peak` (the most DVMA pages the driver's tag held,
//!   max over repetitions), `dvma_pages_reserved` (IOVA pages reserved
//!   whether used or not), `ios` (summed over repetitions), `errors`.
//! * `verify[]` (with `--verify`): per pair, summed over repetitions: `ios`,
//!   `errors`, `mismatches` (reads that did not find what was written).
//! * `statclock`: how the split was sampled: `period_us` (asked for, of a
//!   vCPU's CPU time; 0: off, and every split is empty), `clock` (what
//!   sampled: perf task-clock sampling, or the fallback CPU-clock timer,
//!   which the host fires at most once per tick), `parts`
//!   (the part names, in the order of the tables), `samples_per_cpu_second`
//!   (samples over every measured window / the vCPUs' CPU seconds: the
//!   rate the host really delivered, at most its tick rate),
//!   `samples_per_window` (a spread over every pair, workload and
//!   repetition), `overhead_workload` (the workload its cost was measured
//!   on), `overhead_rel` (over every pair and repetition: CPU ns per I/O
//!   with the statclock on / off − 1, one warm window each).
//! * In each `results[]` entry: `split_ns_per_io` (part name → spread over
//!   repetitions of the window's CPU ns per I/O × that part's share of the
//!   window's samples) and `statclock_samples` (summed over repetitions).
//! * `curve[]`: the best pairs (`config.curve_pairs`, by the geometric mean
//!   over workloads of the median CPU ns per I/O), each booted fresh per
//!   repetition, on `workload` at each depth of `config.curve_depths`,
//!   without the statclock: `dvma`, `completion`, `workload`, `points[]`:
//!   `depth`, `iops_per_cpu`, `cpu_ns_per_io` (spreads over repetitions).
//! * `variants`: the reference pair (`config.ref_pair`) booted in every
//!   repetition, interleaved with the pairs, under each machine variant
//!   (`name`: `base` (interrupt stack on, spl `lazy`: the machine's
//!   defaults), `intr-stack off`, `spl mask`; `intr_stack`, `spl`), each
//!   with `results[]`: `workload`, `depth`, `cpu_ns_per_io` and
//!   `split_ns_per_io` (spreads, as in `results[]`). Empty with
//!   `--ref-pair none`.
//! * `verdicts[]`: the answer, one generated paragraph per question:
//!   `key` (`ranking`, `intr_stack`, `completion`, `dvma_space`, `spl`,
//!   `shape`), `question`, `text` (Markdown; every difference is
//!   `median [min – max]` of the difference, "tie" where the ranges
//!   overlap).
//! * `shape[]`: per workload where all five DVMA modes ran: `workload`,
//!   `relative` (`[dvma, its best completion, spread of permanent's CPU ns
//!   per I/O / the mode's]`), and the checks of the published shape
//!   (`strict_below_lazy`, `strict_far_below_lazy`,
//!   `lazy_below_mapped_once`, `slots_near_permanent`, `shadow_between`,
//!   `reproduced`; `medians_follow`: the same checks on the medians alone;
//!   `contradicted`: the checks that fail even at the ends of the ranges
//!   most favourable to the shape, so a shape the noise hides is told from
//!   one the run contradicts).
//! * `plots`: the SVG files written next to `kernel.json`:
//!   `kernel-split-<workload>.svg` (CPU ns per I/O stacked by part, every
//!   pair) and `kernel-iops-depth.svg` (the curve).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use kern::statclock::{Part, split};

use super::Measured;
use super::rank::{Better, Spread, rank};
use super::verdict::{self, ShapeCheck, Verdict};

/// The report.
#[derive(Serialize, Debug)]
pub struct Report {
    schema: &'static str,
    machine: MachineInfo,
    config: ConfigInfo,
    noise: Noise,
    protections: BTreeMap<String, String>,
    /// Per pair and workload, in rank order per workload.
    pub results: Vec<PairResult>,
    /// Per pair, with `--verify`.
    pub verify: Vec<VerifyResult>,
    statclock: StatclockInfo,
    curve: Vec<CurveResult>,
    variants: Vec<VariantResult>,
    verdicts: Vec<Verdict>,
    shape: Vec<ShapeCheck>,
    plots: Vec<String>,
}

#[derive(Serialize, Debug)]
struct VariantResult {
    name: &'static str,
    intr_stack: bool,
    spl: &'static str,
    results: Vec<VariantWorkload>,
}

#[derive(Serialize, Debug)]
struct VariantWorkload {
    workload: String,
    depth: usize,
    cpu_ns_per_io: Spread,
    split_ns_per_io: BTreeMap<&'static str, Spread>,
}

#[derive(Serialize, Debug)]
struct StatclockInfo {
    period_us: u64,
    clock: &'static str,
    parts: Vec<&'static str>,
    samples_per_cpu_second: f64,
    samples_per_window: Spread,
    overhead_workload: String,
    overhead_rel: Spread,
}

#[derive(Serialize, Debug)]
struct CurveResult {
    dvma: &'static str,
    completion: &'static str,
    workload: String,
    points: Vec<CurvePoint>,
}

#[derive(Serialize, Debug)]
struct CurvePoint {
    depth: usize,
    iops_per_cpu: Spread,
    cpu_ns_per_io: Spread,
}

#[derive(Serialize, Debug)]
struct MachineInfo {
    cpu_model: String,
    host_cores: usize,
    vcpus: usize,
}

#[derive(Serialize, Debug)]
struct ConfigInfo {
    quick: bool,
    reps: usize,
    window_ms: u64,
    medium: &'static str,
    issuer: &'static str,
    io_size: usize,
    workloads: Vec<String>,
    pairs: usize,
    seconds: f64,
    curve_pairs: usize,
    curve_depths: Vec<usize>,
    ref_pair: Option<String>,
    pinned_cpu: Option<usize>,
}

#[derive(Serialize, Debug, Default)]
struct Noise {
    cpu_ns_rel_range_median: f64,
    cpu_ns_rel_range_max: f64,
    iops_rel_range_median: f64,
}

/// One pair on one workload.
#[derive(Serialize, Debug, Clone)]
pub struct PairResult {
    dvma: &'static str,
    completion: &'static str,
    workload: String,
    depth: usize,
    rank: usize,
    tied_with: Vec<String>,
    cpu_ns_per_io: Spread,
    iops_per_cpu: Spread,
    signals_per_io: Spread,
    switches_per_io: Spread,
    asts_per_io: Spread,
    ast_runs_per_io: Spread,
    intrs_per_io: Spread,
    maps_per_io: Spread,
    vcpu_busy: Spread,
    dvma_pages_peak: u64,
    dvma_pages_reserved: u64,
    ios: u64,
    /// I/Os that failed (must be 0).
    pub errors: u64,
    split_ns_per_io: BTreeMap<&'static str, Spread>,
    statclock_samples: u64,
}

impl PairResult {
    fn pair(&self) -> String {
        format!("{}/{}", self.dvma, self.completion)
    }
}

/// The verify pass of one pair.
#[derive(Serialize, Debug)]
pub struct VerifyResult {
    pair: String,
    ios: u64,
    /// I/Os that failed.
    pub errors: u64,
    /// Reads that did not find the pattern.
    pub mismatches: u64,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn median(v: Vec<f64>) -> f64 {
    Spread::of(&v).median
}

/// Aggregate the repetitions and rank.
pub fn build(m: &Measured) -> Report {
    let p = &m.plan;
    let mut results = Vec::new();
    for (wi, w) in p.workloads.iter().enumerate() {
        let mut rows: Vec<PairResult> = p
            .pairs
            .iter()
            .enumerate()
            .map(|(pi, &(mode, comp))| {
                let runs = &m.runs[pi];
                let samples: Vec<&super::Sample> = runs.iter().map(|r| &r.samples[wi]).collect();
                let f = |g: &dyn Fn(&super::Sample) -> f64| {
                    Spread::of(&samples.iter().map(|s| g(s)).collect::<Vec<_>>())
                };
                PairResult {
                    dvma: mode.name(),
                    completion: comp.name(),
                    workload: w.name.clone(),
                    depth: w.depth,
                    rank: 0,
                    tied_with: Vec::new(),
                    cpu_ns_per_io: f(&|s| s.per_io(s.cpu_ns)),
                    iops_per_cpu: f(&|s| s.iops_per_cpu(1)),
                    signals_per_io: f(&|s| s.per_io(s.signals)),
                    switches_per_io: f(&|s| s.per_io(s.switches)),
                    asts_per_io: f(&|s| s.per_io(s.asts)),
                    ast_runs_per_io: f(&|s| s.per_io(s.ast_runs)),
                    intrs_per_io: f(&|s| s.per_io(s.intrs)),
                    maps_per_io: f(&|s| s.per_io(s.maps)),
                    vcpu_busy: f(&|s| s.busy(1)),
                    dvma_pages_peak: runs.iter().map(|r| r.pages_peak).max().unwrap_or(0),
                    dvma_pages_reserved: runs.iter().map(|r| r.pages_reserved).max().unwrap_or(0),
                    ios: samples.iter().map(|s| s.ios).sum(),
                    errors: samples.iter().map(|s| s.errors).sum(),
                    split_ns_per_io: Part::ALL
                        .iter()
                        .map(|&part| {
                            (
                                part.name(),
                                f(&|s| split(s.per_io(s.cpu_ns), &s.parts)[part as usize]),
                            )
                        })
                        .collect(),
                    statclock_samples: samples.iter().map(|s| s.parts.iter().sum::<u64>()).sum(),
                }
            })
            .collect();
        let spreads: Vec<Spread> = rows.iter().map(|r| r.cpu_ns_per_io).collect();
        let places = rank(&spreads, Better::Lower);
        let names: Vec<String> = rows.iter().map(|r| r.pair()).collect();
        for pl in &places {
            rows[pl.index].rank = pl.rank;
            rows[pl.index].tied_with = pl.tied_with.iter().map(|&j| names[j].clone()).collect();
        }
        results.extend(places.iter().map(|pl| rows[pl.index].clone()));
    }
    let rel_cpu: Vec<f64> = results.iter().map(|r| r.cpu_ns_per_io.rel()).collect();
    let noise = Noise {
        cpu_ns_rel_range_median: median(rel_cpu.clone()),
        cpu_ns_rel_range_max: rel_cpu.iter().copied().fold(0.0, f64::max),
        iops_rel_range_median: median(results.iter().map(|r| r.iops_per_cpu.rel()).collect()),
    };
    let verify = p
        .pairs
        .iter()
        .enumerate()
        .filter_map(|(pi, &(mode, comp))| {
            let v: Vec<(u64, u64, u64)> = m.runs[pi].iter().filter_map(|r| r.verify).collect();
            (!v.is_empty()).then(|| VerifyResult {
                pair: format!("{mode}/{comp}"),
                ios: v.iter().map(|x| x.0).sum(),
                errors: v.iter().map(|x| x.1).sum(),
                mismatches: v.iter().map(|x| x.2).sum(),
            })
        })
        .collect();
    let windows: Vec<&super::Sample> = m
        .runs
        .iter()
        .flatten()
        .flat_map(|r| r.samples.iter())
        .collect();
    let all_samples: u64 = windows.iter().map(|s| s.parts.iter().sum::<u64>()).sum();
    let cpu_s: f64 = windows.iter().map(|s| s.cpu_ns as f64).sum::<f64>() / 1e9;
    let statclock = StatclockInfo {
        period_us: p.statclock_us,
        clock: m
            .runs
            .iter()
            .flatten()
            .find_map(|r| r.statclock_source)
            .unwrap_or("none"),
        parts: Part::ALL.iter().map(|p| p.name()).collect(),
        samples_per_cpu_second: if cpu_s > 0.0 {
            all_samples as f64 / cpu_s
        } else {
            0.0
        },
        samples_per_window: Spread::of(
            &windows
                .iter()
                .map(|s| s.parts.iter().sum::<u64>() as f64)
                .collect::<Vec<_>>(),
        ),
        overhead_workload: p.workloads[0].label(),
        overhead_rel: Spread::of(
            &m.runs
                .iter()
                .flatten()
                .filter_map(|r| r.overhead)
                .filter(|&(_, off)| off > 0.0)
                .map(|(on, off)| on / off - 1.0)
                .collect::<Vec<_>>(),
        ),
    };
    let curve = m
        .curve
        .iter()
        .map(|(pi, runs)| {
            let (mode, comp) = p.pairs[*pi];
            CurveResult {
                dvma: mode.name(),
                completion: comp.name(),
                workload: p.workloads[0].name.clone(),
                points: p
                    .curve_depths
                    .iter()
                    .enumerate()
                    .map(|(di, &depth)| {
                        let f = |g: &dyn Fn(&super::Sample) -> f64| {
                            Spread::of(&runs.iter().map(|r| g(&r.samples[di])).collect::<Vec<_>>())
                        };
                        CurvePoint {
                            depth,
                            iops_per_cpu: f(&|s| s.iops_per_cpu(1)),
                            cpu_ns_per_io: f(&|s| s.per_io(s.cpu_ns)),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let variants: Vec<VariantResult> = m
        .variants
        .iter()
        .map(|(v, runs)| VariantResult {
            name: v.name,
            intr_stack: v.intr_stack,
            spl: if v.spl_mask { "mask" } else { "lazy" },
            results: p
                .workloads
                .iter()
                .enumerate()
                .map(|(wi, w)| {
                    let f = |g: &dyn Fn(&super::Sample) -> f64| {
                        Spread::of(&runs.iter().map(|r| g(&r.samples[wi])).collect::<Vec<_>>())
                    };
                    VariantWorkload {
                        workload: w.name.clone(),
                        depth: w.depth,
                        cpu_ns_per_io: f(&|s| s.per_io(s.cpu_ns)),
                        split_ns_per_io: Part::ALL
                            .iter()
                            .map(|&part| {
                                (
                                    part.name(),
                                    f(&|s| split(s.per_io(s.cpu_ns), &s.parts)[part as usize]),
                                )
                            })
                            .collect(),
                    }
                })
                .collect(),
        })
        .collect();
    let labels: Vec<String> = p.workloads.iter().map(|w| w.label()).collect();
    let ref_pair = p.ref_pair.map(|(m, c)| (m.name(), c.name()));
    let row_labels: Vec<String> = results
        .iter()
        .map(|r| format!("{} qd{}", r.workload, r.depth))
        .collect();
    let var_labels: Vec<Vec<String>> = variants
        .iter()
        .map(|v| {
            v.results
                .iter()
                .map(|r| format!("{} qd{}", r.workload, r.depth))
                .collect()
        })
        .collect();
    let (verdicts, shape) = {
        let input = verdict::Input {
            workloads: &labels,
            pairs: results
                .iter()
                .zip(&row_labels)
                .map(|(r, w)| verdict::PairRow {
                    dvma: r.dvma,
                    completion: r.completion,
                    workload: w,
                    cpu: r.cpu_ns_per_io,
                    dispatch: r.split_ns_per_io["dispatch"],
                    maps: r.maps_per_io.median,
                    pages_peak: r.dvma_pages_peak,
                    pages_reserved: r.dvma_pages_reserved,
                })
                .collect(),
            variants: variants
                .iter()
                .zip(&var_labels)
                .flat_map(|(v, ls)| {
                    v.results.iter().zip(ls).map(|(r, w)| verdict::VariantRow {
                        variant: v.name,
                        workload: w,
                        cpu: r.cpu_ns_per_io,
                        intr_entry: r.split_ns_per_io["intr_entry"],
                        spl: r.split_ns_per_io["spl"],
                    })
                })
                .collect(),
            ref_pair: if variants.is_empty() { None } else { ref_pair },
        };
        verdict::verdicts(&input)
    };
    Report {
        schema: "dvma-bench-kernel/3",
        machine: MachineInfo {
            cpu_model: cpu_model(),
            host_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            vcpus: 1,
        },
        config: ConfigInfo {
            quick: p.quick,
            reps: p.reps,
            window_ms: p.ms,
            medium: p.medium.name(),
            issuer: match p.issuer {
                kern::loadgen::Issuer::Thread => "thread",
                kern::loadgen::Issuer::Completion => "completion",
            },
            io_size: p.size,
            workloads: p.workloads.iter().map(|w| w.label()).collect(),
            pairs: p.pairs.len(),
            seconds: m.seconds,
            curve_pairs: m.curve.len(),
            curve_depths: p.curve_depths.clone(),
            ref_pair: ref_pair.map(|(m, c)| format!("{m}/{c}")),
            pinned_cpu: p.pin,
        },
        noise,
        protections: kern::bus_dma::DvmaMode::ALL
            .iter()
            .map(|m| (m.name().to_string(), m.protection().to_string()))
            .collect(),
        results,
        verify,
        statclock,
        curve,
        variants,
        verdicts,
        shape,
        plots: Vec::new(),
    }
}

fn sp(s: &Spread, prec: usize) -> String {
    format!("{:.p$} [{:.p$}–{:.p$}]", s.median, s.min, s.max, p = prec)
}

/// The Markdown.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.config;
    let _ = writeln!(s, "# dvma bench kernel\n");
    let _ = writeln!(
        s,
        "Machine: {} ({} host cores); the kernel booted with {} vCPU{}. Medium: `{}`{}. \
         Issuer: `{}` ({}). \
         {} B I/Os; {} repetitions of a {} ms window per workload, every pair booted fresh, \
         pairs interleaved (reverse order on odd repetitions); {:.0} s in all.\n",
        r.machine.cpu_model,
        r.machine.host_cores,
        r.machine.vcpus,
        match c.pinned_cpu {
            Some(cpu) => format!(", every thread of the run pinned to host CPU {cpu}"),
            None => ", threads not pinned".to_string(),
        },
        c.medium,
        if c.medium == "ram" {
            " (zero latency: commands complete from memory on the doorbell, through the DVMA window)"
        } else {
            " (the DMA disk on a backing file, worker threads; the vCPU idles while the device works, \
             and its idle polling counts in its CPU time; the device threads' time does not)"
        },
        c.issuer,
        if c.issuer == "thread" {
            "the load generator's kernel thread issues every I/O; each completion hands its buf back and wakes it"
        } else {
            "each completion's callback issues the next I/O in the completion's own context"
        },
        c.io_size,
        c.reps,
        c.window_ms,
        c.seconds
    );
    let _ = writeln!(
        s,
        "Noise: the range (max − min) of CPU ns per I/O over repetitions is {:.1}% of the median \
         for the median pair, {:.1}% at worst; for I/Os per second {:.1}% (median).\n",
        r.noise.cpu_ns_rel_range_median * 100.0,
        r.noise.cpu_ns_rel_range_max * 100.0,
        r.noise.iops_rel_range_median * 100.0
    );
    let _ = writeln!(
        s,
        "Figures are `median [min–max]` over repetitions. Rank: 1 + the pairs whose whole range \
         of CPU ns per I/O lies below this pair's; pairs whose ranges overlap share a rank \
         (ties, not ranked). CPU ns is the vCPU threads' CPU time over the window divided by the \
         I/Os (with `ram`, the device's copy is done by the vCPU and included); IOPS/CPU is wall \
         clock, so it also drops when the host gives the vCPU's core to another thread (busy = \
         CPU time / wall time). The ranking is by CPU ns per I/O.\n"
    );
    answer_section(&mut s, r);
    for w in &c.workloads {
        let _ = writeln!(s, "## {w}\n");
        let _ = writeln!(
            s,
            "| rank | dvma/completion | CPU ns/IO | IOPS/CPU | busy | maps/IO | signals/IO | switches/IO | ASTs pushed/IO (run) | DVMA pages peak / reserved | tied with |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for x in r
            .results
            .iter()
            .filter(|x| format!("{} qd{}", x.workload, x.depth) == *w)
        {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} ({:.3}) | {} / {} | {} |",
                x.rank,
                x.pair(),
                sp(&x.cpu_ns_per_io, 0),
                sp(&x.iops_per_cpu, 0),
                x.vcpu_busy.median,
                x.maps_per_io.median,
                x.signals_per_io.median,
                x.switches_per_io.median,
                x.asts_per_io.median,
                x.ast_runs_per_io.median,
                x.dvma_pages_peak,
                x.dvma_pages_reserved,
                if x.tied_with.is_empty() {
                    "—".to_string()
                } else {
                    x.tied_with.join(", ")
                }
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "## Protection: what a device can still reach after unload\n"
    );
    let _ = writeln!(s, "| dvma | reachable after unload |\n|---|---|");
    for m in kern::bus_dma::DvmaMode::ALL {
        let _ = writeln!(s, "| {} | {} |", m.name(), r.protections[m.name()]);
    }
    let _ = writeln!(s);
    if !r.verify.is_empty() {
        let _ = writeln!(
            s,
            "## Verify\n\nA pattern written over {} MiB, half of it rewritten at random, all of it read back and checked.\n",
            super::VERIFY_BYTES >> 20
        );
        let _ = writeln!(
            s,
            "| pair | I/Os | errors | mismatches |\n|---|---|---|---|"
        );
        for v in &r.verify {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                v.pair, v.ios, v.errors, v.mismatches
            );
        }
        let _ = writeln!(s);
    }
    variants_section(&mut s, r);
    split_section(&mut s, r);
    curve_section(&mut s, r);
    let _ = writeln!(
        s,
        "## Repeatability\n\nOne run shows its own spread (above); whether separate runs agree \
         is checked across their `kernel.json` files with `docs/bench/scripts/kernel-agree.py` \
         (docs/bench/kernel/README.md: three full runs, every pair within 10%).\n\n\
         The fields of `kernel.json` are documented in `src/bench/kernel/report.rs`."
    );
    s
}

/// The heading of the verdicts (tests look for it).
pub const ANSWER_HEADING: &str = "## The answer: the mail's questions, from this run's numbers";

fn answer_section(s: &mut String, r: &Report) {
    let _ = writeln!(s, "{ANSWER_HEADING}\n");
    let _ = writeln!(
        s,
        "Written by the bench from the figures below; a difference is `median [min – max]` \
         (the widest range of the difference over repetitions), and \"tie\" where the two ranges \
         overlap: nothing inside the noise is ranked.\n"
    );
    for v in &r.verdicts {
        let _ = writeln!(s, "**{}** {}\n", v.question, v.text);
    }
}

fn variants_section(s: &mut String, r: &Report) {
    if r.variants.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "## The reference pair under the machine's variants\n\n`{}`, booted in every \
         repetition, interleaved with the pairs, with the interrupt stack off and with spl \
         `mask`. CPU ns per I/O and its `intr_entry`, `spl` and `dispatch` parts, \
         `median [min–max]` over repetitions.\n",
        r.config.ref_pair.as_deref().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "| variant | workload | CPU ns/IO | intr_entry | spl | dispatch |\n|---|---|---|---|---|---|"
    );
    for v in &r.variants {
        for x in &v.results {
            let _ = writeln!(
                s,
                "| {} | {} qd{} | {} | {} | {} | {} |",
                v.name,
                x.workload,
                x.depth,
                sp(&x.cpu_ns_per_io, 0),
                sp(&x.split_ns_per_io["intr_entry"], 0),
                sp(&x.split_ns_per_io["spl"], 0),
                sp(&x.split_ns_per_io["dispatch"], 0)
            );
        }
    }
    let _ = writeln!(s);
}

/// What each part of the split holds (the table's legend).
const PART_LEGEND: &str = "`thread`: the load generator and other thread code; `spl`: inside \
    `splraise`/`splx` (with `mask`, the host's `sigprocmask`), not the time at a raised level; \
    `bus_dma`: `dmamap_load`/`unload` and `shadow`'s bounce copy in `dmamap_sync` (IOMMU map \
    and unmap included); `intr_entry`: the signal entry and exit stubs, `intr::trap` and the vector dispatch loop; `dispatch`: softint \
    passes, wake-ups, sleeps and thread switches, AST pushes and upcalls (the trampoline \
    included); `driver`: sd's strategy and completion work, `biodone`; `device`: the doorbell \
    (with `ram`, the device's copy of the data); `idle`: the idle loop; `other`: none of these.";

/// The file name of workload `w`'s split plot.
fn split_plot_name(w: &str) -> String {
    format!("kernel-split-{}.svg", w.replace(' ', "-"))
}

/// The file name of the curve's plot.
const CURVE_PLOT: &str = "kernel-iops-depth.svg";

fn split_section(s: &mut String, r: &Report) {
    let sc = &r.statclock;
    let _ = writeln!(s, "## Where the CPU time goes (statclock)\n");
    if sc.period_us == 0 {
        let _ = writeln!(s, "The statclock was off (`--statclock-us 0`): no split.\n");
        return;
    }
    let _ = writeln!(
        s,
        "Each vCPU was sampled every {} µs of its CPU time, as BSD's statclock samples \
         `cp_time`, by {}; {:.0} samples per CPU second were delivered. Samples per window: {:.0} [{:.0}–{:.0}]. A cell is the median \
         over repetitions of the window's CPU ns per I/O times the part's share of the window's \
         samples (a part with a share *p* of *n* samples is known to about ±√(p(1−p)/n) of the \
         total); `median [min–max]` over repetitions, 0 where no repetition sampled the part. The \
         statclock's own cost on {}, CPU ns per I/O with it on / off − 1 over every \
         pair and repetition: {:+.1}% [{:+.1}% – {:+.1}%] (one window each, so within the \
         windows' noise).\n",
        sc.period_us,
        sc.clock,
        sc.samples_per_cpu_second,
        sc.samples_per_window.median,
        sc.samples_per_window.min,
        sc.samples_per_window.max,
        sc.overhead_workload,
        sc.overhead_rel.median * 100.0,
        sc.overhead_rel.min * 100.0,
        sc.overhead_rel.max * 100.0,
    );
    let _ = writeln!(s, "{PART_LEGEND}\n");
    for w in &r.config.workloads {
        let _ = writeln!(s, "### {w}: CPU ns per I/O by part\n");
        let _ = writeln!(
            s,
            "![CPU ns per I/O by part, {w}]({})\n",
            split_plot_name(w)
        );
        let _ = write!(s, "| dvma/completion | CPU ns/IO |");
        for part in &sc.parts {
            let _ = write!(s, " {part} |");
        }
        let _ = writeln!(s, " samples |");
        let _ = writeln!(s, "|---|---|{}---|", "---|".repeat(sc.parts.len()));
        for x in r
            .results
            .iter()
            .filter(|x| format!("{} qd{}", x.workload, x.depth) == *w)
        {
            let _ = write!(s, "| {} | {:.0} |", x.pair(), x.cpu_ns_per_io.median);
            for part in &sc.parts {
                let v = &x.split_ns_per_io[part];
                if v.max == 0.0 {
                    let _ = write!(s, " 0 |");
                } else {
                    let _ = write!(s, " {} |", sp(v, 0));
                }
            }
            let _ = writeln!(s, " {} |", x.statclock_samples);
        }
        let _ = writeln!(s);
    }
}

fn curve_section(s: &mut String, r: &Report) {
    if r.curve.is_empty() {
        return;
    }
    let _ = writeln!(s, "## I/Os per second against the queue depth\n");
    let _ = writeln!(
        s,
        "The {} best pairs (lowest geometric mean over the workloads of their median CPU ns per \
         I/O), each booted fresh per repetition, on {} at each depth, without the statclock. \
         I/Os per second per vCPU, `median [min–max]` over repetitions.\n",
        r.curve.len(),
        r.curve[0].workload
    );
    let _ = writeln!(
        s,
        "![I/Os per second per vCPU against the queue depth]({CURVE_PLOT})\n"
    );
    let _ = write!(s, "| dvma/completion |");
    for d in &r.config.curve_depths {
        let _ = write!(s, " qd{d} |");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|".repeat(r.config.curve_depths.len()));
    for c in &r.curve {
        let _ = write!(s, "| {}/{} |", c.dvma, c.completion);
        for pt in &c.points {
            let _ = write!(s, " {} |", sp(&pt.iops_per_cpu, 0));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s);
}

/// Draw the plots; returns (file name, SVG) pairs.
fn plots(r: &Report) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    if r.statclock.period_us > 0 {
        for w in &r.config.workloads {
            let bars: Vec<::report::StackedBar> = r
                .results
                .iter()
                .filter(|x| format!("{} qd{}", x.workload, x.depth) == *w)
                .map(|x| ::report::StackedBar {
                    label: x.pair(),
                    values: r
                        .statclock
                        .parts
                        .iter()
                        .map(|p| x.split_ns_per_io[p].median)
                        .collect(),
                })
                .collect();
            let svg = ::report::plot_stacked(
                &format!("{w}: CPU ns per I/O by part (medians; statclock samples)"),
                "CPU ns per I/O",
                &r.statclock.parts,
                &bars,
            )?;
            out.push((split_plot_name(w), svg));
        }
    }
    if !r.curve.is_empty() {
        let curves: Vec<::report::Curve> = r
            .curve
            .iter()
            .map(|c| ::report::Curve {
                label: format!("{}/{}", c.dvma, c.completion),
                points: c
                    .points
                    .iter()
                    .map(|p| {
                        (
                            p.depth as f64,
                            p.iops_per_cpu.median,
                            p.iops_per_cpu.min,
                            p.iops_per_cpu.max,
                        )
                    })
                    .collect(),
            })
            .collect();
        let svg = ::report::plot_curves(
            &format!(
                "{}: I/Os per second per vCPU against the queue depth (min–max whiskers)",
                r.curve[0].workload
            ),
            "queue depth (log scale)",
            "I/Os per second per vCPU",
            &curves,
        )?;
        out.push((CURVE_PLOT.to_string(), svg));
    }
    Ok(out)
}

/// Write the plots, `kernel.md` and `kernel.json` into `dir` (the plots'
/// names go into the report); returns the Markdown and the JSON.
pub fn write(r: &mut Report, dir: &Path) -> Result<(String, String), String> {
    let svgs = plots(r)?;
    r.plots = svgs.iter().map(|(n, _)| n.clone()).collect();
    let md = markdown(r);
    let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    let files = svgs
        .iter()
        .map(|(n, t)| (n.as_str(), t))
        .chain([("kernel.md", &md), ("kernel.json", &json)]);
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok((md, json))
}
