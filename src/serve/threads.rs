//! The threaded transmission path (`--net threads`; TLS and
//! `NBD_OPT_EXPORT_NAME` clients always): a reader thread per connection
//! parses, validates and admits requests and hands them to the kernel
//! through the `HostChannel`; a writer thread sends the replies, batched,
//! straight from the DMA buffers. Older clients' unaligned or oversized
//! requests are served here through a host bounce buffer (module docs of
//! [`super`]: older clients).

#[allow(clippy::wildcard_imports)]
use super::*;

/// One connection in transmission: what its reader and writer share.
pub(super) struct Conn {
    pub(super) replies: Arc<ReplyQueue>,
    /// Replies made on the host (rejected requests, bounce-buffer
    /// requests), each with the credits it holds.
    pub(super) local: Mutex<Vec<(Vec<u8>, u64)>>,
    /// The reader's own requests (bounce-buffer path), waited for.
    pub(super) sync: Arc<ReplyQueue>,
    /// Credits this connection holds (changed under the budget's lock).
    pub(super) held: AtomicU64,
    /// Entered with `NBD_OPT_EXPORT_NAME`: any alignment, up to 32 MiB.
    pub(super) lenient: bool,
    /// The export as requests are validated against.
    pub(super) vexport: ExportInfo,
    /// Largest read or write on the direct path (the advertised maximum).
    pub(super) direct_max: u64,
    /// Requests in the kernel.
    pub(super) inflight: AtomicU64,
    pub(super) reader_done: AtomicBool,
    pub(super) structured: bool,
    pub(super) max_transfer: usize,
    pub(super) reply_poll: Duration,
}

pub(super) type Rd<'a> = io::BufReader<Io<'a>>;

/// Read requests until the client leaves (or must be disconnected).
pub(super) fn reader(
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
pub(super) fn read_header(
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
pub(super) fn read_payload(
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
pub(super) fn dma_copy(
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
pub(super) fn alloc_host(
    sh: &Shared,
    dev: &'static dyn BlockDev,
    n: usize,
) -> io::Result<kern::vm::IoBuf> {
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
pub(super) fn bounced(
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
pub(super) fn pieces(conn: &Conn, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let bs = DEV_BSIZE as u64;
    let step = (conn.direct_max / bs * bs).max(bs);
    let (start, end) = (offset / bs * bs, (offset + len).next_multiple_of(bs));
    (start..end)
        .step_by(step as usize)
        .map(|p| (p, step.min(end - p)))
        .collect()
}

/// One request of the reader's own, waited for.
pub(super) fn kernel_io(
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
pub(super) fn copy_out(r: &BlockReq, skip: usize, out: &mut Vec<u8>, n: usize) {
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

pub(super) fn bounce_read(
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

pub(super) fn bounce_write(
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
    pub(super) fn local_reply(&self, sh: &Shared, bytes: Vec<u8>) {
        sh.stats.errors.fetch_add(1, Relaxed);
        self.local_push(sh, bytes, true);
    }

    /// Queue a reply made on the host, charged [`REPLY_COST`].
    pub(super) fn local_push(&self, sh: &Shared, bytes: Vec<u8>, _error: bool) {
        let held = sh.budget.acquire(&self.held, REPLY_COST);
        self.queue_local(bytes, held);
    }

    /// Queue a reply made on the host that holds `held` credits.
    pub(super) fn queue_local(&self, bytes: Vec<u8>, held: u64) {
        self.local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((bytes, held));
        self.replies.notify();
    }

    /// Whether the connection has anything in flight or queued.
    pub(super) fn busy(&self) -> bool {
        self.held.load(Relaxed) > 0 || self.inflight.load(SeqCst) > 0
    }
}

/// Most replies gathered into one `writev`.
pub(super) const BATCH: usize = 64;

/// Send replies as the kernel completes requests, until the reader is done
/// and nothing is in flight.
pub(super) fn writer(
    sh: &Shared,
    conn: &Conn,
    sock: &TcpStream,
    tls: Option<Arc<Mutex<ServerConnection>>>,
) {
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
            encode_served_reply(&mut heads, r, conn.structured);
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
            sh.stats.served(&r);
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

pub(super) fn write_all_vectored(sock: &mut Io<'_>, mut iov: &mut [IoSlice<'_>]) -> io::Result<()> {
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
