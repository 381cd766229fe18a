//! The `disk` program: kern's `sd` over the virtio-blk disk, written and
//! read back through the buf layer.
//!
//! For each DVMA mode x completion mode asked for (`--dvma`,
//! `--completion`: a comma list or `all`; by default `strict` x `all`; at
//! most [`MAX_RUNS`] pairs per boot) it attaches a new
//! sd unit over the one [`VirtioBlk`] (each attach routes the device's
//! interrupt to the new unit) and gives it its own [`REGION`] of the disk:
//! `--iterations N` writes (default 32) at random 4 KiB-aligned offsets in
//! the region, 4 KiB to 64 KiB each, [`DEPTH`] in flight at a time, each
//! filled with kern's verify pattern of its disk offset
//! (`kern::loadgen::fill`, seed [`SEED`]); then it reads every extent
//! back (into buffers filled with garbage first) and checks the pattern.
//! The pattern depends on the disk offset only, so overlapping writes
//! agree, and the host can check the image file afterwards: every sector
//! is either zero or the pattern, and the pattern sectors are as many as
//! the program reports written (`sectors_written`).
//!
//! The device's interrupt (and the driver's thread, in `thread` mode) is
//! on the last CPU: with `--cpus 2` the MSI-X messages go to CPU 1 while
//! this program's thread runs on CPU 0.
//!
//! First, a command naming an IOVA nothing maps must fail with a DMA
//! fault, alone (`unmapped_iova_refused`; the runs after it must all
//! pass). Without VT-d the driver's translation refuses it (nothing would
//! stop the device itself); with `--iommu vtd` the device is given the
//! IOVA, the unit blocks the access and records the fault, and the driver
//! fails the command on that record (`vtd_faults`).
//!
//! It prints one JSON object (`json: {...}`): per run and in total, ops,
//! bytes, errors, mismatches, DMA faults, interrupts.
//!
//! # Contexts
//! A kernel thread on CPU 0 (it sleeps in `biowait`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering::Relaxed};

use kern::ThreadCtx;
use kern::bio::{BlockDev, BufOp, bio_prepare, biowait, getbuf_wait};
use kern::bus_dma::{DvmaMode, TagConfig};
use kern::completion::Completion;
use kern::dev::sd::{Sd, SdConfig};
use kern::dev::{DiskCmd, DiskController, DiskDone, DiskGeometry};
use kern::intr::IntrHandle;
use kern::loadgen::{Rng, check, fill};

use crate::virtio::VirtioBlk;

/// The seed of the verify pattern (the host's check uses it too).
pub const SEED: u64 = 0xd15c_0000_0000_0001;
/// Bytes of disk each run writes in.
pub const REGION: u64 = 1 << 20;
/// Runs per boot: kern has 16 interrupt vectors at IPL_BIO and an sd unit
/// keeps its own (there is no detach).
pub const MAX_RUNS: u32 = 16;
/// I/Os in flight at a time.
pub const DEPTH: usize = 8;

/// The disk, probed at boot (`main.rs`), or null.
pub static DISK: AtomicPtr<VirtioBlk> = AtomicPtr::new(core::ptr::null_mut());

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

/// One run's attachment to the disk: kern's sd has no detach, so the
/// units of earlier runs stay attached (their interrupt handlers, soft
/// interrupts, threads and pending ASTs live on); each goes through its
/// own port, and only the newest port reaches the device. A stale unit
/// that looks for completions finds none (counted), instead of taking the
/// new unit's, whose slots it does not own and would drop.
struct Port {
    disk: &'static VirtioBlk,
    run: u64,
}

/// The run whose port is live.
static LIVE: AtomicU64 = AtomicU64::new(u64::MAX);
/// Reaps by stale ports.
static STALE_REAPS: AtomicU64 = AtomicU64::new(0);

impl DiskController for Port {
    fn geometry(&self) -> DiskGeometry {
        self.disk.geometry()
    }
    fn submit(&self, cmd: DiskCmd) -> bool {
        LIVE.load(Relaxed) == self.run && self.disk.submit(cmd)
    }
    fn doorbell(&self) {
        self.disk.doorbell()
    }
    fn reap(&self) -> Option<DiskDone> {
        if LIVE.load(Relaxed) != self.run {
            STALE_REAPS.fetch_add(1, Relaxed);
            return None;
        }
        self.disk.reap()
    }
    fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        LIVE.store(self.run, Relaxed);
        self.disk.set_interrupt(cpu, vector)
    }
}

#[derive(Default)]
struct RunStats {
    ops: u64,
    bytes: u64,
    errors: u64,
    mismatches: u64,
    sectors_written: u64,
}

/// Run the program; the guest status.
pub fn run(ctx: &ThreadCtx, o: DiskOpts) -> u8 {
    // SAFETY: a non-null pointer is the leaked (so 'static) disk `main.rs`
    // probed at boot.
    let Some(disk) = (unsafe { DISK.load(Relaxed).as_ref() }) else {
        kprintln!("disk: no virtio-blk disk (QEMU wants -device virtio-blk-pci,disable-legacy=on)");
        return crate::EXIT_FAIL;
    };
    let runs = o.dvma.count_ones() * o.completion.count_ones();
    if runs > MAX_RUNS {
        kprintln!(
            "disk: {runs} runs asked for, at most {MAX_RUNS} per boot (each sd attach takes one of kern's IPL_BIO vectors for good)"
        );
        return crate::EXIT_USAGE;
    }
    kern::bio::bio_init(4 * DEPTH);
    // First, so that the runs after it show that it failed alone.
    let (bad, vtd_faults) = unmapped_iova_refused(disk);
    let refused = matches!(bad, Some(d) if d.id == 0 && d.status != kern::dev::DiskStatus::Ok)
        && (!crate::vtd::VTD.enabled() || vtd_faults > 0);
    if !refused {
        kprintln!("disk: the unmapped-IOVA command gave {bad:?}, {vtd_faults} VT-d faults");
    }

    let sectors = disk.geometry().sectors;
    let mut out = String::new();
    let mut total = RunStats::default();
    let mut run = 0u64;
    for (mi, mode) in DvmaMode::ALL.into_iter().enumerate() {
        if o.dvma & (1 << mi) == 0 {
            continue;
        }
        for (ci, comp) in Completion::ALL.into_iter().enumerate() {
            if o.completion & (1 << ci) == 0 {
                continue;
            }
            if (run + 1) * REGION > sectors * 512 {
                kprintln!("disk: the disk is too small for run {run} (1 MiB each)");
                return crate::EXIT_FAIL;
            }
            let st = match one(ctx, disk, run, mode, comp, o.ops) {
                Ok(st) => st,
                Err(e) => {
                    kprintln!("disk: {} {}: {e}", mode.name(), comp.name());
                    return crate::EXIT_FAIL;
                }
            };
            if !o.json {
                kprintln!(
                    "disk: {:9} {:7} {} ops {} bytes, {} errors, {} mismatches",
                    mode.name(),
                    comp.name(),
                    st.0.ops,
                    st.0.bytes,
                    st.0.errors,
                    st.0.mismatches
                );
            }
            let _ = write!(
                out,
                "{}{{\"dvma\":\"{}\",\"completion\":\"{}\",\"region\":{},\"ops\":{},\"bytes\":{},\"errors\":{},\"mismatches\":{},\"sectors_written\":{},\"intrs\":{},\"dma_faults\":{}}}",
                if run == 0 { "" } else { "," },
                mode.name(),
                comp.name(),
                run * REGION,
                st.0.ops,
                st.0.bytes,
                st.0.errors,
                st.0.mismatches,
                st.0.sectors_written,
                st.1,
                st.2
            );
            total.ops += st.0.ops;
            total.bytes += st.0.bytes;
            total.errors += st.0.errors;
            total.mismatches += st.0.mismatches;
            total.sectors_written += st.0.sectors_written;
            run += 1;
        }
    }
    let ok = run > 0 && total.errors == 0 && total.mismatches == 0 && refused;
    let faults = crate::iommu::SOFT_IOMMU.faults.load(Relaxed);
    if o.json {
        kprintln!(
            "json: {{\"program\":\"disk\",\"sectors\":{sectors},\"seed\":{SEED},\"region_bytes\":{REGION},\"runs\":[{out}],\"ops\":{},\"bytes\":{},\"errors\":{},\"mismatches\":{},\"sectors_written\":{},\"device_submitted\":{},\"device_completed\":{},\"translation_faults\":{faults},\"stale_reaps\":{},\"unmapped_iova_refused\":{refused},\"unmapped_iova_status\":\"{:?}\",\"iommu\":\"{}\",\"vtd_faults\":{vtd_faults},\"vtd_invalidations\":{},\"ok\":{ok}}}",
            total.ops,
            total.bytes,
            total.errors,
            total.mismatches,
            total.sectors_written,
            disk.submitted.load(Relaxed),
            disk.completed.load(Relaxed),
            STALE_REAPS.load(Relaxed),
            bad.map(|d| d.status),
            if crate::vtd::VTD.enabled() {
                "vtd"
            } else {
                "none"
            },
            crate::vtd::VTD.invalidations.load(Relaxed),
        );
    } else {
        kprintln!(
            "disk: {} runs, {} ops, {} bytes, {} errors, {} mismatches: {}",
            run,
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
/// back failed. With no port live, no sd unit reaps it; this thread polls
/// for it (2 s at most). Its outcome, the faults VT-d recorded.
fn unmapped_iova_refused(disk: &VirtioBlk) -> (Option<DiskDone>, u64) {
    LIVE.store(u64::MAX, Relaxed);
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
    (done, crate::vtd::VTD.faults.load(Relaxed))
}

/// One run: attach `sd{run}` in `mode`/`comp`, write, read back, verify.
/// Its stats, interrupts taken, DMA faults.
fn one(
    ctx: &ThreadCtx,
    disk: &'static VirtioBlk,
    run: u64,
    mode: DvmaMode,
    comp: Completion,
    ops: u32,
) -> Result<(RunStats, u64, u64), String> {
    let mut tag = TagConfig::new(mode);
    tag.maxsize = 64 << 10;
    tag.slots = 16;
    tag.pool_bytes = 1 << 20;
    let name: &'static str = alloc::format!("sd{run}").leak();
    // The disk interrupts the last CPU: with `--cpus 2` its MSI-X message
    // goes to another local APIC than the one this thread runs on.
    let cpu = kern::kernel::kernel().ncpu() - 1;
    let sd: &'static Sd = Sd::attach(
        SdConfig {
            name,
            parent: "virtio-blk0",
            dma: tag,
            completion: comp,
            cpu,
            bufq: kern::bio::BufqStrategy::Disksort,
            read_only: false,
        },
        alloc::boxed::Box::leak(alloc::boxed::Box::new(Port { disk, run })),
    )
    .map_err(|e| alloc::format!("attach: {e}"))?;
    let base = run * REGION;
    let mut rng = Rng::new(SEED ^ run.wrapping_mul(0x9e37_79b9));
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
                let mut data = sd
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
                sd.strategy(bp);
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
    Ok((
        st,
        sd.stats.intrs.load(Relaxed),
        sd.stats.dma_faults.load(Relaxed),
    ))
}
