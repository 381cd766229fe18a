//! Property tests: request encode/parse round trips, and `validate` never
//! accepting a request that reaches past the export's end.

use nbd::{
    BlockSizes, Command, CommandFlags, ExportInfo, InfoRequest, MAX_WRITE_DRAIN, Request,
    Validation, validate,
};
use proptest::prelude::*;

fn request() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        prop_oneof![0u16..10, any::<u16>()],
        any::<u64>(),
        prop_oneof![
            0u64..(1 << 22),
            any::<u64>(),
            (u64::MAX - (1 << 22))..=u64::MAX
        ],
        prop_oneof![0u32..(1 << 16), any::<u32>()],
    )
        .prop_map(|(flags, cmd, cookie, offset, length)| Request {
            flags: CommandFlags(flags),
            command: Command::from_u16(cmd),
            cookie,
            offset,
            length,
        })
}

fn export() -> impl Strategy<Value = ExportInfo> {
    (
        prop_oneof![0u64..(1 << 22), any::<u64>()],
        0u32..=16,
        0u32..=4,
        any::<u32>(),
        any::<[bool; 6]>(),
    )
        .prop_map(|(size, min_log, pref_extra, max, f)| {
            let min = 1u32 << min_log;
            let preferred = min.max(512) << pref_extra;
            let max = max.max(preferred);
            ExportInfo {
                block_sizes: BlockSizes::new(min, preferred, max).expect("valid by construction"),
                read_only: f[0],
                can_flush: f[1],
                can_fua: f[2],
                can_trim: f[3],
                can_write_zeroes: f[4],
                can_multi_conn: f[5],
                ..ExportInfo::new("p", size)
            }
        })
}

proptest! {
    #[test]
    fn request_encode_parse_round_trip(r in request()) {
        prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
    }

    #[test]
    fn request_parse_encode_round_trip(tail in any::<[u8; 24]>()) {
        let mut raw = [0u8; 28];
        raw[..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
        raw[4..].copy_from_slice(&tail);
        let r = Request::parse(&raw).expect("good magic");
        prop_assert_eq!(r.encode(), raw);
    }

    #[test]
    fn bad_magic_never_parses(magic in any::<u32>(), tail in any::<[u8; 24]>()) {
        prop_assume!(magic != 0x2560_9513);
        let mut raw = [0u8; 28];
        raw[..4].copy_from_slice(&magic.to_be_bytes());
        raw[4..].copy_from_slice(&tail);
        prop_assert!(Request::parse(&raw).is_err());
    }

    #[test]
    fn validate_never_accepts_past_the_end(
        r in request(),
        e in export(),
        max_payload in prop_oneof![Just(1u32 << 25), any::<u32>()],
        structured in any::<bool>(),
    ) {
        match validate(&r, &e, max_payload, structured) {
            Ok(()) => {
                if matches!(r.command, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes) {
                    let end = r.offset.checked_add(u64::from(r.length));
                    prop_assert!(matches!(end, Some(end) if end <= e.size), "accepted {r:?} for size {}", e.size);
                    prop_assert!(r.length > 0);
                    let min = u64::from(e.block_sizes.min());
                    prop_assert_eq!(r.offset % min, 0);
                    prop_assert_eq!(u64::from(r.length) % min, 0);
                    prop_assert!(!(e.read_only && r.command.is_write()));
                }
                prop_assert!(matches!(
                    r.command,
                    Command::Read | Command::Write | Command::Trim | Command::WriteZeroes
                        | Command::Flush | Command::Disc
                ));
            }
            Err(Validation::Reject { drain, .. }) => {
                prop_assert_eq!(drain, r.payload_len());
                prop_assert!(drain <= max_payload.max(MAX_WRITE_DRAIN));
            }
            Err(Validation::Disconnect { length }) => {
                prop_assert_eq!(r.command, Command::Write);
                prop_assert!(length > max_payload.max(MAX_WRITE_DRAIN));
            }
        }
    }

    #[test]
    fn info_request_round_trip(name in proptest::collection::vec(any::<u8>(), 0..300),
                               requests in proptest::collection::vec(any::<u16>(), 0..20)) {
        let r = InfoRequest { name: &name, requests };
        let bytes = r.encode();
        prop_assert_eq!(InfoRequest::parse(&bytes), Some(r));
    }

    #[test]
    fn info_request_parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Some(r) = InfoRequest::parse(&data) {
            prop_assert_eq!(r.encode(), data);
        }
    }

    /// Requests built around the export's end and block size, with an
    /// oracle: a flagless data command is accepted exactly when it is valid.
    #[test]
    fn validate_at_the_boundary_matches_the_oracle(
        e in export(),
        cmd in prop_oneof![Just(Command::Read), Just(Command::Write), Just(Command::Trim), Just(Command::WriteZeroes)],
        blocks_before_end in 0u64..4,
        len_blocks in 0u32..4,
        nudge in prop_oneof![Just(0u64), 1u64..512],
        max_payload in prop_oneof![Just(1u32 << 25), 512u32..8192],
        structured in any::<bool>(),
    ) {
        let min = u64::from(e.block_sizes.min());
        let aligned_end = e.size / min * min;
        let offset = aligned_end.saturating_sub(blocks_before_end * min).saturating_add(nudge);
        let length = len_blocks.saturating_mul(e.block_sizes.min());
        let r = Request { flags: CommandFlags(0), command: cmd, cookie: 1, offset, length };
        let supported = match cmd {
            Command::Trim => e.can_trim,
            Command::WriteZeroes => e.can_write_zeroes,
            _ => true,
        };
        let within_payload = !matches!(cmd, Command::Read | Command::Write)
            || length <= max_payload.min(e.block_sizes.max());
        let valid = length > 0
            && offset % min == 0
            && offset.checked_add(u64::from(length)).is_some_and(|end| end <= e.size)
            && supported
            && !(e.read_only && cmd.is_write())
            && within_payload;
        let got = validate(&r, &e, max_payload, structured);
        prop_assert_eq!(got.is_ok(), valid, "{:?} on size {} min {}: {:?}", r, e.size, min, got);
    }
}
