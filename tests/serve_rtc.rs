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

/// Reads `--stats-json` after SIGUSR1s until its `seq` moved past `prev`
/// and its `nbd_requests` is `requests`. A request is counted as served
/// after its reply has left, so a client that has its last reply may still
/// find the count one short for a moment.
fn stats_after_usr1(
    server: &Server,
    path: &std::path::Path,
    prev: u64,
    requests: u64,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        server.signal("USR1");
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["seq"].as_u64().is_some_and(|s| s > prev)
        {
            let n = v["nbd_requests"].as_u64().unwrap_or(0);
            assert!(n <= requests, "{n} requests served, {requests} sent");
            if n == requests {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no --stats-json with {requests} requests served after SIGUSR1\n{}",
            server.diag()
        );
    }
}

/// Transmit coalescing: a burst of small reads that arrives in one segment
/// is answered in far fewer socket sends than replies (the vCPU holds
/// replies back while it has more requests of the burst to serve), and
/// every reply is there, right. A reply held back and never sent shows as
/// the client's read deadline.
#[test]
fn a_burst_of_small_reads_is_answered_in_few_sends() {
    const N: u64 = 64;
    let dir = common::TempDir::new("rtc-coalesce");
    let stats = dir.path().join("stats.json");
    let mut t = machine_toml(1, "256M");
    t += &disk_toml("sd0", "64M", "");
    let mut opts = ServerOpts::config(&t);
    opts.args = vec!["--stats-json".into(), stats.display().to_string()];
    let server = Server::start_in(dir.path(), &opts);
    let mut c = server.client("sd0");
    c.sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let data: Vec<u8> = (0..N * 4096).map(|j| byte(7, 1, j)).collect();
    for i in 0..N {
        let off = i * 4096;
        c.send(0, NBD_CMD_WRITE, off, 4096, &data[off as usize..][..4096])
            .expect("send write");
        assert_eq!(c.recv().expect("write reply").error, 0);
    }
    let before = stats_after_usr1(&server, &stats, 0, N);
    // All N read requests in one write: they reach the server together.
    let mut burst = Vec::new();
    for i in 0..N {
        let cookie = 1000 + i;
        burst.extend_from_slice(
            &nbd::Request {
                flags: nbd::CommandFlags(0),
                command: nbd::Command::Read,
                cookie,
                offset: i * 4096,
                length: 4096,
            }
            .encode(),
        );
        c.track(cookie, NBD_CMD_READ, i * 4096, 4096);
    }
    std::io::Write::write_all(&mut c.sock, &burst).expect("send burst");
    let mut seen = HashMap::new();
    for _ in 0..N {
        let r = c.recv().expect("every reply of the burst arrives");
        assert_eq!(r.error, 0);
        seen.insert(r.cookie, r.data);
    }
    for i in 0..N {
        let off = (i * 4096) as usize;
        assert!(
            seen[&(1000 + i)] == data[off..off + 4096],
            "read {i} differs"
        );
    }
    // Every read of the burst served, and no more.
    let after = stats_after_usr1(&server, &stats, before["seq"].as_u64().unwrap(), 2 * N);
    let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert!(
        d("nbd_tx_sends") * 4 <= N,
        "{} sends for {N} replies: not coalesced",
        d("nbd_tx_sends")
    );
    server.assert_healthy("after the burst");
}

/// Connections that end while the server still owes them: each pipelines
/// reads (large ones dealt out over both CPUs, so their completions and
/// sends race with the receive side on the other CPU), shuts down its
/// sending side at once, and must then get every reply, right, and the
/// server's close (its FIN) after them. Meanwhile SIGUSR1 arrives every
/// 5 ms: the diagnostic dump reads every connection's state while the CPUs
/// work on it. A connection whose end nobody acts on (the last completion
/// finding another CPU in the receive pass, with nobody looking again)
/// shows as a missing close; a lost arrival as a missing reply.
#[test]
fn connections_that_close_with_replies_owed_are_answered_then_closed() {
    const ROUNDS: u64 = 150;
    let mut t = machine_toml(2, "256M");
    t += &disk_toml("sd0", "64M", "");
    let server = Server::start_opts(ServerOpts::config(&t));
    let mut c = server.client("sd0");
    let data: Vec<u8> = (0..4 * M).map(|j| byte(3, 0, j)).collect();
    for i in 0..4 {
        let off = i * M;
        c.send(
            0,
            NBD_CMD_WRITE,
            off,
            M as u32,
            &data[off as usize..][..M as usize],
        )
        .expect("send write");
        assert_eq!(c.recv().expect("write reply").error, 0);
    }
    drop(c);
    let fds = server.fd_count();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                server.signal("USR1");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let clients: Vec<_> = (0..2u64)
            .map(|k| {
                let (server, data) = (&server, &data);
                s.spawn(move || {
                    for round in 0..ROUNDS {
                        let mut c = server.client("sd0");
                        let mut want = HashMap::new();
                        for i in 0..6u64 {
                            let (off, len) = if i % 3 == 0 {
                                ((i + k + round) % 4 * M, M as u32)
                            } else {
                                ((round * 8 + i) * 4096 % (4 * M), 4096)
                            };
                            want.insert(
                                c.send(0, NBD_CMD_READ, off, len, &[]).expect("send"),
                                (off, len),
                            );
                        }
                        c.sock
                            .shutdown(std::net::Shutdown::Write)
                            .expect("shutdown");
                        c.sock
                            .set_read_timeout(Some(Duration::from_secs(20)))
                            .expect("timeout");
                        for _ in 0..want.len() {
                            let r = c.recv().unwrap_or_else(|e| {
                                panic!(
                                    "client {k} round {round}: a reply is missing ({e})\n{}",
                                    server.diag()
                                )
                            });
                            let (off, len) = want[&r.cookie];
                            assert_eq!(r.error, 0);
                            assert!(
                                r.data == data[off as usize..][..len as usize],
                                "client {k} round {round}: read at {off} differs"
                            );
                        }
                        let rest = common::client::wait_closed(
                            &mut c.sock,
                            Duration::from_secs(20),
                        )
                        .unwrap_or_else(|e| {
                            panic!(
                                "client {k} round {round}: the server never closed: {e}\n{}",
                                server.diag()
                            )
                        });
                        assert!(rest.is_empty(), "bytes after the last reply");
                    }
                })
            })
            .collect();
        for h in clients {
            h.join().expect("client");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    // Every socket went (lingering closes end with the client's).
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.fd_count() > fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server.fd_count() <= fds,
        "sockets left open\n{}",
        server.diag()
    );
    server.assert_healthy("connections closed with replies owed");
}

/// The congestion control of the server's side of a connection, as `ss`
/// reports it (the socket whose local port is the server's).
fn server_side_congestion(server: &Server) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{} )", server.addr.port()))
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ["cubic", "bbr", "reno", "dctcp", "htcp", "vegas", "westwood"]
        .into_iter()
        .find(|cc| text.split_whitespace().any(|w| w == *cc))
        .unwrap_or_else(|| panic!("no congestion control in `ss` output: {text:?}"))
        .to_string()
}

/// `--tcp-congestion`: the host's default by default; on every
/// connection the algorithm asked for (reno and cubic: at least one of
/// them is not the host's default); an algorithm the host does not allow
/// is refused at start with its name and the host's list.
#[test]
fn connections_take_the_congestion_control_asked_for() {
    let cfg = {
        let mut t = machine_toml(1, "64M");
        t += &disk_toml("sd0", "16M", "");
        t
    };
    let host = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .expect("the host's congestion control")
        .trim()
        .to_string();
    for (args, want) in [
        (vec![], host.as_str()),
        (vec!["--tcp-congestion", "reno"], "reno"),
        (vec!["--tcp-congestion", "cubic"], "cubic"),
    ] {
        let server = Server::start_opts(ServerOpts {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..ServerOpts::config(&cfg)
        });
        let mut c = server.client("sd0");
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
        c.write(4096, &data).expect("write").expect("write ok");
        assert_eq!(c.read(4096, 65536).expect("read").expect("read ok"), data);
        assert_eq!(server_side_congestion(&server), want, "{args:?}");
        drop(c);
        server.stop().assert_clean("congestion control");
    }
    let dir = common::TempDir::new("cc-refused");
    std::fs::write(dir.path().join("c.toml"), &cfg).expect("config");
    let mut child = std::process::Command::new(common::dvma_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tcp-congestion",
            "no-such-cc",
        ])
        .arg("--config")
        .arg(dir.path().join("c.toml"))
        .arg("--data-dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Refused at start: it must exit by itself (bounded: a server that
    // serves instead is killed and the test fails).
    let t0 = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("--tcp-congestion no-such-cc was not refused: the server runs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unknown algorithm was accepted: {err}"
    );
    assert!(
        err.contains("--tcp-congestion no-such-cc") && err.contains("this host allows"),
        "refused without saying why: {err}"
    );
}
