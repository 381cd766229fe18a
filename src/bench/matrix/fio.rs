//! Running fio with its nbd engine, one job per workload, JSON output to a
//! file parsed by the report crate.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use report::{FioJob, FioOutput};

use super::plan::{Timing, Workload};
use super::server::tail;

/// How long fio may run past its ramp + runtime (start-up, output) before
/// it is taken for hung and killed.
pub const GRACE: Duration = Duration::from_secs(10);

/// How the error of a hung fio starts.
pub const HUNG: &str = "hung";

/// The latency percentiles fio reports (of the total latency: `args`): enough points for the
/// CDF plots, with p50 and p99 among them.
pub const PERCENTILES: &str = "1:5:10:20:30:40:50:60:70:80:90:95:99:99.5:99.9:99.99";

/// Checks that fio exists and has its nbd engine; returns its version.
pub fn check() -> Result<String, String> {
    let v = Command::new("fio")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    if !v.status.success() {
        return Err(format!("fio --version: {}", v.status));
    }
    let nbd = Command::new("fio")
        .arg("--enghelp=nbd")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    if !nbd.status.success() || !String::from_utf8_lossy(&nbd.stdout).contains("uri") {
        return Err("this fio has no nbd engine (fio --enghelp=nbd fails): install a fio built with libnbd (Debian's: apt-get install fio)".to_string());
    }
    Ok(String::from_utf8_lossy(&v.stdout).trim().to_string())
}

fn ms(s: f64) -> String {
    format!("{}ms", (s * 1000.0).round() as u64)
}

/// fio's arguments for one workload against `uri`, JSON to `out`.
pub fn args(uri: &str, w: &Workload, t: &Timing, out: &Path) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", w.name),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.iodepth),
        "--time_based".to_string(),
        format!("--runtime={}", ms(t.runtime_s)),
        format!("--percentile_list={PERCENTILES}"),
        // Percentiles of the total latency, not only of the completion:
        // the nbd engine sends inside the submission, and libnbd may read
        // the reply there (see `report::fio::DirStats::total_latency`).
        "--lat_percentiles=1".to_string(),
        "--output-format=json".to_string(),
        format!("--output={}", out.display()),
    ];
    if t.ramp_s > 0.0 {
        a.push(format!("--ramp_time={}", ms(t.ramp_s)));
    }
    a
}

/// A running fio.
pub struct FioRun {
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
    out: PathBuf,
    name: &'static str,
    uri: String,
    deadline: Instant,
}

/// Starts fio for one workload against `uri`, JSON to `out`, its
/// stdout and stderr to `out` with the extension `log`.
pub fn spawn(uri: &str, w: &Workload, t: &Timing, out: &Path) -> Result<FioRun, String> {
    let log = out.with_extension("log");
    let f = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let f2 = f
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new("fio")
        .args(args(uri, w, t, out))
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|e| format!("fio: {e}"))?;
    Ok(FioRun {
        child,
        status: None,
        log,
        out: out.to_path_buf(),
        name: w.name,
        uri: uri.to_string(),
        deadline: Instant::now() + Duration::from_secs_f64(t.ramp_s + t.runtime_s) + GRACE,
    })
}

impl FioRun {
    /// Whether fio has exited. Kills it (and fails with a message starting
    /// with [`HUNG`]) when it runs [`GRACE`] past its ramp + runtime.
    pub fn exited(&mut self) -> Result<bool, String> {
        if self.status.is_some() {
            return Ok(true);
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.status = Some(st);
                Ok(true)
            }
            Ok(None) if Instant::now() < self.deadline => Ok(false),
            Ok(None) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(format!(
                    "{HUNG}: fio {} did not finish within {} s of its runtime, killed (see its log)",
                    self.name,
                    GRACE.as_secs()
                ))
            }
            Err(e) => Err(format!("waiting for fio: {e}")),
        }
    }

    /// Waits for fio and parses its output: the job (all entries merged)
    /// and fio's `timestamp_ms` (when it wrote the output, just after its
    /// last I/O; milliseconds since the Unix epoch).
    pub fn finish(mut self) -> Result<(FioJob, Option<f64>), String> {
        while !self.exited()? {
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = self.status.expect("exited");
        if !status.success() {
            return Err(format!(
                "fio {} against {} failed ({status}):\n{}",
                self.name,
                self.uri,
                tail(&self.log, 15)
            ));
        }
        let parsed = FioOutput::from_file(&self.out).map_err(|e| e.to_string())?;
        let job = parsed
            .total()
            .ok_or_else(|| format!("{}: no job in fio's output", self.out.display()))?;
        Ok((job, timestamp_ms(&self.out)))
    }
}

impl Drop for FioRun {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// fio's `timestamp_ms` in its JSON output.
pub fn timestamp_ms(out: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(out).ok()?;
    let start = text.find('{')?;
    let v: serde_json::Value = serde_json::Deserializer::from_str(&text[start..])
        .into_iter::<serde_json::Value>()
        .next()?
        .ok()?;
    v.get("timestamp_ms")?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::plan::WORKLOADS;

    #[test]
    fn fio_arguments() {
        let t = Timing {
            runtime_s: 1.5,
            ramp_s: 0.25,
        };
        let a = args(
            "nbd://127.0.0.1:1/sd0",
            &WORKLOADS[3],
            &t,
            Path::new("/x/o.json"),
        );
        for want in [
            "--name=seqread-1m-qd8",
            "--ioengine=nbd",
            "--uri=nbd://127.0.0.1:1/sd0",
            "--rw=read",
            "--bs=1m",
            "--iodepth=8",
            "--runtime=1500ms",
            "--ramp_time=250ms",
            "--output=/x/o.json",
            "--output-format=json",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
        let no_ramp = Timing {
            runtime_s: 1.0,
            ramp_s: 0.0,
        };
        let a = args("u", &WORKLOADS[0], &no_ramp, Path::new("o"));
        assert!(!a.iter().any(|x| x.starts_with("--ramp_time")));
    }

    #[test]
    fn fio_timestamp() {
        let dir = std::env::temp_dir().join(format!("dvma-fio-ts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("o.json");
        std::fs::write(&f, "note: x\n{\"fio version\": \"fio-3.33\", \"timestamp_ms\": 1795783964312, \"jobs\": []}\n").unwrap();
        assert_eq!(timestamp_ms(&f), Some(1795783964312.0));
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(timestamp_ms(&f), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
