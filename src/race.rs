//! `dvma race`: the ccd/vnd race of the mail, every completion mode under
//! every protection. See `kern::race` for the mechanism.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use kern::Completion;
use kern::race::{Protection, RaceKit, RaceRow};
use machine::Machine;

/// Arguments of `dvma race`.
#[derive(clap::Args, Debug)]
pub struct RaceArgs {
    /// Also run each row under a real interrupt storm for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    storm: f64,
    /// Injected allocations per row.
    #[arg(long, default_value_t = 200)]
    iterations: u32,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// The machine (only its [machine] section matters here: CPUs, spl,
    /// interrupt stack, memory).
    #[command(flatten)]
    boot: crate::config::BootArgs,
    /// Only these completion modes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    completion: Vec<String>,
    /// Only these protections (comma-separated).
    #[arg(long, value_delimiter = ',')]
    protection: Vec<String>,
    /// Run the statclock's sampling signal on every vCPU every this many
    /// microseconds of wall time while the rows run (a stress of the signal
    /// path: no row's outcome may change). 0: off.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0)]
    statclock_us: u64,
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
        .map(|n| parse(n).ok_or_else(|| format!("unknown {what} `{n}`")))
        .collect()
}

pub fn main(a: RaceArgs) -> Result<ExitCode, String> {
    let completions = pick(
        &a.completion,
        &Completion::ALL,
        Completion::from_name,
        "completion mode (intr, softint, thread, ast)",
    )?;
    let protections = pick(
        &a.protection,
        &Protection::ALL,
        Protection::from_name,
        "protection (none, splimp, pool, safepoint)",
    )?;
    if !(a.storm >= 0.0 && a.storm.is_finite()) {
        return Err(format!("--storm {}: not a number of seconds", a.storm));
    }
    let spec = a.boot.load().map_err(|e| e.to_string())?;
    let m = Machine::boot(spec.machine.machine_config()).map_err(|e| e.to_string())?;
    let kit = Arc::new(RaceKit::attach(0).map_err(|e| e.to_string())?);
    if a.statclock_us > 0 {
        m.statclock()
            .start_on(
                machine::statclock::Clock::Wall,
                Duration::from_micros(a.statclock_us),
            )
            .map_err(|e| format!("statclock: {e}"))?;
    }
    let storm_ns = (a.storm * 1e9) as u64;
    let mut rows: Vec<RaceRow> = Vec::new();
    for &p in &protections {
        for &c in &completions {
            let stop = Arc::new(AtomicBool::new(false));
            let storm = (storm_ns > 0).then(|| {
                let (k, s) = (kit.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !s.load(Relaxed) {
                        if !k.device_tick() {
                            std::thread::sleep(Duration::from_micros(2));
                        }
                    }
                })
            });
            let k2 = kit.clone();
            let iters = a.iterations;
            let row = m.run(0, "race", move |ctx| k2.run_row(ctx, c, p, iters, storm_ns));
            stop.store(true, Relaxed);
            if let Some(h) = storm {
                let _ = h.join();
            }
            let row = row.map_err(|e| e.to_string())?;
            if !a.json {
                print_row(&row, rows.is_empty());
            }
            rows.push(row);
        }
    }
    let k2 = kit.clone();
    m.run(0, "race-detach", move |ctx| {
        if let Ok(k) = Arc::try_unwrap(k2) {
            k.detach(ctx);
        }
    })
    .map_err(|e| e.to_string())?;
    drop(kit);
    if a.statclock_us > 0 {
        m.statclock().stop();
        let n: u64 = (0..m.ncpu())
            .map(|c| machine::statclock::samples(c).iter().sum::<u64>())
            .sum();
        eprintln!("statclock: {n} samples");
    }
    m.shutdown().map_err(|e| e.to_string())?;
    let all_ok = rows.iter().all(RaceRow::ok);
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "completion": r.completion.name(),
                    "protection": r.protection.name(),
                    "injections": r.injections,
                    "corruptions": r.corruptions,
                    "expected_corrupt": r.expected_corrupt,
                    "storm_injections": r.storm_injections,
                    "completions": r.completions,
                    "ok": r.ok(),
                    "first_corruption": r.first_corruption,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        println!();
        if all_ok {
            println!("every row behaved as the mechanism predicts.");
        } else {
            println!("SOME ROWS DID NOT BEHAVE AS PREDICTED (marked MISMATCH).");
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_row(r: &RaceRow, header: bool) {
    if header {
        println!(
            "{:<10} {:<10} {:>10} {:>8} {:>11} {:>11}  {:<9} result",
            "completion",
            "protection",
            "injections",
            "(storm)",
            "corruptions",
            "completions",
            "expected"
        );
    }
    println!(
        "{:<10} {:<10} {:>10} {:>8} {:>11} {:>11}  {:<9} {}",
        r.completion.name(),
        r.protection.name(),
        r.injections,
        r.storm_injections,
        r.corruptions,
        r.completions,
        if r.expected_corrupt {
            "corrupt"
        } else {
            "clean"
        },
        if r.ok() {
            "ok".to_string()
        } else if r.injections == 0 {
            "MISMATCH (no injection)".to_string()
        } else {
            format!(
                "MISMATCH{}",
                r.first_corruption
                    .as_ref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default()
            )
        }
    );
}
