//! Bounded memory under request floods: a client that sends requests
//! without end and never reads a reply (zero-length READs, rejected on the
//! host; TRIMs, which go to the kernel) grows the server by a bounded
//! amount, and other clients are still served.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::Server;
use common::fixture::{FAIR_WAIT, config, io_within};
use nbd::Request;
use nbd::wire::{NBD_CMD_READ, NBD_CMD_TRIM};

/// The server's resident set, bytes (`VmRSS` of `/proc/PID/status`).
fn rss(server: &Server) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", server.pid)).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
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
