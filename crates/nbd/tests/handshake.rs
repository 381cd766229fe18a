//! Handshake transcripts: scripted clients over in-memory streams and one
//! real duplex socket pair, plus golden bytes for the handshake encoders.

mod common;

use std::io::{ErrorKind, Read, Write};

use common::{Reply, Script, go_data, hex, opt, parse_replies};
use nbd::handshake::{
    encode_export_name_reply, encode_greeting, encode_info_block_size, encode_info_export,
    encode_info_string, encode_option_reply, encode_rep_server, parse_name,
};
use nbd::wire::*;
use nbd::{
    BlockSizes, ClientFlags, ExportInfo, ExportList, HandshakeError, HandshakeLimits, InfoRequest,
    Negotiated, OptionHeader, TransmissionFlags,
};

const FIXED: u32 = NBD_FLAG_C_FIXED_NEWSTYLE;
const FIXED_NZ: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
const GREETING: &str = "4e42444d41474943 49484156454f5054 0003";

fn disk() -> ExportInfo {
    ExportInfo {
        description: "main disk".into(),
        block_sizes: BlockSizes::new(512, 4096, 1 << 25).unwrap(),
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_write_zeroes: true,
        can_multi_conn: true,
        ..ExportInfo::new("disk", 1 << 20)
    }
}

fn ro() -> ExportInfo {
    ExportInfo {
        read_only: true,
        ..ExportInfo::new("ro", 4096)
    }
}

fn table() -> ExportList {
    ExportList::new(vec![disk(), ro()]).with_default("disk")
}

/// Flags for `disk`: HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM |
/// SEND_WRITE_ZEROES | CAN_MULTI_CONN.
const DISK_FLAGS: u16 = 0x016d;

fn client(flags: u32, options: &[Vec<u8>]) -> Vec<u8> {
    let mut b = flags.to_be_bytes().to_vec();
    for o in options {
        b.extend_from_slice(o);
    }
    b
}

struct Run {
    result: Result<Negotiated, HandshakeError>,
    replies: Vec<Reply>,
    tail: Vec<u8>,
    unread: usize,
}

fn run_with(input: Vec<u8>, exports: &ExportList, limits: HandshakeLimits) -> Run {
    let mut s = Script::new(input);
    let result = nbd::negotiate(&mut s, exports, limits);
    assert_eq!(s.output[..18], hex(GREETING)[..], "greeting first");
    let (replies, tail) = parse_replies(&s.output[18..]);
    Run {
        result,
        replies,
        tail,
        unread: s.unread(),
    }
}

fn run(input: Vec<u8>) -> Run {
    run_with(input, &table(), HandshakeLimits::default())
}

fn reply(option: u32, reply_type: u32, data: &[u8]) -> Reply {
    Reply {
        option,
        reply_type,
        data: data.to_vec(),
    }
}

fn info_export(option: u32, size: u64, flags: u16) -> Reply {
    let mut d = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    reply(option, NBD_REP_INFO, &d)
}

fn info_block_size(option: u32, min: u32, pref: u32, max: u32) -> Reply {
    let mut d = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, pref, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    reply(option, NBD_REP_INFO, &d)
}

fn info_str(option: u32, t: u16, s: &str) -> Reply {
    let mut d = t.to_be_bytes().to_vec();
    d.extend_from_slice(s.as_bytes());
    reply(option, NBD_REP_INFO, &d)
}

fn ack(option: u32) -> Reply {
    reply(option, NBD_REP_ACK, &[])
}

fn err_type(r: &Reply) -> u32 {
    assert!(r.reply_type & NBD_REP_FLAG_ERROR != 0, "{r:?} is no error");
    r.reply_type
}

// ---------------------------------------------------------------------------
// Golden bytes of the sans-I/O encoders, written out from the spec's layouts.
// ---------------------------------------------------------------------------

#[test]
fn golden_greeting() {
    assert_eq!(encode_greeting().to_vec(), hex(GREETING));
}

#[test]
fn golden_option_reply_and_header() {
    let mut out = Vec::new();
    encode_option_reply(&mut out, NBD_OPT_LIST, NBD_REP_ACK, &[]);
    assert_eq!(out, hex("0003e889045565a9 00000003 00000001 00000000"));
    out.clear();
    encode_option_reply(&mut out, 42, NBD_REP_ERR_UNSUP, b"no");
    assert_eq!(out, hex("0003e889045565a9 0000002a 80000001 00000002 6e6f"));

    let h = OptionHeader {
        option: NBD_OPT_GO,
        length: 0x0102,
    };
    let raw = hex("49484156454f5054 00000007 00000102");
    assert_eq!(h.encode().to_vec(), raw);
    assert_eq!(OptionHeader::parse(&raw.try_into().unwrap()).unwrap(), h);
}

#[test]
fn golden_rep_server() {
    let mut out = Vec::new();
    encode_rep_server(&mut out, NBD_OPT_LIST, &disk());
    // length 4 + 4 + 9; name length 4, "disk", "main disk".
    assert_eq!(
        out,
        hex("0003e889045565a9 00000003 00000002 00000011 00000004 6469736b 6d61696e206469736b")
    );
}

#[test]
fn golden_info_replies() {
    let mut out = Vec::new();
    encode_info_export(
        &mut out,
        NBD_OPT_GO,
        0x1_0000_0000,
        TransmissionFlags(0x016d),
    );
    assert_eq!(
        out,
        hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000100000000 016d")
    );
    out.clear();
    encode_info_block_size(
        &mut out,
        NBD_OPT_INFO,
        BlockSizes::new(512, 4096, 1 << 25).unwrap(),
    );
    assert_eq!(
        out,
        hex("0003e889045565a9 00000006 00000003 0000000e 0003 00000200 00001000 02000000")
    );
    out.clear();
    encode_info_string(&mut out, NBD_OPT_GO, NBD_INFO_NAME, "ab");
    assert_eq!(
        out,
        hex("0003e889045565a9 00000007 00000003 00000004 0001 6162")
    );
    out.clear();
    encode_info_string(&mut out, NBD_OPT_GO, NBD_INFO_DESCRIPTION, "");
    assert_eq!(out, hex("0003e889045565a9 00000007 00000003 00000002 0002"));
}

#[test]
fn golden_export_name_reply() {
    let mut out = Vec::new();
    encode_export_name_reply(&mut out, 0x1234, TransmissionFlags(0x0003), true);
    assert_eq!(out, hex("0000000000001234 0003"));
    out.clear();
    encode_export_name_reply(&mut out, 0x1234, TransmissionFlags(0x0003), false);
    let mut expect = hex("0000000000001234 0003");
    expect.extend_from_slice(&[0; 124]);
    assert_eq!(out, expect);
}

#[test]
fn info_request_parse_and_encode() {
    let raw = hex("00000002 6162 0002 0003 0001");
    let r = InfoRequest::parse(&raw).unwrap();
    assert_eq!(r.name, b"ab");
    assert_eq!(r.requests, vec![3, 1]);
    assert_eq!(r.encode(), raw);
    assert_eq!(InfoRequest::parse(&hex("00000000 0000")).unwrap().name, b"");
    for bad in [
        "",                           // empty
        "00000000 00",                // 5 bytes
        "00000003 6162 0000",         // name longer than data - 6
        "00000002 6162 0001",         // count 1, no request
        "00000002 6162 0000 0001",    // count 0, two extra bytes
        "00000002 6162 0001 0001 00", // odd trailing byte
        "ffffffff 0000",              // huge name length
    ] {
        assert_eq!(InfoRequest::parse(&hex(bad)), None, "{bad}");
    }
}

#[test]
fn client_flags_and_names() {
    assert_eq!(
        ClientFlags::parse([0, 0, 0, 3]).unwrap(),
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        }
    );
    assert_eq!(
        ClientFlags::parse([0, 0, 0, 0]).unwrap(),
        ClientFlags::default()
    );
    for flags in [4u32, 0x8000_0000, 0xffff_ffff] {
        match ClientFlags::parse(flags.to_be_bytes()) {
            Err(HandshakeError::UnknownClientFlags { flags: f }) => assert_eq!(f, flags),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(parse_name(b"disk"), Some("disk"));
    assert_eq!(parse_name(b""), Some(""));
    assert_eq!(parse_name(b"a\0b"), None);
    assert_eq!(parse_name(&[0xff, 0xfe]), None);
    assert_eq!(parse_name(&[b'a'; 4097]), None);
    assert!(parse_name(&[b'a'; 4096]).is_some());
}

// ---------------------------------------------------------------------------
// Transcripts.
// ---------------------------------------------------------------------------

#[test]
fn go_with_every_info_request() {
    let mut input = client(
        FIXED,
        &[opt(
            NBD_OPT_GO,
            &go_data(
                "disk",
                &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 77],
            ),
        )],
    );
    // The first transmission request must stay unread.
    input.extend_from_slice(&[0x25; 28]);
    let r = run(input);
    assert_eq!(
        r.replies,
        vec![
            info_export(NBD_OPT_GO, 1 << 20, DISK_FLAGS),
            info_block_size(NBD_OPT_GO, 512, 4096, 1 << 25),
            info_str(NBD_OPT_GO, NBD_INFO_NAME, "disk"),
            info_str(NBD_OPT_GO, NBD_INFO_DESCRIPTION, "main disk"),
            ack(NBD_OPT_GO),
        ]
    );
    assert!(r.tail.is_empty(), "no zero padding after GO's ACK");
    assert_eq!(r.unread, 28);
    let n = r.result.unwrap();
    assert_eq!(n.export, disk());
    assert_eq!(n.transmission_flags, TransmissionFlags(DISK_FLAGS));
    assert!(!n.structured_replies);
    assert!(n.block_size_requested);
    assert_eq!(n.entered_by, NBD_OPT_GO);
    assert_eq!(
        n.client_flags,
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: false
        }
    );
}

#[test]
fn go_sends_block_size_for_non_default_exports_only_and_honours_default_name() {
    // disk has a 512-byte minimum: BLOCK_SIZE is sent even unasked.
    let r = run(client(FIXED, &[opt(NBD_OPT_GO, &go_data("", &[]))]));
    assert_eq!(
        r.replies,
        vec![
            info_export(NBD_OPT_GO, 1 << 20, DISK_FLAGS),
            info_block_size(NBD_OPT_GO, 512, 4096, 1 << 25),
            ack(NBD_OPT_GO),
        ]
    );
    let n = r.result.unwrap();
    assert_eq!(n.export.name, "disk", "empty name selects the default");
    assert!(!n.block_size_requested);

    // ro has default sizes: nothing but NBD_INFO_EXPORT.
    let r = run(client(FIXED, &[opt(NBD_OPT_GO, &go_data("ro", &[]))]));
    assert_eq!(
        r.replies,
        vec![info_export(NBD_OPT_GO, 4096, 0x0003), ack(NBD_OPT_GO)]
    );
    // No description: NBD_INFO_DESCRIPTION is skipped even when asked.
    let r = run(client(
        FIXED,
        &[opt(
            NBD_OPT_GO,
            &go_data("ro", &[NBD_INFO_DESCRIPTION, NBD_INFO_DESCRIPTION]),
        )],
    ));
    assert_eq!(
        r.replies,
        vec![info_export(NBD_OPT_GO, 4096, 0x0003), ack(NBD_OPT_GO)]
    );
}

#[test]
fn structured_reply_then_go_sets_df_and_is_recorded() {
    let r = run(client(
        FIXED_NZ,
        &[
            opt(NBD_OPT_STRUCTURED_REPLY, &[]),
            opt(NBD_OPT_GO, &go_data("disk", &[NBD_INFO_BLOCK_SIZE])),
        ],
    ));
    assert_eq!(r.replies[0], ack(NBD_OPT_STRUCTURED_REPLY));
    assert_eq!(
        r.replies[1],
        info_export(NBD_OPT_GO, 1 << 20, DISK_FLAGS | NBD_FLAG_SEND_DF)
    );
    let n = r.result.unwrap();
    assert!(n.structured_replies);
    assert!(n.transmission_flags.has(NBD_FLAG_SEND_DF));
}

#[test]
fn structured_reply_with_data_is_invalid_and_not_recorded() {
    let r = run(client(
        FIXED,
        &[
            opt(NBD_OPT_STRUCTURED_REPLY, b"x"),
            opt(NBD_OPT_GO, &go_data("ro", &[])),
        ],
    ));
    assert_eq!(err_type(&r.replies[0]), NBD_REP_ERR_INVALID);
    assert_eq!(r.replies[0].option, NBD_OPT_STRUCTURED_REPLY);
    assert!(!r.result.unwrap().structured_replies);
}

#[test]
fn info_then_go() {
    let r = run(client(
        FIXED,
        &[
            opt(NBD_OPT_INFO, &go_data("ro", &[NBD_INFO_NAME])),
            opt(NBD_OPT_GO, &go_data("ro", &[NBD_INFO_NAME])),
        ],
    ));
    assert_eq!(
        r.replies,
        vec![
            info_export(NBD_OPT_INFO, 4096, 0x0003),
            info_str(NBD_OPT_INFO, NBD_INFO_NAME, "ro"),
            ack(NBD_OPT_INFO),
            info_export(NBD_OPT_GO, 4096, 0x0003),
            info_str(NBD_OPT_GO, NBD_INFO_NAME, "ro"),
            ack(NBD_OPT_GO),
        ]
    );
    assert_eq!(r.result.unwrap().export, ro());
}

#[test]
fn info_alone_does_not_enter_transmission() {
    let r = run(client(FIXED, &[opt(NBD_OPT_INFO, &go_data("ro", &[]))]));
    assert_eq!(r.replies.last(), Some(&ack(NBD_OPT_INFO)));
    match r.result {
        Err(HandshakeError::Io { source }) => assert_eq!(source.kind(), ErrorKind::UnexpectedEof),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_export_gets_err_unknown_and_haggling_goes_on() {
    let r = run(client(
        FIXED,
        &[
            opt(NBD_OPT_GO, &go_data("nope", &[NBD_INFO_BLOCK_SIZE])),
            opt(NBD_OPT_INFO, &go_data("nope", &[])),
            opt(NBD_OPT_GO, &go_data("ro", &[])),
        ],
    ));
    assert_eq!(r.replies.len(), 4, "no NBD_REP_INFO before ERR_UNKNOWN");
    assert_eq!(r.replies[0].option, NBD_OPT_GO);
    assert_eq!(err_type(&r.replies[0]), NBD_REP_ERR_UNKNOWN);
    assert_eq!(err_type(&r.replies[1]), NBD_REP_ERR_UNKNOWN);
    assert_eq!(r.result.unwrap().export.name, "ro");
}

#[test]
fn empty_name_without_default_is_unknown() {
    let exports = ExportList::new(vec![ro()]);
    let r = run_with(
        client(
            FIXED,
            &[opt(NBD_OPT_GO, &go_data("", &[])), opt(NBD_OPT_ABORT, &[])],
        ),
        &exports,
        HandshakeLimits::default(),
    );
    assert_eq!(err_type(&r.replies[0]), NBD_REP_ERR_UNKNOWN);
    assert_eq!(r.replies[1], ack(NBD_OPT_ABORT));
    assert!(r.result.unwrap_err().is_client_abort());
}

#[test]
fn malformed_go_data_is_invalid() {
    let mut bad_utf8 = go_data("", &[]);
    bad_utf8.splice(0..4, 2u32.to_be_bytes());
    bad_utf8.splice(4..4, [0xc3, 0x28]);
    let cases: Vec<Vec<u8>> = vec![
        vec![],                             // no data at all
        hex("00000000 00"),                 // truncated: 5 bytes
        hex("00000009 6469736b 0000"),      // name length past the data
        hex("00000004 6469736b 0002 0003"), // count says 2, one given
        hex("00000004 6469736b 0000 0003"), // count says 0, one given
        go_data("di\0sk", &[]),             // NUL in the name
        bad_utf8,                           // not UTF-8
        go_data(&"d".repeat(4097), &[]),    // longer than 4096
    ];
    for (i, data) in cases.iter().enumerate() {
        for option in [NBD_OPT_GO, NBD_OPT_INFO] {
            let r = run(client(
                FIXED,
                &[opt(option, data), opt(NBD_OPT_GO, &go_data("ro", &[]))],
            ));
            assert_eq!(r.replies[0].option, option, "case {i}");
            assert_eq!(err_type(&r.replies[0]), NBD_REP_ERR_INVALID, "case {i}");
            assert!(!r.replies[0].data.is_empty(), "error carries a message");
            assert_eq!(
                r.result.unwrap().export.name,
                "ro",
                "case {i}: stream in step"
            );
        }
    }
}

#[test]
fn list_sends_one_server_reply_per_export_then_ack() {
    let r = run(client(
        FIXED,
        &[opt(NBD_OPT_LIST, &[]), opt(NBD_OPT_ABORT, &[])],
    ));
    let mut disk_data = hex("00000004");
    disk_data.extend_from_slice(b"diskmain disk");
    assert_eq!(
        r.replies,
        vec![
            reply(NBD_OPT_LIST, NBD_REP_SERVER, &disk_data),
            reply(NBD_OPT_LIST, NBD_REP_SERVER, &hex("00000002 726f")),
            ack(NBD_OPT_LIST),
            ack(NBD_OPT_ABORT),
        ]
    );
}

#[test]
fn list_with_data_is_invalid() {
    let r = run(client(
        FIXED,
        &[opt(NBD_OPT_LIST, b"zz"), opt(NBD_OPT_ABORT, &[])],
    ));
    assert_eq!(r.replies.len(), 2);
    assert_eq!(err_type(&r.replies[0]), NBD_REP_ERR_INVALID);
    assert_eq!(r.replies[1], ack(NBD_OPT_ABORT));
}

#[test]
fn export_name_with_zeroes() {
    let mut input = client(FIXED, &[opt(NBD_OPT_EXPORT_NAME, b"ro")]);
    input.extend_from_slice(&[1; 28]);
    let r = run(input);
    assert!(r.replies.is_empty());
    let mut expect = hex("0000000000001000 0003");
    expect.extend_from_slice(&[0; 124]);
    assert_eq!(r.tail, expect);
    assert_eq!(r.unread, 28);
    let n = r.result.unwrap();
    assert_eq!(n.entered_by, NBD_OPT_EXPORT_NAME);
    assert_eq!(n.export, ro());
    assert!(!n.block_size_requested);
}

#[test]
fn export_name_with_no_zeroes() {
    let r = run(client(FIXED_NZ, &[opt(NBD_OPT_EXPORT_NAME, b"ro")]));
    assert_eq!(r.tail, hex("0000000000001000 0003"));
    assert!(r.result.unwrap().client_flags.no_zeroes);
}

#[test]
fn export_name_default_and_after_structured_reply() {
    let r = run(client(
        FIXED_NZ,
        &[
            opt(NBD_OPT_STRUCTURED_REPLY, &[]),
            opt(NBD_OPT_EXPORT_NAME, b""),
        ],
    ));
    assert_eq!(r.replies, vec![ack(NBD_OPT_STRUCTURED_REPLY)]);
    assert_eq!(r.tail, hex("0000000000100000 01ed"));
    let n = r.result.unwrap();
    assert_eq!(n.export.name, "disk");
    assert!(n.structured_replies);
}

#[test]
fn export_name_unknown_disconnects_without_reply() {
    for name in [&b"nope"[..], b"\xff", b""] {
        let exports = ExportList::new(vec![ro()]);
        let r = run_with(
            client(FIXED, &[opt(NBD_OPT_EXPORT_NAME, name)]),
            &exports,
            HandshakeLimits::default(),
        );
        assert!(r.replies.is_empty() && r.tail.is_empty());
        assert!(matches!(
            r.result,
            Err(HandshakeError::UnknownExport { .. })
        ));
    }
}

#[test]
fn non_fixed_newstyle_client_is_served() {
    let r = run(client(0, &[opt(NBD_OPT_EXPORT_NAME, b"ro")]));
    assert_eq!(r.tail.len(), 134);
    assert!(!r.result.unwrap().client_flags.fixed_newstyle);
}

#[test]
fn abort_acks_then_ends() {
    let mut input = client(FIXED, &[opt(NBD_OPT_ABORT, &[])]);
    input.extend_from_slice(&opt(NBD_OPT_LIST, &[]));
    let r = run(input);
    assert_eq!(r.replies, vec![ack(NBD_OPT_ABORT)]);
    assert_eq!(r.unread, 16, "nothing read after NBD_OPT_ABORT");
    assert!(matches!(r.result, Err(HandshakeError::ClientAborted)));
}

#[test]
fn abort_with_data_still_acks() {
    let r = run(client(FIXED, &[opt(NBD_OPT_ABORT, b"bye")]));
    assert_eq!(r.replies, vec![ack(NBD_OPT_ABORT)]);
    assert!(r.result.unwrap_err().is_client_abort());
}

#[test]
fn abort_when_client_already_left() {
    let mut s = Script::new(client(FIXED, &[opt(NBD_OPT_ABORT, &[])]));
    s.fail_writes_after = Some(18);
    let result = nbd::negotiate(&mut s, &table(), HandshakeLimits::default());
    assert!(matches!(result, Err(HandshakeError::ClientAborted)));
}

#[test]
fn unknown_options_get_err_unsup_and_are_skipped() {
    let options = [
        NBD_OPT_PEEK_EXPORT,
        NBD_OPT_STARTTLS,
        NBD_OPT_LIST_META_CONTEXT,
        NBD_OPT_SET_META_CONTEXT,
        NBD_OPT_EXTENDED_HEADERS,
        0,
        12,
        0xdead_beef,
    ];
    let mut opts: Vec<Vec<u8>> = options
        .iter()
        .map(|&o| opt(o, b"\x00\x00\x00\x04disk\x00\x00\x00\x00"))
        .collect();
    opts.push(opt(NBD_OPT_GO, &go_data("ro", &[])));
    let r = run(client(FIXED, &opts));
    for (reply, &option) in r.replies.iter().zip(&options) {
        assert_eq!(reply.option, option);
        assert_eq!(err_type(reply), NBD_REP_ERR_UNSUP);
    }
    assert_eq!(r.replies.len(), options.len() + 2);
    assert_eq!(r.result.unwrap().export.name, "ro");
}

#[test]
fn bad_option_magic_disconnects() {
    let mut bad = opt(NBD_OPT_LIST, &[]);
    bad[0] ^= 1;
    let r = run(client(FIXED, &[opt(NBD_OPT_LIST, &[]), bad]));
    assert_eq!(r.replies.len(), 3, "first LIST answered, then nothing");
    assert!(r.tail.is_empty());
    match r.result {
        Err(HandshakeError::BadOptionMagic { magic }) => assert_eq!(magic, IHAVEOPT ^ (1 << 56)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_options_end_with_eof() {
    let full = opt(NBD_OPT_GO, &go_data("disk", &[]));
    for cut in [3, 10, 16, 17, full.len() - 1] {
        let r = run(client(FIXED, &[full[..cut].to_vec()]));
        assert!(r.replies.is_empty() && r.tail.is_empty(), "cut {cut}");
        match r.result {
            Err(HandshakeError::Io { source }) => {
                assert_eq!(source.kind(), ErrorKind::UnexpectedEof)
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    // Truncated client flags.
    let r = run(vec![0, 0]);
    assert!(matches!(r.result, Err(HandshakeError::Io { .. })));
}

#[test]
fn oversize_options_are_discarded_and_answered_too_big() {
    let big = vec![0u8; 64 * 1024 + 1];
    let r = run(client(
        FIXED,
        &[
            opt(NBD_OPT_GO, &big),
            opt(NBD_OPT_INFO, &big),
            opt(99, &big),
            opt(NBD_OPT_LIST, &big),
            opt(NBD_OPT_ABORT, &big),
        ],
    ));
    let types: Vec<u32> = r.replies.iter().map(|r| r.reply_type).collect();
    assert_eq!(
        types,
        vec![
            NBD_REP_ERR_TOO_BIG,
            NBD_REP_ERR_TOO_BIG,
            NBD_REP_ERR_UNSUP,
            NBD_REP_ERR_INVALID,
            NBD_REP_ACK
        ]
    );
    assert!(r.result.unwrap_err().is_client_abort());
    // Exactly at the limit is still read and parsed (here: malformed).
    let r = run(client(FIXED, &[opt(NBD_OPT_GO, &big[1..])]));
    assert_eq!(err_type(&r.replies[0]), NBD_REP_ERR_INVALID);
}

#[test]
fn options_beyond_the_discard_limit_disconnect_without_reading() {
    for option in [NBD_OPT_GO, 99, NBD_OPT_ABORT] {
        let mut input = client(FIXED, &[]);
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&option.to_be_bytes());
        input.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
        input.extend_from_slice(&[0; 100]);
        let r = run(input);
        assert!(r.replies.is_empty());
        assert_eq!(r.unread, 100, "the data was not read");
        match r.result {
            Err(HandshakeError::OptionTooLong {
                option: o,
                length,
                limit,
            }) => assert_eq!((o, length, limit), (option, 0x7fff_ffff, 1024 * 1024)),
            other => panic!("{other:?}"),
        }
    }
    // NBD_OPT_EXPORT_NAME cannot be answered with an error: over 64 KiB is
    // a disconnect already.
    let r = run(client(
        FIXED,
        &[opt(NBD_OPT_EXPORT_NAME, &vec![b'a'; 70_000])],
    ));
    assert!(matches!(
        r.result,
        Err(HandshakeError::OptionTooLong { limit: 65536, .. })
    ));
}

#[test]
fn unknown_client_flags_disconnect_before_any_option() {
    for flags in [0x4u32, 0x3 | 0x100, 0x8000_0000] {
        let r = run(client(flags, &[opt(NBD_OPT_LIST, &[])]));
        assert!(r.replies.is_empty() && r.tail.is_empty());
        assert_eq!(r.unread, 16);
        assert!(matches!(
            r.result,
            Err(HandshakeError::UnknownClientFlags { flags: f }) if f == flags
        ));
    }
}

#[test]
fn too_many_options_disconnect() {
    let limits = HandshakeLimits {
        max_options: 3,
        ..HandshakeLimits::default()
    };
    let opts: Vec<Vec<u8>> = (0..5).map(|_| opt(99, &[])).collect();
    let r = run_with(client(FIXED, &opts), &table(), limits);
    assert_eq!(r.replies.len(), 3);
    assert!(matches!(
        r.result,
        Err(HandshakeError::TooManyOptions { limit: 3 })
    ));
}

#[test]
fn block_size_policy() {
    let strict = HandshakeLimits {
        require_block_size_request: true,
        ..HandshakeLimits::default()
    };
    // GO without NBD_INFO_BLOCK_SIZE on a 512-byte export: refused, with the
    // sizes sent first; asking for them then succeeds.
    let r = run_with(
        client(
            FIXED,
            &[
                opt(NBD_OPT_GO, &go_data("disk", &[])),
                opt(NBD_OPT_INFO, &go_data("disk", &[])),
                opt(NBD_OPT_GO, &go_data("disk", &[NBD_INFO_BLOCK_SIZE])),
            ],
        ),
        &table(),
        strict,
    );
    assert_eq!(
        r.replies[0],
        info_block_size(NBD_OPT_GO, 512, 4096, 1 << 25)
    );
    assert_eq!(err_type(&r.replies[1]), NBD_REP_ERR_BLOCK_SIZE_REQD);
    // NBD_OPT_INFO is never refused for it.
    assert_eq!(r.replies[4], ack(NBD_OPT_INFO));
    assert!(r.result.unwrap().block_size_requested);
    // Default-sized exports are never refused.
    let r = run_with(
        client(FIXED, &[opt(NBD_OPT_GO, &go_data("ro", &[]))]),
        &table(),
        strict,
    );
    assert!(r.result.is_ok());
    // NBD_OPT_EXPORT_NAME to a 512-byte export: hard disconnect.
    let r = run_with(
        client(FIXED, &[opt(NBD_OPT_EXPORT_NAME, b"disk")]),
        &table(),
        strict,
    );
    assert!(r.tail.is_empty());
    assert!(matches!(
        r.result,
        Err(HandshakeError::BlockSizeRequired { .. })
    ));
}

#[test]
fn negotiated_validate_uses_the_session() {
    let r = run(client(
        FIXED,
        &[
            opt(NBD_OPT_STRUCTURED_REPLY, &[]),
            opt(NBD_OPT_GO, &go_data("disk", &[])),
        ],
    ));
    let n = r.result.unwrap();
    let read = nbd::Request {
        flags: nbd::CommandFlags::DF,
        command: nbd::Command::Read,
        cookie: 1,
        offset: 0,
        length: 512,
    };
    assert_eq!(n.validate(&read), Ok(()));
    let unaligned = nbd::Request { offset: 1, ..read };
    assert_eq!(
        n.validate(&unaligned).unwrap_err().error(),
        Some(nbd::ErrorCode::Inval)
    );
}

/// A real duplex conversation over a socket pair: the client waits for every
/// reply before sending the next message, so a server that read ahead or
/// forgot to flush would hang (the test has a timeout on the socket).
#[test]
fn duplex_socket_transcript() {
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    let (mut server, mut client_sock) = UnixStream::pair().unwrap();
    for s in [&server, &client_sock] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let client_thread = std::thread::spawn(move || {
        let c = &mut client_sock;
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).unwrap();
        assert_eq!(greeting.to_vec(), hex(GREETING));
        c.write_all(&FIXED_NZ.to_be_bytes()).unwrap();
        let read_reply = |c: &mut UnixStream| {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).unwrap();
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0; len];
            c.read_exact(&mut d).unwrap();
            let (mut replies, rest) = parse_replies(&[&h[..], &d[..]].concat());
            assert!(rest.is_empty());
            replies.remove(0)
        };
        c.write_all(&opt(NBD_OPT_STRUCTURED_REPLY, &[])).unwrap();
        assert_eq!(read_reply(c), ack(NBD_OPT_STRUCTURED_REPLY));
        c.write_all(&opt(NBD_OPT_LIST, &[])).unwrap();
        assert_eq!(read_reply(c).reply_type, NBD_REP_SERVER);
        assert_eq!(read_reply(c).reply_type, NBD_REP_SERVER);
        assert_eq!(read_reply(c), ack(NBD_OPT_LIST));
        c.write_all(&opt(NBD_OPT_GO, &go_data("ro", &[NBD_INFO_BLOCK_SIZE])))
            .unwrap();
        assert_eq!(
            read_reply(c),
            info_export(NBD_OPT_GO, 4096, 0x0003 | NBD_FLAG_SEND_DF)
        );
        assert_eq!(read_reply(c), info_block_size(NBD_OPT_GO, 1, 4096, 1 << 25));
        assert_eq!(read_reply(c), ack(NBD_OPT_GO));
        let req = nbd::Request {
            flags: nbd::CommandFlags(0),
            command: nbd::Command::Disc,
            cookie: 7,
            offset: 0,
            length: 0,
        };
        c.write_all(&req.encode()).unwrap();
    });
    let n = nbd::negotiate(&mut server, &table(), HandshakeLimits::default()).unwrap();
    assert!(n.structured_replies && n.block_size_requested);
    let mut raw = [0u8; 28];
    server.read_exact(&mut raw).unwrap();
    assert_eq!(
        nbd::Request::parse(&raw).unwrap().command,
        nbd::Command::Disc
    );
    client_thread.join().unwrap();
}

// ---------------------------------------------------------------------------
// NBD_OPT_STARTTLS ("TLS support"): the TLS itself is the caller's; here the
// upgrade is a no-op that is counted, so the transcript stays readable.
// ---------------------------------------------------------------------------

fn run_tls(input: Vec<u8>, mode: nbd::TlsMode) -> (Run, u32) {
    let mut s = Script::new(input);
    let mut upgrades = 0;
    let result = nbd::negotiate_tls(&mut s, &table(), HandshakeLimits::default(), mode, |_| {
        upgrades += 1;
        Ok(())
    });
    let (replies, tail) = parse_replies(&s.output[18..]);
    let run = Run {
        result,
        replies,
        tail,
        unread: s.unread(),
    };
    (run, upgrades)
}

#[test]
fn tls_only_refuses_every_option_before_starttls() {
    let go = go_data("disk", &[]);
    let (r, upgrades) = run_tls(
        client(
            FIXED,
            &[
                opt(NBD_OPT_LIST, &[]),
                opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                opt(NBD_OPT_INFO, &go),
                opt(NBD_OPT_GO, &go),
                opt(NBD_OPT_ABORT, &[]),
            ],
        ),
        nbd::TlsMode::Only,
    );
    assert_eq!(upgrades, 0);
    assert!(matches!(r.result, Err(HandshakeError::ClientAborted)));
    let types: Vec<_> = r.replies.iter().map(|x| (x.option, x.reply_type)).collect();
    assert_eq!(
        types,
        [
            (NBD_OPT_LIST, NBD_REP_ERR_TLS_REQD),
            (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_TLS_REQD),
            (NBD_OPT_INFO, NBD_REP_ERR_TLS_REQD),
            (NBD_OPT_GO, NBD_REP_ERR_TLS_REQD),
            (NBD_OPT_ABORT, NBD_REP_ACK),
        ]
    );
}

#[test]
fn tls_only_export_name_before_starttls_closes() {
    let (r, _) = run_tls(
        client(FIXED, &[opt(NBD_OPT_EXPORT_NAME, b"disk")]),
        nbd::TlsMode::Only,
    );
    assert!(matches!(r.result, Err(HandshakeError::TlsRequired)));
    assert!(r.replies.is_empty() && r.tail.is_empty(), "nothing sent");
}

#[test]
fn starttls_then_haggling_goes_on_inside_tls() {
    let go = go_data("disk", &[]);
    for mode in [nbd::TlsMode::On, nbd::TlsMode::Only] {
        let (r, upgrades) = run_tls(
            client(
                FIXED,
                &[
                    opt(NBD_OPT_STARTTLS, &[]),
                    opt(NBD_OPT_STARTTLS, &[]),
                    opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                    opt(NBD_OPT_GO, &go),
                ],
            ),
            mode,
        );
        assert_eq!(upgrades, 1, "{mode:?}");
        let n = r.result.expect("transmission");
        assert!(n.structured_replies);
        assert_eq!(r.replies[0], ack(NBD_OPT_STARTTLS));
        assert_eq!(r.replies[1].option, NBD_OPT_STARTTLS);
        assert_eq!(
            err_type(&r.replies[1]),
            NBD_REP_ERR_INVALID,
            "second STARTTLS"
        );
        assert_eq!(r.replies[2], ack(NBD_OPT_STRUCTURED_REPLY));
        assert_eq!(r.unread, 0);
    }
}

#[test]
fn starttls_with_data_is_invalid_and_off_is_unsupported() {
    let (r, upgrades) = run_tls(
        client(
            FIXED,
            &[opt(NBD_OPT_STARTTLS, b"x"), opt(NBD_OPT_ABORT, &[])],
        ),
        nbd::TlsMode::On,
    );
    assert_eq!(upgrades, 0);
    assert_eq!(err_type(&r.replies[0]), NBD_REP_ERR_INVALID);
    let (r, upgrades) = run_tls(
        client(
            FIXED,
            &[opt(NBD_OPT_STARTTLS, &[]), opt(NBD_OPT_ABORT, &[])],
        ),
        nbd::TlsMode::Off,
    );
    assert_eq!(upgrades, 0);
    assert_eq!(err_type(&r.replies[0]), NBD_REP_ERR_UNSUP);
}

#[test]
fn structured_replies_before_starttls_are_forgotten() {
    let go = go_data("disk", &[]);
    let (r, _) = run_tls(
        client(
            FIXED,
            &[
                opt(NBD_OPT_STRUCTURED_REPLY, &[]),
                opt(NBD_OPT_STARTTLS, &[]),
                opt(NBD_OPT_GO, &go),
            ],
        ),
        nbd::TlsMode::On,
    );
    assert!(!r.result.expect("transmission").structured_replies);
}
