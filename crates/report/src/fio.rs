//! Parsing of fio's `--output-format=json` output (fio 3.x; recorded with
//! fio 3.33 and its nbd engine).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The parsed output of one fio invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct FioOutput {
    /// fio's version string, e.g. `fio-3.33`.
    pub version: String,
    /// One entry per job as fio reported it: one per job (each of `numjobs`
    /// clones counts), or one per group when `group_reporting` is set.
    pub jobs: Vec<FioJob>,
}

/// The summary of one fio job entry (a job, a reported group, or the merge of
/// several entries made by [`FioOutput::total`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FioJob {
    /// fio's `jobname`.
    pub name: String,
    /// fio's `groupid`.
    pub groupid: u32,
    /// fio's `error` (0 when the job succeeded).
    pub error: i64,
    /// How many fio jobs (threads/processes) this entry summarizes: `numjobs`
    /// for a `group_reporting` entry, 1 for a plain entry, the sum for a merge.
    pub jobs: u32,
    /// Whether this entry is fio's `group_reporting` summary of several jobs.
    pub group_reported: bool,
    /// The job's options (`global options` overridden by `job options`).
    pub options: BTreeMap<String, String>,
    /// Reads, when the job completed any.
    pub read: Option<DirStats>,
    /// Writes, when the job completed any.
    pub write: Option<DirStats>,
    /// Trims, when the job completed any.
    pub trim: Option<DirStats>,
    /// fio's `job_runtime` in ms: the sum of the runtimes of the jobs
    /// summarized.
    pub job_runtime_ms: u64,
    /// fio's `usr_cpu`: user CPU of fio, in percent of `job_runtime_ms`.
    pub usr_cpu_pct: f64,
    /// fio's `sys_cpu`: system CPU of fio, in percent of `job_runtime_ms`.
    pub sys_cpu_pct: f64,
    /// fio's `ctx`: context switches of fio.
    pub ctx: u64,
}

/// One data direction (read, write or trim) of a fio job.
#[derive(Debug, Clone, PartialEq)]
pub struct DirStats {
    /// I/Os completed (`total_ios`).
    pub total_ios: u64,
    /// Bytes transferred (`io_bytes`).
    pub io_bytes: u64,
    /// I/Os per second (`iops`).
    pub iops: f64,
    /// Bandwidth in bytes per second (`bw_bytes`).
    pub bw_bytes: f64,
    /// Runtime of this direction in ms (`runtime`).
    pub runtime_ms: u64,
    /// Which latency `lat_min_ns`, `lat_max_ns`, `lat_samples` and
    /// `lat_percentiles_ns` describe: the total latency (`lat_ns`, submission
    /// and completion) when fio reported its percentiles
    /// (`--lat_percentiles=1`), else the completion latency (`clat_ns`).
    ///
    /// The total is the one to compare servers by. fio's nbd engine sends
    /// a request inside its submission, and libnbd may already read the
    /// reply there: with a fast server the completion latency then misses
    /// most of the round trip (a p50 of 2 µs for a TCP round trip).
    pub total_latency: bool,
    /// Smallest latency, ns (`lat_ns.min`, or `clat_ns.min`: see
    /// `total_latency`).
    pub lat_min_ns: f64,
    /// Largest latency, ns.
    pub lat_max_ns: f64,
    /// Mean completion latency, ns (`clat_ns.mean`).
    pub clat_mean_ns: f64,
    /// Number of latency samples.
    pub lat_samples: u64,
    /// Latency percentiles as `(percent, ns)`, ascending (`lat_ns.percentile`
    /// or `clat_ns.percentile`: see `total_latency`).
    pub lat_percentiles_ns: Vec<(f64, f64)>,
    /// Mean total latency (submission + completion), ns (`lat_ns.mean`).
    pub lat_mean_ns: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

impl DirStats {
    /// Bandwidth in MiB/s.
    pub fn mib_s(&self) -> f64 {
        self.bw_bytes / MIB
    }
}

impl FioOutput {
    /// Parses fio's JSON output. Text before the JSON object (lines that
    /// some engines or fio itself print when output goes to stdout) and after
    /// it is ignored.
    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_from(text, "<string>")
    }

    /// Reads and parses a file written by fio's `--output=FILE`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_from(&text, &path.display().to_string())
    }

    fn parse_from(text: &str, origin: &str) -> Result<Self> {
        let start = if text.trim_start().starts_with('{') {
            0
        } else {
            text.find("\n{")
                .map(|i| i + 1)
                .ok_or_else(|| Error::FioFormat {
                    origin: origin.to_string(),
                    reason: "no JSON object in the output".to_string(),
                })?
        };
        let raw: RawOutput = serde_json::Deserializer::from_str(&text[start..])
            .into_iter()
            .next()
            .ok_or_else(|| Error::FioFormat {
                origin: origin.to_string(),
                reason: "no JSON object in the output".to_string(),
            })?
            .map_err(|source| Error::FioJson {
                origin: origin.to_string(),
                source,
            })?;
        if raw.jobs.is_empty() {
            return Err(Error::FioFormat {
                origin: origin.to_string(),
                reason: "no jobs in the output".to_string(),
            });
        }
        let global: BTreeMap<String, String> = raw
            .global
            .into_iter()
            .map(|(k, v)| (k, value_string(v)))
            .collect();
        let mut per_name: BTreeMap<(u32, String), u32> = BTreeMap::new();
        for j in &raw.jobs {
            *per_name.entry((j.groupid, j.jobname.clone())).or_default() += 1;
        }
        let jobs = raw
            .jobs
            .into_iter()
            .map(|j| {
                let mut options = global.clone();
                options.extend(j.options.into_iter().map(|(k, v)| (k, value_string(v))));
                let numjobs = options
                    .get("numjobs")
                    .and_then(|n| n.trim().parse::<u32>().ok())
                    .unwrap_or(1)
                    .max(1);
                let entries = per_name[&(j.groupid, j.jobname.clone())];
                // With group_reporting fio prints one entry for all the
                // `numjobs` clones; without it, one entry per clone.
                let group_reported = numjobs > 1 && entries == 1;
                Ok(FioJob {
                    group_reported,
                    jobs: if group_reported { numjobs } else { 1 },
                    read: j.read.map(|d| d.into_stats(origin)).transpose()?.flatten(),
                    write: j.write.map(|d| d.into_stats(origin)).transpose()?.flatten(),
                    trim: j.trim.map(|d| d.into_stats(origin)).transpose()?.flatten(),
                    name: j.jobname,
                    groupid: j.groupid,
                    error: j.error,
                    options,
                    job_runtime_ms: j.job_runtime,
                    usr_cpu_pct: j.usr_cpu,
                    sys_cpu_pct: j.sys_cpu,
                    ctx: j.ctx,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FioOutput {
            version: raw.version,
            jobs,
        })
    }

    /// All entries merged into one job: I/O counts, IOPS and bandwidth are
    /// summed, latency percentiles are those of the I/O-weighted mixture of
    /// the entries' latency distributions. With a single entry (one job, or
    /// `group_reporting` with one group) this is that entry unchanged.
    /// `None` only for an output without jobs, which [`FioOutput::parse`]
    /// never returns.
    pub fn total(&self) -> Option<FioJob> {
        FioJob::merge(&self.jobs)
    }

    /// One job per `groupid`, merging the entries of each group (what
    /// `group_reporting` would have printed, up to the approximation of the
    /// latency percentiles described in [`FioOutput::total`]).
    pub fn groups(&self) -> Vec<FioJob> {
        let mut by_group: BTreeMap<u32, Vec<FioJob>> = BTreeMap::new();
        for j in &self.jobs {
            by_group.entry(j.groupid).or_default().push(j.clone());
        }
        by_group
            .values()
            .filter_map(|jobs| FioJob::merge(jobs))
            .collect()
    }
}

impl FioJob {
    /// The directions that completed I/O, in read, write, trim order.
    pub fn dirs(&self) -> impl Iterator<Item = &DirStats> {
        [&self.read, &self.write, &self.trim]
            .into_iter()
            .filter_map(Option::as_ref)
    }

    /// Whether the job both read and wrote.
    pub fn is_mixed(&self) -> bool {
        self.read.is_some() && self.write.is_some()
    }

    /// Total I/Os per second over all directions.
    pub fn iops(&self) -> f64 {
        self.dirs().map(|d| d.iops).sum()
    }

    /// Total bandwidth over all directions, MiB/s.
    pub fn mib_s(&self) -> f64 {
        self.dirs().map(DirStats::mib_s).sum()
    }

    /// Total I/Os completed over all directions.
    pub fn total_ios(&self) -> u64 {
        self.dirs().map(|d| d.total_ios).sum()
    }

    /// The longest runtime of a direction, ms (the wall time of the job).
    pub fn runtime_ms(&self) -> u64 {
        self.dirs().map(|d| d.runtime_ms).max().unwrap_or(0)
    }

    /// Mean total latency (`lat_ns.mean`) over all I/Os, µs.
    pub fn lat_mean_us(&self) -> f64 {
        self.weighted_mean(|d| d.lat_mean_ns) / 1000.0
    }

    /// Mean completion latency (`clat_ns.mean`) over all I/Os, µs.
    pub fn clat_mean_us(&self) -> f64 {
        self.weighted_mean(|d| d.clat_mean_ns) / 1000.0
    }

    fn weighted_mean(&self, f: impl Fn(&DirStats) -> f64) -> f64 {
        let n: f64 = self.dirs().map(|d| d.total_ios as f64).sum();
        if n == 0.0 {
            return 0.0;
        }
        self.dirs().map(|d| f(d) * d.total_ios as f64).sum::<f64>() / n
    }

    /// Latency percentile `pct` (0..=100) over all directions, µs: total
    /// latency when fio reported it, else completion latency (see
    /// [`DirStats::total_latency`]).
    /// For a single direction at a percentile fio reported this is fio's
    /// value; between them it is interpolated; for a mixed job it is the
    /// percentile of the I/O-weighted mixture of the directions.
    /// `None` when fio reported no percentiles.
    pub fn lat_percentile_us(&self, pct: f64) -> Option<f64> {
        let dirs: Vec<&DirStats> = self.dirs().collect();
        mixture_percentile(&dirs, pct).map(|ns| ns / 1000.0)
    }

    /// The latency CDF (total or completion, see
    /// [`DirStats::total_latency`]) over all directions as `(µs, fraction)`
    /// points, ascending, from `(min, 0.0)` to `(max, 1.0)`; empty when fio
    /// reported no percentiles.
    pub fn latency_cdf_us(&self) -> Vec<(f64, f64)> {
        let dirs: Vec<&DirStats> = self.dirs().collect();
        mixture_cdf(&dirs)
            .into_iter()
            .map(|(ns, f)| (ns / 1000.0, f))
            .collect()
    }

    /// CPU time fio itself used (user + system), seconds.
    pub fn cpu_s(&self) -> f64 {
        (self.usr_cpu_pct + self.sys_cpu_pct) / 100.0 * self.job_runtime_ms as f64 / 1000.0
    }

    /// Merges several entries (see [`FioOutput::total`]); `None` if `jobs`
    /// is empty, the entry itself if there is one.
    pub fn merge(jobs: &[FioJob]) -> Option<FioJob> {
        let first = jobs.first()?;
        if jobs.len() == 1 {
            return Some(first.clone());
        }
        let name = if jobs.iter().all(|j| j.name == first.name) {
            first.name.clone()
        } else {
            jobs.iter()
                .map(|j| j.name.as_str())
                .collect::<Vec<_>>()
                .join("+")
        };
        let job_runtime_ms: u64 = jobs.iter().map(|j| j.job_runtime_ms).sum();
        let cpu_pct = |f: fn(&FioJob) -> f64| {
            if job_runtime_ms == 0 {
                jobs.iter().map(f).sum::<f64>() / jobs.len() as f64
            } else {
                jobs.iter()
                    .map(|j| f(j) * j.job_runtime_ms as f64)
                    .sum::<f64>()
                    / job_runtime_ms as f64
            }
        };
        let dir = |f: fn(&FioJob) -> Option<&DirStats>| {
            let ds: Vec<&DirStats> = jobs.iter().filter_map(f).collect();
            merge_dirs(&ds)
        };
        Some(FioJob {
            name,
            groupid: if jobs.iter().all(|j| j.groupid == first.groupid) {
                first.groupid
            } else {
                0
            },
            error: jobs.iter().map(|j| j.error).find(|&e| e != 0).unwrap_or(0),
            jobs: jobs.iter().map(|j| j.jobs).sum(),
            group_reported: false,
            options: first.options.clone(),
            read: dir(|j| j.read.as_ref()),
            write: dir(|j| j.write.as_ref()),
            trim: dir(|j| j.trim.as_ref()),
            job_runtime_ms,
            usr_cpu_pct: cpu_pct(|j| j.usr_cpu_pct),
            sys_cpu_pct: cpu_pct(|j| j.sys_cpu_pct),
            ctx: jobs.iter().map(|j| j.ctx).sum(),
        })
    }
}

fn merge_dirs(ds: &[&DirStats]) -> Option<DirStats> {
    let first = *ds.first()?;
    if ds.len() == 1 {
        return Some(first.clone());
    }
    let n: u64 = ds.iter().map(|d| d.total_ios).sum();
    let mean = |f: fn(&DirStats) -> f64| {
        if n == 0 {
            0.0
        } else {
            ds.iter().map(|d| f(d) * d.total_ios as f64).sum::<f64>() / n as f64
        }
    };
    let mut pcts: Vec<f64> = ds
        .iter()
        .flat_map(|d| d.lat_percentiles_ns.iter().map(|&(p, _)| p))
        .collect();
    pcts.sort_by(f64::total_cmp);
    pcts.dedup();
    let lat_percentiles_ns = pcts
        .into_iter()
        .filter_map(|p| mixture_percentile(ds, p).map(|ns| (p, ns)))
        .collect();
    Some(DirStats {
        total_ios: n,
        io_bytes: ds.iter().map(|d| d.io_bytes).sum(),
        iops: ds.iter().map(|d| d.iops).sum(),
        bw_bytes: ds.iter().map(|d| d.bw_bytes).sum(),
        runtime_ms: ds.iter().map(|d| d.runtime_ms).max().unwrap_or(0),
        total_latency: ds.iter().all(|d| d.total_latency),
        lat_min_ns: ds
            .iter()
            .map(|d| d.lat_min_ns)
            .fold(f64::INFINITY, f64::min),
        lat_max_ns: ds.iter().map(|d| d.lat_max_ns).fold(0.0, f64::max),
        clat_mean_ns: mean(|d| d.clat_mean_ns),
        lat_samples: ds.iter().map(|d| d.lat_samples).sum(),
        lat_percentiles_ns,
        lat_mean_ns: mean(|d| d.lat_mean_ns),
    })
}

/// The piecewise-linear CDF of one direction: `(ns, fraction)` points with
/// non-decreasing ns, from `(min, 0)` to `(max, 1)`.
fn dir_cdf(d: &DirStats) -> Option<Vec<(f64, f64)>> {
    if d.lat_percentiles_ns.is_empty() || d.total_ios == 0 {
        return None;
    }
    let mut pts = Vec::with_capacity(d.lat_percentiles_ns.len() + 2);
    let first = d.lat_percentiles_ns[0].1;
    pts.push((d.lat_min_ns.min(first), 0.0));
    let mut x = 0.0f64;
    for &(p, ns) in &d.lat_percentiles_ns {
        // fio reports bucket values: keep them monotonic.
        x = x.max(ns);
        pts.push((x, p / 100.0));
    }
    pts.push((d.lat_max_ns.max(x), 1.0));
    Some(pts)
}

/// Value of a piecewise-linear CDF at `x` (right-continuous at jumps).
fn cdf_at(pts: &[(f64, f64)], x: f64) -> f64 {
    let j = pts.partition_point(|&(px, _)| px <= x);
    if j == 0 {
        return 0.0;
    }
    if j == pts.len() {
        return 1.0;
    }
    let (x0, f0) = pts[j - 1];
    let (x1, f1) = pts[j];
    f0 + (f1 - f0) * (x - x0) / (x1 - x0)
}

/// The I/O-weighted mixture of the directions' CDFs, evaluated at the union
/// of their breakpoints (where it is exact, and linear in between).
fn mixture_cdf(dirs: &[&DirStats]) -> Vec<(f64, f64)> {
    let comps: Vec<(f64, Vec<(f64, f64)>)> = dirs
        .iter()
        .filter_map(|d| dir_cdf(d).map(|c| (d.total_ios as f64, c)))
        .collect();
    let total: f64 = comps.iter().map(|(w, _)| w).sum();
    if comps.is_empty() || total == 0.0 {
        return Vec::new();
    }
    let mut xs: Vec<f64> = comps
        .iter()
        .flat_map(|(_, c)| c.iter().map(|&(x, _)| x))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut out: Vec<(f64, f64)> = xs
        .into_iter()
        .map(|x| {
            let f = comps.iter().map(|(w, c)| w * cdf_at(c, x)).sum::<f64>() / total;
            (x, f.clamp(0.0, 1.0))
        })
        .collect();
    // Start at 0: when fio's first percentile equals the minimum the CDF
    // jumps there.
    if out[0].1 > 0.0 {
        out.insert(0, (out[0].0, 0.0));
    }
    out
}

fn mixture_percentile(dirs: &[&DirStats], pct: f64) -> Option<f64> {
    if let [d] = dirs
        && let Some(&(_, ns)) = d
            .lat_percentiles_ns
            .iter()
            .find(|&&(p, _)| (p - pct).abs() < 1e-9)
    {
        return Some(ns);
    }
    let cdf = mixture_cdf(dirs);
    let q = (pct / 100.0).clamp(0.0, 1.0);
    let k = cdf.iter().position(|&(_, f)| f >= q)?;
    if k == 0 {
        return Some(cdf[0].0);
    }
    let (x0, f0) = cdf[k - 1];
    let (x1, f1) = cdf[k];
    if f1 <= f0 {
        return Some(x1);
    }
    Some(x0 + (q - f0) / (f1 - f0) * (x1 - x0))
}

fn value_string(v: serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
struct RawOutput {
    #[serde(rename = "fio version", default)]
    version: String,
    #[serde(rename = "global options", default)]
    global: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    jobs: Vec<RawJob>,
}

#[derive(Deserialize)]
struct RawJob {
    jobname: String,
    #[serde(default)]
    groupid: u32,
    #[serde(default)]
    error: i64,
    #[serde(rename = "job options", default)]
    options: BTreeMap<String, serde_json::Value>,
    read: Option<RawDir>,
    write: Option<RawDir>,
    trim: Option<RawDir>,
    #[serde(default)]
    job_runtime: u64,
    #[serde(default)]
    usr_cpu: f64,
    #[serde(default)]
    sys_cpu: f64,
    #[serde(default)]
    ctx: u64,
}

#[derive(Deserialize)]
struct RawDir {
    io_bytes: u64,
    bw_bytes: f64,
    iops: f64,
    runtime: u64,
    total_ios: u64,
    clat_ns: RawLat,
    lat_ns: RawLat,
}

#[derive(Deserialize)]
struct RawLat {
    #[serde(default)]
    min: f64,
    #[serde(default)]
    max: f64,
    #[serde(default)]
    mean: f64,
    #[serde(rename = "N", default)]
    n: u64,
    percentile: Option<BTreeMap<String, f64>>,
}

impl RawDir {
    /// `None` for a direction without I/O.
    fn into_stats(self, origin: &str) -> Result<Option<DirStats>> {
        if self.total_ios == 0 {
            return Ok(None);
        }
        let total_latency = self
            .lat_ns
            .percentile
            .as_ref()
            .is_some_and(|m| !m.is_empty());
        let lat = if total_latency {
            &self.lat_ns
        } else {
            &self.clat_ns
        };
        let mut lat_percentiles_ns = Vec::new();
        for (k, &ns) in lat.percentile.iter().flatten() {
            let p: f64 = k.trim().parse().map_err(|_| Error::FioFormat {
                origin: origin.to_string(),
                reason: format!("percentile key {k:?} is not a number"),
            })?;
            lat_percentiles_ns.push((p, ns));
        }
        lat_percentiles_ns.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Some(DirStats {
            total_ios: self.total_ios,
            io_bytes: self.io_bytes,
            iops: self.iops,
            bw_bytes: self.bw_bytes,
            runtime_ms: self.runtime,
            total_latency,
            lat_min_ns: lat.min,
            lat_max_ns: lat.max,
            clat_mean_ns: self.clat_ns.mean,
            lat_samples: lat.n,
            lat_percentiles_ns,
            lat_mean_ns: self.lat_ns.mean,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(ios: u64, pcts: &[(f64, f64)], min: f64, max: f64) -> DirStats {
        DirStats {
            total_ios: ios,
            io_bytes: ios * 4096,
            iops: ios as f64,
            bw_bytes: ios as f64 * 4096.0,
            runtime_ms: 1000,
            total_latency: false,
            lat_min_ns: min,
            lat_max_ns: max,
            clat_mean_ns: 0.0,
            lat_samples: ios,
            lat_percentiles_ns: pcts.to_vec(),
            lat_mean_ns: 0.0,
        }
    }

    #[test]
    fn cdf_interpolates_and_is_right_continuous() {
        let pts = [(10.0, 0.0), (20.0, 0.5), (20.0, 0.9), (30.0, 1.0)];
        assert_eq!(cdf_at(&pts, 5.0), 0.0);
        assert_eq!(cdf_at(&pts, 15.0), 0.25);
        assert_eq!(cdf_at(&pts, 20.0), 0.9);
        assert!((cdf_at(&pts, 25.0) - 0.95).abs() < 1e-12);
        assert_eq!(cdf_at(&pts, 30.0), 1.0);
        assert_eq!(cdf_at(&pts, 31.0), 1.0);
    }

    #[test]
    fn mixture_of_two_disjoint_directions() {
        // Reads all in [100, 200], writes (3x as many) all in [300, 400].
        let r = dir(100, &[(50.0, 150.0)], 100.0, 200.0);
        let w = dir(300, &[(50.0, 350.0)], 300.0, 400.0);
        let dirs = [&r, &w];
        // The reads are the first quarter of the mixture.
        assert!((mixture_percentile(&dirs, 12.5).unwrap() - 150.0).abs() < 1e-9);
        assert!((mixture_percentile(&dirs, 25.0).unwrap() - 200.0).abs() < 1e-9);
        // The median of the mixture is at the writes' 1/3 point: 300 + 100/3.
        let p50 = mixture_percentile(&dirs, 50.0).unwrap();
        assert!((p50 - (300.0 + 100.0 / 3.0)).abs() < 1e-9, "{p50}");
        let cdf = mixture_cdf(&dirs);
        assert_eq!(cdf.first(), Some(&(100.0, 0.0)));
        assert_eq!(cdf.last(), Some(&(400.0, 1.0)));
        assert!(cdf.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn merge_sums_counts_and_keeps_a_single_entry_unchanged() {
        let a = dir(100, &[(50.0, 150.0)], 100.0, 200.0);
        let b = dir(300, &[(50.0, 150.0)], 120.0, 180.0);
        let m = merge_dirs(&[&a, &b]).unwrap();
        assert_eq!(m.total_ios, 400);
        assert_eq!(m.iops, 400.0);
        assert_eq!(m.lat_min_ns, 100.0);
        assert_eq!(m.lat_max_ns, 200.0);
        // Both medians are 150: so is the mixture's.
        assert!((m.lat_percentiles_ns[0].1 - 150.0).abs() < 1e-9);
        assert_eq!(merge_dirs(&[&a]).unwrap(), a);
    }

    #[test]
    fn leading_text_is_skipped_and_garbage_is_an_error() {
        let json = r#"{"fio version":"fio-3.33","jobs":[{"jobname":"j","groupid":0,
            "read":{"io_bytes":4096,"bw_bytes":4096,"iops":1.0,"runtime":1000,"total_ios":1,
              "clat_ns":{"min":5,"max":5,"mean":5.0,"N":1,"percentile":{"50.000000":5}},
              "lat_ns":{"min":6,"max":6,"mean":6.0,"N":1}},
            "job_runtime":1000,"usr_cpu":1.0,"sys_cpu":2.0,"ctx":3}]}"#;
        let out = FioOutput::parse(&format!("nbd: connected\n{json}\ntrailer")).unwrap();
        assert_eq!(out.jobs.len(), 1);
        assert_eq!(out.jobs[0].lat_percentile_us(50.0), Some(0.005));
        assert!(out.jobs[0].write.is_none());
        assert!(matches!(
            FioOutput::parse("no json here"),
            Err(Error::FioFormat { .. })
        ));
        assert!(matches!(
            FioOutput::parse("{\"jobs\": [}"),
            Err(Error::FioJson { .. })
        ));
        assert!(matches!(
            FioOutput::parse("{\"jobs\": []}"),
            Err(Error::FioFormat { .. })
        ));
    }
}
