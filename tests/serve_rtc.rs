//! The run-to-completion path under load on two vCPUs: connections that
//! pipeline large and small reads and writes, whose large reads are dealt
//! out over both CPUs while the small ones stay on the connection's CPU, so
//! that replies for one connection are sent from both CPUs at once. Every
//! byte read back is checked. A lost wake-up or a lock-order deadlock
//! between the CPUs shows as a reply that never comes (the client's read
//! deadline, 20 s) rather than a hung test.

mod common;

use std::time::{Duration, Instant};

use std::collections::HashMap;

use common::{Server, ServerOpts, disk_toml, machine_toml};
use nbd::wire::{NBD_CMD_READ, NBD_CMD_WRITE};

const M: u64 = 1 << 20;
const CONNS: u64 = 4;
/// Each connection's region of the disk.
const REGION: u64 = 16 * M;
const RUN: Duration = Duration::from_secs(6);

fn byte(conn: u64, round: u64, off: u64) -> u8 {
    (off.wrapping_mul(31) ^ (off >> 9) ^ conn.wrapping_mul(97) ^ round.wrapping_mul(13)) as u8
}

fn server(net: &str) -> Server {
    let mut t = machine_toml(2, "256M");
    t += &disk_toml("sd0", "64M", "");
    let mut opts = ServerOpts::config(&t);
    opts.args.extend(["--net".to_string(), net.to_string()]);
    Server::start_opts(opts)
}

/// One connection: rounds of 8 pipelined writes (1 MiB, and 4 KiB between
/// them), then 8 pipelined reads of the same, checked.
fn client_loop(server: &Server, conn: u64) -> u64 {
    let mut c = server.client("sd0");
    let base = conn * REGION;
    let t0 = Instant::now();
    let mut round = 0u64;
    let mut bytes = 0u64;
    while t0.elapsed() < RUN {
        round += 1;
        // (offset, len) pairs: big ones, and small ones in between.
        let pieces: Vec<(u64, u32)> = (0..8u64)
            .flat_map(|i| {
                let big = base + i * 2 * M;
                [(big, M as u32), (big + M + (i * 4096), 4096)]
            })
            .collect();
        let mut cookies = Vec::new();
        for &(off, len) in &pieces {
            let data: Vec<u8> = (0..u64::from(len))
                .map(|j| byte(conn, round, off + j))
                .collect();
            cookies.push(
                c.send(0, NBD_CMD_WRITE, off, len, &data)
                    .expect("send write"),
            );
        }
        // Replies come in completion order.
        for _ in &cookies {
            let r = c.recv().expect("a write's reply (a hang shows here)");
            assert!(
                cookies.contains(&r.cookie),
                "unknown cookie {:#x}",
                r.cookie
            );
            assert_eq!(r.error, 0, "conn {conn} round {round}: write failed");
        }
        let mut reads = HashMap::new();
        for &(off, len) in &pieces {
            reads.insert(
                c.send(0, NBD_CMD_READ, off, len, &[]).expect("send read"),
                off,
            );
        }
        for _ in 0..reads.len() {
            let r = c.recv().expect("a read's reply (a hang shows here)");
            let off = reads[&r.cookie];
            assert_eq!(r.error, 0, "conn {conn} round {round}: read failed");
            if let Some(i) =
                (0..r.data.len()).find(|&i| r.data[i] != byte(conn, round, off + i as u64))
            {
                panic!(
                    "conn {conn} round {round}: byte {} reads {:#04x}, wrote {:#04x}",
                    off + i as u64,
                    r.data[i],
                    byte(conn, round, off + i as u64)
                );
            }
            bytes += r.data.len() as u64;
        }
    }
    bytes
}

fn run(net: &str) {
    let server = server(net);
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..CONNS)
            .map(|i| {
                let server = &server;
                s.spawn(move || client_loop(server, i))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).sum()
    });
    assert!(total > 0);
    server.assert_healthy(&format!("--net {net}: {} MiB read back", total >> 20));
}

#[test]
fn pipelined_large_and_small_io_on_two_cpus_poll() {
    run("poll");
}

#[test]
fn pipelined_large_and_small_io_on_two_cpus_threads() {
    run("threads");
}
