//! `dvma serve`: every disk of the machine exported over NBD.
//!
//! # The path of a request
//! One walk down, one walk up; no other way reaches a backing file.
//!
//! ```text
//! client ─TCP─► reader thread (host): Request::parse, validate, admission
//!               (I/O memory credits), a write's payload read into device
//!               DMA memory (bdev.alloc_buf), BlockReq
//!           ─► HostChannel::submit ─► request ring ─► interrupt at IPL_NET
//!           ─► blksrv kernel thread: Buf per chunk ─► strategy (sd/ccd/vnd)
//!              ─► bus_dma load ─► device (DMA through the window)
//!           ◄─ interrupt ◄─ completion mode (intr|softint|thread|ast) ─► biodone
//!           ◄─ blksrv: biowait ─► RequestChannel::complete
//! client ◄─TCP─ writer thread (host): ReplyQueue::pop, reply header + the
//!               data straight from the DMA buffers (writev), credits back
//! ```
//!
//! Each connection has a reader and a writer host thread; replies go out in
//! completion order. The host threads never touch a backing file: data
//! moves between the socket and kernel I/O buffers, and the device moves it
//! between those buffers (as the IOMMU lets it) and its file.
//!
//! # Admission control
//! A request holds I/O memory from admission to its reply (a read's data
//! until it is sent). The server admits requests against a budget of
//! credits, half of the smallest memory the exported disks draw from (the
//! shared DVMA pool in `permanent`/`shadow` mode, general memory otherwise),
//! so that requests never wait for each other's memory while holding some
//! (no hold-and-wait deadlock). One connection may hold at most a quarter of
//! the budget ([`CONN_SHARE`]), and the advertised maximum payload is at
//! most that share: a client that stalls in the middle of a write payload,
//! or stops reading its replies, holds at most its share, and every other
//! connection goes on. A reader that waits for credits stops reading its
//! socket: TCP pushes back.
//!
//! # Timeouts
//! A client has [`HANDSHAKE_TIMEOUT`] to finish its handshake and
//! [`IO_TIMEOUT`] to send the rest of a request it has begun (header or
//! payload), or to take a reply the server is sending; otherwise the
//! connection is closed and what it held is freed. A client idle between
//! requests is never timed out.
//!
//! # Shutdown
//! SIGINT or SIGTERM: stop accepting; shut the read side of every
//! connection (a reader finishes the request it is reading); the writers
//! send every reply still owed; flush every disk; print the statistics;
//! exit 0. SIGUSR1 prints the statistics and writes `--stats-json`.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kern::bio::{BioError, BlockDev, BufOp, DEV_BSIZE, bdevs, getbuf_wait, submit_wait};
use kern::blksrv::{BlockReq, ReqOp, blksrv_attach, request_memory};
use machine::dev::{HostChannel, ReplyQueue};
use nbd::{
    BlockSizes, Command, CommandFlags, ErrorCode, ExportInfo, ExportList, Request, Validation,
};

use crate::config::BootArgs;
use crate::system::System;

/// The default listening address (loopback; anything else only when named).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Largest payload ever advertised (the NBD default, 32 MiB).
const MAX_PAYLOAD: u32 = 32 << 20;

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to send the rest of a request it has begun,
/// or to take a reply being sent.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The share of the I/O memory budget one connection may hold: 1/4.
pub const CONN_SHARE: u64 = 4;

/// How long shutdown waits for connections to drain before it closes them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `dvma serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The machine and its disks.
    #[command(flatten)]
    pub boot: BootArgs,
    /// Address to listen on. Only a loopback address unless named here.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Write the statistics as JSON to FILE on SIGUSR1 and at exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// blksrv kernel threads per CPU (requests served at once, per CPU).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
    /// Most connections at once; further ones are closed at once.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_connections: usize,
    /// How long a connection's reply writer polls for completions before it
    /// sleeps, µs.
    #[arg(long, value_name = "US", default_value_t = 2)]
    pub reply_poll_us: u32,
}

/// NBD-side counters.
#[derive(Debug, Default)]
pub struct NbdStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections refused (over `--max-connections`).
    pub refused: AtomicU64,
    /// Handshakes that failed or were aborted.
    pub bad_handshakes: AtomicU64,
    /// Requests served by the kernel.
    pub requests: AtomicU64,
    /// Requests answered with an error (rejected or failed).
    pub errors: AtomicU64,
    /// Bytes read by clients.
    pub bytes_read: AtomicU64,
    /// Bytes written by clients.
    pub bytes_written: AtomicU64,
}

/// I/O memory credits (module docs: admission control).
struct Credits {
    cap: u64,
    state: Mutex<CreditState>,
    freed: Condvar,
}

/// The credits left and how many threads wait for more: `release` makes
/// the wake-up system call only when someone waits (std's `Condvar`
/// always makes one otherwise, two per reply before this).
struct CreditState {
    avail: u64,
    waiting: u32,
}

impl Credits {
    fn new(cap: u64) -> Credits {
        Credits {
            cap,
            state: Mutex::new(CreditState {
                avail: cap,
                waiting: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self, n: u64) -> u64 {
        let n = n.min(self.cap);
        if n == 0 {
            return 0;
        }
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while s.avail < n {
            s.waiting += 1;
            s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
            s.waiting -= 1;
        }
        s.avail -= n;
        n
    }

    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.avail += n;
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.freed.notify_all();
        }
    }
}

/// What the connections share.
struct Shared {
    exports: ExportList,
    devs: HashMap<String, &'static dyn BlockDev>,
    chan: &'static HostChannel,
    credits: Credits,
    stats: NbdStats,
    stopping: AtomicBool,
    /// Every open connection's socket, to shut them down at exit.
    socks: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    reply_poll: Duration,
}

/// One connection in transmission: what its reader and writer share.
struct Conn {
    replies: Arc<ReplyQueue>,
    /// Replies made on the host (rejected requests).
    local: Mutex<Vec<Vec<u8>>>,
    /// Requests in the kernel.
    inflight: AtomicU64,
    reader_done: AtomicBool,
    structured: bool,
    max_transfer: usize,
    reply_poll: Duration,
    /// This connection's share of the budget.
    share: Credits,
}

/// `dvma serve`.
pub fn main(a: ServeArgs) -> Result<ExitCode, String> {
    let spec = a.boot.load().map_err(|e| e.to_string())?;
    let addr: SocketAddr = a
        .listen
        .parse()
        .map_err(|e| format!("--listen {}: {e} (expected IP:PORT)", a.listen))?;
    // Signals first, so that every thread created from here on (devices,
    // connections) inherits nothing unexpected and none is missed.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
    ])
    .map_err(|e| format!("signals: {e}"))?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;

    let sys = System::boot(spec)?;
    for m in &sys.messages {
        println!("{m}");
    }
    let ncpu = sys.machine.ncpu();
    let chan = HostChannel::new().leak();
    let srv = blksrv_attach(chan, 0, ncpu, a.threads as usize)?;

    let credits = credit_budget(&sys);
    let max_payload = payload_limit(credits / CONN_SHARE);
    let mut infos = Vec::new();
    let mut devs = HashMap::new();
    for d in bdevs() {
        let mut e = ExportInfo::new(d.name(), d.sectors() * DEV_BSIZE as u64);
        e.description = d.describe();
        e.read_only = d.read_only();
        e.block_sizes = BlockSizes::new(DEV_BSIZE as u32, 4096, max_payload)
            .map_err(|err| format!("{}: {err}", d.name()))?;
        e.can_flush = true;
        e.can_fua = true;
        e.can_trim = true;
        e.can_write_zeroes = true;
        // FLUSH is fdatasync of the backing files, after every write the
        // kernel has acknowledged, from whichever connection.
        e.can_multi_conn = true;
        e.check().map_err(|err| format!("{}: {err}", d.name()))?;
        devs.insert(d.name().to_string(), d);
        infos.push(e);
    }
    let default = infos.first().map(|e| e.name.clone());
    let mut exports = ExportList::new(infos);
    if let Some(d) = default {
        exports = exports.with_default(d);
    }
    println!(
        "blksrv at chan0: {} threads on each of {ncpu} cpus; I/O memory budget {} MiB, largest request {} KiB",
        a.threads,
        credits >> 20,
        max_payload >> 10
    );
    for e in &exports.exports {
        println!(
            "serving nbd://{local}/{}{}",
            e.name,
            if e.read_only { " (read-only)" } else { "" }
        );
    }
    println!(
        "dvma: ready ({} export{}; SIGINT or SIGTERM stops, SIGUSR1 prints statistics)",
        exports.exports.len(),
        if exports.exports.len() == 1 { "" } else { "s" }
    );
    let _ = io::stdout().flush();

    let sh = Arc::new(Shared {
        exports,
        devs,
        chan,
        credits: Credits::new(credits),
        stats: NbdStats::default(),
        stopping: AtomicBool::new(false),
        socks: Mutex::new(HashMap::new()),
        threads: Mutex::new(Vec::new()),
        reply_poll: Duration::from_micros(u64::from(a.reply_poll_us)),
    });
    let acceptor = {
        let sh = Arc::clone(&sh);
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&sh, listener, a.max_connections))
            .map_err(|e| e.to_string())?
    };

    let mut seq = 0u64;
    let write_stats = |seq: &mut u64| {
        *seq += 1;
        if let Some(p) = &a.stats_json
            && let Err(e) = write_json(p, &stats_json(&sys, &sh.stats, srv, *seq))
        {
            eprintln!("dvma: --stats-json {}: {e}", p.display());
        }
    };
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGUSR1 {
            eprint!("{}", stats_text(&sys, &sh.stats, srv));
            write_stats(&mut seq);
            continue;
        }
        break;
    }
    eprintln!("dvma: shutting down: draining connections");
    sh.stopping.store(true, SeqCst);
    // Wake the acceptor.
    let _ = TcpStream::connect_timeout(&local, Duration::from_secs(1));
    let _ = acceptor.join();
    for s in sh
        .socks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
    {
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = s.shutdown(Shutdown::Read);
    }
    let threads = std::mem::take(&mut *sh.threads.lock().unwrap_or_else(PoisonError::into_inner));
    // Drain: replies still owed go out, unless a client will not take them.
    let t0 = std::time::Instant::now();
    while threads.iter().any(|t| !t.is_finished()) && t0.elapsed() < DRAIN_TIMEOUT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stuck: Vec<_> = sh
        .socks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter_map(|s| s.try_clone().ok())
        .collect();
    if !stuck.is_empty() {
        eprintln!(
            "dvma: closing {} connection(s) that did not drain in {:?}",
            stuck.len(),
            DRAIN_TIMEOUT
        );
        for s in stuck {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    for t in threads {
        let _ = t.join();
    }
    chan.stop();
    let flushed = flush_all(&sys);
    let text = stats_text(&sys, &sh.stats, srv);
    write_stats(&mut seq);
    sys.shutdown()?;
    print!("{text}");
    let _ = io::stdout().flush();
    match flushed {
        Ok(()) => {
            eprintln!("dvma: every disk flushed; exiting");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(format!("flush at shutdown: {e}")),
    }
}

/// Half the smallest memory the exported disks draw their buffers from.
fn credit_budget(sys: &System) -> u64 {
    let (used, _) = sys.machine.stats().phys_pages;
    let total = kern::kernel::kernel().physmem().size();
    let mut m = total.saturating_sub(used * 4096);
    for d in &sys.spec.disks {
        if matches!(
            d.dvma,
            kern::bus_dma::DvmaMode::Permanent | kern::bus_dma::DvmaMode::Shadow
        ) {
            m = m.min(d.pool);
        }
    }
    (m / 2).max(1 << 20)
}

/// The largest request advertised: a power of two within the budget.
fn payload_limit(credits: u64) -> u32 {
    let c = credits.min(u64::from(MAX_PAYLOAD)) as u32;
    1u32 << (31 - c.leading_zeros())
}

fn accept_loop(sh: &Arc<Shared>, listener: TcpListener, max: usize) {
    let mut next_id = 0u64;
    for s in listener.incoming() {
        if sh.stopping.load(SeqCst) {
            break;
        }
        let Ok(sock) = s else { continue };
        if sh.stats.open.load(Relaxed) as usize >= max {
            sh.stats.refused.fetch_add(1, Relaxed);
            continue;
        }
        next_id += 1;
        let id = next_id;
        if let Ok(c) = sock.try_clone() {
            sh.socks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, c);
        }
        sh.stats.connections.fetch_add(1, Relaxed);
        sh.stats.open.fetch_add(1, Relaxed);
        let sh2 = Arc::clone(sh);
        let t = std::thread::Builder::new()
            .name(format!("nbd-conn{id}"))
            .stack_size(256 << 10)
            .spawn(move || {
                connection(&sh2, sock);
                sh2.socks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                sh2.stats.open.fetch_sub(1, Relaxed);
            });
        let mut threads = sh.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.retain(|t| !t.is_finished());
        match t {
            Ok(t) => threads.push(t),
            Err(_) => {
                sh.socks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                sh.stats.open.fetch_sub(1, Relaxed);
            }
        }
    }
}

/// One connection: the handshake, then the reader loop (this thread) and
/// the writer (a second thread).
fn connection(sh: &Arc<Shared>, mut sock: TcpStream) {
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let neg = match nbd::negotiate(&mut sock, &sh.exports, nbd::HandshakeLimits::default()) {
        Ok(n) => n,
        Err(_) => {
            sh.stats.bad_handshakes.fetch_add(1, Relaxed);
            return;
        }
    };
    // Timeouts for requests begun and replies being sent (idle clients are
    // fine: `read_header` waits on).
    let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
    let _ = sock.set_write_timeout(Some(IO_TIMEOUT));
    let Some(&dev) = sh.devs.get(&neg.export.name) else {
        return;
    };
    let conn = Arc::new(Conn {
        replies: Arc::new(ReplyQueue::new()),
        local: Mutex::new(Vec::new()),
        inflight: AtomicU64::new(0),
        reader_done: AtomicBool::new(false),
        structured: neg.structured_replies,
        max_transfer: dev.max_transfer().max(DEV_BSIZE) / DEV_BSIZE * DEV_BSIZE,
        reply_poll: sh.reply_poll,
        share: Credits::new((sh.credits.cap / CONN_SHARE).max(1 << 20)),
    });
    let Ok(wsock) = sock.try_clone() else { return };
    let writer = {
        let (sh, conn) = (Arc::clone(sh), Arc::clone(&conn));
        std::thread::Builder::new()
            .name("nbd-reply".into())
            .stack_size(256 << 10)
            .spawn(move || writer(&sh, &conn, wsock))
    };
    let Ok(writer) = writer else { return };
    // Requests arrive in bursts: one `recv` takes many headers (and small
    // payloads); larger payloads bypass the buffer into the DMA memory.
    let mut rd = io::BufReader::with_capacity(64 << 10, &sock);
    let _ = reader(sh, &conn, &neg, dev, &mut rd);
    conn.reader_done.store(true, SeqCst);
    conn.replies.notify();
    let _ = writer.join();
    let _ = sock.shutdown(Shutdown::Both);
}

/// Read requests until the client leaves (or must be disconnected).
fn reader(
    sh: &Shared,
    conn: &Conn,
    neg: &nbd::Negotiated,
    dev: &'static dyn BlockDev,
    sock: &mut impl Read,
) -> io::Result<()> {
    let mut raw = [0u8; nbd::wire::REQUEST_LEN];
    loop {
        if !read_header(sock, &mut raw, &sh.stopping)? {
            return Ok(());
        }
        let Ok(req) = Request::parse(&raw) else {
            // Bad magic: the stream is lost. Hard disconnect.
            return Ok(());
        };
        match neg.validate(&req) {
            Ok(()) => {}
            Err(Validation::Disconnect { .. }) => return Ok(()),
            Err(Validation::Reject { error, drain }) => {
                nbd::discard(sock, u64::from(drain))?;
                conn.local_reply(sh, nbd::error_reply(req.cookie, error, conn.structured));
                continue;
            }
        }
        let op = match req.command {
            Command::Disc => return Ok(()),
            Command::Read => ReqOp::Read,
            Command::Write => ReqOp::Write,
            Command::Flush => ReqOp::Flush,
            Command::Trim => ReqOp::Trim,
            Command::WriteZeroes => ReqOp::WriteZeroes,
            // validate() refuses every command not advertised.
            Command::Cache | Command::BlockStatus | Command::Unknown(_) => {
                conn.local_reply(
                    sh,
                    nbd::error_reply(req.cookie, ErrorCode::Inval, conn.structured),
                );
                continue;
            }
        };
        let len = u64::from(req.length);
        // This connection's share first (only its own replies free it),
        // then the common budget.
        let want = request_memory(op, len, conn.max_transfer);
        let held = conn.share.acquire(want);
        sh.credits.acquire(held);
        let mut chunks = Vec::new();
        if op == ReqOp::Write {
            match read_payload(sh, dev, conn.max_transfer, len as usize, sock) {
                Ok(c) => chunks = c,
                Err(e) => {
                    sh.credits.release(held);
                    conn.share.release(held);
                    return Err(e);
                }
            }
        }
        let breq = Box::new(BlockReq {
            cookie: req.cookie,
            dev,
            op,
            offset: req.offset,
            len,
            fua: req.flags.contains(CommandFlags::FUA),
            chunks,
            error: None,
            route: 0,
        });
        conn.inflight.fetch_add(1, SeqCst);
        if sh.chan.submit(breq, &conn.replies).is_err() {
            conn.inflight.fetch_sub(1, SeqCst);
            sh.credits.release(held);
            conn.share.release(held);
            conn.local_reply(
                sh,
                nbd::error_reply(req.cookie, ErrorCode::Shutdown, conn.structured),
            );
        }
    }
}

/// Read a request header. `Ok(false)`: the client closed the connection
/// between requests (or the server is stopping and the client is idle). A
/// read timeout with nothing of the header read is an idle client: wait on.
fn read_header(
    sock: &mut impl Read,
    raw: &mut [u8; nbd::wire::REQUEST_LEN],
    stopping: &AtomicBool,
) -> io::Result<bool> {
    let mut got = 0;
    while got < raw.len() {
        match sock.read(&mut raw[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if got == 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                if stopping.load(Relaxed) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A write's payload, read from the socket into the device's DMA memory in
/// pieces of its transfer size.
fn read_payload(
    sh: &Shared,
    dev: &'static dyn BlockDev,
    max: usize,
    len: usize,
    sock: &mut impl Read,
) -> io::Result<Vec<kern::vm::IoBuf>> {
    let mut chunks = Vec::with_capacity(len.div_ceil(max));
    let mut left = len;
    while left > 0 {
        let n = left.min(max);
        let mut b = alloc_host(sh, dev, n)?;
        b.set_len(n);
        sock.read_exact(b.as_mut_slice())?;
        chunks.push(b);
        left -= n;
    }
    Ok(chunks)
}

/// `alloc_buf` from a host thread: memory is admitted (credits), so it is
/// short only for moments (fragmentation, buffers being freed); retry.
fn alloc_host(sh: &Shared, dev: &'static dyn BlockDev, n: usize) -> io::Result<kern::vm::IoBuf> {
    let mut delay = Duration::from_micros(20);
    loop {
        if let Some(b) = dev.alloc_buf(n) {
            return Ok(b);
        }
        if sh.stopping.load(Relaxed) {
            return Err(io::Error::other("shutting down"));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(5));
    }
}

impl Conn {
    fn local_reply(&self, sh: &Shared, bytes: Vec<u8>) {
        sh.stats.errors.fetch_add(1, Relaxed);
        self.local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(bytes);
        self.replies.notify();
    }
}

fn errcode(e: BioError) -> ErrorCode {
    match e {
        BioError::Io => ErrorCode::Io,
        BioError::Inval => ErrorCode::Inval,
        BioError::NoSpc => ErrorCode::NoSpc,
        BioError::Perm => ErrorCode::Perm,
        BioError::Shutdown => ErrorCode::Shutdown,
    }
}

/// Most replies gathered into one `writev`.
const BATCH: usize = 64;

/// Send replies as the kernel completes requests, until the reader is done
/// and nothing is in flight.
fn writer(sh: &Shared, conn: &Conn, mut sock: TcpStream) {
    let mut broken = false;
    let mut batch: Vec<Box<BlockReq>> = Vec::with_capacity(BATCH);
    let mut heads: Vec<u8> = Vec::with_capacity(BATCH * 32);
    loop {
        let seen = conn.replies.seq();
        let local = std::mem::take(&mut *conn.local.lock().unwrap_or_else(PoisonError::into_inner));
        while batch.len() < BATCH {
            match conn.replies.pop() {
                Some(r) => batch.push(r),
                None => break,
            }
        }
        if batch.is_empty() && local.is_empty() {
            if conn.reader_done.load(SeqCst) && conn.inflight.load(SeqCst) == 0 {
                return;
            }
            conn.replies
                .wait(seen, conn.reply_poll, Duration::from_millis(200));
            continue;
        }
        // Headers first (one buffer), then the slices that point into it.
        heads.clear();
        let mut marks = Vec::with_capacity(batch.len());
        for r in &batch {
            let start = heads.len();
            match (r.error, r.op) {
                (Some(e), _) => {
                    heads.extend_from_slice(&nbd::error_reply(
                        r.cookie,
                        errcode(e),
                        conn.structured,
                    ));
                }
                (None, ReqOp::Read) => {
                    let req = Request {
                        flags: CommandFlags(0),
                        command: Command::Read,
                        cookie: r.cookie,
                        offset: r.offset,
                        length: r.len as u32,
                    };
                    nbd::encode_read_reply_header(&mut heads, &req, conn.structured);
                }
                (None, _) => nbd::encode_simple_reply(&mut heads, r.cookie, Ok(&[])),
            }
            marks.push((start, heads.len()));
        }
        if !broken {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(local.len() + batch.len() * 2);
            for l in &local {
                iov.push(IoSlice::new(l));
            }
            for (r, &(s, e)) in batch.iter().zip(&marks) {
                iov.push(IoSlice::new(&heads[s..e]));
                if r.error.is_none() && r.op == ReqOp::Read {
                    for c in &r.chunks {
                        iov.push(IoSlice::new(c.as_slice()));
                    }
                }
            }
            if write_all_vectored(&mut sock, &mut iov).is_err() {
                // The client is gone or stuck: stop writing, stop its reader,
                // and keep collecting (and freeing) what is in flight.
                broken = true;
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
        let (mut freed, mut done) = (0u64, 0u64);
        for r in batch.drain(..) {
            sh.stats.requests.fetch_add(1, Relaxed);
            match (r.error, r.op) {
                (Some(_), _) => {
                    sh.stats.errors.fetch_add(1, Relaxed);
                }
                (None, ReqOp::Read) => {
                    sh.stats.bytes_read.fetch_add(r.len, Relaxed);
                }
                (None, ReqOp::Write) => {
                    sh.stats.bytes_written.fetch_add(r.len, Relaxed);
                }
                _ => {}
            }
            freed += request_memory(r.op, r.len, conn.max_transfer).min(conn.share.cap);
            done += 1;
            drop(r);
        }
        // The batch's memory goes back at once (one lock each), before the
        // in-flight count drops, so the reader never sees nothing in flight
        // while credits are still held.
        sh.credits.release(freed);
        conn.share.release(freed);
        conn.inflight.fetch_sub(done, SeqCst);
    }
}

fn write_all_vectored(sock: &mut TcpStream, mut iov: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !iov.is_empty() {
        match sock.write_vectored(iov) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut iov, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Flush every disk (at shutdown), from a kernel thread.
fn flush_all(sys: &System) -> Result<(), String> {
    let r = sys
        .machine
        .run(0, "flush", move |ctx| {
            let mut errs = Vec::new();
            for d in bdevs() {
                if d.read_only() {
                    continue;
                }
                let Ok(mut bp) = getbuf_wait(ctx) else {
                    errs.push(format!("{}: interrupted", d.name()));
                    continue;
                };
                bp.op = BufOp::Flush;
                let bp = submit_wait(ctx, d, bp);
                if let Some(e) = bp.error {
                    errs.push(format!("{}: {e}", d.name()));
                }
            }
            errs
        })
        .map_err(|e| e.to_string())?;
    if r.is_empty() {
        Ok(())
    } else {
        Err(r.join("; "))
    }
}

/// The statistics, as text (`vmstat -i` style plus the NBD counters).
fn stats_text(sys: &System, n: &NbdStats, srv: &kern::blksrv::SrvStats) -> String {
    format!(
        "{}nbd: {} connections ({} open, {} refused, {} bad handshakes), {} requests, {} errors, {} MiB read, {} MiB written\nblksrv: {} requests, {} bufs, {} errors\n",
        sys.stats(),
        n.connections.load(Relaxed),
        n.open.load(Relaxed),
        n.refused.load(Relaxed),
        n.bad_handshakes.load(Relaxed),
        n.requests.load(Relaxed),
        n.errors.load(Relaxed),
        n.bytes_read.load(Relaxed) >> 20,
        n.bytes_written.load(Relaxed) >> 20,
        srv.requests.load(Relaxed),
        srv.bufs.load(Relaxed),
        srv.errors.load(Relaxed),
    )
}

/// The statistics as the JSON object `--stats-json` holds.
fn stats_json(
    sys: &System,
    n: &NbdStats,
    srv: &kern::blksrv::SrvStats,
    seq: u64,
) -> serde_json::Value {
    let s = sys.machine.stats();
    let sum = |f: fn(&kern::stats::CpuSnapshot) -> u64| s.cpus.iter().map(f).sum::<u64>();
    serde_json::json!({
        "seq": seq,
        "cpus": s.cpus.len(),
        "interrupts": sum(|c| c.intr),
        "signals": sum(|c| c.traps),
        "softints": sum(|c| c.softints),
        "ctx_switches": sum(|c| c.switches),
        "asts": sum(|c| c.ast_handlers),
        "ast_pushed": sum(|c| c.ast_pushed),
        "ast_deferred": sum(|c| c.ast_deferred),
        "iommu_faults": sys.machine.window().stats.faults.load(Relaxed),
        "dvma_pages_held": s.dvma_pages.0,
        "dvma_pages_peak": s.dvma_pages.1,
        "nbd_connections": n.connections.load(Relaxed),
        "nbd_requests": n.requests.load(Relaxed),
        "nbd_errors": n.errors.load(Relaxed),
        "nbd_bytes_read": n.bytes_read.load(Relaxed),
        "nbd_bytes_written": n.bytes_written.load(Relaxed),
        "blksrv_bufs": srv.bufs.load(Relaxed),
        "vectors": s.vectors.iter().map(|v| serde_json::json!({
            "name": v.name, "per_cpu": v.per_cpu,
        })).collect::<Vec<_>>(),
    })
}

/// Write `v` to `path` atomically (a temporary file, then rename).
fn write_json(path: &Path, v: &serde_json::Value) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(v).map_err(io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}
