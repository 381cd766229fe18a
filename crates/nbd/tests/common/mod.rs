//! Client-side helpers shared by the integration tests.
#![allow(dead_code)]

use nbd::wire::{IHAVEOPT, NBD_REP_MAGIC};

/// One option as a client sends it.
pub fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of NBD_OPT_GO / NBD_OPT_INFO.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// One option reply as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// Splits server output (after the greeting) into option replies; returns
/// them and whatever did not parse as a reply.
pub fn parse_replies(mut out: &[u8]) -> (Vec<Reply>, Vec<u8>) {
    let mut replies = Vec::new();
    while out.len() >= 20 && out[..8] == NBD_REP_MAGIC.to_be_bytes() {
        let option = u32::from_be_bytes(out[8..12].try_into().unwrap());
        let reply_type = u32::from_be_bytes(out[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "truncated reply");
        replies.push(Reply {
            option,
            reply_type,
            data: out[20..20 + len].to_vec(),
        });
        out = &out[20 + len..];
    }
    (replies, out.to_vec())
}

/// Decodes a hex string with optional whitespace.
pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len().is_multiple_of(2), "odd hex string");
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// A scripted client: the server reads `input`, its writes are collected.
/// Writes fail once `fail_writes_after` bytes have been written, if set.
#[derive(Debug, Default)]
pub struct Script {
    pub input: std::io::Cursor<Vec<u8>>,
    pub output: Vec<u8>,
    pub fail_writes_after: Option<usize>,
}

impl Script {
    pub fn new(input: Vec<u8>) -> Self {
        Script {
            input: std::io::Cursor::new(input),
            ..Script::default()
        }
    }

    /// Input bytes the server has not read.
    pub fn unread(&self) -> usize {
        self.input.get_ref().len() - self.input.position() as usize
    }
}

impl std::io::Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Script {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(limit) = self.fail_writes_after
            && self.output.len() + buf.len() > limit
        {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
