//! Aggregation of repeated runs: medians and spread per (server
//! configuration, workload), ratios to the peer servers, the best dvma
//! configuration per workload.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use crate::model::{COMPLETION_MODES, DVMA_MODES, DVMA_SERVER, PEERS, PerIo, Results, Run};

/// Repeated runs whose results differ by more than this relative spread
/// ((max − min) / median) are flagged in the report.
pub const RATIO_SPREAD_LIMIT: f64 = 0.10;

/// The figure a workload is compared on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// I/Os per second (small-block workloads).
    Iops,
    /// MiB per second (workloads with blocks of 64 KiB or more, e.g. `-1m-`).
    MibS,
}

impl Metric {
    /// The metric of a workload name: [`Metric::MibS`] when one of its
    /// `-`-separated parts is a block size of at least 64 KiB (`1m`, `128k`),
    /// [`Metric::Iops`] otherwise.
    pub fn for_workload(workload: &str) -> Metric {
        let big = workload
            .split(['-', '_'])
            .filter_map(block_size)
            .any(|bytes| bytes >= 64 * 1024);
        if big { Metric::MibS } else { Metric::Iops }
    }

    /// The metric's value in a run.
    pub fn of(self, run: &Run) -> f64 {
        match self {
            Metric::Iops => run.iops,
            Metric::MibS => run.mib_s,
        }
    }

    /// The unit as shown in tables: `IOPS` or `MiB/s`.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Iops => "IOPS",
            Metric::MibS => "MiB/s",
        }
    }

    /// A value formatted for tables: IOPS as an integer with thousands
    /// separators, MiB/s with one decimal (none from 10,000 on).
    pub fn format(self, value: f64) -> String {
        match self {
            Metric::Iops => thousands(value.round() as i64),
            Metric::MibS if value.abs() >= 10_000.0 => thousands(value.round() as i64),
            Metric::MibS => format!("{value:.1}"),
        }
    }
}

/// `4k` → 4096, `1m` → 1 MiB, `512` → 512; `None` if not a block size.
fn block_size(part: &str) -> Option<u64> {
    let p = part.to_ascii_lowercase();
    let p = p
        .strip_suffix("ib")
        .or_else(|| p.strip_suffix('b'))
        .unwrap_or(&p);
    let (digits, mult) = match p.chars().last()? {
        'k' => (&p[..p.len() - 1], 1u64 << 10),
        'm' => (&p[..p.len() - 1], 1 << 20),
        'g' => (&p[..p.len() - 1], 1 << 30),
        _ => (p, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || mult == 1 {
        return None;
    }
    digits.parse::<u64>().ok().map(|n| n * mult)
}

pub(crate) fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// A secondary configuration axis of dvma runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Axis {
    /// [`Run::spl`]: lazy vs mask.
    Spl,
    /// [`Run::intr_stack`]: on vs off.
    IntrStack,
    /// [`Run::cpus`]: 1 vs 2.
    Cpus,
}

impl Axis {
    /// All axes, in report order.
    pub const ALL: [Axis; 3] = [Axis::Spl, Axis::IntrStack, Axis::Cpus];

    /// The axis name as shown in the report.
    pub fn name(self) -> &'static str {
        match self {
            Axis::Spl => "spl",
            Axis::IntrStack => "intr stack",
            Axis::Cpus => "CPUs",
        }
    }

    /// The axis value of a configuration (`None` when the run did not set it).
    pub fn value(self, key: &ConfigKey) -> Option<String> {
        match self {
            Axis::Spl => key.spl.clone(),
            Axis::IntrStack => key
                .intr_stack
                .map(|on| if on { "on" } else { "off" }.to_string()),
            Axis::Cpus => key.cpus.map(|n| n.to_string()),
        }
    }

    fn clear(self, key: &mut ConfigKey) {
        match self {
            Axis::Spl => key.spl = None,
            Axis::IntrStack => key.intr_stack = None,
            Axis::Cpus => key.cpus = None,
        }
    }
}

/// A server configuration: what identifies the runs that are repetitions
/// of each other (with the workload).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigKey {
    /// [`Run::server`].
    pub server: String,
    /// [`Run::dvma_mode`].
    pub dvma_mode: Option<String>,
    /// [`Run::completion`].
    pub completion: Option<String>,
    /// [`Run::spl`].
    pub spl: Option<String>,
    /// [`Run::intr_stack`].
    pub intr_stack: Option<bool>,
    /// [`Run::cpus`].
    pub cpus: Option<u32>,
}

impl ConfigKey {
    /// The configuration of a run.
    pub fn of(run: &Run) -> Self {
        ConfigKey {
            server: run.server.clone(),
            dvma_mode: run.dvma_mode.clone(),
            completion: run.completion.clone(),
            spl: run.spl.clone(),
            intr_stack: run.intr_stack,
            cpus: run.cpus,
        }
    }

    /// Whether this is a `dvma serve` configuration.
    pub fn is_dvma(&self) -> bool {
        self.server == DVMA_SERVER
    }

    /// The full label: `lazy/softint spl=lazy intr-stack=on cpus=1`,
    /// `nbdkit`.
    pub fn label(&self) -> String {
        self.label_relative(&[])
    }

    /// The label used in tables and plots: the full label without the
    /// secondary-axis values that equal `primary` (see
    /// [`Analysis::primary`]): `lazy/softint`, `lazy/softint spl=mask`.
    pub fn label_relative(&self, primary: &[(Axis, Option<String>)]) -> String {
        let shown = |axis: Axis| {
            !primary
                .iter()
                .any(|(a, v)| *a == axis && *v == axis.value(self))
        };
        let mut parts = Vec::new();
        if self.is_dvma() {
            let mode = self.dvma_mode.as_deref().unwrap_or("?");
            let completion = self.completion.as_deref().unwrap_or("?");
            parts.push(format!("{mode}/{completion}"));
        } else {
            parts.push(self.server.clone());
        }
        if let Some(spl) = self.spl.as_ref().filter(|_| shown(Axis::Spl)) {
            parts.push(format!("spl={spl}"));
        }
        if let Some(on) = self.intr_stack.filter(|_| shown(Axis::IntrStack)) {
            parts.push(format!("intr-stack={}", if on { "on" } else { "off" }));
        }
        if let Some(n) = self.cpus.filter(|_| shown(Axis::Cpus)) {
            parts.push(format!("cpus={n}"));
        }
        parts.join(" ")
    }

    /// The order configurations are listed in: dvma first (modes and
    /// completions in [`DVMA_MODES`] and [`COMPLETION_MODES`] order), then the
    /// peers in [`PEERS`] order, then other servers.
    pub fn display_cmp(&self, other: &Self) -> Ordering {
        let server_rank = |k: &ConfigKey| {
            if k.is_dvma() {
                0
            } else {
                1 + PEERS
                    .iter()
                    .position(|p| *p == k.server)
                    .unwrap_or(PEERS.len())
            }
        };
        let rank = |list: &[&str], v: &Option<String>| {
            v.as_deref()
                .map(|v| list.iter().position(|x| *x == v).unwrap_or(list.len()))
                .unwrap_or(0)
        };
        server_rank(self)
            .cmp(&server_rank(other))
            .then_with(|| self.server.cmp(&other.server))
            .then_with(|| {
                rank(&DVMA_MODES, &self.dvma_mode).cmp(&rank(&DVMA_MODES, &other.dvma_mode))
            })
            .then_with(|| self.dvma_mode.cmp(&other.dvma_mode))
            .then_with(|| {
                rank(&COMPLETION_MODES, &self.completion)
                    .cmp(&rank(&COMPLETION_MODES, &other.completion))
            })
            .then_with(|| self.cmp(other))
    }
}

impl fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Median and range of a figure over repeated runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of values.
    pub n: usize,
}

impl Stat {
    /// The statistics of `values`; `None` if empty.
    pub fn of(values: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// (max − min) / median; 0 when the median is 0.
    pub fn rel_spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }

    /// Whether there are repetitions and they disagree by more than
    /// [`RATIO_SPREAD_LIMIT`].
    pub fn disagrees(&self) -> bool {
        self.n > 1 && self.rel_spread() > RATIO_SPREAD_LIMIT
    }
}

/// The compared figures of one repetition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RepSample {
    /// [`Run::rep`].
    pub rep: u32,
    /// [`Run::iops`].
    pub iops: f64,
    /// [`Run::mib_s`].
    pub mib_s: f64,
}

/// All runs of one configuration on one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The configuration.
    pub key: ConfigKey,
    /// The workload.
    pub workload: String,
    /// The workload's metric.
    pub metric: Metric,
    /// The runs' compared figures, in run order.
    pub reps: Vec<RepSample>,
    /// IOPS over the runs.
    pub iops: Stat,
    /// MiB/s over the runs.
    pub mib_s: Stat,
    /// p50 latency (µs) over the runs.
    pub p50_us: Stat,
    /// p99 latency (µs) over the runs.
    pub p99_us: Stat,
    /// Server CPU µs per I/O over the runs.
    pub cpu_us_per_io: Stat,
    /// Median of each per-I/O counter over the runs that have them.
    pub per_io: Option<PerIo>,
    /// Largest DVMA pages held over the runs.
    pub dvma_pages_held: Option<u64>,
    /// The protection description of the first run that has one.
    pub protection: Option<String>,
    /// The latency CDF of the median run (the run whose metric is the
    /// median, the lower of the two middle ones for an even count).
    pub latency_cdf: Vec<(f64, f64)>,
}

impl Aggregate {
    /// The statistics of the workload's metric.
    pub fn value(&self) -> &Stat {
        match self.metric {
            Metric::Iops => &self.iops,
            Metric::MibS => &self.mib_s,
        }
    }

    /// The metric per repetition number (median if a repetition ran twice).
    pub fn by_rep(&self) -> BTreeMap<u32, f64> {
        self.by_metric_rep(self.metric)
    }

    fn by_metric_rep(&self, metric: Metric) -> BTreeMap<u32, f64> {
        let mut m: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for s in &self.reps {
            let v = match metric {
                Metric::Iops => s.iops,
                Metric::MibS => s.mib_s,
            };
            m.entry(s.rep).or_default().push(v);
        }
        m.into_iter()
            .filter_map(|(rep, v)| Stat::of(&v).map(|s| (rep, s.median)))
            .collect()
    }

    fn from_runs(key: ConfigKey, workload: &str, runs: &[&Run]) -> Aggregate {
        let metric = Metric::for_workload(workload);
        let stat = |f: fn(&Run) -> f64| {
            let v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
            Stat::of(&v).expect("an aggregate has runs")
        };
        let with_per_io: Vec<PerIo> = runs.iter().filter_map(|r| r.per_io).collect();
        let per_io = (!with_per_io.is_empty()).then(|| {
            let med = |f: fn(&PerIo) -> f64| {
                let v: Vec<f64> = with_per_io.iter().map(f).collect();
                Stat::of(&v).map_or(0.0, |s| s.median)
            };
            PerIo {
                interrupts: med(|p| p.interrupts),
                signals: med(|p| p.signals),
                softints: med(|p| p.softints),
                ctx_switches: med(|p| p.ctx_switches),
                asts: med(|p| p.asts),
                iommu_faults: med(|p| p.iommu_faults),
            }
        });
        let mut order: Vec<&Run> = runs.to_vec();
        order.sort_by(|a, b| metric.of(a).total_cmp(&metric.of(b)));
        let median_run = order[(order.len() - 1) / 2];
        Aggregate {
            workload: workload.to_string(),
            metric,
            reps: runs
                .iter()
                .map(|r| RepSample {
                    rep: r.rep,
                    iops: r.iops,
                    mib_s: r.mib_s,
                })
                .collect(),
            iops: stat(|r| r.iops),
            mib_s: stat(|r| r.mib_s),
            p50_us: stat(|r| r.p50_us),
            p99_us: stat(|r| r.p99_us),
            cpu_us_per_io: stat(|r| r.cpu_us_per_io),
            per_io,
            dvma_pages_held: runs.iter().filter_map(|r| r.dvma_pages_held).max(),
            protection: runs.iter().find_map(|r| r.protection.clone()),
            latency_cdf: median_run.latency_cdf.clone(),
            key,
        }
    }
}

/// Groups runs by (workload, configuration). Workloads come in the order
/// they first appear in `runs`; configurations in
/// [`ConfigKey::display_cmp`] order.
pub fn aggregate(runs: &[Run]) -> Vec<Aggregate> {
    let mut workloads: Vec<&str> = Vec::new();
    let mut groups: BTreeMap<(&str, ConfigKey), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
        groups
            .entry((&r.workload, ConfigKey::of(r)))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for w in workloads {
        let mut aggs: Vec<Aggregate> = groups
            .iter()
            .filter(|((gw, _), _)| *gw == w)
            .map(|((_, key), runs)| Aggregate::from_runs(key.clone(), w, runs))
            .collect();
        aggs.sort_by(|a, b| a.key.display_cmp(&b.key));
        out.extend(aggs);
    }
    out
}

/// The ratio of one aggregate's metric to another's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    /// Ratio of the medians.
    pub value: f64,
    /// Smallest ratio over the repetitions (see [`Ratio::paired_reps`]).
    pub min: f64,
    /// Largest ratio over the repetitions.
    pub max: f64,
    /// Number of repetition numbers both sides ran, whose per-repetition
    /// ratios give `min` and `max`. When 0, `min`/`max` are the
    /// conservative bounds min(a)/max(b) and max(a)/min(b).
    pub paired_reps: usize,
}

impl Ratio {
    /// The ratio of `a`'s metric to `b`'s (`a`'s metric is used for both).
    /// `None` if `b`'s median or a repetition of `b` is 0.
    pub fn between(a: &Aggregate, b: &Aggregate) -> Option<Ratio> {
        let (va, vb) = (a.value(), b.value_as(a.metric));
        if vb.median == 0.0 || vb.min == 0.0 {
            return None;
        }
        let value = va.median / vb.median;
        let (ra, rb) = (a.by_rep(), b.by_metric_rep(a.metric));
        let paired: Vec<f64> = ra
            .iter()
            .filter_map(|(rep, x)| rb.get(rep).map(|y| x / y))
            .collect();
        let (min, max) = match Stat::of(&paired) {
            Some(s) => (s.min, s.max),
            None => (va.min / vb.max, va.max / vb.min),
        };
        Some(Ratio {
            value,
            min,
            max,
            paired_reps: paired.len(),
        })
    }

    /// (max − min) / value.
    pub fn rel_spread(&self) -> f64 {
        if self.value == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.value
        }
    }

    /// Whether the repetitions disagree by more than
    /// [`RATIO_SPREAD_LIMIT`].
    pub fn disagrees(&self) -> bool {
        self.rel_spread() > RATIO_SPREAD_LIMIT
    }
}

impl Aggregate {
    fn value_as(&self, metric: Metric) -> &Stat {
        match metric {
            Metric::Iops => &self.iops,
            Metric::MibS => &self.mib_s,
        }
    }
}

/// Whether a peer server has runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The server name.
    pub server: String,
    /// How many runs it has (0: missing).
    pub runs: usize,
}

/// Everything about one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadAnalysis {
    /// The workload.
    pub workload: String,
    /// Its metric.
    pub metric: Metric,
    /// Its aggregates in [`ConfigKey::display_cmp`] order.
    pub aggregates: Vec<Aggregate>,
    /// [`Analysis::primary`], for [`WorkloadAnalysis::label`] and the
    /// matrix.
    pub primary: Vec<(Axis, Option<String>)>,
}

impl WorkloadAnalysis {
    /// A configuration's label without the primary secondary-axis values
    /// (see [`ConfigKey::label_relative`]).
    pub fn label(&self, key: &ConfigKey) -> String {
        key.label_relative(&self.primary)
    }

    /// The primary value of an axis.
    pub fn primary_value(&self, axis: Axis) -> Option<&str> {
        primary_value(&self.primary, axis)
    }

    /// The dvma aggregates.
    pub fn dvma(&self) -> impl Iterator<Item = &Aggregate> {
        self.aggregates.iter().filter(|a| a.key.is_dvma())
    }

    /// The dvma aggregates, best (highest median metric) first.
    pub fn ranked_dvma(&self) -> Vec<&Aggregate> {
        let mut v: Vec<&Aggregate> = self.dvma().collect();
        v.sort_by(|a, b| {
            b.value()
                .median
                .total_cmp(&a.value().median)
                .then_with(|| a.key.display_cmp(&b.key))
        });
        v
    }

    /// The best dvma configuration.
    pub fn best_dvma(&self) -> Option<&Aggregate> {
        self.ranked_dvma().into_iter().next()
    }

    /// A peer server's best configuration on this workload (the baseline
    /// ratios are computed against: the peer at its best).
    pub fn peer(&self, server: &str) -> Option<&Aggregate> {
        self.aggregates
            .iter()
            .filter(|a| a.key.server == server)
            .max_by(|a, b| a.value().median.total_cmp(&b.value().median))
    }

    /// The peers with runs on this workload, [`PEERS`] first.
    pub fn peers(&self) -> Vec<&Aggregate> {
        let mut servers: Vec<&str> = Vec::new();
        for a in self.aggregates.iter().filter(|a| !a.key.is_dvma()) {
            if !servers.contains(&a.key.server.as_str()) {
                servers.push(&a.key.server);
            }
        }
        servers.iter().filter_map(|s| self.peer(s)).collect()
    }

    /// `agg`'s ratio to `peer`'s best configuration; `None` when the peer has
    /// no runs on this workload.
    pub fn ratio_to(&self, agg: &Aggregate, peer: &str) -> Option<Ratio> {
        self.peer(peer).and_then(|p| Ratio::between(agg, p))
    }

    /// The dvma aggregate with this mode and completion whose secondary
    /// axes have the primary values (a cell of the full matrix).
    pub fn cell(&self, mode: &str, completion: &str) -> Option<&Aggregate> {
        self.dvma().find(|a| {
            a.key.dvma_mode.as_deref() == Some(mode)
                && a.key.completion.as_deref() == Some(completion)
                && self
                    .primary
                    .iter()
                    .all(|(axis, v)| axis.value(&a.key) == *v)
        })
    }

    /// The groups of dvma aggregates that differ only in `axis`, with at
    /// least two values of it.
    pub fn axis_groups(&self, axis: Axis) -> Vec<AxisGroup<'_>> {
        let primary = self.primary_value(axis);
        let mut groups: Vec<(ConfigKey, Vec<(String, &Aggregate)>)> = Vec::new();
        for a in self.dvma() {
            let mut base = a.key.clone();
            axis.clear(&mut base);
            let v = axis.value(&a.key).unwrap_or_else(|| "default".to_string());
            match groups.iter_mut().find(|(k, _)| *k == base) {
                Some((_, members)) => members.push((v, a)),
                None => groups.push((base, vec![(v, a)])),
            }
        }
        groups
            .into_iter()
            .filter(|(_, m)| m.len() > 1)
            .map(|(base, mut m)| {
                m.sort_by(|(x, _), (y, _)| {
                    let px = Some(x.as_str()) != primary;
                    let py = Some(y.as_str()) != primary;
                    px.cmp(&py).then_with(|| x.cmp(y))
                });
                AxisGroup {
                    label: self.label(&base),
                    members: m,
                }
            })
            .collect()
    }
}

/// dvma configurations that differ only in one secondary axis.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisGroup<'a> {
    /// The configurations' label without the axis.
    pub label: String,
    /// `(axis value, aggregate)`, the primary value first, then sorted. A
    /// configuration that does not set the axis has the value `default`.
    pub members: Vec<(String, &'a Aggregate)>,
}

/// One row of the headline table.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadlineRow {
    /// The workload.
    pub workload: String,
    /// Its metric.
    pub metric: Metric,
    /// The best dvma configuration; `None` when the workload has no dvma runs.
    pub best: Option<ConfigKey>,
    /// Its metric.
    pub value: Option<Stat>,
    /// Its ratio to each of [`PEERS`], in order; `None` where that peer has
    /// no runs on this workload.
    pub ratios: Vec<(String, Option<Ratio>)>,
}

/// The aggregated results.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// Per workload, in the order they first ran.
    pub workloads: Vec<WorkloadAnalysis>,
    /// Each of [`PEERS`] and any other non-dvma server, with its run count.
    pub peers: Vec<PeerStatus>,
    /// For each secondary axis, the value most dvma runs have (ties: the
    /// smallest): the setting the full matrix is shown at.
    pub primary: Vec<(Axis, Option<String>)>,
}

impl Analysis {
    /// The peers that have no runs at all.
    pub fn missing_peers(&self) -> Vec<&str> {
        self.peers
            .iter()
            .filter(|p| p.runs == 0)
            .map(|p| p.server.as_str())
            .collect()
    }

    /// The primary value of an axis.
    pub fn primary_value(&self, axis: Axis) -> Option<&str> {
        primary_value(&self.primary, axis)
    }

    /// A configuration's label without the primary secondary-axis values
    /// (see [`ConfigKey::label_relative`]).
    pub fn label(&self, key: &ConfigKey) -> String {
        key.label_relative(&self.primary)
    }

    /// The headline table: per workload, the best dvma configuration, its
    /// value and its ratios to the peers.
    pub fn headline(&self) -> Vec<HeadlineRow> {
        self.workloads
            .iter()
            .map(|w| {
                let best = w.best_dvma();
                HeadlineRow {
                    workload: w.workload.clone(),
                    metric: w.metric,
                    best: best.map(|b| b.key.clone()),
                    value: best.map(|b| *b.value()),
                    ratios: PEERS
                        .iter()
                        .map(|p| (p.to_string(), best.and_then(|b| w.ratio_to(b, p))))
                        .collect(),
                }
            })
            .collect()
    }
}

fn primary_value(primary: &[(Axis, Option<String>)], axis: Axis) -> Option<&str> {
    primary
        .iter()
        .find(|(a, _)| *a == axis)
        .and_then(|(_, v)| v.as_deref())
}

/// Aggregates `results.runs` (see [`aggregate`]) per workload.
pub fn analyze(results: &Results) -> Analysis {
    let aggs = aggregate(&results.runs);
    let mut workloads: Vec<WorkloadAnalysis> = Vec::new();
    for a in aggs {
        match workloads.iter_mut().find(|w| w.workload == a.workload) {
            Some(w) => w.aggregates.push(a),
            None => workloads.push(WorkloadAnalysis {
                workload: a.workload.clone(),
                metric: a.metric,
                aggregates: vec![a],
                primary: Vec::new(),
            }),
        }
    }
    let mut peers: Vec<PeerStatus> = PEERS
        .iter()
        .map(|p| PeerStatus {
            server: p.to_string(),
            runs: 0,
        })
        .collect();
    for r in results.runs.iter().filter(|r| !r.is_dvma()) {
        match peers.iter_mut().find(|p| p.server == r.server) {
            Some(p) => p.runs += 1,
            None => peers.push(PeerStatus {
                server: r.server.clone(),
                runs: 1,
            }),
        }
    }
    let primary: Vec<(Axis, Option<String>)> = Axis::ALL
        .iter()
        .map(|&axis| {
            let mut counts: BTreeMap<Option<String>, usize> = BTreeMap::new();
            for r in results.runs.iter().filter(|r| r.is_dvma()) {
                *counts.entry(axis.value(&ConfigKey::of(r))).or_default() += 1;
            }
            let best = counts
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .and_then(|(v, _)| v.clone());
            (axis, best)
        })
        .collect();
    for w in &mut workloads {
        w.primary = primary.clone();
    }
    Analysis {
        workloads,
        peers,
        primary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_from_workload_name() {
        assert_eq!(Metric::for_workload("randread-4k-qd1"), Metric::Iops);
        assert_eq!(Metric::for_workload("seqread-1m-qd8"), Metric::MibS);
        assert_eq!(Metric::for_workload("seqwrite-1M-qd8"), Metric::MibS);
        assert_eq!(Metric::for_workload("read-128k"), Metric::MibS);
        assert_eq!(Metric::for_workload("read-32k"), Metric::Iops);
        // "qd32" and "m" alone are not block sizes.
        assert_eq!(Metric::for_workload("m-qd32"), Metric::Iops);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-12345), "-12,345");
    }

    #[test]
    fn stat_median_even_and_odd() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Stat::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert_eq!(s.rel_spread(), 3.0);
        assert!(Stat::of(&[]).is_none());
        assert!(!Stat::of(&[5.0]).unwrap().disagrees());
    }
}
