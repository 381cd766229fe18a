//! `dvma serve` against malformed and hostile clients.
//!
//! A table of cases, one row each: a name, where the connection starts (raw,
//! after the greeting, haggling, or in transmission on an export), the bytes
//! sent, and the exact answer the server must give (the rules of the `nbd`
//! crate's `negotiate`/`validate`, which the server applies: see
//! `crates/nbd/src/handshake.rs` and `crates/nbd/src/transmission.rs`).
//! After every row a witness connection, open since the start, writes and
//! reads back, a new connection reads the same bytes, and the server must be
//! alive with no panic in its output: a bad connection never disturbs
//! another one. A connection that got an error reply must also still work.
//!
//! Plus:
//! * a thousand idle connections, some mid-handshake, while another client
//!   does I/O; closing them gives the server's descriptors back;
//! * real device I/O errors (`RLIMIT_FSIZE` under the server) answered
//!   `NBD_EIO`, on a DMA disk and a file device, with simple and structured
//!   replies, the connection going on;
//! * one connection stalling in a write's payload, or never reading its
//!   replies, must not starve another client (its small I/O is answered
//!   within [`FAIR_WAIT`]).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::client::{
    ExportDesc, go_data, option_bytes, read_info_replies, read_opt_reply, wait_closed,
};
use common::{Client, Rng, Server, ServerOpts, Witness, disk_toml, machine_toml, tcp, test_seed};
use nbd::wire::*;
use nbd::{ErrorCode, MAX_WRITE_DRAIN, Request};

/// Size of the writable export `sd0`. Cases write in the first half; the
/// witness owns the second.
const SIZE: u64 = 16 << 20;
/// Size of the read-only export `sd1`, filled with [`ro_byte`].
const RO_SIZE: u64 = 4 << 20;
/// Cookie of every request a row sends.
const COOKIE: u64 = 0x00c0_ffee_d00d_f00d;

fn ro_byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

fn config() -> ServerOpts {
    let mut text = machine_toml(2, "128M");
    text += &disk_toml("sd0", "16M", "");
    text += "[[disk]]\nname = \"sd1\"\nfile = \"sd1.img\"\nread_only = true\npool = \"16M\"\n";
    let mut opts = ServerOpts::config(&text);
    opts.files
        .push(("sd1.img".into(), (0..RO_SIZE).map(ro_byte).collect()));
    opts
}

/// What every row may depend on, learnt from the server.
struct Env {
    /// `sd0`'s maximum payload.
    max: u32,
}

/// Where a row's connection starts.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Just connected; nothing read.
    Connected,
    /// The greeting read.
    Greeted,
    /// Client flags `FIXED_NEWSTYLE | NO_ZEROES` sent: option haggling.
    Haggling,
    /// In transmission on the export, simple replies.
    Simple(&'static str),
    /// In transmission on the export, structured replies.
    Structured(&'static str),
    /// The row does everything itself.
    Custom,
}

/// The answer a row expects.
enum Expect {
    /// The server closes the connection without sending another byte.
    Disconnect,
    /// The client leaves right after sending; nothing to read.
    Gone,
    /// One option reply (option, reply type); then haggling goes on (GO and
    /// a read work on the same connection).
    OptReply(u32, u32),
    /// `NBD_REP_ACK` for the option, then the server closes.
    AckThenClose(u32),
    /// `NBD_REP_INFO`s and `NBD_REP_ACK` for `NBD_OPT_INFO`, checked; then
    /// haggling goes on.
    Info(fn(&ExportDesc, &Env) -> Result<(), String>),
    /// One reply to [`COOKIE`] carrying this error; then the connection
    /// still works.
    Error(ErrorCode),
    /// One successful reply to [`COOKIE`]; then the connection still works.
    Success,
    /// The row's own check.
    Custom(fn(&Ctx) -> Result<(), String>),
}

struct Ctx<'a> {
    server: &'a Server,
    env: &'a Env,
    /// A 64K area of `sd0` this row may write.
    scratch: u64,
}

struct Case {
    name: &'static str,
    phase: Phase,
    send: fn(&Env) -> Vec<u8>,
    /// Half-close (FIN) after sending: the client is gone mid-message.
    close: bool,
    expect: Expect,
}

fn row(name: &'static str, phase: Phase, send: fn(&Env) -> Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        phase,
        send,
        close: false,
        expect,
    }
}

fn closing(mut c: Case) -> Case {
    c.close = true;
    c
}

fn custom(name: &'static str, f: fn(&Ctx) -> Result<(), String>) -> Case {
    row(name, Phase::Custom, |_| Vec::new(), Expect::Custom(f))
}

/// A request header with [`COOKIE`].
fn req(flags: u16, cmd: u16, offset: u64, len: u32) -> Vec<u8> {
    Request {
        flags: nbd::CommandFlags(flags),
        command: nbd::Command::from_u16(cmd),
        cookie: COOKIE,
        offset,
        length: len,
    }
    .encode()
    .to_vec()
}

/// A request header followed by `payload` bytes of payload.
fn req_with(flags: u16, cmd: u16, offset: u64, len: u32, payload: usize) -> Vec<u8> {
    let mut b = req(flags, cmd, offset, len);
    let mut r = Rng::new(offset ^ u64::from(len));
    let start = b.len();
    b.resize(start + payload, 0);
    r.fill(&mut b[start..]);
    b
}

/// A write request with its whole payload.
fn write(flags: u16, offset: u64, len: u32) -> Vec<u8> {
    req_with(flags, NBD_CMD_WRITE, offset, len, len as usize)
}

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    option_bytes(option, data)
}

/// An option header announcing `len` bytes, without the data.
fn opt_header(option: u32, len: u32) -> Vec<u8> {
    nbd::OptionHeader {
        option,
        length: len,
    }
    .encode()
    .to_vec()
}

const UNSUP: u32 = NBD_REP_ERR_UNSUP;
const INVALID: u32 = NBD_REP_ERR_INVALID;

fn handshake_cases() -> Vec<Case> {
    use Expect::*;
    use Phase::*;
    vec![
        // --- before and around the client flags --------------------------
        row(
            "gone before reading the greeting",
            Connected,
            |_| vec![],
            Gone,
        ),
        row("gone after the greeting", Greeted, |_| vec![], Gone),
        row(
            "client flags: unknown bit 2",
            Greeted,
            |_| be32(NBD_FLAG_C_FIXED_NEWSTYLE | 4),
            Disconnect,
        ),
        row(
            "client flags: bit 31",
            Greeted,
            |_| be32(0x8000_0001),
            Disconnect,
        ),
        row(
            "client flags: all ones",
            Greeted,
            |_| be32(u32::MAX),
            Disconnect,
        ),
        closing(row(
            "client flags truncated, then EOF",
            Greeted,
            |_| vec![0, 0],
            Disconnect,
        )),
        row(
            "an option instead of the client flags",
            Greeted,
            |_| opt(NBD_OPT_LIST, &[]),
            Disconnect,
        ),
        // --- option framing ------------------------------------------------
        row(
            "option with bad magic",
            Haggling,
            |_| {
                let mut b = b"IHAVEOPX".to_vec();
                b.extend(be32(NBD_OPT_LIST));
                b.extend(be32(0));
                b
            },
            Disconnect,
        ),
        row(
            "transmission request during haggling",
            Haggling,
            |_| req(0, NBD_CMD_READ, 0, 4096),
            Disconnect,
        ),
        closing(row(
            "option header truncated, then EOF",
            Haggling,
            |_| opt(NBD_OPT_LIST, &[])[..10].to_vec(),
            Disconnect,
        )),
        closing(row(
            "option data truncated, then EOF",
            Haggling,
            |_| {
                let mut b = opt_header(NBD_OPT_GO, 100);
                b.extend_from_slice(&[0u8; 20]);
                b
            },
            Disconnect,
        )),
        row("gone while haggling", Haggling, |_| vec![], Gone),
        row(
            "option length over the discard limit (2 MiB)",
            Haggling,
            |_| opt_header(0x1234, 2 << 20),
            Disconnect,
        ),
        row(
            "option length 0xffffffff",
            Haggling,
            |_| opt_header(NBD_OPT_INFO, u32::MAX),
            Disconnect,
        ),
        // --- options the server does not implement -------------------------
        row(
            "unknown option",
            Haggling,
            |_| opt(0x1234, &[]),
            OptReply(0x1234, UNSUP),
        ),
        row(
            "unknown option with data",
            Haggling,
            |_| opt(0x7fff_ffff, &[0x5a; 300]),
            OptReply(0x7fff_ffff, UNSUP),
        ),
        row(
            "unknown option with 200 KiB of data (discarded)",
            Haggling,
            |_| opt(0x4242, &vec![7u8; 200 << 10]),
            OptReply(0x4242, UNSUP),
        ),
        row(
            "NBD_OPT_PEEK_EXPORT (withdrawn)",
            Haggling,
            |_| opt(NBD_OPT_PEEK_EXPORT, &[]),
            OptReply(NBD_OPT_PEEK_EXPORT, UNSUP),
        ),
        row(
            "NBD_OPT_STARTTLS (no TLS)",
            Haggling,
            |_| opt(NBD_OPT_STARTTLS, &[]),
            OptReply(NBD_OPT_STARTTLS, UNSUP),
        ),
        row(
            "NBD_OPT_LIST_META_CONTEXT",
            Haggling,
            |_| {
                opt(
                    NBD_OPT_LIST_META_CONTEXT,
                    &[0, 0, 0, 3, b's', b'd', b'0', 0, 0, 0, 0],
                )
            },
            OptReply(NBD_OPT_LIST_META_CONTEXT, UNSUP),
        ),
        row(
            "NBD_OPT_SET_META_CONTEXT base:allocation",
            Haggling,
            |_| {
                let mut d = be32(3);
                d.extend_from_slice(b"sd0");
                d.extend(be32(1));
                d.extend(be32(15));
                d.extend_from_slice(b"base:allocation");
                opt(NBD_OPT_SET_META_CONTEXT, &d)
            },
            OptReply(NBD_OPT_SET_META_CONTEXT, UNSUP),
        ),
        row(
            "NBD_OPT_EXTENDED_HEADERS",
            Haggling,
            |_| opt(NBD_OPT_EXTENDED_HEADERS, &[]),
            OptReply(NBD_OPT_EXTENDED_HEADERS, UNSUP),
        ),
        // --- NBD_OPT_EXPORT_NAME: no error reply possible ------------------
        row(
            "NBD_OPT_EXPORT_NAME of an unknown export",
            Haggling,
            |_| opt(NBD_OPT_EXPORT_NAME, b"nosuch"),
            Disconnect,
        ),
        row(
            "NBD_OPT_EXPORT_NAME not UTF-8",
            Haggling,
            |_| opt(NBD_OPT_EXPORT_NAME, &[0xff, 0xfe, 0x00]),
            Disconnect,
        ),
        row(
            "NBD_OPT_EXPORT_NAME longer than 64 KiB",
            Haggling,
            |_| opt_header(NBD_OPT_EXPORT_NAME, 70_000),
            Disconnect,
        ),
        custom(
            "NBD_OPT_EXPORT_NAME without NO_ZEROES: 124 zeroes",
            export_name_zeroes,
        ),
        // --- NBD_OPT_GO / NBD_OPT_INFO -------------------------------------
        row(
            "NBD_OPT_GO of an unknown export",
            Haggling,
            |_| opt(NBD_OPT_GO, &go_data(b"sd9", &[])),
            OptReply(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN),
        ),
        row(
            "NBD_OPT_INFO of an unknown export",
            Haggling,
            |_| opt(NBD_OPT_INFO, &go_data(b"nosuch", &[NBD_INFO_BLOCK_SIZE])),
            OptReply(NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN),
        ),
        row(
            "NBD_OPT_GO with 3 bytes of data",
            Haggling,
            |_| opt(NBD_OPT_GO, &[0, 0, 0]),
            OptReply(NBD_OPT_GO, INVALID),
        ),
        row(
            "NBD_OPT_GO name length beyond the data",
            Haggling,
            |_| {
                let mut d = be32(1000);
                d.extend_from_slice(b"sd0\0\0");
                opt(NBD_OPT_GO, &d)
            },
            OptReply(NBD_OPT_GO, INVALID),
        ),
        row(
            "NBD_OPT_GO information count larger than the list",
            Haggling,
            |_| {
                let mut d = go_data(b"sd0", &[NBD_INFO_BLOCK_SIZE]);
                let n = d.len();
                d[n - 4..n - 2].copy_from_slice(&3u16.to_be_bytes());
                opt(NBD_OPT_GO, &d)
            },
            OptReply(NBD_OPT_GO, INVALID),
        ),
        row(
            "NBD_OPT_INFO with trailing garbage",
            Haggling,
            |_| {
                let mut d = go_data(b"sd0", &[]);
                d.push(0x99);
                opt(NBD_OPT_INFO, &d)
            },
            OptReply(NBD_OPT_INFO, INVALID),
        ),
        row(
            "NBD_OPT_GO name containing NUL",
            Haggling,
            |_| opt(NBD_OPT_GO, &go_data(b"sd\x000", &[])),
            OptReply(NBD_OPT_GO, INVALID),
        ),
        row(
            "NBD_OPT_GO name not UTF-8",
            Haggling,
            |_| opt(NBD_OPT_GO, &go_data(&[0xc3, 0x28], &[])),
            OptReply(NBD_OPT_GO, INVALID),
        ),
        row(
            "NBD_OPT_GO name longer than 4096 bytes",
            Haggling,
            |_| opt(NBD_OPT_GO, &go_data(&[b's'; 5000], &[])),
            OptReply(NBD_OPT_GO, INVALID),
        ),
        row(
            "NBD_OPT_GO with 100 KiB of data",
            Haggling,
            |_| opt(NBD_OPT_GO, &go_data(&vec![b'a'; 100 << 10], &[])),
            OptReply(NBD_OPT_GO, NBD_REP_ERR_TOO_BIG),
        ),
        row(
            "NBD_OPT_INFO sd0 (block size, name)",
            Haggling,
            |_| {
                opt(
                    NBD_OPT_INFO,
                    &go_data(b"sd0", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]),
                )
            },
            Info(|d, env| {
                check_sd0(d, env, false)?;
                if d.name.as_deref() != Some("sd0") {
                    return Err(format!("NBD_INFO_NAME {:?}", d.name));
                }
                Ok(())
            }),
        ),
        row(
            "NBD_OPT_INFO with unknown information types (ignored)",
            Haggling,
            |_| opt(NBD_OPT_INFO, &go_data(b"sd0", &[0x7777, 0xffff, 0x7777])),
            Info(|d, env| {
                check_sd0(d, env, false)?;
                if d.info_types.iter().any(|t| *t > NBD_INFO_BLOCK_SIZE) {
                    return Err(format!("unknown info types echoed: {:?}", d.info_types));
                }
                Ok(())
            }),
        ),
        row(
            "NBD_OPT_INFO of the read-only export",
            Haggling,
            |_| opt(NBD_OPT_INFO, &go_data(b"sd1", &[NBD_INFO_BLOCK_SIZE])),
            Info(|d, _| {
                if d.size != RO_SIZE {
                    return Err(format!("size {} != {RO_SIZE}", d.size));
                }
                if d.flags & NBD_FLAG_READ_ONLY == 0 || d.flags & NBD_FLAG_HAS_FLAGS == 0 {
                    return Err(format!("flags {:#06x} without READ_ONLY", d.flags));
                }
                // As nbdkit: a read-only export offers no write command.
                let writes = NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FUA;
                if d.flags & writes != 0 {
                    return Err(format!(
                        "read-only export advertises TRIM, WRITE_ZEROES or FUA: flags {:#06x}",
                        d.flags
                    ));
                }
                Ok(())
            }),
        ),
        custom(
            "NBD_OPT_STRUCTURED_REPLY, then INFO shows SEND_DF",
            structured_then_info,
        ),
        // --- NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_ABORT ---------
        row(
            "NBD_OPT_LIST with data",
            Haggling,
            |_| opt(NBD_OPT_LIST, b"sd0"),
            OptReply(NBD_OPT_LIST, INVALID),
        ),
        custom("NBD_OPT_LIST names every export", list_exports),
        row(
            "NBD_OPT_STRUCTURED_REPLY with data",
            Haggling,
            |_| opt(NBD_OPT_STRUCTURED_REPLY, &[1, 2, 3, 4]),
            OptReply(NBD_OPT_STRUCTURED_REPLY, INVALID),
        ),
        row(
            "NBD_OPT_ABORT",
            Haggling,
            |_| opt(NBD_OPT_ABORT, &[]),
            AckThenClose(NBD_OPT_ABORT),
        ),
        row(
            "NBD_OPT_ABORT with data",
            Haggling,
            |_| opt(NBD_OPT_ABORT, b"bye"),
            AckThenClose(NBD_OPT_ABORT),
        ),
        row(
            "NBD_OPT_ABORT, client gone before the ACK",
            Haggling,
            |_| opt(NBD_OPT_ABORT, &[]),
            Gone,
        ),
        custom("1100 unknown options in a row", many_options),
    ]
}

fn check_sd0(d: &ExportDesc, env: &Env, structured: bool) -> Result<(), String> {
    if d.size != SIZE {
        return Err(format!("size {} != {SIZE}", d.size));
    }
    let need = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_CAN_MULTI_CONN
        | if structured { NBD_FLAG_SEND_DF } else { 0 };
    let never = NBD_FLAG_READ_ONLY
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_SEND_RESIZE
        | NBD_FLAG_BLOCK_STATUS_PAYLOAD
        | if structured { 0 } else { NBD_FLAG_SEND_DF };
    if d.flags & need != need || d.flags & never != 0 {
        return Err(format!(
            "transmission flags {:#06x}: need {need:#06x}, never {never:#06x}",
            d.flags
        ));
    }
    match d.block {
        Some((512, 4096, max)) if max == env.max && (4096..=1 << 25).contains(&max) => Ok(()),
        b => Err(format!("block sizes {b:?}, want (512, 4096, 4096..=32M)")),
    }
}

fn transmission_cases() -> Vec<Case> {
    use Expect::*;
    use Phase::*;
    use nbd::ErrorCode::{Inval, NoSpc, Overflow, Perm};
    let s = Simple("sd0");
    let st = Structured("sd0");
    let ro = Simple("sd1");
    vec![
        // --- framing -------------------------------------------------------
        row(
            "request with bad magic",
            s,
            |_| {
                let mut b = req(0, NBD_CMD_READ, 0, 4096);
                b[0] ^= 0x80;
                b
            },
            Disconnect,
        ),
        row(
            "request with NBD_EXTENDED_REQUEST_MAGIC (not negotiated)",
            s,
            |_| {
                let mut b = req(0, NBD_CMD_READ, 0, 4096);
                b[0..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
                b.extend_from_slice(&[0u8; 4]);
                b
            },
            Disconnect,
        ),
        closing(row(
            "request header truncated, then EOF",
            s,
            |_| req(0, NBD_CMD_READ, 0, 4096)[..14].to_vec(),
            Disconnect,
        )),
        row(
            "NBD_CMD_DISC: closed, no reply",
            s,
            |_| req(0, NBD_CMD_DISC, 0, 0),
            Disconnect,
        ),
        row(
            "NBD_CMD_DISC with flags, offset and length set",
            s,
            |_| req(0xffff, NBD_CMD_DISC, 12345, 777),
            Disconnect,
        ),
        // --- bounds --------------------------------------------------------
        row(
            "read at the end",
            s,
            |_| req(0, NBD_CMD_READ, SIZE, 4096),
            Error(Inval),
        ),
        row(
            "read straddling the end",
            s,
            |_| req(0, NBD_CMD_READ, SIZE - 512, 1024),
            Error(Inval),
        ),
        row(
            "read far past the end",
            s,
            |_| req(0, NBD_CMD_READ, 1 << 40, 4096),
            Error(Inval),
        ),
        row(
            "read with offset + length overflowing 64 bits",
            s,
            |_| req(0, NBD_CMD_READ, u64::MAX - 511, 1024),
            Error(Inval),
        ),
        row(
            "write at the end",
            s,
            |_| write(0, SIZE, 4096),
            Error(NoSpc),
        ),
        custom(
            "write straddling the end: ENOSPC, nothing written",
            write_straddling_end,
        ),
        row(
            "write with offset + length overflowing 64 bits",
            s,
            |_| write(0, u64::MAX - 511, 1024),
            Error(Inval),
        ),
        row(
            "trim past the end",
            s,
            |_| req(0, NBD_CMD_TRIM, SIZE, 4096),
            Error(Inval),
        ),
        row(
            "trim straddling the end",
            s,
            |_| req(0, NBD_CMD_TRIM, SIZE - 4096, 8192),
            Error(Inval),
        ),
        row(
            "write zeroes past the end",
            s,
            |_| req(0, NBD_CMD_WRITE_ZEROES, SIZE, 4096),
            Error(NoSpc),
        ),
        row(
            "write zeroes straddling the end",
            s,
            |_| req(0, NBD_CMD_WRITE_ZEROES, SIZE - 512, 1024),
            Error(NoSpc),
        ),
        // --- alignment (minimum block 512) and zero lengths ----------------
        row(
            "read at an unaligned offset",
            s,
            |_| req(0, NBD_CMD_READ, 1, 512),
            Error(Inval),
        ),
        row(
            "read of an unaligned length",
            s,
            |_| req(0, NBD_CMD_READ, 0, 100),
            Error(Inval),
        ),
        row(
            "write at an unaligned offset (payload drained)",
            s,
            |_| write(0, 100, 512),
            Error(Inval),
        ),
        row(
            "write of an unaligned length (payload drained)",
            s,
            |_| write(0, 0, 1000),
            Error(Inval),
        ),
        row(
            "trim unaligned",
            s,
            |_| req(0, NBD_CMD_TRIM, 0, 100),
            Error(Inval),
        ),
        row(
            "write zeroes unaligned",
            s,
            |_| req(0, NBD_CMD_WRITE_ZEROES, 256, 512),
            Error(Inval),
        ),
        row(
            "read of length 0",
            s,
            |_| req(0, NBD_CMD_READ, 0, 0),
            Error(Inval),
        ),
        row(
            "write of length 0",
            s,
            |_| req(0, NBD_CMD_WRITE, 0, 0),
            Error(Inval),
        ),
        row(
            "trim of length 0",
            s,
            |_| req(0, NBD_CMD_TRIM, 0, 0),
            Error(Inval),
        ),
        row(
            "write zeroes of length 0",
            s,
            |_| req(0, NBD_CMD_WRITE_ZEROES, 0, 0),
            Error(Inval),
        ),
        // --- commands ------------------------------------------------------
        row("unknown command 9", s, |_| req(0, 9, 0, 4096), Error(Inval)),
        row(
            "unknown command 0xffff",
            s,
            |_| req(0, 0xffff, 0, 4096),
            Error(Inval),
        ),
        row(
            "NBD_CMD_CACHE (not advertised)",
            s,
            |_| req(0, NBD_CMD_CACHE, 0, 4096),
            Error(Inval),
        ),
        row(
            "NBD_CMD_BLOCK_STATUS (no meta context)",
            s,
            |_| req(0, NBD_CMD_BLOCK_STATUS, 0, 4096),
            Error(Inval),
        ),
        row(
            "NBD_CMD_RESIZE (not negotiated)",
            s,
            |_| req(0, NBD_CMD_RESIZE, 0, 0),
            Error(Inval),
        ),
        // --- flags ---------------------------------------------------------
        row(
            "read with flag bit 5 (PAYLOAD_LEN, not negotiated)",
            s,
            |_| req(NBD_CMD_FLAG_PAYLOAD_LEN, NBD_CMD_READ, 0, 4096),
            Error(Inval),
        ),
        row(
            "write with flag bit 15 (payload drained)",
            s,
            |_| write(0x8000, 0, 4096),
            Error(Inval),
        ),
        row(
            "read with DF without structured replies",
            s,
            |_| req(NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 4096),
            Error(Inval),
        ),
        row(
            "write with NO_HOLE (payload drained)",
            s,
            |_| write(NBD_CMD_FLAG_NO_HOLE, 0, 4096),
            Error(Inval),
        ),
        row(
            "read with REQ_ONE",
            s,
            |_| req(NBD_CMD_FLAG_REQ_ONE, NBD_CMD_READ, 0, 4096),
            Error(Inval),
        ),
        row(
            "write zeroes with FAST_ZERO (not advertised)",
            s,
            |_| req(NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES, 0, 4096),
            Error(Inval),
        ),
        row(
            "trim with NO_HOLE",
            s,
            |_| req(NBD_CMD_FLAG_NO_HOLE, NBD_CMD_TRIM, 0, 4096),
            Error(Inval),
        ),
        row(
            "flush with DF",
            s,
            |_| req(NBD_CMD_FLAG_DF, NBD_CMD_FLUSH, 0, 0),
            Error(Inval),
        ),
        row(
            "read with FUA (allowed on every command)",
            s,
            |_| req(NBD_CMD_FLAG_FUA, NBD_CMD_READ, 0, 4096),
            Success,
        ),
        row(
            "flush with FUA",
            s,
            |_| req(NBD_CMD_FLAG_FUA, NBD_CMD_FLUSH, 0, 0),
            Success,
        ),
        row(
            "write zeroes with NO_HOLE | FUA",
            s,
            |_| {
                req(
                    NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
                    NBD_CMD_WRITE_ZEROES,
                    0,
                    8192,
                )
            },
            Success,
        ),
        row(
            "flush with a nonzero offset",
            s,
            |_| req(0, NBD_CMD_FLUSH, 4096, 0),
            Error(Inval),
        ),
        row(
            "flush with a nonzero length",
            s,
            |_| req(0, NBD_CMD_FLUSH, 0, 4096),
            Error(Inval),
        ),
        custom(
            "write zeroes and trim really zero / succeed",
            write_zeroes_zeroes,
        ),
        // --- sizes beyond the maximum payload ------------------------------
        row(
            "read longer than the maximum payload",
            s,
            |e| req(0, NBD_CMD_READ, 0, e.max + 512),
            Error(Inval),
        ),
        row(
            "read of exactly the maximum payload",
            s,
            |e| req(0, NBD_CMD_READ, 0, e.max),
            Success,
        ),
        row(
            "write of exactly the maximum payload",
            s,
            |e| write(0, 0, e.max),
            Success,
        ),
        custom("a request dribbled in 1 to 9 byte pieces", dribbled),
        custom(
            "write longer than the maximum payload: drained or disconnected",
            oversize_write,
        ),
        row(
            "write header of 64 MiB + 512 (too long to drain)",
            s,
            |e| req(0, NBD_CMD_WRITE, 0, e.max.max(MAX_WRITE_DRAIN) + 512),
            Disconnect,
        ),
        row(
            "write header of 0xfffffe00 bytes",
            s,
            |_| req(0, NBD_CMD_WRITE, 0, 0xffff_fe00),
            Disconnect,
        ),
        // --- clients that leave --------------------------------------------
        custom(
            "write payload truncated, then EOF: nothing written",
            truncated_write,
        ),
        custom("64 reads in flight, client gone", reads_then_gone),
        custom("writes in flight, client gone", writes_then_gone),
        custom("pipelined mix of good and bad requests", pipelined_mix),
        // --- structured replies --------------------------------------------
        row(
            "structured: read longer than the maximum payload",
            st,
            |e| req(0, NBD_CMD_READ, 0, e.max + 512),
            Error(Overflow),
        ),
        row(
            "structured: read past the end",
            st,
            |_| req(0, NBD_CMD_READ, SIZE, 512),
            Error(Inval),
        ),
        row(
            "structured: write with DF (payload drained)",
            st,
            |_| write(NBD_CMD_FLAG_DF, 0, 4096),
            Error(Inval),
        ),
        row(
            "structured: write past the end",
            st,
            |_| write(0, SIZE, 4096),
            Error(NoSpc),
        ),
        row(
            "structured: unknown command",
            st,
            |_| req(0, 0x4000, 0, 512),
            Error(Inval),
        ),
        custom("structured: read with DF is one data chunk", structured_df),
        // --- the read-only export ------------------------------------------
        row(
            "read-only: write (payload drained)",
            ro,
            |_| write(0, 0, 65536),
            Error(Perm),
        ),
        row(
            "read-only: write with FUA (not advertised: EINVAL)",
            ro,
            |_| write(NBD_CMD_FLAG_FUA, 4096, 4096),
            Error(Inval),
        ),
        row(
            "read-only: write past the end (EPERM first)",
            ro,
            |_| write(0, RO_SIZE, 4096),
            Error(Perm),
        ),
        row(
            "read-only: write unaligned (EPERM first)",
            ro,
            |_| write(0, 1, 511),
            Error(Perm),
        ),
        row(
            "read-only: trim (not advertised: EINVAL)",
            ro,
            |_| req(0, NBD_CMD_TRIM, 0, 4096),
            Error(Inval),
        ),
        row(
            "read-only: write zeroes (not advertised: EINVAL)",
            ro,
            |_| req(0, NBD_CMD_WRITE_ZEROES, 0, 4096),
            Error(Inval),
        ),
        row(
            "read-only: write with an unknown flag (EINVAL first)",
            ro,
            |_| write(0x0100, 0, 512),
            Error(Inval),
        ),
        row(
            "read-only: flush",
            ro,
            |_| req(0, NBD_CMD_FLUSH, 0, 0),
            Success,
        ),
        row(
            "read-only: read",
            ro,
            |_| req(0, NBD_CMD_READ, RO_SIZE - 8192, 8192),
            Success,
        ),
    ]
}

// ---------------------------------------------------------------------------
// The runner.
// ---------------------------------------------------------------------------

fn fixed_flags() -> Vec<u8> {
    be32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
}

/// Haggling goes on: `NBD_OPT_GO` on sd0 and a read work.
fn haggle_goes_on(mut s: TcpStream) -> Result<(), String> {
    s.write_all(&opt(NBD_OPT_GO, &go_data(b"sd0", &[NBD_INFO_BLOCK_SIZE])))
        .map_err(|e| format!("sending GO after the case: {e}"))?;
    let desc = match read_info_replies(&mut s, NBD_OPT_GO) {
        Ok(Ok(d)) => d,
        Ok(Err(r)) => return Err(format!("GO after the case refused: {r:?}")),
        Err(e) => return Err(format!("GO after the case: {e}")),
    };
    let mut c = Client::from_stream(s, desc, false);
    match c.read(0, 4096) {
        Ok(Ok(d)) if d.len() == 4096 => {}
        other => return Err(format!("read after the case: {other:?}")),
    }
    let _ = c.disconnect();
    Ok(())
}

/// The connection still works after an error reply: for sd0 a write and a
/// read-back in the row's scratch area, for the read-only export a read of
/// its known contents.
fn still_works(c: &mut Client, export: &str, scratch: u64, rng: &mut Rng) -> Result<(), String> {
    if export == "sd1" {
        let off = rng.below(RO_SIZE / 4096 - 1) * 4096;
        let want: Vec<u8> = (off..off + 8192).map(ro_byte).collect();
        return match c.read(off, 8192) {
            Ok(Ok(d)) if d == want => Ok(()),
            Ok(Ok(_)) => Err(format!("read-only export: other bytes at {off}")),
            other => Err(format!("read after the case: {other:?}")),
        };
    }
    let data = rng.bytes(8192);
    match c.write(scratch, &data) {
        Ok(Ok(())) => {}
        other => return Err(format!("write after the case: {other:?}")),
    }
    match c.read(scratch, 8192) {
        Ok(Ok(d)) if d == data => Ok(()),
        Ok(Ok(_)) => Err("read after the case returned other bytes".into()),
        other => Err(format!("read after the case: {other:?}")),
    }
}

fn run_case(ctx: &Ctx, case: &Case, rng: &mut Rng) -> Result<(), String> {
    let addr = ctx.server.addr;
    let bytes = (case.send)(ctx.env);
    if let Expect::Custom(f) = case.expect {
        return f(ctx);
    }
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    // Prepare the connection.
    let mut client = None;
    let mut sock = match case.phase {
        Phase::Connected => tcp(addr).map_err(|e| io("connect", e))?,
        Phase::Greeted | Phase::Haggling => {
            let mut s = tcp(addr).map_err(|e| io("connect", e))?;
            common::read_greeting(&mut s).map_err(|e| io("greeting", e))?;
            if matches!(case.phase, Phase::Haggling) {
                s.write_all(&fixed_flags()).map_err(|e| io("flags", e))?;
            }
            s
        }
        Phase::Simple(e) | Phase::Structured(e) => {
            let c = Client::open(addr, e, matches!(case.phase, Phase::Structured(_)))
                .map_err(|e| io("handshake", e))?;
            let s = c.sock.try_clone().map_err(|e| io("clone", e))?;
            client = Some(c);
            s
        }
        Phase::Custom => unreachable!(),
    };
    // Send.
    if let Err(e) = sock.write_all(&bytes) {
        // The server may close before reading everything of a hostile
        // message; that is fine only where a disconnect is expected.
        if !matches!(case.expect, Expect::Disconnect | Expect::Gone) {
            return Err(format!("sending the case: {e}"));
        }
    }
    if case.close {
        let _ = sock.shutdown(Shutdown::Write);
    }
    match &case.expect {
        Expect::Gone => {
            drop(client);
            drop(sock);
            Ok(())
        }
        Expect::Disconnect => {
            let got = wait_closed(&mut sock, Duration::from_secs(10))?;
            if got.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "expected a disconnect without a reply, got {} bytes first: {:02x?}",
                    got.len(),
                    &got[..got.len().min(48)]
                ))
            }
        }
        Expect::OptReply(option, reply) => {
            let r = read_opt_reply(&mut sock).map_err(|e| io("option reply", e))?;
            if r.option != *option || r.reply != *reply {
                return Err(format!(
                    "expected option {option} reply {reply:#x}, got option {} reply {:#x} ({:?})",
                    r.option,
                    r.reply,
                    String::from_utf8_lossy(&r.data)
                ));
            }
            haggle_goes_on(sock)
        }
        Expect::AckThenClose(option) => {
            let r = read_opt_reply(&mut sock).map_err(|e| io("option reply", e))?;
            if r.option != *option || r.reply != NBD_REP_ACK {
                return Err(format!("expected NBD_REP_ACK for {option}, got {r:?}"));
            }
            let got = wait_closed(&mut sock, Duration::from_secs(10))?;
            if !got.is_empty() {
                return Err(format!("{} bytes after the ACK", got.len()));
            }
            Ok(())
        }
        Expect::Info(check) => {
            let d = match read_info_replies(&mut sock, NBD_OPT_INFO) {
                Ok(Ok(d)) => d,
                Ok(Err(r)) => return Err(format!("NBD_OPT_INFO refused: {r:?}")),
                Err(e) => return Err(io("info replies", e)),
            };
            check(&d, ctx.env)?;
            haggle_goes_on(sock)
        }
        Expect::Error(_) | Expect::Success => {
            let mut c = client.expect("a transmission phase");
            let raw: [u8; 28] = bytes[..28].try_into().expect("a request");
            let r = Request::parse(&raw).map_err(|e| format!("row's request: {e}"))?;
            c.track(r.cookie, r.command.to_u16(), r.offset, r.length);
            let reply = c.recv().map_err(|e| io("reply", e))?;
            if reply.cookie != COOKIE {
                return Err(format!("reply cookie {:#x} != {COOKIE:#x}", reply.cookie));
            }
            match (&case.expect, reply.error) {
                (Expect::Error(code), e) if e == code.to_u32() => {}
                (Expect::Error(code), e) => {
                    return Err(format!(
                        "expected {code}, got error {e} ({})",
                        ErrorCode::from_u32(e).map_or("not an NBD error".into(), |c| c.to_string())
                    ));
                }
                (_, 0) => {}
                (_, e) => return Err(format!("expected success, got error {e}")),
            }
            let export = match case.phase {
                Phase::Simple(e) | Phase::Structured(e) => e,
                _ => "sd0",
            };
            still_works(&mut c, export, ctx.scratch, rng)?;
            let _ = c.disconnect();
            Ok(())
        }
        Expect::Custom(_) => unreachable!(),
    }
}

fn run_table(test: &str, cases: Vec<Case>, net: &str) {
    assert!(cases.len() >= 30, "{test}: only {} rows", cases.len());
    let seed = test_seed(test);
    let mut rng = Rng::new(seed);
    let mut opts = config();
    opts.args.extend(["--net".to_string(), net.to_string()]);
    let server = Server::start_opts(opts);
    assert!(
        server.has_export("sd0") && server.has_export("sd1"),
        "exports {:?}",
        server.exports
    );
    let env = Env {
        max: server.client("sd0").max_payload(),
    };
    let mut witness = Witness::new(&server, "sd0", SIZE / 2, SIZE / 2, seed ^ 1);
    witness.check(&server, "before the first row");
    let mut failures = Vec::new();
    let t0 = Instant::now();
    for (i, case) in cases.iter().enumerate() {
        let ctx = Ctx {
            server: &server,
            env: &env,
            scratch: (i as u64 % 120) * 65536,
        };
        let t = Instant::now();
        if let Err(e) = run_case(&ctx, case, &mut rng) {
            failures.push(format!("  [{i}] {}: {e}", case.name));
        }
        witness.check(&server, &format!("after row [{i}] {:?}", case.name));
        if t.elapsed() > Duration::from_secs(5) {
            eprintln!("{test}: row {:?} took {:?}", case.name, t.elapsed());
        }
    }
    eprintln!(
        "{test}: {} rows in {:?}, {} failed",
        cases.len(),
        t0.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{test}: {} of {} rows failed (seed {seed:#x}):\n{}\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n"),
        server.diag()
    );
}

#[test]
fn handshake_table() {
    run_table("handshake_table", handshake_cases(), "poll");
}

/// The transmission rows on the run-to-completion path (the default).
#[test]
fn transmission_table() {
    run_table("transmission_table", transmission_cases(), "poll");
}

/// The same rows on the threaded path (`--net threads`).
#[test]
fn transmission_table_threads() {
    run_table(
        "transmission_table_threads",
        transmission_cases(),
        "threads",
    );
}

// ---------------------------------------------------------------------------
// Custom rows.
// ---------------------------------------------------------------------------

fn export_name_zeroes(ctx: &Ctx) -> Result<(), String> {
    // Client flags 0: neither FIXED_NEWSTYLE nor NO_ZEROES. EXPORT_NAME works
    // in every newstyle variant; the reply is size, flags, 124 zeroes.
    let mut s = tcp(ctx.server.addr).map_err(|e| e.to_string())?;
    common::read_greeting(&mut s).map_err(|e| e.to_string())?;
    s.write_all(&be32(0)).map_err(|e| e.to_string())?;
    s.write_all(&opt(NBD_OPT_EXPORT_NAME, b"sd0"))
        .map_err(|e| e.to_string())?;
    let mut r = [0u8; 8 + 2 + 124];
    s.read_exact(&mut r)
        .map_err(|e| format!("EXPORT_NAME reply: {e}"))?;
    let size = u64::from_be_bytes(r[0..8].try_into().expect("8"));
    let flags = u16::from_be_bytes([r[8], r[9]]);
    if size != SIZE || flags & NBD_FLAG_HAS_FLAGS == 0 || r[10..].iter().any(|b| *b != 0) {
        return Err(format!("EXPORT_NAME reply {r:02x?}"));
    }
    let desc = ExportDesc {
        size,
        flags,
        ..ExportDesc::default()
    };
    let mut c = Client::from_stream(s, desc, false);
    let data = Rng::new(ctx.scratch).bytes(4096);
    if c.write(ctx.scratch, &data).map_err(|e| e.to_string())? != Ok(()) {
        return Err("write after EXPORT_NAME failed".into());
    }
    match c.read(ctx.scratch, 4096) {
        Ok(Ok(d)) if d == data => Ok(()),
        other => Err(format!(
            "read after EXPORT_NAME: {:?}",
            other.map(|r| r.map(|d| d.len()))
        )),
    }
}

fn structured_then_info(ctx: &Ctx) -> Result<(), String> {
    let mut s = tcp(ctx.server.addr).map_err(|e| e.to_string())?;
    common::read_greeting(&mut s).map_err(|e| e.to_string())?;
    s.write_all(&fixed_flags()).map_err(|e| e.to_string())?;
    for _ in 0..2 {
        // Twice: a repeated NBD_OPT_STRUCTURED_REPLY is acknowledged again.
        s.write_all(&opt(NBD_OPT_STRUCTURED_REPLY, &[]))
            .map_err(|e| e.to_string())?;
        let r = read_opt_reply(&mut s).map_err(|e| e.to_string())?;
        if r.option != NBD_OPT_STRUCTURED_REPLY || r.reply != NBD_REP_ACK {
            return Err(format!("NBD_OPT_STRUCTURED_REPLY: {r:?}"));
        }
    }
    s.write_all(&opt(NBD_OPT_INFO, &go_data(b"sd0", &[NBD_INFO_BLOCK_SIZE])))
        .map_err(|e| e.to_string())?;
    match read_info_replies(&mut s, NBD_OPT_INFO) {
        Ok(Ok(d)) => check_sd0(&d, ctx.env, true),
        other => Err(format!("INFO: {other:?}")),
    }
}

fn list_exports(ctx: &Ctx) -> Result<(), String> {
    let mut s = tcp(ctx.server.addr).map_err(|e| e.to_string())?;
    common::read_greeting(&mut s).map_err(|e| e.to_string())?;
    s.write_all(&fixed_flags()).map_err(|e| e.to_string())?;
    s.write_all(&opt(NBD_OPT_LIST, &[]))
        .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    loop {
        let r = read_opt_reply(&mut s).map_err(|e| e.to_string())?;
        if r.option != NBD_OPT_LIST {
            return Err(format!("reply for option {}", r.option));
        }
        match r.reply {
            NBD_REP_SERVER => {
                if r.data.len() < 4 {
                    return Err("NBD_REP_SERVER shorter than 4 bytes".into());
                }
                let n = u32::from_be_bytes(r.data[0..4].try_into().expect("4")) as usize;
                if 4 + n > r.data.len() {
                    return Err("NBD_REP_SERVER name longer than the reply".into());
                }
                names.push(String::from_utf8_lossy(&r.data[4..4 + n]).into_owned());
            }
            NBD_REP_ACK => break,
            other => return Err(format!("LIST reply type {other:#x}")),
        }
    }
    let mut want = ctx.server.exports.clone();
    want.sort();
    names.sort();
    if names != want {
        return Err(format!("LIST gave {names:?}, the server serves {want:?}"));
    }
    s.write_all(&opt(NBD_OPT_ABORT, &[]))
        .map_err(|e| e.to_string())?;
    let r = read_opt_reply(&mut s).map_err(|e| e.to_string())?;
    if r.reply != NBD_REP_ACK {
        return Err(format!("ABORT after LIST: {r:?}"));
    }
    Ok(())
}

fn many_options(ctx: &Ctx) -> Result<(), String> {
    // The server may cap the options of one connection (a denial of
    // service): then it answers a prefix with NBD_REP_ERR_UNSUP and closes.
    // Or it answers all of them. Anything else is wrong.
    const N: usize = 1100;
    let mut s = tcp(ctx.server.addr).map_err(|e| e.to_string())?;
    common::read_greeting(&mut s).map_err(|e| e.to_string())?;
    let mut all = fixed_flags();
    for i in 0..N {
        all.extend(opt(0x1000 + i as u32, &[]));
    }
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&all);
    });
    let mut answered = 0;
    let result = loop {
        match read_opt_reply(&mut s) {
            Ok(r) if r.option == 0x1000 + answered as u32 && r.reply == NBD_REP_ERR_UNSUP => {
                answered += 1;
                if answered == N {
                    break haggle_goes_on(s);
                }
            }
            Ok(r) => break Err(format!("option {answered}: unexpected reply {r:?}")),
            Err(_) if answered > 0 => {
                let _ = wait_closed(&mut s, Duration::from_secs(10))?;
                break Ok(());
            }
            Err(e) => break Err(format!("no reply at all: {e}")),
        }
    };
    let _ = writer.join();
    result
}

fn write_straddling_end(ctx: &Ctx) -> Result<(), String> {
    let mut c = ctx.server.client("sd0");
    let last = SIZE - 4096;
    let before = c.read(last, 4096).map_err(|e| e.to_string())?;
    let data = vec![0xee; 8192];
    match c.write(last, &data) {
        Ok(Err(e)) if e == ErrorCode::NoSpc.to_u32() => {}
        other => return Err(format!("write straddling the end: {other:?}, want ENOSPC")),
    }
    let after = c.read(last, 4096).map_err(|e| e.to_string())?;
    if before != after {
        return Err("the refused write changed the last block".into());
    }
    Ok(())
}

fn write_zeroes_zeroes(ctx: &Ctx) -> Result<(), String> {
    let mut c = ctx.server.client("sd0");
    let mut r = Rng::new(ctx.scratch ^ 0x77);
    let data = r.bytes(65536);
    let ok = |what: &str, v: std::io::Result<Result<(), u32>>| match v {
        Ok(Ok(())) => Ok(()),
        other => Err(format!("{what}: {other:?}")),
    };
    ok("write", c.write(ctx.scratch, &data))?;
    ok("write zeroes", c.write_zeroes(0, ctx.scratch + 4096, 8192))?;
    ok(
        "write zeroes NO_HOLE",
        c.write_zeroes(NBD_CMD_FLAG_NO_HOLE, ctx.scratch + 32768, 4096),
    )?;
    let back = c
        .read(ctx.scratch, 65536)
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("read: error {e}"))?;
    let mut want = data.clone();
    want[4096..12288].fill(0);
    want[32768..36864].fill(0);
    if back != want {
        let at = back.iter().zip(&want).position(|(a, b)| a != b);
        return Err(format!("after write zeroes: first difference at {at:?}"));
    }
    // Trim: the contents afterwards are unspecified, the reply is not.
    ok("trim", c.trim(ctx.scratch, 65536))?;
    ok("flush", c.flush())?;
    Ok(())
}

fn oversize_write(ctx: &Ctx) -> Result<(), String> {
    // "Size constraints": a server SHOULD drain (and answer NBD_EINVAL) a
    // too-long write up to 2^25 bytes; validate drains up to MAX_WRITE_DRAIN.
    let len = ctx.env.max + 512;
    let mut c = ctx.server.client("sd0");
    let payload = vec![0xa5; len as usize];
    let cookie = c
        .send(0, NBD_CMD_WRITE, 0, len, &payload)
        .map_err(|e| format!("sending {len} bytes: {e}"))?;
    if len > ctx.env.max.max(MAX_WRITE_DRAIN) {
        c.forget(cookie);
        let got = wait_closed(&mut c.sock, Duration::from_secs(10))?;
        return if got.is_empty() {
            Ok(())
        } else {
            Err("a reply to an undrainable write".into())
        };
    }
    let r = c.wait(cookie).map_err(|e| format!("reply: {e}"))?;
    if r.error != ErrorCode::Inval.to_u32() {
        return Err(format!(
            "oversize write ({len}): error {}, want EINVAL",
            r.error
        ));
    }
    // Drained: the stream is in step, and nothing was written.
    let first = c
        .read(0, 4096)
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if first.iter().all(|b| *b == 0xa5) {
        return Err("the refused oversize write was written".into());
    }
    let mut r = Rng::new(7);
    still_works(&mut c, "sd0", ctx.scratch, &mut r)
}

fn truncated_write(ctx: &Ctx) -> Result<(), String> {
    let mut c = ctx.server.client("sd0");
    let area = ctx.scratch;
    let before = Rng::new(area ^ 0x1234).bytes(65536);
    if c.write(area, &before).map_err(|e| e.to_string())? != Ok(()) {
        return Err("setup write failed".into());
    }
    let mut b = req(0, NBD_CMD_WRITE, area, 65536);
    b.extend_from_slice(&[0xdd; 1000]);
    c.sock.write_all(&b).map_err(|e| e.to_string())?;
    let _ = c.sock.shutdown(Shutdown::Write);
    let got = wait_closed(&mut c.sock, Duration::from_secs(10))?;
    if !got.is_empty() {
        return Err(format!("{} bytes of reply to a truncated write", got.len()));
    }
    let mut d = ctx.server.client("sd0");
    match d.read(area, 65536) {
        Ok(Ok(now)) if now == before => Ok(()),
        Ok(Ok(_)) => Err("a write whose payload never arrived changed the disk".into()),
        other => Err(format!("read back: {other:?}")),
    }
}

fn reads_then_gone(ctx: &Ctx) -> Result<(), String> {
    let mut c = ctx.server.client("sd0");
    let len = c.max_payload().min(1 << 20);
    for i in 0..64u64 {
        let off = (i * u64::from(len)) % (SIZE - u64::from(len));
        let off = off - off % 4096;
        c.send(0, NBD_CMD_READ, off, len, &[])
            .map_err(|e| e.to_string())?;
    }
    // Gone without reading a byte: the server's writes fail (EPIPE,
    // ECONNRESET) and it must shrug.
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn writes_then_gone(ctx: &Ctx) -> Result<(), String> {
    let mut c = ctx.server.client("sd0");
    let data = vec![0x3c; 65536];
    for i in 0..8u64 {
        c.send(
            NBD_CMD_FLAG_FUA * (i as u16 & 1),
            NBD_CMD_WRITE,
            ctx.scratch,
            65536,
            &data,
        )
        .map_err(|e| e.to_string())?;
    }
    c.send(0, NBD_CMD_FLUSH, 0, 0, &[])
        .map_err(|e| e.to_string())?;
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn pipelined_mix(ctx: &Ctx) -> Result<(), String> {
    // 48 requests sent back to back, good and bad mixed; replies may come in
    // any order, each must carry its own cookie's answer.
    let mut c = ctx.server.client("sd0");
    let mut r = Rng::new(ctx.scratch ^ 0xabc);
    let area = ctx.scratch;
    let mut want: std::collections::HashMap<u64, (u32, Option<Vec<u8>>)> = Default::default();
    let mut contents = vec![0u8; 65536];
    let setup = r.bytes(65536);
    if c.write(area, &setup).map_err(|e| e.to_string())? != Ok(()) {
        return Err("setup write failed".into());
    }
    contents.copy_from_slice(&setup);
    let inval = ErrorCode::Inval.to_u32();
    let nospc = ErrorCode::NoSpc.to_u32();
    for i in 0..48u64 {
        let cookie = 0x5000 + i;
        match i % 6 {
            0 => {
                // A good write to this row's area; later good reads check it.
                let blk = (i / 6) % 16;
                let data = r.bytes(4096);
                contents[(blk * 4096) as usize..((blk + 1) * 4096) as usize].copy_from_slice(&data);
                c.send_cookie(cookie, 0, NBD_CMD_WRITE, area + blk * 4096, 4096, &data)
                    .map_err(|e| e.to_string())?;
                want.insert(cookie, (0, None));
            }
            1 => {
                c.send_cookie(cookie, 0, NBD_CMD_READ, SIZE, 512, &[])
                    .map_err(|e| e.to_string())?;
                want.insert(cookie, (inval, None));
            }
            2 => {
                c.send_cookie(cookie, 0, NBD_CMD_WRITE, SIZE - 512, 1024, &[0x11; 1024])
                    .map_err(|e| e.to_string())?;
                want.insert(cookie, (nospc, None));
            }
            3 => {
                c.send_cookie(cookie, 0, NBD_CMD_WRITE, 3, 512, &[0x22; 512])
                    .map_err(|e| e.to_string())?;
                want.insert(cookie, (inval, None));
            }
            4 => {
                c.send_cookie(cookie, 0, 77, 0, 512, &[])
                    .map_err(|e| e.to_string())?;
                want.insert(cookie, (inval, None));
            }
            _ => {
                c.send_cookie(cookie, 0, NBD_CMD_FLUSH, 0, 0, &[])
                    .map_err(|e| e.to_string())?;
                want.insert(cookie, (0, None));
            }
        }
    }
    for _ in 0..48 {
        let rep = c.recv().map_err(|e| format!("reply: {e}"))?;
        let Some((err, _)) = want.remove(&rep.cookie) else {
            return Err(format!(
                "reply for cookie {:#x} twice or never sent",
                rep.cookie
            ));
        };
        if rep.error != err {
            return Err(format!(
                "cookie {:#x}: error {}, want {err}",
                rep.cookie, rep.error
            ));
        }
    }
    // Every good write landed, in order per block.
    match c.read(area, 65536) {
        Ok(Ok(d)) if d == contents => Ok(()),
        Ok(Ok(_)) => Err("the good writes of the mix did not all land".into()),
        other => Err(format!("read back: {other:?}")),
    }
}

fn dribbled(ctx: &Ctx) -> Result<(), String> {
    // Header and payload in tiny TCP segments: the server must reassemble.
    // A write, its reply, then a read (requests in flight may complete in
    // any order, so one at a time).
    let mut c = ctx.server.client("sd0");
    let mut r = Rng::new(ctx.scratch ^ 0xd1b);
    let data = r.bytes(8192);
    let mut write = req(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, ctx.scratch, 8192);
    write.extend_from_slice(&data);
    let read = req(0, NBD_CMD_READ, ctx.scratch, 8192);
    for (bytes, cmd) in [(write, NBD_CMD_WRITE), (read, NBD_CMD_READ)] {
        c.track(COOKIE, cmd, ctx.scratch, 8192);
        let mut at = 0;
        let mut pieces = 0;
        while at < bytes.len() {
            let n = (r.range(1, 9) as usize).min(bytes.len() - at);
            c.sock
                .write_all(&bytes[at..at + n])
                .map_err(|e| e.to_string())?;
            at += n;
            pieces += 1;
            if pieces % 97 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let rep = c
            .recv()
            .map_err(|e| format!("reply to command {cmd}: {e}"))?;
        if rep.cookie != COOKIE || rep.error != 0 {
            return Err(format!("dribbled command {cmd}: {rep:?}"));
        }
        if cmd == NBD_CMD_READ && rep.data != data {
            return Err("the dribbled read returned other bytes".into());
        }
    }
    Ok(())
}

fn structured_df(ctx: &Ctx) -> Result<(), String> {
    let mut c = ctx.server.client_structured("sd0");
    let data = Rng::new(ctx.scratch ^ 0xdf).bytes(65536);
    if c.write(ctx.scratch, &data).map_err(|e| e.to_string())? != Ok(()) {
        return Err("setup write failed".into());
    }
    let cookie = c
        .send(NBD_CMD_FLAG_DF, NBD_CMD_READ, ctx.scratch, 65536, &[])
        .map_err(|e| e.to_string())?;
    let r = c.wait(cookie).map_err(|e| e.to_string())?;
    if r.error != 0 || r.data != data {
        return Err(format!(
            "DF read: error {}, data equal {}",
            r.error,
            r.data == data
        ));
    }
    let content = r
        .chunks
        .iter()
        .filter(|t| **t == NBD_REPLY_TYPE_OFFSET_DATA || **t == NBD_REPLY_TYPE_OFFSET_HOLE)
        .count();
    if content != 1
        || r.chunks
            .iter()
            .any(|t| *t != NBD_REPLY_TYPE_OFFSET_DATA && *t != NBD_REPLY_TYPE_NONE)
    {
        return Err(format!("DF read fragmented: chunks {:?}", r.chunks));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// A thousand idle connections.
// ---------------------------------------------------------------------------

#[test]
fn thousand_idle_connections() {
    let limit = common::raise_nofile(4096);
    let n = if limit >= 1300 {
        1000
    } else {
        eprintln!("thousand_idle_connections: open files limited to {limit}");
        (limit as usize).saturating_sub(200).max(100)
    };
    let seed = test_seed("thousand_idle_connections");
    let server = Server::start_opts(config());
    let mut witness = Witness::new(&server, "sd0", SIZE / 2, SIZE / 2, seed);
    witness.check(&server, "before the connections");
    let base_fds = server.fd_count();

    // Another client does I/O all along, checking every byte.
    let stop = AtomicBool::new(false);
    let ios = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        let io = scope.spawn(|| -> Result<(), String> {
            let mut c = Client::connect(server.addr, "sd0").map_err(|e| e.to_string())?;
            let mut r = Rng::new(seed ^ 2);
            while !stop.load(Ordering::Relaxed) {
                let off = r.below(SIZE / 2 / 4096 - 16) * 4096;
                let blocks = r.range(1, 16) as usize;
                let data = r.bytes(4096 * blocks);
                match c.write(off, &data) {
                    Ok(Ok(())) => {}
                    other => return Err(format!("write during the connections: {other:?}")),
                }
                match c.read(off, data.len() as u32) {
                    Ok(Ok(d)) if d == data => {}
                    Ok(Ok(_)) => return Err(format!("other bytes read back at {off}")),
                    other => return Err(format!("read during the connections: {other:?}")),
                }
                ios.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        let mut conns = Vec::with_capacity(n);
        let mut open_err = None;
        for i in 0..n {
            let mut s = match tcp(server.addr) {
                Ok(s) => s,
                Err(e) => {
                    open_err = Some(format!("connection {i}: {e}"));
                    break;
                }
            };
            // A quarter each: just connected; greeting read; flags sent;
            // half an option header sent.
            let mut step = || -> std::io::Result<()> {
                if i % 4 >= 1 {
                    common::read_greeting(&mut s)?;
                }
                if i % 4 >= 2 {
                    s.write_all(&fixed_flags())?;
                }
                if i % 4 == 3 {
                    s.write_all(&opt(NBD_OPT_GO, &go_data(b"sd0", &[]))[..8])?;
                }
                Ok(())
            };
            if let Err(e) = step() {
                open_err = Some(format!("connection {i} mid-handshake: {e}"));
                break;
            }
            conns.push(s);
            if i % 250 == 249 {
                witness.check(&server, &format!("with {} idle connections", i + 1));
            }
        }
        witness.check(&server, &format!("with {} idle connections", conns.len()));
        let fds_open = server.fd_count();
        stop.store(true, Ordering::Relaxed);
        let io_result = io.join().expect("I/O thread");
        drop(conns);
        (open_err, fds_open, io_result)
    });
    let (open_err, fds_open, io_result) = result;
    assert!(
        open_err.is_none(),
        "{}\n{}",
        open_err.unwrap_or_default(),
        server.diag()
    );
    io_result.unwrap_or_else(|e| panic!("the busy client failed: {e}\n{}", server.diag()));
    assert!(
        ios.load(Ordering::Relaxed) > 0,
        "the busy client did no I/O"
    );
    assert!(
        fds_open >= base_fds + n * 3 / 4,
        "the server holds {fds_open} descriptors with {n} connections open (base {base_fds})"
    );
    // Closed: the server gives the descriptors back.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = server.fd_count();
        if now <= base_fds + 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server still holds {now} descriptors 15 s after {n} connections closed (base {base_fds})\n{}",
            server.diag()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    witness.check(&server, "after closing the connections");
    eprintln!(
        "thousand_idle_connections: {n} connections, {} busy-client I/Os meanwhile",
        ios.load(Ordering::Relaxed)
    );
    server.stop().assert_clean("SIGTERM");
}

// ---------------------------------------------------------------------------
// Device I/O errors.
// ---------------------------------------------------------------------------

/// Real device errors, end to end: the server runs with `RLIMIT_FSIZE` at
/// 64 MiB (and `SIGXFSZ` ignored), so the device's `pwrite` of any block at
/// or beyond 64 MiB of a 128 MiB backing file fails with `EFBIG` — through
/// the DMA disk (`sd0`) and the file device (`vnd0`). Such a write must be
/// answered `NBD_EIO` (simple or structured), the connection must go on,
/// and so must everything else.
#[test]
fn device_errors_are_eio() {
    if common::require_tool("prlimit", "util-linux").is_none() {
        return;
    }
    const LIMIT: u64 = 64 << 20;
    const BIG: u64 = 128 << 20;
    let seed = test_seed("device_errors_are_eio");
    let mut r = Rng::new(seed);
    let mut text = machine_toml(2, "64M");
    text += "[[disk]]\nname = \"sd0\"\nfile = \"sd0.img\"\nsize = \"128M\"\ndvma = \"strict\"\n\n";
    text += "[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\nsize = \"128M\"\n";
    let mut opts = ServerOpts::config(&text);
    opts.sparse = vec![("sd0.img".into(), BIG), ("vnd0.img".into(), BIG)];
    opts.fsize_limit = Some(LIMIT);
    let server = Server::start_opts(opts);
    let mut witness = Witness::new(&server, "sd0", 0, 8 << 20, seed ^ 5);
    witness.check(&server, "before the device errors");
    let eio = ErrorCode::Io.to_u32();
    for e in ["sd0", "vnd0"] {
        for structured in [false, true] {
            let ctx = format!("{e}, structured {structured}");
            let mut c = Client::open(server.addr, e, structured)
                .unwrap_or_else(|err| panic!("{ctx}: connect: {err}\n{}", server.diag()));
            assert_eq!(c.size(), BIG, "{ctx}: size");
            let max = u64::from(c.max_payload().min(1 << 20));
            for (what, flags, off, len) in [
                ("write beyond the limit", 0, 80 << 20, 4096),
                (
                    "FUA write beyond the limit",
                    NBD_CMD_FLAG_FUA,
                    100 << 20,
                    65536,
                ),
                ("write straddling the limit", 0, LIMIT - 4096, 8192),
                ("largest write at the limit", 0, LIMIT, max),
                (
                    "write at the last block",
                    NBD_CMD_FLAG_FUA,
                    BIG - 4096,
                    4096,
                ),
            ] {
                let data = r.bytes(len as usize);
                match c.write_flags(flags, off, &data) {
                    Ok(Err(got)) if got == eio => {}
                    other => panic!(
                        "{ctx}: {what} (offset {off}, {len} bytes): {other:?}, want NBD_EIO (5)\n{}",
                        server.diag()
                    ),
                }
                // The same connection goes on: reads there work (nothing
                // beyond the limit was written: zeroes), and a write below.
                match c.read(LIMIT.max(off), 4096) {
                    Ok(Ok(d)) if d.iter().all(|b| *b == 0) => {}
                    other => panic!("{ctx}: read after {what}: {other:?}\n{}", server.diag()),
                }
                let below = r.below((8 << 20) / 4096) * 4096 + (16 << 20);
                let good = r.bytes(16384);
                assert_eq!(
                    c.write(below, &good).expect("write"),
                    Ok(()),
                    "{ctx}: write below the limit after {what}"
                );
                assert_eq!(
                    c.read(below, 16384).expect("read"),
                    Ok(good),
                    "{ctx}: read back after {what}"
                );
                witness.check(&server, &format!("{ctx}: after {what}"));
            }
            // Pipelined: good and failing writes mixed, each reply its own.
            let mut want = std::collections::HashMap::new();
            for i in 0..16u64 {
                let (off, err) = if i % 2 == 0 {
                    ((16 << 20) + i * 65536, 0)
                } else {
                    (LIMIT + i * 65536, eio)
                };
                let cookie = c
                    .send(0, NBD_CMD_WRITE, off, 65536, &r.bytes(65536))
                    .expect("send");
                want.insert(cookie, err);
            }
            for _ in 0..16 {
                let rep = c.recv().unwrap_or_else(|err| panic!("{ctx}: reply: {err}"));
                assert_eq!(
                    Some(rep.error),
                    want.remove(&rep.cookie),
                    "{ctx}: pipelined reply for {:#x}",
                    rep.cookie
                );
            }
            c.disconnect().expect("disconnect");
        }
    }
    witness.check(&server, "after the device errors");
    server.stop().assert_clean("SIGTERM");
}

// ---------------------------------------------------------------------------
// One misbehaving connection must not starve the others.
// ---------------------------------------------------------------------------

/// How long another client's small write and read may take while one
/// connection misbehaves.
const FAIR_WAIT: Duration = Duration::from_secs(10);

/// A new client writes 4K and reads it back; `Err` unless done within
/// `limit`. (The I/O runs on its own thread, which ends when the server
/// goes.)
fn io_within(server: &Server, limit: Duration) -> Result<Duration, String> {
    let addr = server.addr;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = (|| -> Result<(), String> {
            let mut c = Client::connect(addr, "sd0").map_err(|e| format!("connect: {e}"))?;
            let data = vec![0x42u8; 4096];
            match c.write(SIZE / 2, &data) {
                Ok(Ok(())) => {}
                other => return Err(format!("write: {other:?}")),
            }
            match c.read(SIZE / 2, 4096) {
                Ok(Ok(d)) if d == data => Ok(()),
                other => Err(format!("read: {:?}", other.map(|r| r.map(|d| d.len())))),
            }
        })();
        let _ = tx.send(r.map(|()| t.elapsed()));
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

#[test]
fn stalled_write_payload_does_not_starve_others() {
    let server = Server::start_opts(config());
    let mut bad = server.client("sd0");
    let max = bad.max_payload();
    // A maximum-size write whose payload never comes (one byte of it).
    let mut b = req(0, NBD_CMD_WRITE, 0, max);
    b.push(0x55);
    bad.sock.write_all(&b).expect("send");
    std::thread::sleep(Duration::from_millis(300));
    let r = io_within(&server, FAIR_WAIT);
    server.assert_healthy("with a stalled write");
    assert!(
        r.is_ok(),
        "while one client stalls in the payload of a {max}-byte write, another client's 4K write \
         and read got no answer: {}\n{}",
        r.unwrap_err(),
        server.diag()
    );
    drop(bad);
}

#[test]
fn client_not_reading_replies_does_not_starve_others() {
    let server = Server::start_opts(config());
    let mut bad = server.client("sd0");
    let max = bad.max_payload();
    // 64 maximum-size reads, and never a reply read.
    for i in 0..64u64 {
        let off = (i % (SIZE / u64::from(max))) * u64::from(max);
        bad.send(0, NBD_CMD_READ, off, max, &[]).expect("send");
    }
    std::thread::sleep(Duration::from_millis(1000));
    let r = io_within(&server, FAIR_WAIT);
    server.assert_healthy("with a client not reading");
    assert!(
        r.is_ok(),
        "while one client sends 64 reads of {max} bytes and reads no reply, another client's 4K \
         write and read got no answer: {}\n{}",
        r.unwrap_err(),
        server.diag()
    );
    drop(bad);
}

// ---------------------------------------------------------------------------
// Issue 12: bounded memory, fairness, deadlines and limits, older clients,
// sector sizes, ENOSPC.
// ---------------------------------------------------------------------------

/// The server's resident set, bytes (`VmRSS` of `/proc/PID/status`).
fn rss(server: &Server) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", server.pid)).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// `config()` with more `serve` arguments.
fn config_args(args: &[&str]) -> ServerOpts {
    let mut o = config();
    o.args = args.iter().map(|a| a.to_string()).collect();
    o
}

/// A request header flood that never reads a reply: `cmd` requests of
/// length `len` (zero-length READs are rejected on the host, TRIMs go to
/// the kernel), for `secs` seconds or `max` requests. Returns the largest
/// growth of the server's RSS over its idle RSS, and the requests sent.
fn flood(server: &Server, cmd: u16, len: u32, secs: u64, max: u64) -> (u64, u64) {
    let idle = rss(server);
    let mut c = server.client("sd0");
    c.sock
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut burst = Vec::new();
    for i in 0..1024u64 {
        burst.extend_from_slice(
            &Request {
                flags: nbd::CommandFlags(0),
                command: nbd::Command::from_u16(cmd),
                cookie: i,
                offset: (i % 64) * 4096,
                length: len,
            }
            .encode(),
        );
    }
    let (t0, mut sent, mut pos, mut peak, mut sample) =
        (Instant::now(), 0u64, 0usize, 0u64, Instant::now());
    while t0.elapsed() < Duration::from_secs(secs) && sent < max {
        match c.sock.write(&burst[pos..]) {
            Ok(n) => {
                sent += ((pos + n) / REQ_LEN - pos / REQ_LEN) as u64;
                pos = (pos + n) % burst.len();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("flood: {e} after {sent} requests\n{}", server.diag()),
        }
        if sample.elapsed() > Duration::from_millis(100) {
            peak = peak.max(rss(server).saturating_sub(idle));
            sample = Instant::now();
        }
    }
    peak = peak.max(rss(server).saturating_sub(idle));
    drop(c);
    (peak, sent)
}

const REQ_LEN: usize = nbd::wire::REQUEST_LEN;

#[test]
fn zero_length_read_flood_keeps_memory_bounded() {
    let server = Server::start_opts(config());
    let (peak, sent) = flood(&server, NBD_CMD_READ, 0, 12, 50_000_000);
    eprintln!(
        "zero-length READ flood: {sent} requests, RSS +{} MiB",
        peak >> 20
    );
    server.assert_healthy("after a zero-length READ flood");
    assert!(
        peak <= 64 << 20,
        "{sent} zero-length READs never answered grew the server by {} MiB (limit 64)\n{}",
        peak >> 20,
        server.diag()
    );
    io_within(&server, FAIR_WAIT).expect("I/O after the flood");
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn trim_flood_keeps_memory_bounded() {
    let server = Server::start_opts(config());
    let (peak, sent) = flood(&server, NBD_CMD_TRIM, 4096, 12, 50_000_000);
    eprintln!("TRIM flood: {sent} requests, RSS +{} MiB", peak >> 20);
    server.assert_healthy("after a TRIM flood");
    assert!(
        peak <= 64 << 20,
        "{sent} TRIMs never answered grew the server by {} MiB (limit 64)\n{}",
        peak >> 20,
        server.diag()
    );
    io_within(&server, FAIR_WAIT).expect("I/O after the flood");
    server.stop().assert_clean("SIGTERM");
}

/// Sixteen hostile connections: stalled maximum writes, maximum reads never
/// read, and senders of one byte per second (in a request header, in a
/// write payload, in a handshake). A well-behaved client's 4K write and
/// read are answered within a second, again and again.
#[test]
fn sixteen_hostile_connections_do_not_starve_a_client() {
    let server = Server::start_opts(config());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut held = Vec::new();
        let max = server.client("sd0").max_payload();
        for i in 0..6u64 {
            let mut bad = server.client("sd0");
            let mut b = req(0, NBD_CMD_WRITE, i * u64::from(max) % (SIZE / 2), max);
            b.push(0x55);
            bad.sock.write_all(&b).expect("stalled write");
            held.push(bad);
        }
        for _ in 0..5 {
            let mut bad = server.client("sd0");
            for i in 0..16u64 {
                let off = (i % (SIZE / u64::from(max))) * u64::from(max);
                let _ = bad.send(0, NBD_CMD_READ, off, max, &[]);
            }
            held.push(bad);
        }
        for i in 0..5u32 {
            let addr = server.addr;
            let stop = &stop;
            scope.spawn(move || {
                // One byte per second.
                let (mut s, bytes) = match i % 3 {
                    0 => {
                        let c = Client::connect(addr, "sd0").expect("connect");
                        (c.sock, req(0, NBD_CMD_READ, 0, 4096))
                    }
                    1 => {
                        let c = Client::connect(addr, "sd0").expect("connect");
                        (c.sock, write(0, 65536, 65536))
                    }
                    _ => (tcp(addr).expect("connect"), {
                        let mut v = fixed_flags();
                        v.extend(opt(NBD_OPT_GO, &go_data(b"sd0", &[])));
                        v
                    }),
                };
                for b in bytes {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                        return;
                    }
                    for _ in 0..10 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        let mut worst = Duration::ZERO;
        for k in 0..5 {
            match io_within(&server, Duration::from_secs(1)) {
                Ok(t) => worst = worst.max(t),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    panic!(
                        "round {k}: with 16 hostile connections a client's 4K write and read: {e}\n{}",
                        server.diag()
                    );
                }
            }
        }
        eprintln!("16 hostile connections: worst 4K write+read {worst:?}");
        server.assert_healthy("with 16 hostile connections");
        stop.store(true, Ordering::Relaxed);
        drop(held);
    });
    server.stop_with("KILL");
}

/// Sends `bytes` one per `gap`, until the server closes the connection;
/// returns when that happened (since the first byte), or `None` if it did
/// not within `limit`.
fn dribble_until_closed(
    s: &mut TcpStream,
    bytes: &[u8],
    gap: Duration,
    limit: Duration,
) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(10)))
        .expect("timeout");
    let t0 = Instant::now();
    let mut i = 0;
    let mut junk = [0u8; 4096];
    while t0.elapsed() < limit {
        if s.write_all(&[bytes[i % bytes.len()]]).is_err() {
            return Some(t0.elapsed());
        }
        i += 1;
        let next = Instant::now() + gap;
        while Instant::now() < next {
            match s.read(&mut junk) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(t0.elapsed()),
            }
        }
    }
    None
}

#[test]
fn byte_per_second_handshake_is_closed_at_the_deadline() {
    let server = Server::start_opts(config_args(&["--handshake-timeout", "3"]));
    let mut s = tcp(server.addr).expect("connect");
    common::read_greeting(&mut s).expect("greeting");
    let mut bytes = fixed_flags();
    bytes.extend(opt(NBD_OPT_LIST, &[]).repeat(100));
    let t = dribble_until_closed(
        &mut s,
        &bytes,
        Duration::from_millis(700),
        Duration::from_secs(12),
    );
    match t {
        Some(t) if t >= Duration::from_millis(2000) && t <= Duration::from_secs(6) => {}
        other => panic!(
            "a handshake sent one byte per 0.7 s with a 3 s deadline: closed after {other:?}\n{}",
            server.diag()
        ),
    }
    io_within(&server, FAIR_WAIT).expect("I/O after");
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn byte_per_second_request_is_closed_at_the_deadline() {
    let server = Server::start_opts(config_args(&["--io-timeout", "3"]));
    for (what, bytes) in [
        ("request header", req(0, NBD_CMD_READ, 0, 4096)),
        ("write payload", write(0, 0, 65536)),
    ] {
        let mut c = server.client("sd0");
        let t = dribble_until_closed(
            &mut c.sock,
            &bytes,
            Duration::from_millis(700),
            Duration::from_secs(12),
        );
        match t {
            Some(t) if t <= Duration::from_secs(6) => {}
            other => panic!(
                "a {what} sent one byte per 0.7 s with a 3 s deadline: closed after {other:?}\n{}",
                server.diag()
            ),
        }
    }
    io_within(&server, FAIR_WAIT).expect("I/O after");
    server.stop().assert_clean("SIGTERM");
}

/// The refusal a client over a limit gets: the greeting, then an error
/// reply to its first option, whose message says why.
fn expect_refusal(server: &Server, what: &str) {
    let mut s = tcp(server.addr).expect("connect");
    if let Err(e) = common::read_greeting(&mut s) {
        panic!(
            "{what}: no greeting ({e}), want a refusal\n{}",
            server.diag()
        );
    }
    s.write_all(&fixed_flags()).expect("flags");
    s.write_all(&opt(NBD_OPT_GO, &go_data(b"sd0", &[])))
        .expect("GO");
    let r = read_opt_reply(&mut s)
        .unwrap_or_else(|e| panic!("{what}: no option reply ({e})\n{}", server.diag()));
    let msg = String::from_utf8_lossy(&r.data).into_owned();
    assert!(
        r.option == NBD_OPT_GO
            && r.reply == NBD_REP_ERR_POLICY
            && msg.contains("too many connections"),
        "{what}: reply {:#x} {msg:?}, want NBD_REP_ERR_POLICY saying too many connections",
        r.reply
    );
}

#[test]
fn over_the_connection_limits_clients_are_refused_with_a_reason() {
    let server = Server::start_opts(config_args(&["--max-per-addr", "4"]));
    // Four idle connections from 127.0.0.1, the per-address limit.
    let idle: Vec<_> = (0..4).map(|_| server.client("sd0")).collect();
    expect_refusal(&server, "fifth connection from one address");
    assert!(
        server.wait_output("too many connections", Duration::from_secs(5)),
        "the refusal is not logged\n{}",
        server.diag()
    );
    drop(idle);
    // Closed connections are counted out: clients are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match io_within(&server, Duration::from_secs(5)) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                panic!("after the idle ones closed: {e}\n{}", server.diag())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    server.stop().assert_clean("SIGTERM");
    // The total limit.
    let server = Server::start_opts(config_args(&["--max-connections", "3"]));
    let conns: Vec<_> = (0..3).map(|_| server.client("sd0")).collect();
    expect_refusal(&server, "fourth connection");
    drop(conns);
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn idle_timeout_closes_idle_connections() {
    let server = Server::start_opts(config_args(&["--idle-timeout", "2"]));
    let mut c = server.client("sd0");
    assert_eq!(c.write(0, &[7u8; 4096]).expect("write"), Ok(()));
    let t0 = Instant::now();
    match wait_closed(&mut c.sock, Duration::from_secs(8)) {
        Ok(_) if t0.elapsed() >= Duration::from_millis(1500) => {}
        other => panic!(
            "idle connection with --idle-timeout 2: {other:?} after {:?}\n{}",
            t0.elapsed(),
            server.diag()
        ),
    }
    server.stop().assert_clean("SIGTERM");
}

/// A client that enters transmission with NBD_OPT_EXPORT_NAME (it learns
/// no block sizes).
fn connect_export_name(server: &Server, export: &str) -> Client {
    let mut s = tcp(server.addr).expect("connect");
    common::read_greeting(&mut s).expect("greeting");
    s.write_all(&fixed_flags()).expect("flags");
    s.write_all(&opt(NBD_OPT_EXPORT_NAME, export.as_bytes()))
        .expect("EXPORT_NAME");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).expect("EXPORT_NAME reply");
    let desc = ExportDesc {
        size: u64::from_be_bytes(b[0..8].try_into().unwrap()),
        flags: u16::from_be_bytes([b[8], b[9]]),
        ..ExportDesc::default()
    };
    Client::from_stream(s, desc, false)
}

#[test]
fn export_name_clients_get_any_alignment_and_32m() {
    let mut text = machine_toml(2, "128M");
    text += &disk_toml("sd0", "64M", "");
    let server = Server::start_opts(ServerOpts::config(&text));
    let mut r = Rng::new(test_seed("export_name_clients"));
    let mut c = connect_export_name(&server, "sd0");
    let mut model = r.bytes(8192);
    assert_eq!(c.write(0, &model).expect("write"), Ok(()));
    // 100 bytes at offset 1, and a few more odd ones.
    for (off, len) in [(1u64, 100usize), (511, 2), (4000, 1000), (8191, 1)] {
        let got = c.read(off, len as u32).expect("read");
        assert_eq!(
            got.as_deref().map_err(|e| *e),
            Ok(&model[off as usize..off as usize + len]),
            "read {len} at {off}"
        );
        let data = r.bytes(len);
        assert_eq!(
            c.write(off, &data).expect("write"),
            Ok(()),
            "write {len} at {off}"
        );
        model[off as usize..off as usize + len].copy_from_slice(&data);
        assert_eq!(
            c.read(0, 8192).expect("read"),
            Ok(model.clone()),
            "read back after {len} at {off}"
        );
    }
    // 16 MiB (and 32 MiB) at once, aligned and not.
    for (off, len) in [(1 << 20, 16 << 20), (3, 16 << 20), (32 << 20, 32 << 20)] {
        let data = r.bytes(len);
        assert_eq!(
            c.write(off, &data).expect("write"),
            Ok(()),
            "{len} bytes at {off}"
        );
        let back = c.read(off, len as u32).expect("read");
        assert!(
            back.as_ref().is_ok_and(|d| *d == data),
            "{len} bytes at {off} read back: {:?}",
            back.map(|d| d.len())
        );
    }
    // Still refused: beyond 32 MiB.
    assert!(c.read(0, (32 << 20) + 512).expect("read").is_err());
    // A GO client that asked for block sizes keeps the checks.
    let mut g = server.client("sd0");
    assert_eq!(
        g.read(1, 100).expect("read"),
        Err(ErrorCode::Inval.to_u32())
    );
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn sector_size_4096_is_refused_with_a_reason() {
    let dir = common::TempDir::new("sector4096");
    let mut text = machine_toml(1, "64M");
    text += &disk_toml("sd0", "16M", "sector_size = 4096");
    std::fs::write(dir.path().join("c.toml"), text).expect("config");
    let mut child = std::process::Command::new(common::dvma_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.path().join("c.toml"))
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "sector_size = 4096 was accepted: the server runs\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(!status.success(), "sector_size = 4096: exit {status}");
    assert!(
        err.contains("sector_size") && err.contains("4096") && err.contains("512"),
        "sector_size = 4096 refused without saying why: {err}"
    );
}

/// A disk on a full filesystem (a 1 MiB tmpfs; needs root): writes that
/// find no space are answered NBD_ENOSPC, through the DMA disk and the file
/// device, and the connection goes on.
#[test]
fn full_filesystem_is_enospc() {
    let root = common::TempDir::new("enospc");
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        common::skip::skip("cannot mount a 1 MiB tmpfs (needs root)");
        return;
    }
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _umount = Umount(data.clone());
    let mut text = machine_toml(2, "64M");
    text += "[[disk]]\nname = \"sd0\"\nfile = \"sd0.img\"\nsize = \"16M\"\ndvma = \"strict\"\npool = \"8M\"\n\n";
    text += "[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\nsize = \"16M\"\n";
    let mut opts = ServerOpts::config(&text);
    opts.sparse = vec![("sd0.img".into(), 16 << 20), ("vnd0.img".into(), 16 << 20)];
    let server = Server::start_in(root.path(), &opts);
    let enospc = ErrorCode::NoSpc.to_u32();
    for e in ["sd0", "vnd0"] {
        let mut c = server.client(e);
        let mut full = false;
        for i in 0..16u64 {
            match c.write(i << 20, &vec![0xa5; 1 << 20]).expect("write") {
                Ok(()) => {}
                Err(got) => {
                    assert_eq!(
                        got,
                        enospc,
                        "{e}: a write to a full filesystem, at {i} MiB: error {got}, want NBD_ENOSPC\n{}",
                        server.diag()
                    );
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "{e}: 16 MiB written to a 1 MiB filesystem");
        // The connection goes on.
        assert!(
            c.read(0, 4096).expect("read").is_ok(),
            "{e}: read after ENOSPC"
        );
    }
    let _ = server.stop();
}
