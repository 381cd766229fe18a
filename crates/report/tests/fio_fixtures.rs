//! Parsing of real fio 3.33 outputs (nbd engine against qemu-nbd on
//! loopback, recorded by `tests/fixtures/record.sh`). The expected numbers
//! are copied by hand from the fixture files.

use std::path::PathBuf;

use report::{Counters, Error, FioJob, FioOutput, Run, RunConfig, ServerSample};

fn fixture(name: &str) -> FioOutput {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    FioOutput::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn single(name: &str) -> FioJob {
    let out = fixture(name);
    assert_eq!(out.version, "fio-3.33");
    assert_eq!(out.jobs.len(), 1, "{name}");
    out.jobs.into_iter().next().unwrap()
}

#[track_caller]
fn close(actual: f64, expected: f64) {
    let tol = 1e-9 * expected.abs().max(1.0);
    assert!((actual - expected).abs() <= tol, "{actual} != {expected}");
}

const MIB: f64 = 1048576.0;

/// Checks the common invariants of a latency CDF.
#[track_caller]
fn check_cdf(job: &FioJob) {
    let cdf = job.latency_cdf_us();
    assert!(cdf.len() > 10, "{cdf:?}");
    assert_eq!(cdf.first().unwrap().1, 0.0);
    assert_eq!(cdf.last().unwrap().1, 1.0);
    assert!(
        cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "{cdf:?}"
    );
}

#[test]
fn randread_4k_qd1() {
    let j = single("randread-4k-qd1.json");
    assert_eq!(j.name, "randread-4k-qd1");
    assert_eq!(j.error, 0);
    assert_eq!((j.jobs, j.group_reported), (1, false));
    assert_eq!(j.options["rw"], "randread");
    assert_eq!(j.options["bs"], "4k");
    assert_eq!(j.options["iodepth"], "1");
    assert!(j.write.is_none() && j.trim.is_none() && !j.is_mixed());
    let r = j.read.as_ref().unwrap();
    assert_eq!(r.total_ios, 13354);
    assert_eq!(r.io_bytes, 54697984);
    assert_eq!(r.runtime_ms, 2001);
    close(r.iops, 6673.663168);
    close(j.iops(), 6673.663168);
    close(j.mib_s(), 27335324.0 / MIB);
    assert_eq!(j.total_ios(), 13354);
    assert_eq!(j.runtime_ms(), 2001);
    close(j.lat_percentile_us(50.0).unwrap(), 107.008);
    close(j.lat_percentile_us(99.0).unwrap(), 337.920);
    close(j.clat_mean_us(), 116.412356822);
    close(j.lat_mean_us(), 147.859298038);
    close(j.usr_cpu_pct, 7.65);
    close(j.sys_cpu_pct, 29.9);
    assert_eq!(j.job_runtime_ms, 2000);
    close(j.cpu_s(), (7.65 + 29.9) / 100.0 * 2.0);
    check_cdf(&j);
}

/// With `--lat_percentiles=1` fio reports both latencies' percentiles; the
/// total one (submission and completion) is the one the report uses.
#[test]
fn total_latency_percentiles_win_over_completion_ones() {
    let j = single("randread-4k-qd1-lat.json");
    let r = j.read.as_ref().unwrap();
    assert!(r.total_latency);
    assert_eq!(r.total_ios, 31279);
    assert_eq!(r.lat_samples, 31279);
    close(r.lat_min_ns, 8458.0);
    close(r.lat_max_ns, 3401214.0);
    // clat_ns p50 is 56.064 µs in the file; lat_ns p50 is 70.144.
    close(j.lat_percentile_us(50.0).unwrap(), 70.144);
    close(j.lat_percentile_us(99.0).unwrap(), 123.392);
    check_cdf(&j);
    // The recordings without it describe completion latency.
    assert!(!single("randread-4k-qd1.json").read.unwrap().total_latency);
}

#[test]
fn randread_4k_qd32() {
    let j = single("randread-4k-qd32.json");
    assert_eq!(j.options["iodepth"], "32");
    assert!(j.write.is_none());
    assert_eq!(j.total_ios(), 104067);
    close(j.iops(), 52007.496252);
    close(j.mib_s(), 213022704.0 / MIB);
    close(j.lat_percentile_us(50.0).unwrap(), 544.768);
    close(j.lat_percentile_us(99.0).unwrap(), 1712.128);
    close(j.lat_mean_us(), 614.143631487);
    close(j.usr_cpu_pct, 20.0);
    close(j.sys_cpu_pct, 63.55);
    check_cdf(&j);
}

#[test]
fn randwrite_4k_qd32_has_only_writes() {
    let j = single("randwrite-4k-qd32.json");
    assert_eq!(j.options["rw"], "randwrite");
    assert!(j.read.is_none() && j.trim.is_none());
    let w = j.write.as_ref().unwrap();
    assert_eq!(w.total_ios, 46099);
    assert_eq!(w.runtime_ms, 2002);
    close(j.iops(), 23026.473526);
    close(j.mib_s(), 94316435.0 / MIB);
    close(j.lat_percentile_us(50.0).unwrap(), 1318.912);
    close(j.lat_percentile_us(99.0).unwrap(), 2637.824);
    close(j.lat_mean_us(), 1388.226686327);
    close(j.usr_cpu_pct, 11.994003);
    close(j.sys_cpu_pct, 31.134433);
    assert_eq!(j.job_runtime_ms, 2001);
    check_cdf(&j);
}

#[test]
fn seqread_1m_qd8() {
    let j = single("seqread-1m-qd8.json");
    assert_eq!(j.options["bs"], "1M");
    assert_eq!(j.total_ios(), 1778);
    close(j.iops(), 885.458167);
    close(j.mib_s(), 928470183.0 / MIB);
    // 1 MiB blocks: MiB/s and IOPS agree.
    assert!((j.mib_s() - j.iops()).abs() < 0.01);
    close(j.lat_percentile_us(50.0).unwrap(), 8355.840);
    close(j.lat_percentile_us(99.0).unwrap(), 20316.160);
    close(j.lat_mean_us(), 9009.725338583);
    check_cdf(&j);
}

#[test]
fn seqwrite_1m_qd8() {
    let j = single("seqwrite-1m-qd8.json");
    assert!(j.read.is_none());
    assert_eq!(j.total_ios(), 1812);
    close(j.iops(), 903.740648);
    close(j.mib_s(), 947640754.0 / MIB);
    close(j.lat_percentile_us(50.0).unwrap(), 8093.696);
    close(j.lat_percentile_us(99.0).unwrap(), 19267.584);
    close(j.lat_mean_us(), 8835.721800773);
    close(j.usr_cpu_pct, 5.938124);
    close(j.sys_cpu_pct, 26.896208);
    assert_eq!(j.job_runtime_ms, 2004);
    check_cdf(&j);
}

#[test]
fn mixed_randrw_with_verify() {
    let j = single("randrw-4k-qd16-verify.json");
    assert_eq!(j.options["verify"], "crc32c");
    assert!(j.is_mixed());
    let (r, w) = (j.read.as_ref().unwrap(), j.write.as_ref().unwrap());
    assert_eq!((r.total_ios, w.total_ios), (25094, 16448));
    assert_eq!((r.runtime_ms, w.runtime_ms), (2001, 1580));
    close(r.iops, 12540.729635);
    close(w.iops, 10410.126582);
    close(j.iops(), 12540.729635 + 10410.126582);
    close(j.mib_s(), (51366828.0 + 42639878.0) / MIB);
    assert_eq!(j.total_ios(), 25094 + 16448);
    assert_eq!(j.runtime_ms(), 2001);
    // Per-direction percentiles are fio's.
    assert!(r.lat_percentiles_ns.contains(&(99.0, 2072576.0)));
    assert!(w.lat_percentiles_ns.contains(&(99.0, 1728512.0)));
    // Both directions have their median at 716800 ns (and the same 40th and
    // 60th percentiles): so does the mixture.
    close(j.lat_percentile_us(50.0).unwrap(), 716.800);
    // The p99 of the I/O-weighted mixture lies between the directions'
    // (1728512 and 2072576 ns); solving the two linear pieces by hand
    // (reads between their p95 1105920 and p99, writes between their p99
    // and p99.5 2211840) gives 2024134.2 ns.
    let p99 = j.lat_percentile_us(99.0).unwrap();
    assert!((p99 - 2024.1342).abs() < 1e-3, "{p99}");
    close(
        j.lat_mean_us(),
        (25094.0 * 768591.249502 + 16448.0 * 769765.789275) / 41542.0 / 1000.0,
    );
    close(j.usr_cpu_pct, 11.1);
    close(j.sys_cpu_pct, 38.15);
    check_cdf(&j);
    let cdf = j.latency_cdf_us();
    // The CDF spans the smallest and largest latency of both directions.
    close(cdf.first().unwrap().0, 107.039);
    close(cdf.last().unwrap().0, 5527.272);
}

#[test]
fn group_reporting_is_one_entry_for_all_jobs() {
    let out = fixture("randread-4k-qd16-2jobs-group.json");
    assert_eq!(out.jobs.len(), 1);
    let j = &out.jobs[0];
    assert_eq!(j.options["numjobs"], "2");
    assert!(j.group_reported);
    assert_eq!(j.jobs, 2);
    assert_eq!(j.total_ios(), 44251);
    close(j.iops(), 22103.396603);
    close(j.mib_s(), 90535512.0 / MIB);
    close(j.lat_percentile_us(50.0).unwrap(), 1400.832);
    close(j.lat_percentile_us(99.0).unwrap(), 4046.848);
    // fio sums the runtime of the jobs and averages their CPU percentages.
    assert_eq!(j.job_runtime_ms, 4002);
    close(j.cpu_s(), (6.996502 + 23.088456) / 100.0 * 4.002);
    // total() of a single entry is that entry.
    assert_eq!(&out.total().unwrap(), j);
}

#[test]
fn numjobs_without_group_reporting_merges_entries() {
    let out = fixture("randread-4k-qd16-2jobs.json");
    assert_eq!(out.jobs.len(), 2);
    for j in &out.jobs {
        assert!(!j.group_reported);
        assert_eq!(j.jobs, 1);
        assert_eq!(j.job_runtime_ms, 2001);
    }
    close(out.jobs[0].iops(), 11883.116883);
    close(out.jobs[1].iops(), 11911.588412);
    let t = out.total().unwrap();
    assert_eq!(t.name, "randread-4k-qd16-2jobs");
    assert_eq!(t.jobs, 2);
    assert_eq!(t.total_ios(), 23790 + 23847);
    close(t.iops(), 11883.116883 + 11911.588412);
    close(t.mib_s(), (48673246.0 + 48789866.0) / MIB);
    assert_eq!(t.runtime_ms(), 2002);
    assert_eq!(t.job_runtime_ms, 4002);
    close(
        t.cpu_s(),
        (5.897051 + 25.237381 + 7.446277 + 20.789605) / 100.0 * 2.001,
    );
    // Same median in both jobs; p99 of the mixture between 2605056 and
    // 2637824 ns, 2634551.7 ns solving the linear pieces by hand.
    close(t.lat_percentile_us(50.0).unwrap(), 1269.760);
    let p99 = t.lat_percentile_us(99.0).unwrap();
    assert!((p99 - 2634.5517).abs() < 1e-3, "{p99}");
    let r = t.read.as_ref().unwrap();
    assert_eq!((r.lat_min_ns, r.lat_max_ns), (181138.0, 8204113.0));
    assert_eq!(r.lat_samples, 23790 + 23847);
    check_cdf(&t);
    let groups = out.groups();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0], t);
}

#[test]
fn run_from_fio_divides_server_figures_by_ios() {
    let j = single("randread-4k-qd1.json");
    let sample = ServerSample {
        // 100 µs per I/O over 13354 I/Os.
        cpu_s: 1.3354,
        counters: Some(Counters {
            interrupts: 2 * 13354,
            signals: 13354 / 2,
            softints: 13354,
            ctx_switches: 3 * 13354,
            asts: 0,
            iommu_faults: 6677,
        }),
        dvma_pages_held: Some(17),
    };
    let config = RunConfig::dvma("lazy", "softint")
        .with_spl("mask")
        .with_cpus(2)
        .with_protection("none");
    let run = Run::from_fio(&j, &config, "randread-4k-qd1", 3, &sample).unwrap();
    assert_eq!(run.server, "dvma");
    assert_eq!(run.dvma_mode.as_deref(), Some("lazy"));
    assert_eq!(run.completion.as_deref(), Some("softint"));
    assert_eq!(run.spl.as_deref(), Some("mask"));
    assert_eq!(run.cpus, Some(2));
    assert_eq!(run.intr_stack, None);
    assert_eq!(run.rep, 3);
    close(run.iops, 6673.663168);
    close(run.mib_s, 27335324.0 / MIB);
    close(run.p50_us, 107.008);
    close(run.p99_us, 337.920);
    close(run.cpu_us_per_io, 100.0);
    let p = run.per_io.unwrap();
    assert_eq!(
        (
            p.interrupts,
            p.softints,
            p.ctx_switches,
            p.asts,
            p.iommu_faults
        ),
        (2.0, 1.0, 3.0, 0.0, 0.5)
    );
    assert_eq!(run.dvma_pages_held, Some(17));
    assert_eq!(run.protection.as_deref(), Some("none"));
    assert_eq!(run.latency_cdf, j.latency_cdf_us());
    assert_eq!(run.config(), config);

    // A peer, mixed job: both directions count.
    let m = single("randrw-4k-qd16-verify.json");
    let peer = Run::from_fio(
        &m,
        &RunConfig::peer("qemu-nbd"),
        "randrw-4k-qd16",
        0,
        &ServerSample {
            cpu_s: 0.41542,
            ..ServerSample::default()
        },
    )
    .unwrap();
    assert!(!peer.is_dvma());
    assert_eq!(peer.dvma_mode, None);
    assert_eq!(peer.per_io, None);
    close(peer.iops, 12540.729635 + 10410.126582);
    close(peer.cpu_us_per_io, 10.0);
    close(peer.p50_us, 716.8);
}

#[test]
fn run_from_fio_rejects_failed_and_empty_jobs() {
    let mut j = single("randread-4k-qd1.json");
    let config = RunConfig::peer("nbdkit");
    let sample = ServerSample::default();
    j.error = 5;
    let e = Run::from_fio(&j, &config, "w", 0, &sample).unwrap_err();
    assert!(
        matches!(e, Error::FioJob { ref reason, .. } if reason.contains("error 5")),
        "{e}"
    );
    j.error = 0;
    j.read = None;
    let e = Run::from_fio(&j, &config, "w", 0, &sample).unwrap_err();
    assert!(
        matches!(e, Error::FioJob { ref reason, .. } if reason.contains("no I/O")),
        "{e}"
    );
    let mut j = single("randread-4k-qd1.json");
    j.read.as_mut().unwrap().lat_percentiles_ns.clear();
    let e = Run::from_fio(&j, &config, "w", 0, &sample).unwrap_err();
    assert!(
        matches!(e, Error::FioJob { ref reason, .. } if reason.contains("percentiles")),
        "{e}"
    );
}

#[test]
fn missing_file_is_an_io_error() {
    let e = FioOutput::from_file("/nonexistent/fio.json").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}
