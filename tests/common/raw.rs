//! Raw protocol bytes for hostile clients: request headers with any flags,
//! command and length, with or without their payload; option messages and
//! bare option headers; the client flags that start option haggling.

use nbd::Request;
use nbd::wire::*;

use super::Rng;
use super::client::option_bytes;

/// Cookie of every request a row sends.
pub const COOKIE: u64 = 0x00c0_ffee_d00d_f00d;

/// A request header with [`COOKIE`].
pub fn req(flags: u16, cmd: u16, offset: u64, len: u32) -> Vec<u8> {
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
pub fn req_with(flags: u16, cmd: u16, offset: u64, len: u32, payload: usize) -> Vec<u8> {
    let mut b = req(flags, cmd, offset, len);
    let mut r = Rng::new(offset ^ u64::from(len));
    let start = b.len();
    b.resize(start + payload, 0);
    r.fill(&mut b[start..]);
    b
}

/// A write request with its whole payload.
pub fn write(flags: u16, offset: u64, len: u32) -> Vec<u8> {
    req_with(flags, NBD_CMD_WRITE, offset, len, len as usize)
}

/// `v`, big-endian.
pub fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// An option message: header and data.
pub fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    option_bytes(option, data)
}

/// An option header announcing `len` bytes, without the data.
pub fn opt_header(option: u32, len: u32) -> Vec<u8> {
    nbd::OptionHeader {
        option,
        length: len,
    }
    .encode()
    .to_vec()
}

/// The client flags `FIXED_NEWSTYLE | NO_ZEROES`: haggling starts.
pub fn fixed_flags() -> Vec<u8> {
    be32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
}
