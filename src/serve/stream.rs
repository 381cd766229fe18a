//! The socket as the handshake and the threaded path see it: deadlines
//! that do not restart per byte (`Timed`) and TLS (`Io`, rustls behind a
//! mutex shared by a connection's reader and writer; module docs of
//! [`super`]: TLS), and the TLS configuration from the command line.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A socket whose reads and writes end at a deadline (not a timeout per
/// call, which trickling would restart): the socket's timeout is set to
/// what is left before each call, and a call that times out early is
/// retried. No deadline: calls block (reads) without a timeout.
pub(super) struct Timed<'a> {
    pub(super) sock: &'a TcpStream,
    pub(super) deadline: Option<Instant>,
    /// The timeouts the socket has now (`Some(None)`: none), to skip the
    /// system call when they are close enough.
    pub(super) rset: Option<Option<Duration>>,
    pub(super) wset: Option<Option<Duration>>,
}

impl<'a> Timed<'a> {
    pub(super) fn new(sock: &'a TcpStream) -> Timed<'a> {
        Timed {
            sock,
            deadline: None,
            rset: None,
            wset: None,
        }
    }

    /// The timeout the next call should have; `Err` once the deadline has
    /// passed.
    pub(super) fn left(&self) -> io::Result<Option<Duration>> {
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
pub(super) fn rearm(cur: Option<Option<Duration>>, want: Option<Duration>) -> bool {
    match (cur, want) {
        (None, _) => true,
        (Some(c), None) => c.is_some(),
        (Some(None), Some(_)) => true,
        (Some(Some(c)), Some(w)) => c > w || c < w / 2,
    }
}

pub(super) fn timed_out(e: &io::Error) -> bool {
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
pub(super) fn tls_config(
    a: &ServeArgs,
) -> Result<(nbd::TlsMode, Option<Arc<rustls::ServerConfig>>), TlsError> {
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
            return Err(TlsError::OffWithFiles);
        }
        return Ok((mode, None));
    }
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return Err(TlsError::NeedsCertAndKey);
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: cert.clone() });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.clone(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?;
    let builder = match &a.tls_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let ca_err = |source: Box<dyn std::error::Error + Send + Sync>| TlsError::Ca {
                path: ca.clone(),
                source,
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| ca_err(e.into()))? {
                let c = c.map_err(|e| ca_err(e.into()))?;
                roots.add(c).map_err(|e| ca_err(e.into()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| ca_err(e.into()))?;
            builder.with_client_cert_verifier(v)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(TlsError::CertKey)?;
    Ok((mode, Some(Arc::new(config))))
}

/// A connection's socket as one thread uses it: plain, or through the
/// connection's TLS session (module docs: TLS). Dereferences to its
/// [`Timed`] socket, whose deadline bounds every call.
pub(super) struct Io<'a> {
    pub(super) sock: Timed<'a>,
    /// The TLS session, shared with the connection's other thread.
    pub(super) tls: Option<Arc<Mutex<ServerConnection>>>,
    /// Ciphertext read from the socket and not yet given to rustls.
    pub(super) pending: Vec<u8>,
    pub(super) pos: usize,
}

impl<'a> Io<'a> {
    pub(super) fn new(sock: &'a TcpStream) -> Io<'a> {
        Io {
            sock: Timed::new(sock),
            tls: None,
            pending: Vec::new(),
            pos: 0,
        }
    }

    /// After the `NBD_REP_ACK` to `NBD_OPT_STARTTLS`: the TLS handshake, by
    /// the socket's deadline; from here on this stream speaks TLS.
    pub(super) fn start_tls(
        &mut self,
        config: Option<&Arc<rustls::ServerConfig>>,
    ) -> io::Result<()> {
        let config = config.ok_or_else(|| io::Error::other("TLS is not configured"))?;
        let mut conn = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut self.sock)?;
        }
        // Bytes the client sent after its handshake are in `conn` already.
        self.tls = Some(Arc::new(Mutex::new(conn)));
        Ok(())
    }

    pub(super) fn lock(
        tls: &Mutex<ServerConnection>,
    ) -> std::sync::MutexGuard<'_, ServerConnection> {
        tls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ciphertext the session has to send (taken out under its lock).
    pub(super) fn take_tls(conn: &mut ServerConnection) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        Ok(out)
    }

    /// Whether the TLS session has something to send.
    pub(super) fn tls_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| Io::lock(t).wants_write())
    }

    /// Send TLS's `close_notify` (a clean end; errors do not matter).
    pub(super) fn close_notify(&mut self) {
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
