//! A disk with 4096-byte sectors is refused at boot, with a message that
//! says why (only 512-byte sectors are implemented) and what to do.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{disk_toml, machine_toml};

/// The server process, killed if the test ends (or panics) while it runs.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn sector_size_4096_is_refused_with_a_reason() {
    let dir = common::TempDir::new("sector4096");
    let mut text = machine_toml(1, "64M");
    text += &disk_toml("sd0", "16M", "sector_size = 4096");
    std::fs::write(dir.path().join("c.toml"), text).expect("config");
    let mut child = Reaped(
        std::process::Command::new(common::dvma_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(dir.path().join("c.toml"))
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.0.kill();
            let _ = child.0.wait();
            let mut out = String::new();
            if let Some(mut o) = child.0.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            panic!("sector_size = 4096 was accepted: the server runs\n{out}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(!status.success(), "sector_size = 4096: exit {status}");
    assert!(
        err.contains("sector_size") && err.contains("4096") && err.contains("512"),
        "sector_size = 4096 refused without saying why: {err}"
    );
}
