//! `dvma serve` with the NBD clients everyone uses: qemu-io and qemu-img
//! (qemu-utils), nbdinfo and nbdcopy (libnbd-bin), fio's nbd engine (fio).
//!
//! Every export kind is used: `sd0` (a DMA disk), `ccd0` (striped over
//! `sd1` and `sd2`), `vnd0` (a file device) and the read-only `sd3`. Each
//! test has its own server. What the tools write, the raw client of the
//! harness reads back, and the other way round.
//!
//! A missing tool fails the test, unless `DVMA_ALLOW_SKIP=1` (and not
//! `CI=true`), which skips it with a `SKIPPED` line (`common::skip`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Rng, Server, ServerOpts, TempDir, machine_toml, require_tool, run_tool, test_seed};

const M: u64 = 1 << 20;
/// sd0, ccd0 and vnd0 are 16 MiB each.
const SIZE: u64 = 16 * M;
/// The read-only sd3.
const RO_SIZE: u64 = 4 * M;
const RW_EXPORTS: [&str; 3] = ["sd0", "ccd0", "vnd0"];
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn ro_byte(i: u64) -> u8 {
    (i ^ (i >> 12)).wrapping_mul(13) as u8
}

fn server() -> Server {
    let mut t = machine_toml(2, "160M");
    for (name, size) in [("sd0", "16M"), ("sd1", "8M"), ("sd2", "8M")] {
        t += &format!(
            "[[disk]]\nname = \"{name}\"\nfile = \"{name}.img\"\nsize = \"{size}\"\npool = \"16M\"\n\n"
        );
    }
    t += "[[disk]]\nname = \"sd3\"\nfile = \"sd3.img\"\nread_only = true\npool = \"16M\"\n\n";
    t += "[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd1\", \"sd2\"]\ninterleave = \"64K\"\n\n";
    t += "[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\nsize = \"16M\"\n";
    let mut opts = ServerOpts::config(&t);
    opts.files
        .push(("sd3.img".into(), (0..RO_SIZE).map(ro_byte).collect()));
    let s = Server::start_opts(opts);
    for e in RW_EXPORTS.iter().chain(&["sd3"]) {
        assert!(s.has_export(e), "no export {e}: {:?}", s.exports);
    }
    s
}

fn check_tool_run(
    what: &str,
    server: &Server,
    r: (std::process::ExitStatus, String, String),
) -> String {
    let (status, out, err) = r;
    assert!(
        status.success(),
        "{what}: exit {status}\nstdout:\n{out}\nstderr:\n{err}\n{}",
        server.diag()
    );
    server.assert_healthy(what);
    out
}

#[test]
fn qemu_io_writes_and_reads_every_export() {
    let Some(qemu_io) = require_tool("qemu-io", "qemu-utils") else {
        return;
    };
    let server = server();
    for e in RW_EXPORTS {
        let url = server.url(e);
        // Aligned I/O, I/O at an offset, an unaligned write (qemu does
        // read-modify-write around the 512-byte minimum block), zeroes,
        // discard and flush.
        let cmds = [
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 5246976 1M",
            "read -P 0xcd 5246976 1M",
            "write -P 0x5a 7340132 1000",
            "read -P 0x5a 7340132 1000",
            "read -P 0 7340032 100",
            "read -P 0 7341132 380",
            "write -P 0x11 2M 64k",
            "write -z 2M 64k",
            "read -P 0 2M 64k",
            "write -P 0x22 15M 1M",
            "discard 12M 64k",
            "flush",
            "read -P 0x22 15M 1M",
        ];
        let mut cmd = Command::new(&qemu_io);
        cmd.arg("-f").arg("raw").arg(&url);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        let out = check_tool_run(
            &format!("qemu-io on {e}"),
            &server,
            run_tool(&mut cmd, TOOL_TIMEOUT),
        );
        assert!(
            !out.contains("Pattern verification failed") && !out.contains("error"),
            "qemu-io on {e}:\n{out}"
        );
        // What qemu wrote, the raw client reads.
        let mut c = server.client(e);
        let check = |c: &mut common::Client, off: u64, len: u32, byte: u8| {
            let d = c
                .read(off, len)
                .expect("read")
                .unwrap_or_else(|err| panic!("{e}: read at {off}: error {err}"));
            if let Some(i) = d.iter().position(|b| *b != byte) {
                panic!(
                    "{e}: byte {} is {:#04x}, qemu-io wrote {byte:#04x}",
                    off + i as u64,
                    d[i]
                );
            }
        };
        check(&mut c, 0, M as u32, 0xab);
        check(&mut c, 5_246_976, M as u32, 0xcd);
        check(&mut c, 2 * M, 65536, 0);
        check(&mut c, 15 * M, M as u32, 0x22);
        let blk = c.read(7_340_032, 1536).expect("read").expect("read ok");
        assert!(
            blk[..100].iter().all(|b| *b == 0),
            "{e}: before the unaligned write"
        );
        assert!(
            blk[100..1100].iter().all(|b| *b == 0x5a),
            "{e}: the unaligned write"
        );
        assert!(
            blk[1100..].iter().all(|b| *b == 0),
            "{e}: after the unaligned write"
        );
        c.disconnect().expect("disconnect");
    }
    // And the other way round: what the raw client writes, qemu-io reads.
    let mut c = server.client("ccd0");
    assert_eq!(
        c.write(8 * M, &vec![0x6b; 3 * 65536]).expect("write"),
        Ok(())
    );
    c.disconnect().expect("disconnect");
    let mut cmd = Command::new(&qemu_io);
    cmd.arg("-f")
        .arg("raw")
        .arg("-r")
        .arg(server.url("ccd0"))
        .arg("-c")
        .arg("read -P 0x6b 8M 192k");
    let out = check_tool_run(
        "qemu-io -r on ccd0",
        &server,
        run_tool(&mut cmd, TOOL_TIMEOUT),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The read-only export: reads work, writes fail.
    let mut cmd = Command::new(&qemu_io);
    cmd.arg("-f")
        .arg("raw")
        .arg(server.url("sd3"))
        .arg("-c")
        .arg("write -P 0x01 0 4k");
    let (status, out, err) = run_tool(&mut cmd, TOOL_TIMEOUT);
    assert!(
        !status.success()
            || out.contains("failed")
            || err.contains("only")
            || err.contains("failed"),
        "qemu-io wrote to the read-only export?\n{out}\n{err}"
    );
    let mut c = server.client("sd3");
    let d = c.read(0, 4096).expect("read").expect("read ok");
    assert!(
        d.iter().enumerate().all(|(i, b)| *b == ro_byte(i as u64)),
        "the read-only export changed"
    );
    server.assert_healthy("after qemu-io");
    server.stop().assert_clean("SIGTERM");
}

fn qemu_img_compare(qemu_img: &Path, server: &Server, a: &str, b: &str) -> (bool, String) {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["compare", "-f", "raw", "-F", "raw", a, b]);
    let (status, out, err) = run_tool(&mut cmd, TOOL_TIMEOUT);
    server.assert_healthy("qemu-img compare");
    match status.code() {
        Some(0) => (true, out),
        Some(1) => (false, out),
        _ => panic!(
            "qemu-img compare {a} {b}: exit {status}\n{out}\n{err}\n{}",
            server.diag()
        ),
    }
}

#[test]
fn nbdcopy_and_qemu_img_compare() {
    let Some(nbdcopy) = require_tool("nbdcopy", "libnbd-bin") else {
        return;
    };
    let Some(qemu_img) = require_tool("qemu-img", "qemu-utils") else {
        return;
    };
    let seed = test_seed("nbdcopy_and_qemu_img_compare");
    let mut r = Rng::new(seed);
    let server = server();
    let tmp = TempDir::new("nbdcopy");
    // sd0: random data, with zero holes left here and there.
    let mut image = vec![0u8; SIZE as usize];
    let mut c = server.client("sd0");
    for (i, chunk) in image.chunks_mut(M as usize).enumerate() {
        r.fill(chunk);
        if i % 5 == 2 {
            chunk[..256 << 10].fill(0);
        }
        assert_eq!(c.write(i as u64 * M, chunk).expect("write"), Ok(()));
    }
    c.disconnect().expect("disconnect");

    // Export to a local file.
    let local = tmp.path().join("sd0.img");
    let mut cmd = Command::new(&nbdcopy);
    cmd.arg(server.url("sd0")).arg(&local);
    check_tool_run(
        "nbdcopy sd0 to a file",
        &server,
        run_tool(&mut cmd, TOOL_TIMEOUT),
    );
    let got = std::fs::read(&local).expect("the copy");
    assert_eq!(got.len(), image.len(), "size of the copy");
    if let Some(i) = got.iter().zip(&image).position(|(a, b)| a != b) {
        panic!("nbdcopy's copy differs at byte {i}");
    }
    let local_s = local.display().to_string();
    let (same, out) = qemu_img_compare(&qemu_img, &server, &local_s, &server.url("sd0"));
    assert!(same, "qemu-img compare file sd0: {out}");

    // Export to export: sd0 to vnd0 and to ccd0 (multi-connection copies).
    for dst in ["vnd0", "ccd0"] {
        let mut cmd = Command::new(&nbdcopy);
        cmd.arg("--flush")
            .arg(server.url("sd0"))
            .arg(server.url(dst));
        check_tool_run(
            &format!("nbdcopy sd0 to {dst}"),
            &server,
            run_tool(&mut cmd, TOOL_TIMEOUT),
        );
        let (same, out) =
            qemu_img_compare(&qemu_img, &server, &server.url("sd0"), &server.url(dst));
        assert!(same, "qemu-img compare sd0 {dst}: {out}");
        let (same, out) = qemu_img_compare(&qemu_img, &server, &local_s, &server.url(dst));
        assert!(same, "qemu-img compare file {dst}: {out}");
    }
    // The comparison does compare: one sector changed in vnd0 is found.
    let mut c = server.client("vnd0");
    let off = 9 * M + 4096;
    assert_eq!(c.write(off, &[0xff; 512]).expect("write"), Ok(()));
    c.disconnect().expect("disconnect");
    let (same, out) = qemu_img_compare(&qemu_img, &server, &local_s, &server.url("vnd0"));
    assert!(!same, "qemu-img compare missed a changed sector: {out}");
    assert!(
        out.contains(&off.to_string()),
        "qemu-img compare names the offset {off}: {out}"
    );

    // And the read-only export copies out exactly.
    let ro = tmp.path().join("sd3.img");
    let mut cmd = Command::new(&nbdcopy);
    cmd.arg(server.url("sd3")).arg(&ro);
    check_tool_run(
        "nbdcopy sd3 to a file",
        &server,
        run_tool(&mut cmd, TOOL_TIMEOUT),
    );
    let got = std::fs::read(&ro).expect("the copy");
    assert!(
        got.len() as u64 == RO_SIZE && got.iter().enumerate().all(|(i, b)| *b == ro_byte(i as u64)),
        "the copy of the read-only export differs"
    );
    server.stop().assert_clean("SIGTERM");
}

fn nbdinfo(tool: &Path, server: &Server, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    let out = check_tool_run(
        &format!("nbdinfo {args:?}"),
        server,
        run_tool(&mut cmd, TOOL_TIMEOUT),
    );
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("nbdinfo {args:?}: not JSON ({e}):\n{out}"))
}

#[test]
fn nbdinfo_shows_sizes_flags_and_block_sizes() {
    let Some(tool) = require_tool("nbdinfo", "libnbd-bin") else {
        return;
    };
    let server = server();
    let max = server.client("sd0").max_payload();
    for (e, size, ro) in [
        ("sd0", SIZE, false),
        ("ccd0", SIZE, false),
        ("vnd0", SIZE, false),
        ("sd3", RO_SIZE, true),
    ] {
        let url = server.url(e);
        let v = nbdinfo(&tool, &server, &["--json", "--no-content", &url]);
        assert_eq!(v["protocol"], "newstyle-fixed", "{e}: {v}");
        assert_eq!(v["structured"], true, "{e}: {v}");
        let x = &v["exports"][0];
        assert_eq!(x["export-name"], e, "{e}: {x}");
        assert_eq!(x["export-size"], size, "{e}: {x}");
        for (k, want) in [
            ("is_read_only", ro),
            ("can_flush", true),
            // A read-only export offers no write command (issue 12).
            ("can_fua", !ro),
            ("can_trim", !ro),
            ("can_zero", !ro),
            ("can_multi_conn", true),
            ("can_df", true),
            ("can_cache", false),
            ("can_fast_zero", false),
        ] {
            assert_eq!(x[k], want, "{e}: {k} in {x}");
        }
        assert_eq!(x["block_size_minimum"], 512, "{e}: {x}");
        assert_eq!(x["block_size_preferred"], 4096, "{e}: {x}");
        let bmax = x["block_size_maximum"].as_u64().unwrap_or(0);
        assert!(
            (4096..=32 * M).contains(&bmax),
            "{e}: block_size_maximum {bmax}: {x}"
        );
        if e == "sd0" {
            assert_eq!(bmax, u64::from(max), "the raw client and nbdinfo disagree");
        }
    }
    // NBD_OPT_LIST, then NBD_OPT_INFO on each: every export is listed.
    let base = format!("nbd://{}", server.addr);
    let v = nbdinfo(&tool, &server, &["--list", "--json", "--no-content", &base]);
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports in {v}"))
        .iter()
        .map(|x| x["export-name"].as_str().unwrap_or("?").to_string())
        .collect();
    names.sort();
    let mut want = server.exports.clone();
    want.sort();
    assert_eq!(names, want, "nbdinfo --list");
    // A missing export is an error, and the server is fine afterwards.
    let mut cmd = Command::new(&tool);
    cmd.arg(server.url("nosuch"));
    let (status, _, _) = run_tool(&mut cmd, TOOL_TIMEOUT);
    assert!(!status.success(), "nbdinfo on a missing export succeeded");
    server.assert_healthy("after nbdinfo");
    server.stop().assert_clean("SIGTERM");
}

#[test]
fn fio_randrw_verifies_on_every_export() {
    let Some(fio) = require_tool("fio", "fio") else {
        return;
    };
    let server = server();
    for e in RW_EXPORTS {
        let mut cmd = Command::new(&fio);
        // fio writes its verify state files into its working directory.
        cmd.current_dir(&server.root)
            .arg(format!("--name={e}"))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", server.url(e)))
            .args([
                "--rw=randrw",
                "--bs=4k",
                "--iodepth=16",
                "--size=8M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
            ]);
        let out = check_tool_run(
            &format!("fio on {e}"),
            &server,
            run_tool(&mut cmd, TOOL_TIMEOUT),
        );
        // fio may print lines before the JSON.
        let json = &out[out
            .find('{')
            .unwrap_or_else(|| panic!("fio on {e}: no JSON:\n{out}"))..];
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|err| panic!("fio on {e}: {err}\n{out}"));
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "fio on {e}: {job}");
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        let read = job["read"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(
            written > 0 && read > 0,
            "fio on {e}: read {read}, wrote {written}"
        );
        eprintln!("fio on {e}: read {read} bytes, wrote {written} bytes, verified");
    }
    server.assert_healthy("after fio");
    server.stop().assert_clean("SIGTERM");
}

/// The harness's raw client, with requests as large as the server allows:
/// maximum-size writes at odd sector offsets (so every split into device
/// transfers, ccd stripes and DMA pieces falls off any alignment but the
/// sector's), pipelined, with simple and structured replies, on every
/// export; then every byte of every export is compared with a model.
#[test]
fn largest_requests_round_trip_on_every_export() {
    let seed = test_seed("largest_requests_round_trip_on_every_export");
    let mut r = Rng::new(seed);
    let server = server();
    for e in RW_EXPORTS {
        let mut model = vec![0u8; SIZE as usize];
        for structured in [false, true] {
            let mut c = common::Client::open(server.addr, e, structured)
                .unwrap_or_else(|err| panic!("{e}: {err}\n{}", server.diag()));
            let max = u64::from(c.max_payload());
            // Non-overlapping writes in flight at once, each in its own
            // part of the export: two parts if the maximum payload is large.
            let parts = if max > SIZE / 4 { 2 } else { 4 };
            let part = SIZE / parts;
            let mut sent = Vec::new();
            for q in 0..parts {
                let len = max.min(part) - 512 * (1 + r.below(4));
                let room = (part - len) / 512;
                let off = q * part + 512 * (2 * r.below(room.div_ceil(2)) + 1);
                let data = r.bytes(len as usize);
                let flags = if q % 2 == 1 {
                    nbd::wire::NBD_CMD_FLAG_FUA
                } else {
                    0
                };
                let cookie = c
                    .send(flags, nbd::wire::NBD_CMD_WRITE, off, len as u32, &data)
                    .expect("send");
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                sent.push((cookie, off, len));
            }
            for _ in 0..sent.len() {
                let rep = c
                    .recv()
                    .unwrap_or_else(|err| panic!("{e}: reply: {err}\n{}", server.diag()));
                assert_eq!(rep.error, 0, "{e}: large write failed: {rep:?}");
            }
            // Read them back, pipelined, plus reads straddling their ends.
            let mut reads = std::collections::HashMap::new();
            for &(_, off, len) in &sent {
                for (o, l) in [(off, len), (off - 512, 4096), (off + len - 1536, 4096)] {
                    let l = l.min(SIZE - o);
                    let cookie = c
                        .send(0, nbd::wire::NBD_CMD_READ, o, l as u32, &[])
                        .expect("send");
                    reads.insert(cookie, (o, l));
                }
            }
            for _ in 0..reads.len() {
                let rep = c
                    .recv()
                    .unwrap_or_else(|err| panic!("{e}: reply: {err}\n{}", server.diag()));
                let (o, l) = reads[&rep.cookie];
                assert_eq!(rep.error, 0, "{e}: read {o}+{l} failed");
                if rep.data[..] != model[o as usize..(o + l) as usize] {
                    let i = rep
                        .data
                        .iter()
                        .zip(&model[o as usize..])
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    panic!(
                        "{e} (structured {structured}): read {o}+{l} differs at byte {} (seed {seed:#x})",
                        o + i as u64
                    );
                }
            }
            c.disconnect().expect("disconnect");
        }
        // Every byte: nothing landed anywhere else.
        let mut c = server.client(e);
        let step = u64::from(c.max_payload()).min(SIZE);
        let mut off = 0;
        while off < SIZE {
            let d = c
                .read(off, step as u32)
                .expect("read")
                .unwrap_or_else(|err| panic!("{e}: read at {off}: error {err}"));
            if d[..] != model[off as usize..(off + step) as usize] {
                let i = d
                    .iter()
                    .zip(&model[off as usize..])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                panic!(
                    "{e}: byte {} differs from the model (seed {seed:#x})",
                    off + i as u64
                );
            }
            off += step;
        }
        c.disconnect().expect("disconnect");
    }
    server.assert_healthy("after the largest requests");
    server.stop().assert_clean("SIGTERM");
}
