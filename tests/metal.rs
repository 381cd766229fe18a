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
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("selftest printed no JSON ({e}): {}", text(&o)));
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
    let out = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<serde_json::Value> = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("race printed no JSON ({e}): {}", text(&o)));
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
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("bench micro printed no JSON ({e}): {}", text(&o)));
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
/// unmapped IOVA was refused with a DMA fault, and the image file on the
/// host holds exactly what the guest says it wrote (each sector zero or
/// the verify pattern of its offset; as many pattern sectors as written).
fn disk(dvma: &str, cpus: &str, iommu: &str) {
    // Removed with everything in it when the test ends, pass or fail.
    let dir = common::TempDir::new("metal-disk");
    let img = dir
        .path()
        .join(format!("{}-{cpus}-{iommu}.img", dvma.replace(',', "-")));
    let Some(o) = metal(&[
        "disk",
        "--json",
        "--dvma",
        dvma,
        "--completion",
        "all",
        "--cpus",
        cpus,
        "--iommu",
        iommu,
        "--disk-image",
        img.to_str().expect("utf-8 temp path"),
    ]) else {
        return;
    };
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("disk printed no JSON ({e}): {}", text(&o)));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(v["ok"], true, "{}", text(&o));
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4 * dvma.split(',').count(), "{}", text(&o));
    for r in runs {
        assert_eq!(r["mismatches"], 0, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["ops"], 64, "{r}");
        assert!(r["intrs"].as_u64().unwrap_or(0) > 0, "no interrupt: {r}");
    }
    assert_eq!(v["device_submitted"], v["device_completed"], "{}", text(&o));
    assert_eq!(v["unmapped_iova_refused"], true, "{}", text(&o));
    assert_eq!(v["unmapped_iova_status"], "Some(DmaFault)", "{}", text(&o));
    assert_eq!(v["iommu"], iommu, "{}", text(&o));
    if iommu == "vtd" {
        // The unit itself blocked the device's access and recorded it.
        assert!(v["vtd_faults"].as_u64().unwrap_or(0) >= 1, "{}", text(&o));
        assert!(
            v["vtd_invalidations"].as_u64().unwrap_or(0) > 0,
            "{}",
            text(&o)
        );
    }
    let seed = v["seed"].as_u64().expect("seed");
    let image = std::fs::read(&img).expect("read the image");
    let _ = std::fs::remove_file(&img);
    let mut want = [0u8; 512];
    let (mut pattern, mut other) = (0u64, Vec::new());
    for (i, sector) in image.chunks_exact(512).enumerate() {
        if sector.iter().all(|&b| b == 0) {
            continue;
        }
        kern::loadgen::fill(&mut want, seed, i as u64 * 512);
        if sector == want {
            pattern += 1;
        } else {
            other.push(i);
        }
    }
    assert!(
        other.is_empty(),
        "{} sectors of the image are neither zero nor the pattern (first {:?})",
        other.len(),
        &other[..other.len().min(8)]
    );
    assert_eq!(
        Some(pattern),
        v["sectors_written"].as_u64(),
        "pattern sectors on the host image vs written by the guest"
    );
}

#[test]
fn disk_virtio_blk_strict_lazy_slots_two_cpus() {
    disk("strict,lazy,slots", "2", "none");
}

#[test]
fn disk_virtio_blk_permanent_shadow() {
    disk("permanent,shadow", "1", "none");
}

/// Every DVMA mode x completion mode with the disk behind VT-d (QEMU's
/// intel-iommu, `iommu_platform=on`): the device's accesses are
/// translated by the unit's page tables, and an unmapped IOVA fails that
/// command alone (the runs after it pass).
#[test]
fn disk_virtio_blk_behind_vtd_strict_lazy_slots_two_cpus() {
    disk("strict,lazy,slots", "2", "vtd");
}

#[test]
fn disk_virtio_blk_behind_vtd_permanent_shadow() {
    disk("permanent,shadow", "1", "vtd");
}
