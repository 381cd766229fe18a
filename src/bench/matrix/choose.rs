//! Choosing from the runs made so far: the best (DVMA mode, completion)
//! pair of phase 1, and each peer's best setting of phase 0. Both use one
//! rule: the highest geometric mean, over the workloads, of the
//! candidate's throughput relative to the best candidate on each workload.

use std::collections::BTreeMap;

use report::{DVMA_MODES, Run};

use super::plan;

/// Scores of the (mode, completion) pairs on `workloads` (see
/// `Bench::choose_best`), best first.
pub fn best_scores(runs: &[Run], workloads: &[plan::Workload]) -> Vec<((String, String), f64)> {
    let aggs = report::aggregate(runs);
    let mut per_pair: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut complete = 0usize;
    for w in workloads {
        let here: Vec<&report::Aggregate> = aggs
            .iter()
            .filter(|a| a.workload == w.name && a.key.is_dvma())
            .collect();
        let max = here.iter().map(|a| a.value().median).fold(0.0f64, f64::max);
        if max <= 0.0 {
            continue;
        }
        complete += 1;
        for a in here {
            let (Some(m), Some(c)) = (a.key.dvma_mode.clone(), a.key.completion.clone()) else {
                continue;
            };
            per_pair
                .entry((m, c))
                .or_default()
                .push(a.value().median / max);
        }
    }
    let mut scores: Vec<((String, String), f64)> = per_pair
        .into_iter()
        .filter(|(_, v)| v.len() == complete && complete > 0)
        .map(|(p, v)| {
            let g = (v.iter().map(|x| x.max(1e-12).ln()).sum::<f64>() / v.len() as f64).exp();
            (p, g)
        })
        .collect();
    let rank = |p: &(String, String)| {
        (
            DVMA_MODES.iter().position(|m| *m == p.0),
            report::COMPLETION_MODES.iter().position(|c| *c == p.1),
        )
    };
    scores.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| rank(&a.0).cmp(&rank(&b.0)))
    });
    scores
}

/// The best of a peer's settings (`(PEER_SETTINGS index, run)`): the
/// highest geometric mean over `workloads` of its IOPS relative to the best
/// setting on each workload (medians over its runs); settings missing a
/// workload are not candidates.
pub fn best_setting(runs: &[(usize, &Run)], workloads: &[plan::Workload]) -> Option<usize> {
    let mut settings: Vec<usize> = runs.iter().map(|(i, _)| *i).collect();
    settings.sort_unstable();
    settings.dedup();
    let iops = |i: usize, w: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|(j, r)| *j == i && r.workload == w)
            .map(|(_, r)| r.iops)
            .collect();
        report::Stat::of(&v).map(|s| s.median)
    };
    let mut best: Option<(usize, f64)> = None;
    for &i in &settings {
        let mut log_sum = 0.0;
        let mut complete = true;
        for w in workloads {
            let top = settings
                .iter()
                .filter_map(|&j| iops(j, w.name))
                .fold(0.0, f64::max);
            match iops(i, w.name) {
                Some(x) if x > 0.0 && top > 0.0 => log_sum += (x / top).ln(),
                _ => complete = false,
            }
        }
        if complete && best.is_none_or(|(_, b)| log_sum > b) {
            best = Some((i, log_sum));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: &str, completion: &str, workload: &str, iops: f64) -> Run {
        Run {
            server: "dvma".into(),
            dvma_mode: Some(mode.into()),
            completion: Some(completion.into()),
            spl: Some("lazy".into()),
            intr_stack: Some(true),
            cpus: Some(2),
            workload: workload.into(),
            rep: 0,
            iops,
            mib_s: iops / 256.0,
            p50_us: 10.0,
            p99_us: 20.0,
            cpu_us_per_io: 5.0,
            latency_cdf: vec![],
            per_io: None,
            dvma_pages_held: None,
            protection: None,
        }
    }

    #[test]
    fn best_pair_is_the_best_geometric_mean() {
        let w = [plan::WORKLOADS[1], plan::WORKLOADS[2]];
        let runs = vec![
            // a: best on one, poor on the other; b: good on both.
            run("strict", "intr", w[0].name, 100.0),
            run("strict", "intr", w[1].name, 10.0),
            run("lazy", "thread", w[0].name, 80.0),
            run("lazy", "thread", w[1].name, 90.0),
            run("shadow", "ast", w[0].name, 90.0),
            run("shadow", "ast", w[1].name, 100.0),
            // missing a workload: not a candidate.
            run("permanent", "intr", w[0].name, 1000.0),
        ];
        let s = best_scores(&runs, &w);
        assert_eq!(s[0].0, ("shadow".to_string(), "ast".to_string()));
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|(p, _)| p.0 != "permanent"));
        assert!(best_scores(&[], &w).is_empty());
    }

    #[test]
    fn best_peer_setting_is_the_best_geometric_mean() {
        let w = [plan::WORKLOADS[1], plan::WORKLOADS[4]];
        let peer = |workload: &str, iops: f64| Run {
            server: "nbdkit".into(),
            dvma_mode: None,
            completion: None,
            ..run("strict", "intr", workload, iops)
        };
        // 0: best on one workload, poor on the other; 1: good on both;
        // 2: best of all on one workload but missing the other.
        let runs = [
            (0, peer(w[0].name, 100.0)),
            (0, peer(w[1].name, 10.0)),
            (1, peer(w[0].name, 90.0)),
            (1, peer(w[1].name, 95.0)),
            (1, peer(w[1].name, 1.0)), // a second run: the median counts
            (1, peer(w[1].name, 100.0)),
            (2, peer(w[0].name, 500.0)),
        ];
        let refs: Vec<(usize, &Run)> = runs.iter().map(|(i, r)| (*i, r)).collect();
        assert_eq!(best_setting(&refs, &w), Some(1));
        assert_eq!(best_setting(&refs[..2], &w), Some(0));
        assert_eq!(best_setting(&[], &w), None);
    }
}
