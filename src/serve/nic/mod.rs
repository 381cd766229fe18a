//! Run to completion: the network as a device of the virtual CPUs.
//!
//! The default transmission path (`--net poll`). After its handshake, a
//! plain connection's socket is made non-blocking and attached to the
//! [`Nic`] of one vCPU (round robin, as receive-side scaling spreads flows).
//! From then on no host thread of its own touches it:
//!
//! ```text
//! client ─TCP─► NIC receive queue (epoll, in the vCPU's hlt)
//!           ─► idle vCPU posts the NIC interrupt on itself (IPL_NET)
//!           ─► blksrv kernel thread: NicChannel::take: recv (non-blocking),
//!              Request::parse, validate, admission (credits), a write's
//!              payload into device DMA memory ─► Buf ─► strategy ─► device
//!           ◄─ completion mode ─► biodone ─► biowait returns
//!           ◄─ NicChannel::complete: reply header + data from the DMA
//!              buffers, writev (non-blocking) from the same kernel thread,
//!              the replies of a burst gathered into one send ([`tx`])
//! ```
//!
//! The NIC's interrupt only says "look" (NAPI): a blksrv thread that looks
//! for work polls its CPU's receive queue itself, so a busy CPU finds new
//! requests without being interrupted, and an idle one is woken by the
//! queue, not by a host thread. A connection's requests are parsed, served
//! and answered on its NIC's CPU only (blksrv's `per_cpu` channel: the
//! interrupt and the baton wake that CPU's threads, never another's), and
//! with the io_uring disk engine their completions interrupt that CPU too,
//! without a signal: nothing crosses CPUs on the way. A reply that the socket does
//! not take at once stays queued on its connection (with the credits it
//! holds) and leaves when the queue reports the socket writable.
//!
//! The rules of the threaded path (module docs of [`super`]) hold here
//! too: credits at admission, a connection over its share is not read
//! (its stalled request waits, and the budget's waker posts the NIC
//! interrupt when credits come back), the same deadlines (checked once
//! a second by a watchdog host thread that shuts down late connections),
//! and shutdown drains every owed reply. TLS connections and clients that
//! entered with `NBD_OPT_EXPORT_NAME` (any alignment, the bounce path)
//! keep the threaded path, as does `--net threads`.
//!
//! # Contexts and locks
//! `NicChannel::take` and `NicChannel::complete` run in blksrv kernel
//! threads. Every host lock they take (a connection's receive or transmit
//! state, a CPU's request queue, the connection table) is held inside a
//! `no_ast` region and never across a sleep: an AST upcall, which may
//! sleep, cannot run while a kernel thread holds a host lock that another
//! kernel thread of the same vCPU might wait for. No interrupt handler
//! takes any of them. The receive state is a [`Combiner`]: a CPU that
//! finds another in a receive pass leaves its pass to that one, which makes
//! one more before it lets go, so two CPUs never wait for each other over
//! one connection's socket and no arrival or end of a connection is left
//! unattended (the loom models of `kern::combine` check the protocol).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use kern::bio::BlockDev;
use kern::blksrv::{BlockReq, ReqOp, RequestChannel};
use kern::combine::Combiner;
use kern::intr::IntrHandle;
use machine::dev::{Nic, NicEvent};
use nbd::{Command, CommandFlags, ErrorCode, ExportInfo, Request, Validation};

use super::{REPLY_COST, Shared, closed, encode_served_reply};

mod diag;
mod tx;

/// Bytes of requests taken from a socket per `recv`.
const RX_BUF: usize = 64 << 10;

/// Most replies gathered into one `writev`.
const TX_BATCH: usize = 64;

/// Most replies a CPU holds back while it has more requests to serve
/// (see "Transmit coalescing" in the module docs).
const TX_DEFER: usize = 32;

/// Replies of at least this many bytes leave at once (a large read's data
/// holds DMA memory and credits).
const TX_DEFER_BYTES: u64 = 64 << 10;

/// How long a closed connection's input is read and dropped before its
/// socket goes (a lingering close).
const LINGER_MS: u64 = 1000;

/// Reads at least this large are dealt out over the CPUs.
const SPREAD_BYTES: u64 = 256 << 10;

/// Events taken from a receive queue at a time.
const EVENTS: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a connection needs to serve its requests.
pub(super) struct Params {
    pub dev: &'static dyn BlockDev,
    pub vexport: ExportInfo,
    pub structured: bool,
    pub max_transfer: usize,
}

/// A request waiting for credits (or for DMA memory).
enum Stalled {
    Req(Request, ReqOp),
    Local(Vec<u8>, bool),
}

/// Where the receive side is in the request stream.
enum Stage {
    /// Between requests, or inside a header.
    Header,
    /// A parsed request that could not be admitted yet.
    Stalled(Stalled),
    /// A write's payload, arriving into its DMA buffers.
    Payload {
        req: Box<BlockReq>,
        chunk: usize,
        off: usize,
    },
    /// A rejected request's payload, thrown away; then its error reply.
    Discard { left: u64, reply: Vec<u8> },
}

struct Rx {
    /// The last receive came back short: the socket is drained for now
    /// (an edge-triggered queue reports the next arrival).
    drained: bool,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    stage: Stage,
    /// The peer sent its last byte (or the connection failed).
    eof: bool,
}

/// A copy of a connection's receive state, for the diagnostics dump.
///
/// The receive state is taken with `try_lock`, and whoever holds it looks
/// again for the receives that found it taken. A host thread that took it
/// just to print it would not look again, and the socket's edge-triggered
/// arrival would be lost for good. So diagnostics read this copy instead.
#[derive(Default)]
struct RxView(AtomicU64);

impl RxView {
    /// Record `rx` (its holder, as it lets go).
    fn set(&self, rx: &Rx) {
        let stage = match rx.stage {
            Stage::Header => 0u64,
            Stage::Stalled(_) => 1,
            Stage::Payload { .. } => 2,
            Stage::Discard { .. } => 3,
        };
        let buffered = (rx.end - rx.start) as u64 & 0xffff_ffff;
        self.0.store(
            stage | u64::from(rx.drained) << 2 | u64::from(rx.eof) << 3 | buffered << 32,
            Relaxed,
        );
    }

    /// `header (0 bytes buffered, drained true, eof false)`.
    fn describe(&self) -> String {
        let v = self.0.load(Relaxed);
        format!(
            "{} ({} bytes buffered, drained {}, eof {})",
            ["header", "stalled", "payload", "discard"][(v & 3) as usize],
            v >> 32,
            v & 4 != 0,
            v & 8 != 0
        )
    }
}

/// One queued reply.
enum Out {
    /// Made on the host (an error, a rejected request), with its credits.
    Local(Vec<u8>, u64),
    /// A request the kernel served: its header, and a read's data in the
    /// request's DMA buffers.
    Done(Box<BlockReq>, Vec<u8>),
}

struct Tx {
    q: VecDeque<Out>,
    /// Bytes of the front reply already sent.
    sent: usize,
    /// The socket failed: replies are dropped (and their credits freed).
    broken: bool,
}

/// A connection on the run-to-completion path.
struct NConn {
    id: u64,
    ip: Option<IpAddr>,
    sock: TcpStream,
    nic: usize,
    p: Params,
    held: AtomicU64,
    /// Requests in the kernel.
    inflight: AtomicU64,
    /// The receive side, advanced by one CPU at a time; a CPU that finds
    /// another at it leaves the pass to that one ([`Combiner`]).
    rx: Combiner<Rx>,
    /// The socket reported new data since the receive side last looked.
    rx_event: AtomicBool,
    /// The peer shut down its sending side.
    peer_closed: AtomicBool,
    /// What `rx` was when its holder last let go, for diagnostics, which
    /// must never take `rx` (see [`RxView`]).
    rx_view: RxView,
    rx_done: AtomicBool,
    tx: Mutex<Tx>,
    /// Queued on the NIC's stalled list.
    stalled: AtomicBool,
    /// On its CPU's list of connections with replies held back.
    tx_deferred: AtomicBool,
    finished: AtomicBool,
    /// Closed, lingering since (ms; 0: not lingering).
    linger: AtomicU64,
    /// Watchdog clocks (ms since the channel's epoch; 0: not running).
    rx_since: AtomicU64,
    tx_since: AtomicU64,
    active: AtomicU64,
}

/// One vCPU's share of the channel.
struct PerCpu {
    nic: Nic,
    /// Connections with replies held back (transmit coalescing), and how
    /// many replies.
    deferred: Mutex<Vec<Arc<NConn>>>,
    ndeferred: AtomicUsize,
    /// The CPU's `nictx` thread sleeps on this; bumped to wake it.
    tx_work: kern::lock::SpinMutex<u32>,
    /// Requests parsed and not yet taken by a blksrv thread.
    reqs: Mutex<VecDeque<Box<BlockReq>>>,
    nreqs: AtomicUsize,
    /// Connections waiting for credits or memory.
    stalled: Mutex<Vec<Arc<NConn>>>,
    /// Credits came back since the stalled list was last looked at.
    retry: AtomicBool,
    vector: OnceLock<IntrHandle>,
}

/// The NIC channel: blksrv's request source on the run-to-completion path.
pub(super) struct NicChannel {
    cpus: Vec<PerCpu>,
    conns: RwLock<HashMap<u64, Arc<NConn>>>,
    next: AtomicUsize,
    /// Where the next large request goes.
    spread: AtomicUsize,
    open: AtomicU64,
    sh: OnceLock<Arc<Shared>>,
    epoch: Instant,
}

impl NicChannel {
    /// A channel over one NIC per vCPU.
    pub(super) fn new(nics: Vec<Nic>) -> NicChannel {
        NicChannel {
            cpus: nics
                .into_iter()
                .map(|nic| PerCpu {
                    nic,
                    deferred: Mutex::new(Vec::new()),
                    ndeferred: AtomicUsize::new(0),
                    tx_work: kern::lock::SpinMutex::new(kern::ipl::Ipl::Net, 0),
                    reqs: Mutex::new(VecDeque::new()),
                    nreqs: AtomicUsize::new(0),
                    stalled: Mutex::new(Vec::new()),
                    retry: AtomicBool::new(false),
                    vector: OnceLock::new(),
                })
                .collect(),
            conns: RwLock::new(HashMap::new()),
            next: AtomicUsize::new(0),
            spread: AtomicUsize::new(0),
            open: AtomicU64::new(0),
            sh: OnceLock::new(),
            epoch: Instant::now(),
        }
    }

    /// Give the channel the server's shared state, and make the budget
    /// wake stalled connections; then start the watchdog.
    pub(super) fn start(&'static self, sh: &Arc<Shared>) -> io::Result<()> {
        let _ = self.sh.set(Arc::clone(sh));
        let _ = sh.budget.waker.set(Box::new(move || self.credits_back()));
        std::thread::Builder::new()
            .name("nbd-watchdog".into())
            .spawn(move || self.watchdog())?;
        Ok(())
    }

    fn sh(&self) -> &Shared {
        self.sh.get().expect("NicChannel::start before use")
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Stop every NIC reporting to its CPU (before the machine shuts down).
    pub(super) fn stop(&self) {
        for pc in &self.cpus {
            pc.nic.stop();
        }
    }

    /// Connections on this path still open.
    pub(super) fn open(&self) -> u64 {
        self.open.load(SeqCst)
    }

    /// Take over a connection after its handshake.
    pub(super) fn adopt(
        &self,
        id: u64,
        ip: Option<IpAddr>,
        sock: TcpStream,
        p: Params,
    ) -> io::Result<()> {
        sock.set_nonblocking(true)?;
        let nic = self.next.fetch_add(1, Relaxed) % self.cpus.len();
        let c = Arc::new(NConn {
            id,
            ip,
            sock,
            nic,
            p,
            held: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            rx: Combiner::new(Rx {
                drained: false,
                buf: vec![0u8; RX_BUF].into_boxed_slice(),
                start: 0,
                end: 0,
                stage: Stage::Header,
                eof: false,
            }),
            rx_event: AtomicBool::new(true),
            peer_closed: AtomicBool::new(false),
            rx_view: RxView::default(),
            rx_done: AtomicBool::new(false),
            tx: Mutex::new(Tx {
                q: VecDeque::new(),
                sent: 0,
                broken: false,
            }),
            stalled: AtomicBool::new(false),
            tx_deferred: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            linger: AtomicU64::new(0),
            rx_since: AtomicU64::new(0),
            tx_since: AtomicU64::new(0),
            active: AtomicU64::new(self.now_ms()),
        });
        let fd = c.sock.as_raw_fd();
        self.conns
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, c);
        self.open.fetch_add(1, SeqCst);
        if let Err(e) = self.cpus[nic].nic.attach(fd, id) {
            self.conns
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            self.open.fetch_sub(1, SeqCst);
            return Err(e);
        }
        // Bytes that arrived before the attach are reported by it; this
        // only makes sure the CPU looks soon.
        self.kick(nic);
        Ok(())
    }

    fn conn(&self, id: u64) -> Option<Arc<NConn>> {
        self.conns
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Make CPU `cpu`'s blksrv look at its NIC (any context but an
    /// interrupt handler's).
    fn kick(&self, cpu: usize) {
        let pc = &self.cpus[cpu];
        pc.retry.store(true, SeqCst);
        if let Some(&v) = pc.vector.get() {
            kern::intr::intr_post(cpu, v);
        }
    }

    /// The budget's waker: credits came back.
    fn credits_back(&self) {
        for (i, pc) in self.cpus.iter().enumerate() {
            if !lock(&pc.stalled).is_empty() {
                self.kick(i);
            }
        }
    }

    /// Look at CPU `cpu`'s NIC: its events, and its stalled connections if
    /// credits came back. Parsed requests land in its queue.
    fn service(&self, cpu: usize) {
        let pc = &self.cpus[cpu];
        if pc.retry.swap(false, SeqCst) {
            let st = std::mem::take(&mut *lock(&pc.stalled));
            for c in st {
                c.stalled.store(false, SeqCst);
                self.sh().budget.stalled.fetch_sub(1, SeqCst);
                // Credits, not the socket: what it holds is still there.
                self.receive(&c, false);
                self.transmit(&c);
            }
        }
        let mut evs = [NicEvent::default(); EVENTS];
        loop {
            let n = pc.nic.poll(&mut evs);
            for e in &evs[..n] {
                let Some(c) = self.conn(e.token) else {
                    continue;
                };
                if c.finished.load(SeqCst) {
                    self.discard_input(&c);
                    continue;
                }
                if e.peer_closed {
                    // Read to the end of stream: a short read no longer
                    // means "nothing more for now".
                    c.peer_closed.store(true, SeqCst);
                }
                if e.readable || e.hangup {
                    self.receive(&c, true);
                }
                if e.writable || e.hangup {
                    self.transmit(&c);
                }
                if e.hangup {
                    c.rx_done.store(true, SeqCst);
                    self.maybe_finish(&c);
                }
            }
            if n < EVENTS {
                break;
            }
        }
    }

    fn pop(&self, cpu: usize) -> Option<Box<BlockReq>> {
        let pc = &self.cpus[cpu];
        if pc.nreqs.load(Acquire) == 0 {
            return None;
        }
        let mut q = lock(&pc.reqs);
        let r = q.pop_front();
        pc.nreqs.store(q.len(), Release);
        r
    }

    fn push(&self, cpu: usize, r: Box<BlockReq>) {
        let pc = &self.cpus[cpu];
        let mut q = lock(&pc.reqs);
        q.push_back(r);
        pc.nreqs.store(q.len(), Release);
    }

    /// Read and parse what `c`'s socket has, and close the connection if
    /// it is done; or leave that to the CPU already at it, which makes one
    /// more pass before it lets go ([`Combiner`]).
    fn receive(&self, c: &Arc<NConn>, event: bool) {
        if event {
            c.rx_event.store(true, SeqCst);
        }
        self.rx_pass(c);
    }

    /// One pass over the receive side: parse what the socket has, then, if
    /// nothing more will be received and nothing is owed, finish the
    /// connection. Every caller passes this same work, so a pass made on
    /// another's behalf does what that caller wanted.
    fn rx_pass(&self, c: &Arc<NConn>) {
        let mut finish = false;
        c.rx.run(|rx| {
            if c.rx_event.swap(false, SeqCst) || c.peer_closed.load(SeqCst) {
                rx.drained = false;
            }
            self.parse(c, rx);
            c.rx_view.set(rx);
            finish |= self.finish_now(c, rx);
        });
        if finish {
            self.finish(c);
        }
    }

    /// Advance the receive side as far as the socket allows.
    fn parse(&self, c: &Arc<NConn>, rx: &mut Rx) {
        loop {
            if c.rx_done.load(SeqCst) {
                return;
            }
            match std::mem::replace(&mut rx.stage, Stage::Header) {
                Stage::Header => {
                    const N: usize = nbd::wire::REQUEST_LEN;
                    if rx.end - rx.start < N {
                        if rx.end - rx.start > 0 && c.rx_since.load(Relaxed) == 0 {
                            c.rx_since.store(self.now_ms(), Relaxed);
                        }
                        if rx.eof || !self.fill(c, rx) {
                            if rx.eof && rx.end - rx.start < N {
                                c.rx_done.store(true, SeqCst);
                            }
                            return;
                        }
                        continue;
                    }
                    let mut raw = [0u8; N];
                    raw.copy_from_slice(&rx.buf[rx.start..rx.start + N]);
                    rx.start += N;
                    c.rx_since.store(0, Relaxed);
                    rx.stage = self.request(c, &raw);
                }
                Stage::Stalled(s) => {
                    rx.stage = self.admit(c, s);
                    if matches!(rx.stage, Stage::Stalled(_)) {
                        return;
                    }
                }
                Stage::Payload {
                    mut req,
                    mut chunk,
                    mut off,
                } => {
                    // From the buffer, then straight from the socket.
                    while chunk < req.chunks.len() {
                        let dst = &mut req.chunks[chunk].as_mut_slice()[off..];
                        let n = if rx.end > rx.start {
                            let n = dst.len().min(rx.end - rx.start);
                            dst[..n].copy_from_slice(&rx.buf[rx.start..rx.start + n]);
                            rx.start += n;
                            n
                        } else if rx.eof {
                            0
                        } else if rx.drained {
                            rx.stage = Stage::Payload { req, chunk, off };
                            return;
                        } else {
                            let want = dst.len();
                            match (&c.sock).read(dst) {
                                Ok(n) => {
                                    rx.drained = n > 0 && n < want && !c.peer_closed.load(SeqCst);
                                    n
                                }
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                    rx.drained = true;
                                    rx.stage = Stage::Payload { req, chunk, off };
                                    return;
                                }
                                Err(_) => 0,
                            }
                        };
                        if n == 0 {
                            // The client left inside a payload.
                            self.abandon(c, &req);
                            rx.eof = true;
                            c.rx_done.store(true, SeqCst);
                            return;
                        }
                        off += n;
                        if off == req.chunks[chunk].len() {
                            chunk += 1;
                            off = 0;
                        }
                    }
                    c.rx_since.store(0, Relaxed);
                    self.submit(c, req);
                }
                Stage::Discard { mut left, reply } => {
                    let n = (left as usize).min(rx.end - rx.start);
                    rx.start += n;
                    left -= n as u64;
                    if left > 0 {
                        if rx.eof || !self.fill(c, rx) {
                            if rx.eof {
                                c.rx_done.store(true, SeqCst);
                            } else {
                                rx.stage = Stage::Discard { left, reply };
                            }
                            return;
                        }
                        rx.stage = Stage::Discard { left, reply };
                        continue;
                    }
                    c.rx_since.store(0, Relaxed);
                    rx.stage = self.admit(c, Stalled::Local(reply, true));
                }
            }
        }
    }

    /// Receive more bytes into the buffer: `false` if none came now (the
    /// socket would block, or it ended: then `rx.eof`).
    fn fill(&self, c: &NConn, rx: &mut Rx) -> bool {
        if rx.drained {
            return false;
        }
        if rx.start > 0 {
            rx.buf.copy_within(rx.start..rx.end, 0);
            rx.end -= rx.start;
            rx.start = 0;
        }
        loop {
            let room = rx.buf.len() - rx.end;
            match (&c.sock).read(&mut rx.buf[rx.end..]) {
                Ok(0) => {
                    rx.eof = true;
                    return false;
                }
                Ok(n) => {
                    rx.drained = n < room && !c.peer_closed.load(SeqCst);
                    rx.end += n;
                    c.active.store(self.now_ms(), Relaxed);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    rx.drained = true;
                    return false;
                }
                Err(_) => {
                    rx.eof = true;
                    return false;
                }
            }
        }
    }

    /// A request header arrived: what comes next.
    fn request(&self, c: &Arc<NConn>, raw: &[u8; nbd::wire::REQUEST_LEN]) -> Stage {
        let Ok(req) = Request::parse(raw) else {
            // Bad magic: the stream is lost. Hard disconnect.
            self.hang_up(c);
            return Stage::Header;
        };
        let p = &c.p;
        match nbd::validate(&req, &p.vexport, p.vexport.block_sizes.max(), p.structured) {
            Ok(()) => {}
            Err(Validation::Disconnect { .. }) => {
                self.hang_up(c);
                return Stage::Header;
            }
            Err(Validation::Reject { error, drain }) => {
                self.sh().stats.errors.fetch_add(1, Relaxed);
                let reply = nbd::error_reply(req.cookie, error, p.structured);
                c.rx_since.store(self.now_ms(), Relaxed);
                return Stage::Discard {
                    left: u64::from(drain),
                    reply,
                };
            }
        }
        let op = match req.command {
            Command::Disc => {
                c.rx_done.store(true, SeqCst);
                return Stage::Header;
            }
            Command::Read => ReqOp::Read,
            Command::Write => ReqOp::Write,
            Command::Flush => ReqOp::Flush,
            Command::Trim => ReqOp::Trim,
            Command::WriteZeroes => ReqOp::WriteZeroes,
            Command::Cache | Command::BlockStatus | Command::Unknown(_) => {
                self.sh().stats.errors.fetch_add(1, Relaxed);
                let reply = nbd::error_reply(req.cookie, ErrorCode::Inval, p.structured);
                return self.admit(c, Stalled::Local(reply, true));
            }
        };
        self.admit(c, Stalled::Req(req, op))
    }

    /// Admission: credits (and a write's DMA memory), or a stall.
    fn admit(&self, c: &Arc<NConn>, s: Stalled) -> Stage {
        let s = match self.try_admit(c, s) {
            Ok(stage) => return stage,
            Err(s) => s,
        };
        // Listed first, then one more try: credits given back between the
        // try above and the listing would wake nobody. (Not a kick to
        // ourselves: with no credits coming back that would spin, and a
        // kernel thread that never sleeps starves the CPU's others, the
        // very ones whose replies would give credits back.)
        if !c.stalled.swap(true, SeqCst) {
            self.sh().budget.stalled.fetch_add(1, SeqCst);
            lock(&self.cpus[c.nic].stalled).push(Arc::clone(c));
        }
        match self.try_admit(c, s) {
            Ok(stage) => stage,
            Err(s) => Stage::Stalled(s),
        }
    }

    /// Admission, or the request back if credits (or DMA memory) are short.
    fn try_admit(&self, c: &Arc<NConn>, s: Stalled) -> Result<Stage, Stalled> {
        let sh = self.sh();
        match s {
            Stalled::Local(bytes, e) => match sh.budget.try_acquire(&c.held, REPLY_COST) {
                Some(held) => {
                    self.queue(c, Out::Local(bytes, held));
                    Ok(Stage::Header)
                }
                None => Err(Stalled::Local(bytes, e)),
            },
            Stalled::Req(req, op) => {
                let len = u64::from(req.length);
                let want = sh.budget.charge(op, len, c.p.max_transfer);
                let Some(held) = sh.budget.try_acquire(&c.held, want) else {
                    return Err(Stalled::Req(req, op));
                };
                let mut chunks = Vec::new();
                if op == ReqOp::Write {
                    let max = c.p.max_transfer;
                    let mut left = len as usize;
                    while left > 0 {
                        let n = left.min(max);
                        let Some(mut b) = c.p.dev.alloc_buf(n) else {
                            // Admitted memory is short only for moments:
                            // look again when credits come back.
                            drop(chunks);
                            sh.budget.release(&c.held, held);
                            return Err(Stalled::Req(req, op));
                        };
                        b.set_len(n);
                        chunks.push(b);
                        left -= n;
                    }
                }
                let breq = Box::new(BlockReq {
                    cookie: req.cookie,
                    dev: c.p.dev,
                    op,
                    offset: req.offset,
                    len,
                    fua: req.flags.contains(CommandFlags::FUA),
                    chunks,
                    error: None,
                    route: c.id as usize,
                });
                if op == ReqOp::Write && len > 0 {
                    // From admission: the client was not kept waiting before.
                    c.rx_since.store(self.now_ms(), Relaxed);
                    Ok(Stage::Payload {
                        req: breq,
                        chunk: 0,
                        off: 0,
                    })
                } else {
                    self.submit(c, breq);
                    Ok(Stage::Header)
                }
            }
        }
    }

    fn submit(&self, c: &NConn, req: Box<BlockReq>) {
        c.inflight.fetch_add(1, SeqCst);
        if req.op == ReqOp::Read && req.len >= SPREAD_BYTES && self.cpus.len() > 1 {
            // A large read keeps a CPU busy for hundreds of microseconds
            // (two copies of its data, into DMA memory and into the
            // socket): deal them out over the CPUs, so that one
            // connection's stream of them uses them all. One cross-CPU
            // wake-up is small beside that. (Not writes: their payload
            // arrived on this CPU, and copying it out elsewhere measured
            // slower.)
            let cpu = self.spread.fetch_add(1, Relaxed) % self.cpus.len();
            self.push(cpu, req);
            if cpu != c.nic {
                self.kick(cpu);
            }
            return;
        }
        self.push(c.nic, req);
    }

    /// A write whose client left in its payload: give everything back.
    fn abandon(&self, c: &NConn, req: &BlockReq) {
        let sh = self.sh();
        sh.budget
            .release(&c.held, sh.budget.charge(req.op, req.len, c.p.max_transfer));
    }

    /// Stop reading: the client broke the protocol or must go.
    fn hang_up(&self, c: &NConn) {
        c.rx_done.store(true, SeqCst);
        let _ = c.sock.shutdown(Shutdown::Read);
    }

    /// Close the connection once nothing is owed either way: no more
    /// requests (`rx_done`), none in the kernel, no reply queued (or the
    /// socket broken). Decided in a receive pass, which every admission
    /// makes too: whoever completes the last request or sends the last
    /// reply calls this, and if another CPU is in a pass, that one looks
    /// again before it lets go.
    fn maybe_finish(&self, c: &Arc<NConn>) {
        if !c.rx_done.load(SeqCst) || c.inflight.load(SeqCst) != 0 {
            return;
        }
        self.rx_pass(c);
    }

    /// In a receive pass: whether the connection is done now (once: it
    /// also marks it finished, and gives back what a half-received write
    /// held).
    fn finish_now(&self, c: &NConn, rx: &mut Rx) -> bool {
        if !c.rx_done.load(SeqCst) || c.inflight.load(SeqCst) != 0 {
            return false;
        }
        {
            let tx = lock(&c.tx);
            if !tx.q.is_empty() && !tx.broken {
                return false;
            }
        }
        if c.finished.swap(true, SeqCst) {
            return false;
        }
        if let Stage::Payload { req, .. } = std::mem::replace(&mut rx.stage, Stage::Header) {
            self.abandon(c, &req);
        }
        true
    }

    /// Close a connection that [`Self::finish_now`] found done. A
    /// lingering close: the FIN goes after the last reply, and what the
    /// client still sends is read and thrown away until it closes (or
    /// LINGER_MS pass). Closing with unread input would send a reset, and
    /// a reset destroys the replies the client has not read yet: executed
    /// writes whose replies it never sees.
    fn finish(&self, c: &NConn) {
        let _ = c.sock.shutdown(Shutdown::Write);
        c.linger.store(self.now_ms(), SeqCst);
        closed(self.sh(), c.id, c.ip);
        self.open.fetch_sub(1, SeqCst);
        self.discard_input(c);
    }

    /// A closed connection's input: read and dropped; at its end (or an
    /// error), the socket goes.
    fn discard_input(&self, c: &NConn) {
        let mut buf = [0u8; 16 << 10];
        loop {
            match (&c.sock).read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break,
            }
        }
        self.drop_conn(c);
    }

    /// Forget a closed connection (its socket closes with the last
    /// reference).
    fn drop_conn(&self, c: &NConn) {
        if c.linger.swap(0, SeqCst) == 0 {
            return;
        }
        self.cpus[c.nic].nic.detach(c.sock.as_raw_fd());
        let _ = c.sock.shutdown(Shutdown::Both);
        self.conns
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&c.id);
    }

    /// Closed connections still lingering.
    pub(super) fn lingering(&self) -> usize {
        self.conns
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|c| c.linger.load(SeqCst) != 0)
            .count()
    }
}

impl RequestChannel for NicChannel {
    fn take(&self) -> Option<Box<BlockReq>> {
        let _na = kern::ast::no_ast();
        let me = kern::cpu::curcpu().index() % self.cpus.len();
        let r = match self.pop(me) {
            Some(r) => Some(r),
            None => {
                self.service(me);
                self.pop(me)
            }
        };
        match &r {
            // A short read or write runs to completion at once: keep
            // gathering replies.
            Some(r) if matches!(r.op, ReqOp::Read | ReqOp::Write) && r.len < TX_DEFER_BYTES => {}
            // The burst is over, or the next request may sleep (a flush,
            // a long transfer): what was held back leaves now.
            _ => self.flush_deferred(me),
        }
        r
    }

    fn pending(&self) -> bool {
        let me = kern::cpu::curcpu_opt().map_or(0, |c| c.index()) % self.cpus.len();
        let pc = &self.cpus[me];
        // Requests parsed, or stalled connections to look at again (`kick`
        // sets `retry` before it posts).
        pc.nreqs.load(Acquire) != 0 || pc.retry.load(SeqCst)
    }

    /// A connection's requests are served by its NIC's CPU (parsed there,
    /// its DMA buffers and completions stay there): no CPU takes another's.
    fn per_cpu(&self) -> bool {
        true
    }

    fn complete(&self, req: Box<BlockReq>) {
        let _na = kern::ast::no_ast();
        let Some(c) = self.conn(req.route as u64) else {
            return;
        };
        let mut head = Vec::with_capacity(32);
        encode_served_reply(&mut head, &req, c.p.structured);
        let me = kern::cpu::curcpu().index() % self.cpus.len();
        let bytes = if req.op == ReqOp::Read { req.len } else { 0 };
        lock(&c.tx).q.push_back(Out::Done(req, head));
        if !self.defer(me, &c, bytes) {
            self.flush_deferred(me);
            self.transmit(&c);
        }
    }

    fn set_interrupt(&self, _cpu: usize, vector: IntrHandle) {
        // Every CPU's NIC posts the one blksrv vector on its own CPU.
        for pc in &self.cpus {
            let _ = pc.vector.set(vector);
            if let Err(e) = pc.nic.set_interrupt(vector) {
                eprintln!("dvma: nic on cpu{}: {e}", pc.nic.cpu());
            }
        }
    }
}
