//! What the soak found: a [`PairReport`] per pair (verified I/Os,
//! mismatches, stalls, how the server exited) and the [`SoakReport`] of the
//! run, serialised by `--json`, or printed as a table row per pair with
//! the details of what went wrong.

use serde::Serialize;

/// One stall of the watchdog.
#[derive(Debug, Clone, Serialize)]
pub struct Stall {
    /// The connection (0-based).
    pub conn: usize,
    /// The window it began in (0-based, `start_s / window`).
    pub window: u64,
    /// Start of the quiet period (a window of counted time without a
    /// completion), seconds since the pair's I/O began.
    pub start_s: f64,
    /// When the watchdog saw it.
    pub end_s: f64,
    /// The connection's last completion, seconds since the I/O began
    /// (`None`: it never completed one).
    pub last_progress_s: Option<f64>,
    /// Requests it had in flight.
    pub in_flight: usize,
    /// What it was doing: `running` or `draining`.
    pub phase: &'static str,
    /// Seconds from its last completion before the stall to its next one,
    /// if it came back during the grace period (three windows); `None`:
    /// it did not (a stuck server).
    pub recovered_after_s: Option<f64>,
}

/// What one pair did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairReport {
    /// DVMA mode.
    pub dvma: String,
    /// Completion mode.
    pub completion: String,
    /// Seconds of I/O (to the end of the drain).
    pub seconds: f64,
    /// Connections.
    pub conns: u32,
    /// Depth per connection.
    pub depth: u32,
    /// Acknowledged writes plus reads that matched the model.
    pub verified_ios: u64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Blocks of reads checked against a known generation (not zeros).
    pub blocks_checked: u64,
    /// Bytes moved (read and written).
    pub bytes: u64,
    /// Blocks that did not match the model.
    pub mismatches: u64,
    /// The first mismatches, described.
    pub mismatch_notes: Vec<String>,
    /// NBD error replies.
    pub errors: u64,
    /// Watchdog stalls.
    pub stalls: Vec<Stall>,
    /// Seconds not counted against the server because the watchdog itself
    /// ran late (the host did not run the soak: an overloaded machine).
    pub unobserved_s: f64,
    /// The watchdog's worst lateness, seconds.
    pub watchdog_late_max_s: f64,
    /// Verified I/Os per second of I/O.
    pub iops: f64,
    /// The server exited 0 within 10 s of SIGINT.
    pub clean_exit: bool,
    /// How it exited (`exit status: 0`, `killed after 10 s`, ...).
    pub exit: String,
    /// Everything else that went wrong (start, connection errors).
    pub failures: Vec<String>,
    /// The server's last output lines, when the pair failed.
    pub server_tail: Vec<String>,
}

impl PairReport {
    /// Whether the pair is clean.
    pub fn ok(&self) -> bool {
        self.mismatches == 0
            && self.errors == 0
            && self.stalls.is_empty()
            && self.clean_exit
            && self.failures.is_empty()
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// The seed.
    pub seed: u64,
    /// Every pair, in order.
    pub pairs: Vec<PairReport>,
    /// Sum of verified I/Os.
    pub verified_ios: u64,
    /// Sum of mismatches.
    pub mismatches: u64,
    /// Sum of stalls.
    pub stalls: usize,
    /// Pairs that were not clean.
    pub failed_pairs: usize,
    /// Wall time of the whole run, seconds.
    pub wall_seconds: f64,
    /// Every pair was clean.
    pub ok: bool,
}

pub(super) fn print_header() {
    println!(
        "{:<10} {:<10} {:>6} {:>12} {:>10} {:>10} {:>10} {:>6} {:>9}  exit",
        "dvma", "completion", "secs", "verified", "reads", "writes", "mismatch", "stalls", "IOPS"
    );
}

pub(super) fn print_pair(r: &PairReport) {
    println!(
        "{:<10} {:<10} {:>6.1} {:>12} {:>10} {:>10} {:>10} {:>6} {:>9.0}  {}{}",
        r.dvma,
        r.completion,
        r.seconds,
        r.verified_ios,
        r.reads,
        r.writes,
        r.mismatches,
        r.stalls.len(),
        r.iops,
        if r.clean_exit { "clean" } else { "NOT CLEAN" },
        if r.ok() { "" } else { "  FAIL" }
    );
    for s in &r.stalls {
        println!(
            "    stall: conn {} completed nothing in {:.1}-{:.1} s (window {}, {}); last progress {}; {} in flight; {}",
            s.conn,
            s.start_s,
            s.end_s,
            s.window,
            s.phase,
            s.last_progress_s
                .map_or("never".to_string(), |t| format!("at {t:.2} s")),
            s.in_flight,
            s.recovered_after_s
                .map_or("never came back".to_string(), |t| format!(
                    "came back {t:.2} s after its last progress"
                ))
        );
    }
    if r.unobserved_s > 0.0 && !r.ok() {
        println!(
            "    watchdog: {:.1} s not counted (it ran up to {:.2} s late: host overloaded)",
            r.unobserved_s, r.watchdog_late_max_s
        );
    }
    for n in &r.mismatch_notes {
        println!("    {n}");
    }
    if r.errors > 0 {
        println!("    {} NBD error replies", r.errors);
    }
    for f in &r.failures {
        println!("    {f}");
    }
    if !r.clean_exit {
        println!("    exit: {}", r.exit);
    }
    if !r.server_tail.is_empty() {
        println!("    server's last output ({}/{}):", r.dvma, r.completion);
        for l in &r.server_tail {
            println!("      | {l}");
        }
    }
}
