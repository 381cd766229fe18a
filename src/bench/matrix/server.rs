//! The servers under test: `dvma serve` and the peers (nbdkit's file
//! plugin, qemu-nbd), all serving the run's one fully allocated backing
//! file ([`backing_file`], read into the page cache before every session), sampled
//! (CPU time from `/proc/PID/stat`; `dvma serve`'s kernel counters through
//! SIGUSR1 and its `--stats-json` file), and stopped.
//!
//! Every started server is a [`Server`]; dropping one that is still running
//! kills it, so no error path leaves a server behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Size of every backing file: the size of `dvma serve`'s default `sd0`.
pub const DISK_BYTES: u64 = 256 << 20;
/// The export name every server serves.
pub const EXPORT: &str = "sd0";
/// Longest wait for a server to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a server to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for `dvma serve` to write its statistics after SIGUSR1.
const STATS_TIMEOUT: Duration = Duration::from_secs(3);

/// A `dvma serve` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DvmaConf {
    /// `--dvma`.
    pub mode: String,
    /// `--completion`.
    pub completion: String,
    /// `--spl`.
    pub spl: String,
    /// `--intr-stack`.
    pub intr_stack: bool,
    /// `--cpus`.
    pub cpus: u32,
    /// Start it with none of the flags above: `dvma serve`'s defaults (the
    /// fields then say what those are).
    pub defaults: bool,
}

/// `dvma serve --stats-json`: cumulative counters, written on SIGUSR1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DvmaStats {
    /// Incremented at every write of the file.
    pub seq: u64,
    /// CPUs of the kernel.
    pub cpus: u64,
    /// Device interrupts.
    pub interrupts: u64,
    /// Host signals taken (interrupt deliveries that needed one).
    pub signals: u64,
    /// Soft interrupts.
    pub softints: u64,
    /// Kernel thread context switches.
    pub ctx_switches: u64,
    /// ASTs delivered.
    pub asts: u64,
    /// IOMMU faults.
    pub iommu_faults: u64,
    /// DVMA pages mapped now.
    pub dvma_pages_held: u64,
    /// Most DVMA pages mapped at once.
    pub dvma_pages_peak: u64,
    /// NBD requests served.
    pub nbd_requests: u64,
    /// Bytes read through NBD.
    pub nbd_bytes_read: u64,
    /// Bytes written through NBD.
    pub nbd_bytes_written: u64,
}

impl DvmaStats {
    /// The counters the report divides by I/Os.
    pub fn counters(&self) -> report::Counters {
        report::Counters {
            interrupts: self.interrupts,
            signals: self.signals,
            softints: self.softints,
            ctx_switches: self.ctx_switches,
            asts: self.asts,
            iommu_faults: self.iommu_faults,
        }
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when it cannot be read,
/// the value on every Linux architecture this runs on).
pub fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// `(utime, stime)` from the text of `/proc/PID/stat` (fields 14 and 15,
/// counted after the parenthesized command name, which may hold spaces).
pub fn parse_proc_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// The process's user and system CPU time so far (every thread, live or
/// exited), clock ticks.
pub fn cpu_times(pid: u32) -> Option<(u64, u64)> {
    parse_proc_stat_times(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `voluntary_ctxt_switches + nonvoluntary_ctxt_switches` of a
/// `/proc/PID/task/TID/status` text.
pub fn parse_status_switches(status: &str) -> Option<u64> {
    let mut n = None;
    for l in status.lines() {
        if let Some(v) = l
            .strip_prefix("voluntary_ctxt_switches:")
            .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        {
            *n.get_or_insert(0) += v.trim().parse::<u64>().ok()?;
        }
    }
    n
}

/// Host context switches of every thread of `pid` seen so far: `seen`
/// keeps each thread's last count, so threads that exit keep counting.
pub fn host_switches(pid: u32, seen: &mut BTreeMap<u32, u64>) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(n) = std::fs::read_to_string(e.path().join("status"))
            .ok()
            .and_then(|s| parse_status_switches(&s))
        {
            seen.insert(tid, n);
        }
    }
    Some(seen.values().sum())
}

/// Sends a signal with `kill(1)` (this crate has no unsafe code, and std
/// only sends SIGKILL).
pub fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let st = Command::new("kill")
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

/// A program on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first line of `prog --version`.
pub fn version(prog: &str) -> Option<String> {
    let o = Command::new(prog)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// How to install a peer (Debian package names).
pub fn install_hint(peer: &str) -> &'static str {
    match peer {
        "nbdkit" => "apt-get install nbdkit",
        "qemu-nbd" => "apt-get install qemu-utils",
        "fio" => "apt-get install fio",
        _ => "see its documentation",
    }
}

/// A free TCP port on 127.0.0.1 (bound, read and released: the caller
/// retries if someone takes it in between).
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// The URI of a `serving nbd://...` line of `dvma serve`.
pub fn parse_serving(line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("serving ")?;
    let uri = rest.split_whitespace().next()?;
    uri.starts_with("nbd://").then(|| uri.to_string())
}

/// Of the exports a server announced, the one named [`EXPORT`] (else the
/// first).
pub fn pick_export(uris: &[String]) -> Option<String> {
    uris.iter()
        .find(|u| u.ends_with(&format!("/{EXPORT}")))
        .or(uris.first())
        .cloned()
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    all[from..].join("\n")
}

/// A running server.
pub struct Server {
    /// What it is, for messages (`dvma lazy/softint`, `nbdkit`).
    pub label: String,
    child: Child,
    /// Where fio connects.
    pub uri: String,
    stats_path: Option<PathBuf>,
    last_seq: Option<u64>,
    stderr_log: PathBuf,
    reader: Option<JoinHandle<()>>,
    /// The command line, for the report.
    pub command: String,
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn log_file(path: &Path) -> Result<File, String> {
    File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `exe serve` with `c` serving `image` (see [`backing_file`]),
    /// its configuration and statistics in `dir` (a fresh directory), logs
    /// in `logs/TAG.*`, and waits for its `dvma: ready` line.
    pub fn start_dvma(
        exe: &Path,
        c: &DvmaConf,
        image: &Path,
        dir: &Path,
        logs: &Path,
        tag: &str,
    ) -> Result<Server, String> {
        let config = dvma_config(dir, image)?;
        let stats_path = dir.join("stats.json");
        let stderr_log = logs.join(format!("{tag}.stderr"));
        let stdout_log = logs.join(format!("{tag}.stdout"));
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir);
        if !c.defaults {
            cmd.args(["--dvma", &c.mode, "--completion", &c.completion])
                .args(["--cpus", &c.cpus.to_string(), "--spl", &c.spl])
                .args(["--intr-stack", if c.intr_stack { "on" } else { "off" }]);
        }
        cmd.arg("--stats-json")
            .arg(&stats_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&stderr_log)?);
        let command = command_line(&cmd);
        let mut child = cmd.spawn().map_err(|e| format!("{command}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let mut out_log = log_file(&stdout_log)?;
        let reader = std::thread::spawn(move || {
            // Keeps draining stdout after the ready line (the server must
            // never block on a full pipe), into the log.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(out_log, "{line}");
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            label: if c.defaults {
                "dvma (defaults)".to_string()
            } else {
                format!("dvma {}/{}", c.mode, c.completion)
            },
            child,
            uri: String::new(),
            stats_path: Some(stats_path),
            last_seq: None,
            stderr_log,
            reader: Some(reader),
            command,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut uris = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(u) = parse_serving(&line) {
                        uris.push(u);
                    } else if line.trim_start().starts_with("dvma: ready") {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = server.child.wait().ok();
                    return Err(format!(
                        "`{}` exited before it was ready ({}); stderr:\n{}",
                        server.command,
                        status.map_or("?".to_string(), |s| s.to_string()),
                        tail(&server.stderr_log, 20)
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "`{}` printed no `dvma: ready` line within {} s; stderr:\n{}",
                        server.command,
                        READY_TIMEOUT.as_secs(),
                        tail(&server.stderr_log, 20)
                    ));
                }
            }
        }
        server.uri = pick_export(&uris).ok_or_else(|| {
            format!(
                "`{}` is ready but announced no `serving nbd://...` export",
                server.command
            )
        })?;
        Ok(server)
    }

    /// Starts a peer (`nbdkit` file plugin or `qemu-nbd`) with the extra
    /// arguments `args` (its setting), serving `file` as export [`EXPORT`]
    /// on a free loopback port, and waits until the port accepts
    /// connections.
    pub fn start_peer(
        peer: &str,
        args: &[&str],
        file: &Path,
        logs: &Path,
        tag: &str,
    ) -> Result<Server, String> {
        let log = logs.join(format!("{tag}.log"));
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let port = free_port()?;
            let mut cmd = match peer {
                "nbdkit" => {
                    let mut c = Command::new("nbdkit");
                    c.args(["-f", "--exit-with-parent", "-i", "127.0.0.1"])
                        .args(["-p", &port.to_string(), "-e", EXPORT])
                        .args(args)
                        .arg("file")
                        .arg(file);
                    c
                }
                "qemu-nbd" => {
                    let mut c = Command::new("qemu-nbd");
                    c.args(["-f", "raw", "-x", EXPORT, "-t", "-e", "4"])
                        .args(["-b", "127.0.0.1", "-p", &port.to_string()])
                        .args(args)
                        .arg(file);
                    c
                }
                other => return Err(format!("unknown peer {other}")),
            };
            let f = log_file(&log)?;
            let f2 = f
                .try_clone()
                .map_err(|e| format!("{}: {e}", log.display()))?;
            cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
            let command = command_line(&cmd);
            let child = cmd.spawn().map_err(|e| format!("{command}: {e}"))?;
            let mut server = Server {
                label: peer.to_string(),
                child,
                uri: format!("nbd://127.0.0.1:{port}/{EXPORT}"),
                stats_path: None,
                last_seq: None,
                stderr_log: log.clone(),
                reader: None,
                command,
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if let Ok(Some(st)) = server.child.try_wait() {
                    last_err = format!(
                        "`{}` exited at start ({st}):\n{}",
                        server.command,
                        tail(&log, 20)
                    );
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(server);
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "`{}` did not accept connections within {} s:\n{}",
                        server.command,
                        READY_TIMEOUT.as_secs(),
                        tail(&log, 20)
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(last_err)
    }

    /// Whether the server has `dvma serve`'s statistics.
    pub fn has_stats(&self) -> bool {
        self.stats_path.is_some()
    }

    /// `dvma serve`'s counters now: sends SIGUSR1 and waits until the
    /// statistics file's `seq` increases. `None` for peers, or when the
    /// server did not answer within 3 s.
    pub fn stats_now(&mut self) -> Option<DvmaStats> {
        let path = self.stats_path.clone()?;
        self.fresh_stats(&path)
    }

    fn fresh_stats(&mut self, path: &Path) -> Option<DvmaStats> {
        signal(self.pid(), "USR1").ok()?;
        let deadline = Instant::now() + STATS_TIMEOUT;
        loop {
            if let Some(s) = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<DvmaStats>(&t).ok())
                && self.last_seq.is_none_or(|last| s.seq > last)
            {
                self.last_seq = Some(s.seq);
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the server: SIGTERM, then SIGKILL if it has not exited within
    /// 5 s. An error says how it ended when that was not a clean exit 0.
    pub fn stop(mut self) -> Result<(), String> {
        let r = self.stop_inner();
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        r
    }

    fn stop_inner(&mut self) -> Result<(), String> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Err(format!(
                "{} had already exited ({st}):\n{}",
                self.label,
                tail(&self.stderr_log, 20)
            ));
        }
        signal(self.pid(), "TERM")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status: ExitStatus = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "{} did not exit within {} s of SIGTERM: killed",
                        self.label,
                        STOP_TIMEOUT.as_secs()
                    ));
                }
            }
        };
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} exited with {status} after SIGTERM:\n{}",
                self.label,
                tail(&self.stderr_log, 20)
            ))
        }
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

/// Creates the run's backing file: [`DISK_BYTES`] of pseudo-random bytes,
/// written and synced, so that every block is allocated on the host's file
/// system before any server reads it (a sparse file reads holes as zeroes
/// without touching the disk or the page cache's data, which flatters
/// whoever reads most; compressible or zero data would flatter a peer that
/// detects zeroes). Every server of the run serves this one file.
pub fn backing_file(path: &Path) -> Result<(), String> {
    use std::io::Write as _;
    let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", path.display());
    let mut f = File::create(path).map_err(|e| err("creating", e))?;
    let mut buf = vec![0u8; 1 << 20];
    // xorshift64*: fast, and incompressible enough for a block device.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..DISK_BYTES / buf.len() as u64 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            w.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        f.write_all(&buf).map_err(|e| err("writing", e))?;
    }
    f.sync_all().map_err(|e| err("syncing", e))
}

/// Reads the whole backing file, so every session starts with it in the
/// host's page cache. A server that bypasses the cache (qemu-nbd
/// `--cache=none` writes with `O_DIRECT`) drops the pages it writes; without
/// this, whichever server runs next would read them back from the disk.
pub fn warm(path: &Path) -> Result<(), String> {
    use std::io::Read as _;
    let mut f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
    }
}

/// The `dvma serve --config` file that serves `image` as [`EXPORT`].
pub fn dvma_config(dir: &Path, image: &Path) -> Result<PathBuf, String> {
    let p = dir.join("disk.toml");
    let file = image
        .to_str()
        .ok_or_else(|| format!("{}: the backing file's path is not UTF-8", image.display()))?;
    let text = format!(
        "[[disk]]\nname = \"{EXPORT}\"\nfile = {}\n",
        toml_string(file)
    );
    std::fs::write(&p, text).map_err(|e| format!("writing {}: {e}", p.display()))?;
    Ok(p)
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => o.push_str(&format!("\\u{:04X}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!("dvma-bench-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("scratch dir");
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn backing_file_is_allocated_random_and_full_size() {
        use std::os::unix::fs::MetadataExt as _;
        let d = Scratch::new("backing");
        let img = d.0.join("disk.img");
        backing_file(&img).expect("backing file");
        let m = std::fs::metadata(&img).expect("stat");
        assert_eq!(m.len(), DISK_BYTES);
        // Every block allocated: a sparse file has fewer.
        assert!(m.blocks() * 512 >= DISK_BYTES, "{} blocks", m.blocks());
        // Not zeroes, nor a repeating 1 MiB pattern.
        let data = std::fs::read(&img).expect("read");
        let mib = 1 << 20;
        assert!(data[..mib].iter().filter(|&&b| b == 0).count() < mib / 64);
        assert_ne!(data[..mib], data[mib..2 * mib]);
        warm(&img).expect("warm");
    }

    #[test]
    fn dvma_config_serves_the_image_even_with_odd_paths() {
        let d = Scratch::new("conf");
        for name in ["disk.img", "a \"quoted\" \\ name.img"] {
            let img = d.0.join(name);
            std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
            let conf = dvma_config(&d.0, &img).expect("config");
            let spec = crate::config::MachineSpec::load(Some(&conf), &Default::default())
                .expect("dvma reads the config it is given");
            assert_eq!(spec.disks.len(), 1);
            assert_eq!(spec.disks[0].name, EXPORT);
            assert_eq!(spec.disks[0].file, img);
        }
    }

    #[test]
    fn proc_stat_ticks() {
        // A command name with spaces and parentheses.
        let stat = "4242 (dvma (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 1000000 300 18446744073709551615";
        assert_eq!(parse_proc_stat_times(stat), Some((250, 75)));
        assert_eq!(parse_proc_stat_times("1 (x) S 1"), None);
        assert!(cpu_times(std::process::id()).is_some());
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(parse_status_switches(status), Some(15));
        assert_eq!(parse_status_switches("Name:\tx\n"), None);
        let mut seen = BTreeMap::new();
        assert!(host_switches(std::process::id(), &mut seen).is_some());
        assert!(!seen.is_empty());
    }

    #[test]
    fn serving_lines() {
        assert_eq!(
            parse_serving("serving nbd://127.0.0.1:40123/sd0").as_deref(),
            Some("nbd://127.0.0.1:40123/sd0")
        );
        assert_eq!(
            parse_serving("serving nbd://127.0.0.1:1/sd1 (256 MiB, rw)").as_deref(),
            Some("nbd://127.0.0.1:1/sd1")
        );
        assert_eq!(parse_serving("sd0 at dma0: 256 MiB"), None);
        let uris = vec![
            "nbd://127.0.0.1:1/ccd0".to_string(),
            "nbd://127.0.0.1:1/sd0".to_string(),
        ];
        assert_eq!(pick_export(&uris).unwrap(), "nbd://127.0.0.1:1/sd0");
        assert_eq!(pick_export(&uris[..1]).unwrap(), "nbd://127.0.0.1:1/ccd0");
    }

    #[test]
    fn stats_json_with_missing_and_extra_keys() {
        let s: DvmaStats = serde_json::from_str(
            r#"{"seq": 3, "interrupts": 10, "asts": 2, "dvma_pages_held": 16, "future": [1]}"#,
        )
        .unwrap();
        assert_eq!((s.seq, s.interrupts, s.asts, s.softints), (3, 10, 2, 0));
        assert_eq!(s.counters().interrupts, 10);
    }
}
