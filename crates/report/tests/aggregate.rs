//! Aggregation and ratio math on hand-built runs.

mod common;

use common::{RR, SR, dvma, peer, results, synthetic};
use report::{Axis, ConfigKey, Metric, Ratio, Results, aggregate, analyze};

#[track_caller]
fn close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
        "{actual} != {expected}"
    );
}

#[test]
fn interleaved_runs_group_by_config_and_workload() {
    // A, B, A, B, A, B.
    let runs = vec![
        dvma("lazy", "intr", RR, 0, 100.0),
        peer("nbdkit", RR, 0, 50.0),
        dvma("lazy", "intr", RR, 1, 110.0),
        peer("nbdkit", RR, 1, 50.0),
        dvma("lazy", "intr", RR, 2, 90.0),
        peer("nbdkit", RR, 2, 60.0),
    ];
    let aggs = aggregate(&runs);
    assert_eq!(aggs.len(), 2);
    let (a, b) = (&aggs[0], &aggs[1]);
    assert_eq!(a.key.label(), "lazy/intr spl=lazy intr-stack=on cpus=1");
    assert_eq!(b.key.label(), "nbdkit");
    assert_eq!(a.metric, Metric::Iops);
    assert_eq!(
        (a.iops.median, a.iops.min, a.iops.max, a.iops.n),
        (100.0, 90.0, 110.0, 3)
    );
    close(a.iops.rel_spread(), 0.2);
    assert!(a.iops.disagrees());
    assert_eq!((b.iops.median, b.iops.min, b.iops.max), (50.0, 50.0, 60.0));
    // The CDF is the median run's (100 IOPS → p50 10,000 µs).
    assert_eq!(a.latency_cdf[1], (10_000.0, 0.5));
    assert_eq!(a.per_io.unwrap().ctx_switches, 2.0);

    // Paired by repetition: 100/50, 110/50, 90/60.
    let r = Ratio::between(a, b).unwrap();
    close(r.value, 2.0);
    close(r.min, 1.5);
    close(r.max, 2.2);
    assert_eq!(r.paired_reps, 3);
    close(r.rel_spread(), 0.35);
    assert!(r.disagrees());
}

#[test]
fn unpaired_repetitions_use_conservative_bounds() {
    let runs = vec![
        dvma("lazy", "intr", RR, 0, 100.0),
        dvma("lazy", "intr", RR, 1, 120.0),
        peer("nbdkit", RR, 5, 40.0),
        peer("nbdkit", RR, 6, 50.0),
    ];
    let aggs = aggregate(&runs);
    // Even count: mean of the two middle values.
    close(aggs[0].iops.median, 110.0);
    close(aggs[1].iops.median, 45.0);
    let r = Ratio::between(&aggs[0], &aggs[1]).unwrap();
    close(r.value, 110.0 / 45.0);
    close(r.min, 100.0 / 50.0);
    close(r.max, 120.0 / 40.0);
    assert_eq!(r.paired_reps, 0);
}

#[test]
fn agreeing_repetitions_are_not_flagged() {
    let runs = vec![
        dvma("lazy", "intr", RR, 0, 100.0),
        peer("nbdkit", RR, 0, 80.0),
        dvma("lazy", "intr", RR, 1, 104.0),
        peer("nbdkit", RR, 1, 82.0),
    ];
    let aggs = aggregate(&runs);
    let r = Ratio::between(&aggs[0], &aggs[1]).unwrap();
    // 100/80 = 1.25, 104/82 = 1.268: 1.4% apart.
    close(r.value, 102.0 / 81.0);
    assert!(!r.disagrees());
    assert!(!aggs[0].iops.disagrees());
    // A zero baseline has no ratio.
    let zero = aggregate(&[peer("nbdkit", RR, 0, 0.0)]);
    assert!(Ratio::between(&aggs[0], &zero[0]).is_none());
}

#[test]
fn large_block_workloads_compare_mib_s() {
    let mut a = dvma("slots", "intr", SR, 0, 0.0);
    a.iops = 1.0;
    a.mib_s = 900.0;
    let mut b = peer("nbdkit", SR, 0, 0.0);
    b.iops = 1000.0;
    b.mib_s = 600.0;
    let aggs = aggregate(&[a, b]);
    assert_eq!(aggs[0].metric, Metric::MibS);
    assert_eq!(aggs[0].value().median, 900.0);
    close(Ratio::between(&aggs[0], &aggs[1]).unwrap().value, 1.5);
}

#[test]
fn headline_picks_the_best_dvma_config_and_its_ratios() {
    let a = analyze(&synthetic());
    assert_eq!(
        a.workloads
            .iter()
            .map(|w| w.workload.as_str())
            .collect::<Vec<_>>(),
        [RR, SR]
    );
    let h = a.headline();
    assert_eq!(h.len(), 2);
    // cpus=2 at 78,000 is the best of all dvma configurations on randread.
    let best = h[0].best.as_ref().unwrap();
    assert_eq!(best.label(), "lazy/softint spl=lazy intr-stack=on cpus=2");
    close(h[0].value.unwrap().median, 78_000.0);
    assert_eq!(h[0].ratios[0].0, "nbdkit");
    let r = h[0].ratios[0].1.unwrap();
    close(r.value, 78_000.0 / 40_000.0);
    // Per repetition: 78/39, 78/40, 78/41.
    close(r.min, 78.0 / 41.0);
    close(r.max, 2.0);
    assert_eq!(h[0].ratios[1].0, "qemu-nbd");
    close(h[0].ratios[1].1.unwrap().value, 3.0);

    assert_eq!(h[1].metric, Metric::MibS);
    assert_eq!(
        h[1].best.as_ref().unwrap().label(),
        "slots/intr spl=lazy intr-stack=on cpus=1"
    );
    close(h[1].ratios[0].1.unwrap().value, 1.5);
    close(h[1].ratios[1].1.unwrap().value, 1.25);
    assert!(a.missing_peers().is_empty());
}

#[test]
fn primary_axes_and_matrix_cells() {
    let a = analyze(&synthetic());
    assert_eq!(a.primary_value(Axis::Spl), Some("lazy"));
    assert_eq!(a.primary_value(Axis::IntrStack), Some("on"));
    assert_eq!(a.primary_value(Axis::Cpus), Some("1"));
    let w = &a.workloads[0];
    // The matrix cell of lazy/softint is the primary-axes one, not cpus=2.
    let cell = w.cell("lazy", "softint").unwrap();
    close(cell.iops.median, 52_000.0);
    close(w.ratio_to(cell, "nbdkit").unwrap().value, 1.3);
    assert!(w.cell("shadow", "ast").is_none());
    let ranked: Vec<f64> = w.ranked_dvma().iter().map(|x| x.iops.median).collect();
    assert_eq!(
        ranked,
        [
            78_000.0, 54_080.0, 52_000.0, 50_000.0, 45_000.0, 30_000.0, 26_000.0
        ]
    );
}

#[test]
fn axis_groups_pair_configs_differing_in_one_axis() {
    let a = analyze(&synthetic());
    let w = &a.workloads[0];
    let spl = w.axis_groups(Axis::Spl);
    assert_eq!(spl.len(), 1);
    assert_eq!(spl[0].label, "lazy/softint");
    let vals: Vec<(&str, f64)> = spl[0]
        .members
        .iter()
        .map(|(v, x)| (v.as_str(), x.iops.median))
        .collect();
    assert_eq!(vals, [("lazy", 52_000.0), ("mask", 26_000.0)]);
    let cpus = w.axis_groups(Axis::Cpus);
    assert_eq!(cpus.len(), 1);
    assert_eq!(cpus[0].members[1].0, "2");
    let stack = w.axis_groups(Axis::IntrStack);
    assert_eq!(stack[0].members[0].0, "on");
    assert_eq!(stack[0].members[1].0, "off");
    // The seqread workload has no secondary-axis runs.
    assert!(a.workloads[1].axis_groups(Axis::Spl).is_empty());
}

#[test]
fn peer_baseline_is_the_peer_at_its_best() {
    let mut slow = peer("nbdkit", RR, 0, 10.0);
    slow.cpus = Some(1);
    let mut fast = peer("nbdkit", RR, 0, 20.0);
    fast.cpus = Some(4);
    let r = results(vec![dvma("lazy", "intr", RR, 0, 30.0), slow, fast]);
    let a = analyze(&r);
    let w = &a.workloads[0];
    assert_eq!(w.peer("nbdkit").unwrap().key.cpus, Some(4));
    close(
        w.ratio_to(w.best_dvma().unwrap(), "nbdkit").unwrap().value,
        1.5,
    );
}

#[test]
fn missing_peer_is_reported_and_has_no_ratio() {
    let r = results(vec![
        dvma("lazy", "intr", RR, 0, 30.0),
        peer("qemu-nbd", RR, 0, 20.0),
    ]);
    let a = analyze(&r);
    assert_eq!(a.missing_peers(), ["nbdkit"]);
    let h = a.headline();
    assert_eq!(h[0].ratios[0], ("nbdkit".to_string(), None));
    close(h[0].ratios[1].1.unwrap().value, 1.5);
}

#[test]
fn display_order_puts_dvma_modes_in_report_order_then_peers() {
    let runs = vec![
        peer("qemu-nbd", RR, 0, 1.0),
        dvma("shadow", "intr", RR, 0, 1.0),
        peer("nbdkit", RR, 0, 1.0),
        dvma("strict", "ast", RR, 0, 1.0),
        dvma("strict", "intr", RR, 0, 1.0),
        dvma("lazy", "thread", RR, 0, 1.0),
    ];
    let labels: Vec<String> = aggregate(&runs)
        .iter()
        .map(|a| {
            let k: &ConfigKey = &a.key;
            match (&k.dvma_mode, &k.completion) {
                (Some(m), Some(c)) => format!("{m}/{c}"),
                _ => k.server.clone(),
            }
        })
        .collect();
    assert_eq!(
        labels,
        [
            "strict/intr",
            "strict/ast",
            "lazy/thread",
            "shadow/intr",
            "nbdkit",
            "qemu-nbd"
        ]
    );
}

#[test]
fn results_json_has_the_contract_keys_and_round_trips() {
    let r = synthetic();
    let json = r.to_json().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let run = &v["runs"][0];
    for key in [
        "server",
        "dvma_mode",
        "completion",
        "spl",
        "intr_stack",
        "cpus",
        "workload",
        "rep",
        "iops",
        "mib_s",
        "p50_us",
        "p99_us",
        "cpu_us_per_io",
        "latency_cdf",
        "per_io",
        "dvma_pages_held",
        "protection",
    ] {
        assert!(run.get(key).is_some(), "runs[0] lacks {key}");
    }
    assert_eq!(run["server"], "dvma");
    assert_eq!(
        run["latency_cdf"][1],
        serde_json::json!([1e6 / 51_000.0, 0.5])
    );
    assert_eq!(run["per_io"]["ctx_switches"], 2.0);
    // Peers have null dvma fields, still present.
    assert!(v["runs"][1]["dvma_mode"].is_null());
    for key in [
        "runs",
        "micro",
        "machine",
        "duration_s",
        "quick",
        "protections",
    ] {
        assert!(v.get(key).is_some(), "results lacks {key}");
    }
    for key in [
        "cpus",
        "model",
        "kernel",
        "tcp_congestion",
        "cpu_idle",
        "date",
    ] {
        assert!(v["machine"].get(key).is_some(), "machine lacks {key}");
    }
    // Exact round trip, floats included.
    assert!(
        Results::from_json(&json).unwrap() == r,
        "round trip differs"
    );
    // Optional fields may be left out by a writer.
    let minimal = r#"{"runs":[{"server":"nbdkit","workload":"w","rep":0,"iops":1.0,
        "mib_s":1.0,"p50_us":1.0,"p99_us":2.0,"cpu_us_per_io":3.0}],
        "machine":{"cpus":1,"model":"m","kernel":"k","date":"d"},"duration_s":1.0}"#;
    let m = Results::from_json(minimal).unwrap();
    assert_eq!(m.runs[0].dvma_mode, None);
    assert!(m.runs[0].latency_cdf.is_empty());
    assert!(!m.quick);
    assert!(m.machine.cpu_idle.is_empty() && m.machine.tcp_congestion.is_empty());
}
