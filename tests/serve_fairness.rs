//! One misbehaving connection, or sixteen, must not starve another client:
//! a write whose payload stalls, reads whose replies are never read, and
//! senders of one byte per second leave a well-behaved client's small I/O
//! answered in time.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::client::go_data;
use common::fixture::{FAIR_WAIT, SIZE, config, io_within};
use common::raw::{fixed_flags, opt, req, write};
use common::{Client, Server, tcp};
use nbd::wire::{NBD_CMD_READ, NBD_CMD_WRITE, NBD_OPT_GO};

#[test]
fn stalled_write_payload_does_not_starve_others() {
    let server = Server::start_opts(config());
    let mut bad = server.client("sd0");
    let max = bad.max_payload();
    // A maximum-size write whose payload never comes (one byte of it).
    let mut b = req(0, NBD_CMD_WRITE, 0, max);
    b.push(0x55);
    bad.sock.write_all(&b).expect("send");
    std::thread::sleep(Duration::from_millis(300));
    let r = io_within(&server, FAIR_WAIT);
    server.assert_healthy("with a stalled write");
    assert!(
        r.is_ok(),
        "while one client stalls in the payload of a {max}-byte write, another client's 4K write \
         and read got no answer: {}\n{}",
        r.unwrap_err(),
        server.diag()
    );
    drop(bad);
}

#[test]
fn client_not_reading_replies_does_not_starve_others() {
    let server = Server::start_opts(config());
    let mut bad = server.client("sd0");
    let max = bad.max_payload();
    // 64 maximum-size reads, and never a reply read.
    for i in 0..64u64 {
        let off = (i % (SIZE / u64::from(max))) * u64::from(max);
        bad.send(0, NBD_CMD_READ, off, max, &[]).expect("send");
    }
    std::thread::sleep(Duration::from_millis(1000));
    let r = io_within(&server, FAIR_WAIT);
    server.assert_healthy("with a client not reading");
    assert!(
        r.is_ok(),
        "while one client sends 64 reads of {max} bytes and reads no reply, another client's 4K \
         write and read got no answer: {}\n{}",
        r.unwrap_err(),
        server.diag()
    );
    drop(bad);
}

/// Sixteen hostile connections: stalled maximum writes, maximum reads never
/// read, and senders of one byte per second (in a request header, in a
/// write payload, in a handshake). A well-behaved client's 4K write and
/// read are answered within a second, again and again.
#[test]
fn sixteen_hostile_connections_do_not_starve_a_client() {
    let server = Server::start_opts(config());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut held = Vec::new();
        let max = server.client("sd0").max_payload();
        for i in 0..6u64 {
            let mut bad = server.client("sd0");
            let mut b = req(0, NBD_CMD_WRITE, i * u64::from(max) % (SIZE / 2), max);
            b.push(0x55);
            bad.sock.write_all(&b).expect("stalled write");
            held.push(bad);
        }
        for _ in 0..5 {
            let mut bad = server.client("sd0");
            for i in 0..16u64 {
                let off = (i % (SIZE / u64::from(max))) * u64::from(max);
                let _ = bad.send(0, NBD_CMD_READ, off, max, &[]);
            }
            held.push(bad);
        }
        for i in 0..5u32 {
            let addr = server.addr;
            let stop = &stop;
            scope.spawn(move || {
                // One byte per second.
                let (mut s, bytes) = match i % 3 {
                    0 => {
                        let c = Client::connect(addr, "sd0").expect("connect");
                        (c.sock, req(0, NBD_CMD_READ, 0, 4096))
                    }
                    1 => {
                        let c = Client::connect(addr, "sd0").expect("connect");
                        (c.sock, write(0, 65536, 65536))
                    }
                    _ => (tcp(addr).expect("connect"), {
                        let mut v = fixed_flags();
                        v.extend(opt(NBD_OPT_GO, &go_data(b"sd0", &[])));
                        v
                    }),
                };
                for b in bytes {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                        return;
                    }
                    for _ in 0..10 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        let mut worst = Duration::ZERO;
        for k in 0..5 {
            match io_within(&server, Duration::from_secs(1)) {
                Ok(t) => worst = worst.max(t),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    panic!(
                        "round {k}: with 16 hostile connections a client's 4K write and read: {e}\n{}",
                        server.diag()
                    );
                }
            }
        }
        eprintln!("16 hostile connections: worst 4K write+read {worst:?}");
        server.assert_healthy("with 16 hostile connections");
        stop.store(true, Ordering::Relaxed);
        drop(held);
    });
    server.stop_with("KILL");
}
