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
use std::os::fd::AsFd;
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

mod accept;
mod error;
pub mod nic;
mod stream;
mod threads;

use accept::*;
pub use error::{FlushError, ServeError, TlsError};
use stream::*;
use threads::*;

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
    /// The TCP congestion control of every connection (`TCP_CONGESTION`):
    /// `system` (the host's default, `net.ipv4.tcp_congestion_control`)
    /// or an algorithm the host allows unprivileged processes
    /// (`net.ipv4.tcp_allowed_congestion_control`). On a host whose
    /// default is BBR, `cubic` serves large reads over loopback faster:
    /// segments of one reply sent from two CPUs reach the client out of
    /// order, and BBR reads that as less bandwidth and paces the flow
    /// (docs/bench/rtc.md: 1 MiB reads at depth 8, +14-59%; nbdkit gains
    /// as much when the host's default is cubic).
    #[arg(long, value_name = "NAME", default_value = "system")]
    pub tcp_congestion: String,
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
    /// Socket sends that carried replies on the run-to-completion path
    /// (fewer than the replies when transmit coalescing gathers them).
    pub tx_sends: AtomicU64,
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
    /// `--tcp-congestion` (`None`: the host's default).
    tcp_congestion: Option<String>,
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

/// `dvma serve`.
pub fn main(a: ServeArgs) -> Result<ExitCode, ServeError> {
    let spec = a.boot.load()?;
    let addr: SocketAddr = a.listen.parse().map_err(|source| ServeError::ListenAddr {
        addr: a.listen.clone(),
        source,
    })?;
    let (tls_mode, tls) = tls_config(&a)?;
    exposure(addr, a.insecure_listen, tls.is_some())?;
    // Signals first, so that every thread created from here on (devices,
    // connections) inherits nothing unexpected and none is missed.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
    ])
    .map_err(ServeError::Signals)?;
    let listener = TcpListener::bind(addr).map_err(|source| ServeError::Listen { addr, source })?;
    let local = listener.local_addr().map_err(ServeError::LocalAddr)?;
    // Checked on the listener (whose accepted sockets inherit it), and set
    // again on each connection.
    let tcp_congestion = (a.tcp_congestion != "system").then(|| a.tcp_congestion.clone());
    if let Some(cc) = &tcp_congestion {
        machine::host::set_tcp_congestion(listener.as_fd(), cc).map_err(|source| {
            ServeError::TcpCongestion {
                name: cc.clone(),
                allowed: std::fs::read_to_string(
                    "/proc/sys/net/ipv4/tcp_allowed_congestion_control",
                )
                .map_or_else(|_| "?".into(), |s| s.trim().to_string()),
                source,
            }
        })?;
    }

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
                .map_err(ServeError::Nic)?;
            let nc: &'static nic::NicChannel = Box::leak(Box::new(nic::NicChannel::new(nics)));
            blksrv_attach(nc, 0, ncpu, a.threads as usize)?;
            nc.attach_tx()?;
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
        e.block_sizes = BlockSizes::new(DEV_BSIZE as u32, 4096, max_payload).map_err(|source| {
            ServeError::Export {
                export: d.name().to_string(),
                source,
            }
        })?;
        e.can_flush = true;
        // A read-only export offers no write command (as nbdkit): no FUA,
        // TRIM or WRITE_ZEROES; FLUSH stays (harmless, and clients use it).
        e.can_fua = !e.read_only;
        e.can_trim = !e.read_only;
        e.can_write_zeroes = !e.read_only;
        // FLUSH is fdatasync of the backing files, after every write the
        // kernel has acknowledged, from whichever connection.
        e.can_multi_conn = true;
        e.check().map_err(|source| ServeError::Export {
            export: d.name().to_string(),
            source,
        })?;
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
        tcp_congestion,
        io_timeout: Duration::from_secs(a.io_timeout),
        idle_timeout: (a.idle_timeout > 0).then(|| Duration::from_secs(a.idle_timeout)),
        refusers: AtomicU32::new(0),
        refusal_log: Mutex::new((None, 0)),
        tls_mode,
        tls,
    });
    if let Some(nc) = nicchan {
        nc.start(&sh).map_err(ServeError::Watchdog)?;
    }
    let acceptor = {
        let sh = Arc::clone(&sh);
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&sh, listener))
            .map_err(ServeError::Accept)?
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
    // Closed connections linger until their clients have read the last
    // replies and closed (nic: a lingering close), at most a second.
    while nicchan.is_some_and(|n| n.open() > 0 || n.lingering() > 0)
        && t0.elapsed() < Duration::from_secs(1)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    chan.stop();
    if let Some(n) = nicchan {
        n.stop();
    }
    let flushed = flush_all(&sys);
    let text = stats_text(&sys, &sh.stats, srv);
    write_stats(&mut seq);
    sys.shutdown().map_err(ServeError::Shutdown)?;
    print!("{text}");
    let _ = io::stdout().flush();
    flushed?;
    eprintln!("dvma: every disk flushed; exiting");
    Ok(ExitCode::SUCCESS)
}

/// No silent exposure: a listener off loopback without TLS is refused,
/// unless `--insecure-listen` says so (then a warning).
fn exposure(addr: SocketAddr, insecure: bool, tls: bool) -> Result<(), ServeError> {
    if addr.ip().is_loopback() || tls {
        return Ok(());
    }
    if !insecure {
        return Err(ServeError::Exposed { addr });
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

/// Append the reply header of a request the kernel served (the error
/// reply, a read's header before its data, or a plain OK); both paths.
fn encode_served_reply(out: &mut Vec<u8>, r: &BlockReq, structured: bool) {
    match (r.error, r.op) {
        (Some(e), _) => out.extend_from_slice(&nbd::error_reply(r.cookie, errcode(e), structured)),
        (None, ReqOp::Read) => {
            let req = Request {
                flags: CommandFlags(0),
                command: Command::Read,
                cookie: r.cookie,
                offset: r.offset,
                length: r.len as u32,
            };
            nbd::encode_read_reply_header(out, &req, structured);
        }
        (None, _) => nbd::encode_simple_reply(out, r.cookie, Ok(&[])),
    }
}

impl NbdStats {
    /// Count a served request whose reply went out.
    fn served(&self, r: &BlockReq) {
        self.requests.fetch_add(1, Relaxed);
        match (r.error, r.op) {
            (Some(_), _) => {
                self.errors.fetch_add(1, Relaxed);
            }
            (None, ReqOp::Read) => {
                self.bytes_read.fetch_add(r.len, Relaxed);
            }
            (None, ReqOp::Write) => {
                self.bytes_written.fetch_add(r.len, Relaxed);
            }
            _ => {}
        }
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

/// Flush every disk (at shutdown), from a kernel thread.
fn flush_all(sys: &System) -> Result<(), ServeError> {
    let failures = sys
        .machine
        .run(0, "flush", move |ctx| {
            let mut errs = Vec::new();
            for d in bdevs() {
                if d.read_only() {
                    continue;
                }
                let dev = d.name().to_string();
                let Ok(mut bp) = getbuf_wait(ctx) else {
                    errs.push(FlushError::Interrupted { dev });
                    continue;
                };
                bp.op = BufOp::Flush;
                let bp = submit_wait(ctx, d, bp);
                if let Some(source) = bp.error {
                    errs.push(FlushError::Bio { dev, source });
                }
            }
            errs
        })
        .map_err(ServeError::FlushRun)?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(ServeError::Flush { failures })
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
        "nbd_tx_sends": n.tx_sends.load(Relaxed),
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
