//! `dvma bench` end to end on a tiny matrix: one (DVMA mode, completion)
//! pair, one short workload, and the peers that are installed, into a
//! temporary directory; then `results.json`, `report.md` and the plots are
//! checked.
//!
//! The bench runs in a process group of its own, so everything it starts
//! (servers, fio) is in that group: after it exits the test checks that
//! nothing of the group is left running, and kills the whole group in any
//! case, pass or fail.
//!
//! Needs fio with its nbd engine; the peers (nbdkit, qemu-nbd) are
//! optional to the bench, which reports a missing one. Without fio the
//! test fails, and under `CI=true` (which installs the peers) so does a
//! missing peer, unless `DVMA_ALLOW_SKIP=1` outside CI: then fio's absence
//! skips the test and a peer's absence skips the check of its run, each
//! with a `SKIPPED` line (`tests/common/skip.rs`).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/skip.rs"]
mod skip;
#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::TempDir;

/// Longest the bench may take (it needs about 5 s).
const TIMEOUT: Duration = Duration::from_secs(45);

/// Kills a process group when dropped.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

/// Live (not zombie) processes of a process group: `(pid, command)`.
fn group_members(pgid: u32) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // f[0]: state, f[1]: ppid, f[2]: pgrp.
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string() {
            let comm = stat[stat.find('(').map_or(0, |i| i + 1)..close].to_string();
            v.push((pid, comm));
        }
    }
    v
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

fn fio_with_nbd() -> bool {
    Command::new("fio")
        .arg("--enghelp=nbd")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

#[track_caller]
fn file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn tiny_matrix_end_to_end() {
    if !fio_with_nbd() {
        skip::skip("fio with its nbd engine is not installed (apt-get install fio)");
        return;
    }
    // A missing peer is reported by the bench (and checked below); it may
    // only be skipped where skipping is allowed.
    for peer in report::PEERS {
        if !on_path(peer) {
            let package = if peer == "qemu-nbd" {
                "qemu-utils"
            } else {
                peer
            };
            skip::skip(&format!(
                "peer {peer} is not installed (apt-get install {package}): its run is not checked"
            ));
        }
    }
    let out = TempDir::new("bench-smoke");
    // The kernel bench's answer, from a tiny earlier run (the matrix's own
    // run of it takes a minute even quick): `--kernel-from`.
    let kdir = TempDir::new("bench-smoke-kernel");
    let k = Command::new(env!("CARGO_BIN_EXE_dvma"))
        .args(["bench", "kernel", "--reps", "2", "--ms", "10"])
        .args([
            "--modes",
            "permanent,strict",
            "--completions",
            "intr,thread",
        ])
        .args(["--depths", "1", "--workloads", "randread"])
        .args(["--curve-pairs", "1", "--curve-depths", "1,4", "--out"])
        .arg(kdir.path())
        .stdin(Stdio::null())
        .output()
        .expect("dvma bench kernel");
    assert!(
        k.status.success(),
        "dvma bench kernel: {}",
        String::from_utf8_lossy(&k.stderr)
    );

    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dvma"))
        .arg("bench")
        .arg("--out")
        .arg(out.path())
        // Not the defaults (permanent/softint), so that phase 2 also runs
        // `dvma serve` with no flags.
        .args(["--modes", "permanent", "--completions", "intr"])
        .args(["--workloads", "randread-4k-qd1"])
        .args([
            "--runtime",
            "0.5",
            "--ramp",
            "0.2",
            "--reps",
            "1",
            "--best-reps",
            "1",
        ])
        .args(["--peers", "nbdkit,qemu-nbd", "--no-secondary", "--no-micro"])
        .arg("--kernel-from")
        .arg(kdir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start dvma bench");
    let pgid = child.id();
    let group = Group(pgid);
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if start.elapsed() > TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // What the bench left behind, before the group is killed.
    let left = group_members(pgid);
    drop(group);
    let _ = child.kill();
    let _ = child.wait();
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let Some(status) = status else {
        panic!(
            "dvma bench did not finish within {} s\nstdout:\n{stdout}\nstderr:\n{stderr}",
            TIMEOUT.as_secs()
        );
    };
    assert!(
        left.is_empty(),
        "dvma bench left processes running: {left:?}\nstderr:\n{stderr}"
    );
    assert!(
        status.success(),
        "dvma bench failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // results.json: the pair's runs (matrix, then phase 2) and the
    // defaults' (phase 2) with every figure, two runs per installed peer.
    let results = report::Results::load(out.path().join("results.json")).expect("results.json");
    let dvma: Vec<&report::Run> = results.runs.iter().filter(|r| r.is_dvma()).collect();
    assert_eq!(dvma.len(), 3, "{:?}", results.runs);
    let pair = |c: &str| {
        dvma.iter()
            .filter(|r| r.completion.as_deref() == Some(c))
            .count()
    };
    assert_eq!((pair("intr"), pair("softint")), (2, 1), "{dvma:?}");
    for d in &dvma {
        assert_eq!(d.dvma_mode.as_deref(), Some("permanent"));
        assert_eq!(d.workload, "randread-4k-qd1");
        assert_eq!(d.spl.as_deref(), Some("lazy"));
        assert_eq!(d.intr_stack, Some(true));
        for (what, v) in [
            ("iops", d.iops),
            ("mib_s", d.mib_s),
            ("p50_us", d.p50_us),
            ("p99_us", d.p99_us),
            ("cpu_us_per_io", d.cpu_us_per_io),
        ] {
            assert!(v.is_finite() && v > 0.0, "{what} = {v}");
        }
        assert!(d.p99_us >= d.p50_us);
        assert!(!d.latency_cdf.is_empty());
        let per_io = d
            .per_io
            .expect("per-I/O counters from dvma serve's statistics");
        assert!(
            per_io.interrupts > 0.0,
            "a disk I/O without an interrupt: {per_io:?}"
        );
        assert!(d.dvma_pages_held.is_some());
        assert!(d.protection.as_deref().is_some_and(|p| p.contains("pool")));
    }
    assert_eq!(results.protections.len(), 1);
    // The kernel bench's answer under `kernel`, as its kernel.json.
    let kernel = results.kernel.as_ref().expect("results.json: kernel");
    assert_eq!(kernel["schema"], "dvma-bench-kernel/3");
    assert_eq!(kernel["config"]["pairs"], 4);
    let verdicts = kernel["verdicts"].as_array().expect("kernel verdicts");
    assert_eq!(verdicts.len(), 6);
    let mut missing = Vec::new();
    for peer in report::PEERS {
        let n = results.runs.iter().filter(|r| r.server == peer).count();
        if on_path(peer) {
            assert_eq!(n, 2, "{peer} runs");
            let p = results.runs.iter().find(|r| r.server == peer).unwrap();
            assert!(p.iops > 0.0 && p.cpu_us_per_io > 0.0, "{p:?}");
            assert!(p.per_io.is_none());
        } else {
            assert_eq!(n, 0);
            missing.push(peer);
        }
    }

    // report.md, plots, raw data.
    let md = file(&out.path().join("report.md"));
    for s in [
        "# dvma bench report",
        "## Headline",
        "## Against the peers, interleaved",
        "## Workload randread-4k-qd1",
        "`permanent/intr`",
        "## Protection by DVMA mode",
        "## Where the time goes",
        "## Next steps",
        "## How this run was made",
        "## The answer: the mail's options measured inside the kernel",
        "`--kernel-from ",
        "- the kernel bench, e.g.: `an earlier run's files, copied from ",
        "### The answer: the mail's questions, from this run's numbers",
        "**What does a separate interrupt stack cost?** ",
        "**Does this machine reproduce the published shape?** ",
        "### randread qd1\n\n| rank | dvma/completion | CPU ns/IO |",
        "](kernel/kernel-split-randread-qd1.svg)",
        "](kernel/kernel-iops-depth.svg)",
    ] {
        assert!(md.contains(s), "report.md lacks {s:?}:\n{md}");
    }
    // The kernel section is one section: it ends where the next `## `
    // begins, and every verdict in it states a number.
    let ks = &md[md.find("## The answer: the mail's options").unwrap()..];
    let ks = &ks[..ks[3..].find("\n## ").map_or(ks.len(), |n| n + 3)];
    let answers: Vec<&str> = ks.lines().filter(|l| l.starts_with("**")).collect();
    assert_eq!(answers.len(), 6, "{ks}");
    for a in answers {
        assert!(a.chars().any(|c| c.is_ascii_digit()), "no number: {a}");
    }
    for svg in ["kernel-split-randread-qd1.svg", "kernel-iops-depth.svg"] {
        assert!(file(&out.path().join("kernel").join(svg)).starts_with("<svg"));
    }
    // Each installed peer ran at each of its settings first; one of them
    // was chosen for the rest of the run.
    for peer in report::PEERS.iter().filter(|p| on_path(p)) {
        let rows: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with(&format!("| {peer} | `")))
            .collect();
        let want = dvma::bench::matrix::plan::peer_settings(peer).count();
        assert_eq!(rows.len(), want, "{peer}'s settings in report.md:\n{md}");
        assert_eq!(
            rows.iter().filter(|l| l.ends_with("| ✓ |")).count(),
            1,
            "one chosen setting for {peer}: {rows:?}"
        );
    }
    for peer in missing {
        assert!(
            md.contains(&format!("{peer}: **not installed**")),
            "report.md does not say {peer} is missing"
        );
    }
    for svg in ["randread-4k-qd1.svg", "cdf-randread-4k-qd1.svg"] {
        assert!(file(&out.path().join("plots").join(svg)).starts_with("<svg"));
    }
    let raw: Vec<String> = std::fs::read_dir(out.path().join("raw"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        raw.iter()
            .any(|f| f.ends_with("randread-4k-qd1.server.json")),
        "{raw:?}"
    );
    // The interleaved comparison: the pair, the defaults, each peer.
    let section = &md[md.find("## Against the peers, interleaved").unwrap()..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |n| n + 3)];
    for row in ["best pair `permanent/intr`", "no flags `permanent/softint`"] {
        assert!(
            section.contains(&format!("| randread-4k-qd1 | {row} |")),
            "no {row} row:\n{section}"
        );
    }
    for peer in report::PEERS.iter().filter(|p| on_path(p)) {
        assert!(
            section.contains(&format!("| randread-4k-qd1 | {peer} |")),
            "no {peer} row:\n{section}"
        );
    }
    // The backing files are gone.
    assert!(!out.path().join("work").exists());
    eprintln!("dvma bench smoke: {:.1} s", start.elapsed().as_secs_f64());
}
