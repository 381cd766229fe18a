//! The sections `dvma bench` adds to the report crate's `report.md`: how
//! the run was made, where the time goes against nbdkit, the options
//! compared, and next steps. Every figure comes from this run's
//! [`Results`]; the text around it only says what the figures say.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use report::{
    Aggregate, ConfigKey, Metric, PEERS, Results, Stat, WorkloadAnalysis, analyze, esc, us,
};

use super::plan::{self, Phase, Plan};

/// The workloads on which the best dvma pair should at least match nbdkit.
pub const GOALS: [&str; 4] = [
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "seqread-1m-qd8",
    "seqwrite-1m-qd8",
];

/// The baseline peer.
const BASELINE: &str = PEERS[0];

/// Host-level figures of one run, per I/O.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    /// The run's configuration.
    pub key: ConfigKey,
    /// The run's workload.
    pub workload: String,
    /// User CPU µs per I/O.
    pub user_us: f64,
    /// System CPU µs per I/O.
    pub sys_us: f64,
    /// Host context switches per I/O (every thread of the server).
    pub switches: Option<f64>,
}

/// Medians of [`HostRow`]s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostMedian {
    /// System CPU share of the server's CPU.
    pub sys_share: f64,
    /// Host context switches per I/O.
    pub switches: Option<f64>,
}

/// The medians of the rows of one configuration on one workload.
pub fn host_median(rows: &[HostRow], key: &ConfigKey, workload: &str) -> Option<HostMedian> {
    let mine: Vec<&HostRow> = rows
        .iter()
        .filter(|r| r.key == *key && r.workload == workload)
        .collect();
    let med = |v: Vec<f64>| Stat::of(&v).map(|s| s.median);
    let user = med(mine.iter().map(|r| r.user_us).collect())?;
    let sys = med(mine.iter().map(|r| r.sys_us).collect())?;
    let sw: Vec<f64> = mine.iter().filter_map(|r| r.switches).collect();
    Some(HostMedian {
        sys_share: if user + sys > 0.0 {
            sys / (user + sys)
        } else {
            0.0
        },
        switches: med(sw),
    })
}

/// One peer setting tried in [`Phase::Tune`].
#[derive(Debug, Clone, PartialEq)]
pub struct PeerTrial {
    /// The peer.
    pub peer: String,
    /// Its setting (a label of [`plan::PEER_SETTINGS`]).
    pub setting: String,
    /// IOPS per workload of its run(s) (median).
    pub iops: Vec<(String, f64)>,
    /// Whether it serves the rest of the run.
    pub chosen: bool,
}

/// What the run knows beyond [`Results`].
pub struct Notes<'a> {
    /// The plan that ran.
    pub plan: &'a Plan,
    /// The command line, as run.
    pub command: String,
    /// `fio --version`.
    pub fio_version: &'a str,
    /// `(peer, --version)` of the installed peers.
    pub peer_versions: Vec<(String, String)>,
    /// Wanted peers that are not installed.
    pub missing: &'a [String],
    /// An example command line per server kind.
    pub commands: &'a BTreeMap<String, String>,
    /// Phase-1 scores of the pairs, best first.
    pub scores: &'a [((String, String), f64)],
    /// The best pair.
    pub best: Option<&'a (String, String)>,
    /// What failed.
    pub failures: &'a [String],
    /// Host-level figures of every run.
    pub host: &'a [HostRow],
    /// Warnings.
    pub warnings: &'a [String],
    /// The estimate printed before the run.
    pub estimate: Duration,
    /// Clock ticks per second of `/proc/PID/stat`.
    pub clk_tck: u64,
    /// The peers' settings tried in phase 0.
    pub peer_trials: &'a [PeerTrial],
}

fn one_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or("");
    let more = s.lines().count() > 1;
    format!("{}{}", esc(first), if more { " …" } else { "" })
}

/// Appends the sections to `report_md`.
pub fn append(report_md: &Path, results: &Results, n: &Notes<'_>) -> Result<(), String> {
    let mut md = std::fs::read_to_string(report_md)
        .map_err(|e| format!("reading {}: {e}", report_md.display()))?;
    if !md.ends_with('\n') {
        md.push('\n');
    }
    md.push_str(&render(results, n));
    std::fs::write(report_md, md).map_err(|e| format!("writing {}: {e}", report_md.display()))
}

/// Inserts `section` into `report_md` right after its headline section
/// (before the next `## ` heading), or at the end.
pub fn insert_after_headline(report_md: &Path, section: &str) -> Result<(), String> {
    let md = std::fs::read_to_string(report_md)
        .map_err(|e| format!("reading {}: {e}", report_md.display()))?;
    let at = md
        .find("## Headline")
        .and_then(|h| md[h + 1..].find("\n## ").map(|n| h + 1 + n + 1))
        .unwrap_or(md.len());
    let mut out = String::with_capacity(md.len() + section.len());
    out.push_str(&md[..at]);
    out.push_str(section);
    out.push_str(&md[at..]);
    std::fs::write(report_md, out).map_err(|e| format!("writing {}: {e}", report_md.display()))
}

/// The sections, as markdown.
pub fn render(results: &Results, n: &Notes<'_>) -> String {
    let analysis = analyze(results);
    let mut out = String::new();
    where_time_goes(&mut out, &analysis.workloads, n);
    options_compared(&mut out, &analysis.workloads, results, n);
    next_steps(&mut out, &analysis.workloads, results, n);
    how_made(&mut out, results, n);
    out
}

/// One line per workload for the terminal: best pair and ratio to nbdkit.
pub fn headline_lines(results: &Results) -> Vec<String> {
    let analysis = analyze(results);
    analysis
        .workloads
        .iter()
        .filter_map(|w| {
            let best = w.best_dvma()?;
            let mut s = format!(
                "{:<18} best {} {} {}",
                w.workload,
                w.label(&best.key),
                w.metric.format(best.value().median),
                w.metric.unit()
            );
            for p in PEERS {
                if let Some(r) = w.ratio_to(best, p) {
                    let _ = write!(s, ", {:.2}× {p}", r.value);
                }
            }
            Some(s)
        })
        .collect()
}

fn where_time_goes(out: &mut String, workloads: &[WorkloadAnalysis], n: &Notes<'_>) {
    let _ = writeln!(
        out,
        "## Where the time goes: best dvma pair vs {BASELINE}\n"
    );
    let Some(_) = workloads.iter().find_map(|w| w.peer(BASELINE)) else {
        let _ = writeln!(
            out,
            "No {BASELINE} runs in this report{}: nothing to compare against.\n",
            if n.missing.iter().any(|m| m == BASELINE) {
                format!(
                    " ({BASELINE} is not installed: `{}`)",
                    super::server::install_hint(BASELINE)
                )
            } else {
                String::new()
            }
        );
        return;
    };
    let _ = writeln!(
        out,
        "The goal: the best dvma pair at least matches {BASELINE} on {}.\n",
        GOALS.join(", ")
    );
    let _ = writeln!(
        out,
        "| workload | best dvma | value | vs {BASELINE} | goal | CPU µs/I/O (system %) dvma · {BASELINE} | host context switches/I/O dvma · {BASELINE} | dvma interrupts (host signals) · softints · kernel switches · ASTs per I/O | p50 µs dvma · {BASELINE} | p99 µs dvma · {BASELINE} |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---|---:|---:|---:|---:|---:|");
    for w in workloads {
        let (Some(best), Some(peer)) = (w.best_dvma(), w.peer(BASELINE)) else {
            continue;
        };
        let ratio = w.ratio_to(best, BASELINE);
        let goal = if !GOALS.contains(&w.workload.as_str()) {
            "—".to_string()
        } else {
            match ratio {
                Some(r) if r.value >= 1.0 => "met".to_string(),
                Some(r) => format!("**not met** ({:+.0}%)", (r.value - 1.0) * 100.0),
                None => "?".to_string(),
            }
        };
        let events = best.per_io.map_or("—".to_string(), |p| {
            format!(
                "{:.2} ({:.2}) · {:.2} · {:.2} · {:.2}",
                p.interrupts, p.signals, p.softints, p.ctx_switches, p.asts
            )
        });
        let (hd, hp) = (
            host_median(n.host, &best.key, &w.workload),
            host_median(n.host, &peer.key, &w.workload),
        );
        let share = |h: Option<HostMedian>| {
            h.map_or(String::new(), |h| format!(" ({:.0}%)", h.sys_share * 100.0))
        };
        let sw = |h: Option<HostMedian>| {
            h.and_then(|h| h.switches)
                .map_or("—".to_string(), |v| format!("{v:.2}"))
        };
        let _ = writeln!(
            out,
            "| {} | `{}` | {} {} | {} | {} | {}{} · {}{} | {} · {} | {} | {} · {} | {} · {} |",
            esc(&w.workload),
            w.label(&best.key),
            w.metric.format(best.value().median),
            w.metric.unit(),
            ratio.map_or("—".to_string(), |r| format!("{:.2}×", r.value)),
            goal,
            us(best.cpu_us_per_io.median),
            share(hd),
            us(peer.cpu_us_per_io.median),
            share(hp),
            sw(hd),
            sw(hp),
            events,
            us(best.p50_us.median),
            us(peer.p50_us.median),
            us(best.p99_us.median),
            us(peer.p99_us.median),
        );
    }
    let _ = writeln!(
        out,
        "\nServer CPU per I/O is user + system time of the whole server process over fio's measured window, divided by fio's I/O count (system %: the part spent in the host kernel); host context switches are those of every server thread (`/proc/PID/task/*/status`); on this machine fio shares the same {} CPUs.\n",
        n.plan.cpus
    );
}

/// Per row value (mode or completion), per workload: its best relative
/// throughput (to the best pair on that workload) and which pair gave it.
fn by_axis<'a>(
    w: &'a WorkloadAnalysis,
    key: impl Fn(&Aggregate) -> Option<&String>,
    other: impl Fn(&Aggregate) -> Option<&String>,
    primary: &[&Aggregate],
) -> BTreeMap<String, (f64, String, &'a Aggregate)> {
    let max = primary
        .iter()
        .map(|a| a.value().median)
        .fold(0.0f64, f64::max);
    let mut m: BTreeMap<String, (f64, String, &Aggregate)> = BTreeMap::new();
    if max <= 0.0 {
        return m;
    }
    for a in w.dvma().filter(|a| primary.iter().any(|p| p.key == a.key)) {
        let (Some(k), Some(o)) = (key(a), other(a)) else {
            continue;
        };
        let rel = a.value().median / max;
        if m.get(k).is_none_or(|(r, _, _)| rel > *r) {
            m.insert(k.clone(), (rel, o.clone(), a));
        }
    }
    m
}

fn primary_aggs<'a>(w: &'a WorkloadAnalysis, n: &Notes<'_>) -> Vec<&'a Aggregate> {
    w.dvma()
        .filter(|a| {
            a.key.spl.as_deref() == Some(plan::PRIMARY_SPL)
                && a.key.intr_stack == Some(plan::PRIMARY_INTR_STACK)
                && a.key.cpus == Some(n.plan.cpus)
        })
        .collect()
}

fn options_compared(
    out: &mut String,
    workloads: &[WorkloadAnalysis],
    results: &Results,
    n: &Notes<'_>,
) {
    // Only workloads where the matrix ran (more than one pair).
    let ws: Vec<&WorkloadAnalysis> = workloads
        .iter()
        .filter(|w| primary_aggs(w, n).len() > 1)
        .collect();
    if ws.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Options compared\n");
    let _ = writeln!(
        out,
        "Each cell: the option's best throughput on the workload relative to the best pair there (1.00 = the winner), and the other half of the pair that gave it. Primary axis values only (spl {}, interrupt stack on, {} CPUs).\n",
        plan::PRIMARY_SPL,
        n.plan.cpus
    );
    let micro_ns = |size: &str, mode: &str| {
        results
            .micro
            .as_ref()
            .and_then(|m| m.pointer(&format!("/dvma_ns/{size}/{mode}")))
            .and_then(|v| v.as_f64())
    };
    for (title, is_mode) in [("DVMA mode", true), ("Completion mode", false)] {
        let mut head = format!("| {title} |");
        let mut sep = "|---|".to_string();
        for w in &ws {
            let _ = write!(head, " {} |", esc(&w.workload));
            sep.push_str("---:|");
        }
        if is_mode {
            head.push_str(
                " DVMA pages held (max) | load+sync+unload 4 KiB · 64 KiB (bench micro) |",
            );
            sep.push_str("---:|---:|");
        }
        let _ = writeln!(out, "{head}\n{sep}");
        let tables: Vec<BTreeMap<String, (f64, String, &Aggregate)>> = ws
            .iter()
            .map(|w| {
                let p = primary_aggs(w, n);
                if is_mode {
                    by_axis(
                        w,
                        |a| a.key.dvma_mode.as_ref(),
                        |a| a.key.completion.as_ref(),
                        &p,
                    )
                } else {
                    by_axis(
                        w,
                        |a| a.key.completion.as_ref(),
                        |a| a.key.dvma_mode.as_ref(),
                        &p,
                    )
                }
            })
            .collect();
        let names: Vec<String> = if is_mode {
            report::DVMA_MODES.iter().map(|s| s.to_string()).collect()
        } else {
            report::COMPLETION_MODES
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        for name in names {
            if tables.iter().all(|t| !t.contains_key(&name)) {
                continue;
            }
            let mut row = format!("| {name} |");
            for t in &tables {
                match t.get(&name) {
                    Some((rel, other, _)) => {
                        let cell = format!("{rel:.2} ({other})");
                        if *rel >= 1.0 {
                            let _ = write!(row, " **{cell}** |");
                        } else {
                            let _ = write!(row, " {cell} |");
                        }
                    }
                    None => row.push_str(" — |"),
                }
            }
            if is_mode {
                let held = results
                    .runs
                    .iter()
                    .filter(|r| r.dvma_mode.as_deref() == Some(name.as_str()))
                    .filter_map(|r| r.dvma_pages_held)
                    .max();
                let micro = match (micro_ns("4k", &name), micro_ns("64k", &name)) {
                    (None, None) => "—".to_string(),
                    (a, b) => {
                        let f = |v: Option<f64>| v.map_or("—".to_string(), |ns| us(ns / 1000.0));
                        format!("{} · {} µs", f(a), f(b))
                    }
                };
                let _ = write!(
                    row,
                    " {} | {} |",
                    held.map_or("—".to_string(), |h| h.to_string()),
                    micro
                );
            }
            let _ = writeln!(out, "{row}");
        }
        let _ = writeln!(out);
    }
}

fn next_steps(out: &mut String, workloads: &[WorkloadAnalysis], results: &Results, n: &Notes<'_>) {
    let _ = writeln!(out, "## Next steps\n");
    let mut bullets: Vec<String> = Vec::new();
    for w in workloads {
        let (Some(best), Some(peer)) = (w.best_dvma(), w.peer(BASELINE)) else {
            continue;
        };
        let Some(r) = w.ratio_to(best, BASELINE) else {
            continue;
        };
        if r.value >= 1.0 {
            continue;
        }
        let (dc, pc) = (best.cpu_us_per_io.median, peer.cpu_us_per_io.median);
        let label = w.label(&best.key);
        let mut s = format!(
            "**{}**: the best pair `{label}` reaches {:.2}× {BASELINE}. ",
            esc(&w.workload),
            r.value
        );
        if dc > pc * 1.1 {
            let _ = write!(
                s,
                "It uses {} µs of server CPU per I/O against {BASELINE}'s {}: the server's per-I/O CPU is where the time goes. Profile `dvma serve` on this workload (`perf record -g -p PID`) and cut per-I/O work",
                us(dc),
                us(pc)
            );
            let micro = |ptr: &str| {
                results
                    .micro
                    .as_ref()
                    .and_then(|m| m.pointer(ptr))
                    .and_then(|v| v.as_f64())
            };
            let (hd, hp) = (
                host_median(n.host, &best.key, &w.workload),
                host_median(n.host, &peer.key, &w.workload),
            );
            let mut causes = Vec::new();
            if let Some(h) = hd.filter(|h| h.sys_share >= 0.5) {
                causes.push(format!(
                    "{:.0}% of its CPU is system time{}",
                    h.sys_share * 100.0,
                    hp.map_or(String::new(), |p| format!(
                        " ({BASELINE}: {:.0}%)",
                        p.sys_share * 100.0
                    ))
                ));
            }
            let sp = hp.and_then(|h| h.switches);
            if let Some(sd) = hd.and_then(|h| h.switches)
                && sd >= sp.unwrap_or(0.0) + 0.5
            {
                let mut c = format!(
                    "{sd:.2} host context switches per I/O{}",
                    sp.map_or(String::new(), |v| format!(" ({BASELINE}: {v:.2})"))
                );
                if let Some(ns) = micro("/switch_ns/os_thread") {
                    let _ = write!(
                        c,
                        ", ≈{} µs per I/O at bench micro's {} µs per OS-thread switch",
                        us(sd * ns / 1000.0),
                        us(ns / 1000.0)
                    );
                }
                causes.push(c);
            }
            if let Some(p) = best.per_io.filter(|p| p.signals >= 0.3) {
                let mut c = format!(
                    "{:.2} interrupts per I/O, {:.2} of them taken as host signals",
                    p.interrupts, p.signals
                );
                let ptr = if best.key.intr_stack == Some(false) {
                    "/intr_ns/nostack"
                } else {
                    "/intr_ns/intrstack"
                };
                if let Some(ns) = micro(ptr) {
                    let _ = write!(
                        c,
                        ", ≈{} µs per I/O at bench micro's {} µs per signalled interrupt",
                        us(p.signals * ns / 1000.0),
                        us(ns / 1000.0)
                    );
                }
                c.push_str("; fewer with interrupt coalescing (`coalesce_count`, `coalesce_us` of `[[disk]]`)");
                causes.push(c);
            }
            let mode = best.key.dvma_mode.as_deref().unwrap_or("");
            let size = if w.metric == Metric::MibS {
                "64k"
            } else {
                "4k"
            };
            if let Some(ns) = micro(&format!("/dvma_ns/{size}/{mode}"))
                && ns / 1000.0 >= 0.1 * dc
            {
                causes.push(format!(
                    "the {mode} DVMA load+sync+unload, {} µs per {} buffer in bench micro",
                    us(ns / 1000.0),
                    if size == "4k" { "4 KiB" } else { "64 KiB" }
                ));
            }
            if !causes.is_empty() {
                let _ = write!(s, ". Measured in this run: {}", causes.join("; "));
            }
            s.push('.');
        } else {
            let _ = write!(
                s,
                "Its server CPU per I/O ({} µs) is not above {BASELINE}'s ({} µs), so the gap is waiting, not work: p50 {} µs against {}, p99 {} against {}. Trace one I/O's path through `dvma serve` (socket read, hand-off to the device threads, completion, reply) for where it waits.",
                us(dc),
                us(pc),
                us(best.p50_us.median),
                us(peer.p50_us.median),
                us(best.p99_us.median),
                us(peer.p99_us.median)
            );
        }
        bullets.push(s);
    }
    if bullets.is_empty() {
        if workloads.iter().any(|w| w.peer(BASELINE).is_some()) {
            bullets.push(format!(
                "The best pair is at or above {BASELINE} on every workload compared in this run."
            ));
        } else {
            bullets.push(format!(
                "Install {BASELINE} (`{}`) and run again: without it there is no baseline.",
                super::server::install_hint(BASELINE)
            ));
        }
    }
    let flagged = workloads
        .iter()
        .flat_map(|w| w.aggregates.iter())
        .filter(|a| a.value().disagrees())
        .count();
    if n.plan.quick {
        bullets.push(format!(
            "This was a quick run{}: confirm with the full run (`dvma bench --out DIR`, {} repetitions of {} s per workload) before drawing conclusions from differences of a few percent.",
            if flagged > 0 {
                format!(
                    " and {flagged} configuration/workload pairs disagree by more than 10% between repetitions"
                )
            } else {
                String::new()
            },
            plan::FULL_REPS,
            plan::FULL_RUNTIME_S
        ));
    } else if flagged > 0 {
        bullets.push(format!(
            "{flagged} configuration/workload pairs disagree by more than 10% between repetitions: run longer (`--runtime`) or more repetitions (`--reps`) on a quieter machine."
        ));
    }
    for b in bullets {
        let _ = writeln!(out, "- {b}");
    }
    let _ = writeln!(out);
}

/// The table of the peers' settings tried in phase 0.
fn peer_trials(out: &mut String, n: &Notes<'_>) {
    if n.peer_trials.is_empty() {
        return;
    }
    let workloads: Vec<&str> = n.plan.select.iter().map(|w| w.name).collect();
    let _ = writeln!(
        out,
        "\nEach peer at its best: before the matrix, each peer ran once at each of its settings on {}; the setting with the best geometric mean of IOPS relative to the peer's best setting on each workload (as the best pair is chosen) served every later session of that peer.\n",
        workloads.join(", ")
    );
    let _ = writeln!(
        out,
        "| peer | setting | {} | chosen |",
        workloads.join(" | ")
    );
    let _ = writeln!(out, "|---|---|{}---|", "---:|".repeat(workloads.len()));
    for t in n.peer_trials {
        let cells: Vec<String> = workloads
            .iter()
            .map(|w| {
                t.iops
                    .iter()
                    .find(|(x, _)| x == w)
                    .map_or("—".to_string(), |(_, v)| format!("{v:.0}"))
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | `{}` | {} | {} |",
            t.peer,
            t.setting,
            cells.join(" | "),
            if t.chosen { "✓" } else { "" }
        );
    }
}

fn how_made(out: &mut String, results: &Results, n: &Notes<'_>) {
    let p = n.plan;
    let _ = writeln!(out, "## How this run was made\n");
    let _ = writeln!(out, "- Command: `{}`", n.command.replace('`', "'"));
    let _ = writeln!(
        out,
        "- Wall time: {} (estimated before the run: {}).",
        plan::human(Duration::from_secs_f64(results.duration_s)),
        plan::human(n.estimate)
    );
    let _ = writeln!(
        out,
        "- Each fio run: {} s measured after a {} s ramp (`--time_based --runtime --ramp_time`), one job, percentiles {} of the total latency (submission and completion, `--lat_percentiles=1`: with the nbd engine the reply can arrive during the submission, so completion latency alone can miss most of a round trip).",
        p.timing.runtime_s,
        p.timing.ramp_s,
        super::fio::PERCENTILES.replace(':', ", ")
    );
    let count = |ph: Phase| p.sessions.iter().filter(|s| s.phase == ph).count();
    let _ = writeln!(
        out,
        "- Sessions (one server start each, all on one fully allocated {} MiB backing file, read into the page cache before every session): {} matrix ({} pairs × {} repetition(s), peers interleaved), {} best pair vs peers, {} secondary axes.",
        super::server::DISK_BYTES >> 20,
        count(Phase::Matrix),
        p.pairs.len(),
        p.reps,
        count(Phase::Best),
        count(Phase::Secondary)
    );
    let _ = writeln!(
        out,
        "- Server CPU: utime + stime of `/proc/PID/stat` ({} ticks/s), read every 10 ms while fio runs and interpolated at the ends of fio's measured window (its `timestamp_ms` minus its runtime). dvma counters: `dvma serve` statistics (SIGUSR1, `--stats-json`) read a ramp after fio's first request reached the server and after fio exits, divided by the NBD requests the server counted between the two. DVMA pages held: after fio exits.",
        n.clk_tck
    );
    let _ = writeln!(out, "\n| workload | fio --rw | --bs | --iodepth |");
    let _ = writeln!(out, "|---|---|---|---:|");
    for w in &p.workloads {
        let _ = writeln!(out, "| {} | {} | {} | {} |", w.name, w.rw, w.bs, w.iodepth);
    }
    let _ = writeln!(out, "\nServers and tools:\n");
    let _ = writeln!(out, "- {}", esc(n.fio_version));
    for (peer, v) in &n.peer_versions {
        let _ = writeln!(out, "- {peer}: {}", esc(v));
    }
    for m in n.missing {
        let _ = writeln!(
            out,
            "- {m}: **not installed** — install it with `{}` and run again to compare against it",
            super::server::install_hint(m)
        );
    }
    for (kind, c) in n.commands {
        let _ = writeln!(out, "- {kind}, e.g.: `{}`", c.replace('`', "'"));
    }
    peer_trials(out, n);
    if !n.scores.is_empty() {
        let _ = writeln!(
            out,
            "\nThe best pair, `{}`, was chosen on the matrix workloads ({}): the geometric mean of each pair's throughput relative to the best pair on each. Top pairs:\n",
            n.best.map_or("?".to_string(), |(m, c)| format!("{m}/{c}")),
            p.select
                .iter()
                .map(|w| w.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(out, "| pair | score |");
        let _ = writeln!(out, "|---|---:|");
        for ((m, c), s) in n.scores.iter().take(5) {
            let _ = writeln!(out, "| {m}/{c} | {s:.3} |");
        }
    }
    let _ = writeln!(out, "\n### Problems\n");
    if n.failures.is_empty() && n.warnings.is_empty() {
        let _ = writeln!(
            out,
            "None: every planned fio run completed and every server exited cleanly."
        );
    }
    for f in n.failures {
        let _ = writeln!(out, "- failure: {}", one_line(f));
    }
    for w in n.warnings {
        let _ = writeln!(out, "- {}", one_line(w));
    }
    let _ = writeln!(
        out,
        "\n`raw/` holds every fio JSON output and log, every server's output, and the server-side readings of each run (`*.server.json`)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::plan::{PlanOptions, build};
    use report::{PerIo, Run};

    fn run(server: &str, mode: Option<&str>, workload: &str, iops: f64, cpu: f64) -> Run {
        Run {
            server: server.into(),
            dvma_mode: mode.map(Into::into),
            completion: mode.map(|_| "softint".into()),
            spl: mode.map(|_| "lazy".into()),
            intr_stack: mode.map(|_| true),
            cpus: mode.map(|_| 2),
            workload: workload.into(),
            rep: 0,
            iops,
            mib_s: iops / 256.0,
            p50_us: 100.0,
            p99_us: 300.0,
            cpu_us_per_io: cpu,
            latency_cdf: vec![(50.0, 0.0), (100.0, 0.5), (300.0, 1.0)],
            per_io: mode.map(|_| PerIo {
                interrupts: 1.0,
                signals: 0.5,
                softints: 1.0,
                ctx_switches: 2.0,
                asts: 0.0,
                iommu_faults: 0.0,
            }),
            dvma_pages_held: mode.map(|_| 16),
            protection: None,
        }
    }

    #[test]
    fn sections_say_what_the_figures_say() {
        let plan = build(&PlanOptions {
            quick: true,
            reps: None,
            runtime_s: None,
            ramp_s: None,
            best_reps: None,
            modes: vec![],
            completions: vec![],
            workloads: vec![],
            peers: vec!["nbdkit".into()],
            secondary: true,
            micro: false,
            cpus: 2,
        })
        .unwrap();
        let results = Results {
            runs: vec![
                run(
                    "dvma",
                    Some("permanent"),
                    "randread-4k-qd32",
                    30_000.0,
                    40.0,
                ),
                run("dvma", Some("strict"), "randread-4k-qd32", 10_000.0, 90.0),
                run("nbdkit", None, "randread-4k-qd32", 40_000.0, 20.0),
                run("dvma", Some("permanent"), "seqwrite-1m-qd8", 900.0, 300.0),
                run("nbdkit", None, "seqwrite-1m-qd8", 810.0, 400.0),
            ],
            micro: Some(serde_json::json!({
                "dvma_ns": {"4k": {"permanent": 120.0, "strict": 30000.0}},
                "switch_ns": {"os_thread": 3000.0},
                "intr_ns": {"intrstack": 6000.0, "nostack": 5000.0},
            })),
            machine: Default::default(),
            duration_s: 100.0,
            quick: true,
            protections: vec![],
            kernel: None,
        };
        let commands = BTreeMap::new();
        let key = |i: usize| ConfigKey::of(&results.runs[i]);
        let host = vec![
            HostRow {
                key: key(0),
                workload: "randread-4k-qd32".into(),
                user_us: 10.0,
                sys_us: 30.0,
                switches: Some(3.0),
            },
            HostRow {
                key: key(2),
                workload: "randread-4k-qd32".into(),
                user_us: 10.0,
                sys_us: 10.0,
                switches: Some(1.0),
            },
        ];
        let missing = vec!["qemu-nbd".to_string()];
        let trials = vec![
            PeerTrial {
                peer: "nbdkit".into(),
                setting: "-t 16 (default)".into(),
                iops: vec![("randread-4k-qd32".into(), 39_000.0)],
                chosen: false,
            },
            PeerTrial {
                peer: "nbdkit".into(),
                setting: "-t 4".into(),
                iops: vec![
                    ("randread-4k-qd32".into(), 41_000.0),
                    ("seqwrite-1m-qd8".into(), 800.0),
                ],
                chosen: true,
            },
        ];
        let n = Notes {
            plan: &plan,
            command: "dvma bench --quick".into(),
            fio_version: "fio-3.33",
            peer_versions: vec![("nbdkit".into(), "nbdkit 1.32.5".into())],
            missing: &missing,
            commands: &commands,
            scores: &[],
            best: None,
            failures: &["x failed\nwith details".to_string()],
            host: &host,
            warnings: &[],
            estimate: Duration::from_secs(200),
            clk_tck: 100,
            peer_trials: &trials,
        };
        let md = render(&results, &n);
        // randread: 0.75× nbdkit, goal not met, CPU-bound (40 vs 20 µs).
        let has = |s: &str| assert!(md.contains(s), "report lacks {s:?}:\n{md}");
        has(
            "| randread-4k-qd32 | `permanent/softint` | 30,000 IOPS | 0.75× | **not met** (-25%) | 40.0 (75%) · 20.0 (50%) | 3.00 · 1.00 | 1.00 (0.50) · 1.00 · 2.00 · 0.00 |",
        );
        has("40.0 µs of server CPU per I/O against nbdkit's 20.0");
        has("75% of its CPU is system time (nbdkit: 50%)");
        has(
            "3.00 host context switches per I/O (nbdkit: 1.00), ≈9.00 µs per I/O at bench micro's 3.00 µs per OS-thread switch",
        );
        has(
            "1.00 interrupts per I/O, 0.50 of them taken as host signals, ≈3.00 µs per I/O at bench micro's 6.00 µs per signalled interrupt",
        );
        // The mapping cost of permanent is too small to be a candidate.
        assert!(!md.contains("0.12 µs per 4 KiB buffer"), "{md}");
        // seqwrite: met.
        has("| seqwrite-1m-qd8 | `permanent/softint` | 3.5 MiB/s | 1.11× | met");
        has("| nbdkit | `-t 4` | 41000 | 800 | ✓ |");
        has("| nbdkit | `-t 16 (default)` | 39000 | — |  |");
        // Options: strict is a third of permanent on randread.
        has("| strict | 0.33 (softint) | 16 | 30.0 · — µs |");
        has("| permanent | **1.00 (softint)** | 16 | 0.12 · — µs |");
        has("qemu-nbd: **not installed** — install it with `apt-get install qemu-utils`");
        has("- failure: x failed …");
        let lines = headline_lines(&results);
        assert!(lines[0].contains("0.75× nbdkit"), "{lines:?}");
    }
}
