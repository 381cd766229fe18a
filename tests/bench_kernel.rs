//! `dvma bench kernel` end to end on a tiny configuration: two pairs, two
//! workloads, two repetitions of a short window, with the verify pass.
//! Checks the structure of `kernel.json` and `kernel.md`, that every
//! figure is present and positive where it must be, the ranking's
//! consistency, the statclock's split (every part, within the CPU ns per
//! I/O, samples taken, its own cost measured), the IOPS-vs-depth curve
//! and the plot files, and that the verify pass read back what it wrote.
//! No speed is asserted.
//!
//! The bench runs in a child process that is killed if it has not
//! finished within two minutes, pass or fail: no machine is left behind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/tempdir.rs"]
mod tempdir;

/// Kills the child on drop (a failing assertion included).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> (bool, String, String) {
    let mut c = Child(
        Command::new(env!("CARGO_BIN_EXE_dvma"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dvma"),
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = c.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "dvma bench kernel did not finish in 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    if let Some(mut o) = c.0.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = c.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.success(), out, err)
}

#[test]
fn a_tiny_kernel_bench_reports_every_figure_and_reads_back_what_it_wrote() {
    let dir = tempdir::TempDir::new("bench-kernel");
    let out = dir.path().to_str().expect("utf-8 path");
    let (ok, stdout, stderr) = run(&[
        "bench",
        "kernel",
        "--reps",
        "2",
        "--ms",
        "15",
        "--modes",
        "permanent,strict",
        "--completions",
        "thread",
        "--depths",
        "1,4",
        "--workloads",
        "randread,randwrite",
        "--verify",
        "--curve-pairs",
        "2",
        "--curve-depths",
        "1,4",
        "--json",
        "--out",
        out,
    ]);
    assert!(ok, "dvma bench kernel failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("kernel.json")).expect("kernel.json"),
    )
    .expect("kernel.json is JSON");
    assert_eq!(v, file, "stdout and kernel.json differ");
    assert_eq!(v["schema"], "dvma-bench-kernel/3");
    assert!(!v["machine"]["cpu_model"].as_str().unwrap_or("").is_empty());
    assert!(v["machine"]["host_cores"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(v["config"]["reps"], 2);
    assert_eq!(v["config"]["medium"], "ram");
    assert_eq!(v["config"]["issuer"], "thread");
    assert_eq!(v["config"]["pairs"], 2);
    let workloads: Vec<&str> = v["config"]["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(
        workloads,
        [
            "randread qd1",
            "randread qd4",
            "randwrite qd1",
            "randwrite qd4"
        ]
    );
    for k in ["strict", "lazy", "slots", "permanent", "shadow"] {
        assert!(
            v["protections"][k].as_str().is_some_and(|s| !s.is_empty()),
            "protection of {k}"
        );
    }
    for k in [
        "cpu_ns_rel_range_median",
        "cpu_ns_rel_range_max",
        "iops_rel_range_median",
    ] {
        let x = v["noise"][k].as_f64().expect(k);
        assert!(x.is_finite() && x >= 0.0, "noise {k} = {x}");
    }
    // The statclock: its parts, its rate, its own cost.
    let sc = &v["statclock"];
    assert_eq!(sc["period_us"], 200);
    assert!(
        sc["clock"].as_str().unwrap().starts_with("timer_create"),
        "the default source is the CPU-clock timer: {}",
        sc["clock"]
    );
    let parts: Vec<String> = sc["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    for p in [
        "thread",
        "spl",
        "bus_dma",
        "intr_entry",
        "dispatch",
        "driver",
        "device",
        "idle",
        "other",
    ] {
        assert!(parts.iter().any(|x| x == p), "part {p} missing: {parts:?}");
    }
    assert!(sc["samples_per_cpu_second"].as_f64().unwrap() >= 0.0);
    assert!(sc["samples_per_window"]["n"].as_u64().unwrap() > 0);
    assert_eq!(sc["overhead_workload"], "randread qd1");
    assert_eq!(
        sc["overhead_rel"]["n"], 4,
        "the statclock's cost: one on/off pair per pair and repetition"
    );
    let mut total_samples = 0;
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2 * 4, "one result per pair and workload");
    for r in results {
        let what = format!(
            "{}/{} {} qd{}",
            r["dvma"], r["completion"], r["workload"], r["depth"]
        );
        for f in ["cpu_ns_per_io", "iops_per_cpu", "vcpu_busy"] {
            let s = &r[f];
            assert_eq!(s["n"], 2, "{what}: {f} over both repetitions");
            let (lo, med, hi) = (
                s["min"].as_f64().unwrap(),
                s["median"].as_f64().unwrap(),
                s["max"].as_f64().unwrap(),
            );
            assert!(lo > 0.0 && lo <= med && med <= hi, "{what}: {f} = {s}");
        }
        for f in [
            "signals_per_io",
            "switches_per_io",
            "asts_per_io",
            "intrs_per_io",
            "maps_per_io",
        ] {
            let m = r[f]["median"].as_f64().expect(f);
            assert!(m.is_finite() && m >= 0.0, "{what}: {f}");
        }
        assert!(r["ios"].as_u64().unwrap() > 0, "{what}: no I/O");
        assert_eq!(r["errors"], 0, "{what}: I/O errors");
        assert!(r["rank"].as_u64().unwrap() >= 1);
        assert!(r["tied_with"].is_array());
        assert!(
            r["dvma_pages_peak"].as_u64().unwrap() > 0,
            "{what}: no DVMA page held"
        );
        // The split: every part, each within [0, CPU ns per I/O], their
        // medians adding up to about the CPU ns per I/O when there were
        // samples (a median of sums is not the sum of medians: loosely).
        let split = r["split_ns_per_io"].as_object().expect("split_ns_per_io");
        assert_eq!(split.len(), parts.len(), "{what}: one entry per part");
        let cpu_max = r["cpu_ns_per_io"]["max"].as_f64().unwrap();
        let mut sum = 0.0;
        for p in &parts {
            let s = &split[p.as_str()];
            assert_eq!(s["n"], 2, "{what}: split {p} over both repetitions");
            let m = s["median"].as_f64().unwrap();
            assert!(
                m >= 0.0 && s["max"].as_f64().unwrap() <= cpu_max + 1e-6,
                "{what}: {p} = {s}"
            );
            sum += m;
        }
        let samples = r["statclock_samples"].as_u64().expect("statclock_samples");
        if samples > 0 {
            assert!(sum > 0.0, "{what}: samples but an empty split");
        }
        total_samples += samples;
        if r["dvma"] == "permanent" {
            assert!(r["dvma_pages_reserved"].as_u64().unwrap() > 0);
        }
    }
    // Per workload: ranks start at 1, come in order, and a tie is mutual.
    for w in &workloads {
        let rows: Vec<&serde_json::Value> = results
            .iter()
            .filter(|r| format!("{} qd{}", r["workload"].as_str().unwrap(), r["depth"]) == *w)
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["rank"], 1, "{w}");
        assert!(rows[0]["rank"].as_u64() <= rows[1]["rank"].as_u64());
        let pair = |r: &serde_json::Value| {
            format!(
                "{}/{}",
                r["dvma"].as_str().unwrap(),
                r["completion"].as_str().unwrap()
            )
        };
        let tied = |a: &serde_json::Value, b: &serde_json::Value| {
            a["tied_with"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x.as_str() == Some(&pair(b)))
        };
        assert_eq!(
            tied(rows[0], rows[1]),
            tied(rows[1], rows[0]),
            "{w}: ties are mutual"
        );
        assert_eq!(
            tied(rows[0], rows[1]),
            rows[0]["rank"] == rows[1]["rank"],
            "{w}"
        );
    }
    // 2 pairs x 4 workloads x 2 windows of 15 ms of CPU time: a host tick
    // of 4 ms (250 Hz) or less gives dozens of samples.
    assert!(total_samples > 0, "no statclock sample at all");
    // The curve: the 2 best pairs at depths 1 and 4, both repetitions.
    assert_eq!(v["config"]["curve_depths"], serde_json::json!([1, 4]));
    let curve = v["curve"].as_array().expect("curve");
    assert_eq!(curve.len(), 2);
    for c in curve {
        assert_eq!(c["workload"], "randread");
        let pts = c["points"].as_array().expect("points");
        let depths: Vec<u64> = pts.iter().map(|p| p["depth"].as_u64().unwrap()).collect();
        assert_eq!(depths, [1, 4], "{c}");
        for p in pts {
            for f in ["iops_per_cpu", "cpu_ns_per_io"] {
                assert_eq!(p[f]["n"], 2, "{c}: {f}");
                assert!(p[f]["min"].as_f64().unwrap() > 0.0, "{c}: {f}");
            }
        }
    }
    // The plots: a split per workload and the curve, each a file in --out.
    let plots: Vec<&str> = v["plots"]
        .as_array()
        .expect("plots")
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        plots,
        [
            "kernel-split-randread-qd1.svg",
            "kernel-split-randread-qd4.svg",
            "kernel-split-randwrite-qd1.svg",
            "kernel-split-randwrite-qd4.svg",
            "kernel-iops-depth.svg"
        ]
    );
    for p in &plots {
        let svg = std::fs::read_to_string(dir.path().join(p)).expect(p);
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{p}");
    }
    // The mail's questions: the reference pair under each machine
    // variant, every workload, both repetitions, with its split.
    assert_eq!(v["config"]["ref_pair"], "permanent/intr");
    let variants = v["variants"].as_array().expect("variants");
    let names: Vec<&str> = variants
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "intr-stack off", "spl mask"]);
    assert_eq!(
        variants
            .iter()
            .map(|x| (
                x["intr_stack"].as_bool().unwrap(),
                x["spl"].as_str().unwrap()
            ))
            .collect::<Vec<_>>(),
        [(true, "lazy"), (false, "lazy"), (true, "mask")]
    );
    for x in variants {
        let rs = x["results"].as_array().expect("variant results");
        assert_eq!(rs.len(), 4, "{}: one per workload", x["name"]);
        for r in rs {
            let c = &r["cpu_ns_per_io"];
            assert_eq!(c["n"], 2, "{x}");
            assert!(c["min"].as_f64().unwrap() > 0.0, "{x}");
            for p in ["intr_entry", "spl", "dispatch"] {
                assert!(r["split_ns_per_io"][p]["median"].as_f64().unwrap() >= 0.0);
            }
        }
    }
    // The verdicts: one paragraph per question, each stating a number.
    let verdicts = v["verdicts"].as_array().expect("verdicts");
    let keys: Vec<&str> = verdicts
        .iter()
        .map(|x| x["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "ranking",
            "intr_stack",
            "completion",
            "dvma_space",
            "spl",
            "shape"
        ]
    );
    for x in verdicts {
        let t = x["text"].as_str().unwrap();
        assert!(
            t.chars().any(|c| c.is_ascii_digit()),
            "verdict {} states no number: {t}",
            x["key"]
        );
        assert!(!x["question"].as_str().unwrap().is_empty());
    }
    // Two DVMA modes: no shape (it needs all five), and the verdict says so.
    assert_eq!(v["shape"], serde_json::json!([]));
    assert!(
        verdicts[5]["text"]
            .as_str()
            .unwrap()
            .contains("not computed"),
        "{}",
        verdicts[5]
    );
    // The verify pass: a pattern written, half rewritten at random, all
    // read back, for each pair and repetition; nothing differs.
    let verify = v["verify"].as_array().expect("verify");
    assert_eq!(verify.len(), 2);
    for x in verify {
        assert!(x["ios"].as_u64().unwrap() > 0, "{x}");
        assert_eq!(x["errors"], 0, "{x}");
        assert_eq!(x["mismatches"], 0, "{x}");
    }
    let md = std::fs::read_to_string(dir.path().join("kernel.md")).expect("kernel.md");
    for h in [
        "# dvma bench kernel",
        "## randread qd1",
        "## randwrite qd4",
        "## Protection",
        "## Verify",
        "Noise:",
        "| rank | dvma/completion | CPU ns/IO |",
        "## Where the CPU time goes (statclock)",
        "### randwrite qd4: CPU ns per I/O by part",
        "| dvma/completion | CPU ns/IO | other | thread | spl | bus_dma | intr_entry | dispatch | driver | device | idle | samples |",
        "](kernel-split-randread-qd1.svg)",
        "## I/Os per second against the queue depth",
        "](kernel-iops-depth.svg)",
        "| dvma/completion | qd1 | qd4 |",
        "## The answer: the mail's questions, from this run's numbers",
        "**What does a separate interrupt stack cost?** ",
        "**Kernel thread switch, soft interrupt or pushed frame?** ",
        "**What does \"the space is always taken\" cost?** ",
        "**What does the spl implementation cost per I/O (lazy vs mask)?** ",
        "**Which DVMA mode and which completion mode are best?** ",
        "**Does this machine reproduce the published shape?** ",
        "## The reference pair under the machine's variants",
        "| spl mask | randwrite qd4 |",
    ] {
        assert!(md.contains(h), "kernel.md lacks `{h}`:\n{md}");
    }
}

/// A bad argument is refused with a message, before any machine boots.
#[test]
fn bad_arguments_are_refused() {
    let dir = tempdir::TempDir::new("bench-kernel-bad");
    let out = dir.path().to_str().unwrap();
    for (args, msg) in [
        (vec!["--modes", "nope"], "unknown DVMA mode"),
        (vec!["--completions", "nope"], "unknown completion"),
        (vec!["--medium", "tape"], "unknown medium"),
        (vec!["--depths", "0"], "queue depth"),
        (vec!["--issue", "nobody"], "unknown issuer"),
        (vec!["--curve-depths", "65"], "curve queue depth"),
        (
            vec!["--statclock-source", "sundial"],
            "unknown statclock source",
        ),
        (vec!["--ref-pair", "permanent"], "--ref-pair"),
        (vec!["--ref-pair", "permanent/never"], "unknown completion"),
    ] {
        let mut a = vec!["bench", "kernel", "--out", out];
        a.extend(args);
        let (ok, _, err) = run(&a);
        assert!(!ok, "{a:?} accepted");
        assert!(err.contains(msg), "{a:?}: {err}");
    }
}
