//! Hand-built runs for the aggregation and report tests.
#![allow(dead_code)]

use report::{MachineInfo, PerIo, Results, Run};

/// A run with the given figures; p50/p99/CPU derived from `value` so that
/// they differ between configurations.
pub fn run(
    server: &str,
    mode: Option<&str>,
    completion: Option<&str>,
    workload: &str,
    rep: u32,
    value: f64,
) -> Run {
    let big = workload.contains("1m");
    Run {
        server: server.to_string(),
        dvma_mode: mode.map(str::to_string),
        completion: completion.map(str::to_string),
        spl: None,
        intr_stack: None,
        cpus: None,
        workload: workload.to_string(),
        rep,
        iops: value,
        // 1M workloads: the value is MiB/s and IOPS is the same number; 4k
        // workloads: MiB/s = IOPS / 256.
        mib_s: if big { value } else { value / 256.0 },
        p50_us: 1e6 / value,
        p99_us: 3e6 / value,
        cpu_us_per_io: 5.0,
        latency_cdf: vec![(0.5e6 / value, 0.0), (1e6 / value, 0.5), (4e6 / value, 1.0)],
        per_io: mode.map(|_| PerIo {
            interrupts: 1.0,
            signals: 0.1,
            softints: 0.5,
            ctx_switches: 2.0,
            asts: 0.25,
            iommu_faults: 0.0,
        }),
        dvma_pages_held: mode.map(|_| 64),
        protection: None,
    }
}

pub fn dvma(mode: &str, completion: &str, workload: &str, rep: u32, value: f64) -> Run {
    let mut r = run("dvma", Some(mode), Some(completion), workload, rep, value);
    r.spl = Some("lazy".to_string());
    r.intr_stack = Some(true);
    r.cpus = Some(1);
    r
}

pub fn peer(server: &str, workload: &str, rep: u32, value: f64) -> Run {
    run(server, None, None, workload, rep, value)
}

pub fn results(runs: Vec<Run>) -> Results {
    Results {
        runs,
        micro: None,
        machine: MachineInfo {
            cpus: 2,
            model: "Test CPU".to_string(),
            kernel: "6.1.0-test".to_string(),
            tcp_congestion: "bbr".to_string(),
            cpu_idle: "haltpoll, guest_halt_poll_ns 0".to_string(),
            date: "2026-01-02T03:04:05Z".to_string(),
        },
        duration_s: 123.0,
        quick: false,
        protections: Vec::new(),
        kernel: None,
    }
}

pub const RR: &str = "randread-4k-qd1";
pub const SR: &str = "seqread-1m-qd8";

/// A full synthetic benchmark, interleaved A, B, A, B over 3 repetitions:
///
/// - randread-4k-qd1 (IOPS): lazy/softint is best at 52,000 (reps 51,000,
///   52,000, 53,000); nbdkit 40,000 (39,000, 40,000, 41,000) → 1.30×;
///   qemu-nbd 26,000 → 2.00×. strict/thread is below nbdkit at 30,000
///   (0.75×). lazy/intr is noisy (40,000, 50,000, 60,000).
/// - seqread-1m-qd8 (MiB/s): slots/intr is best at 1,500 MiB/s; nbdkit 1,000
///   → 1.50×; qemu-nbd 1,200 → 1.25×.
/// - secondary axes on lazy/softint randread: spl=mask (26,000, 0.50×),
///   cpus=2 (78,000, 1.50×), intr stack off (52,000 ×1.04 = 54,080).
pub fn synthetic() -> Results {
    let mut runs = Vec::new();
    for rep in 0..3u32 {
        let d = rep as f64 - 1.0; // -1, 0, +1
        // randread-4k-qd1
        runs.push(dvma("lazy", "softint", RR, rep, 52_000.0 + 1000.0 * d));
        runs.push(peer("nbdkit", RR, rep, 40_000.0 + 1000.0 * d));
        runs.push(dvma("strict", "thread", RR, rep, 30_000.0 + 300.0 * d));
        runs.push(peer("qemu-nbd", RR, rep, 26_000.0));
        runs.push(dvma("lazy", "intr", RR, rep, 50_000.0 + 10_000.0 * d));
        runs.push(dvma("permanent", "ast", RR, rep, 45_000.0));
        let mut mask = dvma("lazy", "softint", RR, rep, 26_000.0);
        mask.spl = Some("mask".to_string());
        runs.push(mask);
        let mut two = dvma("lazy", "softint", RR, rep, 78_000.0);
        two.cpus = Some(2);
        runs.push(two);
        let mut off = dvma("lazy", "softint", RR, rep, 54_080.0);
        off.intr_stack = Some(false);
        runs.push(off);
        // seqread-1m-qd8
        runs.push(dvma("slots", "intr", SR, rep, 1500.0 + 10.0 * d));
        runs.push(peer("nbdkit", SR, rep, 1000.0 + 10.0 * d));
        runs.push(dvma("shadow", "softint", SR, rep, 1100.0));
        runs.push(peer("qemu-nbd", SR, rep, 1200.0));
    }
    results(runs)
}
