//! `report.md`.

use serde_json::Value;

use crate::aggregate::{
    Aggregate, Analysis, Axis, AxisGroup, RATIO_SPREAD_LIMIT, Ratio, WorkloadAnalysis, thousands,
};
use crate::model::{COMPLETION_MODES, DVMA_MODES, PEERS, Results};

/// Appends a formatted line.
macro_rules! line {
    ($out:expr) => { $out.push('\n') };
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

/// The peer ratios in the headline and the reading are relative to this
/// one (the first of [`PEERS`]).
const BASELINE: &str = PEERS[0];

/// How many entries a list in the reading shows before "and N more".
const LIST_MAX: usize = 8;

/// The file name stem used for a workload's plots.
pub(crate) fn file_stem(workload: &str) -> String {
    let s: String = workload
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("w{s}")
    } else {
        s
    }
}

/// Text for a Markdown table cell: `|` escaped, line breaks folded.
pub fn esc(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn code(s: &str) -> String {
    format!("`{}`", s.replace('`', "'"))
}

fn ratio_text(r: &Ratio) -> String {
    let mut s = format!("{:.2}×", r.value);
    let (lo, hi) = (format!("{:.2}", r.min), format!("{:.2}", r.max));
    if lo != hi {
        s.push_str(&format!(" [{lo}–{hi}]"));
    }
    if r.disagrees() {
        s.push_str(" ⚠");
    }
    s
}

fn value_text(a: &Aggregate) -> String {
    let v = a.value();
    let mut s = a.metric.format(v.median);
    if v.disagrees() {
        s.push_str(&format!(" (⚠ spread {})", pct(v.rel_spread())));
    }
    s
}

/// Microseconds as a table shows them: three significant figures at most
/// (`123`, `12.3`, `1.23`).
pub fn us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// Renders `report.md` (plots are linked as `plots/<workload>.svg` and
/// `plots/cdf-<workload>.svg`, as [`crate::write_report`] writes them).
pub fn render_markdown(results: &Results, analysis: &Analysis) -> String {
    let mut out = String::new();
    line!(out, "# dvma bench report");
    line!(out);
    header(&mut out, results, analysis);
    line!(out, "## Reading");
    line!(out);
    for b in reading(analysis) {
        line!(out, "- {b}");
    }
    line!(out);
    headline(&mut out, analysis);
    for w in &analysis.workloads {
        workload_section(&mut out, analysis, w);
    }
    secondary_axes(&mut out, analysis);
    protection(&mut out, results, analysis);
    line!(out, "## Micro-benchmarks");
    line!(out);
    match &results.micro {
        Some(v) => out.push_str(&render_micro(v)),
        None => line!(out, "No micro-benchmark results in this run."),
    }
    line!(out);
    spread_section(&mut out, analysis);
    out
}

/// A machine fact as code, or "unknown" when it could not be read.
fn fact(s: &str) -> String {
    if s.is_empty() {
        "unknown".to_string()
    } else {
        format!("`{}`", esc(s))
    }
}

fn header(out: &mut String, results: &Results, analysis: &Analysis) {
    let m = &results.machine;
    line!(out, "- Date: {}", esc(&m.date));
    line!(
        out,
        "- Machine: {} ({} CPUs), kernel {}, TCP congestion control {}, CPU idle {}",
        esc(&m.model),
        m.cpus,
        esc(&m.kernel),
        fact(&m.tcp_congestion),
        fact(&m.cpu_idle)
    );
    line!(
        out,
        "- Duration: {:.0} s{}",
        results.duration_s,
        if results.quick {
            " — **quick run** (fewer repetitions and shorter runs: figures are indicative)"
        } else {
            ""
        }
    );
    let n_aggs: usize = analysis.workloads.iter().map(|w| w.aggregates.len()).sum();
    let reps: Vec<usize> = analysis
        .workloads
        .iter()
        .flat_map(|w| w.aggregates.iter().map(|a| a.reps.len()))
        .collect();
    let (rmin, rmax) = (
        reps.iter().copied().min().unwrap_or(0),
        reps.iter().copied().max().unwrap_or(0),
    );
    line!(
        out,
        "- {} fio runs: {} workloads, {} (configuration, workload) pairs, {} repetitions each",
        results.runs.len(),
        analysis.workloads.len(),
        n_aggs,
        if rmin == rmax {
            rmin.to_string()
        } else {
            format!("{rmin}–{rmax}")
        }
    );
    for p in &analysis.peers {
        if p.runs == 0 {
            line!(
                out,
                "- Peer {}: **missing** — no {} runs in these results; ratios to {} are not available",
                p.server,
                p.server,
                p.server
            );
        } else {
            line!(out, "- Peer {}: {} runs", p.server, p.runs);
        }
    }
    line!(
        out,
        "- Values are medians over repetitions; ratios are dvma / peer (the peer at its best configuration); ⚠ marks repetitions that disagree by more than {:.0}%.",
        RATIO_SPREAD_LIMIT * 100.0
    );
    line!(out);
}

fn ratio_cell(w: &WorkloadAnalysis, a: &Aggregate, peer: &str, missing: &[&str]) -> String {
    match w.ratio_to(a, peer) {
        Some(r) => ratio_text(&r),
        None if missing.contains(&peer) => format!("n/a ({peer} missing)"),
        None => format!("n/a (no {peer} run)"),
    }
}

fn headline(out: &mut String, analysis: &Analysis) {
    let missing = analysis.missing_peers();
    line!(out, "## Headline");
    line!(out);
    let mut head = "| workload | metric | best dvma configuration | value |".to_string();
    let mut sep = "|---|---|---|---:|".to_string();
    for p in PEERS {
        head.push_str(&format!(" vs {p} |"));
        sep.push_str("---:|");
    }
    line!(out, "{head}");
    line!(out, "{sep}");
    for (row, w) in analysis.headline().iter().zip(&analysis.workloads) {
        let Some(best) = w.best_dvma() else {
            line!(
                out,
                "| {} | {} | no dvma runs | — |{}",
                esc(&row.workload),
                row.metric.unit(),
                " — |".repeat(PEERS.len())
            );
            continue;
        };
        let mut cells = String::new();
        for p in PEERS {
            cells.push_str(&format!(" {} |", ratio_cell(w, best, p, &missing)));
        }
        line!(
            out,
            "| {} | {} | {} | {} |{}",
            esc(&row.workload),
            row.metric.unit(),
            code(&w.label(&best.key)),
            value_text(best),
            cells
        );
    }
    line!(out);
}

fn workload_section(out: &mut String, analysis: &Analysis, w: &WorkloadAnalysis) {
    let missing = analysis.missing_peers();
    let stem = file_stem(&w.workload);
    let unit = w.metric.unit();
    line!(out, "## Workload {}", esc(&w.workload));
    line!(out);
    line!(
        out,
        "![{unit} of {0} by configuration](plots/{stem}.svg)",
        esc(&w.workload)
    );
    line!(
        out,
        "![latency CDF of {0}](plots/cdf-{stem}.svg)",
        esc(&w.workload)
    );
    line!(out);

    // The full matrix.
    let best = w.best_dvma().map(|b| b.key.clone());
    if best.is_some() {
        let primary: Vec<String> = analysis
            .primary
            .iter()
            .filter_map(|(axis, v)| v.as_ref().map(|v| format!("{}={v}", axis.name())))
            .collect();
        line!(
            out,
            "{unit} · ratio to {BASELINE} [min–max over repetitions], by DVMA mode (rows) and completion mode (columns){}{}:",
            if primary.is_empty() { "" } else { " at " },
            primary.join(", ")
        );
        line!(out);
        let modes = ordered(
            &DVMA_MODES,
            w.dvma().filter_map(|a| a.key.dvma_mode.clone()),
        );
        let comps = ordered(
            &COMPLETION_MODES,
            w.dvma().filter_map(|a| a.key.completion.clone()),
        );
        let mut head = "| DVMA mode \\ completion |".to_string();
        let mut sep = "|---|".to_string();
        for c in &comps {
            head.push_str(&format!(" {} |", esc(c)));
            sep.push_str("---:|");
        }
        line!(out, "{head}");
        line!(out, "{sep}");
        for m in &modes {
            let mut row = format!("| {} |", esc(m));
            for c in &comps {
                let cell = match w.cell(m, c) {
                    None => "—".to_string(),
                    Some(a) => {
                        let ratio = match w.ratio_to(a, BASELINE) {
                            Some(r) => format!(" · {}", ratio_text(&r)),
                            None => String::new(),
                        };
                        let v = format!("{}{ratio}", value_text(a));
                        if Some(&a.key) == best.as_ref() {
                            format!("**{v}**")
                        } else {
                            v
                        }
                    }
                };
                row.push_str(&format!(" {cell} |"));
            }
            line!(out, "{row}");
        }
        line!(out);
    } else {
        line!(out, "No dvma runs for this workload.");
        line!(out);
    }

    // Peers.
    line!(out, "Peers:");
    line!(out);
    line!(
        out,
        "| server | {unit} | runs | p50 µs | p99 µs | server CPU µs/I/O |"
    );
    line!(out, "|---|---:|---:|---:|---:|---:|");
    for p in PEERS {
        match w.peer(p) {
            Some(a) => line!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                esc(&w.label(&a.key)),
                value_text(a),
                a.reps.len(),
                us(a.p50_us.median),
                us(a.p99_us.median),
                us(a.cpu_us_per_io.median)
            ),
            None if missing.contains(&p) => {
                line!(out, "| {p} | missing (no {p} runs) | 0 | — | — | — |")
            }
            None => line!(out, "| {p} | no run on this workload | 0 | — | — | — |"),
        }
    }
    for a in w
        .peers()
        .into_iter()
        .filter(|a| !PEERS.contains(&a.key.server.as_str()))
    {
        line!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            esc(&w.label(&a.key)),
            value_text(a),
            a.reps.len(),
            us(a.p50_us.median),
            us(a.p99_us.median),
            us(a.cpu_us_per_io.median)
        );
    }
    line!(out);

    // Per-I/O breakdown.
    if w.dvma().next().is_some() {
        line!(out, "Per-I/O breakdown (server side, medians):");
        line!(out);
        line!(
            out,
            "| configuration | {unit} | interrupts | host signals | softints | ctx switches | ASTs | IOMMU faults | CPU µs | p50 µs | p99 µs | DVMA pages held |"
        );
        line!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for a in w.dvma() {
            let c = |f: fn(&crate::PerIo) -> f64| {
                a.per_io
                    .map_or("—".to_string(), |p| format!("{:.2}", f(&p)))
            };
            line!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                code(&w.label(&a.key)),
                value_text(a),
                c(|p| p.interrupts),
                c(|p| p.signals),
                c(|p| p.softints),
                c(|p| p.ctx_switches),
                c(|p| p.asts),
                c(|p| p.iommu_faults),
                us(a.cpu_us_per_io.median),
                us(a.p50_us.median),
                us(a.p99_us.median),
                a.dvma_pages_held
                    .map_or("—".to_string(), |n| thousands(n as i64))
            );
        }
        line!(out);
    }
}

/// `known` in order, then the other values of `found` sorted.
fn ordered(known: &[&str], found: impl Iterator<Item = String>) -> Vec<String> {
    let mut extra: Vec<String> = found.filter(|v| !known.contains(&v.as_str())).collect();
    extra.sort();
    extra.dedup();
    known.iter().map(|s| s.to_string()).chain(extra).collect()
}

fn secondary_axes(out: &mut String, analysis: &Analysis) {
    let mut any = false;
    for axis in Axis::ALL {
        let primary = analysis.primary_value(axis);
        let groups: Vec<(&WorkloadAnalysis, AxisGroup)> = analysis
            .workloads
            .iter()
            .flat_map(|w| w.axis_groups(axis).into_iter().map(move |g| (w, g)))
            .collect();
        if groups.is_empty() {
            continue;
        }
        if !any {
            line!(out, "## Secondary axes");
            line!(out);
            any = true;
        }
        let mut values: Vec<String> = Vec::new();
        for (_, g) in &groups {
            for (v, _) in &g.members {
                if !values.contains(v) {
                    values.push(v.clone());
                }
            }
        }
        // Keep the primary value first.
        values.sort_by_key(|v| Some(v.as_str()) != primary);
        let base = values[0].clone();
        line!(out, "### {}", axis.name());
        line!(out);
        let mut head = "| workload | configuration |".to_string();
        let mut sep = "|---|---|".to_string();
        for v in &values {
            head.push_str(&format!(" {}={} |", axis.name(), esc(v)));
            sep.push_str("---:|");
        }
        for v in &values[1..] {
            head.push_str(&format!(" {v} / {base} |"));
            sep.push_str("---:|");
        }
        line!(out, "{head}");
        line!(out, "{sep}");
        for (w, g) in &groups {
            let find = |v: &str| g.members.iter().find(|(x, _)| x == v).map(|(_, a)| *a);
            let mut row = format!("| {} | {} |", esc(&w.workload), code(&g.label));
            for v in &values {
                row.push_str(&format!(
                    " {} |",
                    find(v).map_or("—".to_string(), value_text)
                ));
            }
            for v in &values[1..] {
                let r = find(v)
                    .zip(find(&base))
                    .and_then(|(a, b)| Ratio::between(a, b));
                row.push_str(&format!(
                    " {} |",
                    r.map_or("—".to_string(), |r| ratio_text(&r))
                ));
            }
            line!(out, "{row}");
        }
        line!(out);
    }
}

fn protection(out: &mut String, results: &Results, analysis: &Analysis) {
    line!(out, "## Protection by DVMA mode");
    line!(out);
    let mut rows: Vec<(String, String)> = results.protections.clone();
    if rows.is_empty() {
        let modes = ordered(
            &DVMA_MODES,
            analysis
                .workloads
                .iter()
                .flat_map(|w| w.dvma().filter_map(|a| a.key.dvma_mode.clone())),
        );
        for m in modes {
            let p = analysis.workloads.iter().find_map(|w| {
                w.dvma()
                    .filter(|a| a.key.dvma_mode.as_deref() == Some(m.as_str()))
                    .find_map(|a| a.protection.clone())
            });
            if let Some(p) = p {
                rows.push((m, p));
            }
        }
    }
    if rows.is_empty() {
        line!(out, "No protection descriptions were supplied.");
    } else {
        line!(out, "| DVMA mode | protection |");
        line!(out, "|---|---|");
        for (m, p) in rows {
            line!(out, "| {} | {} |", esc(&m), esc(&p));
        }
    }
    line!(out);
}

fn spread_section(out: &mut String, analysis: &Analysis) {
    line!(out, "## Run-to-run spread");
    line!(out);
    let repeated: Vec<&Aggregate> = analysis
        .workloads
        .iter()
        .flat_map(|w| w.aggregates.iter())
        .filter(|a| a.value().n > 1)
        .collect();
    if repeated.is_empty() {
        line!(
            out,
            "Every configuration ran once: the spread was not measured."
        );
        line!(out);
        return;
    }
    let flagged: Vec<&&Aggregate> = repeated.iter().filter(|a| a.value().disagrees()).collect();
    line!(
        out,
        "{} of {} repeated (configuration, workload) pairs have runs more than {:.0}% apart ((max − min) / median).",
        flagged.len(),
        repeated.len(),
        RATIO_SPREAD_LIMIT * 100.0
    );
    line!(out);
    if !flagged.is_empty() {
        line!(
            out,
            "| workload | configuration | runs | min | median | max | spread |"
        );
        line!(out, "|---|---|---:|---:|---:|---:|---:|");
        for a in flagged {
            let v = a.value();
            line!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                esc(&a.workload),
                code(&analysis.label(&a.key)),
                v.n,
                a.metric.format(v.min),
                a.metric.format(v.median),
                a.metric.format(v.max),
                pct(v.rel_spread())
            );
        }
        line!(out);
    }
}

fn per_io_words(a: &Aggregate) -> String {
    let mut s = String::new();
    if let Some(p) = a.per_io {
        s.push_str(&format!(
            "{:.2} interrupts ({:.2} host signals), {:.2} softints, {:.2} context switches, {:.2} ASTs, {:.2} IOMMU faults, ",
            p.interrupts, p.signals, p.softints, p.ctx_switches, p.asts, p.iommu_faults
        ));
    }
    s.push_str(&format!("{} µs CPU", us(a.cpu_us_per_io.median)));
    s
}

fn more(n: usize) -> String {
    if n > LIST_MAX {
        format!("; and {} more", n - LIST_MAX)
    } else {
        String::new()
    }
}

/// The generated reading: bullets of markdown.
fn reading(analysis: &Analysis) -> Vec<String> {
    let mut bullets = Vec::new();
    let missing = analysis.missing_peers();
    for p in &missing {
        bullets.push(format!(
            "Peer {p} is missing: no {p} runs, so no ratio to {p} is available."
        ));
    }

    // Who wins each workload, by how much.
    for w in &analysis.workloads {
        let ranked = w.ranked_dvma();
        let Some(best) = ranked.first() else {
            bullets.push(format!("**{}**: no dvma runs.", esc(&w.workload)));
            continue;
        };
        let unit = w.metric.unit();
        let mut s = format!(
            "**{}**: the best dvma configuration is {} at {} {unit}",
            esc(&w.workload),
            code(&w.label(&best.key)),
            w.metric.format(best.value().median)
        );
        let mut vs = Vec::new();
        for p in PEERS {
            if let (Some(r), Some(pa)) = (w.ratio_to(best, p), w.peer(p)) {
                vs.push(format!(
                    "{} {p} ({} {unit}{})",
                    ratio_text(&r),
                    w.metric.format(pa.value().median),
                    if w.label(&pa.key) != p {
                        format!(", as {}", code(&w.label(&pa.key)))
                    } else {
                        String::new()
                    }
                ));
            }
        }
        if vs.is_empty() {
            s.push_str(", with no peer run to compare against");
        } else {
            s.push_str(&format!(", {}", vs.join(", ")));
        }
        if let Some(second) = ranked.get(1) {
            let lead = best.value().median / second.value().median - 1.0;
            s.push_str(&format!(
                "; {:.1}% ahead of the runner-up {} ({})",
                lead * 100.0,
                code(&w.label(&second.key)),
                w.metric.format(second.value().median)
            ));
            let worst = ranked[ranked.len() - 1];
            if ranked.len() > 2 && worst.value().median > 0.0 {
                s.push_str(&format!(
                    ", {:.2}× the slowest {} ({})",
                    best.value().median / worst.value().median,
                    code(&w.label(&worst.key)),
                    w.metric.format(worst.value().median)
                ));
            }
        }
        s.push('.');
        bullets.push(s);
    }

    // Where dvma is below the baseline peer.
    if !missing.contains(&BASELINE) {
        let mut any_below = false;
        for w in &analysis.workloads {
            let Some(peer) = w.peer(BASELINE) else {
                continue;
            };
            let mut below: Vec<(&Aggregate, Ratio)> = w
                .dvma()
                .filter_map(|a| w.ratio_to(a, BASELINE).map(|r| (a, r)))
                .filter(|(_, r)| r.value < 1.0)
                .collect();
            if below.is_empty() {
                continue;
            }
            any_below = true;
            below.sort_by(|a, b| a.1.value.total_cmp(&b.1.value));
            let total = w.dvma().count();
            let best_below = w
                .best_dvma()
                .is_some_and(|b| below.iter().any(|(a, _)| a.key == b.key));
            let mut s = format!(
                "Below {BASELINE} on **{}**: {} of {} dvma configurations{}. {BASELINE}: {} {}, {} µs CPU/I/O, p50 {} µs, p99 {} µs. ",
                esc(&w.workload),
                below.len(),
                total,
                if best_below {
                    " — including the best one, so dvma loses this workload"
                } else {
                    ""
                },
                w.metric.format(peer.value().median),
                w.metric.unit(),
                us(peer.cpu_us_per_io.median),
                us(peer.p50_us.median),
                us(peer.p99_us.median)
            );
            let mut shown: Vec<&(&Aggregate, Ratio)> = below.iter().take(3).collect();
            if best_below
                && let Some(b) = w.best_dvma()
                && !shown.iter().any(|(a, _)| a.key == b.key)
                && let Some(entry) = below.iter().find(|(a, _)| a.key == b.key)
            {
                shown.push(entry);
            }
            let parts: Vec<String> = shown
                .iter()
                .map(|(a, r)| {
                    format!(
                        "{} {} ({} {}; per I/O {}; p50 {} µs, p99 {} µs)",
                        code(&w.label(&a.key)),
                        ratio_text(r),
                        w.metric.format(a.value().median),
                        w.metric.unit(),
                        per_io_words(a),
                        us(a.p50_us.median),
                        us(a.p99_us.median)
                    )
                })
                .collect();
            s.push_str(&format!(
                "Lowest: {}{}.",
                parts.join("; "),
                if below.len() > shown.len() {
                    format!("; and {} more", below.len() - shown.len())
                } else {
                    String::new()
                }
            ));
            bullets.push(s);
        }
        if !any_below
            && analysis
                .workloads
                .iter()
                .any(|w| w.peer(BASELINE).is_some())
        {
            bullets.push(format!(
                "No dvma configuration is below {BASELINE} on any workload it was compared on."
            ));
        }
    }

    // Secondary axes, summarized.
    for axis in Axis::ALL {
        let mut by_value: Vec<(String, String, Vec<f64>)> = Vec::new();
        for w in &analysis.workloads {
            for g in w.axis_groups(axis) {
                let (base_v, base) = &g.members[0];
                for (v, a) in &g.members[1..] {
                    if let Some(r) = Ratio::between(a, base) {
                        match by_value.iter_mut().find(|(x, b, _)| x == v && b == base_v) {
                            Some((_, _, rs)) => rs.push(r.value),
                            None => by_value.push((v.clone(), base_v.clone(), vec![r.value])),
                        }
                    }
                }
            }
        }
        for (v, base, rs) in by_value {
            if let Some(st) = crate::Stat::of(&rs) {
                let (lo, hi) = (format!("{:.2}", st.min), format!("{:.2}", st.max));
                bullets.push(format!(
                    "{} {v} vs {base}: median ratio {:.2}× over {} configuration/workload pair{}{}.",
                    axis.name(),
                    st.median,
                    st.n,
                    if st.n == 1 { "" } else { "s" },
                    if lo == hi {
                        String::new()
                    } else {
                        format!(" (range {lo}–{hi}×)")
                    }
                ));
            }
        }
    }

    // Run-to-run spread.
    let repeated: Vec<&Aggregate> = analysis
        .workloads
        .iter()
        .flat_map(|w| w.aggregates.iter())
        .filter(|a| a.value().n > 1)
        .collect();
    if repeated.is_empty() {
        bullets.push("Each configuration ran once: the run-to-run spread was not measured, and no ratio can be checked against it.".to_string());
    } else {
        let mut flagged_ratios = Vec::new();
        let mut n_ratios = 0;
        for w in &analysis.workloads {
            for a in w.dvma() {
                for p in PEERS {
                    if let Some(r) = w.ratio_to(a, p) {
                        n_ratios += 1;
                        if r.disagrees() {
                            flagged_ratios.push(format!(
                                "{} vs {p} on {} ({:.2}–{:.2}×, {})",
                                code(&w.label(&a.key)),
                                esc(&w.workload),
                                r.min,
                                r.max,
                                pct(r.rel_spread())
                            ));
                        }
                    }
                }
            }
        }
        let spreads: Vec<f64> = repeated.iter().map(|a| a.value().rel_spread()).collect();
        let st = crate::Stat::of(&spreads).expect("non-empty");
        let mut s = format!(
            "Run-to-run spread ((max − min) / median over repetitions): median {}, largest {}.",
            pct(st.median),
            pct(st.max)
        );
        if n_ratios > 0 {
            if flagged_ratios.is_empty() {
                s.push_str(&format!(
                    " All {n_ratios} ratios to peers hold within {:.0}% across repetitions.",
                    RATIO_SPREAD_LIMIT * 100.0
                ));
            } else {
                s.push_str(&format!(
                    " {} of {n_ratios} ratios to peers disagree by more than {:.0}% across repetitions ⚠: {}{}.",
                    flagged_ratios.len(),
                    RATIO_SPREAD_LIMIT * 100.0,
                    flagged_ratios
                        .iter()
                        .take(LIST_MAX)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    more(flagged_ratios.len())
                ));
            }
        }
        bullets.push(s);
    }
    bullets
}

/// Renders a micro-benchmark JSON value as markdown tables, whatever its
/// keys: top-level numbers in one table; each top-level object as a table
/// of its own, a matrix when it is an object of objects of numbers (rows =
/// its keys, columns = the inner keys), else one row per dotted path.
pub fn render_micro(value: &Value) -> String {
    let mut out = String::new();
    let Value::Object(top) = value else {
        line!(out, "| value |");
        line!(out, "|---:|");
        line!(out, "| {} |", esc(&scalar(value)));
        return out;
    };
    let scalars: Vec<(&String, &Value)> = top.iter().filter(|(_, v)| !v.is_object()).collect();
    if !scalars.is_empty() {
        line!(out, "| benchmark | value |");
        line!(out, "|---|---:|");
        for (k, v) in scalars {
            line!(out, "| {} | {} |", esc(k), esc(&scalar(v)));
        }
        line!(out);
    }
    for (k, v) in top {
        let Value::Object(obj) = v else { continue };
        line!(out, "### {}", esc(k));
        line!(out);
        let is_matrix = !obj.is_empty()
            && obj.values().all(|row| {
                matches!(row, Value::Object(cells) if !cells.is_empty() && cells.values().all(|c| !c.is_object()))
            });
        if is_matrix {
            let mut cols: Vec<&String> = Vec::new();
            for row in obj.values() {
                if let Value::Object(cells) = row {
                    for c in cells.keys() {
                        if !cols.contains(&c) {
                            cols.push(c);
                        }
                    }
                }
            }
            let mut head = "| |".to_string();
            let mut sep = "|---|".to_string();
            for c in &cols {
                head.push_str(&format!(" {} |", esc(c)));
                sep.push_str("---:|");
            }
            line!(out, "{head}");
            line!(out, "{sep}");
            for (rk, row) in obj {
                let mut line = format!("| {} |", esc(rk));
                for c in &cols {
                    let cell = row.get(c.as_str()).map_or("—".to_string(), scalar);
                    line.push_str(&format!(" {} |", esc(&cell)));
                }
                line!(out, "{line}");
            }
        } else {
            line!(out, "| name | value |");
            line!(out, "|---|---:|");
            let mut rows = Vec::new();
            flatten("", v, &mut rows);
            for (path, val) in rows {
                line!(out, "| {} | {} |", esc(&path), esc(&val));
            }
        }
        line!(out);
    }
    if top.is_empty() {
        line!(out, "(empty)");
    }
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(obj) => {
            for (k, v) in obj {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        other => out.push((prefix.to_string(), scalar(other))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "—".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => thousands(i),
            (None, Some(f)) => number(f),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(scalar).collect::<Vec<_>>().join(", "),
        Value::Object(_) => v.to_string(),
    }
}

fn number(f: f64) -> String {
    let a = f.abs();
    if f.fract() == 0.0 && a < 1e15 {
        thousands(f as i64)
    } else if a >= 100.0 {
        format!("{f:.1}")
    } else if a >= 1.0 {
        format!("{f:.2}")
    } else if a >= 0.001 {
        format!("{f:.4}")
    } else {
        format!("{f:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn micro_matrix_and_flattened() {
        let v = json!({
            "iterations": 1000,
            "spl_ns": {"lazy": {"raise": 1.5, "lower": 2.25}, "mask": {"raise": 30.0, "lower": 31.5}},
            "dvma": {"map_ns": {"strict": 120.5, "lazy": 40}, "note": "x|y"}
        });
        let md = render_micro(&v);
        assert!(md.contains("| iterations | 1,000 |"), "{md}");
        assert!(md.contains("| | raise | lower |"), "{md}");
        assert!(md.contains("| lazy | 1.50 | 2.25 |"), "{md}");
        assert!(md.contains("| mask | 30 | 31.50 |"), "{md}");
        assert!(md.contains("| map_ns.strict | 120.5 |"), "{md}");
        assert!(md.contains("| map_ns.lazy | 40 |"), "{md}");
        assert!(md.contains("| note | x\\|y |"), "{md}");
    }

    #[test]
    fn numbers_are_readable() {
        assert_eq!(number(1234567.0), "1,234,567");
        assert_eq!(number(1234.5678), "1234.6");
        assert_eq!(number(12.345), "12.35");
        assert_eq!(number(0.012345), "0.0123");
        assert_eq!(number(0.00001234), "1.234e-5");
    }

    #[test]
    fn file_stems_are_safe() {
        assert_eq!(file_stem("randread-4k-qd1"), "randread-4k-qd1");
        assert_eq!(file_stem("a/b c"), "a_b_c");
        assert_eq!(file_stem("../x"), "w.._x");
        assert_eq!(file_stem(""), "w");
    }
}
