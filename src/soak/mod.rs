//! `dvma soak`: `dvma serve` under verified random I/O, pair by pair, with a
//! watchdog.
//!
//! For every pair of DVMA mode × completion mode (all 20 unless restricted)
//! the soak starts `dvma serve` as a child process (this same executable,
//! `serve --listen 127.0.0.1:0`, a fresh temporary `--data-dir`), opens
//! `--conns` NBD connections and keeps `--depth` requests in flight on each:
//! reads and writes of 4 KiB, some larger (up to `--max-kib`), and a rare
//! FLUSH, at random offsets of the connection's own part of the disk.
//!
//! # Verification
//! Every 4 KiB block written carries a header (a magic, its byte offset, the
//! write's generation, the connection's tag) and a checksum over the whole
//! block; the payload is derived from the offset and the generation. Each
//! connection keeps a model of its part of the disk (the generation last
//! acknowledged for each block; 0 = never written, must read as zeros), and
//! the parts are disjoint, so the model is exact. A block with a request in
//! flight is never touched by another request until that one is answered,
//! so a read always has exactly one right answer. A *verified I/O* is a
//! write the server acknowledged, or a read whose every block matched the
//! model; a *mismatch* is a block that did not (stale generation, another
//! block's data, a bad checksum, non-zero data where nothing was written).
//!
//! # Watchdog
//! Every `--window` seconds (2 by default) each connection must have
//! completed at least one request. A connection that did not is a *stall*:
//! it is reported (pair, window, time of the connection's last completion,
//! requests in flight, whether it came back) and the pair fails. The load
//! goes on for a grace period of three windows to see whether the stalled
//! connections come back, then the pair ends (a livelocked server does not
//! come back, and it burns the CPUs the next pair needs). Time the host did
//! not give the soak itself (its watchdog woke late) is not counted against
//! the server.
//!
//! # Shutdown
//! At the end of each pair the soak drains its requests, disconnects, sends
//! SIGINT and requires the server to exit 0 within 10 s; otherwise it is
//! killed (SIGKILL) and the pair fails. The exit status of `dvma soak` is 0
//! only if every pair was clean.
//!
//! # Modules
//! * `block`: the block format (header, checksum, payload) and its check
//!   against the model.
//! * `conn`: one connection's workload generator and verifier (its model,
//!   sender and receiver threads) and the NBD handshake.
//! * `server`: a `dvma serve` child process, its output and its shutdown.
//! * `pair`: one pair's run: connections, the watchdog, the drain.
//! * `report`: what a pair and the run found, as text or JSON.
//! * here: the arguments, the pairs and `main`.

use std::io::{self, IsTerminal};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kern::Completion;
use kern::bus_dma::DvmaMode;

mod block;
mod conn;
mod pair;
mod report;
mod server;

use block::mix;
pub use block::{BLOCK, check_block, fill_block};
use pair::{Load, Progress, run_pair};
pub use report::{PairReport, SoakReport, Stall};
use report::{print_header, print_pair};
pub use server::EXIT_TIMEOUT;

/// Mismatches described in detail per pair (the rest are only counted).
const MISMATCH_NOTES: usize = 10;

/// Arguments of `dvma soak`.
#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Total run time in minutes, split evenly over the pairs [default: 5].
    #[arg(long, value_name = "N", conflicts_with = "seconds")]
    minutes: Option<f64>,
    /// Total run time in seconds, split evenly over the pairs.
    #[arg(long, value_name = "N")]
    seconds: Option<f64>,
    /// Only these DVMA modes (comma-separated; default: all five).
    #[arg(long, value_delimiter = ',', value_name = "MODES")]
    dvma: Vec<String>,
    /// Only these completion modes (comma-separated; default: all four).
    #[arg(long, value_delimiter = ',', value_name = "MODES")]
    completion: Vec<String>,
    /// Exactly these pairs, DVMA/COMPLETION (comma-separated, e.g.
    /// `permanent/ast,strict/intr`), instead of --dvma x --completion.
    #[arg(long, value_delimiter = ',', value_name = "PAIRS", conflicts_with_all = ["dvma", "completion"])]
    pair: Vec<String>,
    /// NBD connections per server.
    #[arg(long, value_name = "K", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    conns: u32,
    /// Requests in flight per connection.
    #[arg(long, value_name = "D", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    depth: u32,
    /// Largest request in KiB (a multiple of 4; 3 in 4 requests are 4 KiB).
    #[arg(long, value_name = "KIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(4..=4096))]
    max_kib: u32,
    /// Percentage of reads among reads and writes.
    #[arg(long, value_name = "PCT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    read_pct: u32,
    /// Watchdog window in seconds: every connection must complete a request
    /// in every window.
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    window: f64,
    /// Random seed (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Keep every server's last output lines (its statistics at exit) in
    /// the report, not only those of failed pairs.
    #[arg(long)]
    server_output: bool,
    /// More arguments for every `dvma serve` (after `--`, e.g. `-- --cpus 1`).
    #[arg(last = true, value_name = "SERVE_ARGS")]
    serve_args: Vec<String>,
}

fn pick<T: Copy>(
    names: &[String],
    all: &[T],
    parse: fn(&str) -> Option<T>,
    what: &str,
) -> Result<Vec<T>, String> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    names
        .iter()
        .map(|n| parse(n.trim()).ok_or_else(|| format!("unknown {what} `{n}`")))
        .collect()
}

/// The pairs to run, in order.
fn pairs(a: &SoakArgs) -> Result<Vec<(DvmaMode, Completion)>, String> {
    const DVMA: &str = "DVMA mode (strict, lazy, slots, permanent, shadow)";
    const COMPLETION: &str = "completion mode (intr, softint, thread, ast)";
    if !a.pair.is_empty() {
        return a
            .pair
            .iter()
            .map(|p| {
                let (d, c) = p
                    .split_once('/')
                    .ok_or_else(|| format!("--pair {p}: want DVMA/COMPLETION"))?;
                let d =
                    DvmaMode::from_name(d.trim()).ok_or_else(|| format!("unknown {DVMA} `{d}`"))?;
                let c = Completion::from_name(c.trim())
                    .ok_or_else(|| format!("unknown {COMPLETION} `{c}`"))?;
                Ok((d, c))
            })
            .collect();
    }
    let ds = pick(&a.dvma, &DvmaMode::ALL, DvmaMode::from_name, DVMA)?;
    let cs = pick(
        &a.completion,
        &Completion::ALL,
        Completion::from_name,
        COMPLETION,
    )?;
    Ok(ds
        .iter()
        .flat_map(|&d| cs.iter().map(move |&c| (d, c)))
        .collect())
}

/// `dvma soak`.
pub fn main(a: SoakArgs) -> Result<ExitCode, String> {
    let pairs = pairs(&a)?;
    if pairs.is_empty() {
        return Err("no pairs to run".into());
    }
    let total = match (a.seconds, a.minutes) {
        (Some(s), _) => s,
        (None, Some(m)) => m * 60.0,
        (None, None) => 300.0,
    };
    if !(total.is_finite() && total > 0.0) {
        return Err(format!("run time {total} s: not a positive number"));
    }
    if !(a.window.is_finite() && a.window >= 0.1) {
        return Err(format!("--window {}: at least 0.1 s", a.window));
    }
    if !a.max_kib.is_multiple_of(4) {
        return Err(format!("--max-kib {}: not a multiple of 4", a.max_kib));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let seed = a.seed.unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        mix(t.as_nanos() as u64 ^ u64::from(std::process::id()))
    });
    let load = Load {
        conns: a.conns,
        depth: a.depth,
        max_kib: a.max_kib,
        read_pct: a.read_pct,
        window: Duration::from_secs_f64(a.window),
        seconds: total / pairs.len() as f64,
        serve_args: a.serve_args.clone(),
        server_output: a.server_output,
    };
    let term = io::stderr().is_terminal();
    if !a.json {
        println!(
            "dvma soak: {} pairs x {:.1} s, {} connections x depth {}, seed {seed:#x}",
            pairs.len(),
            load.seconds,
            load.conns,
            load.depth
        );
        print_header();
    }
    let start = Instant::now();
    let mut reports = Vec::new();
    for (i, &(d, c)) in pairs.iter().enumerate() {
        let progress = Progress {
            on: term,
            label: format!("[{}/{}] {}/{}", i + 1, pairs.len(), d.name(), c.name()),
        };
        let r = run_pair(
            &exe,
            d.name(),
            c.name(),
            &load,
            mix(seed.wrapping_add(i as u64)),
            &progress,
        );
        if !a.json {
            print_pair(&r);
        }
        reports.push(r);
    }
    let report = SoakReport {
        seed,
        verified_ios: reports.iter().map(|r| r.verified_ios).sum(),
        mismatches: reports.iter().map(|r| r.mismatches).sum(),
        stalls: reports.iter().map(|r| r.stalls.len()).sum(),
        failed_pairs: reports.iter().filter(|r| !r.ok()).count(),
        ok: reports.iter().all(PairReport::ok),
        wall_seconds: start.elapsed().as_secs_f64(),
        pairs: reports,
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "total: {} pairs, {} failed; {} verified I/Os, {} mismatches, {} stalls; {:.1} s",
            report.pairs.len(),
            report.failed_pairs,
            report.verified_ios,
            report.mismatches,
            report.stalls,
            report.wall_seconds
        );
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
