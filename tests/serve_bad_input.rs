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
//! The runner (connections, the witness, the checks) is in
//! `tests/common/table.rs`, the server's two exports in
//! `tests/common/fixture.rs`.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::client::{ExportDesc, go_data, read_info_replies, read_opt_reply, wait_closed};
use common::fixture::{RO_SIZE, SIZE};
use common::raw::*;
use common::table::{
    Case, Ctx, Env, Expect, Phase, closing, custom, haggle_goes_on, row, run_table, still_works,
};
use common::{Client, Rng, tcp};
use nbd::wire::*;
use nbd::{ErrorCode, MAX_WRITE_DRAIN};

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
