//! Deadlines and connection limits: a handshake or a request dribbled one
//! byte at a time is closed at its deadline, an idle connection at the
//! idle timeout, and a client over the total or per-address connection
//! limit is refused with a reason; the server serves others meanwhile.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::client::{go_data, read_opt_reply, wait_closed};
use common::fixture::{FAIR_WAIT, config_args, io_within};
use common::raw::{fixed_flags, opt, req, write};
use common::{Server, tcp};
use nbd::wire::{NBD_CMD_READ, NBD_OPT_GO, NBD_OPT_LIST, NBD_REP_ERR_POLICY};

/// Sends `bytes` one per `gap`, until the server closes the connection;
/// returns when that happened (since the first byte), or `None` if it did
/// not within `limit`.
fn dribble_until_closed(
    s: &mut TcpStream,
    bytes: &[u8],
    gap: Duration,
    limit: Duration,
) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(10)))
        .expect("timeout");
    let t0 = Instant::now();
    let mut i = 0;
    let mut junk = [0u8; 4096];
    while t0.elapsed() < limit {
        if s.write_all(&[bytes[i % bytes.len()]]).is_err() {
            return Some(t0.elapsed());
        }
        i += 1;
        let next = Instant::now() + gap;
        while Instant::now() < next {
            match s.read(&mut junk) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(t0.elapsed()),
            }
        }
    }
    None
}

#[test]
fn byte_per_second_handshake_is_closed_at_the_deadline() {
    let server = Server::start_opts(config_args(&["--handshake-timeout", "3"]));
    let mut s = tcp(server.addr).expect("connect");
    common::read_greeting(&mut s).expect("greeting");
    let mut bytes = fixed_flags();
    bytes.extend(opt(NBD_OPT_LIST, &[]).repeat(100));
    let t = dribble_until_closed(
        &mut s,
        &bytes,
        Duration::from_millis(700),
        Duration::from_secs(12),
    );
    match t {
        Some(t) if t >= Duration::from_millis(2000) && t <= Duration::from_secs(6) => {}
        other => panic!(
            "a handshake sent one byte per 0.7 s with a 3 s deadline: closed after {other:?}\n{}",
            server.diag()
        ),
    }
    io_within(&server, FAIR_WAIT).expect("I/O after");
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn byte_per_second_request_is_closed_at_the_deadline() {
    let server = Server::start_opts(config_args(&["--io-timeout", "3"]));
    for (what, bytes) in [
        ("request header", req(0, NBD_CMD_READ, 0, 4096)),
        ("write payload", write(0, 0, 65536)),
    ] {
        let mut c = server.client("sd0");
        let t = dribble_until_closed(
            &mut c.sock,
            &bytes,
            Duration::from_millis(700),
            Duration::from_secs(12),
        );
        match t {
            Some(t) if t <= Duration::from_secs(6) => {}
            other => panic!(
                "a {what} sent one byte per 0.7 s with a 3 s deadline: closed after {other:?}\n{}",
                server.diag()
            ),
        }
    }
    io_within(&server, FAIR_WAIT).expect("I/O after");
    server.stop().assert_clean("SIGTERM");
}

/// The refusal a client over a limit gets: the greeting, then an error
/// reply to its first option, whose message says why.
fn expect_refusal(server: &Server, what: &str) {
    let mut s = tcp(server.addr).expect("connect");
    if let Err(e) = common::read_greeting(&mut s) {
        panic!(
            "{what}: no greeting ({e}), want a refusal\n{}",
            server.diag()
        );
    }
    s.write_all(&fixed_flags()).expect("flags");
    s.write_all(&opt(NBD_OPT_GO, &go_data(b"sd0", &[])))
        .expect("GO");
    let r = read_opt_reply(&mut s)
        .unwrap_or_else(|e| panic!("{what}: no option reply ({e})\n{}", server.diag()));
    let msg = String::from_utf8_lossy(&r.data).into_owned();
    assert!(
        r.option == NBD_OPT_GO
            && r.reply == NBD_REP_ERR_POLICY
            && msg.contains("too many connections"),
        "{what}: reply {:#x} {msg:?}, want NBD_REP_ERR_POLICY saying too many connections",
        r.reply
    );
}

#[test]
fn over_the_connection_limits_clients_are_refused_with_a_reason() {
    let server = Server::start_opts(config_args(&["--max-per-addr", "4"]));
    // Four idle connections from 127.0.0.1, the per-address limit.
    let idle: Vec<_> = (0..4).map(|_| server.client("sd0")).collect();
    expect_refusal(&server, "fifth connection from one address");
    assert!(
        server.wait_output("too many connections", Duration::from_secs(5)),
        "the refusal is not logged\n{}",
        server.diag()
    );
    drop(idle);
    // Closed connections are counted out: clients are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match io_within(&server, Duration::from_secs(5)) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                panic!("after the idle ones closed: {e}\n{}", server.diag())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    server.stop().assert_clean("SIGTERM");
    // The total limit.
    let server = Server::start_opts(config_args(&["--max-connections", "3"]));
    let conns: Vec<_> = (0..3).map(|_| server.client("sd0")).collect();
    expect_refusal(&server, "fourth connection");
    drop(conns);
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn idle_timeout_closes_idle_connections() {
    let server = Server::start_opts(config_args(&["--idle-timeout", "2"]));
    let mut c = server.client("sd0");
    assert_eq!(c.write(0, &[7u8; 4096]).expect("write"), Ok(()));
    let t0 = Instant::now();
    match wait_closed(&mut c.sock, Duration::from_secs(8)) {
        Ok(_) if t0.elapsed() >= Duration::from_millis(1500) => {}
        other => panic!(
            "idle connection with --idle-timeout 2: {other:?} after {:?}\n{}",
            t0.elapsed(),
            server.diag()
        ),
    }
    server.stop().assert_clean("SIGTERM");
}

/// A closed connection lingers (the server reads and drops what the client
/// still sends, so that no reset destroys replies not yet read) for at most
/// a second. Clients that disconnect, then never close and keep sending,
/// must not hold the server's sockets beyond that bound: every one is gone
/// within a few seconds while they still send, and others are served.
#[test]
fn lingering_closes_end_even_if_the_client_never_closes() {
    const CLIENTS: usize = 16;
    let server = Server::start_opts(config_args(&[]));
    let base = server.fd_count();
    let mut socks: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut c = server.client("sd0");
            c.send(0, nbd::wire::NBD_CMD_DISC, 0, 0, &[]).expect("DISC");
            // The server's FIN: every reply owed (none) was sent.
            c.sock
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut b = [0u8; 16];
            assert_eq!(c.sock.read(&mut b).expect("read"), 0, "EOF after DISC");
            c.sock
        })
        .collect();
    // They keep sending, and never close.
    let t0 = Instant::now();
    let mut gone_at = None;
    while t0.elapsed() < Duration::from_secs(6) {
        for s in &mut socks {
            let _ = s.write(b"junk");
        }
        if gone_at.is_none() && server.fd_count() <= base {
            gone_at = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(at) = gone_at else {
        panic!(
            "{} sockets still held after 6 s of junk from closed clients\n{}",
            server.fd_count().saturating_sub(base),
            server.diag()
        );
    };
    eprintln!("every lingering socket gone after {at:?}");
    io_within(&server, FAIR_WAIT).expect("I/O after");
    drop(socks);
    server.stop().assert_clean("SIGTERM");
}
