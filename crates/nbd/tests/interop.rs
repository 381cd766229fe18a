//! Interoperability with real NBD clients: `nbdinfo` (package `libnbd-bin`)
//! and `qemu-io` (package `qemu-utils`) against a tiny in-memory server built
//! from this crate, on a free loopback port.
//!
//! A missing tool fails the test, unless `DVMA_ALLOW_SKIP=1` (and not
//! `CI=true`), which skips it with a `SKIPPED` line (`tests/common/skip.rs`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[path = "../../../tests/common/skip.rs"]
mod skip;

use nbd::{
    BlockSizes, Command, ExportInfo, ExportList, HandshakeLimits, ReadReply, Request, Validation,
};

const DISK_SIZE: u64 = 1 << 20;
const RO_SIZE: u64 = 64 * 1024;

fn exports() -> ExportList {
    let disk = ExportInfo {
        description: "interop disk".into(),
        block_sizes: BlockSizes::new(512, 4096, 1 << 25).unwrap(),
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_write_zeroes: true,
        can_multi_conn: true,
        ..ExportInfo::new("disk", DISK_SIZE)
    };
    let ro = ExportInfo {
        description: "read-only".into(),
        read_only: true,
        ..ExportInfo::new("ro", RO_SIZE)
    };
    ExportList::new(vec![disk, ro]).with_default("disk")
}

type Disks = Arc<HashMap<String, Mutex<Vec<u8>>>>;

/// The test server: an accept thread and one thread per connection. Dropping
/// it (also while a failing test unwinds) stops and joins every thread.
struct Server {
    addr: SocketAddr,
    disks: Disks,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let table = exports();
        let disks: Disks = Arc::new(
            table
                .exports
                .iter()
                .map(|e| (e.name.clone(), Mutex::new(vec![0u8; e.size as usize])))
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (disks, stop) = (disks.clone(), stop.clone());
            thread::spawn(move || accept_loop(listener, table, disks, stop))
        };
        Server {
            addr,
            disks,
            stop,
            accept: Some(accept),
        }
    }

    fn url(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, table: ExportList, disks: Disks, stop: Arc<AtomicBool>) {
    let table = Arc::new(table);
    let mut conns: Vec<(TcpStream, JoinHandle<()>)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((sock, _)) => {
                sock.set_nonblocking(false).unwrap();
                sock.set_nodelay(true).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let handle = sock.try_clone().unwrap();
                let (table, disks) = (table.clone(), disks.clone());
                let t = thread::spawn(move || {
                    let closer = sock.try_clone().unwrap();
                    if let Err(e) = serve(sock, &table, &disks) {
                        eprintln!("connection ended: {e}");
                    }
                    // The accept loop holds a clone of the socket, so dropping
                    // ours would not close the connection: shut it down, or
                    // a client waiting for the close after NBD_CMD_DISC hangs.
                    let _ = closer.shutdown(Shutdown::Both);
                });
                conns.push((handle, t));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    for (sock, t) in conns {
        let _ = sock.shutdown(Shutdown::Both);
        let _ = t.join();
    }
}

/// One connection: the handshake, then requests until `NBD_CMD_DISC`.
fn serve(mut sock: TcpStream, table: &ExportList, disks: &Disks) -> io::Result<()> {
    let session = match nbd::negotiate(&mut sock, table, HandshakeLimits::default()) {
        Ok(s) => s,
        Err(e) if e.is_client_abort() => return Ok(()),
        Err(e) => return Err(io::Error::other(e)),
    };
    let structured = session.structured_replies;
    let disk = &disks[&session.export.name];
    loop {
        let mut raw = [0u8; 28];
        match sock.read_exact(&mut raw) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let req = Request::parse(&raw).map_err(io::Error::other)?;
        match session.validate(&req) {
            Err(Validation::Disconnect { .. }) => return Ok(()),
            Err(Validation::Reject { error, drain }) => {
                nbd::discard(&mut sock, drain.into())?;
                sock.write_all(&nbd::error_reply(req.cookie, error, structured))?;
            }
            Ok(()) => {
                let range = req.offset as usize..(req.offset + u64::from(req.length)) as usize;
                match req.command {
                    Command::Disc => return Ok(()),
                    Command::Read => {
                        let mut reply = ReadReply::new(&req, structured);
                        reply
                            .data_mut()
                            .copy_from_slice(&disk.lock().unwrap()[range]);
                        sock.write_all(reply.as_bytes())?;
                    }
                    Command::Write => {
                        let mut data = vec![0; req.length as usize];
                        sock.read_exact(&mut data)?;
                        disk.lock().unwrap()[range].copy_from_slice(&data);
                        sock.write_all(&nbd::simple_reply(req.cookie, Ok(&[])))?;
                    }
                    Command::Trim | Command::WriteZeroes => {
                        disk.lock().unwrap()[range].fill(0);
                        sock.write_all(&nbd::simple_reply(req.cookie, Ok(&[])))?;
                    }
                    Command::Flush => sock.write_all(&nbd::simple_reply(req.cookie, Ok(&[])))?,
                    other => unreachable!("validate accepted {other:?}"),
                }
            }
        }
    }
}

/// Whether `tool` can be run; if not, the test fails, or skips where
/// skipping is allowed (`skip::skip`).
fn have(tool: &str) -> bool {
    let found = Process::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip::skip(&format!(
            "{tool} is not installed (apt-get install libnbd-bin qemu-utils)"
        ));
    }
    found
}

/// Runs a client with a 60 s limit; returns its stdout, panicking with its
/// output if it fails.
fn run(tool: &str, args: &[&str]) -> String {
    let mut child = Process::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{tool} {args:?} timed out");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// `"key": value` in nbdinfo's JSON, whitespace-insensitive.
fn json_has(json: &str, key: &str, value: &str) -> bool {
    let squeezed: String = json.chars().filter(|c| !c.is_whitespace()).collect();
    squeezed.contains(&format!("\"{key}\":{value}"))
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    if !have("nbdinfo") {
        return;
    }
    let server = Server::start();
    let json = run("nbdinfo", &["--json", &server.url("disk")]);
    for (key, value) in [
        ("export-name", "\"disk\""),
        ("export-size", "1048576"),
        ("is_read_only", "false"),
        ("can_flush", "true"),
        ("can_fua", "true"),
        ("can_trim", "true"),
        ("can_zero", "true"),
        ("can_multi_conn", "true"),
        ("can_df", "true"),
        ("block_size_minimum", "512"),
        ("block_size_preferred", "4096"),
        ("block_size_maximum", "33554432"),
        ("description", "\"interopdisk\""),
    ] {
        assert!(json_has(&json, key, value), "{key} != {value} in\n{json}");
    }
    let json = run("nbdinfo", &["--json", &server.url("ro")]);
    for (key, value) in [
        ("export-size", "65536"),
        ("is_read_only", "true"),
        ("can_flush", "false"),
        ("can_trim", "false"),
        ("can_multi_conn", "false"),
    ] {
        assert!(json_has(&json, key, value), "{key} != {value} in\n{json}");
    }
}

#[test]
fn nbdinfo_lists_exports() {
    if !have("nbdinfo") {
        return;
    }
    let server = Server::start();
    let out = run("nbdinfo", &["--list", &format!("nbd://{}", server.addr)]);
    for needle in ["disk", "ro", "interop disk", "1048576", "65536"] {
        assert!(out.contains(needle), "{needle:?} missing from\n{out}");
    }
}

#[test]
fn qemu_io_writes_and_reads_back() {
    if !have("qemu-io") {
        return;
    }
    let server = Server::start();
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &server.url("disk"),
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -z 64k 4k",
            "-c",
            "read -P 0 64k 4k",
            "-c",
            "flush",
        ],
    );
    assert!(
        out.contains("wrote 65536/65536 bytes at offset 0"),
        "qemu-io:\n{out}"
    );
    assert!(
        out.contains("read 65536/65536 bytes at offset 0"),
        "qemu-io:\n{out}"
    );
    assert!(
        !out.contains("Pattern verification failed"),
        "qemu-io:\n{out}"
    );
    let disk = server.disks["disk"].lock().unwrap();
    assert!(
        disk[..65536].iter().all(|&b| b == 0xab),
        "the server's disk holds the data"
    );
    assert!(disk[65536..].iter().all(|&b| b == 0));
}

#[test]
fn qemu_io_errors_on_a_read_only_export() {
    if !have("qemu-io") {
        return;
    }
    let server = Server::start();
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for
    // writing; nothing may reach the disk, and reading still works.
    let out = Process::new("qemu-io")
        .args(["-f", "raw", &server.url("ro"), "-c", "write -P 0xcd 0 4k"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "write to a read-only export succeeded"
    );
    assert!(
        stderr.contains("Permission denied") || stderr.contains("read-only"),
        "qemu-io: {stderr}"
    );
    let out = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            &server.url("ro"),
            "-c",
            "read -P 0 0 64k",
        ],
    );
    assert!(out.contains("read 65536/65536 bytes"), "qemu-io:\n{out}");
    assert!(server.disks["ro"].lock().unwrap().iter().all(|&b| b == 0));
}
