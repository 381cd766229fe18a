//! Errors of the backing file reach the client as NBD errors, through the
//! DMA disk (`sd0`) and the file device (`vnd0`), and the connection goes
//! on: a write past `RLIMIT_FSIZE` is `NBD_EIO`, a write to a full
//! filesystem `NBD_ENOSPC`.

mod common;

use common::{Client, Rng, Server, ServerOpts, Witness, machine_toml, test_seed};
use nbd::ErrorCode;
use nbd::wire::{NBD_CMD_FLAG_FUA, NBD_CMD_WRITE};

/// Real device errors, end to end: the server runs with `RLIMIT_FSIZE` at
/// 64 MiB (and `SIGXFSZ` ignored), so the device's `pwrite` of any block at
/// or beyond 64 MiB of a 128 MiB backing file fails with `EFBIG` — through
/// the DMA disk (`sd0`) and the file device (`vnd0`). Such a write must be
/// answered `NBD_EIO` (simple or structured), the connection must go on,
/// and so must everything else.
#[test]
fn device_errors_are_eio() {
    if common::require_tool("prlimit", "util-linux").is_none() {
        return;
    }
    const LIMIT: u64 = 64 << 20;
    const BIG: u64 = 128 << 20;
    let seed = test_seed("device_errors_are_eio");
    let mut r = Rng::new(seed);
    let mut text = machine_toml(2, "64M");
    text += "[[disk]]\nname = \"sd0\"\nfile = \"sd0.img\"\nsize = \"128M\"\ndvma = \"strict\"\n\n";
    text += "[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\nsize = \"128M\"\n";
    let mut opts = ServerOpts::config(&text);
    opts.sparse = vec![("sd0.img".into(), BIG), ("vnd0.img".into(), BIG)];
    opts.fsize_limit = Some(LIMIT);
    let server = Server::start_opts(opts);
    let mut witness = Witness::new(&server, "sd0", 0, 8 << 20, seed ^ 5);
    witness.check(&server, "before the device errors");
    let eio = ErrorCode::Io.to_u32();
    for e in ["sd0", "vnd0"] {
        for structured in [false, true] {
            let ctx = format!("{e}, structured {structured}");
            let mut c = Client::open(server.addr, e, structured)
                .unwrap_or_else(|err| panic!("{ctx}: connect: {err}\n{}", server.diag()));
            assert_eq!(c.size(), BIG, "{ctx}: size");
            let max = u64::from(c.max_payload().min(1 << 20));
            for (what, flags, off, len) in [
                ("write beyond the limit", 0, 80 << 20, 4096),
                (
                    "FUA write beyond the limit",
                    NBD_CMD_FLAG_FUA,
                    100 << 20,
                    65536,
                ),
                ("write straddling the limit", 0, LIMIT - 4096, 8192),
                ("largest write at the limit", 0, LIMIT, max),
                (
                    "write at the last block",
                    NBD_CMD_FLAG_FUA,
                    BIG - 4096,
                    4096,
                ),
            ] {
                let data = r.bytes(len as usize);
                match c.write_flags(flags, off, &data) {
                    Ok(Err(got)) if got == eio => {}
                    other => panic!(
                        "{ctx}: {what} (offset {off}, {len} bytes): {other:?}, want NBD_EIO (5)\n{}",
                        server.diag()
                    ),
                }
                // The same connection goes on: reads there work (nothing
                // beyond the limit was written: zeroes), and a write below.
                match c.read(LIMIT.max(off), 4096) {
                    Ok(Ok(d)) if d.iter().all(|b| *b == 0) => {}
                    other => panic!("{ctx}: read after {what}: {other:?}\n{}", server.diag()),
                }
                let below = r.below((8 << 20) / 4096) * 4096 + (16 << 20);
                let good = r.bytes(16384);
                assert_eq!(
                    c.write(below, &good).expect("write"),
                    Ok(()),
                    "{ctx}: write below the limit after {what}"
                );
                assert_eq!(
                    c.read(below, 16384).expect("read"),
                    Ok(good),
                    "{ctx}: read back after {what}"
                );
                witness.check(&server, &format!("{ctx}: after {what}"));
            }
            // Pipelined: good and failing writes mixed, each reply its own.
            let mut want = std::collections::HashMap::new();
            for i in 0..16u64 {
                let (off, err) = if i % 2 == 0 {
                    ((16 << 20) + i * 65536, 0)
                } else {
                    (LIMIT + i * 65536, eio)
                };
                let cookie = c
                    .send(0, NBD_CMD_WRITE, off, 65536, &r.bytes(65536))
                    .expect("send");
                want.insert(cookie, err);
            }
            for _ in 0..16 {
                let rep = c.recv().unwrap_or_else(|err| panic!("{ctx}: reply: {err}"));
                assert_eq!(
                    Some(rep.error),
                    want.remove(&rep.cookie),
                    "{ctx}: pipelined reply for {:#x}",
                    rep.cookie
                );
            }
            c.disconnect().expect("disconnect");
        }
    }
    witness.check(&server, "after the device errors");
    server.stop().assert_clean("SIGTERM");
}

/// A disk on a full filesystem (a 1 MiB tmpfs; needs root): writes that
/// find no space are answered NBD_ENOSPC, through the DMA disk and the file
/// device, and the connection goes on.
#[test]
fn full_filesystem_is_enospc() {
    let root = common::TempDir::new("enospc");
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        common::skip::skip("cannot mount a 1 MiB tmpfs (needs root)");
        return;
    }
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _umount = Umount(data.clone());
    let mut text = machine_toml(2, "64M");
    text += "[[disk]]\nname = \"sd0\"\nfile = \"sd0.img\"\nsize = \"16M\"\ndvma = \"strict\"\npool = \"8M\"\n\n";
    text += "[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\nsize = \"16M\"\n";
    let mut opts = ServerOpts::config(&text);
    opts.sparse = vec![("sd0.img".into(), 16 << 20), ("vnd0.img".into(), 16 << 20)];
    let server = Server::start_in(root.path(), &opts);
    let enospc = ErrorCode::NoSpc.to_u32();
    for e in ["sd0", "vnd0"] {
        let mut c = server.client(e);
        let mut full = false;
        for i in 0..16u64 {
            match c.write(i << 20, &vec![0xa5; 1 << 20]).expect("write") {
                Ok(()) => {}
                Err(got) => {
                    assert_eq!(
                        got,
                        enospc,
                        "{e}: a write to a full filesystem, at {i} MiB: error {got}, want NBD_ENOSPC\n{}",
                        server.diag()
                    );
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "{e}: 16 MiB written to a 1 MiB filesystem");
        // The connection goes on.
        assert!(
            c.read(0, 4096).expect("read").is_ok(),
            "{e}: read after ENOSPC"
        );
    }
    let _ = server.stop();
}
