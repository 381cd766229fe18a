//! One pair's run: start its server, connect `--conns` connections and
//! start their threads, watch them (the watchdog: stalls, the grace
//! period, the drain), then stop everything and sum up a [`PairReport`].

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nbd::{Command, CommandFlags, Request};

use super::MISMATCH_NOTES;
use super::block::{BLOCK, mix};
use super::conn::{Conn, Counts, State, connect};
use super::report::{PairReport, Stall};
use super::server::{Server, TempDir};

/// The largest part of the disk one connection uses (so that reads find
/// blocks it wrote).
const MAX_SPAN: u64 = 8 << 20;

/// How a pair is driven.
pub(super) struct Load {
    pub(super) conns: u32,
    pub(super) depth: u32,
    pub(super) max_kib: u32,
    pub(super) read_pct: u32,
    pub(super) window: Duration,
    pub(super) seconds: f64,
    pub(super) serve_args: Vec<String>,
    pub(super) server_output: bool,
}

/// Progress on stderr, when it is a terminal.
pub(super) struct Progress {
    pub(super) on: bool,
    pub(super) label: String,
}

impl Progress {
    fn show(&self, t: f64, total: f64, ios: u64) {
        if self.on {
            eprint!(
                "\r\x1b[K{}  {t:5.1}/{total:.0} s  {ios} I/Os  {:.0} IOPS",
                self.label,
                ios as f64 / t.max(0.001)
            );
            let _ = io::stderr().flush();
        }
    }

    fn clear(&self) {
        if self.on {
            eprint!("\r\x1b[K");
        }
    }
}

/// The watchdog: runs the pair's time, then the drain; fills `rep.stalls`
/// (and `rep.failures` for a drain that does not end). After the first
/// stall it keeps the load on for a grace period of three windows to see
/// whether the stalled connections come back, then ends the pair.
///
/// Time counts only while the watchdog itself runs on time: it naps 100 ms,
/// and a nap that overslept by more than a quarter of a window (the host
/// did not run the soak: an overloaded machine) is not counted against the
/// server (`rep.unobserved_s`), since the soak's own receivers were not
/// running either. A connection stalls when a whole window of counted time
/// passes without a completion.
fn watch(conns: &[Arc<Conn>], t0: Instant, load: &Load, progress: &Progress, rep: &mut PairReport) {
    let window = load.window;
    let total = Duration::from_secs_f64(load.seconds);
    let tick = Duration::from_millis(100);
    // Per connection: completions seen, counted time since the last one,
    // the stall being watched for recovery (its index in rep.stalls).
    let mut seen: Vec<u64> = vec![0; conns.len()];
    let mut quiet: Vec<Duration> = vec![Duration::ZERO; conns.len()];
    let mut stalled: Vec<Option<usize>> = vec![None; conns.len()];
    let mut grace: Option<Duration> = None;
    let mut drain = Duration::ZERO;
    let mut last_tick = Instant::now();
    let mut draining = false;
    let secs = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let last_progress = |c: &Conn| {
        let last = c.last_done.load(Relaxed);
        (last > 0).then(|| (last - 1) as f64 / 1e9)
    };
    loop {
        std::thread::sleep(tick);
        let now = Instant::now();
        let step = now.saturating_duration_since(last_tick);
        last_tick = now;
        let late = step.saturating_sub(tick);
        rep.watchdog_late_max_s = rep.watchdog_late_max_s.max(late.as_secs_f64());
        let counted = if late > window / 4 {
            rep.unobserved_s += step.as_secs_f64();
            Duration::ZERO
        } else {
            step
        };
        let ios: u64 = conns.iter().map(|c| c.completed.load(Relaxed)).sum();
        progress.show(secs(now), load.seconds, ios);
        if conns.iter().any(|c| c.failed()) {
            return;
        }
        if draining && conns.iter().all(|c| c.done()) {
            return;
        }
        for (i, c) in conns.iter().enumerate() {
            let done = c.completed.load(Relaxed);
            if done != seen[i] {
                seen[i] = done;
                quiet[i] = Duration::ZERO;
                if let Some(k) = stalled[i] {
                    let st = &mut rep.stalls[k];
                    if st.recovered_after_s.is_none() {
                        let back = last_progress(c).unwrap_or(0.0);
                        st.recovered_after_s = Some(back - st.last_progress_s.unwrap_or(0.0));
                    }
                }
                continue;
            }
            if c.done() {
                continue;
            }
            quiet[i] += counted;
            if quiet[i] >= window && stalled[i].is_none() {
                stalled[i] = Some(rep.stalls.len());
                let start = (secs(now) - quiet[i].as_secs_f64()).max(0.0);
                rep.stalls.push(Stall {
                    conn: i,
                    window: (start / window.as_secs_f64()) as u64,
                    start_s: start,
                    end_s: secs(now),
                    last_progress_s: last_progress(c),
                    in_flight: c.lock().inflight.len(),
                    phase: if draining { "draining" } else { "running" },
                    recovered_after_s: None,
                });
            }
        }
        if !rep.stalls.is_empty() {
            let g = grace.get_or_insert(Duration::ZERO);
            *g += counted;
            let all_back = rep.stalls.iter().all(|s| s.recovered_after_s.is_some());
            if *g >= 3 * window || all_back {
                return;
            }
        } else if draining {
            drain += counted;
            if drain >= 3 * window {
                rep.failures
                    .push("requests still in flight three windows after the end".into());
                return;
            }
        }
        if !draining && now - t0 >= total {
            draining = true;
            for c in conns {
                c.lock().stop = true;
                c.cv.notify_all();
            }
        }
    }
}

/// Runs one pair: a server, its load, the watchdog, the shutdown.
pub(super) fn run_pair(
    exe: &Path,
    dvma: &str,
    completion: &str,
    load: &Load,
    seed: u64,
    progress: &Progress,
) -> PairReport {
    let mut rep = PairReport {
        dvma: dvma.to_string(),
        completion: completion.to_string(),
        conns: load.conns,
        depth: load.depth,
        ..PairReport::default()
    };
    let tmp = match TempDir::new(&format!("{dvma}-{completion}")) {
        Ok(t) => t,
        Err(e) => {
            rep.failures.push(format!("temporary directory: {e}"));
            return rep;
        }
    };
    let server = match Server::start(exe, &tmp.0, dvma, completion, &load.serve_args) {
        Ok(s) => s,
        Err(e) => {
            rep.failures.push(e);
            return rep;
        }
    };
    let abort = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::new();
    let mut socks = Vec::new();
    let t0 = Instant::now();
    for i in 0..load.conns as usize {
        match connect(server.addr, &server.export) {
            Ok((s, size, max)) => {
                let part = size / u64::from(load.conns) / BLOCK as u64 * BLOCK as u64;
                let span = part.min(MAX_SPAN);
                let max_blocks = (load.max_kib / 4)
                    .min(max / BLOCK as u32)
                    .min((span / BLOCK as u64) as u32)
                    .max(1);
                if span < BLOCK as u64 {
                    rep.failures.push(format!(
                        "disk of {size} bytes too small for {} connections",
                        load.conns
                    ));
                    break;
                }
                let nblocks = (span / BLOCK as u64) as usize;
                conns.push(Arc::new(Conn {
                    idx: i,
                    base: part * i as u64,
                    tag: (seed & !0xffff) | i as u64,
                    depth: load.depth as usize,
                    max_blocks,
                    read_pct: u64::from(load.read_pct),
                    st: Mutex::new(State {
                        gens: vec![0; nblocks],
                        busy: vec![false; nblocks],
                        inflight: HashMap::new(),
                        next_cookie: 1,
                        next_gen: 0,
                        sender_waiting: false,
                        stop: false,
                        counts: Counts::default(),
                    }),
                    cv: Condvar::new(),
                    completed: AtomicU64::new(0),
                    last_done: AtomicU64::new(0),
                    t0,
                    abort: abort.clone(),
                    error: Mutex::new(None),
                }));
                socks.push(s);
            }
            Err(e) => {
                rep.failures.push(format!("conn {i}: connect: {e}"));
                break;
            }
        }
    }
    let mut threads = Vec::new();
    let mut disc = Vec::new();
    if rep.failures.is_empty() {
        for (c, s) in conns.iter().zip(socks) {
            let (Ok(w), Ok(d)) = (s.try_clone(), s.try_clone()) else {
                rep.failures.push("socket clone failed".into());
                break;
            };
            disc.push(d);
            let (c1, c2) = (c.clone(), c.clone());
            let sseed = mix(seed ^ c.idx as u64);
            threads.push(std::thread::spawn(move || c1.sender(w, sseed)));
            threads.push(std::thread::spawn(move || c2.receiver(s)));
        }
    }
    let t0 = conns.first().map_or(t0, |c| c.t0);
    if rep.failures.is_empty() {
        watch(&conns, t0, load, progress, &mut rep);
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    progress.clear();
    let clean_end =
        rep.failures.is_empty() && rep.stalls.is_empty() && !conns.iter().any(|c| c.failed());
    if !clean_end {
        abort.store(true, Relaxed);
    }
    for c in &conns {
        c.lock().stop = true;
        c.cv.notify_all();
    }
    for t in threads {
        let _ = t.join();
    }
    for c in &conns {
        if let Some(e) = c.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            rep.failures.push(e);
        }
        let st = c.lock();
        let k = &st.counts;
        rep.verified_ios += k.verified;
        rep.reads += k.reads;
        rep.writes += k.writes;
        rep.flushes += k.flushes;
        rep.blocks_checked += k.blocks_checked;
        rep.bytes += k.bytes;
        rep.mismatches += k.mismatches;
        rep.errors += k.errors;
        for n in &k.notes {
            if rep.mismatch_notes.len() < MISMATCH_NOTES {
                rep.mismatch_notes.push(n.clone());
            }
        }
    }
    rep.iops = rep.verified_ios as f64 / rep.seconds.max(0.001);
    // A polite goodbye on healthy connections; then close them.
    for mut s in disc {
        if clean_end {
            let disc = Request {
                flags: CommandFlags(0),
                command: Command::Disc,
                cookie: 0,
                offset: 0,
                length: 0,
            };
            let _ = s.write_all(&disc.encode());
        }
        let _ = s.shutdown(Shutdown::Both);
    }
    let tail = server.tail.clone();
    let (clean, how) = server.stop();
    rep.clean_exit = clean;
    rep.exit = how;
    if !rep.ok() || load.server_output {
        rep.server_tail = tail.lines();
    }
    rep
}
