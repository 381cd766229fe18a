//! `dvma bench` results: fio output parsing, the `results.json` data model,
//! aggregation of repeated runs, and the `report.md` + SVG report.
//!
//! The flow used by `dvma bench`:
//!
//! 1. run fio with `--output-format=json --output=FILE` and parse the file
//!    with [`FioOutput::from_file`] (one [`FioJob`] per fio job entry, or per
//!    group with `group_reporting`; [`FioOutput::total`] merges them);
//! 2. build a [`Run`] per fio invocation with [`Run::from_fio`], from the
//!    parsed job, the configuration ([`RunConfig`]) and what was measured on
//!    the server side ([`ServerSample`]);
//! 3. collect the runs in [`Results`] and call [`write_report`], which writes
//!    `results.json`, `report.md` and `plots/*.svg`.
//!
//! [`analyze`] exposes the aggregation (medians, spread, ratios to the peer
//! servers) that the report is rendered from.
//!
//! # `results.json`
//!
//! The serde form of [`Results`] (`null` for absent optional values; a
//! reader accepts them missing):
//!
//! ```text
//! {
//!   "runs": [{
//!     "server": "dvma" | "nbdkit" | "qemu-nbd",
//!     "dvma_mode": "strict" | "lazy" | "slots" | "permanent" | "shadow" | null,
//!     "completion": "intr" | "softint" | "thread" | "ast" | null,
//!     "spl": "lazy" | "mask" | null,
//!     "intr_stack": bool | null,
//!     "cpus": u32 | null,
//!     "workload": "randread-4k-qd1",   // blocks >= 64k in the name: MiB/s compared
//!     "rep": u32,
//!     "iops": f64, "mib_s": f64, "p50_us": f64, "p99_us": f64,
//!     "cpu_us_per_io": f64,            // server CPU (user+sys) per I/O
//!     "latency_cdf": [[us, fraction], ...],
//!     "per_io": {"interrupts": f64, "signals": f64, "softints": f64, "ctx_switches": f64,
//!                "asts": f64, "iommu_faults": f64} | null,
//!     "dvma_pages_held": u64 | null,
//!     "protection": string | null
//!   }],
//!   "micro": {nested object of numbers} | null,
//!   "machine": {"cpus": u32, "model": string, "kernel": string, "date": string},
//!   "duration_s": f64,
//!   "quick": bool,
//!   "protections": [[mode, description], ...],
//!   "kernel": {kernel.json of `dvma bench kernel`} | null
//! }
//! ```
//!
//! `kernel` is the in-kernel answer (every DVMA mode x completion mode on a
//! zero-latency disk, ranked with ties, the mail's questions answered):
//! `dvma bench kernel`'s `kernel.json` as written (its `schema` says which;
//! every field is documented in `src/bench/kernel/report.rs` of the `dvma`
//! crate). `dvma bench` adds it, and its section of `report.md`, after
//! this crate writes them; this crate carries it through unread.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod aggregate;
mod fio;
mod markdown;
mod model;
mod plot;

use std::path::PathBuf;

pub use aggregate::{
    Aggregate, Analysis, Axis, AxisGroup, ConfigKey, HeadlineRow, Metric, PeerStatus,
    RATIO_SPREAD_LIMIT, Ratio, RepSample, Stat, WorkloadAnalysis, aggregate, analyze,
};
pub use fio::{DirStats, FioJob, FioOutput};
pub use markdown::{esc, render_markdown, render_micro, us};
pub use model::{
    COMPLETION_MODES, Counters, DVMA_MODES, DVMA_SERVER, MachineInfo, PEERS, PerIo, Results, Run,
    RunConfig, ServerSample,
};
pub use plot::{Curve, StackedBar, plot_bars, plot_cdf, plot_curves, plot_stacked};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing", "creating directory").
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// fio's output is not valid JSON (or not the JSON shape fio 3.x writes).
    #[error("fio output {origin}: invalid JSON: {source}")]
    FioJson {
        /// Where the output came from (a file name, or `<string>`).
        origin: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// fio's output parsed, but does not contain what is needed.
    #[error("fio output {origin}: {reason}")]
    FioFormat {
        /// Where the output came from (a file name, or `<string>`).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A fio job cannot be turned into a [`Run`].
    #[error("fio job {job}: {reason}")]
    FioJob {
        /// The fio job name.
        job: String,
        /// Why (failed job, no I/O, no latency percentiles...).
        reason: String,
    },
    /// `results.json` could not be written or read.
    #[error("results JSON: {source}")]
    ResultsJson {
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A plot could not be drawn.
    #[error("plot {path}: {message}")]
    Plot {
        /// The SVG file being drawn.
        path: PathBuf,
        /// plotters' error message.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The files written by [`write_report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// `DIR/results.json`.
    pub results_json: PathBuf,
    /// `DIR/report.md`.
    pub report_md: PathBuf,
    /// `DIR/plots/<workload>.svg` and `DIR/plots/cdf-<workload>.svg`, in
    /// workload order (bar chart first, then its CDF).
    pub plots: Vec<PathBuf>,
}

/// Writes `dir/results.json`, `dir/plots/*.svg` and `dir/report.md` for
/// `results`, creating `dir` and `dir/plots` if needed.
pub fn write_report(dir: impl AsRef<std::path::Path>, results: &Results) -> Result<ReportFiles> {
    let dir = dir.as_ref();
    let plots_dir = dir.join("plots");
    std::fs::create_dir_all(&plots_dir).map_err(|source| Error::Io {
        op: "creating directory",
        path: plots_dir.clone(),
        source,
    })?;

    let results_json = dir.join("results.json");
    let json = results.to_json()?;
    write_file(&results_json, json.as_bytes())?;

    let analysis = analyze(results);
    let mut plots = Vec::new();
    for w in &analysis.workloads {
        let stem = markdown::file_stem(&w.workload);
        let bars = plots_dir.join(format!("{stem}.svg"));
        write_file(
            &bars,
            plot_bars(w).map_err(|m| plot_err(&bars, m))?.as_bytes(),
        )?;
        plots.push(bars);
        let cdf = plots_dir.join(format!("cdf-{stem}.svg"));
        write_file(&cdf, plot_cdf(w).map_err(|m| plot_err(&cdf, m))?.as_bytes())?;
        plots.push(cdf);
    }

    let report_md = dir.join("report.md");
    write_file(&report_md, render_markdown(results, &analysis).as_bytes())?;
    Ok(ReportFiles {
        results_json,
        report_md,
        plots,
    })
}

fn plot_err(path: &std::path::Path, message: String) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        message,
    }
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        op: "writing",
        path: path.to_path_buf(),
        source,
    })
}
