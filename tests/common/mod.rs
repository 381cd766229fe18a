//! The harness of the `dvma serve` integration tests.
//!
//! * [`Server`]: starts the `dvma` binary (`serve`) in a fresh temporary
//!   directory (or a caller's persistent one) with a TOML configuration, on
//!   `127.0.0.1:0`, waits for its `dvma: ready` line and parses the
//!   `serving nbd://…` lines for the real port and the exports. Dropping it
//!   SIGKILLs the server and removes the temporary directory, so a failing
//!   test never leaves a server behind; when the test is panicking, the
//!   server's output is printed.
//! * [`Client`]: a raw NBD client built on the `nbd` crate's encoders and
//!   constants: fixed newstyle with `NBD_OPT_GO` (optionally after
//!   `NBD_OPT_STRUCTURED_REPLY`), requests with any bytes, simple and
//!   structured replies parsed strictly (a protocol violation is an error).
//! * [`Witness`]: a healthy connection that writes and reads back after every
//!   hostile case: a bad connection never disturbs another one.
//! * [`Rng`]: a small seeded generator (seeds are printed, and
//!   `DVMA_TEST_SEED` replays one).
//! * [`fixture`]: the two-export server of the hostile-client tests;
//!   [`raw`]: raw request and option bytes; [`table`]: the runner of a
//!   table of hostile-client cases (`serve_bad_input.rs`).
//!
//! `DVMA_SERVE_BIN`, when set, names the binary to test instead of the one
//! Cargo built.
#![allow(dead_code)]

pub mod client;
pub mod fixture;
pub mod race;
pub mod raw;
pub mod skip;
pub mod table;
mod tempdir;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[allow(unused_imports)]
pub use client::{Client, read_greeting, tcp};
pub use tempdir::TempDir;

/// How long a server may take to print `dvma: ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A small, fast, reproducible generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

/// The seed for a randomized test: `DVMA_TEST_SEED` if set (decimal or
/// `0x` hex), else from the clock. Printed, so a failure can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("DVMA_TEST_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("DVMA_TEST_SEED={s:?} is not a number"))
        }
        Err(_) => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        }
    };
    eprintln!("{test}: seed {seed:#x} (replay with DVMA_TEST_SEED={seed:#x})");
    seed
}

/// `[machine]` for the tests: small and fast.
pub fn machine_toml(cpus: usize, memory: &str) -> String {
    format!("[machine]\ncpus = {cpus}\nmemory = \"{memory}\"\n\n")
}

/// One small `[[disk]]` (a 16M DVMA pool, 64-deep queue); `extra` is added
/// verbatim (more keys, one per line).
pub fn disk_toml(name: &str, size: &str, extra: &str) -> String {
    format!(
        "[[disk]]\nname = \"{name}\"\nfile = \"{name}.img\"\nsize = \"{size}\"\npool = \"16M\"\n{extra}\n"
    )
}

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOpts {
    /// The configuration file's text; `None` starts without `--config`.
    pub config: Option<String>,
    /// More command-line arguments after `serve` (e.g. `--stats-json F`).
    pub args: Vec<String>,
    /// Files created in the data directory before the start (name, contents):
    /// the backing files of read-only devices, which must exist.
    pub files: Vec<(String, Vec<u8>)>,
    /// Sparse files of the given sizes created in the data directory before
    /// the start (if missing).
    pub sparse: Vec<(String, u64)>,
    /// Run the server with `RLIMIT_FSIZE` at this many bytes and `SIGXFSZ`
    /// ignored (through `sh` and `prlimit`): writes at or beyond that offset
    /// of any file fail with `EFBIG`, a real device I/O error.
    pub fsize_limit: Option<u64>,
    /// `--listen` (default `127.0.0.1:0`).
    pub listen: Option<String>,
}

impl ServerOpts {
    /// Options with this configuration text.
    pub fn config(text: &str) -> ServerOpts {
        ServerOpts {
            config: Some(text.to_string()),
            ..ServerOpts::default()
        }
    }
}

/// What an exited server left behind.
#[derive(Debug)]
pub struct Exit {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl Exit {
    /// Assert the server exited 0 (a clean shutdown); `what` names the stop
    /// in the message, which carries everything it printed. Returns `self`
    /// for further checks.
    #[track_caller]
    pub fn assert_clean(self, what: &str) -> Exit {
        assert!(
            self.status.success(),
            "{what}: exit {} (want 0)\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

#[derive(Default)]
struct Captured {
    stdout: Vec<String>,
    stderr: Vec<String>,
    closed: u32,
}

#[derive(Default)]
struct Output {
    state: Mutex<Captured>,
    cv: Condvar,
}

impl Output {
    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn pump(reader: impl Read + Send + 'static, out: Arc<Output>, stderr: bool) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    let mut st = out.lock();
                    if stderr {
                        st.stderr.push(text);
                    } else {
                        st.stdout.push(text);
                    }
                    out.cv.notify_all();
                }
            }
        }
        out.lock().closed += 1;
        out.cv.notify_all();
    });
}

/// A running `dvma serve`. Dropping it kills it (SIGKILL).
pub struct Server {
    child: Mutex<Child>,
    exited: Mutex<Option<ExitStatus>>,
    /// The server's process id.
    pub pid: u32,
    /// Where it listens (the real port).
    pub addr: SocketAddr,
    /// The export names, in the order of the `serving` lines.
    pub exports: Vec<String>,
    /// Holds `config.toml` and `data/`; the server's working directory.
    pub root: PathBuf,
    /// The data directory (`--data-dir`).
    pub data_dir: PathBuf,
    out: Arc<Output>,
    tmp: Option<TempDir>,
}

/// The binary under test.
pub fn dvma_bin() -> PathBuf {
    std::env::var_os("DVMA_SERVE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_dvma")))
}

impl Server {
    /// A server with configuration `config` in a fresh temporary directory.
    pub fn start(config: &str) -> Server {
        Server::start_opts(ServerOpts::config(config))
    }

    /// A server in a fresh temporary directory, removed when it is dropped.
    pub fn start_opts(opts: ServerOpts) -> Server {
        let tmp = TempDir::new("serve");
        let mut s = Server::launch(tmp.path(), &opts);
        s.tmp = Some(tmp);
        s.wait_ready();
        s
    }

    /// A server in `root` (kept: for restarts on the same data).
    pub fn start_in(root: &Path, opts: &ServerOpts) -> Server {
        let mut s = Server::launch(root, opts);
        s.wait_ready();
        s
    }

    fn launch(root: &Path, opts: &ServerOpts) -> Server {
        let data_dir = root.join("data");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        for (name, contents) in &opts.files {
            let p = data_dir.join(name);
            if !p.exists() {
                std::fs::write(&p, contents).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
        for (name, size) in &opts.sparse {
            let p = data_dir.join(name);
            if !p.exists() {
                std::fs::File::create(&p)
                    .and_then(|f| f.set_len(*size))
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
        let mut cmd = match opts.fsize_limit {
            None => Command::new(dvma_bin()),
            Some(limit) => {
                // An ignored signal stays ignored across exec.
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("trap '' XFSZ; exec prlimit --fsize=\"$0\" -- \"$@\"")
                    .arg(limit.to_string())
                    .arg(dvma_bin());
                c
            }
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(opts.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(&data_dir);
        if let Some(text) = &opts.config {
            let cfg = root.join("config.toml");
            std::fs::write(&cfg, text).expect("config.toml");
            cmd.arg("--config").arg(&cfg);
        }
        cmd.args(&opts.args)
            .current_dir(root)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", dvma_bin().display()));
        let out = Arc::new(Output::default());
        pump(child.stdout.take().expect("stdout"), out.clone(), false);
        pump(child.stderr.take().expect("stderr"), out.clone(), true);
        Server {
            pid: child.id(),
            child: Mutex::new(child),
            exited: Mutex::new(None),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            exports: Vec::new(),
            root: root.to_path_buf(),
            data_dir,
            out,
            tmp: None,
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            {
                let st = self.out.lock();
                if st.stdout.iter().any(|l| l.starts_with("dvma: ready")) {
                    let lines = st.stdout.clone();
                    drop(st);
                    self.parse_serving(&lines);
                    return;
                }
                let waited = self
                    .out
                    .cv
                    .wait_timeout(st, Duration::from_millis(50))
                    .map_or_else(|p| p.into_inner().0, |r| r.0);
                drop(waited);
            }
            if let Some(status) = self.try_wait() {
                // Give the pumps a moment to collect the last words.
                self.wait_pumps(Duration::from_secs(2));
                panic!(
                    "dvma serve exited ({status}) before `dvma: ready`\n{}",
                    self.diag()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "dvma serve not ready after {READY_TIMEOUT:?}\n{}",
                    self.diag()
                );
            }
        }
    }

    fn parse_serving(&mut self, lines: &[String]) {
        for l in lines {
            let Some(rest) = l.trim().strip_prefix("serving nbd://") else {
                continue;
            };
            let (hostport, name) = rest
                .split_once('/')
                .unwrap_or_else(|| panic!("bad serving line {l:?}"));
            let mut addr: SocketAddr = hostport
                .parse()
                .unwrap_or_else(|e| panic!("bad address in {l:?}: {e}"));
            if addr.ip().is_unspecified() {
                // Listening on every address: connect through loopback.
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            assert_ne!(addr.port(), 0, "serving line with port 0: {l:?}");
            if self.exports.is_empty() {
                self.addr = addr;
            } else {
                assert_eq!(addr, self.addr, "exports on different addresses: {l:?}");
            }
            // The name may be followed by a note, e.g. `(read-only)`.
            let name = name.split_whitespace().next().unwrap_or_default();
            self.exports.push(name.to_string());
        }
        assert!(
            !self.exports.is_empty(),
            "no `serving nbd://` line before `dvma: ready`\n{}",
            self.diag()
        );
    }

    /// `nbd://127.0.0.1:PORT/export`.
    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// Whether the export is served.
    pub fn has_export(&self, export: &str) -> bool {
        self.exports.iter().any(|e| e == export)
    }

    /// A client on `export` (simple replies), or a panic with the
    /// server's output.
    pub fn client(&self, export: &str) -> Client {
        Client::connect(self.addr, export)
            .unwrap_or_else(|e| panic!("connecting to {export}: {e}\n{}", self.diag()))
    }

    /// A client on `export` with structured replies.
    pub fn client_structured(&self, export: &str) -> Client {
        Client::connect_structured(self.addr, export)
            .unwrap_or_else(|e| panic!("connecting to {export}: {e}\n{}", self.diag()))
    }

    /// The exit status, if the server has exited.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        let mut ex = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        if ex.is_none() {
            let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(Some(s)) = c.try_wait() {
                *ex = Some(s);
            }
        }
        *ex
    }

    /// Waits up to `timeout` for the server to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_pumps(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.out.lock();
        while st.closed < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = self
                .out
                .cv
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.out.lock().stdout.join("\n")
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.out.lock().stderr.join("\n")
    }

    /// Waits up to `timeout` for a line containing `needle` on stdout or
    /// stderr.
    pub fn wait_output(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.out.lock();
        loop {
            if st
                .stdout
                .iter()
                .chain(st.stderr.iter())
                .any(|l| l.contains(needle))
            {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .out
                .cv
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// The server's output, for failure messages (the last 60 lines of each
    /// stream).
    pub fn diag(&self) -> String {
        let st = self.out.lock();
        let tail = |v: &[String]| {
            let from = v.len().saturating_sub(60);
            v[from..].join("\n")
        };
        format!(
            "---- server stdout ----\n{}\n---- server stderr ----\n{}\n----",
            tail(&st.stdout),
            tail(&st.stderr)
        )
    }

    /// Panics unless the server is running and has not panicked.
    pub fn assert_healthy(&self, context: &str) {
        if let Some(s) = self.try_wait() {
            self.wait_pumps(Duration::from_secs(2));
            panic!("{context}: the server died ({s})\n{}", self.diag());
        }
        let st = self.out.lock();
        if st.stderr.iter().chain(st.stdout.iter()).any(|l| {
            l.contains("panicked") || l.contains("RUST_BACKTRACE") || l.contains("stack backtrace")
        }) {
            drop(st);
            panic!("{context}: the server panicked\n{}", self.diag());
        }
    }

    /// Sends signal `name` (`TERM`, `INT`, `USR1`, ...) to the server.
    pub fn signal(&self, name: &str) {
        let st = Command::new("kill")
            .arg("-s")
            .arg(name)
            .arg(self.pid.to_string())
            .status()
            .expect("running kill");
        assert!(st.success(), "kill -s {name} {} failed", self.pid);
    }

    /// Number of open file descriptors of the server (from `/proc`).
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map_or(0, |d| d.count())
    }

    /// Number of threads of the server (from `/proc`).
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid)).map_or(0, |d| d.count())
    }

    /// SIGTERM, then wait (at most [`STOP_TIMEOUT`]) for the exit; panics
    /// (after a SIGKILL) if it does not come.
    pub fn stop(self) -> Exit {
        self.stop_with("TERM")
    }

    /// Like [`Server::stop`] with another signal (`INT`).
    pub fn stop_with(self, signal: &str) -> Exit {
        self.signal(signal);
        let Some(status) = self.wait_exit(STOP_TIMEOUT) else {
            let d = self.diag();
            drop(self);
            panic!("the server did not exit within {STOP_TIMEOUT:?} of SIG{signal}\n{d}");
        };
        self.finish(status)
    }

    /// SIGKILL: a crash. Returns what the server printed.
    pub fn kill9(self) -> Exit {
        {
            let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
            let _ = c.kill();
        }
        let status = self
            .wait_exit(Duration::from_secs(30))
            .expect("a SIGKILLed server exits");
        self.finish(status)
    }

    fn finish(self, status: ExitStatus) -> Exit {
        self.wait_pumps(Duration::from_secs(5));
        Exit {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            self.wait_pumps(Duration::from_secs(1));
            eprintln!(
                "server pid {} at {} (root {})\n{}",
                self.pid,
                self.addr,
                self.root.display(),
                self.diag()
            );
        }
    }
}

/// Raises this process's soft limit of open files to at least `want` (up to
/// the hard limit, with `prlimit`); returns the soft limit now in force.
/// Servers started afterwards inherit it.
pub fn raise_nofile(want: u64) -> u64 {
    let read = || -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        for l in limits.lines() {
            if let Some(rest) = l.strip_prefix("Max open files") {
                let mut it = rest.split_whitespace();
                let p = |s: Option<&str>| match s {
                    Some("unlimited") => u64::MAX,
                    Some(v) => v.parse().unwrap_or(1024),
                    None => 1024,
                };
                let soft = p(it.next());
                let hard = p(it.next());
                return (soft, hard);
            }
        }
        (1024, 1024)
    };
    let (soft, hard) = read();
    if soft >= want {
        return soft;
    }
    let target = want.min(hard);
    let _ = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={target}:{hard}"))
        .status();
    read().0
}

/// A healthy connection that must keep working whatever other connections
/// do: after every hostile case it writes random data in its own region of
/// its export and reads it back, and a fresh connection reads it too.
pub struct Witness {
    client: Client,
    export: String,
    rng: Rng,
    start: u64,
    len: u64,
    checks: u64,
}

impl Witness {
    /// A witness on `export` that owns the bytes `start..start+len` (4K
    /// aligned).
    pub fn new(server: &Server, export: &str, start: u64, len: u64, seed: u64) -> Witness {
        Witness {
            client: server.client(export),
            export: export.to_string(),
            rng: Rng::new(seed),
            start,
            len,
            checks: 0,
        }
    }

    /// Checks that the server is alive and has not panicked, that the
    /// witness connection still writes and reads back, and that a new
    /// connection sees the same bytes. Panics with `context`.
    pub fn check(&mut self, server: &Server, context: &str) {
        server.assert_healthy(context);
        let blocks = self.len / 4096;
        let n = self.rng.range(1, 16.min(blocks));
        let off = self.start + self.rng.below(blocks - n + 1) * 4096;
        let data = self.rng.bytes((n * 4096) as usize);
        let fail = |what: String| -> ! {
            panic!(
                "{context}: the witness connection failed: {what}\n{}",
                server.diag()
            )
        };
        match self.client.write(off, &data) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fail(format!("write at {off} got error {e}")),
            Err(e) => fail(format!("write at {off}: {e}")),
        }
        match self.client.read(off, data.len() as u32) {
            Ok(Ok(back)) if back == data => {}
            Ok(Ok(_)) => fail(format!("read at {off} returned other bytes")),
            Ok(Err(e)) => fail(format!("read at {off} got error {e}")),
            Err(e) => fail(format!("read at {off}: {e}")),
        }
        let mut fresh = Client::connect(server.addr, &self.export)
            .unwrap_or_else(|e| fail(format!("a new connection failed: {e}")));
        match fresh.read(off, data.len() as u32) {
            Ok(Ok(back)) if back == data => {}
            Ok(Ok(_)) => fail(format!("a new connection read other bytes at {off}")),
            Ok(Err(e)) => fail(format!("a new connection's read got error {e}")),
            Err(e) => fail(format!("a new connection's read: {e}")),
        }
        let _ = fresh.disconnect();
        server.assert_healthy(context);
        self.checks += 1;
    }

    /// How many checks passed.
    pub fn checks(&self) -> u64 {
        self.checks
    }
}

/// A required external tool: `Some(path)` if installed. If not, the test
/// fails, unless `DVMA_ALLOW_SKIP=1` (and not `CI=true`): then the skip is
/// reported (see [`skip`]) and this returns `None`.
pub fn require_tool(tool: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if p.is_file() {
            return Some(p);
        }
    }
    skip::skip(&format!(
        "{tool} is not installed (apt-get install {package})"
    ));
    None
}

/// Runs `cmd` with a time limit; returns (status, stdout, stderr) or panics
/// with what it printed if it runs too long.
pub fn run_tool(cmd: &mut Command, timeout: Duration) -> (ExitStatus, String, String) {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
    let read_all = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = read_all(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = read_all(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let o = out.join().unwrap_or_default();
            let e = err.join().unwrap_or_default();
            panic!("{desc} ran longer than {timeout:?}\nstdout:\n{o}\nstderr:\n{e}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}
