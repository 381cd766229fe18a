//! The server most hostile-client tests run against: two exports, `sd0`
//! (writable, [`SIZE`]) and `sd1` (read-only, [`RO_SIZE`] bytes of
//! [`ro_byte`]); and [`io_within`], which asks whether another, well-behaved
//! client is still served in time.

use std::time::{Duration, Instant};

use super::Server;
use super::{Client, ServerOpts, disk_toml, machine_toml};

/// Size of the writable export `sd0`. Cases write in the first half; the
/// witness owns the second.
pub const SIZE: u64 = 16 << 20;
/// Size of the read-only export `sd1`, filled with [`ro_byte`].
pub const RO_SIZE: u64 = 4 << 20;

/// The byte at offset `i` of `sd1`.
pub fn ro_byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

/// The two exports, as [`ServerOpts`].
pub fn config() -> ServerOpts {
    let mut text = machine_toml(2, "128M");
    text += &disk_toml("sd0", "16M", "");
    text += "[[disk]]\nname = \"sd1\"\nfile = \"sd1.img\"\nread_only = true\npool = \"16M\"\n";
    let mut opts = ServerOpts::config(&text);
    opts.files
        .push(("sd1.img".into(), (0..RO_SIZE).map(ro_byte).collect()));
    opts
}

/// `config()` with more `serve` arguments.
pub fn config_args(args: &[&str]) -> ServerOpts {
    let mut o = config();
    o.args = args.iter().map(|a| a.to_string()).collect();
    o
}

/// How long another client's small write and read may take while one
/// connection misbehaves.
pub const FAIR_WAIT: Duration = Duration::from_secs(10);

/// A new client writes 4K and reads it back; `Err` unless done within
/// `limit`. (The I/O runs on its own thread, which ends when the server
/// goes.)
pub fn io_within(server: &Server, limit: Duration) -> Result<Duration, String> {
    let addr = server.addr;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = (|| -> Result<(), String> {
            let mut c = Client::connect(addr, "sd0").map_err(|e| format!("connect: {e}"))?;
            let data = vec![0x42u8; 4096];
            match c.write(SIZE / 2, &data) {
                Ok(Ok(())) => {}
                other => return Err(format!("write: {other:?}")),
            }
            match c.read(SIZE / 2, 4096) {
                Ok(Ok(d)) if d == data => Ok(()),
                other => Err(format!("read: {:?}", other.map(|r| r.map(|d| d.len())))),
            }
        })();
        let _ = tx.send(r.map(|()| t.elapsed()));
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}
