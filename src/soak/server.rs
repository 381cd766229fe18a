//! A `dvma serve` child process for one pair: started with a fresh
//! temporary data directory ([`TempDir`]), its output pumped into a
//! [`Tail`] while the soak waits for `dvma: ready`, and stopped with SIGINT
//! (exit 0 required within [`EXIT_TIMEOUT`], else SIGKILL). Dropping a
//! [`Server`] kills it.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the server has to exit after SIGINT.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to print `dvma: ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory under the temporary directory, removed on drop.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(tag: &str) -> io::Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "dvma-soak-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The last lines a server printed (stdout and stderr, interleaved).
#[derive(Default)]
pub(super) struct Tail(Mutex<VecDeque<String>>);

impl Tail {
    fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= 80 {
            q.pop_front();
        }
        q.push_back(line);
    }

    pub(super) fn lines(&self) -> Vec<String> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }
}

/// A running `dvma serve`; dropping it kills it.
pub(super) struct Server {
    pub(super) child: Child,
    pub(super) addr: SocketAddr,
    pub(super) export: String,
    pub(super) tail: Arc<Tail>,
    pub(super) pumps: Vec<JoinHandle<()>>,
}

/// Sends a signal with `kill(1)` (this crate has no unsafe code, and std
/// only sends SIGKILL).
fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let st = Proc::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("kill -s {sig} {pid}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("kill -s {sig} {pid}: {st}"))
    }
}

impl Server {
    pub(super) fn start(
        exe: &Path,
        dir: &Path,
        dvma: &str,
        completion: &str,
        extra: &[String],
    ) -> Result<Server, String> {
        let mut cmd = Proc::new(exe);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(["--dvma", dvma, "--completion", completion])
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawning {} serve: {e}", exe.display()))?;
        let tail = Arc::new(Tail::default());
        let (tx, rx) = mpsc::channel::<String>();
        let mut pumps = Vec::new();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        for (r, tx) in [
            (Box::new(out) as Box<dyn Read + Send>, Some(tx)),
            (Box::new(err), None),
        ] {
            let tail = tail.clone();
            pumps.push(std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    if let Some(tx) = &tx {
                        let _ = tx.send(line.clone());
                    }
                    tail.push(line);
                }
            }));
        }
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            export: String::new(),
            tail,
            pumps,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let l = line.trim();
                    if let Some(rest) = l.strip_prefix("serving nbd://") {
                        if server.export.is_empty() {
                            let (hp, name) = rest.split_once('/').unwrap_or((rest, ""));
                            server.addr = hp.parse().map_err(|e| format!("{l:?}: {e}"))?;
                            server.export =
                                name.split_whitespace().next().unwrap_or("").to_string();
                        }
                    } else if l.starts_with("dvma: ready") {
                        break;
                    }
                }
                Err(_) => {
                    let st = server.child.try_wait().ok().flatten();
                    return Err(format!(
                        "dvma serve not ready ({}):\n  {}",
                        st.map_or("no `dvma: ready` in 30 s".to_string(), |s| format!(
                            "exited: {s}"
                        )),
                        server.tail.lines().join("\n  ")
                    ));
                }
            }
        }
        if server.export.is_empty() {
            return Err("dvma serve announced no `serving nbd://` export".into());
        }
        Ok(server)
    }

    /// SIGINT, then up to [`EXIT_TIMEOUT`] for exit 0; `(clean, how)`.
    pub(super) fn stop(mut self) -> (bool, String) {
        let r = match self.child.try_wait() {
            Ok(Some(st)) => (false, format!("had already exited: {st}")),
            _ => match signal(self.child.id(), "INT") {
                Err(e) => (false, e),
                Ok(()) => {
                    let deadline = Instant::now() + EXIT_TIMEOUT;
                    loop {
                        match self.child.try_wait() {
                            Ok(Some(st)) => break (st.success(), format!("after SIGINT: {st}")),
                            Ok(None) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            _ => {
                                let _ = self.child.kill();
                                let _ = self.child.wait();
                                break (
                                    false,
                                    format!(
                                        "no exit within {} s of SIGINT: killed (SIGKILL)",
                                        EXIT_TIMEOUT.as_secs()
                                    ),
                                );
                            }
                        }
                    }
                }
            },
        };
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
        r
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
