//! The plan of a matrix run: which server configurations run which fio
//! workloads, in which order, and how long that takes.
//!
//! A plan is a list of [`Session`]s. A session is one start of one server
//! on the run's backing file, running its workloads in order, then stopped.
//! Four phases:
//!
//! 0. [`Phase::Tune`]: each peer at each of its [`PEER_SETTINGS`], once, on
//!    phase 1's workloads; the best setting of each peer (as the best pair
//!    is chosen) serves every later session of that peer, so dvma is
//!    compared with each peer at its best on this machine.
//! 1. [`Phase::Matrix`]: every (DVMA mode, completion mode) pair at the
//!    primary secondary-axis values (spl lazy, interrupt stack on, every host
//!    CPU), with a peer session before the first pair and after every few
//!    pairs, the peers taking turns (A, B, A, B: drift hits dvma and peers
//!    alike). Odd repetitions run the pairs in reverse order.
//! 2. [`Phase::Best`]: the best pair of phase 1, `dvma serve` with no flags
//!    ([`Target::Default`]) and every peer, alternating, on every workload,
//!    for [`FULL_BEST_REPS`] repetitions ([`QUICK_BEST_REPS`] in a quick
//!    run). The comparison with the peers is made on these runs only, paired
//!    by repetition, so the best pair's ratio is measured afresh rather than
//!    being the best of phase 1's noisy medians.
//! 3. [`Phase::Secondary`]: the best pair with one secondary axis changed at
//!    a time (spl mask, interrupt stack off, one CPU); in a full run each
//!    repetition starts with the best pair itself, so every comparison has a
//!    neighbour in time.
//!
//! The best pair is only known once phase 1 has run, so later sessions name
//! it as [`Target::Best`]; phase 1 sessions always come first.

use std::fmt;
use std::time::Duration;

use report::{COMPLETION_MODES, DVMA_MODES, PEERS};

/// One fio workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Its name in the report (`randread-4k-qd1`).
    pub name: &'static str,
    /// fio `--rw`.
    pub rw: &'static str,
    /// fio `--bs`.
    pub bs: &'static str,
    /// fio `--iodepth`.
    pub iodepth: u32,
}

/// The workloads of the issue, in the order a session runs them.
pub const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "randread-4k-qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
    },
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
    },
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
    },
    Workload {
        name: "seqread-1m-qd8",
        rw: "read",
        bs: "1m",
        iodepth: 8,
    },
    Workload {
        name: "seqwrite-1m-qd8",
        rw: "write",
        bs: "1m",
        iodepth: 8,
    },
];

/// The workloads a quick run measures every pair on (one small-block, one
/// large-block; one read, one write). The others run on the best pair only.
pub const QUICK_SELECT: [&str; 2] = ["randread-4k-qd32", "seqwrite-1m-qd8"];

/// The primary value of each secondary axis: what the matrix runs at.
pub const PRIMARY_SPL: &str = "lazy";
/// See [`PRIMARY_SPL`].
pub const PRIMARY_INTR_STACK: bool = true;

/// The settings each peer is tried at in [`Phase::Tune`], its default
/// first: `(peer, label, arguments)`. nbdkit's thread count (16 is its
/// default; 4 is twice this machine's 2 cores) and qemu-nbd's I/O engine
/// and cache mode.
pub const PEER_SETTINGS: [(&str, &str, &[&str]); 5] = [
    ("nbdkit", "-t 16 (default)", &["-t", "16"]),
    ("nbdkit", "-t 4", &["-t", "4"]),
    ("qemu-nbd", "--aio=threads (default)", &["--aio=threads"]),
    ("qemu-nbd", "--aio=io_uring", &["--aio=io_uring"]),
    (
        "qemu-nbd",
        "--aio=io_uring --cache=none",
        &["--aio=io_uring", "--cache=none"],
    ),
];

/// The indices in [`PEER_SETTINGS`] of `peer`'s settings.
pub fn peer_settings(peer: &str) -> impl Iterator<Item = usize> + '_ {
    (0..PEER_SETTINGS.len()).filter(move |&i| PEER_SETTINGS[i].0 == peer)
}

/// A configuration of the best pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The pair at the primary axis values.
    Primary,
    /// `--spl mask`.
    SplMask,
    /// `--intr-stack off`.
    IntrStackOff,
    /// `--cpus 1`.
    OneCpu,
}

impl Variant {
    /// The variants that change one axis.
    pub const SECONDARY: [Variant; 3] = [Variant::SplMask, Variant::IntrStackOff, Variant::OneCpu];
}

/// What a session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `dvma serve` with a DVMA mode and a completion mode, at the primary
    /// axis values.
    Pair {
        /// DVMA mode.
        mode: String,
        /// Completion mode.
        completion: String,
    },
    /// The best pair of phase 1, in a variant.
    Best(Variant),
    /// `dvma serve` with no flags but the backing file: its defaults.
    Default,
    /// A peer server (`nbdkit`, `qemu-nbd`) at its best setting of
    /// [`Phase::Tune`] (its default if there was no tuning).
    Peer(String),
    /// A peer at one of its settings: an index in [`PEER_SETTINGS`].
    PeerAt(usize),
}

impl Target {
    /// Whether this is a `dvma serve` session.
    pub fn is_dvma(&self) -> bool {
        !matches!(self, Target::Peer(_) | Target::PeerAt(_))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pair { mode, completion } => write!(f, "{mode}/{completion}"),
            Target::Best(Variant::Primary) => f.write_str("best"),
            Target::Best(Variant::SplMask) => f.write_str("best spl=mask"),
            Target::Best(Variant::IntrStackOff) => f.write_str("best intr-stack=off"),
            Target::Best(Variant::OneCpu) => f.write_str("best cpus=1"),
            Target::Default => f.write_str("default"),
            Target::Peer(p) => f.write_str(p),
            Target::PeerAt(i) => write!(f, "{} {}", PEER_SETTINGS[*i].0, PEER_SETTINGS[*i].1),
        }
    }
}

/// The phases of a plan (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Each peer at each of its settings.
    Tune,
    /// Every pair, with peers interleaved.
    Matrix,
    /// The best pair, the defaults and the peers on every workload.
    Best,
    /// The best pair along the secondary axes.
    Secondary,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Tune => "peer settings",
            Phase::Matrix => "matrix",
            Phase::Best => "best pair vs peers",
            Phase::Secondary => "secondary axes",
        })
    }
}

/// One server start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The phase it belongs to.
    pub phase: Phase,
    /// The server.
    pub target: Target,
    /// The repetition number its runs carry.
    pub rep: u32,
    /// The workloads, in order.
    pub workloads: Vec<Workload>,
}

/// How long each fio run lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// fio `--runtime`: the measured part, seconds.
    pub runtime_s: f64,
    /// fio `--ramp_time`: run before measuring, seconds.
    pub ramp_s: f64,
}

/// What the command line asks for (already validated names).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// `--quick`.
    pub quick: bool,
    /// `--reps`, if given.
    pub reps: Option<u32>,
    /// `--runtime`, if given.
    pub runtime_s: Option<f64>,
    /// `--ramp`, if given.
    pub ramp_s: Option<f64>,
    /// `--best-reps`, if given.
    pub best_reps: Option<u32>,
    /// DVMA modes (empty: all).
    pub modes: Vec<String>,
    /// Completion modes (empty: all).
    pub completions: Vec<String>,
    /// Workload names (empty: all).
    pub workloads: Vec<String>,
    /// The peers that are installed and wanted, in [`PEERS`] order.
    pub peers: Vec<String>,
    /// Run the secondary axes.
    pub secondary: bool,
    /// Run `dvma bench micro`.
    pub micro: bool,
    /// CPUs of the primary configuration (the host's, at most 64).
    pub cpus: u32,
}

/// A plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Whether this is a quick run.
    pub quick: bool,
    /// fio run lengths.
    pub timing: Timing,
    /// Repetitions of phase 1 (and of phase 3 in a full run).
    pub reps: u32,
    /// The (mode, completion) pairs of phase 1, in order.
    pub pairs: Vec<(String, String)>,
    /// The workloads the best pair is chosen on (phase 1's).
    pub select: Vec<Workload>,
    /// Every workload of the run.
    pub workloads: Vec<Workload>,
    /// The peers.
    pub peers: Vec<String>,
    /// CPUs of the primary configuration.
    pub cpus: u32,
    /// `dvma bench micro --reps N`, if the micro-benchmarks run.
    pub micro_reps: Option<u32>,
    /// The sessions, in order.
    pub sessions: Vec<Session>,
}

/// Quick runs: the wall-time budget, seconds. Sessions that would end past
/// it (servers that hung, a slower machine) are skipped and reported.
pub const QUICK_BUDGET_S: f64 = 285.0;
/// Quick runs: seconds measured per fio run.
pub const QUICK_RUNTIME_S: f64 = 1.0;
/// Quick runs: ramp seconds per fio run.
pub const QUICK_RAMP_S: f64 = 0.25;
/// Quick runs: repetitions of phase 2 (best pair vs peers, alternating).
pub const QUICK_BEST_REPS: u32 = 3;
/// Full runs: repetitions of phase 2.
pub const FULL_BEST_REPS: u32 = 5;
/// Quick runs: `dvma bench micro --reps`.
pub const QUICK_MICRO_REPS: u32 = 3;
/// Full runs: seconds measured per fio run.
pub const FULL_RUNTIME_S: f64 = 5.0;
/// Full runs: ramp seconds per fio run.
pub const FULL_RAMP_S: f64 = 1.0;
/// Full runs: repetitions.
pub const FULL_REPS: u32 = 3;
/// Full runs: `dvma bench micro --reps`.
pub const FULL_MICRO_REPS: u32 = 5;
/// A peer session runs before the first pair and after every this many
/// pairs of phase 1 (quick runs).
pub const QUICK_PEER_EVERY: usize = 5;
/// The same, full runs.
pub const FULL_PEER_EVERY: usize = 4;

/// Estimated cost of the parts of a run, seconds (measured on the 2-core
/// development machine; used only for the estimate printed before a run).
pub mod cost {
    /// fio start, connection, JSON output, and the server-side samples,
    /// beyond ramp + runtime.
    pub const FIO_OVERHEAD_S: f64 = 0.25;
    /// Starting and stopping `dvma serve`.
    pub const DVMA_SESSION_S: f64 = 0.7;
    /// Starting and stopping a peer.
    pub const PEER_SESSION_S: f64 = 0.4;
    /// One repetition of `dvma bench micro`.
    pub const MICRO_REP_S: f64 = 6.8;
    /// Writing the report (plots).
    pub const REPORT_S: f64 = 2.0;
    /// Writing and syncing the backing file.
    pub const BACKING_S: f64 = 2.0;
    /// Reading the backing file into the page cache, per session.
    pub const WARM_S: f64 = 0.3;
}

fn pick<'a>(all: &[&'a str], wanted: &[String], what: &str) -> Result<Vec<&'a str>, String> {
    if wanted.is_empty() {
        return Ok(all.to_vec());
    }
    for w in wanted {
        if !all.contains(&w.as_str()) {
            return Err(format!("unknown {what} {w:?} (known: {})", all.join(", ")));
        }
    }
    Ok(all
        .iter()
        .copied()
        .filter(|a| wanted.iter().any(|w| w == a))
        .collect())
}

/// Builds the plan.
pub fn build(o: &PlanOptions) -> Result<Plan, String> {
    let modes = pick(&DVMA_MODES, &o.modes, "DVMA mode")?;
    let completions = pick(&COMPLETION_MODES, &o.completions, "completion mode")?;
    let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
    let chosen = pick(&names, &o.workloads, "workload")?;
    let workloads: Vec<Workload> = WORKLOADS
        .iter()
        .copied()
        .filter(|w| chosen.contains(&w.name))
        .collect();
    for p in &o.peers {
        if !PEERS.contains(&p.as_str()) {
            return Err(format!("unknown peer {p:?} (known: {})", PEERS.join(", ")));
        }
    }
    let reps = o.reps.unwrap_or(if o.quick { 1 } else { FULL_REPS }).max(1);
    let timing = Timing {
        runtime_s: o.runtime_s.unwrap_or(if o.quick {
            QUICK_RUNTIME_S
        } else {
            FULL_RUNTIME_S
        }),
        ramp_s: o
            .ramp_s
            .unwrap_or(if o.quick { QUICK_RAMP_S } else { FULL_RAMP_S }),
    };
    if !(timing.runtime_s >= 0.1 && timing.runtime_s <= 3600.0) {
        return Err(format!(
            "--runtime {} s: from 0.1 to 3600 seconds",
            timing.runtime_s
        ));
    }
    if !(timing.ramp_s >= 0.0 && timing.ramp_s <= 600.0) {
        return Err(format!("--ramp {} s: from 0 to 600 seconds", timing.ramp_s));
    }
    let pairs: Vec<(String, String)> = modes
        .iter()
        .flat_map(|m| {
            completions
                .iter()
                .map(move |c| (m.to_string(), c.to_string()))
        })
        .collect();

    // Phase 1 workloads: in a quick run the selection subset (if any of it
    // was asked for), else all.
    let select: Vec<Workload> = if o.quick {
        let sub: Vec<Workload> = workloads
            .iter()
            .copied()
            .filter(|w| QUICK_SELECT.contains(&w.name))
            .collect();
        if sub.is_empty() {
            workloads.clone()
        } else {
            sub
        }
    } else {
        workloads.clone()
    };
    let every = if o.quick {
        QUICK_PEER_EVERY
    } else {
        FULL_PEER_EVERY
    };

    let mut sessions = Vec::new();
    // Phase 0: the peers' settings.
    for p in &o.peers {
        for i in peer_settings(p) {
            sessions.push(Session {
                phase: Phase::Tune,
                target: Target::PeerAt(i),
                rep: 0,
                workloads: select.clone(),
            });
        }
    }
    let mut peer_turn = 0usize;
    let mut next_peer = |sessions: &mut Vec<Session>, phase: Phase, rep: u32, w: &[Workload]| {
        if o.peers.is_empty() {
            return;
        }
        let p = o.peers[peer_turn % o.peers.len()].clone();
        peer_turn += 1;
        sessions.push(Session {
            phase,
            target: Target::Peer(p),
            rep,
            workloads: w.to_vec(),
        });
    };
    for rep in 0..reps {
        let mut order = pairs.clone();
        if rep % 2 == 1 {
            order.reverse();
        }
        for (i, (mode, completion)) in order.iter().enumerate() {
            if i % every == 0 {
                next_peer(&mut sessions, Phase::Matrix, rep, &select);
            }
            sessions.push(Session {
                phase: Phase::Matrix,
                target: Target::Pair {
                    mode: mode.clone(),
                    completion: completion.clone(),
                },
                rep,
                workloads: select.clone(),
            });
        }
        // Close the repetition with a peer, so the last pairs have one
        // next to them too; every peer runs at least once per repetition.
        let mut slots = order.len().div_ceil(every) + 1;
        next_peer(&mut sessions, Phase::Matrix, rep, &select);
        while slots < o.peers.len() {
            next_peer(&mut sessions, Phase::Matrix, rep, &select);
            slots += 1;
        }
    }

    // Phase 2: the best pair, `dvma serve` with no flags, and the peers,
    // alternating, on every workload: the comparison the headline gives
    // (phase 1 chose the pair; these runs measure it afresh, so its ratio is
    // not the best of many noisy medians). Odd repetitions run in reverse.
    let best_reps = o.best_reps.unwrap_or(if o.quick {
        QUICK_BEST_REPS
    } else {
        FULL_BEST_REPS
    });
    for rep in 0..best_reps {
        let mut order = vec![Target::Best(Variant::Primary)];
        for (i, p) in o.peers.iter().enumerate() {
            order.push(Target::Peer(p.clone()));
            if i == 0 {
                order.push(Target::Default);
            }
        }
        if o.peers.is_empty() {
            order.push(Target::Default);
        }
        if rep % 2 == 1 {
            order.reverse();
        }
        for target in order {
            sessions.push(Session {
                phase: Phase::Best,
                target,
                rep,
                workloads: workloads.clone(),
            });
        }
    }

    // Phase 3: the secondary axes on the best pair.
    if o.secondary {
        let sec_reps = if o.quick { 1 } else { reps };
        // A quick run measures the axes on phase 1's workloads only.
        let sec_workloads = if o.quick { &select } else { &workloads };
        for rep in 0..sec_reps {
            if !o.quick {
                sessions.push(Session {
                    phase: Phase::Secondary,
                    target: Target::Best(Variant::Primary),
                    rep,
                    workloads: workloads.clone(),
                });
            }
            for v in Variant::SECONDARY {
                if v == Variant::OneCpu && o.cpus <= 1 {
                    continue;
                }
                sessions.push(Session {
                    phase: Phase::Secondary,
                    target: Target::Best(v),
                    rep,
                    workloads: sec_workloads.clone(),
                });
            }
        }
    }

    let micro_reps = o.micro.then_some(if o.quick {
        QUICK_MICRO_REPS
    } else {
        FULL_MICRO_REPS
    });
    Ok(Plan {
        quick: o.quick,
        timing,
        reps,
        pairs,
        select,
        workloads,
        peers: o.peers.clone(),
        cpus: o.cpus,
        micro_reps,
        sessions,
    })
}

impl Plan {
    /// fio runs in the plan.
    pub fn fio_runs(&self) -> usize {
        self.sessions.iter().map(|s| s.workloads.len()).sum()
    }

    /// Estimated seconds of one fio run.
    pub fn fio_run_s(&self) -> f64 {
        self.timing.runtime_s + self.timing.ramp_s + cost::FIO_OVERHEAD_S
    }

    /// Estimated seconds of one session.
    pub fn session_s(&self, s: &Session) -> f64 {
        let start_stop = if s.target.is_dvma() {
            cost::DVMA_SESSION_S
        } else {
            cost::PEER_SESSION_S
        };
        start_stop + cost::WARM_S + s.workloads.len() as f64 * self.fio_run_s()
    }

    /// Estimated seconds of the micro-benchmarks.
    pub fn micro_s(&self) -> f64 {
        self.micro_reps
            .map_or(0.0, |r| 1.0 + f64::from(r) * cost::MICRO_REP_S)
    }

    /// Estimated wall time of the whole run.
    pub fn estimate(&self) -> Duration {
        let s: f64 = self.sessions.iter().map(|s| self.session_s(s)).sum::<f64>()
            + self.micro_s()
            + cost::BACKING_S
            + cost::REPORT_S;
        Duration::from_secs_f64(s)
    }
}

/// `1 min 05 s`, `42 s`, `1 h 02 min`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600 + 30) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(quick: bool) -> PlanOptions {
        PlanOptions {
            quick,
            reps: None,
            runtime_s: None,
            ramp_s: None,
            best_reps: None,
            modes: vec![],
            completions: vec![],
            workloads: vec![],
            peers: PEERS.iter().map(|p| p.to_string()).collect(),
            secondary: true,
            micro: true,
            cpus: 2,
        }
    }

    #[test]
    fn quick_plan_fits_in_five_minutes() {
        let p = build(&opts(true)).unwrap();
        assert_eq!(p.pairs.len(), 20);
        assert_eq!(
            p.select.iter().map(|w| w.name).collect::<Vec<_>>(),
            QUICK_SELECT
        );
        let est = p.estimate().as_secs_f64();
        assert!(est < 270.0, "quick estimate {est} s");
        // Every pair once in phase 1.
        let matrix_pairs = p
            .sessions
            .iter()
            .filter(|s| matches!(s.target, Target::Pair { .. }))
            .count();
        assert_eq!(matrix_pairs, 20);
        // Phase 1 sessions all come before the ones that need the best pair.
        let first_best = p
            .sessions
            .iter()
            .position(|s| matches!(s.target, Target::Best(_)))
            .unwrap();
        assert!(
            p.sessions[first_best..]
                .iter()
                .all(|s| s.phase != Phase::Matrix)
        );
        // Both peers run in phase 1, and alternate.
        let peers: Vec<&Target> = p
            .sessions
            .iter()
            .filter(|s| s.phase == Phase::Matrix && !s.target.is_dvma())
            .map(|s| &s.target)
            .collect();
        assert!(peers.len() >= 4, "{peers:?}");
        for w in peers.windows(2) {
            assert_ne!(w[0], w[1]);
        }
        // Phase 2 runs every workload on the best pair and both peers.
        let best: Vec<&Session> = p
            .sessions
            .iter()
            .filter(|s| s.phase == Phase::Best)
            .collect();
        assert_eq!(best.len(), 4 * QUICK_BEST_REPS as usize);
        assert!(best.iter().all(|s| s.workloads.len() == 5));
        // Each repetition: best pair, defaults and both peers, no two dvma
        // sessions or two peer sessions next to each other.
        for rep in 0..QUICK_BEST_REPS {
            let t: Vec<&Target> = best
                .iter()
                .filter(|s| s.rep == rep)
                .map(|s| &s.target)
                .collect();
            assert_eq!(t.len(), 4, "{t:?}");
            assert!(t.contains(&&Target::Default) && t.contains(&&Target::Best(Variant::Primary)));
            for w in t.windows(2) {
                assert_ne!(w[0].is_dvma(), w[1].is_dvma(), "{t:?}");
            }
        }
        // Phase 0 first: every setting of every peer once, before any
        // session that runs a peer at its chosen setting.
        let tune: Vec<&Session> = p
            .sessions
            .iter()
            .take_while(|s| s.phase == Phase::Tune)
            .collect();
        assert_eq!(tune.len(), PEER_SETTINGS.len());
        for (i, s) in tune.iter().enumerate() {
            assert_eq!(s.target, Target::PeerAt(i));
            assert_eq!(s.workloads, p.select);
        }
        assert!(
            p.sessions[tune.len()..]
                .iter()
                .all(|s| s.phase != Phase::Tune)
        );
        for peer in PEERS {
            assert_eq!(
                peer_settings(peer)
                    .next()
                    .map(|i| PEER_SETTINGS[i].1.contains("default")),
                Some(true),
                "{peer}'s default setting comes first"
            );
        }
    }

    #[test]
    fn full_plan_runs_everything_repeated() {
        let p = build(&opts(false)).unwrap();
        assert_eq!(p.reps, FULL_REPS);
        assert_eq!(p.select.len(), 5);
        let best = p.sessions.iter().filter(|s| s.phase == Phase::Best).count();
        assert_eq!(best, 4 * FULL_BEST_REPS as usize);
        for rep in 0..FULL_REPS {
            let n = p
                .sessions
                .iter()
                .filter(|s| s.rep == rep && matches!(s.target, Target::Pair { .. }))
                .count();
            assert_eq!(n, 20);
        }
        // Reverse order on odd repetitions.
        let firsts: Vec<&Target> = (0..2)
            .map(|rep| {
                &p.sessions
                    .iter()
                    .find(|s| s.rep == rep && s.target.is_dvma())
                    .unwrap()
                    .target
            })
            .collect();
        assert_ne!(firsts[0], firsts[1]);
        let sec = p
            .sessions
            .iter()
            .filter(|s| s.phase == Phase::Secondary)
            .count();
        assert_eq!(sec, 4 * FULL_REPS as usize);
        assert!(p.estimate() > Duration::from_secs(1800));
    }

    #[test]
    fn tiny_plan_and_errors() {
        let mut o = opts(false);
        o.modes = vec!["permanent".into()];
        o.completions = vec!["softint".into()];
        o.workloads = vec!["randread-4k-qd1".into()];
        o.peers = vec![];
        o.secondary = false;
        o.reps = Some(1);
        o.best_reps = Some(0);
        let p = build(&o).unwrap();
        assert_eq!(p.sessions.len(), 1);
        assert_eq!(p.fio_runs(), 1);
        o.modes = vec!["bogus".into()];
        assert!(build(&o).unwrap_err().contains("bogus"));
        let mut o = opts(true);
        o.runtime_s = Some(0.0);
        assert!(build(&o).is_err());
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(42)), "42 s");
        assert_eq!(human(Duration::from_secs(65)), "1 min 05 s");
        assert_eq!(human(Duration::from_secs(3720)), "1 h 02 min");
    }
}
