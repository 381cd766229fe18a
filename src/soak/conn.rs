//! One NBD connection of a pair: its workload generator and its verifier.
//!
//! A [`Conn`] keeps the model of its own part of the disk (the generation
//! last acknowledged for each block) and is shared by two threads: the
//! sender picks requests (random reads and writes, some larger, a rare
//! FLUSH) among blocks with nothing in flight and sends them; the receiver
//! takes the replies, checks every block read against the model and
//! updates it on acknowledged writes. The watchdog reads its progress
//! counters. Also here: the fixed-newstyle handshake (`NBD_OPT_GO`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nbd::handshake::InfoRequest;
use nbd::wire::{
    IHAVEOPT, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC, NBDMAGIC,
};
use nbd::{Command, CommandFlags, OptionHeader, Request};

use super::MISMATCH_NOTES;
use super::block::{BLOCK, Rng, check_block, fill_block};

/// Never-known generation: a write that failed leaves its blocks unknown.
const UNKNOWN: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

#[derive(Debug)]
pub(super) struct Op {
    kind: Kind,
    block: u32,
    blocks: u32,
    /// A write's generation.
    generation: u64,
    /// A read's expected generation per block.
    expect: Vec<u64>,
}

#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) verified: u64,
    pub(super) reads: u64,
    pub(super) writes: u64,
    pub(super) flushes: u64,
    pub(super) blocks_checked: u64,
    pub(super) bytes: u64,
    pub(super) mismatches: u64,
    pub(super) notes: Vec<String>,
    pub(super) errors: u64,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) gens: Vec<u64>,
    pub(super) busy: Vec<bool>,
    pub(super) inflight: HashMap<u64, Op>,
    pub(super) next_cookie: u64,
    pub(super) next_gen: u64,
    pub(super) sender_waiting: bool,
    /// No new requests (the pair is ending).
    pub(super) stop: bool,
    pub(super) counts: Counts,
}

/// One connection, shared by its sender and receiver threads and the
/// watchdog.
pub(super) struct Conn {
    pub(super) idx: usize,
    /// First byte of the connection's part of the disk.
    pub(super) base: u64,
    pub(super) tag: u64,
    pub(super) depth: usize,
    pub(super) max_blocks: u32,
    pub(super) read_pct: u64,
    pub(super) st: Mutex<State>,
    pub(super) cv: Condvar,
    /// Requests completed (the watchdog's progress count).
    pub(super) completed: AtomicU64,
    /// Nanoseconds after `t0` of the last completion, plus 1 (0: none).
    pub(super) last_done: AtomicU64,
    pub(super) t0: Instant,
    /// Give up at once (a stall, an error, the end of a failed pair).
    pub(super) abort: Arc<AtomicBool>,
    /// The first error that ended this connection.
    pub(super) error: Mutex<Option<String>>,
}

impl Conn {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
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

    pub(super) fn failed(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub(super) fn done(&self) -> bool {
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
    pub(super) fn sender(self: Arc<Conn>, mut sock: TcpStream, seed: u64) {
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
    pub(super) fn receiver(self: Arc<Conn>, mut sock: TcpStream) {
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

/// Connects to `export` at `addr` and negotiates; the socket (with short
/// timeouts from here on), the export's size and its largest payload.
pub(super) fn connect(addr: SocketAddr, export: &str) -> io::Result<(TcpStream, u64, u32)> {
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
