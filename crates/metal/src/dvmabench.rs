//! The `bench dvma` program: what each DVMA mode costs per I/O on metal,
//! and what the IOMMU does for it.
//!
//! The same loop as the Linux process's `dvma bench dvma`
//! (`src/bench/dvma.rs`): per mode, one map loads, syncs and unloads a
//! 4 KiB and then a 64 KiB buffer, cycling through [`BUFFERS`] buffers
//! (more than the slots, so `slots` maps for real), for about
//! [`MEASURE_MS`] ms per repetition; the median of `--iterations`
//! repetitions (default 3), ns from the TSC. The tags are configured as
//! there (64 KiB transfers, 16 slots, an 8 MiB pool). The IOMMU is kern's,
//! as every other program here has it: behind `--iommu vtd` the unit's
//! page tables and invalidations ([`crate::vtd`]), so `strict` pays an
//! IOTLB invalidation per unload (and, QEMU's unit being in caching
//! mode, one per load), `lazy` one per batch of adjacent unloads,
//! `slots` and `permanent` none, `shadow` none but copies. Without it, the
//! translation table [`crate::iommu::SoftIommu`] (no invalidation at all).
//!
//! Per mode it reports the counts per I/O (IOMMU enters and removes, IOTLB
//! invalidations per load and per unload, bytes copied) and the TSC
//! cycles the invalidations took. With more than one CPU (`--cpus N`),
//! the 4 KiB and 64 KiB loops then run on CPUs 0 and 1 at once
//! (`contended_ns_*`, the mean of the two): the IOVA arena, the lazy
//! queue, the slot set and, behind VT-d, the invalidation queue (one
//! submission at a time) are shared. Then, behind VT-d, the invalidation's
//! own cost: [`INVAL_N`] page-selective IOTLB invalidations, queued and
//! register-based (the unit is switched between the two, with nothing
//! else using it), and `strict`'s 4 KiB loop again with register-based
//! invalidation.
//!
//! Under TCG the CPU and the IOMMU are QEMU's emulation: the counts per
//! operation mean what they would on hardware, the nanoseconds do not
//! (the JSON names the hypervisor).
//!
//! # Contexts
//! [`run`]: the program's kernel thread on CPU 0 (and, for the contended
//! figures, one kernel thread on CPU 1), the only users of the unit while
//! it runs (the disk, if any, is probed but idle).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kern::ThreadCtx;
use kern::bus_dma::{
    DmaDir, DmaTag, DvmaMode, SyncOp, TagConfig, Wait, dmamap_create, dmamap_load, dmamap_sync,
    dmamap_unload, dmamem_alloc, tag_create,
};

use crate::clock::nanotime;
use crate::vtd::VTD;

/// Distinct buffers each loop cycles through (as on Linux).
pub const BUFFERS: usize = 40;
/// Milliseconds per measurement.
pub const MEASURE_MS: u64 = 30;
/// Invalidations timed per flavour.
pub const INVAL_N: u64 = 200;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn tag_config(mode: DvmaMode) -> TagConfig {
    let mut c = TagConfig::new(mode);
    c.maxsize = 64 << 10;
    c.slots = 16;
    c.pool_bytes = 8 << 20;
    c
}

/// ns per load+sync+unload of `len`-byte buffers for about `ms` ms, and
/// the I/Os done. Thread context.
fn io_loop(tag: &'static DmaTag, len: usize, ms: u64) -> (f64, u64) {
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
    let t0 = nanotime();
    one(16);
    let per = ((nanotime() - t0) / 16).max(1);
    let n = (ms * 1_000_000 / per).clamp(32, 5_000_000);
    let t0 = nanotime();
    one(n);
    ((nanotime() - t0) as f64 / n as f64, n + 16)
}

/// ns per I/O of the `len`-byte loop run on CPUs 0 and 1 at once (the
/// mean of the two), and the I/Os done. Thread context on CPU 0.
fn contended(ctx: &ThreadCtx, tag: &'static DmaTag, len: usize, ms: u64) -> (f64, u64) {
    let other = alloc::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let o = other.clone();
    let t = kern::sched::kthread_create(Some(1), "bench dvma 1", move |_| {
        let (ns, n) = io_loop(tag, len, ms);
        o[0].store(ns.to_bits(), Relaxed);
        o[1].store(n, Relaxed);
    })
    .expect("a thread on CPU 1");
    let (ns, n) = io_loop(tag, len, ms);
    let _ = t.join(ctx);
    let ns1 = f64::from_bits(other[0].load(Relaxed));
    ((ns + ns1) / 2.0, n + other[1].load(Relaxed))
}

/// The counters a mode's figures are differences of.
#[derive(Clone, Copy, Default)]
struct Snap {
    loads: u64,
    unloads: u64,
    enters: u64,
    removes: u64,
    bounce: u64,
    inv_map: u64,
    inv_unmap: u64,
    cycles: u64,
}

fn snap(tag: &DmaTag) -> Snap {
    let s = &VTD.inv.stats;
    Snap {
        loads: tag.stats.loads.get(),
        unloads: tag.stats.unloads.get(),
        enters: tag.stats.enters.load(Relaxed),
        removes: tag.stats.removes.load(Relaxed),
        bounce: tag.stats.bounce_bytes.load(Relaxed),
        inv_map: s.iotlb_map.load(Relaxed),
        inv_unmap: s.iotlb_unmap.load(Relaxed),
        cycles: s.queued_cycles.load(Relaxed) + s.register_cycles.load(Relaxed),
    }
}

/// Median TSC cycles of one page-selective IOTLB invalidation, timed by
/// the invalidator itself, over [`INVAL_N`].
fn inval_cycles(reps: usize, queued: bool) -> f64 {
    let s = &VTD.inv.stats;
    let (n, c) = if queued {
        (&s.queued, &s.queued_cycles)
    } else {
        (&s.register, &s.register_cycles)
    };
    median(
        (0..reps)
            .map(|_| {
                let (n0, c0) = (n.load(Relaxed), c.load(Relaxed));
                for i in 0..INVAL_N {
                    // Pages of the window's top, which nothing maps.
                    let iova = crate::vtd::WINDOW - 4096 * (1 + i % 16);
                    VTD.inv
                        .iotlb(&VTD, iova, 4096, crate::vtd::inval::Cause::Other);
                }
                (c.load(Relaxed) - c0) as f64 / (n.load(Relaxed) - n0).max(1) as f64
            })
            .collect(),
    )
}

/// Run the program; the guest status.
pub fn run(ctx: &ThreadCtx, json: bool, reps: u32) -> u8 {
    let reps = reps.clamp(1, 20) as usize;
    let vtd = VTD.enabled();
    let ghz = crate::clock::tsc_hz() as f64 / 1e9;
    let hv = crate::micro::hypervisor();
    let ncpu = kern::kernel().ncpu();
    let mut modes = String::new();
    let mut ok = true;
    let (mut strict4k, mut perm4k) = (0.0, 0.0);
    let mut strict_tag = None;
    for (i, mode) in DvmaMode::ALL.into_iter().enumerate() {
        let tag = match tag_create(mode.name(), tag_config(mode)) {
            Ok(t) => t,
            Err(e) => {
                kprintln!("bench dvma: {}: tag_create: {e}", mode.name());
                return crate::EXIT_FAIL;
            }
        };
        let a = snap(tag);
        let (mut ios, mut v4, mut v64) = (0, Vec::new(), Vec::new());
        for _ in 0..reps {
            let (ns, n) = io_loop(tag, 4096, MEASURE_MS);
            v4.push(ns);
            ios += n;
        }
        for _ in 0..reps {
            let (ns, n) = io_loop(tag, 64 << 10, MEASURE_MS);
            v64.push(ns);
            ios += n;
        }
        let (mut c4, mut c64) = (0.0, 0.0);
        if ncpu > 1 {
            let (ns, n) = contended(ctx, tag, 4096, MEASURE_MS);
            (c4, ios) = (ns, ios + n);
            let (ns, n) = contended(ctx, tag, 64 << 10, MEASURE_MS);
            (c64, ios) = (ns, ios + n);
        }
        // What lazy still holds is part of these I/Os' cost.
        tag.flush();
        let b = snap(tag);
        let (ns4, ns64) = (median(v4), median(v64));
        match mode {
            DvmaMode::Strict => (strict4k, strict_tag) = (ns4, Some(tag)),
            DvmaMode::Permanent => perm4k = ns4,
            _ => {}
        }
        let loads = (b.loads - a.loads).max(1) as f64;
        let unloads = (b.unloads - a.unloads).max(1) as f64;
        ok &= b.loads - a.loads == ios && b.unloads - a.unloads == ios;
        let per_unload = (b.inv_unmap - a.inv_unmap) as f64 / unloads;
        let per_load = (b.inv_map - a.inv_map) as f64 / loads;
        let cycles = (b.cycles - a.cycles) as f64 / ios.max(1) as f64;
        let _ = write!(
            modes,
            "{}\"{}\":{{\"ns_4k\":{ns4:.1},\"ns_64k\":{ns64:.1},\"contended_ns_4k\":{c4:.1},\"contended_ns_64k\":{c64:.1},\"ios\":{ios},\
             \"enters_per_io\":{:.3},\"removes_per_io\":{:.3},\
             \"iotlb_inv_per_load\":{per_load:.3},\"iotlb_inv_per_unload\":{per_unload:.3},\
             \"inv_cycles_per_io\":{cycles:.0},\"bounce_bytes_per_io\":{:.0},\
             \"pages_peak\":{},\"pages_reserved\":{},\"protection\":\"{}\"}}",
            if i == 0 { "" } else { "," },
            mode.name(),
            (b.enters - a.enters) as f64 / loads,
            (b.removes - a.removes) as f64 / unloads,
            (b.bounce - a.bounce) as f64 / ios.max(1) as f64,
            tag.stats.pages_peak.load(Relaxed),
            tag.pages_reserved(),
            mode.protection(),
        );
        if !json {
            kprintln!(
                "bench dvma: {:9} 4K {ns4:>9.0} ns  64K {ns64:>9.0} ns  IOTLB inv/load {per_load:.2} /unload {per_unload:.2}  inv cycles/io {cycles:.0}",
                mode.name()
            );
        }
    }
    // The invalidation itself, queued and register-based.
    let mut cost = String::new();
    let mut strict_reg = 0.0;
    if vtd {
        let had_qi = VTD.inv.is_queued();
        let mut first = true;
        for queued in [true, false] {
            if VTD.inv.set_queued(&VTD, queued) {
                let c = inval_cycles(reps, queued);
                let _ = write!(
                    cost,
                    "{}\"{}\":{{\"n\":{INVAL_N},\"cycles\":{c:.0},\"ns\":{:.0}}}",
                    if first { "" } else { "," },
                    if queued { "queued" } else { "register" },
                    c / ghz
                );
                first = false;
                if !json {
                    kprintln!(
                        "bench dvma: one page-selective IOTLB invalidation, {}: {c:.0} cycles ({:.0} ns)",
                        if queued { "queued" } else { "register-based" },
                        c / ghz
                    );
                }
            }
        }
        // strict again, register-based (set_queued(false) held above).
        if let Some(tag) = strict_tag {
            strict_reg = median(
                (0..reps)
                    .map(|_| io_loop(tag, 4096, MEASURE_MS).0)
                    .collect(),
            );
        }
        if had_qi {
            ok &= VTD.inv.set_queued(&VTD, true);
        }
    }
    let invalidation = if !vtd {
        "none"
    } else if VTD.inv.is_queued() {
        "queued"
    } else {
        "register"
    };
    let ratio = strict4k / perm4k.max(f64::MIN_POSITIVE);
    if json {
        kprintln!(
            "json: {{\"program\":\"bench dvma\",\"hypervisor\":\"{hv}\",\"iommu\":\"{}\",\
             \"invalidation\":\"{invalidation}\",\"caching_mode\":{},\"cpus\":{ncpu},\"reps\":{reps},\
             \"ms\":{MEASURE_MS},\"buffers\":{BUFFERS},\"tsc_mhz\":{},\"modes\":{{{modes}}},\
             \"inval_cost\":{{{cost}}},\"strict_register_ns_4k\":{strict_reg:.1},\
             \"strict_over_permanent_4k\":{ratio:.2},\"ok\":{ok}}}",
            if vtd { "vtd" } else { "none" },
            vtd && VTD.caching_mode(),
            crate::clock::tsc_hz() / 1_000_000,
        );
    } else {
        kprintln!(
            "bench dvma: hypervisor {hv}, IOMMU {}, invalidation {invalidation}; strict/permanent 4K = {ratio:.1}x{}",
            if vtd { "VT-d" } else { "none (SoftIommu)" },
            if strict_reg > 0.0 {
                alloc::format!("; strict 4K with register-based invalidation {strict_reg:.0} ns")
            } else {
                String::new()
            }
        );
        if hv.starts_with("TCG") {
            kprintln!(
                "bench dvma: under TCG the CPU and the IOMMU are emulated: counts per I/O compare with hardware, nanoseconds do not"
            );
        }
    }
    if ok { 0 } else { crate::EXIT_FAIL }
}
