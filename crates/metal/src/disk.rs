//! The `disk` program: kern's `sd` over every virtio-blk disk, and
//! (`--ccd`) kern's `ccd` striped over them, written and read back
//! through the buf layer.
//!
//! For each DVMA mode x completion mode asked for (`--dvma`,
//! `--completion`: a comma list or `all`; by default `strict` x `all`) it
//! attaches a new sd unit over each [`VirtioBlk`] (each attach routes the
//! device's interrupt to the new unit), runs each unit in its own
//! [`REGION`] of its disk, then, with `--ccd` and two disks or more,
//! attaches a ccd over those units (interleave [`CCD_ILEAVE`] sectors, the
//! pair's completion mode) and runs it in its own region of the ccd,
//! which lies at [`CCD_COMPONENT_BASE`] of every component; then it
//! detaches the sd units (`kern::dev::sd::Sd::detach`), so that the next
//! pair's units get their interrupt vectors. A run: `--iterations N`
//! writes (default 32) at random 4 KiB-aligned offsets in the region,
//! 4 KiB to 64 KiB each, [`DEPTH`] in flight at a time, each filled with
//! kern's verify pattern of its device offset (`kern::loadgen::fill`,
//! seed [`SEED`]); then it reads every extent back (into buffers filled
//! with garbage first) and checks the pattern. The pattern depends on the
//! device offset only, so overlapping writes agree, and the host can check
//! the image files afterwards: below [`CCD_COMPONENT_BASE`] every sector
//! of a disk is zero or the pattern of its disk offset; above, zero or the
//! pattern of the ccd offset it has in the stripe; and the pattern sectors
//! are as many as the program reports written (`sectors_written`).
//!
//! The devices' interrupts (and the drivers' threads, in `thread` mode)
//! are on the last CPU: with `--cpus 2` the MSI-X messages go to CPU 1
//! while this program's thread runs on CPU 0.
//!
//! First, a command naming an IOVA nothing maps must fail with a DMA
//! fault, alone (`unmapped_iova_refused`, on the first disk; the runs after
//! it must all pass). Without VT-d the driver's translation refuses it
//! (nothing would stop the device itself); with `--iommu vtd` the device
//! is given the IOVA, the unit blocks the access and records the fault,
//! its fault event interrupts the boot CPU, whose handler collects the
//! record (`vtd_fault_intrs`, `vtd_faults_by_intr`), and the driver fails
//! the command on that record (`vtd_faults`).
//!
//! It prints one JSON object (`json: {...}`): per run and in total, ops,
//! bytes, errors, mismatches, DMA faults, interrupts.
//!
//! # Contexts
//! A kernel thread on CPU 0 (it sleeps in `biowait`).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::Relaxed};

use kern::ThreadCtx;
use kern::bio::{BlockDev, BufOp, bio_prepare, biowait, getbuf_wait};
use kern::bus_dma::{DvmaMode, TagConfig};
use kern::completion::Completion;
use kern::dev::ccd::{CbufAlloc, Ccd, CcdConfig};
use kern::dev::sd::{Sd, SdConfig};
use kern::dev::{DiskCmd, DiskController, DiskDone};
use kern::loadgen::{Rng, check, fill};

use crate::intr::MAX_DISKS;
use crate::virtio::VirtioBlk;

/// The seed of the verify pattern (the host's check uses it too).
pub const SEED: u64 = 0xd15c_0000_0000_0001;
/// Bytes of a device each run writes in.
pub const REGION: u64 = 1 << 20;
/// I/Os in flight at a time.
pub const DEPTH: usize = 8;
/// The ccd's interleave, sectors (8 KiB: a 64 KiB write spans 8 stripes).
pub const CCD_ILEAVE: u64 = 16;
/// Where the ccd's runs are on each component (bytes; the sd runs stay
/// below): the ccd's region of run `r` starts at ccd offset
/// `CCD_COMPONENT_BASE * disks + r * REGION`.
pub const CCD_COMPONENT_BASE: u64 = 32 << 20;

/// The disks probed at boot (`main.rs`), in PCI order; [`NDISKS`] of them.
static DISKS: [AtomicPtr<VirtioBlk>; MAX_DISKS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_DISKS];
static NDISKS: AtomicUsize = AtomicUsize::new(0);

/// Keep `d` as the next disk (boot CPU, at boot).
pub fn add_disk(d: VirtioBlk) {
    let i = NDISKS.load(Relaxed);
    if i < MAX_DISKS {
        DISKS[i].store(Box::leak(Box::new(d)), Relaxed);
        NDISKS.store(i + 1, Relaxed);
    }
}

/// The disks probed at boot.
pub fn disks() -> Vec<&'static VirtioBlk> {
    (0..NDISKS.load(Relaxed).min(MAX_DISKS))
        // SAFETY: a non-null pointer is a leaked (so 'static) disk that
        // `add_disk` stored at boot.
        .filter_map(|i| unsafe { DISKS[i].load(Relaxed).as_ref() })
        .collect()
}

/// Attach an sd unit named `name` over `disk` in `mode`/`comp`, its
/// interrupts on the last CPU; `slots`: the `slots` mode's slots.
pub fn attach_sd(
    name: &'static str,
    disk: &'static VirtioBlk,
    mode: DvmaMode,
    comp: Completion,
    slots: usize,
) -> Result<&'static Sd, String> {
    let mut tag = TagConfig::new(mode);
    tag.maxsize = 64 << 10;
    tag.slots = slots;
    tag.pool_bytes = 1 << 20;
    // The disk interrupts the last CPU: with `--cpus 2` its MSI-X message
    // goes to another local APIC than the one this thread runs on.
    let cpu = kern::kernel::kernel().ncpu() - 1;
    let parent: &'static str = alloc::format!("virtio-blk{}", disk.index()).leak();
    Sd::attach(
        SdConfig {
            name,
            parent,
            dma: tag,
            completion: comp,
            cpu,
            bufq: kern::bio::BufqStrategy::Disksort,
            read_only: false,
        },
        disk,
    )
    .map_err(|e| alloc::format!("attach: {e}"))
}

/// What the program does.
#[derive(Clone, Copy, Debug)]
pub struct DiskOpts {
    /// Print JSON.
    pub json: bool,
    /// Writes per run.
    pub ops: u32,
    /// Bit `i`: DVMA mode `DvmaMode::ALL[i]`.
    pub dvma: u8,
    /// Bit `i`: completion `Completion::ALL[i]`.
    pub completion: u8,
    /// Also stripe a ccd over the disks.
    pub ccd: bool,
}

/// Parse a `--dvma`/`--completion` list into a bit set (`None` if a name
/// is unknown).
pub fn parse_set<T: Copy>(s: &str, all: &[T], name: impl Fn(T) -> &'static str) -> Option<u8> {
    if s == "all" {
        return Some(((1u16 << all.len()) - 1) as u8);
    }
    let mut set = 0u8;
    for w in s.split(',') {
        let i = all.iter().position(|&m| name(m) == w)?;
        set |= 1 << i;
    }
    Some(set)
}

/// The pairs of two bit sets, in `ALL` order.
pub fn pairs(dvma: u8, completion: u8) -> Vec<(DvmaMode, Completion)> {
    let mut v = Vec::new();
    for (mi, mode) in DvmaMode::ALL.into_iter().enumerate() {
        for (ci, comp) in Completion::ALL.into_iter().enumerate() {
            if dvma & (1 << mi) != 0 && completion & (1 << ci) != 0 {
                v.push((mode, comp));
            }
        }
    }
    v
}

#[derive(Default)]
struct RunStats {
    ops: u64,
    bytes: u64,
    errors: u64,
    mismatches: u64,
    sectors_written: u64,
}

/// Sum of the interrupts the units took.
fn intrs_of(sds: &[&'static Sd]) -> u64 {
    sds.iter().map(|s| s.stats.intrs.load(Relaxed)).sum()
}

/// Sum of the DMA faults the units saw.
fn faults_of(sds: &[&'static Sd]) -> u64 {
    sds.iter().map(|s| s.stats.dma_faults.load(Relaxed)).sum()
}

/// Run the program; the guest status.
pub fn run(ctx: &ThreadCtx, o: DiskOpts) -> u8 {
    let disks = disks();
    if disks.is_empty() {
        kprintln!("disk: no virtio-blk disk (QEMU wants -device virtio-blk-pci,disable-legacy=on)");
        return crate::EXIT_FAIL;
    }
    let pairs = pairs(o.dvma, o.completion);
    let ccd = o.ccd && disks.len() >= 2;
    if o.ccd && !ccd {
        kprintln!("disk: --ccd wants two disks or more (--disks 2)");
        return crate::EXIT_USAGE;
    }
    // What every pair keeps of kern's bounded tables (its units detach,
    // but their tags and callouts stay: `kern::dev::sd`): stay well inside.
    let units = pairs.len() * disks.len();
    let lazy = pairs.iter().filter(|p| p.0 == DvmaMode::Lazy).count() * disks.len();
    let callouts = units + lazy + if ccd { pairs.len() } else { 0 };
    if units > 200 || callouts > 110 {
        kprintln!(
            "disk: {} pairs x {} disks is more sd units than one boot's tables hold",
            pairs.len(),
            disks.len()
        );
        return crate::EXIT_USAGE;
    }
    kern::bio::bio_init(4 * DEPTH);
    // First, so that the runs after it show that it failed alone.
    let (bad, vtd_faults) = unmapped_iova_refused(disks[0]);
    let vtd = &crate::vtd::VTD;
    let fault_intrs = vtd.fault.intrs.load(Relaxed);
    let refused = matches!(bad, Some(d) if d.id == 0 && d.status != kern::dev::DiskStatus::Ok)
        && (!vtd.enabled() || (vtd_faults > 0 && fault_intrs > 0));
    if !refused {
        kprintln!(
            "disk: the unmapped-IOVA command gave {bad:?}, {vtd_faults} VT-d faults, {fault_intrs} fault interrupts"
        );
    }

    let sectors = disks
        .iter()
        .map(|d| d.geometry().sectors)
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    let mut total = RunStats::default();
    let mut nruns = 0u64;
    let n = disks.len() as u64;
    for (r, &(mode, comp)) in pairs.iter().enumerate() {
        let r = r as u64;
        if (r + 1) * REGION > CCD_COMPONENT_BASE
            || (ccd && CCD_COMPONENT_BASE + (r + 1) * REGION.div_ceil(n) + REGION > sectors * 512)
            || (r + 1) * REGION > sectors * 512
        {
            kprintln!("disk: the disks are too small for run {r} (1 MiB each)");
            return crate::EXIT_FAIL;
        }
        let mut sds: Vec<&'static Sd> = Vec::new();
        for &d in &disks {
            let name: &'static str = alloc::format!("sd{}", d.index()).leak();
            match attach_sd(name, d, mode, comp, 16) {
                Ok(sd) => sds.push(sd),
                Err(e) => {
                    kprintln!(
                        "disk: {} {} disk {}: {e}",
                        mode.name(),
                        comp.name(),
                        d.index()
                    );
                    return crate::EXIT_FAIL;
                }
            }
        }
        let mut devs: Vec<(&'static dyn BlockDev, i64, u64)> = sds
            .iter()
            .zip(&disks)
            .map(|(&s, d)| (s as &'static dyn BlockDev, d.index() as i64, r * REGION))
            .collect();
        if ccd {
            let comps: Vec<&'static dyn BlockDev> =
                sds.iter().map(|&s| s as &'static dyn BlockDev).collect();
            match Ccd::attach(CcdConfig {
                name: "ccd0",
                components: comps,
                interleave: CCD_ILEAVE,
                completion: comp,
                cpu: kern::kernel::kernel().ncpu() - 1,
                cbufs: CbufAlloc::Pool,
                pool_size: 256,
                read_only: false,
            }) {
                Ok(c) => devs.push((
                    c as &'static dyn BlockDev,
                    -1,
                    CCD_COMPONENT_BASE * n + r * REGION,
                )),
                Err(e) => {
                    kprintln!("disk: {} {} ccd: {e}", mode.name(), comp.name());
                    return crate::EXIT_FAIL;
                }
            }
        }
        for (dev, disk, base) in devs {
            let (i0, f0) = (intrs_of(&sds), faults_of(&sds));
            // Each device its own extents: the run and the disk (-1: the
            // ccd) seed them.
            let st = match one(ctx, dev, base, r * 64 + (disk + 1) as u64, o.ops) {
                Ok(st) => st,
                Err(e) => {
                    kprintln!("disk: {} {} {}: {e}", mode.name(), comp.name(), dev.name());
                    return crate::EXIT_FAIL;
                }
            };
            let (intrs, faults) = (intrs_of(&sds) - i0, faults_of(&sds) - f0);
            if !o.json {
                kprintln!(
                    "disk: {:9} {:7} {:4} {} ops {} bytes, {} errors, {} mismatches, {} interrupts",
                    mode.name(),
                    comp.name(),
                    dev.name(),
                    st.ops,
                    st.bytes,
                    st.errors,
                    st.mismatches,
                    intrs
                );
            }
            let _ = write!(
                out,
                "{}{{\"dvma\":\"{}\",\"completion\":\"{}\",\"dev\":\"{}\",\"disk\":{disk},\"region\":{base},\"ops\":{},\"bytes\":{},\"errors\":{},\"mismatches\":{},\"sectors_written\":{},\"intrs\":{intrs},\"dma_faults\":{faults}}}",
                if nruns == 0 { "" } else { "," },
                mode.name(),
                comp.name(),
                dev.name(),
                st.ops,
                st.bytes,
                st.errors,
                st.mismatches,
                st.sectors_written,
            );
            total.ops += st.ops;
            total.bytes += st.bytes;
            total.errors += st.errors;
            total.mismatches += st.mismatches;
            total.sectors_written += st.sectors_written;
            nruns += 1;
        }
        for sd in sds {
            if let Err(e) = sd.detach(ctx) {
                kprintln!("disk: detach: {e}");
                return crate::EXIT_FAIL;
            }
        }
    }
    let ok = nruns > 0 && total.errors == 0 && total.mismatches == 0 && refused;
    let faults = crate::iommu::SOFT_IOMMU.faults.load(Relaxed);
    let submitted: u64 = disks.iter().map(|d| d.submitted.load(Relaxed)).sum();
    let completed: u64 = disks.iter().map(|d| d.completed.load(Relaxed)).sum();
    if o.json {
        kprintln!(
            "json: {{\"program\":\"disk\",\"disks\":{},\"sectors\":{sectors},\"seed\":{SEED},\"region_bytes\":{REGION},\"ccd\":{ccd},\"ccd_interleave\":{CCD_ILEAVE},\"ccd_component_base\":{CCD_COMPONENT_BASE},\"runs\":[{out}],\"ops\":{},\"bytes\":{},\"errors\":{},\"mismatches\":{},\"sectors_written\":{},\"device_submitted\":{submitted},\"device_completed\":{completed},\"translation_faults\":{faults},\"unmapped_iova_refused\":{refused},\"unmapped_iova_status\":\"{:?}\",\"iommu\":\"{}\",\"vtd_faults\":{vtd_faults},\"vtd_fault_intrs\":{},\"vtd_faults_by_intr\":{},\"vtd_invalidation\":\"{}\",\"vtd_invalidations\":{},\"vtd_queued_submissions\":{},\"vtd_register_invalidations\":{},\"ok\":{ok}}}",
            disks.len(),
            total.ops,
            total.bytes,
            total.errors,
            total.mismatches,
            total.sectors_written,
            bad.map(|d| d.status),
            if vtd.enabled() { "vtd" } else { "none" },
            vtd.fault.intrs.load(Relaxed),
            vtd.fault.by_intr.load(Relaxed),
            if !vtd.enabled() {
                "none"
            } else if vtd.inv.is_queued() {
                "queued"
            } else {
                "register"
            },
            vtd.inv.stats.iotlb(),
            vtd.inv.stats.queued.load(Relaxed),
            vtd.inv.stats.register.load(Relaxed),
        );
    } else {
        kprintln!(
            "disk: {} runs on {} disk(s), {} ops, {} bytes, {} errors, {} mismatches: {}",
            nruns,
            disks.len(),
            total.ops,
            total.bytes,
            total.errors,
            total.mismatches,
            if ok { "ok" } else { "FAILED" }
        );
    }
    if ok { 0 } else { crate::EXIT_FAIL }
}

/// A command naming an IOVA that nothing maps (the window's last page)
/// must fail, alone. Without VT-d the driver's translation refuses it
/// before the device sees it; behind VT-d the device gets the IOVA, the
/// unit blocks its access and records a fault, and the command must come
/// back failed; the unit's fault event has interrupted the boot CPU by
/// then (it is sent when the fault is recorded, before the device
/// completes the command), or does within the same 2 s. No sd unit is
/// attached yet, so none reaps it; this thread polls for it (2 s at
/// most). Its outcome, the faults VT-d recorded.
fn unmapped_iova_refused(disk: &VirtioBlk) -> (Option<DiskDone>, u64) {
    let cmd = DiskCmd {
        id: 0,
        op: kern::dev::DiskOp::Read,
        lba: 0,
        nsect: 8,
        iova: kern::iommu::Iova(crate::iommu::WINDOW - 4096),
        fua: false,
    };
    if !disk.submit(cmd) {
        return (None, 0);
    }
    disk.doorbell();
    let until = crate::clock::nanotime() + 2_000_000_000;
    let mut done = None;
    while done.is_none() && crate::clock::nanotime() < until {
        done = disk.reap();
        core::hint::spin_loop();
    }
    let vtd = &crate::vtd::VTD;
    while vtd.enabled() && vtd.fault.intrs.load(Relaxed) == 0 && crate::clock::nanotime() < until {
        core::hint::spin_loop();
    }
    (done, vtd.fault.records.load(Relaxed))
}

/// One run on `dev` in `[base, base + REGION)`: write, read back, verify;
/// `run` seeds the extents.
fn one(
    ctx: &ThreadCtx,
    dev: &'static dyn BlockDev,
    base: u64,
    run: u64,
    ops: u32,
) -> Result<RunStats, String> {
    let mut rng = Rng::new(SEED ^ run.wrapping_mul(0x9e37_79b9) ^ base);
    let extents: Vec<(u64, usize)> = (0..ops)
        .map(|_| {
            let len = (1 + rng.below(16) as usize) * 4096;
            let off = base + rng.below((REGION - len as u64) / 4096 + 1) * 4096;
            (off, len)
        })
        .collect();
    let mut st = RunStats::default();
    let mut written = [0u64; (REGION / 512 / 64) as usize];
    for &(off, len) in &extents {
        for s in (off - base) / 512..(off - base + len as u64) / 512 {
            written[(s / 64) as usize] |= 1 << (s % 64);
        }
    }
    st.sectors_written = written.iter().map(|w| u64::from(w.count_ones())).sum();
    for op in [BufOp::Write, BufOp::Read] {
        // Reads in another order than the writes.
        let order: Vec<(u64, usize)> = match op {
            BufOp::Read => extents.iter().rev().copied().collect(),
            _ => extents.clone(),
        };
        for batch in order.chunks(DEPTH) {
            let mut waits = Vec::with_capacity(DEPTH);
            for &(off, len) in batch {
                let mut bp = getbuf_wait(ctx).map_err(|_| "getbuf interrupted")?;
                let mut data = dev
                    .alloc_buf_wait(ctx, len)
                    .map_err(|_| "alloc_buf interrupted")?;
                match op {
                    BufOp::Write => fill(&mut data.as_mut_slice()[..len], SEED, off),
                    _ => data.as_mut_slice()[..len].fill(0xa5),
                }
                bp.op = op;
                bp.blkno = off / 512;
                bp.bcount = len;
                bp.data = Some(data);
                let w = bio_prepare(&mut bp);
                dev.strategy(bp);
                waits.push((w, off, len));
            }
            for (w, off, len) in waits {
                let bp = biowait(ctx, w);
                st.ops += 1;
                st.bytes += len as u64;
                if let Some(e) = bp.error {
                    st.errors += 1;
                    if st.errors <= 3 {
                        kprintln!("disk: {op:?} {off:#x}+{len:#x}: {e:?}");
                    }
                } else if op == BufOp::Read
                    && !bp
                        .data
                        .as_ref()
                        .is_some_and(|d| check(&d.as_slice()[..len], SEED, off))
                {
                    st.mismatches += 1;
                    if st.mismatches <= 3 {
                        kprintln!("disk: read {off:#x}+{len:#x}: not the pattern written");
                    }
                }
            }
        }
    }
    Ok(st)
}
