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
//! until it is sent), and every queued reply holds [`REPLY_COST`] on top
//! of that: an error reply made on the host (`Conn::local`), a TRIM, a
//! FLUSH, a rejected zero-length read, all alike, so that nothing a client
//! sends without reading its replies is free. The server admits requests
//! against a budget of credits, half of the smallest memory the exported
//! disks draw from (the shared DVMA pool in `permanent`/`shadow` mode,
//! general memory otherwise), so that requests never wait for each other's
//! memory while holding some (no hold-and-wait deadlock). One connection
//! may hold at most a quarter of the budget ([`CONN_SHARE`]), and the
//! advertised maximum payload is at most that share. A reader whose
//! connection has used its share stops reading its socket until the
//! writer has sent replies and given credits back: TCP pushes back, and a
//! client that never reads its replies holds its share and no more.
//!
//! # Fairness: a reserve for light connections
//! Hostile connections can hold memory for a long time (a stalled write
//! payload, maximum reads never read), so fair scheduling of what is
//! released would not help: they release nothing. Instead the last
//! [`RESERVE_DIV`]th of the budget is a reserve only light connections may
//! draw on: a request is admitted into the reserve only if the
//! connection's holding stays at most `reserve / 64` ([`LIGHT_DIV`])
//! afterwards. Heavy connections, however many, leave the reserve alone,
//! so a well-behaved client doing small I/O is always admitted at once; it
//! takes 64 connections each holding its light share to use the reserve up
//! (hence also the per-address limit). A static reservation per
//! connection was the alternative; with thousands of connections allowed
//! it would be a few KiB each, or would cap the connections at a handful.
//!
//! # Older clients
//! A client that entered transmission with `NBD_OPT_EXPORT_NAME` learnt no
//! block sizes, so (as the spec asks) it may send any alignment and up to
//! 32 MiB. Its requests that are aligned to 512 and within the advertised
//! maximum take the normal path; the others are served one at a time by its
//! reader through a host bounce buffer, charged the connection's whole
//! share: reads of the covering sectors in pieces of the maximum payload,
//! and for writes a read-modify-write of partly covered pieces. (Two such
//! clients writing different bytes of one sector at once may lose one
//! write; the spec leaves overlapping concurrent writes undefined.)
//! Clients that negotiated with `NBD_OPT_GO` keep the advertised checks.
//!
//! # Timeouts and limits
//! Deadlines, not per-call timeouts: a client has `--handshake-timeout`
//! (30 s) from its connection to finish the handshake, and `--io-timeout`
//! (30 s) from the first byte of a request header to the end of that
//! header, from admission to the end of a write's payload, and from the
//! start of a batch of replies to its last byte; otherwise the connection
//! is closed and what it held is freed. Trickling one byte at a time does
//! not extend them. `--idle-timeout` (off by default) closes a connection
//! that has nothing in flight and sends nothing for that long. Beyond
//! `--max-connections` open connections, or `--max-per-addr` from one
//! address, a new client gets the greeting and `NBD_REP_ERR_POLICY` ("too
//! many connections ...") to its options (a client using
//! `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error, is
//! closed), and the refusal is logged (at most once a second).
//!
//! # TLS
//! `--tls on|only` with `--tls-cert`/`--tls-key` (and `--tls-ca` to require
//! client certificates) serves `NBD_OPT_STARTTLS` with rustls (ring); the
//! `nbd` crate's `negotiate_tls` answers the options (`only`: everything but
//! STARTTLS gets `NBD_REP_ERR_TLS_REQD` before TLS), and the TLS handshake
//! runs under the handshake's deadline. A non-loopback `--listen` needs TLS
//! or `--insecure-listen`. After the handshake both threads of a TLS
//! connection share its `rustls::ServerConnection` behind a `Mutex` (`Io`):
//! the reader reads ciphertext from the socket *without* the lock, then
//! locks to decrypt; the writer locks to encrypt at most rustls's buffer
//! limit (64 KiB) and sends it after unlocking. Only the writer sends
//! ciphertext (what the reader's side owes, e.g. a key update, goes out with
//! the next batch or within 200 ms), so records leave in order and neither
//! thread blocks on the socket while holding the lock. The cost, unmeasured:
//! a copy of every byte into and out of rustls's buffers (the plain path
//! sends reads straight from the DMA buffers), a lock per 64 KiB, and the
//! crypto itself.
//!
//! # Shutdown
//! SIGINT or SIGTERM: stop accepting; shut the read side of every
//! connection (a reader finishes the request it is reading); the writers
//! send every reply still owed; flush every disk; print the statistics;
//! exit 0. SIGUSR1 prints the statistics and writes `--stats-json`.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::ServerConnection;

use kern::bio::{BioError, BlockDev, BufOp, DEV_BSIZE, bdevs, getbuf_wait, submit_wait};
use kern::blksrv::{BlockReq, ReqOp, blksrv_attach, request_memory};
use machine::dev::{HostChannel, ReplyQueue};
use nbd::{
    BlockSizes, Command, CommandFlags, ErrorCode, ExportInfo, ExportList, Request, Validation,
};

use crate::config::BootArgs;
use crate::system::System;

pub mod nic;

/// The default listening address (loopback; anything else only when named).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Largest payload ever advertised (the NBD default, 32 MiB).
const MAX_PAYLOAD: u32 = 32 << 20;

/// How long a client may take to finish its handshake (default of
/// `--handshake-timeout`, seconds).
pub const HANDSHAKE_TIMEOUT: u64 = 30;

/// How long a client may take to send the rest of a request it has begun,
/// or to take a batch of replies (default of `--io-timeout`, seconds).
pub const IO_TIMEOUT: u64 = 30;

/// The share of the I/O memory budget one connection may hold: 1/4.
pub const CONN_SHARE: u64 = 4;

/// What every queued reply is charged on top of its data: its host memory
/// (request, reply, queue entry), rounded up generously.
pub const REPLY_COST: u64 = 4096;

/// The reserve for light connections: 1/4 of the budget.
pub const RESERVE_DIV: u64 = 4;

/// A connection is light while it holds at most `reserve / LIGHT_DIV`.
pub const LIGHT_DIV: u64 = 64;

/// Most threads answering refused clients at once (more are just closed).
const MAX_REFUSERS: u32 = 16;

/// How long a refused client may take to be told.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long shutdown waits for connections to drain before it closes them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `dvma serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The machine and its disks.
    #[command(flatten)]
    pub boot: BootArgs,
    /// Address to listen on. Only a loopback address unless named here; a
    /// non-loopback one also needs TLS or `--insecure-listen`.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Serve a non-loopback `--listen` address without TLS: anyone who can
    /// reach it can read and write every disk.
    #[arg(long)]
    pub insecure_listen: bool,
    /// TLS (`NBD_OPT_STARTTLS`): `off`, `on` (offered), `only` (required
    /// before any other option). Default: `on` with `--tls-cert`, else `off`.
    #[arg(long, value_name = "MODE")]
    pub tls: Option<TlsArg>,
    /// The server's X.509 certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CA certificates (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Write the statistics as JSON to FILE on SIGUSR1 and at exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// blksrv kernel threads per CPU (requests served at once, per CPU).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
    /// Most connections at once; further ones are refused
    /// (`NBD_REP_ERR_POLICY`, logged).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_connections: usize,
    /// Most connections from one IP address; further ones are refused.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_per_addr: usize,
    /// Seconds a client has to finish its handshake (a deadline).
    #[arg(long, value_name = "SECS", default_value_t = HANDSHAKE_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout: u64,
    /// Seconds a client has to send a request it began (header; payload from
    /// admission), or to take a batch of replies (deadlines).
    #[arg(long, value_name = "SECS", default_value_t = IO_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    pub io_timeout: u64,
    /// Close a connection idle (nothing in flight, nothing sent) this many
    /// seconds; 0: never.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub idle_timeout: u64,
    /// How long a connection's reply writer polls for completions before it
    /// sleeps, µs.
    #[arg(long, value_name = "US", default_value_t = 2)]
    pub reply_poll_us: u32,
    /// The transmission path: `poll` (run to completion: the vCPUs read
    /// requests and send replies themselves, the sockets are their NICs'
    /// devices) or `threads` (a reader and a writer host thread per
    /// connection). TLS connections and `NBD_OPT_EXPORT_NAME` clients always
    /// take `threads`.
    #[arg(long, value_name = "PATH", default_value = "poll")]
    pub net: NetArg,
}

/// `--net`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetArg {
    /// Run to completion on the vCPUs ([`nic`]).
    Poll,
    /// A reader and a writer host thread per connection.
    Threads,
}

/// `--tls`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsArg {
    /// No TLS.
    Off,
    /// TLS offered; plaintext clients are served too.
    On,
    /// TLS required: every option but STARTTLS gets `NBD_REP_ERR_TLS_REQD`.
    Only,
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

/// I/O memory credits (module docs: admission control, fairness).
struct Budget {
    /// Most one connection may hold.
    share: u64,
    /// What only light connections may take.
    reserve: u64,
    /// Most a connection may hold and still draw on the reserve.
    light: u64,
    state: Mutex<CreditState>,
    freed: Condvar,
    /// Run-to-completion connections waiting for credits ([`nic`]), and
    /// what tells their NICs when credits come back.
    stalled: AtomicU32,
    waker: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// The credits left and how many threads wait for more: `release` makes
/// the wake-up system call only when someone waits (std's `Condvar`
/// always makes one otherwise, two per reply before this).
struct CreditState {
    avail: u64,
    waiting: u32,
}

impl Budget {
    fn new(cap: u64) -> Budget {
        let share = (cap / CONN_SHARE).max(1 << 20).min(cap);
        let reserve = (cap / RESERVE_DIV).min(cap - share);
        let light = if reserve == 0 {
            0
        } else {
            (reserve / LIGHT_DIV).max(4 * REPLY_COST).min(reserve)
        };
        Budget {
            share,
            reserve,
            light,
            state: Mutex::new(CreditState {
                avail: cap,
                waiting: 0,
            }),
            freed: Condvar::new(),
            stalled: AtomicU32::new(0),
            waker: std::sync::OnceLock::new(),
        }
    }

    /// Take `n` credits (at most the share) for the connection holding
    /// `held`; wait until its share has room and, unless it stays light,
    /// the pool has `n` beyond the reserve. `held` changes only under the
    /// lock. Returns what was taken.
    fn acquire(&self, held: &AtomicU64, n: u64) -> u64 {
        let n = n.min(self.share);
        if n == 0 {
            return 0;
        }
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.take(&mut s, held, n) {
                return n;
            }
            s.waiting += 1;
            s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
            s.waiting -= 1;
        }
    }

    /// [`Budget::acquire`] without waiting: `None` if it would wait (then
    /// the caller is told, through the waker, when credits come back).
    fn try_acquire(&self, held: &AtomicU64, n: u64) -> Option<u64> {
        let n = n.min(self.share);
        if n == 0 {
            return Some(0);
        }
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.take(&mut s, held, n).then_some(n)
    }

    /// The admission rule: the connection's share has room and, unless it
    /// stays light, the pool has `n` beyond the reserve.
    fn take(&self, s: &mut CreditState, held: &AtomicU64, n: u64) -> bool {
        let h = held.load(Relaxed);
        let floor = if h + n <= self.light { 0 } else { self.reserve };
        if h + n <= self.share && s.avail >= n + floor {
            s.avail -= n;
            held.store(h + n, Relaxed);
            return true;
        }
        false
    }

    fn release(&self, held: &AtomicU64, n: u64) {
        if n == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.avail += n;
        held.fetch_sub(n, Relaxed);
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.freed.notify_all();
        }
        if self.stalled.load(SeqCst) > 0
            && let Some(w) = self.waker.get()
        {
            w();
        }
    }

    /// What a request of `op` over `len` is charged: its I/O memory and
    /// its reply, at most the share.
    fn charge(&self, op: ReqOp, len: u64, max_transfer: usize) -> u64 {
        (request_memory(op, len, max_transfer) + REPLY_COST).min(self.share)
    }
}

/// What the connections share.
struct Shared {
    exports: ExportList,
    devs: HashMap<String, &'static dyn BlockDev>,
    chan: &'static HostChannel,
    /// The run-to-completion path (`--net poll`).
    nic: Option<&'static nic::NicChannel>,
    budget: Budget,
    stats: NbdStats,
    stopping: AtomicBool,
    /// Every open connection's socket, to shut them down at exit.
    socks: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    reply_poll: Duration,
    /// Open connections per client address.
    per_addr: Mutex<HashMap<IpAddr, usize>>,
    max_connections: usize,
    max_per_addr: usize,
    handshake_timeout: Duration,
    io_timeout: Duration,
    idle_timeout: Option<Duration>,
    /// Threads answering refused clients now.
    refusers: AtomicU32,
    /// When a refusal was last logged, and how many since.
    refusal_log: Mutex<(Option<std::time::Instant>, u64)>,
    tls_mode: nbd::TlsMode,
    /// The TLS configuration (`None`: `--tls off`).
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// One connection in transmission: what its reader and writer share.
struct Conn {
    replies: Arc<ReplyQueue>,
    /// Replies made on the host (rejected requests, bounce-buffer
    /// requests), each with the credits it holds.
    local: Mutex<Vec<(Vec<u8>, u64)>>,
    /// The reader's own requests (bounce-buffer path), waited for.
    sync: Arc<ReplyQueue>,
    /// Credits this connection holds (changed under the budget's lock).
    held: AtomicU64,
    /// Entered with `NBD_OPT_EXPORT_NAME`: any alignment, up to 32 MiB.
    lenient: bool,
    /// The export as requests are validated against.
    vexport: ExportInfo,
    /// Largest read or write on the direct path (the advertised maximum).
    direct_max: u64,
    /// Requests in the kernel.
    inflight: AtomicU64,
    reader_done: AtomicBool,
    structured: bool,
    max_transfer: usize,
    reply_poll: Duration,
}

/// `dvma serve`.
pub fn main(a: ServeArgs) -> Result<ExitCode, String> {
    let spec = a.boot.load().map_err(|e| e.to_string())?;
    let addr: SocketAddr = a
        .listen
        .parse()
        .map_err(|e| format!("--listen {}: {e} (expected IP:PORT)", a.listen))?;
    let (tls_mode, tls) = tls_config(&a)?;
    exposure(addr, a.insecure_listen, tls.is_some())?;
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
    let nicchan = match a.net {
        NetArg::Threads => None,
        NetArg::Poll => {
            let nics = (0..ncpu)
                .map(|c| sys.machine.nic(c))
                .collect::<io::Result<Vec<_>>>()
                .map_err(|e| format!("nic: {e}"))?;
            let nc: &'static nic::NicChannel = Box::leak(Box::new(nic::NicChannel::new(nics)));
            blksrv_attach(nc, 0, ncpu, a.threads as usize)?;
            Some(nc)
        }
    };

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
        // A read-only export offers no write command (as nbdkit): no FUA,
        // TRIM or WRITE_ZEROES; FLUSH stays (harmless, and clients use it).
        e.can_fua = !e.read_only;
        e.can_trim = !e.read_only;
        e.can_write_zeroes = !e.read_only;
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
    let tls_note = match tls_mode {
        nbd::TlsMode::Off => "",
        nbd::TlsMode::On => " (TLS offered)",
        nbd::TlsMode::Only => " (TLS required)",
    };
    for e in &exports.exports {
        println!(
            "serving nbd://{local}/{}{}{tls_note}",
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
        nic: nicchan,
        budget: Budget::new(credits),
        stats: NbdStats::default(),
        stopping: AtomicBool::new(false),
        socks: Mutex::new(HashMap::new()),
        threads: Mutex::new(Vec::new()),
        reply_poll: Duration::from_micros(u64::from(a.reply_poll_us)),
        per_addr: Mutex::new(HashMap::new()),
        max_connections: a.max_connections,
        max_per_addr: a.max_per_addr,
        handshake_timeout: Duration::from_secs(a.handshake_timeout),
        io_timeout: Duration::from_secs(a.io_timeout),
        idle_timeout: (a.idle_timeout > 0).then(|| Duration::from_secs(a.idle_timeout)),
        refusers: AtomicU32::new(0),
        refusal_log: Mutex::new((None, 0)),
        tls_mode,
        tls,
    });
    if let Some(nc) = nicchan {
        nc.start(&sh).map_err(|e| format!("nic watchdog: {e}"))?;
    }
    let acceptor = {
        let sh = Arc::clone(&sh);
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&sh, listener))
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
            if let Some(n) = nicchan {
                eprint!("{}", n.dump());
            }
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
    let busy = |threads: &[JoinHandle<()>]| {
        threads.iter().any(|t| !t.is_finished()) || nicchan.is_some_and(|n| n.open() > 0)
    };
    while busy(&threads) && t0.elapsed() < DRAIN_TIMEOUT {
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
    let t0 = std::time::Instant::now();
    while nicchan.is_some_and(|n| n.open() > 0) && t0.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(10));
    }
    chan.stop();
    if let Some(n) = nicchan {
        n.stop();
    }
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

/// No silent exposure: a listener off loopback without TLS is refused,
/// unless `--insecure-listen` says so (then a warning).
fn exposure(addr: SocketAddr, insecure: bool, tls: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || tls {
        return Ok(());
    }
    if !insecure {
        return Err(format!(
            "--listen {addr} is not a loopback address, and without TLS anyone who can \
             reach it can read and write every disk; serve TLS (--tls only --tls-cert FILE \
             --tls-key FILE) or pass --insecure-listen to serve it anyway"
        ));
    }
    eprintln!(
        "dvma: WARNING: serving {addr} without TLS (--insecure-listen): anyone who can \
         reach it can read and write every disk"
    );
    Ok(())
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

fn accept_loop(sh: &Arc<Shared>, listener: TcpListener) {
    let mut next_id = 0u64;
    for s in listener.incoming() {
        if sh.stopping.load(SeqCst) {
            break;
        }
        let Ok(sock) = s else { continue };
        let ip = sock.peer_addr().map(|a| a.ip()).ok();
        let open = sh.stats.open.load(Relaxed) as usize;
        if open >= sh.max_connections {
            let why = format!(
                "too many connections ({open} open, --max-connections {})",
                sh.max_connections
            );
            refuse(sh, sock, ip, why);
            continue;
        }
        if let Some(ip) = ip {
            let mut per = sh.per_addr.lock().unwrap_or_else(PoisonError::into_inner);
            let n = per.entry(ip).or_insert(0);
            if *n >= sh.max_per_addr {
                let why = format!(
                    "too many connections from {ip} ({n} open, --max-per-addr {})",
                    sh.max_per_addr
                );
                drop(per);
                refuse(sh, sock, Some(ip), why);
                continue;
            }
            *n += 1;
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
                if !connection(&sh2, sock, id, ip) {
                    closed(&sh2, id, ip);
                }
            });
        let mut threads = sh.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.retain(|t| !t.is_finished());
        match t {
            Ok(t) => threads.push(t),
            Err(_) => closed(sh, id, ip),
        }
    }
}

/// A connection is gone: count it out.
fn closed(sh: &Shared, id: u64, ip: Option<IpAddr>) {
    sh.socks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    if let Some(ip) = ip {
        let mut per = sh.per_addr.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
    }
    sh.stats.open.fetch_sub(1, Relaxed);
}

/// Refuse a client over a limit: log why (at most once a second), and
/// tell the client in the handshake (`NBD_REP_ERR_POLICY` with the reason)
/// if few refusals are being told already; otherwise just close.
fn refuse(sh: &Arc<Shared>, sock: TcpStream, ip: Option<IpAddr>, why: String) {
    sh.stats.refused.fetch_add(1, Relaxed);
    {
        let mut log = sh
            .refusal_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if log
            .0
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            let more = if log.1 > 0 {
                format!(" ({} more refused since the last message)", log.1)
            } else {
                String::new()
            };
            let from = ip.map_or_else(|| "?".to_string(), |i| i.to_string());
            eprintln!("dvma: refused a connection from {from}: {why}{more}");
            *log = (Some(now), 0);
        } else {
            log.1 += 1;
        }
    }
    if sh.refusers.fetch_add(1, SeqCst) >= MAX_REFUSERS {
        sh.refusers.fetch_sub(1, SeqCst);
        return;
    }
    let sh2 = Arc::clone(sh);
    let t = std::thread::Builder::new()
        .name("nbd-refuse".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let _ = tell_refusal(&sock, &why);
            let _ = sock.shutdown(Shutdown::Both);
            sh2.refusers.fetch_sub(1, SeqCst);
        });
    if t.is_err() {
        sh.refusers.fetch_sub(1, SeqCst);
    }
}

/// The greeting, then `NBD_REP_ERR_POLICY` with `why` to each option (a
/// few at most) until the client aborts or leaves; `NBD_OPT_EXPORT_NAME`
/// cannot be answered with an error: close.
fn tell_refusal(sock: &TcpStream, why: &str) -> io::Result<()> {
    use nbd::wire::{NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME, NBD_REP_ACK, NBD_REP_ERR_POLICY};
    let mut s = Timed::new(sock);
    s.deadline = Some(Instant::now() + REFUSAL_TIMEOUT);
    let _ = sock.set_nodelay(true);
    s.write_all(&nbd::handshake::encode_greeting())?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    for _ in 0..4 {
        let mut raw = [0u8; nbd::wire::OPTION_HEADER_LEN];
        s.read_exact(&mut raw)?;
        let Ok(h) = nbd::OptionHeader::parse(&raw) else {
            return Ok(());
        };
        if h.option == NBD_OPT_EXPORT_NAME || h.length > 64 << 10 {
            return Ok(());
        }
        nbd::discard(&mut s, u64::from(h.length))?;
        let mut out = Vec::new();
        if h.option == NBD_OPT_ABORT {
            nbd::handshake::encode_option_reply(&mut out, h.option, NBD_REP_ACK, &[]);
            s.write_all(&out)?;
            return Ok(());
        }
        nbd::handshake::encode_option_reply(&mut out, h.option, NBD_REP_ERR_POLICY, why.as_bytes());
        s.write_all(&out)?;
    }
    Ok(())
}

/// A socket whose reads and writes end at a deadline (not a timeout per
/// call, which trickling would restart): the socket's timeout is set to
/// what is left before each call, and a call that times out early is
/// retried. No deadline: calls block (reads) without a timeout.
struct Timed<'a> {
    sock: &'a TcpStream,
    deadline: Option<Instant>,
    /// The timeouts the socket has now (`Some(None)`: none), to skip the
    /// system call when they are close enough.
    rset: Option<Option<Duration>>,
    wset: Option<Option<Duration>>,
}

impl<'a> Timed<'a> {
    fn new(sock: &'a TcpStream) -> Timed<'a> {
        Timed {
            sock,
            deadline: None,
            rset: None,
            wset: None,
        }
    }

    /// The timeout the next call should have; `Err` once the deadline has
    /// passed.
    fn left(&self) -> io::Result<Option<Duration>> {
        match self.deadline {
            None => Ok(None),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left < Duration::from_micros(100) {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
                } else {
                    Ok(Some(left))
                }
            }
        }
    }
}

/// Whether a socket timeout of `cur` must be changed to honour `want`:
/// never later than the deadline, and not much earlier (which would only
/// cost wake-ups).
fn rearm(cur: Option<Option<Duration>>, want: Option<Duration>) -> bool {
    match (cur, want) {
        (None, _) => true,
        (Some(c), None) => c.is_some(),
        (Some(None), Some(_)) => true,
        (Some(Some(c)), Some(w)) => c > w || c < w / 2,
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let want = self.left()?;
            if rearm(self.rset, want) {
                self.sock.set_read_timeout(want)?;
                self.rset = Some(want);
            }
            match (&*self.sock).read(buf) {
                Err(e) if self.deadline.is_some() && timed_out(&e) => {}
                r => return r,
            }
        }
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            let want = self.left()?;
            if rearm(self.wset, want) {
                self.sock.set_write_timeout(want)?;
                self.wset = Some(want);
            }
            match (&*self.sock).write_vectored(bufs) {
                Err(e) if self.deadline.is_some() && timed_out(&e) => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `--tls`, `--tls-cert`, `--tls-key`, `--tls-ca`: the handshake's mode
/// and the TLS configuration (`None` without TLS).
fn tls_config(a: &ServeArgs) -> Result<(nbd::TlsMode, Option<Arc<rustls::ServerConfig>>), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mode = match a.tls {
        Some(TlsArg::Off) => nbd::TlsMode::Off,
        Some(TlsArg::On) => nbd::TlsMode::On,
        Some(TlsArg::Only) => nbd::TlsMode::Only,
        None if a.tls_cert.is_some() => nbd::TlsMode::On,
        None => nbd::TlsMode::Off,
    };
    if mode == nbd::TlsMode::Off {
        if a.tls_cert.is_some() || a.tls_key.is_some() || a.tls_ca.is_some() {
            return Err("--tls off, but --tls-cert, --tls-key or --tls-ca given".into());
        }
        return Ok((mode, None));
    }
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return Err("TLS needs --tls-cert FILE and --tls-key FILE (PEM)".into());
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &a.tls_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    Ok((mode, Some(Arc::new(config))))
}

/// A connection's socket as one thread uses it: plain, or through the
/// connection's TLS session (module docs: TLS). Dereferences to its
/// [`Timed`] socket, whose deadline bounds every call.
struct Io<'a> {
    sock: Timed<'a>,
    /// The TLS session, shared with the connection's other thread.
    tls: Option<Arc<Mutex<ServerConnection>>>,
    /// Ciphertext read from the socket and not yet given to rustls.
    pending: Vec<u8>,
    pos: usize,
}

impl<'a> Io<'a> {
    fn new(sock: &'a TcpStream) -> Io<'a> {
        Io {
            sock: Timed::new(sock),
            tls: None,
            pending: Vec::new(),
            pos: 0,
        }
    }

    /// After the `NBD_REP_ACK` to `NBD_OPT_STARTTLS`: the TLS handshake, by
    /// the socket's deadline; from here on this stream speaks TLS.
    fn start_tls(&mut self, config: Option<&Arc<rustls::ServerConfig>>) -> io::Result<()> {
        let config = config.ok_or_else(|| io::Error::other("TLS is not configured"))?;
        let mut conn = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut self.sock)?;
        }
        // Bytes the client sent after its handshake are in `conn` already.
        self.tls = Some(Arc::new(Mutex::new(conn)));
        Ok(())
    }

    fn lock(tls: &Mutex<ServerConnection>) -> std::sync::MutexGuard<'_, ServerConnection> {
        tls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ciphertext the session has to send (taken out under its lock).
    fn take_tls(conn: &mut ServerConnection) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        Ok(out)
    }

    /// Whether the TLS session has something to send.
    fn tls_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| Io::lock(t).wants_write())
    }

    /// Send TLS's `close_notify` (a clean end; errors do not matter).
    fn close_notify(&mut self) {
        if let Some(t) = &self.tls {
            let out = {
                let mut c = Io::lock(t);
                c.send_close_notify();
                Io::take_tls(&mut c)
            };
            if let Ok(out) = out {
                let _ = self.sock.write_all(&out);
            }
        }
    }
}

impl<'a> std::ops::Deref for Io<'a> {
    type Target = Timed<'a>;
    fn deref(&self) -> &Timed<'a> {
        &self.sock
    }
}

impl<'a> std::ops::DerefMut for Io<'a> {
    fn deref_mut(&mut self) -> &mut Timed<'a> {
        &mut self.sock
    }
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.clone() else {
            return self.sock.read(buf);
        };
        loop {
            {
                let mut c = Io::lock(&tls);
                match c.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    r => return r,
                }
                // Nothing decrypted: give rustls what was read (it has room:
                // its plaintext is all taken).
                if self.pos < self.pending.len() {
                    let n = c.read_tls(&mut &self.pending[self.pos..])?;
                    self.pos += n;
                    c.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    continue;
                }
            }
            // Read the socket without the lock: the writer goes on.
            self.pending.resize(32 << 10, 0);
            self.pos = 0;
            let n = match self.sock.read(&mut self.pending) {
                Ok(n) => n,
                Err(e) => {
                    self.pending.clear();
                    return Err(e);
                }
            };
            self.pending.truncate(n);
            if n == 0 {
                // The socket's end: rustls says whether it was clean.
                let mut c = Io::lock(&tls);
                c.read_tls(&mut &[][..])?;
                c.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                return match c.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    r => r,
                };
            }
        }
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = self.tls.clone() else {
            return self.sock.write_vectored(bufs);
        };
        loop {
            // Encrypt what rustls takes (its buffer limit bounds it), then
            // send it without the lock, so the reader is not held up by a
            // slow client.
            let (n, out) = {
                let mut c = Io::lock(&tls);
                let n = c.writer().write_vectored(bufs)?;
                (n, Io::take_tls(&mut c)?)
            };
            self.sock.write_all(&out)?;
            if n > 0 || out.is_empty() || bufs.iter().all(|b| b.is_empty()) {
                return Ok(n);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.clone() {
            let out = Io::take_tls(&mut Io::lock(&tls))?;
            self.sock.write_all(&out)?;
        }
        Ok(())
    }
}

/// One connection: the handshake, then the reader loop (this thread) and
/// the writer (a second thread).
/// Serve one connection: its handshake, then its transmission on this
/// thread and a writer, or handed over to the NICs (`true`: the
/// connection is theirs now, and they count it out when it closes).
fn connection(sh: &Arc<Shared>, sock: TcpStream, id: u64, ip: Option<IpAddr>) -> bool {
    let _ = sock.set_nodelay(true);
    let mut hs = Io::new(&sock);
    // The whole handshake, TLS handshake included, by one deadline.
    hs.deadline = Some(Instant::now() + sh.handshake_timeout);
    let neg = nbd::negotiate_tls(
        &mut hs,
        &sh.exports,
        nbd::HandshakeLimits::default(),
        sh.tls_mode,
        |io| io.start_tls(sh.tls.as_ref()),
    );
    let neg = match neg {
        Ok(n) => n,
        Err(_) => {
            sh.stats.bad_handshakes.fetch_add(1, Relaxed);
            return false;
        }
    };
    hs.deadline = None;
    let Some(&dev) = sh.devs.get(&neg.export.name) else {
        return false;
    };
    let lenient = neg.entered_by == nbd::wire::NBD_OPT_EXPORT_NAME;
    let mut vexport = neg.export.clone();
    if lenient {
        // "Size constraints": a client that learnt no block sizes may use
        // any alignment and up to 32 MiB.
        vexport.block_sizes =
            BlockSizes::new(1, vexport.block_sizes.preferred(), MAX_PAYLOAD).unwrap_or_default();
    }
    let max_transfer = dev.max_transfer().max(DEV_BSIZE) / DEV_BSIZE * DEV_BSIZE;
    if let Some(nc) = sh.nic
        && hs.tls.is_none()
        && !lenient
    {
        // Run to completion: the socket becomes a device of a vCPU.
        drop(hs);
        let p = nic::Params {
            dev,
            vexport,
            structured: neg.structured_replies,
            max_transfer,
        };
        return nc.adopt(id, ip, sock, p).is_ok();
    }
    let conn = Arc::new(Conn {
        replies: Arc::new(ReplyQueue::new()),
        local: Mutex::new(Vec::new()),
        sync: Arc::new(ReplyQueue::new()),
        held: AtomicU64::new(0),
        lenient,
        direct_max: u64::from(neg.export.block_sizes.max()),
        vexport,
        inflight: AtomicU64::new(0),
        reader_done: AtomicBool::new(false),
        structured: neg.structured_replies,
        max_transfer,
        reply_poll: sh.reply_poll,
    });
    let Ok(wsock) = sock.try_clone() else {
        return false;
    };
    let wtls = hs.tls.clone();
    let writer = {
        let (sh, conn) = (Arc::clone(sh), Arc::clone(&conn));
        std::thread::Builder::new()
            .name("nbd-reply".into())
            .stack_size(256 << 10)
            .spawn(move || writer(&sh, &conn, &wsock, wtls))
    };
    let Ok(writer) = writer else {
        return false;
    };
    // Requests arrive in bursts: one `recv` takes many headers (and small
    // payloads); larger payloads bypass the buffer into the DMA memory.
    // (Through TLS the handshake's stream goes on: it may hold ciphertext
    // of the first requests.)
    let mut rd = io::BufReader::with_capacity(64 << 10, hs);
    let _ = reader(sh, &conn, dev, &mut rd);
    conn.reader_done.store(true, SeqCst);
    conn.replies.notify();
    let _ = writer.join();
    let _ = sock.shutdown(Shutdown::Both);
    false
}

type Rd<'a> = io::BufReader<Io<'a>>;

/// Read requests until the client leaves (or must be disconnected).
fn reader(
    sh: &Shared,
    conn: &Conn,
    dev: &'static dyn BlockDev,
    sock: &mut Rd<'_>,
) -> io::Result<()> {
    let mut raw = [0u8; nbd::wire::REQUEST_LEN];
    loop {
        if !read_header(sh, conn, sock, &mut raw)? {
            return Ok(());
        }
        let Ok(req) = Request::parse(&raw) else {
            // Bad magic: the stream is lost. Hard disconnect.
            return Ok(());
        };
        match nbd::validate(
            &req,
            &conn.vexport,
            conn.vexport.block_sizes.max(),
            conn.structured,
        ) {
            Ok(()) => {}
            Err(Validation::Disconnect { .. }) => return Ok(()),
            Err(Validation::Reject { error, drain }) => {
                sock.get_mut().deadline = Some(Instant::now() + sh.io_timeout);
                nbd::discard(sock, u64::from(drain))?;
                sock.get_mut().deadline = None;
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
        let (mut offset, mut len) = (req.offset, u64::from(req.length));
        if conn.lenient && op != ReqOp::Flush {
            let bs = DEV_BSIZE as u64;
            let aligned = offset.is_multiple_of(bs) && len.is_multiple_of(bs);
            match op {
                // Advisory: the whole sectors inside the range.
                ReqOp::Trim if !aligned => {
                    let start = offset.next_multiple_of(bs);
                    let end = (offset + len) / bs * bs;
                    if end <= start {
                        conn.local_push(sh, nbd::simple_reply(req.cookie, Ok(&[])), false);
                        continue;
                    }
                    (offset, len) = (start, end - start);
                }
                ReqOp::Trim => {}
                ReqOp::WriteZeroes if aligned => {}
                ReqOp::WriteZeroes if len > u64::from(MAX_PAYLOAD) => {
                    conn.local_reply(
                        sh,
                        nbd::error_reply(req.cookie, ErrorCode::Inval, conn.structured),
                    );
                    continue;
                }
                _ if aligned && len <= conn.direct_max => {}
                _ => {
                    bounced(sh, conn, dev, &req, op, sock)?;
                    continue;
                }
            }
        }
        // This connection's share, then the pool (the reserve only while
        // the connection stays light).
        let want = sh.budget.charge(op, len, conn.max_transfer);
        let held = sh.budget.acquire(&conn.held, want);
        let mut chunks = Vec::new();
        if op == ReqOp::Write {
            // From admission: the client was not kept waiting before.
            sock.get_mut().deadline = Some(Instant::now() + sh.io_timeout);
            let r = read_payload(sh, dev, conn.max_transfer, len as usize, sock);
            sock.get_mut().deadline = None;
            match r {
                Ok(c) => chunks = c,
                Err(e) => {
                    sh.budget.release(&conn.held, held);
                    return Err(e);
                }
            }
        }
        let breq = Box::new(BlockReq {
            cookie: req.cookie,
            dev,
            op,
            offset,
            len,
            fua: req.flags.contains(CommandFlags::FUA),
            chunks,
            error: None,
            route: 0,
        });
        conn.inflight.fetch_add(1, SeqCst);
        if sh.chan.submit(breq, &conn.replies).is_err() {
            conn.inflight.fetch_sub(1, SeqCst);
            sh.budget.release(&conn.held, held);
            conn.local_reply(
                sh,
                nbd::error_reply(req.cookie, ErrorCode::Shutdown, conn.structured),
            );
        }
    }
}

/// Read a request header. `Ok(false)`: the client closed the connection
/// between requests (or was idle past `--idle-timeout`, or the server is
/// stopping). The header's deadline runs from its first byte.
fn read_header(
    sh: &Shared,
    conn: &Conn,
    sock: &mut Rd<'_>,
    raw: &mut [u8; nbd::wire::REQUEST_LEN],
) -> io::Result<bool> {
    sock.get_mut().deadline = sh.idle_timeout.map(|t| Instant::now() + t);
    let mut got = 0;
    while got < raw.len() {
        match sock.read(&mut raw[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                if got == 0 {
                    sock.get_mut().deadline = Some(Instant::now() + sh.io_timeout);
                }
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if got == 0 && timed_out(&e) => {
                // Idle past --idle-timeout: close, unless replies are owed.
                if sh.stopping.load(Relaxed) || !conn.busy() {
                    if !sh.stopping.load(Relaxed) {
                        eprintln!(
                            "dvma: closing a connection idle for {:?} (--idle-timeout)",
                            sh.idle_timeout.unwrap_or_default()
                        );
                    }
                    return Ok(false);
                }
                sock.get_mut().deadline = sh.idle_timeout.map(|t| Instant::now() + t);
            }
            Err(e) => return Err(e),
        }
    }
    sock.get_mut().deadline = None;
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

/// DMA memory holding `data`, in pieces of at most `max` bytes.
fn dma_copy(
    sh: &Shared,
    dev: &'static dyn BlockDev,
    max: usize,
    data: &[u8],
) -> io::Result<Vec<kern::vm::IoBuf>> {
    let mut chunks = Vec::with_capacity(data.len().div_ceil(max));
    for piece in data.chunks(max) {
        let mut b = alloc_host(sh, dev, piece.len())?;
        b.set_len(piece.len());
        b.as_mut_slice().copy_from_slice(piece);
        chunks.push(b);
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

/// An older client's request that the direct path cannot take (unaligned,
/// or larger than the advertised maximum): served here, one at a time,
/// through a host buffer, holding the connection's whole share until its
/// reply is sent (module docs: older clients).
fn bounced(
    sh: &Shared,
    conn: &Conn,
    dev: &'static dyn BlockDev,
    req: &Request,
    op: ReqOp,
    sock: &mut Rd<'_>,
) -> io::Result<()> {
    let held = sh.budget.acquire(&conn.held, u64::MAX);
    let len = req.length as usize;
    let mut data = Vec::new();
    if op != ReqOp::Read {
        data = vec![0u8; len];
    }
    if op == ReqOp::Write {
        sock.get_mut().deadline = Some(Instant::now() + sh.io_timeout);
        let r = sock.read_exact(&mut data);
        sock.get_mut().deadline = None;
        if let Err(e) = r {
            sh.budget.release(&conn.held, held);
            return Err(e);
        }
    }
    let fua = req.flags.contains(CommandFlags::FUA);
    let r = if op == ReqOp::Read {
        bounce_read(sh, conn, dev, req.offset, len)
    } else {
        bounce_write(sh, conn, dev, req.offset, &data, fua).map(|()| Vec::new())
    };
    let (bytes, failed) = match r {
        Ok(d) if op == ReqOp::Read => {
            let mut v = Vec::with_capacity(64 + d.len());
            nbd::encode_read_reply_header(&mut v, req, conn.structured);
            v.extend_from_slice(&d);
            sh.stats.bytes_read.fetch_add(d.len() as u64, Relaxed);
            (v, false)
        }
        Ok(_) => {
            sh.stats.bytes_written.fetch_add(len as u64, Relaxed);
            (nbd::simple_reply(req.cookie, Ok(&[])), false)
        }
        Err(e) => (
            nbd::error_reply(req.cookie, errcode(e), conn.structured),
            true,
        ),
    };
    sh.stats.requests.fetch_add(1, Relaxed);
    if failed {
        sh.stats.errors.fetch_add(1, Relaxed);
    }
    conn.queue_local(bytes, held);
    Ok(())
}

/// The sectors covering `[offset, offset + len)`, in pieces of at most the
/// direct path's maximum: `(start, length)`.
fn pieces(conn: &Conn, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let bs = DEV_BSIZE as u64;
    let step = (conn.direct_max / bs * bs).max(bs);
    let (start, end) = (offset / bs * bs, (offset + len).next_multiple_of(bs));
    (start..end)
        .step_by(step as usize)
        .map(|p| (p, step.min(end - p)))
        .collect()
}

/// One request of the reader's own, waited for.
fn kernel_io(
    sh: &Shared,
    conn: &Conn,
    dev: &'static dyn BlockDev,
    op: ReqOp,
    (offset, len): (u64, u64),
    fua: bool,
    chunks: Vec<kern::vm::IoBuf>,
) -> Result<Box<BlockReq>, BioError> {
    let breq = Box::new(BlockReq {
        cookie: 0,
        dev,
        op,
        offset,
        len,
        fua,
        chunks,
        error: None,
        route: 0,
    });
    if sh.chan.submit(breq, &conn.sync).is_err() {
        return Err(BioError::Shutdown);
    }
    loop {
        let seen = conn.sync.seq();
        if let Some(r) = conn.sync.pop() {
            return match r.error {
                Some(e) => Err(e),
                None => Ok(r),
            };
        }
        conn.sync
            .wait(seen, Duration::ZERO, Duration::from_millis(100));
    }
}

/// The bytes of `r`'s chunks from `skip` on, `n` of them, into `out`.
fn copy_out(r: &BlockReq, skip: usize, out: &mut Vec<u8>, n: usize) {
    let mut skip = skip;
    let mut left = n;
    for c in &r.chunks {
        let s = c.as_slice();
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let take = (s.len() - skip).min(left);
        out.extend_from_slice(&s[skip..skip + take]);
        left -= take;
        skip = 0;
        if left == 0 {
            break;
        }
    }
}

fn bounce_read(
    sh: &Shared,
    conn: &Conn,
    dev: &'static dyn BlockDev,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, BioError> {
    let mut out = Vec::with_capacity(len);
    let end = offset + len as u64;
    for (p, n) in pieces(conn, offset, len as u64) {
        let r = kernel_io(sh, conn, dev, ReqOp::Read, (p, n), false, Vec::new())?;
        let from = offset.max(p);
        let to = end.min(p + n);
        copy_out(&r, (from - p) as usize, &mut out, (to - from) as usize);
    }
    Ok(out)
}

fn bounce_write(
    sh: &Shared,
    conn: &Conn,
    dev: &'static dyn BlockDev,
    offset: u64,
    data: &[u8],
    fua: bool,
) -> Result<(), BioError> {
    let end = offset + data.len() as u64;
    for (p, n) in pieces(conn, offset, data.len() as u64) {
        let (from, to) = (offset.max(p), end.min(p + n));
        let src = &data[(from - offset) as usize..(to - offset) as usize];
        let mut buf = Vec::with_capacity(n as usize);
        if from == p && to == p + n {
            buf.extend_from_slice(src);
        } else {
            // Read-modify-write of a piece the write covers in part.
            let r = kernel_io(sh, conn, dev, ReqOp::Read, (p, n), false, Vec::new())?;
            copy_out(&r, 0, &mut buf, n as usize);
            drop(r);
            buf[(from - p) as usize..(to - p) as usize].copy_from_slice(src);
        }
        let chunks = dma_copy(sh, dev, conn.max_transfer, &buf).map_err(|_| BioError::Shutdown)?;
        kernel_io(sh, conn, dev, ReqOp::Write, (p, n), fua, chunks)?;
    }
    Ok(())
}

impl Conn {
    /// Queue an error reply made on the host; it holds [`REPLY_COST`]
    /// until sent (waiting for it is the backpressure).
    fn local_reply(&self, sh: &Shared, bytes: Vec<u8>) {
        sh.stats.errors.fetch_add(1, Relaxed);
        self.local_push(sh, bytes, true);
    }

    /// Queue a reply made on the host, charged [`REPLY_COST`].
    fn local_push(&self, sh: &Shared, bytes: Vec<u8>, _error: bool) {
        let held = sh.budget.acquire(&self.held, REPLY_COST);
        self.queue_local(bytes, held);
    }

    /// Queue a reply made on the host that holds `held` credits.
    fn queue_local(&self, bytes: Vec<u8>, held: u64) {
        self.local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((bytes, held));
        self.replies.notify();
    }

    /// Whether the connection has anything in flight or queued.
    fn busy(&self) -> bool {
        self.held.load(Relaxed) > 0 || self.inflight.load(SeqCst) > 0
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
fn writer(sh: &Shared, conn: &Conn, sock: &TcpStream, tls: Option<Arc<Mutex<ServerConnection>>>) {
    let mut broken = false;
    let mut out = Io::new(sock);
    out.tls = tls;
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
                if !broken {
                    out.deadline = Some(Instant::now() + sh.io_timeout);
                    out.close_notify();
                }
                return;
            }
            if !broken && out.tls_pending() {
                // What the reader's TLS owes the client (a key update).
                out.deadline = Some(Instant::now() + sh.io_timeout);
                if out.flush().is_err() {
                    broken = true;
                    let _ = sock.shutdown(Shutdown::Both);
                }
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
            for (l, _) in &local {
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
            // The batch goes out by its deadline, however slowly it is taken.
            out.deadline = Some(Instant::now() + sh.io_timeout);
            if write_all_vectored(&mut out, &mut iov).is_err() {
                // The client is gone or stuck: stop writing, stop its reader,
                // and keep collecting (and freeing) what is in flight.
                broken = true;
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
        let mut freed: u64 = local.iter().map(|(_, c)| c).sum();
        drop(local);
        let mut done = 0u64;
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
            freed += sh.budget.charge(r.op, r.len, conn.max_transfer);
            done += 1;
            drop(r);
        }
        // The batch's memory goes back at once (one lock), before the
        // in-flight count drops, so the reader never sees nothing in flight
        // while credits are still held.
        sh.budget.release(&conn.held, freed);
        conn.inflight.fetch_sub(done, SeqCst);
    }
}

fn write_all_vectored(sock: &mut Io<'_>, mut iov: &mut [IoSlice<'_>]) -> io::Result<()> {
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
