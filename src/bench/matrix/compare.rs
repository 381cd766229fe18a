//! The comparison with the peers that the run stands behind: phase 2's
//! runs only ([`Phase::Best`](super::plan::Phase::Best)), where the best
//! pair of phase 1, `dvma serve` with no flags and each peer at its chosen
//! setting ran alternately on every workload.
//!
//! A ratio is formed per repetition (dvma's IOPS over the peer's, both of
//! the same repetition, so both saw the same drift of the host) and
//! reported as the median with the min-max over repetitions. The best
//! pair was chosen on phase 1's runs, not on these, so its ratio here is
//! not the best of many noisy medians.

use std::fmt::Write as _;

use report::{Run, Stat, esc};

use super::plan::Workload;

/// Who ran a phase-2 session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// The best pair (its configuration label).
    Best(String),
    /// `dvma serve` with no flags (its configuration label).
    Default(String),
    /// A peer at its chosen setting.
    Peer(String),
}

impl Who {
    fn name(&self) -> String {
        match self {
            Who::Best(l) => format!("best pair `{l}`"),
            Who::Default(l) => format!("no flags `{l}`"),
            Who::Peer(p) => p.clone(),
        }
    }

    fn is_dvma(&self) -> bool {
        !matches!(self, Who::Peer(_))
    }
}

/// One phase-2 fio run.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Who ran it.
    pub who: Who,
    /// The run.
    pub run: Run,
    /// Host context switches per I/O of the server (every thread).
    pub switches: Option<f64>,
}

/// Ratios by repetition of `a`'s IOPS to `b`'s on `workload`.
fn ratios(entries: &[Entry], a: &Who, b: &Who, workload: &str) -> Option<Stat> {
    let of = |w: &Who| -> Vec<&Entry> {
        entries
            .iter()
            .filter(|e| e.who == *w && e.run.workload == workload)
            .collect()
    };
    let theirs = of(b);
    let v: Vec<f64> = of(a)
        .iter()
        .filter_map(|x| {
            theirs
                .iter()
                .find(|y| y.run.rep == x.run.rep && y.run.iops > 0.0)
                .map(|y| x.run.iops / y.run.iops)
        })
        .collect();
    Stat::of(&v)
}

fn median(
    entries: &[Entry],
    who: &Who,
    workload: &str,
    f: impl Fn(&Entry) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = entries
        .iter()
        .filter(|e| e.who == *who && e.run.workload == workload)
        .filter_map(f)
        .collect();
    Stat::of(&v).map(|s| s.median)
}

fn cell(s: Option<Stat>) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        Some(s) => format!("{:.2}", s.median),
        None => "—".to_string(),
    }
}

/// The servers of phase 2, dvma first, in a stable order.
fn servers(entries: &[Entry]) -> Vec<Who> {
    let mut v: Vec<Who> = Vec::new();
    for e in entries {
        if !v.contains(&e.who) {
            v.push(e.who.clone());
        }
    }
    v.sort_by_key(|w| match w {
        Who::Best(_) => 0,
        Who::Default(_) => 1,
        Who::Peer(_) => 2,
    });
    v
}

/// The section, as markdown; empty when phase 2 did not run.
pub fn render(entries: &[Entry], workloads: &[Workload]) -> String {
    let mut out = String::new();
    if entries.is_empty() {
        return out;
    }
    let who = servers(entries);
    let peers: Vec<&Who> = who.iter().filter(|w| !w.is_dvma()).collect();
    let reps = {
        let mut r: Vec<u32> = entries.iter().map(|e| e.run.rep).collect();
        r.sort_unstable();
        r.dedup();
        r.len()
    };
    let _ = writeln!(out, "## Against the peers, interleaved\n");
    let _ = writeln!(
        out,
        "Phase 2 only: the best pair of phase 1, `dvma serve` with no flags (when it is not the best pair) and each peer at its chosen setting ran alternately, {reps} repetition(s) on every workload, odd repetitions in reverse order. A ratio is dvma's IOPS over the peer's in the same repetition: median (min–max) over repetitions; above 1, dvma is faster. CPU is the server's user + system time per I/O; switches are the host context switches of all its threads per I/O.\n"
    );
    let mut head = "| workload | server | IOPS | p50 µs | CPU µs/I/O | switches/I/O |".to_string();
    let mut sep = "|---|---|---:|---:|---:|---:|".to_string();
    for p in &peers {
        let _ = write!(head, " vs {} |", p.name());
        sep.push_str("---:|");
    }
    let _ = writeln!(out, "{head}\n{sep}");
    for w in workloads {
        for s in &who {
            let Some(iops) = median(entries, s, w.name, |e| Some(e.run.iops)) else {
                continue;
            };
            let p50 = median(entries, s, w.name, |e| Some(e.run.p50_us));
            let cpu = median(entries, s, w.name, |e| Some(e.run.cpu_us_per_io));
            let sw = median(entries, s, w.name, |e| e.switches);
            let f = |v: Option<f64>, d: usize| v.map_or("—".into(), |v| format!("{v:.d$}"));
            let mut row = format!(
                "| {} | {} | {iops:.0} | {} | {} | {} |",
                w.name,
                esc(&s.name()),
                f(p50, 1),
                f(cpu, 1),
                f(sw, 3)
            );
            for p in &peers {
                let c = if s.is_dvma() {
                    cell(ratios(entries, s, p, w.name))
                } else {
                    String::new()
                };
                let _ = write!(row, " {c} |");
            }
            let _ = writeln!(out, "{row}");
        }
    }
    let _ = writeln!(out);
    out
}

/// One line per workload and dvma server for the terminal.
pub fn lines(entries: &[Entry], workloads: &[Workload]) -> Vec<String> {
    let who = servers(entries);
    let mut v = Vec::new();
    for w in workloads {
        for s in who.iter().filter(|s| s.is_dvma()) {
            let mut line = format!("{:<18} {}", w.name, s.name());
            for p in who.iter().filter(|p| !p.is_dvma()) {
                if let Some(r) = ratios(entries, s, p, w.name) {
                    let _ = write!(
                        line,
                        ", {:.2}× {} ({:.2}–{:.2})",
                        r.median,
                        p.name(),
                        r.min,
                        r.max
                    );
                }
            }
            v.push(line);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(who: Who, workload: &str, rep: u32, iops: f64) -> Entry {
        Entry {
            who,
            run: Run {
                server: "x".into(),
                dvma_mode: None,
                completion: None,
                spl: None,
                intr_stack: None,
                cpus: None,
                workload: workload.into(),
                rep,
                iops,
                mib_s: 1.0,
                p50_us: 10.0,
                p99_us: 20.0,
                cpu_us_per_io: 5.0,
                latency_cdf: vec![],
                per_io: None,
                dvma_pages_held: None,
                protection: None,
            },
            switches: Some(0.5),
        }
    }

    #[test]
    fn ratios_pair_repetitions() {
        let w = super::super::plan::WORKLOADS[1];
        let best = Who::Best("permanent/softint".into());
        let nbdkit = Who::Peer("nbdkit".into());
        let e = vec![
            // rep 0: 1.2×; rep 1: 0.9× (the peer had a good run); rep 2:
            // 1.0×; a peer run of a repetition dvma lacks is ignored.
            entry(best.clone(), w.name, 0, 120.0),
            entry(nbdkit.clone(), w.name, 0, 100.0),
            entry(best.clone(), w.name, 1, 90.0),
            entry(nbdkit.clone(), w.name, 1, 100.0),
            entry(best.clone(), w.name, 2, 150.0),
            entry(nbdkit.clone(), w.name, 2, 150.0),
            entry(nbdkit.clone(), w.name, 3, 1.0),
        ];
        let r = ratios(&e, &best, &nbdkit, w.name).unwrap();
        assert_eq!((r.n, r.median, r.min, r.max), (3, 1.0, 0.9, 1.2));
        let md = render(&e, &[w]);
        assert!(md.contains("| randread-4k-qd32 | best pair `permanent/softint` | 120 | 10.0 | 5.0 | 0.500 | 1.00 (0.90–1.20) |"), "{md}");
        assert!(md.contains("| randread-4k-qd32 | nbdkit | 100 |"), "{md}");
        assert_eq!(
            lines(&e, &[w]),
            vec![
                "randread-4k-qd32   best pair `permanent/softint`, 1.00× nbdkit (0.90–1.20)"
                    .to_string()
            ]
        );
        assert!(render(&[], &[w]).is_empty());
    }
}
