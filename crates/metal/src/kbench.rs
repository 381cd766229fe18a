//! The `bench kernel` program: kern's in-kernel closed-loop load
//! generator (`kern::loadgen::LoadGen`, the one `dvma bench kernel` runs
//! on Linux) over sd on the virtio-blk disks, in each DVMA mode x
//! completion mode asked for (`--dvma`, `--completion`: comma lists or
//! `all`; by default all 20 pairs).
//!
//! For each pair it attaches an sd unit on every disk (`disk.rs`'s
//! [`attach_sd`]; the devices interrupt the last CPU), runs each workload
//! (4 KiB random reads, then random writes, at queue depth 1 and 32) for
//! a warm-up of a fifth of the window and then a measured window of
//! `--ms` milliseconds (default [`DEFAULT_MS`]), and detaches the units.
//! With several disks (`--disks N` on the runner) each disk has its own
//! load generator, each in its own kernel thread on CPU 0, started
//! together; the window's figures are their sum. The load generators'
//! threads issue every I/O (`Issuer::Thread`: each completion hands its
//! buf back to the thread, as on Linux by default). The span is the whole
//! of the smallest disk.
//!
//! # What a window measures
//! * `iops`: I/Os completed over the window's wall time (TSC).
//! * `busy_ns`: the CPUs' busy time over the window: for every CPU, the
//!   wall time minus the time it spent halted in the idle loop's `hlt`
//!   (`md::halted_ns`: from the `hlt` to the entry of the trap that ended
//!   it), summed over the CPUs of the machine (with `--cpus 1`, CPU 0;
//!   with more, also the CPU that takes the disks' interrupts). The idle
//!   loop's polling before it halts (kern's `idle_poll_ns`) counts as busy,
//!   as it does on Linux, where a vCPU thread's CPU clock counts it.
//!   `cpu_ns_per_io` is `busy_ns` over the I/Os.
//! * `intrs_per_io`: the sd units' interrupt handler runs (the disks'
//!   MSI-X interrupts) per I/O; `traps_per_io`: every trap the CPUs took
//!   (also the LAPIC timer's, IPIs and self-IPIs) per I/O;
//!   `switches_per_io`: kernel thread switches per I/O.
//! * `vtd_invalidations_per_io`: IOTLB invalidations of the VT-d unit per
//!   I/O (`--iommu vtd`; 0 without it).
//! * per pair, `pages_peak` (the most DVMA pages the units' tags held at
//!   once) and `pages_reserved` (pages they reserve whether used or not).
//!
//! Under TCG (this machine) the CPU and the virtio device are QEMU's
//! emulation: the counts per I/O are the kernel's, the ns and IOPS are the
//! emulator's.
//!
//! It prints one JSON object (`json: {...}`).
//!
//! # Contexts
//! A kernel thread on CPU 0; the load generators' threads on CPU 0.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kern::ThreadCtx;
use kern::bio::{BlockDev, BufOp};
use kern::dev::DiskController;
use kern::dev::sd::Sd;
use kern::loadgen::{Issuer, LoadGen, Pattern, Workload};

use crate::disk::{attach_sd, disks, pairs};

/// The measured window, ms, unless `--ms` says otherwise.
pub const DEFAULT_MS: u64 = 500;
/// The I/O size.
pub const SIZE: usize = 4096;
/// The queue depths.
pub const DEPTHS: [usize; 2] = [1, 32];

/// What the program does.
#[derive(Clone, Copy, Debug)]
pub struct BenchOpts {
    /// Print JSON.
    pub json: bool,
    /// Bit `i`: DVMA mode `DvmaMode::ALL[i]`.
    pub dvma: u8,
    /// Bit `i`: completion `Completion::ALL[i]`.
    pub completion: u8,
    /// The measured window, ms.
    pub ms: u64,
}

/// A point in time: everything a window is the difference of.
struct Mark {
    t: u64,
    halted: Vec<u64>,
    intrs: u64,
    traps: u64,
    switches: u64,
    inval: u64,
}

fn mark(sds: &[&'static Sd]) -> Mark {
    let k = kern::kernel();
    let s = kern::stats::snapshot();
    Mark {
        t: crate::clock::nanotime(),
        halted: (0..k.ncpu()).map(crate::md::halted_ns).collect(),
        intrs: sds.iter().map(|s| s.stats.intrs.load(Relaxed)).sum(),
        traps: s.total(|c| c.traps),
        switches: s.total(|c| c.switches),
        inval: crate::vtd::VTD.inv.stats.iotlb(),
    }
}

/// One window's sums over the disks: I/Os, errors, mismatches.
#[derive(Default)]
struct Sums {
    ios: AtomicU64,
    errors: AtomicU64,
    failed: AtomicU64,
}

/// Run `wl` on every unit at once, a load generator thread each on
/// CPU 0; the sums of I/Os and of errors and mismatches. `Err` if a load
/// generator could not be set up.
fn window(
    ctx: &ThreadCtx,
    sds: &[&'static Sd],
    wl: Workload,
    depth: usize,
) -> Result<(u64, u64), String> {
    let sums = Arc::new(Sums::default());
    let mut ts = Vec::new();
    for &sd in sds {
        let sums = sums.clone();
        let t = kern::sched::kthread_create(Some(0), "loadgen", move |ctx| {
            let dev: &'static dyn BlockDev = sd;
            let Ok(mut lg) = LoadGen::new(ctx, dev, SIZE, depth) else {
                sums.failed.fetch_add(1, Relaxed);
                return;
            };
            match lg.run(ctx, &wl) {
                Ok(r) => {
                    sums.ios.fetch_add(r.ios, Relaxed);
                    sums.errors.fetch_add(r.errors + r.mismatches, Relaxed);
                }
                Err(_) => {
                    sums.failed.fetch_add(1, Relaxed);
                }
            }
        })
        .map_err(|e| alloc::format!("loadgen thread: {e}"))?;
        ts.push(t);
    }
    for t in ts {
        let _ = t.join(ctx);
    }
    if sums.failed.load(Relaxed) > 0 {
        return Err("a load generator failed".into());
    }
    Ok((sums.ios.load(Relaxed), sums.errors.load(Relaxed)))
}

/// Run the program; the guest status.
pub fn run(ctx: &ThreadCtx, o: BenchOpts) -> u8 {
    let disks = disks();
    if disks.is_empty() {
        kprintln!("bench kernel: no virtio-blk disk");
        return crate::EXIT_FAIL;
    }
    let pairs = pairs(o.dvma, o.completion);
    if pairs.is_empty() {
        kprintln!("bench kernel: no DVMA x completion pair");
        return crate::EXIT_USAGE;
    }
    if pairs.len() * disks.len() > 100 {
        kprintln!(
            "bench kernel: {} pairs x {} disks is more sd units than one boot's tables hold",
            pairs.len(),
            disks.len()
        );
        return crate::EXIT_USAGE;
    }
    kern::bio::bio_init(DEPTHS[1] * disks.len() + 8);
    let k = kern::kernel();
    let span = disks
        .iter()
        .map(|d| d.geometry().sectors)
        .min()
        .unwrap_or(0)
        * 512;
    let ms = o.ms.max(1);
    let hv = crate::micro::hypervisor();
    let mut out = String::new();
    let (mut total_ios, mut total_errors, mut all_ran) = (0u64, 0u64, true);
    for (pi, &(mode, comp)) in pairs.iter().enumerate() {
        let mut sds = Vec::new();
        for &d in &disks {
            let name: &'static str = alloc::format!("sd{}", d.index()).leak();
            match attach_sd(name, d, mode, comp, 16) {
                Ok(sd) => sds.push(sd),
                Err(e) => {
                    kprintln!("bench kernel: {} {}: {e}", mode.name(), comp.name());
                    return crate::EXIT_FAIL;
                }
            }
        }
        let mut wout = String::new();
        let mut seed = 1u64;
        for (name, op) in [("randread", BufOp::Read), ("randwrite", BufOp::Write)] {
            for depth in DEPTHS {
                let wl = Workload {
                    op,
                    pattern: Pattern::Random,
                    span,
                    ios: 0,
                    duration_ns: ms * 1_000_000,
                    verify: false,
                    seed,
                    issuer: Issuer::Thread,
                };
                seed += 1;
                // A warm-up of a fifth of the window, not measured.
                let warm = Workload {
                    duration_ns: (ms * 1_000_000 / 5).max(10_000_000),
                    ..wl
                };
                let a = mark(&sds);
                let r = window(ctx, &sds, warm, depth).and_then(|_| {
                    let a = mark(&sds);
                    window(ctx, &sds, wl, depth).map(|r| (a, r))
                });
                let b = mark(&sds);
                let (a, r) = match r {
                    Ok((a, r)) => (a, Ok(r)),
                    Err(e) => (a, Err(e)),
                };
                let (ios, errors) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        kprintln!("bench kernel: {} {} {name}: {e}", mode.name(), comp.name());
                        return crate::EXIT_FAIL;
                    }
                };
                // The window: from before the load generators' threads are
                // created to after they are joined (their setup, a few
                // dozen bufs, is in it).
                let wall = b.t - a.t;
                let busy: u64 = a
                    .halted
                    .iter()
                    .zip(&b.halted)
                    .map(|(x, y)| wall.saturating_sub(y - x))
                    .sum();
                let per = |x: u64| x as f64 / ios.max(1) as f64;
                let iops = ios as f64 * 1e9 / wall.max(1) as f64;
                let _ = write!(
                    wout,
                    "{}{{\"workload\":\"{name}\",\"depth\":{depth},\"ios\":{ios},\"errors\":{errors},\"wall_ns\":{wall},\"iops\":{iops:.0},\"busy_ns\":{busy},\"cpu_ns_per_io\":{:.0},\"intrs_per_io\":{:.3},\"traps_per_io\":{:.3},\"switches_per_io\":{:.3},\"vtd_invalidations_per_io\":{:.3}}}",
                    if wout.is_empty() { "" } else { "," },
                    per(busy),
                    per(b.intrs - a.intrs),
                    per(b.traps - a.traps),
                    per(b.switches - a.switches),
                    per(b.inval - a.inval),
                );
                if !o.json {
                    kprintln!(
                        "bench kernel: {:9} {:7} {name:9} qd{depth:<2} {ios:7} I/Os {iops:8.0} IOPS {:8.0} CPU ns/I/O {:.2} intr/I/O {:.2} inval/I/O",
                        mode.name(),
                        comp.name(),
                        per(busy),
                        per(b.intrs - a.intrs),
                        per(b.inval - a.inval),
                    );
                }
                total_ios += ios;
                total_errors += errors;
                all_ran &= ios > 0;
            }
        }
        let peak: u64 = sds
            .iter()
            .map(|s| s.tag().stats.pages_peak.load(Relaxed))
            .sum();
        let reserved: u64 = sds.iter().map(|s| s.tag().pages_reserved()).sum();
        for sd in &sds {
            if let Err(e) = sd.detach(ctx) {
                kprintln!("bench kernel: detach: {e}");
                return crate::EXIT_FAIL;
            }
        }
        let _ = write!(
            out,
            "{}{{\"dvma\":\"{}\",\"completion\":\"{}\",\"pages_peak\":{peak},\"pages_reserved\":{reserved},\"workloads\":[{wout}]}}",
            if pi == 0 { "" } else { "," },
            mode.name(),
            comp.name(),
        );
    }
    let ok = total_errors == 0 && all_ran;
    let slots = disks[0].geometry().queue_depth;
    if o.json {
        kprintln!(
            "json: {{\"program\":\"bench kernel\",\"hypervisor\":\"{hv}\",\"cpus\":{},\"disks\":{},\"iommu\":\"{}\",\"size\":{SIZE},\"span_bytes\":{span},\"device_slots\":{slots},\"ms\":{ms},\"issuer\":\"thread\",\"pairs\":[{out}],\"ios\":{total_ios},\"errors\":{total_errors},\"ok\":{ok}}}",
            k.ncpu(),
            disks.len(),
            if crate::vtd::VTD.enabled() {
                "vtd"
            } else {
                "none"
            },
        );
    } else {
        kprintln!(
            "bench kernel: {} pairs, {total_ios} I/Os, {total_errors} errors: {}",
            pairs.len(),
            if ok { "ok" } else { "FAILED" }
        );
    }
    if ok { 0 } else { crate::EXIT_FAIL }
}
