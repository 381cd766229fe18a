//! Fuzz target bodies, shared by `fuzz/` (cargo-fuzz, nightly) and the
//! stable test `tests/corpus.rs` that replays the committed corpora.
//!
//! Not part of the supported API. Each function panics when an invariant is
//! broken; a panic is a finding.

use std::io::{self, Read, Write};

use crate::export::{BlockSizes, ExportInfo, ExportList};
use crate::handshake::{HandshakeError, HandshakeLimits, negotiate};
use crate::transmission::{MAX_WRITE_DRAIN, ReadReply, Request, Validation, error_reply, validate};
use crate::wire::{
    Command, CommandFlags, ErrorCode, GREETING_LEN, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_REP_MAGIC,
    OPTION_REPLY_HEADER_LEN, REQUEST_LEN,
};

/// The exports the fuzz targets run against: `disk` (64 KiB, 512-byte
/// blocks, every feature, the default) and `ro` (read-only, 1-byte blocks,
/// with a description).
pub fn exports() -> ExportList {
    let disk = ExportInfo {
        block_sizes: BlockSizes::new(512, 4096, 32 * 1024).expect("valid sizes"),
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_write_zeroes: true,
        can_multi_conn: true,
        ..ExportInfo::new("disk", 64 * 1024)
    };
    let ro = ExportInfo {
        description: "read-only test export".into(),
        read_only: true,
        can_flush: true,
        ..ExportInfo::new("ro", 10_000)
    };
    ExportList::new(vec![disk, ro]).with_default("disk")
}

/// An in-memory stream: reads come from a fixed input, writes are collected.
#[derive(Debug)]
pub struct MemStream<'a> {
    input: &'a [u8],
    /// Everything written so far.
    pub output: Vec<u8>,
}

impl<'a> MemStream<'a> {
    /// A stream that will read `input` and then report end of file.
    pub fn new(input: &'a [u8]) -> Self {
        MemStream {
            input,
            output: Vec::new(),
        }
    }
}

impl Read for MemStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for MemStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The `request` target: parse the first 28 bytes (zero-padded) as a
/// request, validate it against both fixed exports with and without
/// structured replies, and check what validation promises.
pub fn request_input(data: &[u8]) {
    let mut raw = [0u8; REQUEST_LEN];
    let n = data.len().min(REQUEST_LEN);
    raw[..n].copy_from_slice(&data[..n]);
    let Ok(request) = Request::parse(&raw) else {
        assert_ne!(raw[0..4], [0x25, 0x60, 0x95, 0x13], "good magic rejected");
        return;
    };
    assert_eq!(request.encode(), raw, "encode(parse(x)) != x");
    // A 29th byte, if any, picks a server buffer limit.
    let max_payload = match data.get(REQUEST_LEN) {
        Some(b) if b % 2 == 1 => 4096,
        _ => 1 << 25,
    };
    for export in exports().exports {
        for structured in [false, true] {
            check_request(&request, &export, max_payload, structured);
        }
    }
}

fn check_request(request: &Request, export: &ExportInfo, max_payload: u32, structured: bool) {
    let result = validate(request, export, max_payload, structured);
    let cmd = request.command;
    match result {
        Ok(()) => match cmd {
            Command::Disc => {}
            Command::Flush => {
                assert!(export.can_flush);
                assert_eq!((request.offset, request.length), (0, 0));
            }
            Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => {
                let end = request.offset + u64::from(request.length);
                assert!(end <= export.size, "accepted a request past the end");
                assert!(request.length > 0);
                let min = u64::from(export.block_sizes.min());
                assert_eq!(request.offset % min, 0);
                assert_eq!(u64::from(request.length) % min, 0);
                assert!(!(export.read_only && cmd.is_write()));
                if matches!(cmd, Command::Read | Command::Write) {
                    assert!(request.length <= max_payload.min(export.block_sizes.max()));
                }
                assert_eq!(request.flags.unknown_bits(), 0);
                if !export.can_fua {
                    assert!(!request.flags.contains(CommandFlags::FUA));
                }
                assert!(!request.flags.contains(CommandFlags::FAST_ZERO));
                if cmd == Command::Read {
                    let mut reply = ReadReply::new(request, structured);
                    assert_eq!(reply.data_mut().len(), request.length as usize);
                    let header = if structured { 28 } else { 16 };
                    assert_eq!(reply.as_bytes().len(), header + request.length as usize);
                }
            }
            other => panic!("accepted {other:?}"),
        },
        Err(Validation::Reject { error, drain }) => {
            assert_eq!(drain, request.payload_len(), "drain must match the payload");
            let reply = error_reply(request.cookie, error, structured);
            assert_eq!(reply.len(), if structured { 26 } else { 16 });
            assert_ne!(error, ErrorCode::NotSup);
        }
        Err(Validation::Disconnect { length }) => {
            assert_eq!(cmd, Command::Write);
            assert_eq!(length, request.length);
            assert!(length > max_payload.max(MAX_WRITE_DRAIN));
        }
    }
}

/// Limits small enough for a fuzzer to reach every branch.
pub fn fuzz_limits(require_block_size_request: bool) -> HandshakeLimits {
    HandshakeLimits {
        max_option_len: 1024,
        max_discard_len: 8192,
        max_options: 64,
        require_block_size_request,
    }
}

/// The `option` target: run [`negotiate`] over an in-memory stream that
/// yields `data` as the client's bytes (client flags first), against
/// [`exports`], once with each block-size policy; then check that the
/// server's output is a well-formed sequence of option replies.
pub fn option_input(data: &[u8]) {
    let table = exports();
    for require in [false, true] {
        let mut stream = MemStream::new(data);
        let result = negotiate(&mut stream, &table, fuzz_limits(require));
        if let Err(HandshakeError::Io { source }) = &result {
            // Writes never fail here: the only I/O error is running out of
            // client bytes.
            assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            assert!(stream.input.is_empty(), "EOF before the input ended");
        }
        check_server_output(&stream.output, &result, &table);
    }
}

fn check_server_output(
    out: &[u8],
    result: &Result<crate::Negotiated, HandshakeError>,
    table: &ExportList,
) {
    assert!(out.len() >= GREETING_LEN);
    assert_eq!(out[..GREETING_LEN], crate::handshake::encode_greeting());
    let rest = &out[GREETING_LEN..];
    // An NBD_OPT_EXPORT_NAME ending leaves its old-style reply at the end.
    let tail_len = match result {
        Ok(n) if n.entered_by == NBD_OPT_EXPORT_NAME => {
            if n.client_flags.no_zeroes {
                10
            } else {
                134
            }
        }
        _ => 0,
    };
    assert!(rest.len() >= tail_len, "export name reply missing");
    let (mut replies, tail) = rest.split_at(rest.len() - tail_len);
    let mut last = None;
    // Everything before it must be a sequence of whole option replies.
    while !replies.is_empty() {
        assert!(
            replies.len() >= OPTION_REPLY_HEADER_LEN,
            "partial reply header"
        );
        assert_eq!(replies[..8], NBD_REP_MAGIC.to_be_bytes(), "bad reply magic");
        let option = u32::from_be_bytes(replies[8..12].try_into().expect("4"));
        let reply = u32::from_be_bytes(replies[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(replies[16..20].try_into().expect("4")) as usize;
        assert!(
            replies.len() >= OPTION_REPLY_HEADER_LEN + len,
            "truncated reply"
        );
        replies = &replies[OPTION_REPLY_HEADER_LEN + len..];
        last = Some((option, reply));
    }
    match result {
        Ok(n) => {
            assert!(table.exports.contains(&n.export));
            assert_eq!(
                n.transmission_flags,
                n.export.transmission_flags(n.structured_replies)
            );
            if n.entered_by == NBD_OPT_EXPORT_NAME {
                assert_eq!(tail[0..8], n.export.size.to_be_bytes());
                assert_eq!(tail[8..10], n.transmission_flags.bits().to_be_bytes());
                assert!(tail[10..].iter().all(|&b| b == 0));
            } else {
                assert_eq!(n.entered_by, NBD_OPT_GO);
                assert_eq!(last, Some((NBD_OPT_GO, crate::wire::NBD_REP_ACK)));
            }
        }
        Err(HandshakeError::ClientAborted) => {
            assert_eq!(
                last,
                Some((crate::wire::NBD_OPT_ABORT, crate::wire::NBD_REP_ACK))
            );
        }
        Err(_) => {}
    }
}
