//! `dvma metal`: the kern core booted as an x86-64 kernel under QEMU
//! (`crates/metal`). Each test runs the real `dvma` binary, which builds
//! the kernel, boots it (KVM if usable, else TCG) and exits with the
//! guest's status. Bounded: every guest is killed after `--timeout`.
//!
//! QEMU comes from `PATH`, `$DVMA_QEMU`, or the private install of
//! `crates/metal/qemu-install.sh` (which `.ci/run` runs); a machine where
//! none can be had skips these tests (`common::skip`: a failure unless
//! `DVMA_ALLOW_SKIP=1`, and never allowed under CI).

mod common;

use std::process::{Command, Output};
use std::sync::Mutex;

/// One guest at a time: they share the kernel build and the machine's
/// two cores.
static ONE: Mutex<()> = Mutex::new(());

fn metal(args: &[&str]) -> Option<Output> {
    let _g = ONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(why) = dvma::metal::find_qemu() {
        common::skip::skip(&why);
        return None;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dvma"))
        .arg("metal")
        .args(args)
        .args(["--timeout", "120"])
        .output()
        .expect("run dvma metal");
    Some(out)
}

/// The JSON the program printed on stdout (`--json`), or a panic naming
/// `what` with everything the run printed.
fn json_of<T: serde::de::DeserializeOwned>(o: &Output, what: &str) -> T {
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {}", text(o)))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn boots_prints_and_exits_zero() {
    let Some(o) = metal(&["hello"]) else { return };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("metal: dvma kernel"), "{}", text(&o));
    assert!(out.contains("hello from metal"), "{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn page_fault_is_reported_and_fails() {
    let Some(o) = metal(&["fault"]) else { return };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("exception 14 (page fault)") && out.contains("fault address 0x100000000"),
        "{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

fn selftest(spl: &str, intr_stack: &str, cpus: &str) {
    let Some(o) = metal(&[
        "selftest",
        "--json",
        "--spl",
        spl,
        "--intr-stack",
        intr_stack,
        "--cpus",
        cpus,
    ]) else {
        return;
    };
    let v: serde_json::Value = json_of(&o, "selftest");
    for check in [
        "intr_at_post",
        "intr_stack",
        "spl_defer_replay",
        "softint",
        "threads",
        "callout",
        "ast",
        "ok",
    ] {
        assert_eq!(v[check], true, "{check}: {}", text(&o));
    }
    assert_eq!(v["cpus"].to_string(), cpus, "{}", text(&o));
    if cpus != "1" {
        assert_eq!(v["other_cpu"], true, "{}", text(&o));
    }
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn kern_selftest_lazy_spl() {
    selftest("lazy", "on", "1");
}

#[test]
fn kern_selftest_mask_spl_is_cr8() {
    selftest("mask", "on", "1");
}

#[test]
fn kern_selftest_without_interrupt_stack() {
    selftest("lazy", "off", "1");
}

/// Two CPUs: started with INIT-SIPI-SIPI from the MADT, a thread on
/// CPU 1 (woken by an IPI), an interrupt from CPU 1 to CPU 0.
#[test]
fn kern_selftest_two_cpus() {
    selftest("lazy", "on", "2");
}

/// `dvma metal race --json`: the rows of `dvma race --json` (the same
/// fields), each behaving as the mechanism predicts: corruptions exactly
/// where `tests/race.rs` expects them on Linux.
fn race(spl: &str, intr_stack: &str, storm: Option<&str>, cpus: &str) {
    let mut args = vec![
        "race",
        "--json",
        "--spl",
        spl,
        "--intr-stack",
        intr_stack,
        "--cpus",
        cpus,
    ];
    if let Some(s) = storm {
        args.extend(["--storm", s]);
    }
    let Some(o) = metal(&args) else {
        return;
    };
    let rows: Vec<serde_json::Value> = json_of(&o, "race");
    common::race::check_rows(&rows);
    if storm.is_none() {
        for r in &rows {
            assert_eq!(r["storm_injections"], 0, "no storm asked for: {r}");
        }
    }
    if storm.is_some() {
        let storm: u64 = rows
            .iter()
            .map(|r| r["storm_injections"].as_u64().unwrap())
            .sum();
        assert!(storm > 0, "the storm never landed in the allocator");
    }
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn race_rows_lazy_spl_with_storm() {
    race("lazy", "on", Some("0.1"), "1");
}

#[test]
fn race_rows_mask_spl_without_interrupt_stack() {
    race("mask", "off", None, "1");
}

/// The bar: the race's rows on two CPUs, under a storm whose
/// device is a kernel thread on CPU 1 (its interrupts are IPIs to CPU 0).
#[test]
fn race_rows_two_cpus_with_cross_cpu_storm() {
    race("lazy", "on", Some("0.1"), "2");
}

#[test]
fn stack_overflow_hits_the_guard_page() {
    let Some(o) = metal(&["overflow"]) else {
        return;
    };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("kernel stack overflow: guard page hit") && out.contains("(thread overflow)"),
        "{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

/// `dvma metal bench micro --json` runs and says what it timed; the
/// figures themselves are not checked (under TCG they are the emulator's).
#[test]
fn bench_micro_runs_and_counts() {
    let Some(o) = metal(&["bench", "micro", "--json", "--iterations", "1"]) else {
        return;
    };
    let v: serde_json::Value = json_of(&o, "bench micro");
    for f in [
        "spl_pair_ns",
        "switch_ns",
        "intr_ns",
        "ast_ns",
        "softint_dispatch_ns",
    ] {
        assert!(v[f].as_f64().is_some_and(|x| x > 0.0), "{f}: {}", text(&o));
    }
    assert_eq!(v["intr_runs"], v["posted"], "{}", text(&o));
    assert_eq!(v["ok"], true, "{}", text(&o));
    assert!(!v["hypervisor"].as_str().unwrap_or("").is_empty());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// The `disk` program over virtio-blk: every run's writes read back with
/// no mismatch, each run took interrupts (MSI-X), a command naming an
/// unmapped IOVA was refused with a DMA fault, and the image files on the
/// host hold exactly what the guest says it wrote: each sector zero or
/// the verify pattern of its offset (below the ccd's base, the disk's
/// offset; above it, the offset in the ccd that the stripe gives it); as
/// many pattern sectors as written.
struct DiskRun<'a> {
    dvma: &'a str,
    completion: &'a str,
    cpus: &'a str,
    iommu: &'a str,
    disks: usize,
    ccd: bool,
    iterations: Option<&'a str>,
}

impl Default for DiskRun<'_> {
    fn default() -> Self {
        DiskRun {
            dvma: "strict",
            completion: "all",
            cpus: "1",
            iommu: "none",
            disks: 1,
            ccd: false,
            iterations: None,
        }
    }
}

fn disk(r: DiskRun<'_>) {
    // Removed with everything in it when the test ends, pass or fail.
    let dir = common::TempDir::new("metal-disk");
    let imgs: Vec<std::path::PathBuf> = (0..r.disks)
        .map(|i| {
            dir.path().join(format!(
                "{}-{}-{}-{i}.img",
                r.dvma.replace(',', "-"),
                r.cpus,
                r.iommu
            ))
        })
        .collect();
    let disks = r.disks.to_string();
    let mut args = vec![
        "disk",
        "--json",
        "--dvma",
        r.dvma,
        "--completion",
        r.completion,
        "--cpus",
        r.cpus,
        "--iommu",
        r.iommu,
        "--disks",
        &disks,
    ];
    for i in &imgs {
        args.extend(["--disk-image", i.to_str().expect("utf-8 temp path")]);
    }
    if r.ccd {
        args.push("--ccd");
    }
    if let Some(n) = r.iterations {
        args.extend(["--iterations", n]);
    }
    let Some(o) = metal(&args) else {
        return;
    };
    let v: serde_json::Value = json_of(&o, "disk");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(v["ok"], true, "{}", text(&o));
    assert_eq!(v["disks"], r.disks, "{}", text(&o));
    assert_eq!(v["ccd"], r.ccd, "{}", text(&o));
    let count = |list: &str, all: usize| {
        if list == "all" {
            all
        } else {
            list.split(',').count()
        }
    };
    let pairs = count(r.dvma, 5) * count(r.completion, 4);
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(
        runs.len(),
        pairs * (r.disks + usize::from(r.ccd)),
        "{}",
        text(&o)
    );
    let ops: u64 = r.iterations.map_or(32, |n| n.parse().unwrap()) * 2;
    for run in runs {
        assert_eq!(run["mismatches"], 0, "{run}");
        assert_eq!(run["errors"], 0, "{run}");
        assert_eq!(run["ops"], ops, "{run}");
        assert!(
            run["intrs"].as_u64().unwrap_or(0) > 0,
            "no interrupt: {run}"
        );
    }
    for d in 0..r.disks {
        assert!(
            runs.iter().any(|run| run["disk"] == d),
            "no run on disk {d}: {}",
            text(&o)
        );
    }
    if r.ccd {
        assert!(runs.iter().any(|run| run["dev"] == "ccd0"), "{}", text(&o));
    }
    assert_eq!(v["device_submitted"], v["device_completed"], "{}", text(&o));
    assert_eq!(v["unmapped_iova_refused"], true, "{}", text(&o));
    assert_eq!(v["unmapped_iova_status"], "Some(DmaFault)", "{}", text(&o));
    assert_eq!(v["iommu"], r.iommu, "{}", text(&o));
    if r.iommu == "vtd" {
        // The unit itself blocked the device's access and recorded it,
        // and its fault event interrupted the boot CPU.
        assert!(v["vtd_faults"].as_u64().unwrap_or(0) >= 1, "{}", text(&o));
        assert!(
            v["vtd_fault_intrs"].as_u64().unwrap_or(0) >= 1,
            "{}",
            text(&o)
        );
        // Every invalidation went through the invalidation queue.
        assert_eq!(v["vtd_invalidation"], "queued", "{}", text(&o));
        assert!(
            v["vtd_invalidations"].as_u64().unwrap_or(0) > 0,
            "{}",
            text(&o)
        );
        assert!(
            v["vtd_queued_submissions"].as_u64().unwrap_or(0)
                >= v["vtd_invalidations"].as_u64().unwrap_or(u64::MAX),
            "{}",
            text(&o)
        );
        assert_eq!(v["vtd_register_invalidations"], 0, "{}", text(&o));
    }
    let seed = v["seed"].as_u64().expect("seed");
    let ileave = v["ccd_interleave"].as_u64().expect("ccd_interleave");
    let base = v["ccd_component_base"]
        .as_u64()
        .expect("ccd_component_base")
        / 512;
    let n = r.disks as u64;
    let mut want = [0u8; 512];
    let mut pattern = 0u64;
    for (c, img) in imgs.iter().enumerate() {
        let image = std::fs::read(img).expect("read the image");
        let (mut mine, mut other) = (0u64, Vec::new());
        for (s, sector) in image.chunks_exact(512).enumerate() {
            if sector.iter().all(|&b| b == 0) {
                continue;
            }
            let s = s as u64;
            // Below the ccd's base the disk's own offset; above it the
            // ccd sector that the stripe puts here.
            let off = if s < base {
                s
            } else {
                ((s / ileave) * n + c as u64) * ileave + s % ileave
            };
            kern::loadgen::fill(&mut want, seed, off * 512);
            if sector == want {
                mine += 1;
            } else {
                other.push(s);
            }
        }
        assert!(
            other.is_empty(),
            "disk {c}: {} sectors are neither zero nor the pattern (first {:?})",
            other.len(),
            &other[..other.len().min(8)]
        );
        assert!(mine > 0, "disk {c}: nothing written");
        if r.ccd {
            let above = image
                .chunks_exact(512)
                .skip(base as usize)
                .filter(|x| x.iter().any(|&b| b != 0))
                .count();
            assert!(above > 0, "disk {c}: the ccd wrote nothing on it");
        }
        pattern += mine;
    }
    assert_eq!(
        Some(pattern),
        v["sectors_written"].as_u64(),
        "pattern sectors on the host images vs written by the guest"
    );
}

#[test]
fn disk_virtio_blk_strict_lazy_slots_two_cpus() {
    disk(DiskRun {
        dvma: "strict,lazy,slots",
        cpus: "2",
        ..DiskRun::default()
    });
}

#[test]
fn disk_virtio_blk_permanent_shadow() {
    disk(DiskRun {
        dvma: "permanent,shadow",
        ..DiskRun::default()
    });
}

/// Every DVMA mode x completion mode with the disk behind VT-d (QEMU's
/// intel-iommu, `iommu_platform=on`): the device's accesses are
/// translated by the unit's page tables, and an unmapped IOVA fails that
/// command alone (the runs after it pass).
#[test]
fn disk_virtio_blk_behind_vtd_strict_lazy_slots_two_cpus() {
    disk(DiskRun {
        dvma: "strict,lazy,slots",
        cpus: "2",
        iommu: "vtd",
        ..DiskRun::default()
    });
}

#[test]
fn disk_virtio_blk_behind_vtd_permanent_shadow() {
    disk(DiskRun {
        dvma: "permanent,shadow",
        iommu: "vtd",
        ..DiskRun::default()
    });
}

/// Three virtio-blk disks, each its own PCI function, MSI-X vector and sd
/// unit: each one's writes read back and land on its own image.
#[test]
fn disk_three_virtio_blk_disks() {
    disk(DiskRun {
        dvma: "lazy,permanent",
        completion: "intr,thread",
        cpus: "2",
        disks: 3,
        ..DiskRun::default()
    });
}

/// ccd striped over two disks behind one VT-d domain: what it writes is
/// read back through it, and lies on both images where the stripe says.
#[test]
fn disk_ccd_over_two_disks_behind_vtd() {
    disk(DiskRun {
        dvma: "strict,shadow",
        completion: "softint,ast",
        cpus: "2",
        iommu: "vtd",
        disks: 2,
        ccd: true,
        ..DiskRun::default()
    });
}

/// All 20 DVMA x completion pairs in one boot: more sd attaches than kern
/// has IPL_BIO vectors (16), which detach gives back.
#[test]
fn disk_every_pair_in_one_boot() {
    disk(DiskRun {
        dvma: "all",
        iterations: Some("4"),
        ..DiskRun::default()
    });
}

/// `dvma metal bench kernel --json` on a subset: the JSON's structure,
/// every window did I/O without an error, and the counts that follow from
/// the DVMA mode behind VT-d: strict invalidates the IOTLB on every I/O,
/// permanent (its pool mapped at attach) never during a window. No speed
/// is checked. Two CPUs: the disk interrupts CPU 1, whose idle loop must
/// not sleep through a thread its own handler queued (a lost wake-up that
/// once hung 2-CPU guests).
#[test]
fn bench_kernel_runs_every_pair_and_workload() {
    let Some(o) = metal(&[
        "bench",
        "kernel",
        "--json",
        "--dvma",
        "strict,permanent",
        "--completion",
        "intr,thread",
        "--ms",
        "20",
        "--iommu",
        "vtd",
        "--cpus",
        "2",
    ]) else {
        return;
    };
    let v: serde_json::Value = json_of(&o, "bench kernel");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(v["program"], "bench kernel", "{}", text(&o));
    assert_eq!(v["ok"], true, "{}", text(&o));
    assert_eq!(v["errors"], 0, "{}", text(&o));
    assert_eq!(v["iommu"], "vtd", "{}", text(&o));
    assert_eq!(v["cpus"], 2, "{}", text(&o));
    let pairs = v["pairs"].as_array().expect("pairs");
    let names: Vec<String> = pairs
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["dvma"].as_str().unwrap(),
                p["completion"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "strict/intr",
            "strict/thread",
            "permanent/intr",
            "permanent/thread"
        ],
        "{}",
        text(&o)
    );
    for p in pairs {
        let ws = p["workloads"].as_array().expect("workloads");
        let labels: Vec<String> = ws
            .iter()
            .map(|w| format!("{} qd{}", w["workload"].as_str().unwrap(), w["depth"]))
            .collect();
        assert_eq!(
            labels,
            [
                "randread qd1",
                "randread qd32",
                "randwrite qd1",
                "randwrite qd32"
            ],
            "{p}"
        );
        for w in ws {
            assert!(w["ios"].as_u64().unwrap_or(0) > 0, "no I/O: {w}");
            assert_eq!(w["errors"], 0, "{w}");
            for f in [
                "iops",
                "busy_ns",
                "cpu_ns_per_io",
                "intrs_per_io",
                "traps_per_io",
            ] {
                assert!(w[f].as_f64().is_some_and(|x| x > 0.0), "{f}: {w}");
            }
            let inval = w["vtd_invalidations_per_io"]
                .as_f64()
                .expect("invalidations");
            match p["dvma"].as_str() {
                Some("strict") => assert!(inval >= 1.0, "strict: {w}"),
                _ => assert_eq!(inval, 0.0, "permanent: {w}"),
            }
        }
        assert!(p["pages_peak"].as_u64().is_some(), "{p}");
        assert!(p["pages_reserved"].as_u64().is_some(), "{p}");
    }
}

/// Behind VT-d, the command naming an unmapped IOVA fails with a DMA
/// fault, alone (the run after it writes and reads back without an
/// error), and the fault is counted by the unit's fault-event interrupt:
/// its handler (kern's, at IPL_HIGH) ran and collected the record the
/// driver failed the command on.
#[test]
fn vtd_unmapped_iova_fails_alone_counted_by_fault_interrupt() {
    let Some(o) = metal(&[
        "disk",
        "--json",
        "--dvma",
        "strict",
        "--completion",
        "intr",
        "--iommu",
        "vtd",
        "--iterations",
        "8",
    ]) else {
        return;
    };
    let v: serde_json::Value = json_of(&o, "disk");
    assert_eq!(v["iommu"], "vtd", "{}", text(&o));
    assert_eq!(v["unmapped_iova_status"], "Some(DmaFault)", "{}", text(&o));
    assert_eq!(v["unmapped_iova_refused"], true, "{}", text(&o));
    // The device may touch the page more than once: QEMU records one
    // fault per access unless the previous record is still pending, so
    // the records (and events) of this one command are one or more.
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    assert!(n("vtd_faults") >= 1, "{}", text(&o));
    assert!(n("vtd_fault_intrs") >= 1, "no fault event: {}", text(&o));
    assert!(
        n("vtd_faults_by_intr") >= 1 && n("vtd_faults_by_intr") <= n("vtd_faults"),
        "the interrupt collected the record(s): {}",
        text(&o)
    );
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{}", text(&o));
    assert_eq!(runs[0]["ops"], 16, "{}", text(&o));
    assert_eq!(runs[0]["errors"], 0, "{}", text(&o));
    assert_eq!(runs[0]["mismatches"], 0, "{}", text(&o));
    assert_eq!(runs[0]["dma_faults"], 0, "{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `dvma metal bench dvma --json`: a figure per DVMA mode, with the
/// counts per I/O. Behind VT-d (queued invalidation): strict invalidates
/// the IOTLB on every unload, lazy at most that often, slots, permanent
/// and shadow never; permanent and shadow map nothing per I/O, shadow
/// copies; both invalidation flavours were timed. With two CPUs the
/// loops also ran on both at once (the counts hold for those I/Os too).
/// No speed is checked.
fn bench_dvma(iommu: &str, cpus: &str) -> serde_json::Value {
    let Some(o) = metal(&[
        "bench",
        "dvma",
        "--json",
        "--iterations",
        "1",
        "--iommu",
        iommu,
        "--cpus",
        cpus,
    ]) else {
        return serde_json::Value::Null;
    };
    let v: serde_json::Value = json_of(&o, "bench dvma");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(v["ok"], true, "{}", text(&o));
    assert_eq!(v["iommu"], iommu, "{}", text(&o));
    assert!(!v["hypervisor"].as_str().unwrap_or("").is_empty());
    assert_eq!(v["cpus"].to_string(), cpus, "{}", text(&o));
    for m in ["strict", "lazy", "slots", "permanent", "shadow"] {
        let f = &v["modes"][m];
        for k in [
            "ns_4k",
            "ns_64k",
            "enters_per_io",
            "removes_per_io",
            "iotlb_inv_per_load",
            "iotlb_inv_per_unload",
            "inv_cycles_per_io",
            "bounce_bytes_per_io",
        ] {
            assert!(f[k].as_f64().is_some(), "{m}.{k}: {}", text(&o));
        }
        assert!(f["ns_4k"].as_f64().unwrap() > 0.0, "{m}: {}", text(&o));
        let both = f["contended_ns_4k"].as_f64().unwrap_or(-1.0);
        if cpus == "1" {
            assert_eq!(both, 0.0, "{m}: no second CPU: {}", text(&o));
        } else {
            assert!(both > 0.0, "{m}: {}", text(&o));
        }
        assert!(f["ios"].as_u64().unwrap_or(0) >= 64, "{m}: {}", text(&o));
    }
    let per = |m: &str, k: &str| v["modes"][m][k].as_f64().unwrap();
    for m in ["permanent", "shadow"] {
        assert_eq!(
            per(m, "enters_per_io"),
            0.0,
            "{m} maps nothing: {}",
            text(&o)
        );
        assert_eq!(per(m, "removes_per_io"), 0.0, "{m}: {}", text(&o));
    }
    assert!(per("shadow", "bounce_bytes_per_io") > 0.0, "{}", text(&o));
    assert!(per("strict", "enters_per_io") >= 1.0, "{}", text(&o));
    for m in ["slots", "permanent", "shadow"] {
        assert_eq!(per(m, "iotlb_inv_per_unload"), 0.0, "{m}: {}", text(&o));
    }
    if iommu == "vtd" {
        assert_eq!(v["invalidation"], "queued", "{}", text(&o));
        assert!(
            per("strict", "iotlb_inv_per_unload") >= 1.0,
            "strict invalidates at every unload: {}",
            text(&o)
        );
        let lazy = per("lazy", "iotlb_inv_per_unload");
        assert!(
            lazy > 0.0 && lazy <= per("strict", "iotlb_inv_per_unload"),
            "lazy invalidates, in batches: {}",
            text(&o)
        );
        for m in ["permanent", "shadow"] {
            assert_eq!(per(m, "iotlb_inv_per_load"), 0.0, "{m}: {}", text(&o));
            assert_eq!(per(m, "inv_cycles_per_io"), 0.0, "{m}: {}", text(&o));
        }
        assert!(per("strict", "inv_cycles_per_io") > 0.0, "{}", text(&o));
        for flavour in ["queued", "register"] {
            assert!(
                v["inval_cost"][flavour]["cycles"].as_f64().unwrap_or(0.0) > 0.0,
                "{flavour}: {}",
                text(&o)
            );
        }
        assert!(v["strict_register_ns_4k"].as_f64().unwrap_or(0.0) > 0.0);
    } else {
        assert_eq!(v["invalidation"], "none", "{}", text(&o));
        for m in ["strict", "lazy", "slots", "permanent", "shadow"] {
            assert_eq!(per(m, "iotlb_inv_per_unload"), 0.0, "{m}: {}", text(&o));
            assert_eq!(per(m, "iotlb_inv_per_load"), 0.0, "{m}: {}", text(&o));
        }
    }
    v
}

#[test]
fn bench_dvma_behind_vtd_strict_invalidates_permanent_does_not_two_cpus() {
    bench_dvma("vtd", "2");
}

#[test]
fn bench_dvma_without_iommu_invalidates_nothing() {
    bench_dvma("none", "1");
}
