//! Transmission phase: golden bytes for requests and every reply encoder, and
//! every validation rule with its exact errno.

mod common;

use common::hex;
use nbd::transmission::{
    encode_chunk_error, encode_chunk_error_offset, encode_chunk_header, encode_chunk_none,
    encode_chunk_offset_data, encode_chunk_offset_hole, simple_reply_header,
};
use nbd::{
    BlockSizes, Command, CommandFlags, ErrorCode, ExportInfo, MAX_WRITE_DRAIN, ReadReply, Request,
    RequestError, Validation, error_reply, simple_reply, validate,
};

const COOKIE: u64 = 0x0102_0304_0506_0708;
const MAX: u32 = 1 << 25;

// ---------------------------------------------------------------------------
// Requests.
// ---------------------------------------------------------------------------

#[test]
fn golden_request_round_trip() {
    let raw = hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200");
    let r = Request::parse(&raw.clone().try_into().unwrap()).unwrap();
    assert_eq!(
        r,
        Request {
            flags: CommandFlags::FUA,
            command: Command::Write,
            cookie: COOKIE,
            offset: 0x1000,
            length: 0x200,
        }
    );
    assert_eq!(r.encode().to_vec(), raw);
    assert_eq!(r.payload_len(), 0x200);
}

#[test]
fn request_keeps_unknown_types_and_flags() {
    let raw = hex("25609513 ffc0 00ff 0000000000000000 0000000000000000 00000000");
    let r = Request::parse(&raw.try_into().unwrap()).unwrap();
    assert_eq!(r.command, Command::Unknown(0xff));
    assert_eq!(r.flags.bits(), 0xffc0);
    assert_eq!(r.flags.unknown_bits(), 0xffc0);
    assert_eq!(r.payload_len(), 0);
}

#[test]
fn request_bad_magic() {
    for magic in ["12560953", "21e41c71", "25609514", "00000000"] {
        let raw = hex(&format!("{magic} 0000 0000 {:016x} {:016x} 00000000", 0, 0));
        let expect = u32::from_str_radix(magic, 16).unwrap();
        assert_eq!(
            Request::parse(&raw.try_into().unwrap()),
            Err(RequestError::BadMagic { magic: expect })
        );
    }
}

// ---------------------------------------------------------------------------
// Reply encoders.
// ---------------------------------------------------------------------------

#[test]
fn golden_simple_replies() {
    assert_eq!(
        simple_reply_header(COOKIE, None).to_vec(),
        hex("67446698 00000000 0102030405060708")
    );
    assert_eq!(
        simple_reply(COOKIE, Ok(b"ab")),
        hex("67446698 00000000 0102030405060708 6162")
    );
    assert_eq!(
        simple_reply(COOKIE, Ok(&[])),
        hex("67446698 00000000 0102030405060708")
    );
    assert_eq!(
        simple_reply(COOKIE, Err(ErrorCode::NoSpc)),
        hex("67446698 0000001c 0102030405060708")
    );
    assert_eq!(
        error_reply(COOKIE, ErrorCode::Perm, false),
        hex("67446698 00000001 0102030405060708")
    );
}

#[test]
fn golden_structured_chunks() {
    let mut out = Vec::new();
    encode_chunk_header(&mut out, 0xabcd, 0x1234, COOKIE, 0x0a0b0c0d);
    assert_eq!(out, hex("668e33ef abcd 1234 0102030405060708 0a0b0c0d"));

    out.clear();
    encode_chunk_none(&mut out, COOKIE);
    assert_eq!(out, hex("668e33ef 0001 0000 0102030405060708 00000000"));

    out.clear();
    encode_chunk_offset_data(&mut out, COOKIE, 0x200, b"abc", false);
    assert_eq!(
        out,
        hex("668e33ef 0000 0001 0102030405060708 0000000b 0000000000000200 616263")
    );

    out.clear();
    encode_chunk_offset_hole(&mut out, COOKIE, 0x200, 0x1000, true);
    assert_eq!(
        out,
        hex("668e33ef 0001 0002 0102030405060708 0000000c 0000000000000200 00001000")
    );

    out.clear();
    encode_chunk_error(&mut out, COOKIE, ErrorCode::Inval, "hi", true);
    assert_eq!(
        out,
        hex("668e33ef 0001 8001 0102030405060708 00000008 00000016 0002 6869")
    );

    out.clear();
    encode_chunk_error_offset(&mut out, COOKIE, ErrorCode::Io, "hi", 0x400, false);
    assert_eq!(
        out,
        hex("668e33ef 0000 8002 0102030405060708 00000010 00000005 0002 6869 0000000000000400")
    );

    assert_eq!(
        error_reply(COOKIE, ErrorCode::Overflow, true),
        hex("668e33ef 0001 8001 0102030405060708 00000006 0000004b 0000")
    );
}

#[test]
fn error_messages_are_cut_to_4096_bytes_on_a_char_boundary() {
    let mut out = Vec::new();
    encode_chunk_error(&mut out, 1, ErrorCode::Io, &"x".repeat(5000), true);
    assert_eq!(out.len(), 20 + 6 + 4096);
    assert_eq!(out[16..20], (6u32 + 4096).to_be_bytes());
    assert_eq!(out[24..26], 4096u16.to_be_bytes());
    // 4095 ASCII bytes then a 2-byte character: it would end at 4097.
    let msg = format!("{}é", "x".repeat(4095));
    out.clear();
    encode_chunk_error_offset(&mut out, 1, ErrorCode::Io, &msg, 0, true);
    assert_eq!(out[24..26], 4095u16.to_be_bytes());
    assert_eq!(out.len(), 20 + 14 + 4095);
}

#[test]
#[should_panic(expected = "at least one byte")]
fn offset_data_must_not_be_empty() {
    encode_chunk_offset_data(&mut Vec::new(), 1, 0, &[], true);
}

#[test]
#[should_panic(expected = "nonzero")]
fn offset_hole_must_not_be_empty() {
    encode_chunk_offset_hole(&mut Vec::new(), 1, 0, 0, true);
}

#[test]
fn golden_read_replies() {
    let req = Request {
        flags: CommandFlags(0),
        command: Command::Read,
        cookie: COOKIE,
        offset: 0x200,
        length: 3,
    };
    let mut simple = ReadReply::new(&req, false);
    simple.data_mut().copy_from_slice(b"xyz");
    assert_eq!(
        simple.as_bytes(),
        hex("67446698 00000000 0102030405060708 78797a")
    );
    let mut structured = ReadReply::new(&req, true);
    assert_eq!(structured.data_mut(), &[0, 0, 0]);
    structured.data_mut().copy_from_slice(b"xyz");
    assert_eq!(
        structured.into_bytes(),
        hex("668e33ef 0001 0001 0102030405060708 0000000b 0000000000000200 78797a")
    );
}

// ---------------------------------------------------------------------------
// Validation rules.
// ---------------------------------------------------------------------------

/// 1 MiB, 512-byte blocks, every feature.
fn rw() -> ExportInfo {
    ExportInfo {
        block_sizes: BlockSizes::new(512, 4096, MAX).unwrap(),
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_write_zeroes: true,
        ..ExportInfo::new("rw", 1 << 20)
    }
}

/// 1 MiB, 1-byte blocks, no optional feature.
fn bare() -> ExportInfo {
    ExportInfo::new("bare", 1 << 20)
}

/// Read-only, 1 MiB, 1-byte blocks, every feature advertised.
fn ro() -> ExportInfo {
    ExportInfo {
        read_only: true,
        ..rw()
    }
}

fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags: CommandFlags(flags),
        command,
        cookie: 9,
        offset,
        length,
    }
}

fn v(r: &Request, e: &ExportInfo) -> Result<(), Validation> {
    validate(r, e, MAX, false)
}

fn vs(r: &Request, e: &ExportInfo) -> Result<(), Validation> {
    validate(r, e, MAX, true)
}

/// The rejection expected for `r` with error `error`: writes drain their
/// payload.
fn rejected(r: &Request, error: ErrorCode) -> Result<(), Validation> {
    Err(Validation::Reject {
        error,
        drain: r.payload_len(),
    })
}

const DATA_CMDS: [Command; 4] = [
    Command::Read,
    Command::Write,
    Command::Trim,
    Command::WriteZeroes,
];

#[test]
fn valid_requests_pass() {
    for c in DATA_CMDS {
        assert_eq!(v(&req(c, 0, 0, 512), &rw()), Ok(()), "{c:?}");
        assert_eq!(
            v(&req(c, 0, (1 << 20) - 4096, 4096), &rw()),
            Ok(()),
            "{c:?} to the end"
        );
    }
    assert_eq!(v(&req(Command::Flush, 0, 0, 0), &rw()), Ok(()));
    assert_eq!(v(&req(Command::Read, 0, 1, 1), &bare()), Ok(()));
    assert_eq!(v(&req(Command::Read, 0, 0, 512), &ro()), Ok(()));
    assert_eq!(v(&req(Command::Flush, 0, 0, 0), &ro()), Ok(()));
}

#[test]
fn rule_0_disc_is_always_accepted() {
    for e in [rw(), bare(), ro()] {
        assert_eq!(
            v(&req(Command::Disc, 0xffff, u64::MAX, u32::MAX), &e),
            Ok(())
        );
    }
}

#[test]
fn rule_1_unknown_command_is_einval() {
    for t in [8u16, 9, 0x100, 0xffff] {
        let r = req(Command::Unknown(t), 0, 0, 512);
        assert_eq!(v(&r, &rw()), rejected(&r, ErrorCode::Inval));
        assert_eq!(r.payload_len(), 0, "unknown commands have no payload");
    }
}

#[test]
fn rule_2_unknown_flag_bits_are_einval() {
    for bit in 5..16 {
        for c in [Command::Read, Command::Write, Command::Flush] {
            let len = if c == Command::Flush { 0 } else { 512 };
            let r = req(c, 1 << bit, 0, len);
            assert_eq!(
                vs(&r, &rw()),
                rejected(&r, ErrorCode::Inval),
                "{c:?} bit {bit}"
            );
        }
    }
}

#[test]
fn rule_3_fua_is_valid_on_every_command_when_advertised() {
    let fua = CommandFlags::FUA.bits();
    for c in DATA_CMDS {
        assert_eq!(v(&req(c, fua, 0, 512), &rw()), Ok(()), "{c:?}");
        let r = req(c, fua, 0, 512);
        let mut e = rw();
        e.can_fua = false;
        assert_eq!(
            v(&r, &e),
            rejected(&r, ErrorCode::Inval),
            "{c:?} without SEND_FUA"
        );
    }
    assert_eq!(v(&req(Command::Flush, fua, 0, 0), &rw()), Ok(()));
}

#[test]
fn rule_3_df_only_on_read_with_structured_replies() {
    let df = CommandFlags::DF.bits();
    let read = req(Command::Read, df, 0, 512);
    assert_eq!(vs(&read, &rw()), Ok(()));
    assert_eq!(v(&read, &rw()), rejected(&read, ErrorCode::Inval));
    for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
        let r = req(c, df, 0, 512);
        assert_eq!(vs(&r, &rw()), rejected(&r, ErrorCode::Inval), "{c:?}");
    }
}

#[test]
fn rule_3_no_hole_req_one_fast_zero() {
    let no_hole = CommandFlags::NO_HOLE.bits();
    assert_eq!(
        v(&req(Command::WriteZeroes, no_hole, 0, 512), &rw()),
        Ok(())
    );
    for c in [Command::Read, Command::Write, Command::Trim] {
        let r = req(c, no_hole, 0, 512);
        assert_eq!(
            v(&r, &rw()),
            rejected(&r, ErrorCode::Inval),
            "NO_HOLE on {c:?}"
        );
    }
    let r = req(Command::Read, CommandFlags::REQ_ONE.bits(), 0, 512);
    assert_eq!(vs(&r, &rw()), rejected(&r, ErrorCode::Inval));
    let r = req(Command::WriteZeroes, CommandFlags::FAST_ZERO.bits(), 0, 512);
    assert_eq!(v(&r, &rw()), rejected(&r, ErrorCode::Inval));
}

#[test]
fn rule_4_unadvertised_commands_are_einval() {
    for (c, len) in [
        (Command::Flush, 0),
        (Command::Trim, 512),
        (Command::WriteZeroes, 512),
    ] {
        let r = req(c, 0, 0, len);
        assert_eq!(v(&r, &bare()), rejected(&r, ErrorCode::Inval), "{c:?}");
    }
    for c in [Command::Cache, Command::BlockStatus] {
        let r = req(c, 0, 0, 512);
        assert_eq!(vs(&r, &rw()), rejected(&r, ErrorCode::Inval), "{c:?}");
    }
    let r = req(Command::BlockStatus, CommandFlags::REQ_ONE.bits(), 0, 512);
    assert_eq!(vs(&r, &rw()), rejected(&r, ErrorCode::Inval));
}

#[test]
fn rule_5_writes_to_read_only_are_eperm() {
    for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
        // Even past the end: EPERM comes first.
        for (off, len) in [(0, 512), (1 << 20, 512)] {
            let r = req(c, 0, off, len);
            assert_eq!(v(&r, &ro()), rejected(&r, ErrorCode::Perm), "{c:?}");
        }
    }
    let w = req(Command::Write, 0, 0, 4096);
    assert_eq!(
        v(&w, &ro()),
        Err(Validation::Reject {
            error: ErrorCode::Perm,
            drain: 4096
        })
    );
}

#[test]
fn rule_6_flush_with_offset_or_length_is_einval() {
    for (off, len) in [(1, 0), (0, 1), (512, 512)] {
        let r = req(Command::Flush, 0, off, len);
        assert_eq!(v(&r, &rw()), rejected(&r, ErrorCode::Inval));
    }
}

#[test]
fn rule_7_zero_length_is_einval() {
    for c in DATA_CMDS {
        let r = req(c, 0, 0, 0);
        assert_eq!(v(&r, &rw()), rejected(&r, ErrorCode::Inval), "{c:?}");
    }
}

#[test]
fn rule_8_payload_limit() {
    let big = ExportInfo {
        size: 1 << 40,
        ..rw()
    };
    let over = MAX + 512;
    let r = req(Command::Read, 0, 0, over);
    assert_eq!(v(&r, &big), rejected(&r, ErrorCode::Inval));
    assert_eq!(vs(&r, &big), rejected(&r, ErrorCode::Overflow));
    let w = req(Command::Write, 0, 0, over);
    assert_eq!(
        vs(&w, &big),
        Err(Validation::Reject {
            error: ErrorCode::Inval,
            drain: over
        })
    );
    assert_eq!(v(&req(Command::Read, 0, 0, MAX), &big), Ok(()));
    // No payload: trim and write zeroes may exceed it.
    assert_eq!(v(&req(Command::Trim, 0, 0, over), &big), Ok(()));
    assert_eq!(
        v(&req(Command::WriteZeroes, 0, 0, u32::MAX - 511), &big),
        Ok(())
    );
    // The smaller of the server's limit and the export's maximum applies.
    let r = req(Command::Read, 0, 0, 8192);
    assert_eq!(
        validate(&r, &big, 4096, false),
        rejected(&r, ErrorCode::Inval)
    );
    let small = ExportInfo {
        block_sizes: BlockSizes::new(512, 4096, 4096).unwrap(),
        ..big.clone()
    };
    assert_eq!(
        validate(&r, &small, MAX, false),
        rejected(&r, ErrorCode::Inval)
    );
    assert_eq!(
        validate(&req(Command::Read, 0, 0, 4096), &small, MAX, false),
        Ok(())
    );
}

#[test]
fn rule_8_absurd_writes_disconnect() {
    let big = ExportInfo {
        size: 1 << 40,
        ..rw()
    };
    // Drained up to MAX_WRITE_DRAIN (64 MiB) ...
    let r = req(Command::Write, 0, 0, MAX_WRITE_DRAIN);
    assert_eq!(
        v(&r, &big),
        Err(Validation::Reject {
            error: ErrorCode::Inval,
            drain: MAX_WRITE_DRAIN
        })
    );
    // ... beyond that, no reply: disconnect. Whatever else is wrong with it.
    for r in [
        req(Command::Write, 0, 0, MAX_WRITE_DRAIN + 1),
        req(Command::Write, 0x8000, 0, u32::MAX),
        req(Command::Write, 0, u64::MAX, u32::MAX),
    ] {
        assert_eq!(
            v(&r, &big),
            Err(Validation::Disconnect { length: r.length })
        );
        assert_eq!(v(&r, &big).unwrap_err().error(), None);
    }
    assert_eq!(
        v(&req(Command::Write, 0, 0, u32::MAX), &ro()),
        Err(Validation::Disconnect { length: u32::MAX })
    );
    // A server that buffers more raises the drain limit with it.
    let huge = ExportInfo {
        block_sizes: BlockSizes::new(1, 4096, u32::MAX).unwrap(),
        size: 1 << 40,
        ..rw()
    };
    let r = req(Command::Write, 0, u64::MAX - 10, 1 << 30);
    assert_eq!(
        validate(&r, &huge, u32::MAX, false),
        Err(Validation::Reject {
            error: ErrorCode::Inval,
            drain: 1 << 30
        })
    );
}

#[test]
fn rule_9_offset_overflow_is_einval() {
    let e = ExportInfo {
        size: u64::MAX,
        ..bare()
    };
    let mut e_all = e.clone();
    e_all.can_trim = true;
    e_all.can_write_zeroes = true;
    for c in DATA_CMDS {
        let r = req(c, 0, u64::MAX - 10, 512);
        assert_eq!(v(&r, &e_all), rejected(&r, ErrorCode::Inval), "{c:?}");
    }
    // Ending exactly at 2^64 - 1 is fine for an export that large.
    assert_eq!(v(&req(Command::Read, 0, u64::MAX - 512, 512), &e), Ok(()));
}

#[test]
fn rule_10_unaligned_is_einval() {
    for c in DATA_CMDS {
        for (off, len) in [(1, 512), (0, 513), (511, 1), (256, 256)] {
            let r = req(c, 0, off, len);
            assert_eq!(
                v(&r, &rw()),
                rejected(&r, ErrorCode::Inval),
                "{c:?} {off}+{len}"
            );
        }
    }
    // Unaligned and past the end: alignment is checked first.
    let r = req(Command::Write, 0, (1 << 20) - 1, 2);
    assert_eq!(v(&r, &rw()), rejected(&r, ErrorCode::Inval));
}

#[test]
fn rule_11_past_the_end() {
    for (c, errno) in [
        (Command::Write, ErrorCode::NoSpc),
        (Command::WriteZeroes, ErrorCode::NoSpc),
        (Command::Read, ErrorCode::Inval),
        (Command::Trim, ErrorCode::Inval),
    ] {
        for (off, len) in [((1 << 20) - 512, 1024), (1 << 20, 512), (1 << 30, 512)] {
            let r = req(c, 0, off, len);
            assert_eq!(v(&r, &rw()), rejected(&r, errno), "{c:?} {off}+{len}");
        }
    }
    let w = req(Command::Write, 0, 1 << 20, 512);
    assert_eq!(
        v(&w, &rw()),
        Err(Validation::Reject {
            error: ErrorCode::NoSpc,
            drain: 512
        })
    );
}

#[test]
fn empty_export_accepts_no_data_command() {
    let e = ExportInfo { size: 0, ..rw() };
    for c in DATA_CMDS {
        assert!(v(&req(c, 0, 0, 512), &e).is_err(), "{c:?}");
    }
    assert_eq!(v(&req(Command::Flush, 0, 0, 0), &e), Ok(()));
}
