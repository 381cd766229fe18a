//! `dvma serve` off loopback: no silent exposure.
//!
//! * `--listen 0.0.0.0:0` without TLS is refused at startup, saying why;
//!   with `--insecure-listen` it serves (with a warning).
//!
//! Only 127.0.0.1 and 0.0.0.0 are bound, and every client connects through
//! loopback.

mod common;

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Server, ServerOpts, disk_toml, machine_toml};

fn config_text() -> String {
    let mut text = machine_toml(1, "64M");
    text += &disk_toml("sd0", "16M", "");
    text
}

/// Runs `dvma serve ARGS` with a small configuration and expects it to exit
/// (a refusal) within 20 s: its status and stderr. A server that starts
/// serving instead is killed and the test fails.
fn serve_refused(args: &[&str]) -> (ExitStatus, String) {
    let dir = common::TempDir::new("tls-refused");
    std::fs::write(dir.path().join("c.toml"), config_text()).expect("config");
    let mut child = Command::new(common::dvma_bin())
        .arg("serve")
        .args(args)
        .arg("--config")
        .arg(dir.path().join("c.toml"))
        .arg("--data-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "dvma serve {args:?} was not refused: it runs\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    (status, err)
}

#[test]
fn non_loopback_without_tls_is_refused() {
    let (status, err) = serve_refused(&["--listen", "0.0.0.0:0"]);
    assert!(!status.success(), "--listen 0.0.0.0:0: exit {status}");
    assert!(
        err.contains("0.0.0.0") && err.contains("loopback") && err.contains("--insecure-listen"),
        "--listen 0.0.0.0:0 refused without saying why: {err}"
    );
}

#[test]
fn non_loopback_with_insecure_listen_serves() {
    let opts = ServerOpts {
        listen: Some("0.0.0.0:0".into()),
        args: vec!["--insecure-listen".into()],
        ..ServerOpts::config(&config_text())
    };
    let server = Server::start_opts(opts);
    assert!(
        server.stderr().contains("WARNING") && server.stderr().contains("--insecure-listen"),
        "no warning for --insecure-listen:\n{}",
        server.diag()
    );
    let mut c = server.client("sd0");
    assert_eq!(c.write(0, &[0x5a; 4096]).expect("write"), Ok(()));
    assert_eq!(c.read(0, 4096).expect("read"), Ok(vec![0x5a; 4096]));
    drop(c);
    server.stop().assert_clean("SIGTERM");
}
