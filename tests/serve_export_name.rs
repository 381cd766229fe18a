//! Older clients: one that enters transmission with `NBD_OPT_EXPORT_NAME`
//! learns no block sizes, so it may read and write at any alignment and up
//! to 32 MiB at once; a client that asked for block sizes keeps the checks.

mod common;

use std::io::{Read, Write};

use common::client::ExportDesc;
use common::raw::{fixed_flags, opt};
use common::{Client, Rng, Server, ServerOpts, disk_toml, machine_toml, tcp, test_seed};
use nbd::ErrorCode;
use nbd::wire::NBD_OPT_EXPORT_NAME;

/// A client that enters transmission with NBD_OPT_EXPORT_NAME (it learns
/// no block sizes).
fn connect_export_name(server: &Server, export: &str) -> Client {
    let mut s = tcp(server.addr).expect("connect");
    common::read_greeting(&mut s).expect("greeting");
    s.write_all(&fixed_flags()).expect("flags");
    s.write_all(&opt(NBD_OPT_EXPORT_NAME, export.as_bytes()))
        .expect("EXPORT_NAME");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).expect("EXPORT_NAME reply");
    let desc = ExportDesc {
        size: u64::from_be_bytes(b[0..8].try_into().unwrap()),
        flags: u16::from_be_bytes([b[8], b[9]]),
        ..ExportDesc::default()
    };
    Client::from_stream(s, desc, false)
}

#[test]
fn export_name_clients_get_any_alignment_and_32m() {
    let mut text = machine_toml(2, "128M");
    text += &disk_toml("sd0", "64M", "");
    let server = Server::start_opts(ServerOpts::config(&text));
    let mut r = Rng::new(test_seed("export_name_clients"));
    let mut c = connect_export_name(&server, "sd0");
    let mut model = r.bytes(8192);
    assert_eq!(c.write(0, &model).expect("write"), Ok(()));
    // 100 bytes at offset 1, and a few more odd ones.
    for (off, len) in [(1u64, 100usize), (511, 2), (4000, 1000), (8191, 1)] {
        let got = c.read(off, len as u32).expect("read");
        assert_eq!(
            got.as_deref().map_err(|e| *e),
            Ok(&model[off as usize..off as usize + len]),
            "read {len} at {off}"
        );
        let data = r.bytes(len);
        assert_eq!(
            c.write(off, &data).expect("write"),
            Ok(()),
            "write {len} at {off}"
        );
        model[off as usize..off as usize + len].copy_from_slice(&data);
        assert_eq!(
            c.read(0, 8192).expect("read"),
            Ok(model.clone()),
            "read back after {len} at {off}"
        );
    }
    // 16 MiB (and 32 MiB) at once, aligned and not.
    for (off, len) in [(1 << 20, 16 << 20), (3, 16 << 20), (32 << 20, 32 << 20)] {
        let data = r.bytes(len);
        assert_eq!(
            c.write(off, &data).expect("write"),
            Ok(()),
            "{len} bytes at {off}"
        );
        let back = c.read(off, len as u32).expect("read");
        assert!(
            back.as_ref().is_ok_and(|d| *d == data),
            "{len} bytes at {off} read back: {:?}",
            back.map(|d| d.len())
        );
    }
    // Still refused: beyond 32 MiB.
    assert!(c.read(0, (32 << 20) + 512).expect("read").is_err());
    // A GO client that asked for block sizes keeps the checks.
    let mut g = server.client("sd0");
    assert_eq!(
        g.read(1, 100).expect("read"),
        Err(ErrorCode::Inval.to_u32())
    );
    server.stop().assert_clean("SIGTERM");
}
