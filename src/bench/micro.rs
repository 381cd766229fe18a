//! `dvma bench micro`: the kernel's mechanisms, measured in one run.
//!
//! Every figure is the median of several repetitions in one process, and
//! the ratios compare figures of the same run: the machine is shared and
//! noisy, so absolute numbers drift while ratios mostly do not.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::*};

use kern::ast::{ast_establish, ast_push};
use kern::intr::{intr_establish, intr_post};
use kern::sched::{kthread_create, yield_now};
use kern::softint::{softint_establish, softint_schedule};
use kern::{Ipl, spl};
use machine::{Machine, MachineConfig, SplImpl};
use serde::Serialize;

/// Arguments of `dvma bench micro`.
#[derive(clap::Args, Debug)]
pub struct MicroArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Measure only these (comma-separated: spl, switch, kthread, softint, intr, ast, dvma).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// The figures of `dvma bench micro`.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Micro {
    pub spl_pair_ns: SplPair,
    pub switch_ns: Switch,
    pub softint_dispatch_ns: f64,
    pub intr_ns: IntrNs,
    pub ast_ns: AstNs,
    /// `{"4k": {mode: ns}, "64k": {mode: ns}}`: load+sync+unload per I/O.
    pub dvma_ns: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
    /// The full DVMA figures.
    pub dvma: Option<super::dvma::DvmaFigures>,
    pub ratios: Ratios,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct SplPair {
    pub lazy: f64,
    pub mask: f64,
    /// The same load/compare/store/store/load chain on a bare atomic byte:
    /// the store-to-load forwarding latency that bounds any per-CPU IPL word
    /// raised and lowered back to back on this CPU.
    pub floor: f64,
}
#[derive(Serialize, Debug, Clone, Default)]
pub struct Switch {
    pub kthread: f64,
    /// A bare `cpu_switchto` between two stacks, no kernel bookkeeping.
    pub raw: f64,
    pub os_thread: f64,
    pub os_thread_cross_cpu: f64,
}
#[derive(Serialize, Debug, Clone, Default)]
pub struct IntrNs {
    pub intrstack: f64,
    pub nostack: f64,
}
#[derive(Serialize, Debug, Clone, Default)]
pub struct AstNs {
    pub plain: f64,
    pub with_ast: f64,
    /// What each variant did (CPU 0's counters over its timed loops): the
    /// figures above are of interrupts with and without a pushed frame
    /// only if these say so.
    pub counts: AstCounts,
}
#[derive(Serialize, Debug, Clone, Default)]
pub struct AstCounts {
    pub plain: PhaseCounts,
    pub with_ast: PhaseCounts,
}
#[derive(Serialize, Debug, Clone, Default)]
pub struct PhaseCounts {
    /// Interrupts posted.
    pub posted: u64,
    /// Runs of the interrupt handler.
    pub interrupts: u64,
    /// AST frames pushed at interrupt return on the CPU (`ast_pushed`):
    /// the bench's, and any other AST's of that window (the clock's
    /// round-robin preemption can push one).
    pub ast_pushed: u64,
    /// Runs of the bench's own AST handler.
    pub ast_handlers: u64,
}
#[derive(Serialize, Debug, Clone, Default)]
pub struct Ratios {
    pub spl_mask_over_lazy: f64,
    pub switch_os_over_kthread: f64,
    pub intr_stack_over_nostack: f64,
    pub ast_overhead_pct: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn now() -> u64 {
    kern::kernel().md().nanotime()
}

fn boot(ncpu: usize, spl_impl: SplImpl, intr_stack: bool) -> Result<Machine, String> {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = ncpu;
    cfg.kernel.spl = spl_impl;
    cfg.intr_stack = intr_stack;
    Machine::boot(cfg).map_err(|e| e.to_string())
}

fn err(e: machine::MachineError) -> String {
    e.to_string()
}

/// The dependency chain of a lazy spl pair on a bare per-CPU word, without
/// any kernel: what the hardware makes it cost at best.
#[inline(never)]
fn floor_loop(n: u64) -> u64 {
    use std::sync::atomic::{AtomicU8, compiler_fence};
    static IPL: AtomicU8 = AtomicU8::new(0);
    static PENDING: AtomicU64 = AtomicU64::new(0);
    let mut hits = 0;
    for _ in 0..n {
        let old = IPL.load(Relaxed);
        if old < 5 {
            IPL.store(5, Relaxed);
        }
        compiler_fence(SeqCst);
        IPL.store(old, Relaxed);
        compiler_fence(SeqCst);
        if PENDING.load(Relaxed) >> old != 0 {
            hits += 1;
        }
    }
    hits
}

fn spl_floor(reps: usize) -> f64 {
    let n = 20_000_000;
    median(
        (0..reps)
            .map(|_| {
                let t0 = std::time::Instant::now();
                std::hint::black_box(floor_loop(n));
                t0.elapsed().as_nanos() as f64 / n as f64
            })
            .collect(),
    )
}

#[inline(never)]
fn spl_loop(n: u64) {
    for _ in 0..n {
        // The IPL word is an atomic the compiler must update on every
        // iteration: nothing here can be optimised away.
        let s = spl::splbio();
        drop(s);
    }
}

/// ns per splbio()+splx() pair.
fn spl_pair(spl_impl: SplImpl, reps: usize) -> Result<f64, String> {
    let m = boot(1, spl_impl, true)?;
    let n: u64 = if spl_impl == SplImpl::Lazy {
        20_000_000
    } else {
        200_000
    };
    let v = m
        .run(0, "bench-spl", move |_| {
            (0..reps)
                .map(|_| {
                    let t0 = now();
                    spl_loop(n);
                    (now() - t0) as f64 / n as f64
                })
                .collect::<Vec<_>>()
        })
        .map_err(err)?;
    m.shutdown().map_err(err)?;
    Ok(median(v))
}

/// ns per kernel-thread switch (two threads yielding to each other).
fn kthread_switch(reps: usize) -> Result<f64, String> {
    let m = boot(2, SplImpl::Lazy, true)?;
    let n: u64 = 2_000_000;
    let v = m
        .run(1, "bench-switch", move |ctx| {
            (0..reps)
                .map(|_| {
                    let ready = Arc::new(AtomicU64::new(0));
                    let span = Arc::new([AtomicU64::new(u64::MAX), AtomicU64::new(0)]);
                    let sw0 = kern::kernel().cpu(0).stats.switches.get();
                    let ts: Vec<_> = (0..2)
                        .map(|_| {
                            let (r, s) = (ready.clone(), span.clone());
                            kthread_create(Some(0), "yielder", move |ctx| {
                                r.fetch_add(1, SeqCst);
                                while r.load(SeqCst) < 2 {
                                    yield_now(ctx);
                                }
                                s[0].fetch_min(now(), SeqCst);
                                for _ in 0..n {
                                    yield_now(ctx);
                                }
                                s[1].fetch_max(now(), SeqCst);
                            })
                            .expect("kthread_create")
                        })
                        .collect();
                    for t in &ts {
                        let _ = t.join(ctx);
                    }
                    let switches = kern::kernel().cpu(0).stats.switches.get() - sw0;
                    let dt = span[1].load(SeqCst).saturating_sub(span[0].load(SeqCst));
                    dt as f64 / (switches.max(1)) as f64
                })
                .collect::<Vec<_>>()
        })
        .map_err(err)?;
    m.shutdown().map_err(err)?;
    Ok(median(v))
}

/// (ns per self-interrupt with a trivial handler, ns with an AST pushed,
/// what each variant did)
fn intr_and_ast(
    intr_stack: bool,
    with_ast: bool,
    reps: usize,
) -> Result<(f64, f64, AstCounts), String> {
    let m = boot(1, SplImpl::Lazy, intr_stack)?;
    let intr_runs = Arc::new(AtomicU64::new(0));
    let i2 = intr_runs.clone();
    let ast_runs = Arc::new(AtomicU64::new(0));
    let a2 = ast_runs.clone();
    let ast = ast_establish("bench", move |_| {
        a2.fetch_add(1, Relaxed);
    })
    .map_err(|e| e.to_string())?;
    let push = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let p2 = push.clone();
    let v = intr_establish(Ipl::Bio, "bench", move |ctx| {
        i2.fetch_add(1, Relaxed);
        if p2.load(Relaxed) {
            ast_push(ctx, &ast);
        }
    })
    .map_err(|e| e.to_string())?;
    let n: u64 = 100_000;
    let (plain, asted, counts) = m
        .run(0, "bench-intr", move |_| {
            let mut plain = Vec::new();
            let mut asted = Vec::new();
            let mut counts = AstCounts::default();
            let st = &kern::kernel().cpu(0).stats;
            for _ in 0..reps {
                for with in [false, true] {
                    if with && !with_ast {
                        continue;
                    }
                    push.store(with, Relaxed);
                    let before = (
                        intr_runs.load(Relaxed),
                        st.ast_pushed.get(),
                        ast_runs.load(Relaxed),
                    );
                    let t0 = now();
                    for _ in 0..n {
                        intr_post(0, v);
                    }
                    let ns = (now() - t0) as f64 / n as f64;
                    let c = if with {
                        asted.push(ns);
                        &mut counts.with_ast
                    } else {
                        plain.push(ns);
                        &mut counts.plain
                    };
                    c.posted += n;
                    c.interrupts += intr_runs.load(Relaxed) - before.0;
                    c.ast_pushed += st.ast_pushed.get() - before.1;
                    c.ast_handlers += ast_runs.load(Relaxed) - before.2;
                }
            }
            (plain, asted, counts)
        })
        .map_err(err)?;
    let s = m.shutdown().map_err(err)?;
    if with_ast {
        let pushed = s.total(|c| c.ast_pushed);
        if pushed < (n * reps as u64) / 2 {
            return Err(format!(
                "only {pushed} AST frames were pushed: the measurement is not of pushed frames"
            ));
        }
    }
    Ok((
        median(plain),
        if with_ast { median(asted) } else { 0.0 },
        counts,
    ))
}

/// ns from an interrupt handler's return to the start of the softint it
/// scheduled.
fn softint_dispatch(reps: usize) -> Result<f64, String> {
    let m = boot(1, SplImpl::Lazy, true)?;
    let t_end = Arc::new(AtomicU64::new(0));
    let sum = Arc::new(AtomicU64::new(0));
    let cnt = Arc::new(AtomicU64::new(0));
    let (te, su, cn) = (t_end.clone(), sum.clone(), cnt.clone());
    let si = softint_establish(Ipl::SoftBio, "bench", move |_| {
        let t = now();
        su.fetch_add(t.saturating_sub(te.load(Relaxed)), Relaxed);
        cn.fetch_add(1, Relaxed);
    })
    .map_err(|e| e.to_string())?;
    let te2 = t_end.clone();
    let v = intr_establish(Ipl::Bio, "bench", move |_| {
        softint_schedule(&si);
        te2.store(now(), Relaxed);
    })
    .map_err(|e| e.to_string())?;
    let n: u64 = 50_000;
    let r = m
        .run(0, "bench-softint", move |_| {
            (0..reps)
                .map(|_| {
                    sum.store(0, Relaxed);
                    cnt.store(0, Relaxed);
                    for _ in 0..n {
                        intr_post(0, v);
                    }
                    sum.load(Relaxed) as f64 / cnt.load(Relaxed).max(1) as f64
                })
                .collect::<Vec<_>>()
        })
        .map_err(err)?;
    m.shutdown().map_err(err)?;
    Ok(median(r))
}

/// Run the micro-benchmarks named in `only` (all if empty).
pub fn measure(reps: usize, only: &[String], progress: &dyn Fn(&str)) -> Result<Micro, String> {
    let reps = reps.max(1);
    let want = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    let mut m = Micro::default();
    if want("spl") {
        progress("spl pair, lazy");
        m.spl_pair_ns.lazy = spl_pair(SplImpl::Lazy, reps)?;
        progress("spl pair, mask");
        m.spl_pair_ns.mask = spl_pair(SplImpl::Mask, reps)?;
        m.spl_pair_ns.floor = spl_floor(reps);
    }
    if want("switch") || want("kthread") {
        progress("kernel thread switch");
        m.switch_ns.kthread = kthread_switch(reps)?;
        m.switch_ns.raw = median(
            (0..reps)
                .map(|_| machine::host::raw_switch_ns(5_000_000))
                .collect(),
        );
    }
    if want("switch") {
        progress("OS thread switch");
        let os = |same| {
            median(
                (0..reps)
                    .map(|_| machine::host::os_thread_switch_ns(20_000, same))
                    .collect(),
            )
        };
        m.switch_ns.os_thread = os(true);
        m.switch_ns.os_thread_cross_cpu = os(false);
    }
    if want("softint") {
        progress("softint dispatch");
        m.softint_dispatch_ns = softint_dispatch(reps)?;
    }
    if want("intr") {
        progress("interrupt, no interrupt stack");
        m.intr_ns.nostack = intr_and_ast(false, false, reps)?.0;
    }
    if want("dvma") {
        let d = super::dvma::measure(reps.min(3), 40, &[], &|w| progress(&format!("DVMA {w}")))?;
        m.dvma_ns = d.ns_by_size();
        m.dvma = Some(d);
    }
    if want("intr") || want("ast") {
        progress("interrupt and AST, interrupt stack");
        let (plain, with, counts) = intr_and_ast(true, true, reps)?;
        m.intr_ns.intrstack = plain;
        m.ast_ns.plain = plain;
        m.ast_ns.with_ast = with;
        m.ast_ns.counts = counts;
    }
    m.ratios = Ratios {
        spl_mask_over_lazy: m.spl_pair_ns.mask / m.spl_pair_ns.lazy,
        switch_os_over_kthread: m.switch_ns.os_thread / m.switch_ns.kthread,
        intr_stack_over_nostack: m.intr_ns.intrstack / m.intr_ns.nostack,
        ast_overhead_pct: (m.ast_ns.with_ast / m.ast_ns.plain - 1.0) * 100.0,
    };
    Ok(m)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT MET" }
}

/// Human-readable table.
pub fn render(m: &Micro) -> String {
    let r = &m.ratios;
    let mut s = String::new();
    if let Some(d) = &m.dvma {
        s += &super::dvma::render(d);
    }
    s += &format!(
        "spl pair (splbio+splx)      lazy {:>9.2} ns   mask {:>9.1} ns   mask/lazy {:>7.0}x   target lazy <= 2 ns and >= 100x: {}\n",
        m.spl_pair_ns.lazy,
        m.spl_pair_ns.mask,
        r.spl_mask_over_lazy,
        verdict(m.spl_pair_ns.lazy <= 2.0 && r.spl_mask_over_lazy >= 100.0)
    );
    if m.spl_pair_ns.floor > 0.0 {
        s += &format!(
            "  (the bare load/store chain of a per-CPU IPL word costs {:.2} ns on this CPU: lazy spl is {:.2}x that floor)\n",
            m.spl_pair_ns.floor,
            m.spl_pair_ns.lazy / m.spl_pair_ns.floor
        );
    }
    s += &format!(
        "thread switch               kthread {:>6.2} ns   OS thread {:>9.0} ns (across CPUs {:>7.0} ns)   OS/kthread {:>6.0}x   target kthread <= 10 ns: {}\n",
        m.switch_ns.kthread,
        m.switch_ns.os_thread,
        m.switch_ns.os_thread_cross_cpu,
        r.switch_os_over_kthread,
        verdict(m.switch_ns.kthread <= 10.0)
    );
    if m.switch_ns.raw > 0.0 {
        s += &format!(
            "  (a bare cpu_switchto between two stacks costs {:.2} ns: the kernel's switch is {:.2}x that floor)\n",
            m.switch_ns.raw,
            m.switch_ns.kthread / m.switch_ns.raw
        );
    }
    s += &format!(
        "softint dispatch            {:>6.1} ns after its interrupt's return   target <= 50 ns: {}\n",
        m.softint_dispatch_ns,
        verdict(m.softint_dispatch_ns <= 50.0)
    );
    s += &format!(
        "interrupt (signal to self)  intr stack {:>7.0} ns   no stack {:>7.0} ns   ratio {:.3}\n",
        m.intr_ns.intrstack, m.intr_ns.nostack, r.intr_stack_over_nostack
    );
    s += &format!(
        "AST (pushed frame)          plain {:>7.0} ns   with AST {:>7.0} ns   +{:.1}%   target <= 15%: {}\n",
        m.ast_ns.plain,
        m.ast_ns.with_ast,
        r.ast_overhead_pct,
        verdict(r.ast_overhead_pct <= 15.0)
    );
    s
}

pub fn main(a: MicroArgs) -> Result<ExitCode, String> {
    let quiet = a.json;
    let m = measure(a.reps, &a.only, &|what| {
        if !quiet {
            eprintln!("measuring {what} ...");
        }
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&m).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", render(&m));
    }
    Ok(ExitCode::SUCCESS)
}
