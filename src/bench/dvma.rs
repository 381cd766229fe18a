//! `dvma bench dvma`: what a DVMA mode costs per I/O, and what it holds.
//!
//! For each mode, one map loads, syncs and unloads a 4 KiB and a 64 KiB
//! buffer in a loop on CPU 0, while a host thread keeps using the window
//! from the other core (as a live device would), so every change of a
//! mapping pays the TLB shootdown it would pay for real. Then the same
//! loop runs on both CPUs at once (contention on the IOVA arena, the
//! magazines, the slot queue and the host's mm). Every figure is measured in
//! this run; ratios compare figures of the same run.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::*;

use kern::bus_dma::*;
use machine::{Machine, MachineConfig};
use serde::Serialize;

/// Arguments of `dvma bench dvma`.
#[derive(clap::Args, Debug)]
pub struct DvmaArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Milliseconds per measurement.
    #[arg(long, default_value_t = 60)]
    ms: u64,
    /// Only these modes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
}

/// One mode's figures.
#[derive(Serialize, Debug, Clone, Default)]
pub struct ModeFigures {
    /// ns per load+sync+unload, one CPU, 4 KiB.
    pub ns_4k: f64,
    /// The same, 64 KiB.
    pub ns_64k: f64,
    /// ns per load+sync+unload with both CPUs doing it, 4 KiB.
    pub contended_ns_4k: f64,
    /// The same, 64 KiB.
    pub contended_ns_64k: f64,
    /// DVMA pages the mode held at its peak during the run.
    pub pages_peak: u64,
    /// IOVA pages it reserves (slots, pool) whether used or not.
    pub pages_reserved: u64,
    /// IOMMU map calls per I/O.
    pub enters_per_io: f64,
    /// What a device can still reach after an I/O completed.
    pub protection: String,
}

/// All modes.
#[derive(Serialize, Debug, Clone, Default)]
pub struct DvmaFigures {
    /// Per mode.
    pub modes: BTreeMap<String, ModeFigures>,
    /// strict / permanent, 4 KiB.
    pub strict_over_permanent_4k: f64,
}

impl DvmaFigures {
    /// `{"4k": {mode: ns}, "64k": {mode: ns}}`, the shape of
    /// `bench micro --json`'s `dvma_ns`.
    pub fn ns_by_size(&self) -> BTreeMap<String, BTreeMap<String, f64>> {
        let mut m = BTreeMap::new();
        for (size, get) in [
            ("4k", (|f: &ModeFigures| f.ns_4k) as fn(&ModeFigures) -> f64),
            ("64k", |f| f.ns_64k),
        ] {
            m.insert(
                size.to_string(),
                self.modes
                    .iter()
                    .map(|(k, v)| (k.clone(), get(v)))
                    .collect(),
            );
        }
        m
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn tag_config(mode: DvmaMode) -> TagConfig {
    let mut c = TagConfig::new(mode);
    c.maxsize = 64 << 10;
    c.slots = 16;
    c.pool_bytes = 8 << 20;
    c
}

/// Distinct buffers each loop cycles through: more than the slots, so that
/// `slots` maps for real (a server's buffers are many; the slot cache only
/// helps when the same buffer comes back to the same slot).
const BUFFERS: usize = 40;

/// ns per load+sync+unload for `len`-byte buffers on this thread's CPU,
/// for about `ms` milliseconds. Thread context.
fn io_loop(tag: &'static DmaTag, len: usize, ms: u64) -> f64 {
    let now = || kern::kernel().md().nanotime();
    let mut map = dmamap_create(tag, 64 << 10).expect("map");
    let mut bufs: Vec<Option<kern::vm::IoBuf>> = (0..BUFFERS)
        .map(|_| Some(dmamem_alloc(tag, len).expect("buffer")))
        .collect();
    let mut i = 0;
    let mut one = |n: u64| {
        for _ in 0..n {
            let b = bufs[i].take().expect("buffer");
            if let Err(e) = dmamap_load(&mut map, b, DmaDir::ToDevice, Wait::NoWait) {
                panic!("{}: load failed: {}", tag.mode(), e.error);
            }
            dmamap_sync(&mut map, SyncOp::PreWrite);
            dmamap_sync(&mut map, SyncOp::PostWrite);
            bufs[i] = dmamap_unload(&mut map);
            i = (i + 1) % BUFFERS;
        }
    };
    // Calibrate, then measure.
    let t0 = now();
    one(16);
    let per = ((now() - t0) / 16).max(1);
    let n = (ms * 1_000_000 / per).clamp(32, 5_000_000);
    let t0 = now();
    one(n);
    (now() - t0) as f64 / n as f64
}

/// Measure every mode.
pub fn measure(
    reps: usize,
    ms: u64,
    only: &[DvmaMode],
    progress: &dyn Fn(&str),
) -> Result<DvmaFigures, String> {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = 2;
    let m = Machine::boot(cfg).map_err(|e| e.to_string())?;
    let tags: Vec<(DvmaMode, &'static DmaTag)> = DvmaMode::ALL
        .iter()
        .filter(|m| only.is_empty() || only.contains(m))
        .map(|&mode| {
            let t = tag_create(mode.name(), tag_config(mode)).map_err(|e| e.to_string())?;
            Ok((mode, t))
        })
        .collect::<Result<_, String>>()?;
    // A device that keeps using the window from the other core.
    let live = m
        .window()
        .live_device(1, std::time::Duration::from_micros(10));
    let mut out = DvmaFigures::default();
    for &(mode, tag) in &tags {
        progress(mode.name());
        let e0 = tag.stats.enters.load(SeqCst);
        let l0 = tag.stats.loads.get();
        let (a, b) = m
            .run(0, "bench-dvma", move |_| {
                let a = median((0..reps).map(|_| io_loop(tag, 4096, ms)).collect());
                let b = median((0..reps).map(|_| io_loop(tag, 64 << 10, ms)).collect());
                (a, b)
            })
            .map_err(|e| e.to_string())?;
        let enters = tag.stats.enters.load(SeqCst) - e0;
        let loads = tag.stats.loads.get() - l0;
        out.modes.insert(
            mode.name().to_string(),
            ModeFigures {
                ns_4k: a,
                ns_64k: b,
                enters_per_io: enters as f64 / loads.max(1) as f64,
                protection: mode.protection().to_string(),
                ..Default::default()
            },
        );
    }
    let touches = live.touches();
    drop(live);
    // Contention: the same loop on both CPUs at once.
    for &(mode, tag) in &tags {
        progress(&format!("{} on both CPUs", mode.name()));
        for (size, slot) in [(4096usize, 0usize), (64 << 10, 1)] {
            let ts: Vec<_> = (0..2)
                .map(|cpu| {
                    let r = Arc::new(std::sync::Mutex::new(0.0f64));
                    let r2 = r.clone();
                    let t = m
                        .spawn(Some(cpu), "bench-dvma-mp", move |_| {
                            *r2.lock().unwrap() = io_loop(tag, size, ms);
                        })
                        .map_err(|e| e.to_string());
                    (t, r)
                })
                .collect();
            let mut sum = 0.0;
            for (t, r) in ts {
                m.wait(&t?).map_err(|e| e.to_string())?;
                sum += *r.lock().unwrap();
            }
            let f = out.modes.get_mut(mode.name()).expect("mode");
            if slot == 0 {
                f.contended_ns_4k = sum / 2.0;
            } else {
                f.contended_ns_64k = sum / 2.0;
            }
        }
        let f = out.modes.get_mut(mode.name()).expect("mode");
        f.pages_peak = tag.stats.pages_peak.load(SeqCst);
        f.pages_reserved = tag.pages_reserved();
    }
    m.shutdown().map_err(|e| e.to_string())?;
    if let (Some(s), Some(p)) = (out.modes.get("strict"), out.modes.get("permanent")) {
        out.strict_over_permanent_4k = s.ns_4k / p.ns_4k;
    }
    if touches == 0 {
        return Err("the window user never ran: no shootdowns were measured".into());
    }
    Ok(out)
}

/// Human-readable table.
pub fn render(f: &DvmaFigures) -> String {
    let mut s = format!(
        "(each mode cycles through {BUFFERS} buffers; a device thread on the other core touches the window every ~10 us)\n"
    );
    s += &format!(
        "{:<10} {:>11} {:>11} {:>13} {:>13} {:>9} {:>9} {:>8}  protection after completion\n",
        "mode",
        "4K ns/io",
        "64K ns/io",
        "4K 2-CPU ns",
        "64K 2-CPU ns",
        "peak pgs",
        "reserved",
        "maps/io"
    );
    for mode in DvmaMode::ALL {
        let Some(m) = f.modes.get(mode.name()) else {
            continue;
        };
        s += &format!(
            "{:<10} {:>11.1} {:>11.1} {:>13.1} {:>13.1} {:>9} {:>9} {:>8.2}  {}\n",
            mode.name(),
            m.ns_4k,
            m.ns_64k,
            m.contended_ns_4k,
            m.contended_ns_64k,
            m.pages_peak,
            m.pages_reserved,
            m.enters_per_io,
            m.protection
        );
    }
    let p = f
        .modes
        .get("permanent")
        .map(|m| m.ns_4k)
        .unwrap_or(f64::NAN);
    s += &format!(
        "permanent: {:.1} ns per 4 KiB I/O (target <= 20 ns: {}); strict/permanent = {:.0}x (target >= 300x: {})\n",
        p,
        if p <= 20.0 { "met" } else { "NOT MET" },
        f.strict_over_permanent_4k,
        if f.strict_over_permanent_4k >= 300.0 {
            "met"
        } else {
            "NOT MET"
        }
    );
    s
}

pub fn main(a: DvmaArgs) -> Result<ExitCode, String> {
    let quiet = a.json;
    let only = a
        .modes
        .iter()
        .map(|n| {
            DvmaMode::from_name(n).ok_or_else(|| {
                format!("unknown DVMA mode `{n}` (strict, lazy, slots, permanent, shadow)")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let f = measure(a.reps.max(1), a.ms.max(1), &only, &|w| {
        if !quiet {
            eprintln!("measuring {w} ...");
        }
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&f).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", render(&f));
    }
    Ok(ExitCode::SUCCESS)
}
