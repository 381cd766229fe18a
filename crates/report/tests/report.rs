//! Report generation into a temporary directory.

mod common;

use std::path::Path;

use common::{RR, SR, dvma, peer, results, synthetic};
use report::{ReportFiles, Results, write_report};

fn write(r: &Results) -> (tempfile::TempDir, ReportFiles, String) {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet.
    let out = dir.path().join("out");
    let files = write_report(&out, r).unwrap();
    let md = std::fs::read_to_string(&files.report_md).unwrap();
    (dir, files, md)
}

#[track_caller]
fn check_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.starts_with("<svg"),
        "{}: {}",
        path.display(),
        &text[..40.min(text.len())]
    );
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{}: not well-formed XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
}

/// The markdown lines that contain all of `parts`.
fn lines_with<'a>(md: &'a str, parts: &[&str]) -> Vec<&'a str> {
    md.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .collect()
}

#[test]
fn writes_results_markdown_and_plots() {
    let r = synthetic();
    let (_dir, files, md) = write(&r);
    let out = files.report_md.parent().unwrap();
    assert_eq!(files.results_json, out.join("results.json"));
    assert_eq!(files.report_md, out.join("report.md"));
    let expected: Vec<_> = [RR, SR]
        .iter()
        .flat_map(|w| {
            [
                out.join("plots").join(format!("{w}.svg")),
                out.join("plots").join(format!("cdf-{w}.svg")),
            ]
        })
        .collect();
    assert_eq!(files.plots, expected);
    for p in &files.plots {
        check_svg(p);
        // Linked from the report.
        let rel = p.strip_prefix(out).unwrap().to_str().unwrap();
        assert!(md.contains(&format!("]({rel})")), "{rel} not linked");
    }
    // results.json is the Results.
    let back = Results::load(&files.results_json).unwrap();
    assert!(back == r, "results.json does not round-trip");

    // Bar chart: one label per configuration and peer. CDF: a legend with
    // the best dvma configuration and both peers.
    let bars = std::fs::read_to_string(&files.plots[0]).unwrap();
    for label in [
        "lazy/softint spl=mask",
        "strict/thread",
        "nbdkit",
        "qemu-nbd",
    ] {
        assert!(bars.contains(label), "bar chart lacks {label}");
    }
    let cdf = std::fs::read_to_string(&files.plots[1]).unwrap();
    for label in ["dvma lazy/softint cpus=2", "nbdkit", "qemu-nbd"] {
        assert!(cdf.contains(label), "CDF lacks {label}");
    }
    assert!(cdf.contains("<polyline"), "CDF has no line");
}

#[test]
fn headline_table_has_best_config_and_ratios() {
    let (_dir, _files, md) = write(&synthetic());
    assert!(md.contains("## Headline"));
    assert!(md.contains(
        "| workload | metric | best dvma configuration | value | vs nbdkit | vs qemu-nbd |"
    ));
    // Best on randread: cpus=2 at 78,000 IOPS; 1.95× nbdkit (per-rep 1.90–2.00),
    // 3.00× qemu-nbd.
    assert!(
        md.contains(
            "| randread-4k-qd1 | IOPS | `lazy/softint cpus=2` | 78,000 | 1.95× [1.90–2.00] | 3.00× |"
        ),
        "{md}"
    );
    // seqread: slots/intr at 1500 MiB/s; 1.50× nbdkit (per-rep 1490/990 …
    // 1510/1010), 1.25× qemu-nbd (1490/1200 … 1510/1200).
    assert!(
        md.contains(
            "| seqread-1m-qd8 | MiB/s | `slots/intr` | 1500.0 | 1.50× [1.50–1.51] | 1.25× [1.24–1.26] |"
        ),
        "{md}"
    );
}

#[test]
fn matrix_breakdown_and_secondary_tables() {
    let (_dir, _files, md) = write(&synthetic());
    // Matrix at the primary secondary-axis values.
    assert!(md.contains("IOPS · ratio to nbdkit [min–max over repetitions], by DVMA mode (rows) and completion mode (columns) at spl=lazy, intr stack=on, CPUs=1:"));
    assert!(md.contains("| DVMA mode \\ completion | intr | softint | thread | ast |"));
    let strict = lines_with(&md, &["| strict |", "30,000 · 0.75×"]);
    assert_eq!(strict.len(), 1, "{md}");
    assert!(
        strict[0].ends_with("| — | — | 30,000 · 0.75× [0.74–0.76] | — |"),
        "{}",
        strict[0]
    );
    // lazy/intr is noisy: 40k/39k … 60k/41k, flagged.
    let lazy = lines_with(
        &md,
        &["| lazy |", "50,000 (⚠ spread 40%) · 1.25× [1.03–1.46] ⚠"],
    );
    assert_eq!(lazy.len(), 1, "{md}");
    assert!(
        lazy[0].contains("| 52,000 · 1.30× [1.29–1.31] |"),
        "{}",
        lazy[0]
    );
    for mode in ["| slots |", "| permanent |", "| shadow |"] {
        assert!(md.contains(mode));
    }
    // Per-I/O breakdown row.
    assert!(
        md.contains("| `strict/thread` | 30,000 | 1.00 | 0.10 | 0.50 | 2.00 | 0.25 | 0.00 | 5.00 | 33.3 | 100 | 64 |"),
        "{md}"
    );
    // Secondary axes.
    assert!(md.contains("## Secondary axes"));
    assert!(md.contains("| workload | configuration | spl=lazy | spl=mask | mask / lazy |"));
    assert!(
        md.contains("| randread-4k-qd1 | `lazy/softint` | 52,000 | 26,000 | 0.50× [0.49–0.51] |"),
        "{md}"
    );
    assert!(md.contains("| CPUs=1 | CPUs=2 | 2 / 1 |"));
    assert!(md.contains("| intr stack=on | intr stack=off | off / on |"));
    // Peers table.
    assert!(
        md.contains("| nbdkit | 40,000 | 3 | 25.0 | 75.0 | 5.00 |"),
        "{md}"
    );
}

#[test]
fn reading_is_generated_from_the_data() {
    let (_dir, _files, md) = write(&synthetic());
    let reading = md
        .split("## Reading")
        .nth(1)
        .unwrap()
        .split("## Headline")
        .next()
        .unwrap();
    // Winner and margin.
    assert!(
        reading.contains("**randread-4k-qd1**: the best dvma configuration is `lazy/softint cpus=2` at 78,000 IOPS, 1.95× [1.90–2.00] nbdkit (40,000 IOPS), 3.00× qemu-nbd (26,000 IOPS); 44.2% ahead of the runner-up `lazy/softint intr-stack=off` (54,080)"),
        "{reading}"
    );
    assert!(
        reading.contains("**seqread-1m-qd8**: the best dvma configuration is `slots/intr"),
        "{reading}"
    );
    // Below nbdkit: 2 of 7 on randread, with the per-I/O breakdown.
    let below = lines_with(
        reading,
        &["Below nbdkit on **randread-4k-qd1**: 2 of 7 dvma configurations."],
    );
    assert_eq!(below.len(), 1, "{reading}");
    assert!(
        below[0].contains("`lazy/softint spl=mask` 0.65×"),
        "{}",
        below[0]
    );
    assert!(below[0].contains("per I/O 1.00 interrupts (0.10 host signals), 0.50 softints, 2.00 context switches, 0.25 ASTs, 0.00 IOMMU faults, 5.00 µs CPU"), "{}", below[0]);
    assert!(!below[0].contains("including the best one"));
    assert!(lines_with(reading, &["Below nbdkit on **seqread-1m-qd8**"]).is_empty());
    // Secondary axes, summarized.
    assert!(
        reading
            .contains("spl mask vs lazy: median ratio 0.50× over 1 configuration/workload pair."),
        "{reading}"
    );
    // Spread: lazy/intr disagrees with itself and so do its ratios.
    assert!(
        reading.contains("ratios to peers disagree by more than 10% across repetitions ⚠"),
        "{reading}"
    );
    assert!(
        reading.contains("`lazy/intr` vs nbdkit on randread-4k-qd1 (1.03–1.46×, 35%)"),
        "{reading}"
    );
    // And the spread section lists it.
    let spread = md.split("## Run-to-run spread").nth(1).unwrap();
    assert!(
        spread.contains("| randread-4k-qd1 | `lazy/intr` | 3 | 40,000 | 50,000 | 60,000 | 40% |"),
        "{spread}"
    );
    assert!(spread.starts_with("\n\n1 of 13 repeated"), "{spread}");
}

#[test]
fn best_config_below_nbdkit_is_called_out() {
    let r = results(vec![
        dvma("lazy", "intr", RR, 0, 900.0),
        peer("nbdkit", RR, 0, 1000.0),
        dvma("strict", "intr", RR, 0, 500.0),
    ]);
    let (_dir, _files, md) = write(&r);
    assert!(
        md.contains("| randread-4k-qd1 | IOPS | `lazy/intr` | 900 | 0.90× |"),
        "{md}"
    );
    assert!(
        md.contains("Below nbdkit on **randread-4k-qd1**: 2 of 2 dvma configurations — including the best one, so dvma loses this workload."),
        "{md}"
    );
    assert!(md.contains("Each configuration ran once"), "{md}");
    assert!(md.contains("Every configuration ran once: the spread was not measured."));
}

#[test]
fn missing_peer_still_produces_a_report_that_says_so() {
    let r = results(vec![
        dvma("lazy", "intr", RR, 0, 30.0),
        peer("qemu-nbd", RR, 0, 20.0),
        dvma("lazy", "intr", RR, 1, 32.0),
        peer("qemu-nbd", RR, 1, 20.0),
    ]);
    let (_dir, files, md) = write(&r);
    assert!(files.plots.iter().all(|p| p.exists()));
    for p in &files.plots {
        check_svg(p);
    }
    assert!(
        md.contains("- Peer nbdkit: **missing** — no nbdkit runs in these results"),
        "{md}"
    );
    assert!(md.contains("- Peer qemu-nbd: 2 runs"));
    assert!(
        md.contains("Peer nbdkit is missing: no nbdkit runs"),
        "{md}"
    );
    assert!(
        md.contains("| randread-4k-qd1 | IOPS | `lazy/intr` | 31 | n/a (nbdkit missing) | 1.55× [1.50–1.60] |"),
        "{md}"
    );
    assert!(md.contains("| nbdkit | missing (no nbdkit runs) | 0 | — | — | — |"));
    assert!(!md.contains("Below nbdkit"));
}

#[test]
fn machine_facts_that_could_not_be_read_say_unknown() {
    let mut r = results(vec![dvma("lazy", "intr", RR, 0, 30.0)]);
    r.machine.tcp_congestion.clear();
    r.machine.cpu_idle.clear();
    let (_dir, _files, md) = write(&r);
    assert!(
        md.contains(
            "- Machine: Test CPU (2 CPUs), kernel 6.1.0-test, TCP congestion control unknown, CPU idle unknown"
        ),
        "{md}"
    );
}

#[test]
fn no_peers_and_no_dvma_runs_render() {
    // Only a peer ran: no best configuration, no CDF data for dvma.
    let (_dir, files, md) = write(&results(vec![peer("nbdkit", SR, 0, 100.0)]));
    assert!(
        md.contains("| seqread-1m-qd8 | MiB/s | no dvma runs | — | — | — |"),
        "{md}"
    );
    assert!(md.contains("No dvma runs for this workload."));
    for p in &files.plots {
        check_svg(p);
    }
    // Nothing at all.
    let (_dir, files, md) = write(&results(Vec::new()));
    assert!(files.plots.is_empty());
    assert!(md.contains("- Peer nbdkit: **missing**"));
    assert!(md.contains("- Peer qemu-nbd: **missing**"));
}

#[test]
fn micro_protection_and_header_sections() {
    let mut r = synthetic();
    r.quick = true;
    r.micro = Some(serde_json::json!({
        "spl": {"lazy": {"splbio_ns": 2.5, "spl0_ns": 3.0}, "mask": {"splbio_ns": 40.25, "spl0_ns": 41.0}},
        "dvma_map_ns": {"strict": 812.0, "permanent": 12.5},
        "iterations": 1000000
    }));
    r.protections = vec![
        (
            "strict".to_string(),
            "unmapped after every transfer".to_string(),
        ),
        (
            "permanent".to_string(),
            "none: all memory mapped".to_string(),
        ),
    ];
    let (_dir, _files, md) = write(&r);
    assert!(
        md.contains(
            "- Machine: Test CPU (2 CPUs), kernel 6.1.0-test, TCP congestion control `bbr`, CPU idle `haltpoll, guest_halt_poll_ns 0`"
        )
    );
    assert!(md.contains("**quick run**"));
    assert!(
        md.contains(
            "- 39 fio runs: 2 workloads, 13 (configuration, workload) pairs, 3 repetitions each"
        ),
        "{md}"
    );
    let micro = md.split("## Micro-benchmarks").nth(1).unwrap();
    assert!(micro.contains("| iterations | 1,000,000 |"), "{micro}");
    assert!(micro.contains("### spl"));
    assert!(micro.contains("| | splbio_ns | spl0_ns |"), "{micro}");
    assert!(micro.contains("| mask | 40.25 | 41 |"), "{micro}");
    assert!(micro.contains("| strict | 812 |"), "{micro}");
    let prot = md.split("## Protection by DVMA mode").nth(1).unwrap();
    assert!(
        prot.contains(
            "| strict | unmapped after every transfer |\n| permanent | none: all memory mapped |"
        ),
        "{prot}"
    );

    // Without the table, the runs' own protection field is used.
    let mut r = synthetic();
    for run in &mut r.runs {
        if run.dvma_mode.as_deref() == Some("slots") {
            run.protection = Some("slot-sized windows".to_string());
        }
    }
    let (_dir, _files, md) = write(&r);
    assert!(md.contains("| slots | slot-sized windows |"), "{md}");
    assert!(md.contains("No micro-benchmark results in this run."));
}
