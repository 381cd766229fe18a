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

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kern::Completion;
use kern::bus_dma::DvmaMode;
use nbd::handshake::InfoRequest;
use nbd::wire::{
    IHAVEOPT, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC, NBDMAGIC,
};
use nbd::{Command, CommandFlags, OptionHeader, Request};
use serde::Serialize;

/// The block the model tracks: every request is a whole number of them.
pub const BLOCK: usize = 4096;
/// How long the server has to exit after SIGINT.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to print `dvma: ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest part of the disk one connection uses (so that reads find
/// blocks it wrote).
const MAX_SPAN: u64 = 8 << 20;
/// Mismatches described in detail per pair (the rest are only counted).
const MISMATCH_NOTES: usize = 10;
/// The first word of every block the soak writes.
const MAGIC: u64 = u64::from_le_bytes(*b"dvmasoak");
/// The header: magic, offset, generation, tag, checksum.
const HEADER: usize = 40;

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

/// A small, fast, reproducible generator (splitmix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// The checksum of a block: every word but the checksum's own (word 4).
fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in (0..BLOCK / 8).filter(|&i| i != 4) {
        h = (h ^ word(b, i))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    h
}

/// Fills `b` (one block) with the contents of generation `generation` of
/// the block at byte `offset`, written by the connection tagged `tag`.
pub fn fill_block(b: &mut [u8], offset: u64, generation: u64, tag: u64) {
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..24].copy_from_slice(&generation.to_le_bytes());
    b[24..32].copy_from_slice(&tag.to_le_bytes());
    let mut r = Rng(mix(offset
        ^ generation.rotate_left(32)
        ^ tag.rotate_left(17)));
    for c in b[HEADER..BLOCK].chunks_mut(8) {
        c.copy_from_slice(&r.next_u64().to_le_bytes());
    }
    let sum = checksum(b);
    b[32..40].copy_from_slice(&sum.to_le_bytes());
}

/// Checks a block read at byte `offset` against the model: generation
/// `generation` (0: never written, all zeros) by connection `tag`. `None`
/// if it matches, else what was found.
pub fn check_block(b: &[u8], offset: u64, generation: u64, tag: u64) -> Option<String> {
    if generation == 0 {
        if b.iter().all(|&x| x == 0) {
            return None;
        }
        return Some(format!(
            "offset {offset:#x}: never written, want zeros; found {}",
            describe(b)
        ));
    }
    let ok = word(b, 0) == MAGIC
        && word(b, 1) == offset
        && word(b, 2) == generation
        && word(b, 3) == tag
        && word(b, 4) == checksum(b);
    if ok {
        return None;
    }
    Some(format!(
        "offset {offset:#x}: want generation {generation} (tag {tag:#x}); found {}",
        describe(b)
    ))
}

fn describe(b: &[u8]) -> String {
    if b.iter().all(|&x| x == 0) {
        return "zeros".to_string();
    }
    if word(b, 0) != MAGIC {
        return format!("no header (first bytes {:02x?})", &b[..16]);
    }
    format!(
        "header of offset {:#x} generation {} tag {:#x}, checksum {}",
        word(b, 1),
        word(b, 2),
        word(b, 3),
        if word(b, 4) == checksum(b) {
            "good"
        } else {
            "BAD"
        }
    )
}

/// Never-known generation: a write that failed leaves its blocks unknown.
const UNKNOWN: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

#[derive(Debug)]
struct Op {
    kind: Kind,
    block: u32,
    blocks: u32,
    /// A write's generation.
    generation: u64,
    /// A read's expected generation per block.
    expect: Vec<u64>,
}

#[derive(Debug, Default)]
struct Counts {
    verified: u64,
    reads: u64,
    writes: u64,
    flushes: u64,
    blocks_checked: u64,
    bytes: u64,
    mismatches: u64,
    notes: Vec<String>,
    errors: u64,
}

#[derive(Debug)]
struct State {
    gens: Vec<u64>,
    busy: Vec<bool>,
    inflight: HashMap<u64, Op>,
    next_cookie: u64,
    next_gen: u64,
    sender_waiting: bool,
    /// No new requests (the pair is ending).
    stop: bool,
    counts: Counts,
}

/// One connection, shared by its sender and receiver threads and the
/// watchdog.
struct Conn {
    idx: usize,
    /// First byte of the connection's part of the disk.
    base: u64,
    tag: u64,
    depth: usize,
    max_blocks: u32,
    read_pct: u64,
    st: Mutex<State>,
    cv: Condvar,
    /// Requests completed (the watchdog's progress count).
    completed: AtomicU64,
    /// Nanoseconds after `t0` of the last completion, plus 1 (0: none).
    last_done: AtomicU64,
    t0: Instant,
    /// Give up at once (a stall, an error, the end of a failed pair).
    abort: Arc<AtomicBool>,
    /// The first error that ended this connection.
    error: Mutex<Option<String>>,
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, e: String) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        drop(g);
        drop(self.lock());
        self.cv.notify_all();
    }

    fn failed(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn done(&self) -> bool {
        let st = self.lock();
        st.stop && st.inflight.is_empty()
    }

    /// Picks the next request and marks its blocks busy; `None` when the
    /// connection is to stop.
    fn next(&self, rng: &mut Rng) -> Option<(u64, Kind, u32, u32, u64)> {
        let mut st = self.lock();
        loop {
            if st.stop || self.abort.load(Relaxed) || self.failed() {
                return None;
            }
            if st.inflight.len() < self.depth
                && let Some(x) = self.pick(&mut st, rng)
            {
                return Some(x);
            }
            st.sender_waiting = true;
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .map_or_else(|p| p.into_inner().0, |r| r.0);
            st.sender_waiting = false;
        }
    }

    fn pick(&self, st: &mut State, rng: &mut Rng) -> Option<(u64, Kind, u32, u32, u64)> {
        let nblocks = st.gens.len() as u64;
        let kind = if rng.below(256) == 0 {
            Kind::Flush
        } else if rng.below(100) < self.read_pct {
            Kind::Read
        } else {
            Kind::Write
        };
        let cookie = st.next_cookie;
        if kind == Kind::Flush {
            st.next_cookie += 1;
            st.inflight.insert(
                cookie,
                Op {
                    kind,
                    block: 0,
                    blocks: 0,
                    generation: 0,
                    expect: Vec::new(),
                },
            );
            return Some((cookie, kind, 0, 0, 0));
        }
        let want = if self.max_blocks > 1 && rng.below(4) == 0 {
            2 + rng.below(u64::from(self.max_blocks) - 1) as u32
        } else {
            1
        };
        for attempt in 0..16 {
            let n = if attempt < 8 { want } else { 1 }.min(nblocks as u32);
            let b = rng.below(nblocks - u64::from(n) + 1) as usize;
            let range = b..b + n as usize;
            if st.busy[range.clone()].iter().any(|&x| x) {
                continue;
            }
            st.busy[range.clone()].iter_mut().for_each(|x| *x = true);
            let (generation, expect) = if kind == Kind::Write {
                st.next_gen += 1;
                (st.next_gen, Vec::new())
            } else {
                (0, st.gens[range].to_vec())
            };
            st.next_cookie += 1;
            st.inflight.insert(
                cookie,
                Op {
                    kind,
                    block: b as u32,
                    blocks: n,
                    generation,
                    expect,
                },
            );
            return Some((cookie, kind, b as u32, n, generation));
        }
        None
    }

    fn offset(&self, block: u32) -> u64 {
        self.base + u64::from(block) * BLOCK as u64
    }

    /// Sends requests until told to stop.
    fn sender(self: Arc<Conn>, mut sock: TcpStream, seed: u64) {
        let mut rng = Rng(seed);
        let mut buf = Vec::with_capacity(28 + self.max_blocks as usize * BLOCK);
        while let Some((cookie, kind, block, n, generation)) = self.next(&mut rng) {
            let (command, length) = match kind {
                Kind::Read => (Command::Read, n * BLOCK as u32),
                Kind::Write => (Command::Write, n * BLOCK as u32),
                Kind::Flush => (Command::Flush, 0),
            };
            let offset = if kind == Kind::Flush {
                0
            } else {
                self.offset(block)
            };
            buf.clear();
            buf.extend_from_slice(
                &Request {
                    flags: CommandFlags(0),
                    command,
                    cookie,
                    offset,
                    length,
                }
                .encode(),
            );
            if kind == Kind::Write {
                let start = buf.len();
                buf.resize(start + length as usize, 0);
                for (i, b) in buf[start..].chunks_mut(BLOCK).enumerate() {
                    fill_block(b, offset + (i * BLOCK) as u64, generation, self.tag);
                }
            }
            if let Err(e) = write_full(&mut sock, &buf, &self.abort) {
                self.fail(format!("conn {}: send: {e}", self.idx));
                return;
            }
        }
    }

    /// Reads replies and checks them until the connection is done.
    fn receiver(self: Arc<Conn>, mut sock: TcpStream) {
        let mut data = vec![0u8; self.max_blocks as usize * BLOCK];
        loop {
            let mut h = [0u8; 16];
            match read_full(&mut sock, &mut h, &self.abort, || self.done()) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.fail(format!("conn {}: receive: {e}", self.idx));
                    return;
                }
            }
            let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
            let error = u32::from_be_bytes(h[4..8].try_into().expect("4"));
            let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8"));
            if magic != NBD_SIMPLE_REPLY_MAGIC {
                self.fail(format!("conn {}: bad reply magic {magic:#010x}", self.idx));
                return;
            }
            let Some(op) = self.lock().inflight.remove(&cookie) else {
                self.fail(format!(
                    "conn {}: reply for unknown cookie {cookie}",
                    self.idx
                ));
                return;
            };
            let len = op.blocks as usize * BLOCK;
            let mut bad = Vec::new();
            if op.kind == Kind::Read && error == 0 {
                match read_full(&mut sock, &mut data[..len], &self.abort, || false) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        self.fail(format!("conn {}: receive read data: {e}", self.idx));
                        return;
                    }
                }
                for (i, b) in data[..len].chunks(BLOCK).enumerate() {
                    let g = op.expect[i];
                    if g == UNKNOWN {
                        continue;
                    }
                    let off = self.offset(op.block + i as u32);
                    if let Some(m) = check_block(b, off, g, self.tag) {
                        bad.push(m);
                    }
                }
            }
            let mut st = self.lock();
            let range = op.block as usize..(op.block + op.blocks) as usize;
            let c = &mut st.counts;
            if error != 0 {
                c.errors += 1;
                if c.notes.len() < MISMATCH_NOTES {
                    c.notes.push(format!(
                        "conn {}: {:?} of {} blocks at {:#x}: NBD error {error}",
                        self.idx,
                        op.kind,
                        op.blocks,
                        self.offset(op.block)
                    ));
                }
            } else {
                match op.kind {
                    Kind::Read => {
                        c.reads += 1;
                        c.bytes += len as u64;
                        c.blocks_checked += op.expect.iter().filter(|&&g| g != 0).count() as u64;
                    }
                    Kind::Write => {
                        c.writes += 1;
                        c.bytes += len as u64;
                    }
                    Kind::Flush => c.flushes += 1,
                }
                if bad.is_empty() {
                    c.verified += 1;
                }
                c.mismatches += bad.len() as u64;
                for m in bad {
                    if c.notes.len() < MISMATCH_NOTES {
                        c.notes.push(format!("conn {}: {m}", self.idx));
                    }
                }
            }
            if op.kind == Kind::Write {
                let g = if error == 0 { op.generation } else { UNKNOWN };
                st.gens[range.clone()].iter_mut().for_each(|x| *x = g);
            }
            st.busy[range].iter_mut().for_each(|x| *x = false);
            let wake = st.sender_waiting;
            drop(st);
            self.completed.fetch_add(1, Relaxed);
            self.last_done
                .store(self.t0.elapsed().as_nanos() as u64 + 1, Relaxed);
            if wake {
                self.cv.notify_all();
            }
        }
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Reads all of `buf` across socket timeouts. `Ok(false)`: gave up before
/// the first byte because `abort` was set or `finished()` said so (or
/// aborted in the middle).
fn read_full(
    s: &mut TcpStream,
    buf: &mut [u8],
    abort: &AtomicBool,
    finished: impl Fn() -> bool,
) -> io::Result<bool> {
    let mut pos = 0;
    while pos < buf.len() {
        match s.read(&mut buf[pos..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => pos += n,
            Err(e) if timed_out(&e) => {
                if abort.load(Relaxed) || (pos == 0 && finished()) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes all of `buf` across socket timeouts (unless `abort` is set).
fn write_full(s: &mut TcpStream, buf: &[u8], abort: &AtomicBool) -> io::Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        match s.write(&buf[pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => pos += n,
            Err(e) if timed_out(&e) => {
                if abort.load(Relaxed) {
                    return Err(io::Error::other("aborted"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Export size and maximum payload after a fixed-newstyle `NBD_OPT_GO`.
fn handshake(s: &mut TcpStream, export: &str) -> io::Result<(u64, u32)> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if u64::from_be_bytes(g[0..8].try_into().expect("8")) != NBDMAGIC
        || u64::from_be_bytes(g[8..16].try_into().expect("8")) != IHAVEOPT
    {
        return Err(invalid(format!("bad greeting {g:02x?}")));
    }
    s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())?;
    let data = InfoRequest {
        name: export.as_bytes(),
        requests: vec![NBD_INFO_BLOCK_SIZE],
    }
    .encode();
    let mut opt = OptionHeader {
        option: NBD_OPT_GO,
        length: data.len() as u32,
    }
    .encode()
    .to_vec();
    opt.extend_from_slice(&data);
    s.write_all(&opt)?;
    let (mut size, mut max) = (None, nbd::wire::DEFAULT_MAX_PAYLOAD);
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        if u64::from_be_bytes(h[0..8].try_into().expect("8")) != NBD_REP_MAGIC {
            return Err(invalid("bad option reply magic".into()));
        }
        let reply = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        if len > 1 << 16 {
            return Err(invalid(format!("option reply of {len} bytes")));
        }
        let mut d = vec![0; len as usize];
        s.read_exact(&mut d)?;
        if reply & NBD_REP_FLAG_ERROR != 0 {
            return Err(invalid(format!(
                "NBD_OPT_GO {export:?} refused ({reply:#x}: {})",
                String::from_utf8_lossy(&d)
            )));
        }
        match reply {
            NBD_REP_ACK => break,
            NBD_REP_INFO if d.len() >= 2 => {
                let t = u16::from_be_bytes([d[0], d[1]]);
                if t == NBD_INFO_EXPORT && d.len() == 12 {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().expect("8")));
                } else if t == NBD_INFO_BLOCK_SIZE && d.len() == 14 {
                    max = u32::from_be_bytes(d[10..14].try_into().expect("4"));
                }
            }
            _ => {}
        }
    }
    let size = size.ok_or_else(|| invalid("no NBD_INFO_EXPORT".into()))?;
    Ok((size, max))
}

/// A directory under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> io::Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "dvma-soak-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The last lines a server printed (stdout and stderr, interleaved).
#[derive(Default)]
struct Tail(Mutex<VecDeque<String>>);

impl Tail {
    fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= 80 {
            q.pop_front();
        }
        q.push_back(line);
    }

    fn lines(&self) -> Vec<String> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }
}

/// A running `dvma serve`; dropping it kills it.
struct Server {
    child: Child,
    addr: SocketAddr,
    export: String,
    tail: Arc<Tail>,
    pumps: Vec<JoinHandle<()>>,
}

/// Sends a signal with `kill(1)` (this crate has no unsafe code, and std
/// only sends SIGKILL).
fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let st = Proc::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("kill -s {sig} {pid}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("kill -s {sig} {pid}: {st}"))
    }
}

impl Server {
    fn start(
        exe: &Path,
        dir: &Path,
        dvma: &str,
        completion: &str,
        extra: &[String],
    ) -> Result<Server, String> {
        let mut cmd = Proc::new(exe);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(["--dvma", dvma, "--completion", completion])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawning {} serve: {e}", exe.display()))?;
        let tail = Arc::new(Tail::default());
        let (tx, rx) = mpsc::channel::<String>();
        let mut pumps = Vec::new();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        for (r, tx) in [
            (Box::new(out) as Box<dyn Read + Send>, Some(tx)),
            (Box::new(err), None),
        ] {
            let tail = tail.clone();
            pumps.push(std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    if let Some(tx) = &tx {
                        let _ = tx.send(line.clone());
                    }
                    tail.push(line);
                }
            }));
        }
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            export: String::new(),
            tail,
            pumps,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let l = line.trim();
                    if let Some(rest) = l.strip_prefix("serving nbd://") {
                        if server.export.is_empty() {
                            let (hp, name) = rest.split_once('/').unwrap_or((rest, ""));
                            server.addr = hp.parse().map_err(|e| format!("{l:?}: {e}"))?;
                            server.export =
                                name.split_whitespace().next().unwrap_or("").to_string();
                        }
                    } else if l.starts_with("dvma: ready") {
                        break;
                    }
                }
                Err(_) => {
                    let st = server.child.try_wait().ok().flatten();
                    return Err(format!(
                        "dvma serve not ready ({}):\n  {}",
                        st.map_or("no `dvma: ready` in 30 s".to_string(), |s| format!(
                            "exited: {s}"
                        )),
                        server.tail.lines().join("\n  ")
                    ));
                }
            }
        }
        if server.export.is_empty() {
            return Err("dvma serve announced no `serving nbd://` export".into());
        }
        Ok(server)
    }

    /// SIGINT, then up to [`EXIT_TIMEOUT`] for exit 0; `(clean, how)`.
    fn stop(mut self) -> (bool, String) {
        let r = match self.child.try_wait() {
            Ok(Some(st)) => (false, format!("had already exited: {st}")),
            _ => match signal(self.child.id(), "INT") {
                Err(e) => (false, e),
                Ok(()) => {
                    let deadline = Instant::now() + EXIT_TIMEOUT;
                    loop {
                        match self.child.try_wait() {
                            Ok(Some(st)) => break (st.success(), format!("after SIGINT: {st}")),
                            Ok(None) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            _ => {
                                let _ = self.child.kill();
                                let _ = self.child.wait();
                                break (
                                    false,
                                    format!(
                                        "no exit within {} s of SIGINT: killed (SIGKILL)",
                                        EXIT_TIMEOUT.as_secs()
                                    ),
                                );
                            }
                        }
                    }
                }
            },
        };
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
        r
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a pair is driven.
struct Load {
    conns: u32,
    depth: u32,
    max_kib: u32,
    read_pct: u32,
    window: Duration,
    seconds: f64,
    serve_args: Vec<String>,
    server_output: bool,
}

/// Progress on stderr, when it is a terminal.
struct Progress {
    on: bool,
    label: String,
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

fn connect(addr: SocketAddr, export: &str) -> io::Result<(TcpStream, u64, u32)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let (size, max) = handshake(&mut s, export)?;
    // Short timeouts from here on: the threads look at their flags between
    // them.
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    s.set_write_timeout(Some(Duration::from_millis(100)))?;
    Ok((s, size, max))
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
fn run_pair(
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

fn print_header() {
    println!(
        "{:<10} {:<10} {:>6} {:>12} {:>10} {:>10} {:>10} {:>6} {:>9}  exit",
        "dvma", "completion", "secs", "verified", "reads", "writes", "mismatch", "stalls", "IOPS"
    );
}

fn print_pair(r: &PairReport) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn block(offset: u64, generation: u64, tag: u64) -> Vec<u8> {
        let mut b = vec![0; BLOCK];
        fill_block(&mut b, offset, generation, tag);
        b
    }

    #[test]
    fn a_block_checks_against_its_own_model_only() {
        let b = block(0x3000, 7, 0x10);
        assert_eq!(check_block(&b, 0x3000, 7, 0x10), None);
        // Stale generation, misdirected block, another connection's data.
        assert!(check_block(&b, 0x3000, 8, 0x10).is_some());
        assert!(check_block(&b, 0x4000, 7, 0x10).is_some());
        assert!(check_block(&b, 0x3000, 7, 0x11).is_some());
        // Never written: zeros only.
        assert!(check_block(&b, 0x3000, 0, 0x10).is_some());
        assert_eq!(check_block(&[0; BLOCK], 0x3000, 0, 0x10), None);
        assert!(check_block(&[0; BLOCK], 0x3000, 1, 0x10).is_some());
    }

    #[test]
    fn any_flipped_bit_is_a_mismatch() {
        let b = block(0x10000, 3, 1);
        for bit in [0, 8 * 40, 8 * 41 + 3, 8 * BLOCK - 1, 8 * 2000 + 5] {
            let mut c = b.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            let m = check_block(&c, 0x10000, 3, 1);
            assert!(m.is_some(), "bit {bit}");
        }
        // A torn block: first half of one generation, second of another.
        let mut t = block(0x10000, 3, 1);
        t[BLOCK / 2..].copy_from_slice(&block(0x10000, 4, 1)[BLOCK / 2..]);
        assert!(check_block(&t, 0x10000, 3, 1).is_some());
        assert!(check_block(&t, 0x10000, 4, 1).is_some());
    }
}
