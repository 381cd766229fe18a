//! `dvma bench` (no subcommand): the benchmark matrix. Every DVMA mode ×
//! every completion mode of `dvma serve`, against nbdkit's file plugin and
//! qemu-nbd, with fio's nbd engine; the result is a report.
//!
//! # What runs
//!
//! Every server serves the same file: 256 MiB of random bytes, written and
//! synced at the start of the run, so fully allocated (earlier runs gave
//! each session a fresh sparse file, whose holes read as zeroes without
//! touching any data). The whole file is read
//! into the host's page cache before every session, so no server reads what
//! an earlier one evicted (none of the peers' settings here bypasses the
//! cache; `docs/bench/rtc-run.py`, which runs qemu-nbd `--cache=none`,
//! reads it before every fio run). Each *session* starts one server on it
//! (`dvma serve --listen 127.0.0.1:0 --config <[[disk]] sd0 = FILE>
//! --data-dir <fresh dir> --dvma M --completion C --cpus N --spl S
//! --intr-stack on|off`; `nbdkit -f file FILE`; `qemu-nbd -f raw -t FILE`,
//! all with their default host page-cache behaviour), runs fio workloads
//! against it one after another, and stops it (SIGTERM; a server that does
//! not exit 0 is reported). The workloads
//! ([`plan::WORKLOADS`]): 4 KiB random read at queue depth 1 and 32, 4 KiB
//! random write at 32, 1 MiB sequential read and write at 8. The sessions
//! are ordered by [`plan`]:
//!
//! 0. **peer settings**: each peer once at each of its settings
//!    ([`plan::PEER_SETTINGS`]: nbdkit's thread count, qemu-nbd's I/O engine
//!    and cache); the best (chosen as the best pair is) serves the rest of
//!    the run, so every peer is compared at its best;
//! 1. **matrix**: the 20 (DVMA mode, completion) pairs at spl lazy, interrupt
//!    stack on, every host CPU; a peer session before the first pair and
//!    after every few pairs, the peers taking turns (A, B, A, B: drift hits
//!    everyone alike); odd repetitions run the pairs in reverse order;
//! 2. **best pair vs peers**: the pair with the best geometric mean of
//!    throughput relative to the best on each phase-1 workload, `dvma serve`
//!    with no flags, and each peer, alternating, on all five workloads, 5
//!    repetitions (3 in a quick run). The report's "Against the peers,
//!    interleaved" section ([`compare`]) is made of these runs only, with
//!    per-repetition ratios;
//! 3. **secondary axes**: that pair with spl mask, with the interrupt stack
//!    off, and on one CPU;
//! 4. **the answer inside the kernel**: `dvma bench kernel` (shortened
//!    with `--quick`, below) as a child process into `DIR/kernel/`, or an earlier
//!    run's `kernel.md`, `kernel.json` and plots copied from
//!    `--kernel-from DIR` (`--no-kernel`: neither). Its `kernel.md`
//!    becomes the report's section "The answer: the mail's options
//!    measured inside the kernel" ([`crate::bench::kernel::as_section`]:
//!    one renderer for both), and its `kernel.json` the `kernel` key of
//!    `results.json`.
//!
//! `--quick` runs phase 1 on two workloads (4 KiB random read qd32, 1 MiB
//! sequential write) with 1 s fio runs, phase 2 three times, phase 3 once on
//! those two workloads, a short `dvma bench micro` and a shortened `dvma
//! bench kernel --quick` (30 ms windows, the curve for 2 pairs:
//! `KERNEL_QUICK_ARGS`): under 5 minutes on a 2-core machine (a quick run
//! skips the kernel bench, and says so, when it would end past its budget;
//! `--kernel-from` then adds an earlier run's). The full
//! run does every pair on every workload, 3 repetitions of 5 s; it prints its
//! estimated duration before it starts (so does `--quick`; `--dry-run` only
//! prints the plan).
//!
//! # What is measured
//!
//! Per fio run: IOPS, MiB/s, total latency percentiles (p50, p99 and the
//! CDF) from fio's JSON; the server's CPU time (user + system, every thread,
//! from `/proc/PID/stat`) and, for `dvma serve`, its kernel counters
//! (interrupts, softints, context switches, ASTs, IOMMU faults, DVMA pages
//! held; read by sending SIGUSR1 and waiting for its `--stats-json` file's
//! `seq` to move), both over fio's measured window (after its ramp; see
//! [`measure`] for how). Per-I/O figures divide them by the I/Os of that
//! window. Nothing in the report is estimated or carried over from another
//! run.
//!
//! # Output
//!
//! `DIR/report.md`, `DIR/results.json`, `DIR/plots/*.svg` (written by the
//! `report` crate: headline ratios to nbdkit, per-workload matrix, peers,
//! per-I/O breakdown, secondary axes, protection by DVMA mode,
//! micro-benchmarks, run-to-run spread), then sections added here: how the
//! run was made (commands, versions, the plan, missing peers and how to
//! install them, any failure), where the time goes against nbdkit, the
//! options compared, and next steps. `DIR/raw/` keeps every fio JSON and
//! log, every server log, and the server-side readings of every run.
//!
//! # Reading the report
//!
//! Ratios are dvma / nbdkit (above 1: dvma is faster) of medians over
//! repetitions, with the range over repetitions paired by repetition
//! number; ⚠ marks ranges wider than 10%. On a 2-core machine fio and the
//! server share the cores, so server CPU per I/O bounds throughput at queue
//! depth 32: compare "CPU µs/I/O" first, then the events per I/O that explain
//! it. A quick run's figures are indicative (one or two 1 s runs each).

pub mod choose;
pub mod compare;
pub mod fio;
pub mod measure;
pub mod notes;
pub mod plan;
pub mod server;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use report::{MachineInfo, PEERS, Results, Run, RunConfig};

use choose::{best_scores, best_setting};

use plan::{Phase, Plan, PlanOptions, Session, Target, Variant};
use server::{DvmaConf, Server};

/// What a device can still reach after an I/O completes, per DVMA mode.
pub const PROTECTIONS: [(&str, &str); 5] = [
    (
        "strict",
        "a device reaches nothing after unload (unmapped, IOTLB invalidated at once)",
    ),
    (
        "lazy",
        "a stale mapping stays reachable until the next batched flush (≤ flush timeout)",
    ),
    (
        "slots",
        "the slot keeps mapping the last buffer until reused: stale data reachable",
    ),
    (
        "permanent",
        "the whole pool stays mapped for good: the device can reach every I/O buffer at all times",
    ),
    (
        "shadow",
        "the device only reaches the bounce pool, never the caller's memory",
    ),
];

/// The protection description of a DVMA mode.
pub fn protection(mode: &str) -> Option<&'static str> {
    PROTECTIONS
        .iter()
        .find(|(m, _)| *m == mode)
        .map(|(_, p)| *p)
}

/// Arguments of `dvma bench` without a subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct MatrixArgs {
    /// Short run (under 5 minutes on 2 cores): every pair on two workloads,
    /// the best pair and the peers on all five, 1 s fio runs.
    #[arg(long)]
    pub quick: bool,
    /// Output directory: report.md, results.json, plots/, raw/.
    #[arg(long, value_name = "DIR", default_value = "dvma-bench")]
    pub out: PathBuf,
    /// Repetitions of the matrix [default: 1 with --quick, else 3].
    #[arg(long, value_name = "N")]
    pub reps: Option<u32>,
    /// Measured seconds per fio run [default: 1 with --quick, else 5].
    #[arg(long, value_name = "SECONDS")]
    pub runtime: Option<f64>,
    /// Repetitions of phase 2, the best pair and `dvma serve` with no flags
    /// against the peers, alternating [default: 3 with --quick, else 5; 0
    /// skips it].
    #[arg(long, value_name = "N")]
    pub best_reps: Option<u32>,
    /// fio ramp seconds before measuring [default: 0.25 with --quick, else 1].
    #[arg(long, value_name = "SECONDS")]
    pub ramp: Option<f64>,
    /// DVMA modes, comma-separated [default: strict,lazy,slots,permanent,shadow].
    #[arg(long, value_delimiter = ',', value_name = "MODES")]
    pub modes: Vec<String>,
    /// Completion modes, comma-separated [default: intr,softint,thread,ast].
    #[arg(long, value_delimiter = ',', value_name = "MODES")]
    pub completions: Vec<String>,
    /// Workloads, comma-separated [default: randread-4k-qd1,
    /// randread-4k-qd32, randwrite-4k-qd32, seqread-1m-qd8, seqwrite-1m-qd8].
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub workloads: Vec<String>,
    /// Peers, comma-separated, or `none` [default: nbdkit,qemu-nbd].
    #[arg(long, value_delimiter = ',', value_name = "PEERS")]
    pub peers: Vec<String>,
    /// Skip the secondary axes (spl, interrupt stack, CPUs) on the best pair.
    #[arg(long)]
    pub no_secondary: bool,
    /// Skip the micro-benchmarks section (`dvma bench micro`).
    #[arg(long)]
    pub no_micro: bool,
    /// Print the plan and its estimated duration; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Take the kernel bench's answer (`kernel.md`, `kernel.json`, plots)
    /// from an earlier `dvma bench kernel --out DIR` instead of running it.
    #[arg(long, value_name = "DIR", conflicts_with = "no_kernel")]
    pub kernel_from: Option<PathBuf>,
    /// Leave the kernel bench's answer out of the report.
    #[arg(long)]
    pub no_kernel: bool,
}

/// The title of the report's kernel section.
pub const KERNEL_SECTION: &str = "The answer: the mail's options measured inside the kernel";

/// What a quick matrix run adds to `dvma bench kernel --quick`: windows
/// of 30 ms instead of 60 and the curve for the best 2 pairs instead of 4,
/// so that the whole quick run stays under 5 minutes (30 s against 48 s
/// alone on the shared 2-core VM, next to a matrix of about 3.5 to 4
/// minutes). The ranges are wider: more ties.
const KERNEL_QUICK_ARGS: [&str; 5] = ["--quick", "--ms", "30", "--curve-pairs", "2"];
/// Estimated wall time of the quick matrix's kernel run (2 cores).
const KERNEL_QUICK_S: f64 = 35.0;
/// Estimated wall time of the full `dvma bench kernel` (2 cores).
const KERNEL_FULL_S: f64 = 540.0;

/// The kernel bench's answer: runs `exe bench kernel [--quick] --out
/// out/kernel` (stderr into `raw/kernel.stderr`), or copies an earlier
/// run's files from `from` into `out/kernel`; returns the report's section,
/// `kernel.json` and how it was made (for "How this run was made").
fn kernel_answer(
    exe: &Path,
    quick: bool,
    from: Option<&Path>,
    out: &Path,
    raw: &Path,
) -> Result<(String, serde_json::Value, String), String> {
    let dir = out.join("kernel");
    let how = match from {
        Some(src) => format!("an earlier run's files, copied from {}", src.display()),
        None => format!(
            "dvma bench kernel{} --out {}",
            if quick {
                format!(" {}", KERNEL_QUICK_ARGS.join(" "))
            } else {
                String::new()
            },
            dir.display()
        ),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    match from {
        Some(src) => {
            let same = src.canonicalize().ok() == dir.canonicalize().ok();
            if !same {
                let entries =
                    std::fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?;
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name == "kernel.md"
                        || name == "kernel.json"
                        || (name.starts_with("kernel-") && name.ends_with(".svg"))
                    {
                        std::fs::copy(e.path(), dir.join(&name))
                            .map_err(|e| format!("copying {name}: {e}"))?;
                    }
                }
            }
        }
        None => {
            let mut c = Command::new(exe);
            c.args(["bench", "kernel", "--out"]).arg(&dir);
            if quick {
                c.args(KERNEL_QUICK_ARGS);
            }
            let o = c
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("dvma bench kernel: {e}"))?;
            let _ = std::fs::write(raw.join("kernel.stderr"), &o.stderr);
            if !o.status.success() {
                return Err(format!(
                    "dvma bench kernel failed ({}); see raw/kernel.stderr",
                    o.status
                ));
            }
        }
    }
    let read = |n: &str| {
        let p = dir.join(n);
        std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let md = read("kernel.md")?;
    let json: serde_json::Value =
        serde_json::from_str(&read("kernel.json")?).map_err(|e| format!("kernel.json: {e}"))?;
    let mut section = crate::bench::kernel::as_section(&md, KERNEL_SECTION, "kernel");
    if let Some(src) = from {
        section = section.replacen(
            "\n\n",
            &format!(
                "\n\nFrom an earlier `dvma bench kernel` run (`--kernel-from {}`), not measured \
                 in this run; its files are in `kernel/`.\n\n",
                src.display()
            ),
            1,
        );
    }
    Ok((section, json, how))
}

/// A date as RFC 3339 UTC, from the system clock.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The host's CPUs, at most 64 (what `dvma serve` uses by default).
fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(64) as u32)
        .unwrap_or(1)
}

/// Removes a directory when dropped (the backing files).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything a run collects.
struct Bench<'a> {
    exe: PathBuf,
    raw: PathBuf,
    work: PathBuf,
    /// The backing file every server serves ([`server::backing_file`]).
    image: PathBuf,
    plan: &'a Plan,
    pb: ProgressBar,
    runs: Vec<Run>,
    failures: Vec<String>,
    warnings: Vec<String>,
    /// An example command line per server kind (`dvma`, peers).
    commands: BTreeMap<String, String>,
    best: Option<(String, String)>,
    scores: Vec<((String, String), f64)>,
    /// Phase-2 runs.
    compare: Vec<compare::Entry>,
    /// Phase-0 runs: each with its [`plan::PEER_SETTINGS`] index.
    tuning: Vec<(usize, Run)>,
    /// Each peer's chosen setting.
    peer_best: BTreeMap<String, usize>,
    /// Host-level per-I/O figures of every run.
    host: Vec<notes::HostRow>,
    sessions_done: usize,
}

impl Bench<'_> {
    fn say(&self, msg: &str) {
        if self.pb.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.pb.suspend(|| eprintln!("{msg}"));
        }
    }

    fn fail(&mut self, msg: String) {
        self.say(&format!("dvma bench: {msg}"));
        self.failures.push(msg);
    }

    fn warn_once(&mut self, msg: String) {
        if !self.warnings.contains(&msg) {
            self.say(&format!("dvma bench: warning: {msg}"));
            self.warnings.push(msg);
        }
    }

    /// The server to start and the configuration its runs carry.
    fn resolve(&self, t: &Target) -> Option<(Option<DvmaConf>, RunConfig)> {
        let dvma = |mode: &str, completion: &str, v: Variant| {
            let conf = DvmaConf {
                mode: mode.to_string(),
                completion: completion.to_string(),
                spl: if v == Variant::SplMask {
                    "mask"
                } else {
                    plan::PRIMARY_SPL
                }
                .to_string(),
                intr_stack: v != Variant::IntrStackOff && plan::PRIMARY_INTR_STACK,
                cpus: if v == Variant::OneCpu {
                    1
                } else {
                    self.plan.cpus
                },
                defaults: false,
            };
            let mut rc = RunConfig::dvma(mode, completion)
                .with_spl(conf.spl.clone())
                .with_intr_stack(conf.intr_stack)
                .with_cpus(conf.cpus);
            if let Some(p) = protection(mode) {
                rc = rc.with_protection(p);
            }
            (Some(conf), rc)
        };
        match t {
            Target::Default => {
                // Described by the built-in machine's values, which are
                // what a `dvma serve` without flags runs.
                let d = crate::config::MachineSpec::default_spec();
                let disk = d.disks.first()?;
                let (mode, completion) = (disk.dvma.name(), disk.completion.name());
                if self
                    .best
                    .as_ref()
                    .is_some_and(|(m, c)| m == mode && c == completion)
                    && d.machine.spl.name() == plan::PRIMARY_SPL
                    && d.machine.intr_stack == plan::PRIMARY_INTR_STACK
                    && d.machine.cpus as u32 == self.plan.cpus
                {
                    // The best pair is the default configuration: its own
                    // sessions measure it.
                    return None;
                }
                let (conf, _) = dvma(mode, completion, Variant::Primary);
                let mut conf = conf?;
                conf.defaults = true;
                conf.spl = d.machine.spl.name().to_string();
                conf.intr_stack = d.machine.intr_stack;
                conf.cpus = d.machine.cpus as u32;
                let mut rc = RunConfig::dvma(mode, completion)
                    .with_spl(conf.spl.clone())
                    .with_intr_stack(conf.intr_stack)
                    .with_cpus(conf.cpus);
                if let Some(p) = protection(mode) {
                    rc = rc.with_protection(p);
                }
                Some((Some(conf), rc))
            }
            Target::Pair { mode, completion } => Some(dvma(mode, completion, Variant::Primary)),
            Target::Best(v) => self.best.as_ref().map(|(m, c)| dvma(m, c, *v)),
            Target::Peer(p) => Some((None, RunConfig::peer(p.clone()))),
            Target::PeerAt(i) => Some((None, RunConfig::peer(plan::PEER_SETTINGS[*i].0))),
        }
    }

    fn session(&mut self, s: &Session) {
        let n = s.workloads.len() as u64;
        let Some((conf, rc)) = self.resolve(&s.target) else {
            self.pb.inc(n);
            return;
        };
        self.sessions_done += 1;
        let label = match &conf {
            Some(c) if c.defaults => format!("defaults ({}/{})", c.mode, c.completion),
            Some(c) => {
                let mut l = format!("{}/{}", c.mode, c.completion);
                if c.spl != plan::PRIMARY_SPL {
                    l.push_str(&format!(" spl={}", c.spl));
                }
                if c.intr_stack != plan::PRIMARY_INTR_STACK {
                    l.push_str(" intr-stack=off");
                }
                if c.cpus != self.plan.cpus {
                    l.push_str(&format!(" cpus={}", c.cpus));
                }
                l
            }
            None => rc.server.clone(),
        };
        let slug: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let tag = format!("{:03}-{slug}-r{}", self.sessions_done, s.rep);
        let dir = self.work.join(&tag);
        let _cleanup = RemoveOnDrop(dir.clone());
        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.fail(format!("creating {}: {e}", dir.display()));
            self.pb.inc(n);
            return;
        }
        self.pb.set_message(format!("{label}: starting"));
        if let Err(e) = server::warm(&self.image) {
            self.warn_once(e);
        }
        let started = match &conf {
            Some(c) => Server::start_dvma(&self.exe, c, &self.image, &dir, &self.raw, &tag),
            None => {
                let args = plan::PEER_SETTINGS[self.peer_setting(&s.target)].2;
                Server::start_peer(&rc.server, args, &self.image, &self.raw, &tag)
            }
        };
        let mut srv = match started {
            Ok(srv) => srv,
            Err(e) => {
                self.fail(format!("{label} (rep {}): {e}", s.rep));
                self.pb.inc(n);
                return;
            }
        };
        if s.phase != Phase::Tune {
            self.commands
                .entry(rc.server.clone())
                .or_insert_with(|| srv.command.clone());
        }
        for (i, w) in s.workloads.iter().enumerate() {
            self.pb
                .set_message(format!("{label}: {} (rep {})", w.name, s.rep));
            let out = self.raw.join(format!("{tag}-{}.json", w.name));
            let r = measure::run(&mut srv, w, &self.plan.timing, &out);
            self.pb.inc(1);
            let m = match r {
                Ok(m) => m,
                Err(e) => {
                    let hung = e.starts_with(fio::HUNG);
                    self.fail(format!("{label} {} (rep {}): {e}", w.name, s.rep));
                    let rest = n - i as u64 - 1;
                    if !srv.running() {
                        self.fail(format!(
                            "{label}: the server died during {}; {rest} workload(s) of the session not run",
                            w.name
                        ));
                    } else if hung && rest > 0 {
                        self.fail(format!(
                            "{label}: no answer during {}: the session's {rest} other workload(s) not run",
                            w.name
                        ));
                    } else if !hung {
                        continue;
                    }
                    self.pb.inc(rest);
                    break;
                }
            };
            let _ = std::fs::write(out.with_extension("server.json"), m.audit.to_string());
            if let Some(warning) = m.warning {
                self.warn_once(warning);
            }
            match Run::from_fio(&m.job, &rc, w.name, s.rep, &m.sample) {
                Ok(run) if s.phase == Phase::Tune => {
                    if let Target::PeerAt(i) = s.target {
                        self.tuning.push((i, run));
                    }
                }
                Ok(run) => {
                    let ios = m.job.total_ios() as f64;
                    if s.phase == Phase::Best {
                        let conf_label = || {
                            run.dvma_mode.clone().unwrap_or_default()
                                + "/"
                                + run.completion.as_deref().unwrap_or_default()
                        };
                        let who = match &s.target {
                            Target::Default => compare::Who::Default(conf_label()),
                            Target::Peer(p) => compare::Who::Peer(p.clone()),
                            _ => compare::Who::Best(conf_label()),
                        };
                        self.compare.push(compare::Entry {
                            who,
                            run: run.clone(),
                            switches: m.host.switches.map(|n| n / ios),
                        });
                    }
                    self.host.push(notes::HostRow {
                        key: report::ConfigKey::of(&run),
                        workload: run.workload.clone(),
                        user_us: m.host.user_s * 1e6 / ios,
                        sys_us: m.host.sys_s * 1e6 / ios,
                        switches: m.host.switches.map(|n| n / ios),
                    });
                    self.runs.push(run);
                }
                Err(e) => self.fail(format!("{label} {} (rep {}): {e}", w.name, s.rep)),
            }
        }
        self.pb.set_message(format!("{label}: stopping"));
        if let Err(e) = srv.stop() {
            self.fail(format!("{label} (rep {}): {e}", s.rep));
        }
    }

    /// The [`plan::PEER_SETTINGS`] index a peer session runs at.
    fn peer_setting(&self, t: &Target) -> usize {
        match t {
            Target::PeerAt(i) => *i,
            Target::Peer(p) => self.peer_best.get(p).copied().unwrap_or_else(|| {
                plan::peer_settings(p)
                    .next()
                    .expect("every peer has a setting")
            }),
            _ => unreachable!("not a peer: {t}"),
        }
    }

    /// Chooses each peer's setting from the phase-0 runs, as the best pair
    /// is chosen: the highest geometric mean, over the workloads, of its
    /// throughput relative to the peer's best setting on that workload.
    fn choose_peer_settings(&mut self) {
        for p in &self.plan.peers {
            let mine: Vec<(usize, &Run)> = self
                .tuning
                .iter()
                .filter(|(i, _)| plan::PEER_SETTINGS[*i].0 == p.as_str())
                .map(|(i, r)| (*i, r))
                .collect();
            if let Some(i) = best_setting(&mine, &self.plan.select) {
                self.peer_best.insert(p.clone(), i);
            }
        }
    }

    /// Chooses the best pair from phase-1 runs: the highest geometric mean,
    /// over the phase-1 workloads, of its throughput relative to the best
    /// pair on that workload (pairs missing a workload are not candidates).
    fn choose_best(&mut self) {
        let primary: Vec<Run> = self
            .runs
            .iter()
            .filter(|r| {
                r.is_dvma()
                    && r.spl.as_deref() == Some(plan::PRIMARY_SPL)
                    && r.intr_stack == Some(plan::PRIMARY_INTR_STACK)
                    && r.cpus == Some(self.plan.cpus)
            })
            .cloned()
            .collect();
        self.scores = best_scores(&primary, &self.plan.select);
        self.best = self.scores.first().map(|(p, _)| p.clone());
        match &self.best {
            Some((m, c)) => self.say(&format!(
                "dvma bench: best pair of the matrix: {m}/{c} (score {:.3})",
                self.scores[0].1
            )),
            None => self.fail(
                "no (DVMA mode, completion) pair completed every phase-1 workload: the best-pair phases are skipped".to_string(),
            ),
        }
    }
}

/// Runs `exe bench micro --json --reps N`.
fn run_micro(exe: &Path, reps: u32, raw: &Path) -> Result<serde_json::Value, String> {
    let log = raw.join("micro.stderr");
    let o = Command::new(exe)
        .args(["bench", "micro", "--json", "--reps", &reps.to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("dvma bench micro: {e}"))?;
    let _ = std::fs::write(&log, &o.stderr);
    if !o.status.success() {
        return Err(format!(
            "dvma bench micro failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("dvma bench micro --json: {e}"))
}

/// Checks that this binary has `dvma serve`.
fn check_serve(exe: &Path) -> Result<(), String> {
    let o = Command::new(exe)
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{} serve --help` fails: this dvma has no working `serve` command, which the matrix needs ({})",
            exe.display(),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ))
    }
}

fn describe(plan: &Plan) -> String {
    let count = |f: &dyn Fn(&Session) -> bool| plan.sessions.iter().filter(|s| f(s)).count();
    let dvma = count(&|s| s.target.is_dvma());
    let peers = count(&|s| !s.target.is_dvma());
    let mut parts = vec![format!(
        "{} pair{} × {} workload{} × {} rep{}",
        plan.pairs.len(),
        if plan.pairs.len() == 1 { "" } else { "s" },
        plan.select.len(),
        if plan.select.len() == 1 { "" } else { "s" },
        plan.reps,
        if plan.reps == 1 { "" } else { "s" }
    )];
    let tune = count(&|s| s.phase == Phase::Tune);
    if tune > 0 {
        parts.insert(0, format!("{tune} peer settings tried"));
    }
    let best = count(&|s| s.phase == Phase::Best);
    if best > 0 {
        parts.push(format!(
            "best pair and peers on {} workloads ({best} sessions)",
            plan.workloads.len()
        ));
    }
    let sec = count(&|s| s.phase == Phase::Secondary);
    if sec > 0 {
        parts.push(format!("{sec} secondary-axis sessions"));
    }
    if let Some(r) = plan.micro_reps {
        parts.push(format!("bench micro --reps {r}"));
    }
    format!(
        "{}; {} fio runs of {} s (+{} s ramp), {dvma} dvma and {peers} peer server starts",
        parts.join(", "),
        plan.fio_runs(),
        plan.timing.runtime_s,
        plan.timing.ramp_s
    )
}

/// `dvma bench [--quick] [--out DIR] ...`.
pub fn main(a: MatrixArgs) -> Result<ExitCode, String> {
    let t0 = Instant::now();
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;

    // Peers: wanted, installed, missing.
    let wanted: Vec<String> = if a.peers.iter().any(|p| p == "none") {
        Vec::new()
    } else if a.peers.is_empty() {
        PEERS.iter().map(|p| p.to_string()).collect()
    } else {
        a.peers.clone()
    };
    let mut peers = Vec::new();
    let mut missing = Vec::new();
    for p in PEERS.iter().filter(|p| wanted.iter().any(|w| w == *p)) {
        if server::which(p).is_some() {
            peers.push(p.to_string());
        } else {
            missing.push(p.to_string());
        }
    }
    if let Some(bad) = wanted.iter().find(|w| !PEERS.contains(&w.as_str())) {
        return Err(format!(
            "unknown peer {bad:?} (known: {}, or none)",
            PEERS.join(", ")
        ));
    }

    let opts = PlanOptions {
        quick: a.quick,
        reps: a.reps,
        runtime_s: a.runtime,
        ramp_s: a.ramp,
        best_reps: a.best_reps,
        modes: a.modes.clone(),
        completions: a.completions.clone(),
        workloads: a.workloads.clone(),
        peers: peers.clone(),
        secondary: !a.no_secondary,
        micro: !a.no_micro,
        cpus: host_cpus(),
    };
    let plan = plan::build(&opts)?;
    let run_kernel = !a.no_kernel && a.kernel_from.is_none();
    let kernel_s = if !run_kernel {
        0.0
    } else if plan.quick {
        KERNEL_QUICK_S
    } else {
        KERNEL_FULL_S
    };
    let estimate = plan.estimate() + Duration::from_secs_f64(kernel_s);
    eprintln!(
        "dvma bench: {} run: {}; estimated {}",
        if plan.quick { "quick" } else { "full" },
        describe(&plan),
        plan::human(estimate)
    );
    for m in &missing {
        eprintln!(
            "dvma bench: peer {m} is not installed ({}): running without it",
            server::install_hint(m)
        );
    }
    if a.dry_run {
        for (i, s) in plan.sessions.iter().enumerate() {
            let w: Vec<&str> = s.workloads.iter().map(|w| w.name).collect();
            println!(
                "{:3} {:<18} rep {} {:<24} {}",
                i + 1,
                s.phase.to_string(),
                s.rep,
                s.target.to_string(),
                w.join(",")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    let fio_version = fio::check().map_err(|e| {
        format!(
            "fio is needed to run the matrix: {e} ({})",
            server::install_hint("fio")
        )
    })?;
    check_serve(&exe)?;

    let out = a.out.clone();
    let raw = out.join("raw");
    let work = out.join("work");
    for d in [&out, &raw, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let _cleanup = RemoveOnDrop(work.clone());
    let image = work.join("disk.img");
    eprintln!(
        "dvma bench: writing the backing file ({} MiB, fully allocated)",
        server::DISK_BYTES >> 20
    );
    server::backing_file(&image)?;

    let term = std::io::stderr().is_terminal();
    let steps = plan.fio_runs() as u64 + u64::from(plan.micro_reps.is_some());
    let pb = if term {
        let pb = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} (~{eta} left) {msg}",
            )
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
        );
        pb.enable_steady_tick(Duration::from_millis(250));
        pb
    } else {
        ProgressBar::hidden()
    };

    let mut b = Bench {
        exe: exe.clone(),
        raw: raw.clone(),
        work: work.clone(),
        image,
        plan: &plan,
        pb,
        runs: Vec::new(),
        failures: Vec::new(),
        warnings: Vec::new(),
        commands: BTreeMap::new(),
        best: None,
        scores: Vec::new(),
        tuning: Vec::new(),
        peer_best: BTreeMap::new(),
        compare: Vec::new(),
        sessions_done: 0,
        host: Vec::new(),
    };
    for m in &missing {
        b.warnings.push(format!(
            "peer {m} is not installed: install it with `{}`",
            server::install_hint(m)
        ));
    }

    let micro = match plan.micro_reps {
        Some(reps) => {
            b.pb.set_message("bench micro");
            let r = run_micro(&exe, reps, &raw);
            b.pb.inc(1);
            match r {
                Ok(v) => Some(v),
                Err(e) => {
                    b.fail(e);
                    None
                }
            }
        }
        None => None,
    };

    let mut chose = false;
    let mut tuned = false;
    for s in &plan.sessions {
        if s.phase != Phase::Tune && !tuned {
            b.choose_peer_settings();
            tuned = true;
        }
        if s.phase != Phase::Matrix && s.phase != Phase::Tune && !chose {
            b.choose_best();
            chose = true;
        }
        // A quick run keeps its promise even when servers hang: sessions
        // that would end past the budget are skipped (and reported).
        let left = plan::QUICK_BUDGET_S - plan::cost::REPORT_S - t0.elapsed().as_secs_f64();
        if plan.quick && plan.session_s(s) > left {
            b.fail(format!(
                "{} (rep {}) skipped: it would end past the quick run's {} s budget",
                s.target,
                s.rep,
                plan::QUICK_BUDGET_S
            ));
            b.pb.inc(s.workloads.len() as u64);
            continue;
        }
        b.session(s);
    }
    if !chose && plan.pairs.len() > 1 {
        b.choose_best();
    }
    let mut kernel = None;
    if !a.no_kernel {
        let left = plan::QUICK_BUDGET_S - plan::cost::REPORT_S - t0.elapsed().as_secs_f64();
        if plan.quick && run_kernel && KERNEL_QUICK_S > left {
            let w = format!(
                "the kernel bench (`dvma bench kernel {}`) was not run: it would end past the \
                 quick run's {} s budget; run `dvma bench kernel --quick --out D` alone and \
                 pass `--kernel-from D`",
                KERNEL_QUICK_ARGS.join(" "),
                plan::QUICK_BUDGET_S
            );
            eprintln!("dvma bench: {w}");
            b.warnings.push(w);
        } else {
            b.pb.set_message("bench kernel");
            match kernel_answer(&exe, plan.quick, a.kernel_from.as_deref(), &out, &raw) {
                Ok((section, json, how)) => {
                    b.commands.insert("the kernel bench".into(), how);
                    kernel = Some((section, json));
                }
                Err(e) => b.fail(e),
            }
        }
    }
    b.pb.finish_and_clear();

    let mut protections: Vec<(String, String)> = Vec::new();
    for (m, _) in &plan.pairs {
        if !protections.iter().any(|(x, _)| x == m)
            && let Some(p) = protection(m)
        {
            protections.push((m.clone(), p.to_string()));
        }
    }
    let results = Results {
        runs: std::mem::take(&mut b.runs),
        micro,
        machine: MachineInfo::detect(now_rfc3339()),
        duration_s: t0.elapsed().as_secs_f64(),
        quick: plan.quick,
        protections,
        kernel: kernel.as_ref().map(|k| k.1.clone()),
    };
    let files = report::write_report(&out, &results).map_err(|e| e.to_string())?;
    let peer_trials: Vec<notes::PeerTrial> = plan
        .sessions
        .iter()
        .filter_map(|s| match s.target {
            Target::PeerAt(i) => Some(i),
            _ => None,
        })
        .map(|i| {
            let (peer, setting, _) = plan::PEER_SETTINGS[i];
            let iops = plan
                .select
                .iter()
                .filter_map(|w| {
                    let v: Vec<f64> = b
                        .tuning
                        .iter()
                        .filter(|(j, r)| *j == i && r.workload == w.name)
                        .map(|(_, r)| r.iops)
                        .collect();
                    report::Stat::of(&v).map(|s| (w.name.to_string(), s.median))
                })
                .collect();
            notes::PeerTrial {
                peer: peer.to_string(),
                setting: setting.to_string(),
                iops,
                chosen: b.peer_best.get(peer) == Some(&i),
            }
        })
        .collect();
    let notes = notes::Notes {
        plan: &plan,
        command: std::iter::once("dvma".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        fio_version: &fio_version,
        peer_versions: peers
            .iter()
            .map(|p| (p.clone(), server::version(p).unwrap_or_default()))
            .collect(),
        missing: &missing,
        commands: &b.commands,
        scores: &b.scores,
        best: b.best.as_ref(),
        failures: &b.failures,
        host: &b.host,
        warnings: &b.warnings,
        estimate,
        clk_tck: server::clk_tck(),
        peer_trials: &peer_trials,
    };
    notes::append(&files.report_md, &results, &notes)?;
    let section = compare::render(&b.compare, &plan.workloads);
    if !section.is_empty() {
        notes::insert_after_headline(&files.report_md, &section)?;
    }
    if let Some((section, _)) = &kernel {
        notes::insert_after_headline(&files.report_md, section)?;
    }
    // The duration in the report covers everything but writing it.
    let total = t0.elapsed();

    println!(
        "dvma bench: {} fio runs in {} (estimated {}); wrote {}, {} and {} plots",
        results.runs.len(),
        plan::human(total),
        plan::human(estimate),
        files.report_md.display(),
        files.results_json.display(),
        files.plots.len()
    );
    let against = compare::lines(&b.compare, &plan.workloads);
    if against.is_empty() {
        for line in notes::headline_lines(&results) {
            println!("  {line}");
        }
    } else {
        println!("  against the peers, interleaved (median, min-max over repetitions):");
        for line in against {
            println!("  {line}");
        }
    }
    if b.failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "dvma bench: {} failure(s); see \"Problems\" in {}",
            b.failures.len(),
            files.report_md.display()
        );
        Ok(ExitCode::from(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use report::DVMA_MODES;

    #[test]
    fn every_mode_has_a_protection() {
        for m in DVMA_MODES {
            assert!(protection(m).is_some(), "{m}");
        }
    }

    #[test]
    fn rfc3339_dates() {
        let d = now_rfc3339();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.ends_with('Z') && d.as_bytes()[10] == b'T', "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
