//! The data model of `results.json`: the contract between `dvma bench` and
//! the report.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, FioJob, Result};

/// [`Run::server`] of runs against `dvma serve`.
pub const DVMA_SERVER: &str = "dvma";
/// The peer servers `dvma bench` compares against, in report order. A report
/// says so when one of them has no runs.
pub const PEERS: [&str; 2] = ["nbdkit", "qemu-nbd"];
/// The DVMA modes, in report order (matrix rows). Other modes found in the
/// runs are listed after these.
pub const DVMA_MODES: [&str; 5] = ["strict", "lazy", "slots", "permanent", "shadow"];
/// The completion modes, in report order (matrix columns). Other modes found
/// in the runs are listed after these.
pub const COMPLETION_MODES: [&str; 4] = ["intr", "softint", "thread", "ast"];

/// One fio run against one server configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// `"dvma"`, `"nbdkit"` or `"qemu-nbd"`.
    pub server: String,
    /// DVMA mode (`strict`, `lazy`, `slots`, `permanent`, `shadow`); `None`
    /// for peers.
    #[serde(default)]
    pub dvma_mode: Option<String>,
    /// Completion mode (`intr`, `softint`, `thread`, `ast`); `None` for peers.
    #[serde(default)]
    pub completion: Option<String>,
    /// spl implementation (`lazy`, `mask`), when the run sets it.
    #[serde(default)]
    pub spl: Option<String>,
    /// Whether interrupts run on a separate interrupt stack, when the run
    /// sets it.
    #[serde(default)]
    pub intr_stack: Option<bool>,
    /// Number of CPUs of the dvma kernel, when the run sets it.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Workload name, e.g. `randread-4k-qd1`, `seqread-1m-qd8`.
    pub workload: String,
    /// Repetition number (runs of different configurations are interleaved).
    pub rep: u32,
    /// I/Os per second (all directions).
    pub iops: f64,
    /// Bandwidth in MiB/s (all directions).
    pub mib_s: f64,
    /// Median latency (total when fio reported it: `DirStats::total_latency`), µs.
    pub p50_us: f64,
    /// 99th percentile latency (as `p50_us`), µs.
    pub p99_us: f64,
    /// Server CPU time (user + system) per I/O, µs.
    pub cpu_us_per_io: f64,
    /// Completion latency CDF: `(µs, fraction of I/Os)` points, ascending.
    #[serde(default)]
    pub latency_cdf: Vec<(f64, f64)>,
    /// Server-side kernel events per I/O (dvma only).
    #[serde(default)]
    pub per_io: Option<PerIo>,
    /// DVMA pages held at the end of the run (dvma only).
    #[serde(default)]
    pub dvma_pages_held: Option<u64>,
    /// The protection the DVMA mode gives, in words (dvma only).
    #[serde(default)]
    pub protection: Option<String>,
}

/// Server-side kernel events per I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PerIo {
    /// Device interrupts per I/O (handler runs).
    pub interrupts: f64,
    /// Host signals taken per I/O: the interrupts that had to interrupt
    /// a running CPU or wake a sleeping one (the others were found in the
    /// pending word). Absent from reports made before it was counted.
    #[serde(default)]
    pub signals: f64,
    /// Software interrupts per I/O.
    pub softints: f64,
    /// Context switches per I/O.
    pub ctx_switches: f64,
    /// ASTs per I/O.
    pub asts: f64,
    /// IOMMU faults per I/O.
    pub iommu_faults: f64,
}

/// The machine the benchmark ran on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// Online CPUs.
    pub cpus: u32,
    /// CPU model name.
    pub model: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// TCP congestion control of new connections
    /// (`net.ipv4.tcp_congestion_control`). Every server's loopback
    /// connections use it, and it shapes large transfers: under `bbr` a
    /// flow whose segments arrive out of order is paced (see
    /// docs/bench/rtc.md, "seqread: the gap is TCP's").
    #[serde(default)]
    pub tcp_congestion: String,
    /// How the host idles a CPU with nothing to run: the cpuidle driver
    /// and, with the guest `haltpoll` driver, how long it polls before it
    /// halts (`guest_halt_poll_ns`), e.g. `haltpoll, guest_halt_poll_ns 0`.
    /// At queue depth 1 a client sleeps between requests, so this sets
    /// what each reply costs to wake it: on a VM that halts at once, an
    /// IPI to a halted vCPU (docs/bench/rtc.md, "qd1: the client's
    /// wake-up"). Empty when it cannot be read.
    #[serde(default)]
    pub cpu_idle: String,
    /// When the benchmark ran (free text, e.g. RFC 3339).
    pub date: String,
}

/// Everything `dvma bench` measured: the content of `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Every fio run, in the order they ran.
    pub runs: Vec<Run>,
    /// Micro-benchmark results: a nested JSON object whose leaves are
    /// numbers (rendered generically, whatever its keys).
    #[serde(default)]
    pub micro: Option<serde_json::Value>,
    /// The machine.
    pub machine: MachineInfo,
    /// Wall time of the whole benchmark, seconds.
    pub duration_s: f64,
    /// Whether this was a quick (shortened) benchmark.
    #[serde(default)]
    pub quick: bool,
    /// The protection each DVMA mode gives: `(mode, description)`, in the
    /// order to show. When empty, the report uses [`Run::protection`].
    #[serde(default)]
    pub protections: Vec<(String, String)>,
    /// The kernel bench's answer (`dvma bench kernel`'s `kernel.json`,
    /// schema `dvma-bench-kernel/3`, documented in
    /// `src/bench/kernel/report.rs`), if the run included it.
    #[serde(default)]
    pub kernel: Option<serde_json::Value>,
}

impl Results {
    /// `results.json`'s text (pretty-printed).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|source| Error::ResultsJson { source })
    }

    /// Parses `results.json`'s text.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| Error::ResultsJson { source })
    }

    /// Reads a `results.json` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }
}

impl MachineInfo {
    /// Describes this machine from `/proc` (CPU count, model, kernel
    /// release, TCP congestion control, CPU idle policy); fields that
    /// cannot be read are left empty. `date` is taken as given.
    pub fn detect(date: impl Into<String>) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let tcp_congestion = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        MachineInfo {
            cpus,
            model,
            kernel,
            tcp_congestion,
            cpu_idle: detect_cpu_idle(),
            date: date.into(),
        }
    }
}

/// The host's CPU idle policy (see [`MachineInfo::cpu_idle`]).
fn detect_cpu_idle() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .ok()
    };
    let Some(driver) = read("/sys/devices/system/cpu/cpuidle/current_driver") else {
        return String::new();
    };
    match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        Some(ns) if driver == "haltpoll" => format!("{driver}, guest_halt_poll_ns {ns}"),
        _ => driver,
    }
}

/// The server configuration of a run (the [`Run`] fields that are not
/// measurements).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// See [`Run::server`].
    pub server: String,
    /// See [`Run::dvma_mode`].
    pub dvma_mode: Option<String>,
    /// See [`Run::completion`].
    pub completion: Option<String>,
    /// See [`Run::spl`].
    pub spl: Option<String>,
    /// See [`Run::intr_stack`].
    pub intr_stack: Option<bool>,
    /// See [`Run::cpus`].
    pub cpus: Option<u32>,
    /// See [`Run::protection`].
    pub protection: Option<String>,
}

impl RunConfig {
    /// A peer server (`"nbdkit"`, `"qemu-nbd"`).
    pub fn peer(server: impl Into<String>) -> Self {
        RunConfig {
            server: server.into(),
            ..RunConfig::default()
        }
    }

    /// `dvma serve` in a DVMA mode and completion mode.
    pub fn dvma(mode: impl Into<String>, completion: impl Into<String>) -> Self {
        RunConfig {
            server: DVMA_SERVER.to_string(),
            dvma_mode: Some(mode.into()),
            completion: Some(completion.into()),
            ..RunConfig::default()
        }
    }

    /// Sets the spl implementation.
    pub fn with_spl(mut self, spl: impl Into<String>) -> Self {
        self.spl = Some(spl.into());
        self
    }

    /// Sets whether the interrupt stack is used.
    pub fn with_intr_stack(mut self, on: bool) -> Self {
        self.intr_stack = Some(on);
        self
    }

    /// Sets the number of CPUs.
    pub fn with_cpus(mut self, cpus: u32) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// Sets the protection description of the DVMA mode.
    pub fn with_protection(mut self, protection: impl Into<String>) -> Self {
        self.protection = Some(protection.into());
        self
    }
}

/// Server-side kernel event counts over one run (differences of counters
/// read before and after the run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Device interrupts.
    pub interrupts: u64,
    /// Host signals taken.
    pub signals: u64,
    /// Software interrupts.
    pub softints: u64,
    /// Context switches.
    pub ctx_switches: u64,
    /// ASTs.
    pub asts: u64,
    /// IOMMU faults.
    pub iommu_faults: u64,
}

impl Counters {
    /// `self - before`, field by field (saturating at 0): the events between
    /// two readings of cumulative counters.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            interrupts: self.interrupts.saturating_sub(before.interrupts),
            signals: self.signals.saturating_sub(before.signals),
            softints: self.softints.saturating_sub(before.softints),
            ctx_switches: self.ctx_switches.saturating_sub(before.ctx_switches),
            asts: self.asts.saturating_sub(before.asts),
            iommu_faults: self.iommu_faults.saturating_sub(before.iommu_faults),
        }
    }

    /// The counts divided by `ios` (all zero when `ios` is 0).
    pub fn per_io(&self, ios: u64) -> PerIo {
        let d = if ios == 0 { f64::INFINITY } else { ios as f64 };
        PerIo {
            interrupts: self.interrupts as f64 / d,
            signals: self.signals as f64 / d,
            softints: self.softints as f64 / d,
            ctx_switches: self.ctx_switches as f64 / d,
            asts: self.asts as f64 / d,
            iommu_faults: self.iommu_faults as f64 / d,
        }
    }
}

/// What was measured on the server side during one run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerSample {
    /// CPU time (user + system) the server process used during the run,
    /// seconds.
    pub cpu_s: f64,
    /// Kernel event counts during the run (dvma only).
    pub counters: Option<Counters>,
    /// DVMA pages held at the end of the run (dvma only).
    pub dvma_pages_held: Option<u64>,
}

/// The percentiles every run reports.
const P50: f64 = 50.0;
const P99: f64 = 99.0;

impl Run {
    /// A run from a parsed fio job (use [`crate::FioOutput::total`] when fio
    /// printed several entries), its configuration, and what the server side
    /// measured. IOPS, MiB/s, latencies and the CDF come from fio (all
    /// directions: a mixed job counts reads and writes); per-I/O figures
    /// divide the server's CPU time and counters by fio's total I/Os.
    ///
    /// Fails if the job reported an error, completed no I/O, or has no
    /// completion latency percentiles.
    pub fn from_fio(
        job: &FioJob,
        config: &RunConfig,
        workload: impl Into<String>,
        rep: u32,
        server: &ServerSample,
    ) -> Result<Run> {
        let fail = |reason: String| Error::FioJob {
            job: job.name.clone(),
            reason,
        };
        if job.error != 0 {
            return Err(fail(format!("fio reported error {}", job.error)));
        }
        let ios = job.total_ios();
        if ios == 0 {
            return Err(fail("no I/O completed".to_string()));
        }
        let (Some(p50_us), Some(p99_us)) = (job.lat_percentile_us(P50), job.lat_percentile_us(P99))
        else {
            return Err(fail("no latency percentiles".to_string()));
        };
        let run = Run {
            server: config.server.clone(),
            dvma_mode: config.dvma_mode.clone(),
            completion: config.completion.clone(),
            spl: config.spl.clone(),
            intr_stack: config.intr_stack,
            cpus: config.cpus,
            workload: workload.into(),
            rep,
            iops: job.iops(),
            mib_s: job.mib_s(),
            p50_us,
            p99_us,
            cpu_us_per_io: server.cpu_s * 1e6 / ios as f64,
            latency_cdf: job.latency_cdf_us(),
            per_io: server.counters.map(|c| c.per_io(ios)),
            dvma_pages_held: server.dvma_pages_held,
            protection: config.protection.clone(),
        };
        let finite = [
            run.iops,
            run.mib_s,
            run.p50_us,
            run.p99_us,
            run.cpu_us_per_io,
        ]
        .into_iter()
        .chain(run.latency_cdf.iter().flat_map(|&(x, f)| [x, f]))
        .all(f64::is_finite);
        if !finite {
            return Err(fail("non-finite measurement".to_string()));
        }
        Ok(run)
    }

    /// The configuration part of this run.
    pub fn config(&self) -> RunConfig {
        RunConfig {
            server: self.server.clone(),
            dvma_mode: self.dvma_mode.clone(),
            completion: self.completion.clone(),
            spl: self.spl.clone(),
            intr_stack: self.intr_stack,
            cpus: self.cpus,
            protection: self.protection.clone(),
        }
    }

    /// Whether this is a run of `dvma serve`.
    pub fn is_dvma(&self) -> bool {
        self.server == DVMA_SERVER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_since_and_per_io() {
        let before = Counters {
            interrupts: 10,
            signals: 2,
            softints: 5,
            ctx_switches: 100,
            asts: 0,
            iommu_faults: 7,
        };
        let after = Counters {
            interrupts: 30,
            signals: 6,
            softints: 5,
            ctx_switches: 140,
            asts: 4,
            // A counter that went backwards (reset) counts as 0.
            iommu_faults: 3,
        };
        let d = after.since(&before);
        assert_eq!(
            d,
            Counters {
                interrupts: 20,
                signals: 4,
                softints: 0,
                ctx_switches: 40,
                asts: 4,
                iommu_faults: 0,
            }
        );
        let p = d.per_io(8);
        assert_eq!((p.interrupts, p.ctx_switches, p.asts), (2.5, 5.0, 0.5));
        assert_eq!(p.signals, 0.5);
        assert_eq!(d.per_io(0), PerIo::default());
    }
}
