//! The handshake phase, server side, fixed newstyle only.
//!
//! The handshake ("Handshake", "Newstyle negotiation", "Fixed newstyle
//! negotiation" in the spec) runs as follows:
//!
//! 1. The server sends the greeting: `NBDMAGIC`, `IHAVEOPT` and the 16-bit
//!    handshake flags; this crate always offers `NBD_FLAG_FIXED_NEWSTYLE |
//!    NBD_FLAG_NO_ZEROES` ([`encode_greeting`]).
//! 2. The client answers with 32 bits of client flags. A flag the server does
//!    not know makes it drop the connection ("Client flags": the server MUST
//!    drop the TCP connection) — [`ClientFlags::parse`].
//! 3. Option haggling: the client sends options (`IHAVEOPT`, option, length,
//!    data — [`OptionHeader`]) one at a time and the server answers each with
//!    one or more option replies (magic `0x3e889045565a9`, option, reply type,
//!    length, data — [`encode_option_reply`]). Haggling ends with
//!    `NBD_OPT_GO` answered by `NBD_REP_ACK` or with `NBD_OPT_EXPORT_NAME`
//!    (both enter transmission), or with `NBD_OPT_ABORT` (soft disconnect), or
//!    with a hard disconnect ("Termination of the session during option
//!    haggling").
//!
//! The module has two layers. The sans-I/O layer parses and encodes byte
//! slices and holds the decisions in [`OptionHaggler`], which is told each
//! option header ([`OptionHaggler::plan`] says whether to read or discard the
//! data) and then the data ([`OptionHaggler::respond`] writes the replies into
//! a buffer and says whether haggling goes on). [`negotiate`] is the blocking
//! driver that runs the whole handshake over any `Read + Write` stream.
//!
//! # Choices where the spec leaves room
//!
//! * Options: `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
//!   `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY` and (with
//!   a [`TlsMode`] other than `Off`) `NBD_OPT_STARTTLS` are implemented;
//!   every other option gets `NBD_REP_ERR_UNSUP`, after its data has been
//!   read and thrown away, so the stream stays in step.
//! * TLS ("TLS support"): [`TlsMode::Off`] is the spec's NOTLS mode
//!   (`NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP`); [`TlsMode::On`] offers
//!   TLS; [`TlsMode::Only`] is FORCEDTLS: before TLS every option but
//!   `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD`, and
//!   `NBD_OPT_EXPORT_NAME` (which cannot be refused) is a hard disconnect
//!   ([`HandshakeError::TlsRequired`]). `NBD_OPT_STARTTLS` is answered
//!   `NBD_REP_ACK` and [`Step::StartTls`]: the driver runs the TLS handshake
//!   on the socket and haggling goes on inside TLS, where a second
//!   `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_INVALID`, as does one with data.
//!   `NBD_OPT_STRUCTURED_REPLY` acknowledged before TLS is forgotten (state
//!   negotiated in plaintext is not trusted; clients negotiate it after).
//! * Option data longer than [`HandshakeLimits::max_option_len`] (64 KiB) is
//!   read and discarded if it is no longer than
//!   [`HandshakeLimits::max_discard_len`] (1 MiB), and the option is answered
//!   with `NBD_REP_ERR_TOO_BIG` (`NBD_OPT_ABORT` still gets its `NBD_REP_ACK`,
//!   unknown options still `NBD_REP_ERR_UNSUP`); longer data is a denial of
//!   service and gets a hard disconnect, which the spec allows for such
//!   clients. `NBD_OPT_EXPORT_NAME` cannot be answered with an error, so an
//!   oversized one is a hard disconnect straight away.
//! * Malformed `NBD_OPT_GO`/`NBD_OPT_INFO` data (shorter than 6 bytes, a name
//!   length beyond the data, an information list that does not fill the rest
//!   of the data exactly) and names that are not NBD strings (not UTF-8,
//!   containing NUL, longer than 4096 bytes) get `NBD_REP_ERR_INVALID`;
//!   `NBD_OPT_LIST` and `NBD_OPT_STRUCTURED_REPLY` with data get
//!   `NBD_REP_ERR_INVALID` (the spec's SHOULD). Duplicate information
//!   requests are answered once; unknown ones are ignored (MUST).
//! * A repeated `NBD_OPT_STRUCTURED_REPLY` is acknowledged again.
//! * `NBD_INFO_EXPORT` is always sent; `NBD_INFO_BLOCK_SIZE` when requested or
//!   when the export's minimum block size is not the default 1;
//!   `NBD_INFO_NAME` when requested; `NBD_INFO_DESCRIPTION` when requested and
//!   the description is not empty.
//! * A client that does not set `NBD_FLAG_C_FIXED_NEWSTYLE` is still served
//!   with fixed newstyle replies (the spec's MAY).
//! * More than [`HandshakeLimits::max_options`] options on one connection is
//!   treated as a denial of service: hard disconnect.

use std::io::{self, Read, Write};

use crate::export::{ExportInfo, ExportTable};
use crate::transmission::{Request, Validation, validate};
use crate::wire::{
    EXPORT_NAME_ZEROES, GREETING_LEN, IHAVEOPT, MAX_STRING_LEN, NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION, NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK, NBD_REP_ERR_BLOCK_SIZE_REQD, NBD_REP_ERR_INVALID, NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_TOO_BIG, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_MAGIC,
    NBD_REP_SERVER, NBDMAGIC, OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN, TransmissionFlags,
};

/// Errors of the handshake layer. Every one of them ends the connection: the
/// server closes it without sending anything more (a hard disconnect), except
/// after [`HandshakeError::ClientAborted`], where the `NBD_REP_ACK` has been
/// sent and the close is the expected end of a soft disconnect.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading from or writing to the client failed, or the client closed
    /// the connection in the middle of a message (`UnexpectedEof`).
    #[error("handshake I/O failed")]
    Io {
        /// The underlying error.
        #[from]
        source: io::Error,
    },
    /// The client set a flag this server does not know or did not offer.
    #[error("client sent unknown flags {flags:#010x}")]
    UnknownClientFlags {
        /// The client flags as received.
        flags: u32,
    },
    /// An option did not start with `IHAVEOPT`.
    #[error("option has bad magic {magic:#018x}")]
    BadOptionMagic {
        /// The magic as received.
        magic: u64,
    },
    /// An option's data is too long to be read, or even thrown away.
    #[error("option {option} has {length} bytes of data, more than the limit of {limit}")]
    OptionTooLong {
        /// The option code.
        option: u32,
        /// The announced data length.
        length: u32,
        /// The limit it broke.
        limit: u32,
    },
    /// The client sent more options than [`HandshakeLimits::max_options`].
    #[error("client sent more than {limit} options")]
    TooManyOptions {
        /// The limit.
        limit: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (or a name
    /// that is not an NBD string); the spec requires the server to terminate
    /// the session.
    #[error("client asked for unknown export {name:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport {
        /// The name, with invalid UTF-8 replaced.
        name: String,
    },
    /// `NBD_OPT_EXPORT_NAME` chose an export with non-default block sizes
    /// while [`HandshakeLimits::require_block_size_request`] is set.
    #[error("export {name:?} needs NBD_INFO_BLOCK_SIZE but the client used NBD_OPT_EXPORT_NAME")]
    BlockSizeRequired {
        /// The export's name.
        name: String,
    },
    /// `NBD_OPT_EXPORT_NAME` before TLS in [`TlsMode::Only`]: it cannot be
    /// answered `NBD_REP_ERR_TLS_REQD`, so the connection is closed.
    #[error("client used NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, and TLS is required")]
    TlsRequired,
    /// The client sent `NBD_OPT_ABORT`; the server has acknowledged it and
    /// should now close the connection. Not a failure of the server.
    #[error("client aborted the handshake")]
    ClientAborted,
}

impl HandshakeError {
    /// Whether this is the client's soft disconnect rather than a failure.
    pub fn is_client_abort(&self) -> bool {
        matches!(self, HandshakeError::ClientAborted)
    }
}

/// Whether the server offers or requires TLS (`NBD_OPT_STARTTLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS (the spec's NOTLS mode): `NBD_OPT_STARTTLS` is unsupported.
    #[default]
    Off,
    /// TLS is offered; a client may also go on in plaintext.
    On,
    /// TLS is required (FORCEDTLS): nothing but `NBD_OPT_STARTTLS` (and
    /// `NBD_OPT_ABORT`) is served before it.
    Only,
}

/// Bounds that keep a hostile client from costing the server too much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest option data read into memory and parsed (default 64 KiB).
    pub max_option_len: u32,
    /// Largest option data read and thrown away, to answer
    /// `NBD_REP_ERR_TOO_BIG` (or `NBD_REP_ERR_UNSUP`) and stay in step; longer
    /// data gets a hard disconnect (default 1 MiB).
    pub max_discard_len: u32,
    /// Most options one connection may send (default 1024).
    pub max_options: u32,
    /// Refuse clients that do not ask for `NBD_INFO_BLOCK_SIZE` when the
    /// export's minimum block size is not the default 1: `NBD_OPT_GO` gets
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`, `NBD_OPT_EXPORT_NAME` a hard disconnect
    /// ("Size constraints" allows both). Default `false`: such clients are
    /// served, and their unaligned requests fail with `NBD_EINVAL`.
    pub require_block_size_request: bool,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_option_len: 64 * 1024,
            max_discard_len: 1024 * 1024,
            max_options: 1024,
            require_block_size_request: false,
        }
    }
}

/// The client flags ("Client flags").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`: omit the 124 zero bytes after
    /// `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Parses the 4 bytes of client flags. Any bit other than the two this
    /// server offers is [`HandshakeError::UnknownClientFlags`]: the server
    /// MUST drop the connection.
    pub fn parse(raw: [u8; 4]) -> Result<ClientFlags, HandshakeError> {
        let flags = u32::from_be_bytes(raw);
        if flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
            return Err(HandshakeError::UnknownClientFlags { flags });
        }
        Ok(ClientFlags {
            fixed_newstyle: flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
        })
    }

    /// The 32-bit value.
    pub fn bits(self) -> u32 {
        (if self.fixed_newstyle {
            NBD_FLAG_C_FIXED_NEWSTYLE
        } else {
            0
        }) | (if self.no_zeroes {
            NBD_FLAG_C_NO_ZEROES
        } else {
            0
        })
    }
}

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags
/// `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// The header of an option request: `IHAVEOPT`, 32-bit option, 32-bit data
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parses a header; a magic other than `IHAVEOPT` is
    /// [`HandshakeError::BadOptionMagic`] (the stream cannot be trusted any
    /// more: hard disconnect).
    pub fn parse(raw: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, HandshakeError> {
        let magic = u64::from_be_bytes(raw[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic { magic });
        }
        Ok(OptionHeader {
            option: be32(&raw[8..12]),
            length: be32(&raw[12..16]),
        })
    }

    /// The 16 bytes of this header (what a client sends).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: 32-bit name length, name,
/// 16-bit count, that many 16-bit `NBD_INFO_*` requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export name as sent (not yet checked to be an NBD string).
    pub name: &'a [u8],
    /// The information types asked for, as sent.
    pub requests: Vec<u16>,
}

impl<'a> InfoRequest<'a> {
    /// Parses option data; `None` when it is malformed (the server answers
    /// `NBD_REP_ERR_INVALID`): shorter than 6 bytes, a name length larger
    /// than the data length − 6, or an information list whose count does not
    /// fill the rest of the data exactly.
    pub fn parse(data: &'a [u8]) -> Option<InfoRequest<'a>> {
        if data.len() < 6 {
            return None;
        }
        let name_len = usize::try_from(be32(&data[0..4])).ok()?;
        if name_len > data.len() - 6 {
            return None;
        }
        let name = &data[4..4 + name_len];
        let rest = &data[4 + name_len..];
        let count = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let list = &rest[2..];
        if list.len() != count * 2 {
            return None;
        }
        let requests = list
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Some(InfoRequest { name, requests })
    }

    /// The data of this request (what a client sends).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        b.extend_from_slice(&len32(self.name.len()).to_be_bytes());
        b.extend_from_slice(self.name);
        let count = u16::try_from(self.requests.len()).expect("at most 65535 info requests");
        b.extend_from_slice(&count.to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// The name as an NBD string ("Conventions": UTF-8, no NUL, at most 4096
/// bytes), or `None`.
pub fn parse_name(raw: &[u8]) -> Option<&str> {
    if raw.len() > MAX_STRING_LEN || raw.contains(&0) {
        return None;
    }
    std::str::from_utf8(raw).ok()
}

/// Appends one option reply: magic `0x3e889045565a9`, option, reply type,
/// data length, data.
///
/// # Panics
///
/// If `data` is longer than `u32::MAX` bytes.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.reserve(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an `NBD_REP_SERVER` reply for one export: name length, name, then
/// the description (the spec's "implementation-specific details ... suitable
/// for direct display to a human being").
pub fn encode_rep_server(out: &mut Vec<u8>, option: u32, export: &ExportInfo) {
    let mut data = Vec::with_capacity(4 + export.name.len() + export.description.len());
    data.extend_from_slice(&len32(export.name.len()).to_be_bytes());
    data.extend_from_slice(export.name.as_bytes());
    data.extend_from_slice(export.description.as_bytes());
    encode_option_reply(out, option, NBD_REP_SERVER, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size (64 bits) and
/// transmission flags (16 bits); reply length 12.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: TransmissionFlags) {
    let mut d = [0u8; 12];
    d[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    d[2..10].copy_from_slice(&size.to_be_bytes());
    d[10..12].copy_from_slice(&flags.bits().to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`: minimum, preferred,
/// maximum payload (32 bits each); reply length 14.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, sizes: crate::BlockSizes) {
    let mut d = [0u8; 14];
    d[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    d[2..6].copy_from_slice(&sizes.min().to_be_bytes());
    d[6..10].copy_from_slice(&sizes.preferred().to_be_bytes());
    d[10..14].copy_from_slice(&sizes.max().to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// Appends `NBD_REP_INFO` with a string payload: `info_type` is
/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`; reply length 2 + string length.
pub fn encode_info_string(out: &mut Vec<u8>, option: u32, info_type: u16, text: &str) {
    let mut d = Vec::with_capacity(2 + text.len());
    d.extend_from_slice(&info_type.to_be_bytes());
    d.extend_from_slice(text.as_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// Appends the reply that ends `NBD_OPT_EXPORT_NAME`: size (64 bits),
/// transmission flags (16 bits) and, unless the client negotiated
/// `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes.
pub fn encode_export_name_reply(
    out: &mut Vec<u8>,
    size: u64,
    flags: TransmissionFlags,
    no_zeroes: bool,
) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.bits().to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
    }
}

/// What the handshake agreed on, handed to the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export the client chose.
    pub export: ExportInfo,
    /// The transmission flags sent to the client.
    pub transmission_flags: TransmissionFlags,
    /// Structured replies were negotiated: `NBD_CMD_READ` MUST be answered
    /// with structured reply chunks.
    pub structured_replies: bool,
    /// The client's flags.
    pub client_flags: ClientFlags,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in its `NBD_OPT_GO`, and so
    /// promised to honour the size constraints.
    pub block_size_requested: bool,
    /// The option that entered transmission: `NBD_OPT_GO` or
    /// `NBD_OPT_EXPORT_NAME`.
    pub entered_by: u32,
}

impl Negotiated {
    /// [`validate`] for this session: this export, its maximum payload, and
    /// the negotiated reply style.
    pub fn validate(&self, request: &Request) -> Result<(), Validation> {
        validate(
            request,
            &self.export,
            self.export.block_sizes.max(),
            self.structured_replies,
        )
    }
}

/// What to do with an option's data, as decided from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlan {
    /// Read the `length` bytes and pass them to [`OptionHaggler::respond`] as
    /// [`OptionData::Read`].
    Read,
    /// Read the `length` bytes, throw them away, and call
    /// [`OptionHaggler::respond`] with [`OptionData::Discarded`].
    Discard,
}

/// An option's data as handed to [`OptionHaggler::respond`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionData<'a> {
    /// The data, all of it.
    Read(&'a [u8]),
    /// The data was read and thrown away, as [`DataPlan::Discard`] asked.
    Discarded,
}

/// Whether haggling goes on after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the replies and read the next option.
    Continue,
    /// Send the replies; the transmission phase starts right after them.
    Transmission(Negotiated),
    /// Send the `NBD_REP_ACK` (a client that already left is no error), then
    /// close: the client's soft disconnect.
    Abort,
    /// Send the replies (the `NBD_REP_ACK` to `NBD_OPT_STARTTLS`), run the
    /// TLS handshake on the socket, call [`OptionHaggler::tls_started`], and
    /// read the next option inside TLS.
    StartTls,
}

/// The sans-I/O core of option haggling: one per connection.
#[derive(Debug)]
pub struct OptionHaggler<'t, T: ExportTable + ?Sized> {
    exports: &'t T,
    limits: HandshakeLimits,
    client: ClientFlags,
    structured_replies: bool,
    options_seen: u32,
    tls: TlsMode,
    tls_active: bool,
}

impl<'t, T: ExportTable + ?Sized> OptionHaggler<'t, T> {
    /// Haggling for a client that sent `client` flags.
    pub fn new(exports: &'t T, client: ClientFlags, limits: HandshakeLimits) -> Self {
        OptionHaggler {
            exports,
            limits,
            client,
            structured_replies: false,
            options_seen: 0,
            tls: TlsMode::Off,
            tls_active: false,
        }
    }

    /// The same haggler with TLS offered or required.
    pub fn with_tls(mut self, mode: TlsMode) -> Self {
        self.tls = mode;
        self
    }

    /// The TLS handshake after [`Step::StartTls`] succeeded: haggling goes
    /// on inside TLS, and what was negotiated before is forgotten.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured_replies = false;
    }

    /// Whether TLS is active (after [`Self::tls_started`]).
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// TLS is required and not yet active.
    fn tls_missing(&self) -> bool {
        self.tls == TlsMode::Only && !self.tls_active
    }

    /// Whether `NBD_OPT_STRUCTURED_REPLY` has been acknowledged so far.
    pub fn structured_replies(&self) -> bool {
        self.structured_replies
    }

    /// Decides, from an option's header alone, whether its data is read or
    /// discarded, or whether the connection must end here.
    pub fn plan(&mut self, header: &OptionHeader) -> Result<DataPlan, HandshakeError> {
        self.options_seen += 1;
        if self.options_seen > self.limits.max_options {
            return Err(HandshakeError::TooManyOptions {
                limit: self.limits.max_options,
            });
        }
        let too_long = |limit| HandshakeError::OptionTooLong {
            option: header.option,
            length: header.length,
            limit,
        };
        if header.option == NBD_OPT_EXPORT_NAME && self.tls_missing() {
            // No error can be returned to NBD_OPT_EXPORT_NAME: terminate.
            return Err(HandshakeError::TlsRequired);
        }
        if header.option == NBD_OPT_EXPORT_NAME && header.length > self.limits.max_option_len {
            // No error can be returned to NBD_OPT_EXPORT_NAME: terminate.
            return Err(too_long(self.limits.max_option_len));
        }
        if header.length > self.limits.max_discard_len {
            return Err(too_long(self.limits.max_discard_len));
        }
        let needs_data = matches!(
            header.option,
            NBD_OPT_GO | NBD_OPT_INFO | NBD_OPT_EXPORT_NAME
        ) && !self.tls_missing();
        Ok(
            if needs_data && header.length <= self.limits.max_option_len {
                DataPlan::Read
            } else {
                DataPlan::Discard
            },
        )
    }

    /// Answers one option whose data was dealt with as [`Self::plan`] said,
    /// appending every reply to `out` (which the caller sends as one write).
    pub fn respond(
        &mut self,
        header: &OptionHeader,
        data: OptionData<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        let option = header.option;
        if self.tls_missing() && option != NBD_OPT_STARTTLS && option != NBD_OPT_ABORT {
            if option == NBD_OPT_EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            reply_error(
                out,
                option,
                NBD_REP_ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS first",
            );
            return Ok(Step::Continue);
        }
        match option {
            NBD_OPT_STARTTLS => {
                if self.tls == TlsMode::Off {
                    reply_error(out, option, NBD_REP_ERR_UNSUP, "TLS is not configured");
                    Ok(Step::Continue)
                } else if header.length != 0 {
                    reply_error(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS takes no data",
                    );
                    Ok(Step::Continue)
                } else if self.tls_active {
                    reply_error(out, option, NBD_REP_ERR_INVALID, "TLS is already active");
                    Ok(Step::Continue)
                } else {
                    encode_option_reply(out, option, NBD_REP_ACK, &[]);
                    Ok(Step::StartTls)
                }
            }
            NBD_OPT_ABORT => {
                // "The server MUST reply with NBD_REP_ACK"; data is ignored.
                encode_option_reply(out, option, NBD_REP_ACK, &[]);
                Ok(Step::Abort)
            }
            NBD_OPT_LIST => {
                if header.length != 0 {
                    reply_error(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                } else {
                    for export in self.exports.list() {
                        encode_rep_server(out, option, &export);
                    }
                    encode_option_reply(out, option, NBD_REP_ACK, &[]);
                }
                Ok(Step::Continue)
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if header.length != 0 {
                    reply_error(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured_replies = true;
                    encode_option_reply(out, option, NBD_REP_ACK, &[]);
                }
                Ok(Step::Continue)
            }
            NBD_OPT_GO | NBD_OPT_INFO => match data {
                OptionData::Discarded => {
                    reply_error(out, option, NBD_REP_ERR_TOO_BIG, "option data too long");
                    Ok(Step::Continue)
                }
                OptionData::Read(data) => Ok(self.go_or_info(option, data, out)),
            },
            NBD_OPT_EXPORT_NAME => match data {
                // plan() never discards an EXPORT_NAME; treat it as unknown.
                OptionData::Discarded => Err(HandshakeError::UnknownExport {
                    name: String::new(),
                }),
                OptionData::Read(data) => self.export_name(data, out),
            },
            _ => {
                reply_error(out, option, NBD_REP_ERR_UNSUP, "option not supported");
                Ok(Step::Continue)
            }
        }
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            self.exports.default_export()
        } else {
            self.exports.lookup(name)
        }
    }

    fn go_or_info(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let Some(request) = InfoRequest::parse(data) else {
            reply_error(out, option, NBD_REP_ERR_INVALID, "malformed option data");
            return Step::Continue;
        };
        let Some(name) = parse_name(request.name) else {
            reply_error(
                out,
                option,
                NBD_REP_ERR_INVALID,
                "export name is not a valid string",
            );
            return Step::Continue;
        };
        let Some(export) = self.lookup(name) else {
            reply_error(out, option, NBD_REP_ERR_UNKNOWN, "unknown export");
            return Step::Continue;
        };
        let asked = |t| request.requests.contains(&t);
        let wants_block_size = asked(NBD_INFO_BLOCK_SIZE);
        let default_sizes = export.block_sizes.is_default_minimum();
        if option == NBD_OPT_GO
            && !wants_block_size
            && !default_sizes
            && self.limits.require_block_size_request
        {
            // "SHOULD ensure it first sends an NBD_INFO_BLOCK_SIZE".
            encode_info_block_size(out, option, export.block_sizes);
            reply_error(
                out,
                option,
                NBD_REP_ERR_BLOCK_SIZE_REQD,
                "export needs NBD_INFO_BLOCK_SIZE",
            );
            return Step::Continue;
        }
        let flags = export.transmission_flags(self.structured_replies);
        encode_info_export(out, option, export.size, flags);
        if wants_block_size || !default_sizes {
            encode_info_block_size(out, option, export.block_sizes);
        }
        if asked(NBD_INFO_NAME) {
            encode_info_string(out, option, NBD_INFO_NAME, &export.name);
        }
        if asked(NBD_INFO_DESCRIPTION) && !export.description.is_empty() {
            encode_info_string(out, option, NBD_INFO_DESCRIPTION, &export.description);
        }
        encode_option_reply(out, option, NBD_REP_ACK, &[]);
        if option == NBD_OPT_GO {
            Step::Transmission(Negotiated {
                export,
                transmission_flags: flags,
                structured_replies: self.structured_replies,
                client_flags: self.client,
                block_size_requested: wants_block_size,
                entered_by: NBD_OPT_GO,
            })
        } else {
            Step::Continue
        }
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Step, HandshakeError> {
        let export = parse_name(data).and_then(|n| self.lookup(n));
        let Some(export) = export else {
            return Err(HandshakeError::UnknownExport {
                name: String::from_utf8_lossy(data).into_owned(),
            });
        };
        if self.limits.require_block_size_request && !export.block_sizes.is_default_minimum() {
            return Err(HandshakeError::BlockSizeRequired { name: export.name });
        }
        let flags = export.transmission_flags(self.structured_replies);
        encode_export_name_reply(out, export.size, flags, self.client.no_zeroes);
        Ok(Step::Transmission(Negotiated {
            export,
            transmission_flags: flags,
            structured_replies: self.structured_replies,
            client_flags: self.client,
            block_size_requested: false,
            entered_by: NBD_OPT_EXPORT_NAME,
        }))
    }
}

fn reply_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    encode_option_reply(out, option, reply_type, message.as_bytes());
}

/// Runs the server side of the handshake over `stream`, blocking: sends the
/// greeting, reads the client flags, and answers options until the client
/// enters transmission, aborts, or must be disconnected.
///
/// Every batch of replies to one option goes out in a single `write_all`
/// followed by `flush`. On `Ok`, the next bytes on the stream are the
/// client's first transmission request. On `Err`, the caller closes the
/// connection (see [`HandshakeError`]).
pub fn negotiate<S: Read + Write + ?Sized>(
    stream: &mut S,
    exports: &(impl ExportTable + ?Sized),
    limits: HandshakeLimits,
) -> Result<Negotiated, HandshakeError> {
    negotiate_tls(stream, exports, limits, TlsMode::Off, |_| {
        Err(io::Error::other("TLS is not configured"))
    })
}

/// [`negotiate`] with TLS offered or required (`tls`): after the
/// `NBD_REP_ACK` to `NBD_OPT_STARTTLS` has been written and flushed,
/// `start_tls` runs the TLS handshake and makes `stream` speak TLS from
/// then on (an `Err` ends the connection).
pub fn negotiate_tls<S: Read + Write + ?Sized>(
    stream: &mut S,
    exports: &(impl ExportTable + ?Sized),
    limits: HandshakeLimits,
    tls: TlsMode,
    mut start_tls: impl FnMut(&mut S) -> io::Result<()>,
) -> Result<Negotiated, HandshakeError> {
    stream.write_all(&encode_greeting())?;
    stream.flush()?;
    let mut raw_flags = [0u8; 4];
    stream.read_exact(&mut raw_flags)?;
    let client = ClientFlags::parse(raw_flags)?;
    let mut haggler = OptionHaggler::new(exports, client, limits).with_tls(tls);
    let mut data = Vec::new();
    let mut out = Vec::new();
    loop {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        stream.read_exact(&mut raw)?;
        let header = OptionHeader::parse(&raw)?;
        let plan = haggler.plan(&header)?;
        let option_data = match plan {
            DataPlan::Read => {
                data.clear();
                data.resize(header.length as usize, 0);
                stream.read_exact(&mut data)?;
                OptionData::Read(&data)
            }
            DataPlan::Discard => {
                crate::discard(stream, u64::from(header.length))?;
                OptionData::Discarded
            }
        };
        out.clear();
        let step = haggler.respond(&header, option_data, &mut out)?;
        if let Step::Abort = step {
            // The client may already have gone ("SHOULD gracefully handle the
            // client sending an NBD_OPT_ABORT and closing the connection").
            let _ = stream.write_all(&out).and_then(|()| stream.flush());
            return Err(HandshakeError::ClientAborted);
        }
        stream.write_all(&out)?;
        stream.flush()?;
        match step {
            Step::Transmission(negotiated) => return Ok(negotiated),
            Step::StartTls => {
                start_tls(stream)?;
                haggler.tls_started();
            }
            Step::Continue | Step::Abort => {}
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"))
}

fn len32(len: usize) -> u32 {
    u32::try_from(len).expect("length fits in 32 bits")
}
