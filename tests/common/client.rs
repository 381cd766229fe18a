//! A raw NBD client for tests, on the `nbd` crate's encoders and constants.
//!
//! Strict: a reply the spec does not allow (bad magic, an unknown cookie, a
//! simple reply to a read once structured replies are negotiated, a
//! successful structured read that does not cover its range exactly once)
//! is an `InvalidData` error, never silently accepted.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nbd::handshake::InfoRequest;
use nbd::wire::{
    DEFAULT_MAX_PAYLOAD, IHAVEOPT, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
    NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK, NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_ERROR_BIT, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, NBDMAGIC,
};
use nbd::{Command, CommandFlags, OptionHeader, Request};

/// Read and write timeout of every test socket: a missing reply fails the
/// test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A TCP connection with the test timeouts and `TCP_NODELAY`.
pub fn tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads the 18-byte greeting, checks `NBDMAGIC` and `IHAVEOPT`, and returns
/// the handshake flags.
pub fn read_greeting(s: &mut impl Read) -> io::Result<u16> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    let magic = u64::from_be_bytes(g[0..8].try_into().expect("8"));
    let opt = u64::from_be_bytes(g[8..16].try_into().expect("8"));
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(invalid(format!("bad greeting {g:02x?}")));
    }
    Ok(u16::from_be_bytes([g[16], g[17]]))
}

/// The bytes of one option: header and data.
pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = OptionHeader {
        option,
        length: u32::try_from(data.len()).expect("option data fits in 32 bits"),
    }
    .encode()
    .to_vec();
    b.extend_from_slice(data);
    b
}

/// Sends one option.
pub fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    s.write_all(&option_bytes(option, data))
}

/// The data of `NBD_OPT_GO` / `NBD_OPT_INFO`.
pub fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    InfoRequest {
        name,
        requests: infos.to_vec(),
    }
    .encode()
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    /// The option it answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Its data.
    pub data: Vec<u8>,
}

impl OptReply {
    /// Whether the reply type is an error.
    pub fn is_error(&self) -> bool {
        self.reply & NBD_REP_FLAG_ERROR != 0
    }
}

/// Reads one option reply (checks the magic).
pub fn read_opt_reply(s: &mut impl Read) -> io::Result<OptReply> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
    if magic != NBD_REP_MAGIC {
        return Err(invalid(format!("bad option reply magic {magic:#x}")));
    }
    let option = u32::from_be_bytes(h[8..12].try_into().expect("4"));
    let reply = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    if len > 1 << 20 {
        return Err(invalid(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data)?;
    Ok(OptReply {
        option,
        reply,
        data,
    })
}

/// What `NBD_OPT_GO` / `NBD_OPT_INFO` told about an export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportDesc {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
    pub block: Option<(u32, u32, u32)>,
    /// `NBD_INFO_NAME`.
    pub name: Option<String>,
    /// Every `NBD_REP_INFO` type seen, in order.
    pub info_types: Vec<u16>,
}

/// Reads the replies to an `NBD_OPT_GO`/`NBD_OPT_INFO` up to the
/// `NBD_REP_ACK` (`Ok(Ok(desc))`) or the first error reply (`Ok(Err(reply))`).
/// `NBD_INFO_EXPORT` must come before the ACK.
pub fn read_info_replies(
    s: &mut impl Read,
    option: u32,
) -> io::Result<Result<ExportDesc, OptReply>> {
    let mut d = ExportDesc::default();
    let mut have_export = false;
    loop {
        let r = read_opt_reply(s)?;
        if r.option != option {
            return Err(invalid(format!(
                "reply for option {} while waiting for {option}",
                r.option
            )));
        }
        if r.is_error() {
            return Ok(Err(r));
        }
        match r.reply {
            NBD_REP_ACK => {
                if !have_export {
                    return Err(invalid("NBD_REP_ACK without NBD_INFO_EXPORT"));
                }
                return Ok(Ok(d));
            }
            NBD_REP_INFO => {
                if r.data.len() < 2 {
                    return Err(invalid("NBD_REP_INFO shorter than 2 bytes"));
                }
                let t = u16::from_be_bytes([r.data[0], r.data[1]]);
                d.info_types.push(t);
                let b = &r.data[2..];
                match t {
                    NBD_INFO_EXPORT => {
                        if b.len() != 10 {
                            return Err(invalid("NBD_INFO_EXPORT not 12 bytes"));
                        }
                        d.size = u64::from_be_bytes(b[0..8].try_into().expect("8"));
                        d.flags = u16::from_be_bytes([b[8], b[9]]);
                        have_export = true;
                    }
                    NBD_INFO_BLOCK_SIZE => {
                        if b.len() != 12 {
                            return Err(invalid("NBD_INFO_BLOCK_SIZE not 14 bytes"));
                        }
                        let w = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4"));
                        d.block = Some((w(0), w(4), w(8)));
                    }
                    NBD_INFO_NAME => {
                        d.name = Some(String::from_utf8_lossy(b).into_owned());
                    }
                    _ => {}
                }
            }
            other => return Err(invalid(format!("unexpected option reply type {other:#x}"))),
        }
    }
}

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's cookie.
    pub cookie: u64,
    /// 0, or the NBD error value carried (first error chunk for structured).
    pub error: u32,
    /// A successful read's data.
    pub data: Vec<u8>,
    /// It came as structured reply chunks.
    pub structured: bool,
    /// Chunk types received, in order (structured only).
    pub chunks: Vec<u16>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    cmd: u16,
    offset: u64,
    len: u32,
}

#[derive(Debug, Default)]
struct Partial {
    data: Vec<u8>,
    covered: u64,
    error: u32,
    chunks: Vec<u16>,
}

/// A client in the transmission phase.
pub struct Client {
    /// The socket.
    pub sock: TcpStream,
    /// What the handshake said about the export.
    pub desc: ExportDesc,
    /// Structured replies were negotiated.
    pub structured: bool,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    partial: HashMap<u64, Partial>,
}

impl Client {
    /// Connects to `export` with `NBD_OPT_GO` (asking for the block sizes and
    /// the name), simple replies.
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<Client> {
        Client::open(addr, export, false)
    }

    /// Same, after negotiating structured replies.
    pub fn connect_structured(addr: SocketAddr, export: &str) -> io::Result<Client> {
        Client::open(addr, export, true)
    }

    /// Connects to `export`; `structured` negotiates structured replies
    /// first.
    pub fn open(addr: SocketAddr, export: &str, structured: bool) -> io::Result<Client> {
        let mut s = tcp(addr)?;
        read_greeting(&mut s)?;
        s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())?;
        if structured {
            send_option(&mut s, NBD_OPT_STRUCTURED_REPLY, &[])?;
            let r = read_opt_reply(&mut s)?;
            if r.option != NBD_OPT_STRUCTURED_REPLY || r.reply != NBD_REP_ACK {
                return Err(invalid(format!("structured replies refused: {r:?}")));
            }
        }
        send_option(
            &mut s,
            NBD_OPT_GO,
            &go_data(export.as_bytes(), &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]),
        )?;
        match read_info_replies(&mut s, NBD_OPT_GO)? {
            Ok(desc) => Ok(Client::from_stream(s, desc, structured)),
            Err(r) => Err(invalid(format!(
                "NBD_OPT_GO {export:?} refused with {:#x} ({})",
                r.reply,
                String::from_utf8_lossy(&r.data)
            ))),
        }
    }

    /// A client on a stream already in transmission.
    pub fn from_stream(sock: TcpStream, desc: ExportDesc, structured: bool) -> Client {
        Client {
            sock,
            desc,
            structured,
            next_cookie: 0x1000,
            pending: HashMap::new(),
            partial: HashMap::new(),
        }
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.desc.size
    }

    /// The minimum block size (1 if none was advertised).
    pub fn min_block(&self) -> u32 {
        self.desc.block.map_or(1, |b| b.0)
    }

    /// The maximum payload (the protocol default if none was advertised).
    pub fn max_payload(&self) -> u32 {
        self.desc.block.map_or(DEFAULT_MAX_PAYLOAD, |b| b.2)
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// A fresh cookie.
    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a request with a new cookie (and `payload` after it; the
    /// payload may differ from `len` to test the server). Returns the
    /// cookie.
    pub fn send(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.cookie();
        self.send_cookie(cookie, flags, cmd, offset, len, payload)?;
        Ok(cookie)
    }

    /// Sends a request with `cookie`.
    pub fn send_cookie(
        &mut self,
        cookie: u64,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let header = Request {
            flags: CommandFlags(flags),
            command: Command::from_u16(cmd),
            cookie,
            offset,
            length: len,
        }
        .encode();
        if cmd != NBD_CMD_DISC {
            self.pending.insert(cookie, Pending { cmd, offset, len });
        }
        if payload.len() <= 256 * 1024 {
            let mut b = Vec::with_capacity(header.len() + payload.len());
            b.extend_from_slice(&header);
            b.extend_from_slice(payload);
            self.sock.write_all(&b)
        } else {
            self.sock.write_all(&header)?;
            self.sock.write_all(payload)
        }
    }

    /// Registers a request sent as raw bytes on [`Client::sock`], so that
    /// [`Client::recv`] can match its reply.
    pub fn track(&mut self, cookie: u64, cmd: u16, offset: u64, len: u32) {
        self.pending.insert(cookie, Pending { cmd, offset, len });
    }

    /// Forgets a request (one the server is expected never to answer).
    pub fn forget(&mut self, cookie: u64) {
        self.pending.remove(&cookie);
    }

    /// Reads the next complete reply (chunks of other replies that arrive
    /// in between are kept).
    pub fn recv(&mut self) -> io::Result<Reply> {
        loop {
            let mut m = [0u8; 4];
            self.sock.read_exact(&mut m)?;
            match u32::from_be_bytes(m) {
                NBD_SIMPLE_REPLY_MAGIC => {
                    let mut h = [0u8; 12];
                    self.sock.read_exact(&mut h)?;
                    let error = u32::from_be_bytes(h[0..4].try_into().expect("4"));
                    let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                    let p = self.pending.remove(&cookie).ok_or_else(|| {
                        invalid(format!("simple reply for unknown cookie {cookie:#x}"))
                    })?;
                    if self.structured && p.cmd == NBD_CMD_READ {
                        return Err(invalid(
                            "simple reply to NBD_CMD_READ after structured replies were negotiated",
                        ));
                    }
                    let mut data = Vec::new();
                    if p.cmd == NBD_CMD_READ && error == 0 {
                        data = vec![0; p.len as usize];
                        self.sock.read_exact(&mut data)?;
                    }
                    return Ok(Reply {
                        cookie,
                        error,
                        data,
                        structured: false,
                        chunks: Vec::new(),
                    });
                }
                NBD_STRUCTURED_REPLY_MAGIC => {
                    if let Some(r) = self.chunk()? {
                        return Ok(r);
                    }
                }
                other => return Err(invalid(format!("bad reply magic {other:#010x}"))),
            }
        }
    }

    /// One structured chunk (after its magic); the reply when it is done.
    fn chunk(&mut self) -> io::Result<Option<Reply>> {
        if !self.structured {
            return Err(invalid("structured reply without NBD_OPT_STRUCTURED_REPLY"));
        }
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let ty = u16::from_be_bytes([h[2], h[3]]);
        let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
        let len = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let p = *self
            .pending
            .get(&cookie)
            .ok_or_else(|| invalid(format!("chunk for unknown cookie {cookie:#x}")))?;
        if len > p.len.saturating_add(4096 + 64) {
            return Err(invalid(format!(
                "chunk of {len} bytes for a {}-byte request",
                p.len
            )));
        }
        let mut payload = vec![0; len as usize];
        self.sock.read_exact(&mut payload)?;
        let part = self.partial.entry(cookie).or_insert_with(|| Partial {
            data: if p.cmd == NBD_CMD_READ {
                vec![0; p.len as usize]
            } else {
                Vec::new()
            },
            ..Partial::default()
        });
        part.chunks.push(ty);
        let be64 = |b: &[u8]| u64::from_be_bytes(b[0..8].try_into().expect("8"));
        match ty {
            NBD_REPLY_TYPE_NONE => {
                if len != 0 || flags & NBD_REPLY_FLAG_DONE == 0 {
                    return Err(invalid("NBD_REPLY_TYPE_NONE with data or without DONE"));
                }
            }
            NBD_REPLY_TYPE_OFFSET_DATA | NBD_REPLY_TYPE_OFFSET_HOLE => {
                if p.cmd != NBD_CMD_READ {
                    return Err(invalid(format!("content chunk {ty} for command {}", p.cmd)));
                }
                let (off, n) = if ty == NBD_REPLY_TYPE_OFFSET_DATA {
                    if payload.len() < 9 {
                        return Err(invalid("OFFSET_DATA without data"));
                    }
                    (be64(&payload), (payload.len() - 8) as u64)
                } else {
                    if payload.len() != 12 {
                        return Err(invalid("OFFSET_HOLE not 12 bytes"));
                    }
                    let n = u32::from_be_bytes(payload[8..12].try_into().expect("4"));
                    (be64(&payload), u64::from(n))
                };
                if n == 0 || off < p.offset || off + n > p.offset + u64::from(p.len) {
                    return Err(invalid(format!(
                        "content chunk {off}+{n} outside the request {}+{}",
                        p.offset, p.len
                    )));
                }
                let at = (off - p.offset) as usize;
                if ty == NBD_REPLY_TYPE_OFFSET_DATA {
                    part.data[at..at + n as usize].copy_from_slice(&payload[8..]);
                }
                part.covered += n;
            }
            t if t & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
                if payload.len() < 6 {
                    return Err(invalid("error chunk shorter than 6 bytes"));
                }
                let e = u32::from_be_bytes(payload[0..4].try_into().expect("4"));
                let mlen = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
                if e == 0 {
                    return Err(invalid("error chunk with error 0"));
                }
                if 6 + mlen > payload.len() {
                    return Err(invalid("error chunk message longer than the chunk"));
                }
                if part.error == 0 {
                    part.error = e;
                }
            }
            other => return Err(invalid(format!("unknown chunk type {other}"))),
        }
        if flags & NBD_REPLY_FLAG_DONE == 0 {
            return Ok(None);
        }
        let part = self.partial.remove(&cookie).expect("partial");
        self.pending.remove(&cookie);
        if p.cmd == NBD_CMD_READ && part.error == 0 && part.covered != u64::from(p.len) {
            return Err(invalid(format!(
                "successful read reply covers {} of {} bytes",
                part.covered, p.len
            )));
        }
        Ok(Some(Reply {
            cookie,
            error: part.error,
            data: if part.error == 0 {
                part.data
            } else {
                Vec::new()
            },
            structured: true,
            chunks: part.chunks,
        }))
    }

    /// Reads replies until the one for `cookie`; the others must not be
    /// there (this is for one request at a time).
    pub fn wait(&mut self, cookie: u64) -> io::Result<Reply> {
        let r = self.recv()?;
        if r.cookie != cookie {
            return Err(invalid(format!(
                "reply for cookie {:#x} while waiting for {cookie:#x}",
                r.cookie
            )));
        }
        Ok(r)
    }

    /// A request and its reply: `Ok(Ok(data))` or `Ok(Err(errno))`.
    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Result<Vec<u8>, u32>> {
        let c = self.send(flags, cmd, offset, len, payload)?;
        let r = self.wait(c)?;
        Ok(if r.error == 0 {
            Ok(r.data)
        } else {
            Err(r.error)
        })
    }

    /// `NBD_CMD_READ`.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        self.request(0, NBD_CMD_READ, offset, len, &[])
    }

    /// `NBD_CMD_WRITE` with `flags` (e.g. FUA).
    pub fn write_flags(
        &mut self,
        flags: u16,
        offset: u64,
        data: &[u8],
    ) -> io::Result<Result<(), u32>> {
        let len = u32::try_from(data.len()).expect("write fits in 32 bits");
        Ok(self
            .request(flags, NBD_CMD_WRITE, offset, len, data)?
            .map(drop))
    }

    /// `NBD_CMD_WRITE`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<Result<(), u32>> {
        self.write_flags(0, offset, data)
    }

    /// `NBD_CMD_FLUSH`.
    pub fn flush(&mut self) -> io::Result<Result<(), u32>> {
        Ok(self.request(0, NBD_CMD_FLUSH, 0, 0, &[])?.map(drop))
    }

    /// `NBD_CMD_TRIM`.
    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<Result<(), u32>> {
        Ok(self.request(0, NBD_CMD_TRIM, offset, len, &[])?.map(drop))
    }

    /// `NBD_CMD_WRITE_ZEROES` with `flags`.
    pub fn write_zeroes(
        &mut self,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> io::Result<Result<(), u32>> {
        Ok(self
            .request(flags, NBD_CMD_WRITE_ZEROES, offset, len, &[])?
            .map(drop))
    }

    /// `NBD_CMD_DISC`, then waits (briefly) for the server to close.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send_cookie(0, 0, NBD_CMD_DISC, 0, 0, &[])?;
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        let _ = wait_closed(&mut self.sock, Duration::from_secs(10));
        Ok(())
    }
}

/// Waits until the peer closes `s` (EOF or a reset). `Ok` holds the bytes
/// received before the close; `Err` says the connection was still open
/// after `timeout`.
pub fn wait_closed(s: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, String> {
    let _ = s.set_read_timeout(Some(timeout));
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => {
                if got.len() < 1 << 20 {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Ok(got);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "connection still open after {timeout:?} ({e}); received {} bytes: {:02x?}",
                    got.len(),
                    &got[..got.len().min(64)]
                ));
            }
        }
    }
}
