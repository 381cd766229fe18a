//! Wire constants and small typed values of the NBD protocol.
//!
//! Every constant carries the name it has in the upstream specification
//! (`doc/proto.md` of the NetworkBlockDevice/nbd repository) so that the code
//! can be checked against it with a plain text search. All numbers travel in
//! network byte order (big-endian). Sections cited below are sections of that
//! document.

use std::fmt;

// ---------------------------------------------------------------------------
// Magic numbers ("Newstyle negotiation", "Fixed newstyle negotiation",
// "Request message", "Simple reply message", "Structured reply chunk message").
// ---------------------------------------------------------------------------

/// `NBDMAGIC` (also `INIT_PASSWD`), the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server after [`NBDMAGIC`] and by
/// the client in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// `cliserv_magic` of the oldstyle negotiation (never sent by this crate).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic in front of every fixed-newstyle option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`, first field of a transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC` (formerly `NBD_REPLY_MAGIC`).
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REQUEST_MAGIC` (experimental `EXTENDED_HEADERS`; reserved,
/// not supported here).
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_EXTENDED_REPLY_MAGIC` (experimental `EXTENDED_HEADERS`; reserved).
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------
// Handshake flags ("Handshake flags"): 16 bits, server to client.
// ---------------------------------------------------------------------------

/// Handshake flag bit 0: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag bit 1: the server can omit the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// ---------------------------------------------------------------------------
// Client flags ("Client flags"): 32 bits, client to server.
// ---------------------------------------------------------------------------

/// Client flag bit 0: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag bit 1: the server must not send the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Transmission flags ("Transmission flags"): 16 bits, server to client.
// ---------------------------------------------------------------------------

/// Bit 0: MUST always be 1.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Bit 1: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Bit 2: exposes `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Bit 3: exposes `NBD_CMD_FLAG_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Bit 4: the export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Bit 5: exposes `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Bit 6: exposes `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Bit 7: `NBD_CMD_FLAG_DF` is supported (only with structured replies).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Bit 8: flush/FUA effects are visible across all connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Bit 9: experimental `RESIZE` extension.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Bit 10: exposes `NBD_CMD_CACHE`.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Bit 11: exposes `NBD_CMD_FLAG_FAST_ZERO`.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Bit 12: experimental `EXTENDED_HEADERS` extension.
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------
// Option types ("Option types").
// ---------------------------------------------------------------------------

/// Select an export and end the handshake, old-style reply.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during the handshake.
pub const NBD_OPT_ABORT: u32 = 2;
/// List the exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Experimental `EXTENDED_HEADERS` extension.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------
// Option reply types ("Option reply types").
// ---------------------------------------------------------------------------

/// The option succeeded / the list is complete.
pub const NBD_REP_ACK: u32 = 1;
/// One export, in reply to `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// One information item, in reply to `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31, set in every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to this server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// The option is forbidden by server policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// The option is syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// The option is not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS is required first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// The requested export is not available.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// The client must request `NBD_INFO_BLOCK_SIZE` first.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// The request or the reply is too large to process.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Experimental `EXTENDED_HEADERS` extension.
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------
// Information types (`NBD_REP_INFO`).
// ---------------------------------------------------------------------------

/// Export size and transmission flags (mandatory before `NBD_REP_ACK`).
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Human-readable export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Block size constraints (minimum, preferred, maximum payload).
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Command types ("Request types") and command flags ("Command flags").
// ---------------------------------------------------------------------------

/// Read.
pub const NBD_CMD_READ: u16 = 0;
/// Write (request carries a payload).
pub const NBD_CMD_WRITE: u16 = 1;
/// Soft disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Flush to stable storage.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Discard.
pub const NBD_CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes without a payload.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Block status query.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Experimental `RESIZE` extension.
pub const NBD_CMD_RESIZE: u16 = 8;

/// Command flag bit 0: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag bit 1: do not punch a hole (`NBD_CMD_WRITE_ZEROES`).
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag bit 2: don't fragment the reply (`NBD_CMD_READ`).
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag bit 3: one extent only (`NBD_CMD_BLOCK_STATUS`).
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag bit 4: fail fast unless zeroing is fast
/// (`NBD_CMD_WRITE_ZEROES`).
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag bit 5: experimental `EXTENDED_HEADERS` extension.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------
// Structured replies ("Structured reply flags", "Structured reply types").
// ---------------------------------------------------------------------------

/// Structured reply flag bit 0: this is the final chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Bit 15, set in every error chunk type.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Empty final chunk.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A run of zeroes at an offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Experimental `EXTENDED_HEADERS` extension.
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Error without an offset.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// Error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

// ---------------------------------------------------------------------------
// Sizes.
// ---------------------------------------------------------------------------

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of the server greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Size of an option request header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// The zero padding after an `NBD_OPT_EXPORT_NAME` reply.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Longest string the protocol allows ("Conventions": MUST be no longer than
/// 4096 bytes).
pub const MAX_STRING_LEN: usize = 4096;
/// 2^25 = 32 MiB: the default maximum payload ("Size constraints"); payloads
/// up to this size SHOULD NOT be considered a denial of service.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Largest minimum block size the protocol allows (2^16).
pub const MAX_MIN_BLOCK: u32 = 1 << 16;

/// An NBD error value, as carried in the error field of a simple reply or of
/// an error chunk ("Error values").
///
/// The numbers are fixed by the protocol; they are not the host's `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// `NBD_EPERM` (1): operation not permitted (write to a read-only export).
    Perm = 1,
    /// `NBD_EIO` (5): input/output error.
    Io = 5,
    /// `NBD_ENOMEM` (12): cannot allocate memory.
    NoMem = 12,
    /// `NBD_EINVAL` (22): invalid argument.
    Inval = 22,
    /// `NBD_ENOSPC` (28): no space left on device (write past the end).
    NoSpc = 28,
    /// `NBD_EOVERFLOW` (75): value too large.
    Overflow = 75,
    /// `NBD_ENOTSUP` (95): operation not supported (fast zero only).
    NotSup = 95,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Shutdown = 108,
}

impl ErrorCode {
    /// All defined error values, in numeric order.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::Perm,
        ErrorCode::Io,
        ErrorCode::NoMem,
        ErrorCode::Inval,
        ErrorCode::NoSpc,
        ErrorCode::Overflow,
        ErrorCode::NotSup,
        ErrorCode::Shutdown,
    ];

    /// The value sent on the wire.
    pub const fn to_u32(self) -> u32 {
        self as u32
    }

    /// The error for a wire value, or `None` for a value the protocol does not
    /// define (a client SHOULD treat those as `NBD_EINVAL`).
    pub const fn from_u32(value: u32) -> Option<ErrorCode> {
        Some(match value {
            1 => ErrorCode::Perm,
            5 => ErrorCode::Io,
            12 => ErrorCode::NoMem,
            22 => ErrorCode::Inval,
            28 => ErrorCode::NoSpc,
            75 => ErrorCode::Overflow,
            95 => ErrorCode::NotSup,
            108 => ErrorCode::Shutdown,
            _ => return None,
        })
    }

    /// The spec's name, e.g. `"NBD_EINVAL"`.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::Perm => "NBD_EPERM",
            ErrorCode::Io => "NBD_EIO",
            ErrorCode::NoMem => "NBD_ENOMEM",
            ErrorCode::Inval => "NBD_EINVAL",
            ErrorCode::NoSpc => "NBD_ENOSPC",
            ErrorCode::Overflow => "NBD_EOVERFLOW",
            ErrorCode::NotSup => "NBD_ENOTSUP",
            ErrorCode::Shutdown => "NBD_ESHUTDOWN",
        }
    }

    /// Maps a host I/O error to the NBD error a server should send for it.
    ///
    /// Follows "Error values": quota and file-size errors become `NBD_ENOSPC`,
    /// permission and read-only-filesystem errors `NBD_EPERM`; anything the
    /// protocol has no value for becomes `NBD_EIO`.
    pub fn from_io_error(error: &std::io::Error) -> ErrorCode {
        use std::io::ErrorKind as K;
        match error.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => ErrorCode::Perm,
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => ErrorCode::NoSpc,
            K::OutOfMemory => ErrorCode::NoMem,
            K::InvalidInput => ErrorCode::Inval,
            K::Unsupported => ErrorCode::NotSup,
            _ => ErrorCode::Io,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.to_u32())
    }
}

/// A transmission request's command type ("Request types").
///
/// Types this crate does not know are kept as [`Command::Unknown`] so that the
/// server can answer them with `NBD_EINVAL` instead of failing to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1); the header is followed by *length* payload bytes.
    Write,
    /// `NBD_CMD_DISC` (2); no reply.
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Any other type, as received (never one of the values above).
    Unknown(u16),
}

impl Command {
    /// The command for a wire value. Never produces `Unknown(v)` for a known
    /// `v`.
    pub const fn from_u16(value: u16) -> Command {
        match value {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The value sent on the wire.
    pub const fn to_u16(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Command::Unknown(other) => other,
        }
    }

    /// Whether the command changes the export's contents (write, trim,
    /// write zeroes): the commands a read-only export refuses with
    /// `NBD_EPERM`.
    pub const fn is_write(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// The 16-bit command flags of a request ("Command flags").
///
/// Keeps every bit as received, including bits this crate does not define.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CommandFlags(pub u16);

impl CommandFlags {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: CommandFlags = CommandFlags(NBD_CMD_FLAG_FUA);
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const NO_HOLE: CommandFlags = CommandFlags(NBD_CMD_FLAG_NO_HOLE);
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: CommandFlags = CommandFlags(NBD_CMD_FLAG_DF);
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub const REQ_ONE: CommandFlags = CommandFlags(NBD_CMD_FLAG_REQ_ONE);
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub const FAST_ZERO: CommandFlags = CommandFlags(NBD_CMD_FLAG_FAST_ZERO);
    /// The bits of the baseline protocol (bits 0 to 4). Bit 5
    /// (`NBD_CMD_FLAG_PAYLOAD_LEN`) belongs to an extension this crate never
    /// negotiates, so it counts as unknown.
    pub const KNOWN: CommandFlags = CommandFlags(0x1f);

    /// The raw bits.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: CommandFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits outside [`CommandFlags::KNOWN`].
    pub const fn unknown_bits(self) -> u16 {
        self.0 & !Self::KNOWN.0
    }
}

impl std::ops::BitOr for CommandFlags {
    type Output = CommandFlags;
    fn bitor(self, rhs: CommandFlags) -> CommandFlags {
        CommandFlags(self.0 | rhs.0)
    }
}

/// The 16-bit transmission flags a server sends for an export
/// ("Transmission flags").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    /// The raw bits.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether `flag` (one of the `NBD_FLAG_*` transmission constants) is set.
    pub const fn has(self, flag: u16) -> bool {
        self.0 & flag == flag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(NBD_REP_MAGIC, 0x3e889045565a9);
        assert_eq!(CLISERV_MAGIC, 0x00420281861253);
    }

    #[test]
    fn reply_error_types_have_bit_31() {
        for (value, n) in [
            (NBD_REP_ERR_UNSUP, 1),
            (NBD_REP_ERR_POLICY, 2),
            (NBD_REP_ERR_INVALID, 3),
            (NBD_REP_ERR_PLATFORM, 4),
            (NBD_REP_ERR_TLS_REQD, 5),
            (NBD_REP_ERR_UNKNOWN, 6),
            (NBD_REP_ERR_SHUTDOWN, 7),
            (NBD_REP_ERR_BLOCK_SIZE_REQD, 8),
            (NBD_REP_ERR_TOO_BIG, 9),
            (NBD_REP_ERR_EXT_HEADER_REQD, 10),
        ] {
            assert_eq!(value, 0x8000_0000 + n);
        }
        assert_eq!(NBD_REPLY_TYPE_ERROR, 32769);
        assert_eq!(NBD_REPLY_TYPE_ERROR_OFFSET, 32770);
    }

    #[test]
    fn error_codes_match_the_spec_and_round_trip() {
        let expected = [1u32, 5, 12, 22, 28, 75, 95, 108];
        for (code, value) in ErrorCode::ALL.iter().zip(expected) {
            assert_eq!(code.to_u32(), value);
            assert_eq!(ErrorCode::from_u32(value), Some(*code));
        }
        assert_eq!(ErrorCode::from_u32(0), None);
        assert_eq!(ErrorCode::from_u32(2), None);
        assert_eq!(ErrorCode::Inval.to_string(), "NBD_EINVAL (22)");
    }

    #[test]
    fn io_errors_map_as_the_spec_suggests() {
        use std::io::{Error, ErrorKind};
        let map = |k| ErrorCode::from_io_error(&Error::from(k));
        assert_eq!(map(ErrorKind::StorageFull), ErrorCode::NoSpc);
        assert_eq!(map(ErrorKind::QuotaExceeded), ErrorCode::NoSpc);
        assert_eq!(map(ErrorKind::FileTooLarge), ErrorCode::NoSpc);
        assert_eq!(map(ErrorKind::ReadOnlyFilesystem), ErrorCode::Perm);
        assert_eq!(map(ErrorKind::Other), ErrorCode::Io);
    }

    #[test]
    fn commands_round_trip_and_unknown_is_never_a_known_value() {
        for v in 0..=u16::MAX {
            let c = Command::from_u16(v);
            assert_eq!(c.to_u16(), v);
            if v <= 7 {
                assert!(!matches!(c, Command::Unknown(_)));
            } else {
                assert_eq!(c, Command::Unknown(v));
            }
        }
    }

    #[test]
    fn command_flags_known_bits() {
        assert_eq!(CommandFlags(0x1f).unknown_bits(), 0);
        assert_eq!(CommandFlags(NBD_CMD_FLAG_PAYLOAD_LEN).unknown_bits(), 0x20);
        assert!((CommandFlags::FUA | CommandFlags::DF).contains(CommandFlags::DF));
        assert!(!CommandFlags::FUA.contains(CommandFlags::DF));
    }
}
