//! One fio run against a running server, with the server-side readings
//! that go with it.
//!
//! The measured window is fio's own: it ends at fio's `timestamp_ms` (fio
//! writes its output right after its last I/O) and lasts fio's runtime.
//! fio starts its I/O 0.1–0.4 s after it is spawned (its own start-up), so
//! the window is only known afterwards. Hence:
//!
//! * the server's CPU time (user and system, of every thread, live or
//!   exited, from `/proc/PID/stat`) and its host context switches (of every
//!   thread, from `/proc/PID/task/*/status`; a thread that exits keeps its
//!   last count) are read every 10 ms while fio runs and linearly
//!   interpolated at the window's two ends;
//! * `dvma serve`'s counters (read by SIGUSR1, which costs the server a
//!   file write) are read before fio starts, then every 20 ms until fio's
//!   first request reaches the server, once more a ramp later (the start of
//!   fio's window, to within 20 ms), and after fio exits. Events per I/O
//!   divide the events by the NBD requests the server counted over that
//!   same interval, so the two always cover the same I/Os.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use report::{Counters, FioJob, ServerSample};

use super::fio;
use super::plan::{Timing, Workload};
use super::server::{DvmaStats, Server, clk_tck, cpu_times, host_switches};

/// How often the server's CPU time is read while fio runs.
const CPU_EVERY: Duration = Duration::from_millis(10);
/// How often `dvma serve` is asked for its counters while waiting for fio's
/// first request.
const STATS_EVERY: Duration = Duration::from_millis(20);
/// Longest wait for fio's first request before reading the counters anyway.
const DETECT_LIMIT: Duration = Duration::from_secs(5);

/// Host-level figures of the server over fio's window, beyond what a
/// [`report::Run`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Host {
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub sys_s: f64,
    /// Host context switches (voluntary + involuntary, every thread).
    pub switches: Option<f64>,
}

/// A run's figures.
pub struct Measured {
    /// Host-level figures.
    pub host: Host,
    /// fio's job (all entries merged).
    pub job: FioJob,
    /// The server side, over fio's window.
    pub sample: ServerSample,
    /// Every reading behind `sample`, for `raw/*.server.json`.
    pub audit: serde_json::Value,
    /// Something to tell about the readings (they are still used).
    pub warning: Option<String>,
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The value at `x` of the piecewise-linear function through `points`
/// (ascending in time), held constant outside them.
pub fn interpolate(points: &[(f64, u64)], x: f64) -> Option<f64> {
    let first = points.first()?;
    let last = points.last()?;
    if x <= first.0 {
        return Some(first.1 as f64);
    }
    if x >= last.0 {
        return Some(last.1 as f64);
    }
    let i = points.partition_point(|p| p.0 <= x);
    let (a, b) = (points[i - 1], points[i]);
    if b.0 <= a.0 {
        return Some(b.1 as f64);
    }
    let f = (x - a.0) / (b.0 - a.0);
    Some(a.1 as f64 + f * (b.1 as f64 - a.1 as f64))
}

/// Events between two readings of `dvma serve`, scaled from "per request
/// the server counted" to "per I/O fio counted" (`ios`): the report divides
/// by fio's I/Os, and the server's requests are the same I/Os over the same
/// interval as the events.
pub fn scaled_counters(before: &DvmaStats, after: &DvmaStats, ios: u64) -> Counters {
    let d = after.counters().since(&before.counters());
    let req = after.nbd_requests.saturating_sub(before.nbd_requests);
    if req == 0 {
        return d;
    }
    let k = ios as f64 / req as f64;
    let s = |v: u64| (v as f64 * k).round() as u64;
    Counters {
        interrupts: s(d.interrupts),
        signals: s(d.signals),
        softints: s(d.softints),
        ctx_switches: s(d.ctx_switches),
        asts: s(d.asts),
        iommu_faults: s(d.iommu_faults),
    }
}

/// One reading: (Unix ms, user ticks, system ticks, host context switches).
type Reading = (f64, u64, u64, Option<u64>);

enum Detect {
    /// Not `dvma serve`, or its counters could not be read.
    Off,
    /// Waiting for the first request.
    Waiting { base: u64, next: Instant },
    /// Seen; read the counters at `at`.
    Ramp { at: Instant },
    /// Read.
    Done,
}

/// Runs fio for `w` against `srv` and reads the server around it.
pub fn run(srv: &mut Server, w: &Workload, t: &Timing, out: &Path) -> Result<Measured, String> {
    let pid = srv.pid();
    let mut cpu: Vec<Reading> = Vec::new();
    let mut seen = BTreeMap::new();
    let mut read_cpu = |cpu: &mut Vec<Reading>| {
        if let Some((u, s)) = cpu_times(pid) {
            let sw = host_switches(pid, &mut seen);
            cpu.push((now_ms(), u, s, sw));
        }
    };
    read_cpu(&mut cpu);
    let base = if srv.has_stats() {
        srv.stats_now()
    } else {
        None
    };
    let mut warning = None;
    if srv.has_stats() && base.is_none() {
        warning = Some(format!(
            "{} did not answer SIGUSR1 with its statistics within 3 s",
            srv.label
        ));
    }
    let mut before: Option<(f64, DvmaStats)> = None;
    let mut first_request_ms: Option<f64> = None;
    let mut detect = match base {
        None => Detect::Off,
        Some(b) if t.ramp_s == 0.0 => {
            before = Some((now_ms(), b));
            Detect::Done
        }
        Some(b) => Detect::Waiting {
            base: b.nbd_requests,
            next: Instant::now(),
        },
    };
    let mut fio = fio::spawn(&srv.uri, w, t, out)?;
    let spawned = Instant::now();
    let spawned_ms = now_ms();
    while !fio.exited()? {
        read_cpu(&mut cpu);
        let now = Instant::now();
        match detect {
            Detect::Waiting { base, next } if now >= next => match srv.stats_now() {
                Some(s) if s.nbd_requests > base => {
                    first_request_ms = Some(now_ms());
                    detect = Detect::Ramp {
                        at: now + Duration::from_secs_f64(t.ramp_s),
                    };
                }
                Some(_) if now.duration_since(spawned) > DETECT_LIMIT => {
                    warning = Some(format!(
                        "{}: no NBD request counted within {} s of starting fio: counters read from then on",
                        srv.label,
                        DETECT_LIMIT.as_secs()
                    ));
                    before = srv.stats_now().map(|s| (now_ms(), s));
                    detect = Detect::Done;
                }
                Some(_) => {
                    detect = Detect::Waiting {
                        base,
                        next: now + STATS_EVERY,
                    }
                }
                None => detect = Detect::Off,
            },
            Detect::Ramp { at } if now >= at => {
                before = srv.stats_now().map(|s| (now_ms(), s));
                detect = Detect::Done;
            }
            _ => {}
        }
        std::thread::sleep(CPU_EVERY);
    }
    read_cpu(&mut cpu);
    let after = if before.is_some() {
        srv.stats_now().map(|s| (now_ms(), s))
    } else {
        None
    };
    let (job, ts) = fio.finish()?;

    let end = ts.unwrap_or_else(|| cpu.last().map_or(0.0, |c| c.0));
    let start = end - job.runtime_ms() as f64;
    let series = |f: fn(&Reading) -> Option<u64>| -> Vec<(f64, u64)> {
        cpu.iter().filter_map(|c| f(c).map(|v| (c.0, v))).collect()
    };
    let window = |points: &[(f64, u64)]| -> Option<f64> {
        Some((interpolate(points, end)? - interpolate(points, start)?).max(0.0))
    };
    let (Some(user), Some(sys)) = (
        window(&series(|c| Some(c.1))),
        window(&series(|c| Some(c.2))),
    ) else {
        return Err(format!("could not read /proc/{pid}/stat"));
    };
    let switches = if cpu.iter().all(|c| c.3.is_some()) {
        window(&series(|c| c.3))
    } else {
        None
    };
    let tck = clk_tck() as f64;
    let counters = match (&before, &after) {
        (Some((_, b)), Some((_, a))) => Some(scaled_counters(b, a, job.total_ios())),
        _ => None,
    };
    let sample = ServerSample {
        cpu_s: (user + sys) / tck,
        counters,
        dvma_pages_held: after.map(|(_, s)| s.dvma_pages_held),
    };
    let stats_json = |s: &Option<(f64, DvmaStats)>| {
        s.map(|(t, st)| {
            serde_json::json!({
                "at_ms": t, "seq": st.seq, "cpus": st.cpus, "interrupts": st.interrupts, "signals": st.signals,
                "softints": st.softints, "ctx_switches": st.ctx_switches, "asts": st.asts,
                "iommu_faults": st.iommu_faults, "dvma_pages_held": st.dvma_pages_held,
                "dvma_pages_peak": st.dvma_pages_peak, "nbd_requests": st.nbd_requests,
                "nbd_bytes_read": st.nbd_bytes_read, "nbd_bytes_written": st.nbd_bytes_written,
            })
        })
    };
    let audit = serde_json::json!({
        "server": srv.label,
        "pid": pid,
        "clk_tck": tck,
        "fio_spawned_ms": spawned_ms,
        "fio_timestamp_ms": ts,
        "fio_runtime_ms": job.runtime_ms(),
        "fio_ios": job.total_ios(),
        "window_ms": [start, end],
        "cpu_s": sample.cpu_s,
        "user_s": user / tck,
        "sys_s": sys / tck,
        "host_switches": switches,
        "cpu_readings": cpu.len(),
        "first_request_ms": first_request_ms,
        "stats_before": stats_json(&before),
        "stats_after": stats_json(&after),
    });
    Ok(Measured {
        host: Host {
            user_s: user / tck,
            sys_s: sys / tck,
            switches,
        },
        job,
        sample,
        audit,
        warning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation() {
        let p = [(0.0, 10), (10.0, 20), (20.0, 20), (30.0, 50)];
        assert_eq!(interpolate(&p, -5.0), Some(10.0));
        assert_eq!(interpolate(&p, 5.0), Some(15.0));
        assert_eq!(interpolate(&p, 10.0), Some(20.0));
        assert_eq!(interpolate(&p, 25.0), Some(35.0));
        assert_eq!(interpolate(&p, 99.0), Some(50.0));
        assert_eq!(interpolate(&[], 1.0), None);
    }

    #[test]
    fn counters_per_request() {
        let before = DvmaStats {
            interrupts: 100,
            softints: 50,
            nbd_requests: 1000,
            ..DvmaStats::default()
        };
        let after = DvmaStats {
            interrupts: 1100,
            softints: 550,
            asts: 10,
            nbd_requests: 2000,
            ..DvmaStats::default()
        };
        // 1000 requests between the readings, fio counted 1200 I/Os in its
        // window: one interrupt per request is 1200 "per fio I/O".
        let c = scaled_counters(&before, &after, 1200);
        assert_eq!((c.interrupts, c.softints, c.asts), (1200, 600, 12));
        assert_eq!(c.per_io(1200).interrupts, 1.0);
        // No request counted: raw differences.
        let c = scaled_counters(&before, &before, 1200);
        assert_eq!(c.interrupts, 0);
    }
}
