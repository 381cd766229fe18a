//! A thousand idle connections, a quarter each just connected, after the
//! greeting, after the client flags and halfway through an option header,
//! while another client does I/O and checks every byte: the server keeps
//! serving it, holds a descriptor per connection, and gives them back when
//! the connections close.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::client::go_data;
use common::fixture::{SIZE, config};
use common::raw::{fixed_flags, opt};
use common::{Client, Rng, Server, Witness, tcp, test_seed};
use nbd::wire::NBD_OPT_GO;

#[test]
fn thousand_idle_connections() {
    let limit = common::raise_nofile(4096);
    let n = if limit >= 1300 {
        1000
    } else {
        eprintln!("thousand_idle_connections: open files limited to {limit}");
        (limit as usize).saturating_sub(200).max(100)
    };
    let seed = test_seed("thousand_idle_connections");
    let server = Server::start_opts(config());
    let mut witness = Witness::new(&server, "sd0", SIZE / 2, SIZE / 2, seed);
    witness.check(&server, "before the connections");
    let base_fds = server.fd_count();

    // Another client does I/O all along, checking every byte.
    let stop = AtomicBool::new(false);
    let ios = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        let io = scope.spawn(|| -> Result<(), String> {
            let mut c = Client::connect(server.addr, "sd0").map_err(|e| e.to_string())?;
            let mut r = Rng::new(seed ^ 2);
            while !stop.load(Ordering::Relaxed) {
                let off = r.below(SIZE / 2 / 4096 - 16) * 4096;
                let blocks = r.range(1, 16) as usize;
                let data = r.bytes(4096 * blocks);
                match c.write(off, &data) {
                    Ok(Ok(())) => {}
                    other => return Err(format!("write during the connections: {other:?}")),
                }
                match c.read(off, data.len() as u32) {
                    Ok(Ok(d)) if d == data => {}
                    Ok(Ok(_)) => return Err(format!("other bytes read back at {off}")),
                    other => return Err(format!("read during the connections: {other:?}")),
                }
                ios.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        let mut conns = Vec::with_capacity(n);
        let mut open_err = None;
        for i in 0..n {
            let mut s = match tcp(server.addr) {
                Ok(s) => s,
                Err(e) => {
                    open_err = Some(format!("connection {i}: {e}"));
                    break;
                }
            };
            // A quarter each: just connected; greeting read; flags sent;
            // half an option header sent.
            let mut step = || -> std::io::Result<()> {
                if i % 4 >= 1 {
                    common::read_greeting(&mut s)?;
                }
                if i % 4 >= 2 {
                    s.write_all(&fixed_flags())?;
                }
                if i % 4 == 3 {
                    s.write_all(&opt(NBD_OPT_GO, &go_data(b"sd0", &[]))[..8])?;
                }
                Ok(())
            };
            if let Err(e) = step() {
                open_err = Some(format!("connection {i} mid-handshake: {e}"));
                break;
            }
            conns.push(s);
            if i % 250 == 249 {
                witness.check(&server, &format!("with {} idle connections", i + 1));
            }
        }
        witness.check(&server, &format!("with {} idle connections", conns.len()));
        let fds_open = server.fd_count();
        stop.store(true, Ordering::Relaxed);
        let io_result = io.join().expect("I/O thread");
        drop(conns);
        (open_err, fds_open, io_result)
    });
    let (open_err, fds_open, io_result) = result;
    assert!(
        open_err.is_none(),
        "{}\n{}",
        open_err.unwrap_or_default(),
        server.diag()
    );
    io_result.unwrap_or_else(|e| panic!("the busy client failed: {e}\n{}", server.diag()));
    assert!(
        ios.load(Ordering::Relaxed) > 0,
        "the busy client did no I/O"
    );
    assert!(
        fds_open >= base_fds + n * 3 / 4,
        "the server holds {fds_open} descriptors with {n} connections open (base {base_fds})"
    );
    // Closed: the server gives the descriptors back.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = server.fd_count();
        if now <= base_fds + 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server still holds {now} descriptors 15 s after {n} connections closed (base {base_fds})\n{}",
            server.diag()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    witness.check(&server, "after closing the connections");
    eprintln!(
        "thousand_idle_connections: {n} connections, {} busy-client I/Os meanwhile",
        ios.load(Ordering::Relaxed)
    );
    server.stop().assert_clean("SIGTERM");
}
