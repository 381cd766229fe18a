//! Accepting connections: the limits (`--max-connections`,
//! `--max-per-addr`, refusals with a reason), the handshake under its
//! deadline, and the hand-over of a negotiated connection to its
//! transmission path: the NICs (run to completion, [`super::nic`]) or a
//! reader and a writer thread ([`super::threads`]).

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn accept_loop(sh: &Arc<Shared>, listener: TcpListener) {
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

/// Refuse a client over a limit: log why (at most once a second), and
/// tell the client in the handshake (`NBD_REP_ERR_POLICY` with the reason)
/// if few refusals are being told already; otherwise just close.
pub(super) fn refuse(sh: &Arc<Shared>, sock: TcpStream, ip: Option<IpAddr>, why: String) {
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
pub(super) fn tell_refusal(sock: &TcpStream, why: &str) -> io::Result<()> {
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

/// One connection: the handshake, then the reader loop (this thread) and
/// the writer (a second thread).
/// Serve one connection: its handshake, then its transmission on this
/// thread and a writer, or handed over to the NICs (`true`: the
/// connection is theirs now, and they count it out when it closes).
pub(super) fn connection(sh: &Arc<Shared>, sock: TcpStream, id: u64, ip: Option<IpAddr>) -> bool {
    let _ = sock.set_nodelay(true);
    if let Some(cc) = &sh.tcp_congestion {
        let _ = machine::host::set_tcp_congestion(std::os::fd::AsFd::as_fd(&sock), cc);
    }
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
