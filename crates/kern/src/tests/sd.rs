//! sd end to end on the fake disk controller: a write then a read back
//! through bus_dma and the fake IOMMU, completions in the order the test
//! chooses, disksort feeding the device, and a DMA to an unmapped IOVA
//! failing the buf with EIO (and nothing else).

use alloc::vec::Vec;
use core::cell::RefCell;
use core::sync::atomic::Ordering::Relaxed;

use crate::bio::{
    BioError, BlockDev, BufBox, BufOp, BufqStrategy, DEV_BSIZE, IoDone, bio_init, getbuf,
};
use crate::bus_dma::{DvmaMode, TagConfig};
use crate::completion::Completion;
use crate::dev::sd::{Sd, SdConfig};
use crate::dev::{DiskOp, DiskStatus};
use crate::fake::{FakeDisk, Machine, keep};
use crate::iommu::DmaAccess;

type Done = RefCell<Vec<BufBox>>;

fn record(bp: BufBox, arg: usize) {
    // SAFETY: `arg` is the address of the test's `Done`, which outlives
    // every I/O of the test (they all complete before it returns).
    let done = unsafe { &*(arg as *const Done) };
    done.borrow_mut().push(bp);
}

struct Rig {
    m: Machine,
    disk: &'static FakeDisk,
    sd: &'static Sd,
}

fn rig(completion: Completion, depth: u16, mode: DvmaMode) -> Rig {
    let m = Machine::boot();
    bio_init(16);
    let disk = keep(FakeDisk::new(512, depth, 64 * 1024));
    let sd = Sd::attach(
        SdConfig {
            name: "sd0",
            parent: "fakedisk0",
            dma: TagConfig {
                maxsize: 64 * 1024,
                slots: 4,
                pool_bytes: 128 * 1024,
                ..TagConfig::new(mode)
            },
            completion,
            cpu: 0,
            bufq: BufqStrategy::Disksort,
            read_only: false,
        },
        disk,
    )
    .expect("attach");
    crate::bio::bdev_attach(sd).expect("bdev_attach");
    Rig { m, disk, sd }
}

/// Start an I/O of `nsect` sectors at `blkno`; a write carries `fill`.
fn io(r: &Rig, done: &Done, op: BufOp, blkno: u64, nsect: usize, fill: u8) {
    let mut b = getbuf().expect("buf");
    b.op = op;
    b.blkno = blkno;
    b.bcount = nsect * DEV_BSIZE;
    let mut data = r.sd.alloc_buf(b.bcount).expect("data");
    data.as_mut_slice().fill(fill);
    b.data = Some(data);
    b.iodone = Some(IoDone::Call(record, done as *const Done as usize));
    r.sd.strategy(b);
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_then_read_back(completion: Completion, mode: DvmaMode) {
    let r = rig(completion, 4, mode);
    let done = Done::default();
    let bytes = pattern(3 * DEV_BSIZE, 7);
    // Write 3 sectors at 10.
    let mut b = getbuf().expect("buf");
    b.op = BufOp::Write;
    b.blkno = 10;
    b.bcount = bytes.len();
    let mut data = r.sd.alloc_buf(bytes.len()).expect("data");
    data.as_mut_slice().copy_from_slice(&bytes);
    b.data = Some(data);
    b.iodone = Some(IoDone::Call(record, &done as *const Done as usize));
    r.sd.strategy(b);

    // On the device, not done: the device may read (only) that buffer.
    let cmds = r.disk.active();
    assert_eq!(cmds.len(), 1);
    let cmd = cmds[0];
    assert_eq!((cmd.op, cmd.lba, cmd.nsect), (DiskOp::Write, 10, 3));
    let (_, acc) = r.m.iommu().lookup(cmd.iova).expect("mapped for the device");
    if mode == DvmaMode::Strict {
        assert_eq!(acc, DmaAccess::Read, "a disk write only reads memory");
    }
    assert!(done.borrow().is_empty());
    assert_eq!(r.sd.inflight(), 1);

    r.disk.complete(0);
    assert!(
        done.borrow().is_empty(),
        "the interrupt is not delivered yet"
    );
    assert!(r.m.signals_pending());
    r.m.deliver();
    let wb = done.borrow_mut().pop().expect("write done");
    assert_eq!((wb.error, wb.resid), (None, 0));
    assert_eq!(r.disk.media(10 * DEV_BSIZE, bytes.len()), bytes);
    assert_eq!(r.sd.inflight(), 0);
    if mode == DvmaMode::Strict {
        assert!(
            r.m.iommu().lookup(cmd.iova).is_none(),
            "strict: unmapped at unload"
        );
    }
    drop(wb);

    // Read it back into a zeroed buffer.
    io(&r, &done, BufOp::Read, 10, 3, 0);
    let cmd = r.disk.active()[0];
    assert_eq!((cmd.op, cmd.lba, cmd.nsect), (DiskOp::Read, 10, 3));
    r.disk.complete(0);
    r.m.deliver();
    let rb = done.borrow_mut().pop().expect("read done");
    assert_eq!(rb.error, None);
    assert_eq!(rb.data.as_ref().expect("data").as_slice(), &bytes[..]);
    assert_eq!(r.sd.stats.bytes_written.load(Relaxed), bytes.len() as u64);
    assert_eq!(r.sd.stats.bytes_read.load(Relaxed), bytes.len() as u64);
}

#[test]
fn write_then_read_back_intr_strict() {
    write_then_read_back(Completion::Intr, DvmaMode::Strict);
}

#[test]
fn write_then_read_back_softint_slots() {
    write_then_read_back(Completion::Softint, DvmaMode::Slots);
}

#[test]
fn write_then_read_back_intr_permanent() {
    write_then_read_back(Completion::Intr, DvmaMode::Permanent);
}

#[test]
fn write_then_read_back_softint_shadow() {
    write_then_read_back(Completion::Softint, DvmaMode::Shadow);
}

/// Completions in any order, coalesced into one interrupt, finish every
/// buf with its own data.
#[test]
fn completions_out_of_order_share_one_interrupt() {
    let r = rig(Completion::Intr, 4, DvmaMode::Strict);
    let done = Done::default();
    for (i, blk) in [0u64, 40, 80].into_iter().enumerate() {
        io(&r, &done, BufOp::Write, blk, 2, 0xa0 + i as u8);
    }
    assert_eq!(r.disk.active().len(), 3);
    assert_eq!(r.disk.doorbells(), 3);
    r.disk.complete(2);
    r.disk.complete(0);
    r.disk.complete(0);
    let traps = r.m.deliver();
    assert_eq!(traps, 1, "one interrupt for three completions");
    let d = done.borrow();
    let blks: Vec<u64> = d.iter().map(|b| b.blkno).collect();
    assert_eq!(blks, [80, 0, 40], "finished in completion order");
    assert!(d.iter().all(|b| b.error.is_none()));
    for (i, blk) in [0usize, 40, 80].into_iter().enumerate() {
        assert!(
            r.disk
                .media(blk * DEV_BSIZE, 2 * DEV_BSIZE)
                .iter()
                .all(|&x| x == 0xa0 + i as u8)
        );
    }
    assert_eq!(r.sd.stats.intrs.load(Relaxed), 1);
}

/// With one command slot the rest wait in the bufq, and disksort decides
/// what the device sees next.
#[test]
fn the_device_sees_the_elevator_order() {
    let r = rig(Completion::Intr, 1, DvmaMode::Strict);
    let done = Done::default();
    for blk in [100u64, 300, 20, 200, 120] {
        io(&r, &done, BufOp::Read, blk, 1, 0);
    }
    for _ in 0..5 {
        assert_eq!(r.disk.complete_all().len(), 1, "one command slot");
        r.m.deliver();
    }
    let lbas: Vec<u64> = r.disk.started().iter().map(|c| c.lba).collect();
    assert_eq!(lbas, [100, 120, 200, 300, 20]);
    assert_eq!(done.borrow().len(), 5);
}

/// A DMA to an IOVA the IOMMU does not map faults: that buf fails with
/// EIO, the media is untouched, and the next I/O works.
#[test]
fn a_dma_to_an_unmapped_iova_fails_with_eio() {
    let r = rig(Completion::Intr, 4, DvmaMode::Strict);
    let done = Done::default();
    r.disk.set_media(0, &[0x55; DEV_BSIZE]);
    io(&r, &done, BufOp::Write, 0, 1, 0xee);
    let iova = r.disk.active()[0].iova;
    // A stray descriptor: 1 MiB past the mapping, which nothing maps.
    let off: usize = 1 << 20;
    assert!(r.m.iommu().lookup(iova + off).is_none());
    r.disk.skew_next(off as u64);
    assert_eq!(r.disk.complete(0).status, DiskStatus::DmaFault);
    r.m.deliver();
    let b = done.borrow_mut().pop().expect("done");
    assert_eq!((b.error, b.resid), (Some(BioError::Io), DEV_BSIZE));
    assert_eq!(
        r.disk.media(0, DEV_BSIZE),
        [0x55; DEV_BSIZE],
        "nothing written"
    );
    assert_eq!(r.sd.stats.dma_faults.load(Relaxed), 1);
    assert_eq!(r.sd.tag().stats.faults.load(Relaxed), 1);
    drop(b);

    io(&r, &done, BufOp::Write, 0, 1, 0xee);
    r.disk.complete(0);
    r.m.deliver();
    assert_eq!(done.borrow_mut().pop().expect("done").error, None);
    assert_eq!(r.disk.media(0, DEV_BSIZE), [0xee; DEV_BSIZE]);
}

/// An I/O past the end never reaches the device.
#[test]
fn bounds_are_checked_before_the_device() {
    let r = rig(Completion::Intr, 4, DvmaMode::Strict);
    let done = Done::default();
    io(&r, &done, BufOp::Read, 511, 2, 0);
    io(&r, &done, BufOp::Write, 512, 1, 0);
    assert!(r.disk.started().is_empty());
    let errs: Vec<_> = done.borrow().iter().map(|b| b.error).collect();
    assert_eq!(errs, [Some(BioError::Inval), Some(BioError::NoSpc)]);
}

/// The 16 IPL_BIO vectors are a fixed table: once they are all taken,
/// `intr_establish` refuses; `intr_disestablish` gives one back, its old
/// handler is not called any more (a post of its vector runs the new
/// one), and the next establish gets it.
#[test]
fn a_disestablished_vector_is_reused_and_its_handler_never_runs_again() {
    use crate::ctx::ThreadCtx;
    use crate::intr::{IntrError, intr_disestablish, intr_establish, intr_post};
    use crate::ipl::Ipl;
    use core::sync::atomic::AtomicU64;
    static OLD: AtomicU64 = AtomicU64::new(0);
    static NEW: AtomicU64 = AtomicU64::new(0);
    OLD.store(0, Relaxed);
    NEW.store(0, Relaxed);
    let m = Machine::boot();
    let mut hs = Vec::new();
    loop {
        match intr_establish(Ipl::Bio, "full", |_| {}) {
            Ok(h) => hs.push(h),
            Err(e) => {
                assert_eq!(e, IntrError::NoVector { level: Ipl::Bio });
                break;
            }
        }
    }
    assert_eq!(hs.len(), 16, "IPL_BIO has 16 vectors");
    // Replace one by a counting handler: first free it.
    let victim = hs[3];
    intr_disestablish(&ThreadCtx::new(), victim);
    let old = intr_establish(Ipl::Bio, "old", |_| {
        OLD.fetch_add(1, Relaxed);
    })
    .expect("the freed vector");
    assert_eq!(old.bit(), victim.bit(), "the one freed");
    intr_post(0, old);
    m.deliver();
    assert_eq!(OLD.load(Relaxed), 1);
    intr_disestablish(&ThreadCtx::new(), old);
    // Disestablishing twice does nothing.
    intr_disestablish(&ThreadCtx::new(), old);
    // A post of the old vector with nothing established runs nothing.
    intr_post(0, old);
    m.deliver();
    let new = intr_establish(Ipl::Bio, "new", |_| {
        NEW.fetch_add(1, Relaxed);
    })
    .expect("the freed vector again");
    assert_eq!(new.bit(), old.bit());
    intr_post(0, old);
    m.deliver();
    assert_eq!(
        (OLD.load(Relaxed), NEW.load(Relaxed)),
        (1, 1),
        "the old handler never runs again; the vector's post reaches the new one"
    );
    assert_eq!(
        crate::stats::snapshot()
            .vectors
            .iter()
            .filter(|v| v.name == "new")
            .count(),
        1,
        "the statistics name the vector's new owner"
    );
}

/// More sd attaches than there are IPL_BIO vectors, each detached after
/// its I/O: every unit writes and reads back its own pattern through the
/// same controller, and gets its interrupts (a detached unit's vector is
/// the next one's). A busy unit refuses to detach; a detached one fails
/// bufs with EIO and refuses a second detach.
#[test]
fn sd_attach_detach_cycles_past_the_vector_table() {
    use crate::ctx::ThreadCtx;
    use crate::dev::sd::DetachError;
    let m = Machine::boot();
    bio_init(16);
    let disk = keep(FakeDisk::new(512, 4, 64 * 1024));
    let done = Done::default();
    let arg = &done as *const Done as usize;
    let ctx = ThreadCtx::new();
    let units = [
        "sd0", "sd1", "sd2", "sd3", "sd4", "sd5", "sd6", "sd7", "sd8", "sd9",
    ];
    let mut last = None;
    for cycle in 0..20u8 {
        let sd = Sd::attach(
            SdConfig {
                name: units[cycle as usize % units.len()],
                parent: "fakedisk0",
                dma: TagConfig {
                    maxsize: 64 * 1024,
                    ..TagConfig::new(DvmaMode::Strict)
                },
                completion: if cycle % 2 == 0 {
                    Completion::Intr
                } else {
                    Completion::Softint
                },
                cpu: 0,
                bufq: BufqStrategy::Fcfs,
                read_only: false,
            },
            disk,
        )
        .unwrap_or_else(|e| panic!("attach {cycle}: {e}"));
        // Leaked for the boot, reachable from nothing once detached.
        crate::fake::keep_ref(sd);
        let bytes = pattern(2 * DEV_BSIZE, cycle);
        let blk = 2 * u64::from(cycle);
        for op in [BufOp::Write, BufOp::Read] {
            let mut b = getbuf().expect("buf");
            b.op = op;
            b.blkno = blk;
            b.bcount = bytes.len();
            let mut data = sd.alloc_buf(b.bcount).expect("data");
            match op {
                BufOp::Write => data.as_mut_slice().copy_from_slice(&bytes),
                _ => data.as_mut_slice().fill(0),
            }
            b.data = Some(data);
            b.iodone = Some(IoDone::Call(record, arg));
            sd.strategy(b);
            if op == BufOp::Write {
                assert_eq!(
                    sd.detach(&ctx),
                    Err(DetachError::Busy {
                        unit: sd.name(),
                        inflight: 1,
                        queued: false
                    })
                );
            }
            assert_eq!(disk.complete_all().len(), 1);
            m.deliver();
            let bp = done.borrow_mut().pop().expect("done");
            assert_eq!(bp.error, None, "cycle {cycle} {op:?}");
            if op == BufOp::Read {
                assert_eq!(bp.data.as_ref().expect("data").as_slice(), &bytes[..]);
            }
        }
        assert_eq!(sd.stats.intrs.load(Relaxed), 2, "cycle {cycle}");
        sd.detach(&ctx).expect("idle: detaches");
        assert_eq!(
            sd.detach(&ctx),
            Err(DetachError::Detached { unit: sd.name() })
        );
        last = Some(sd);
    }
    // A detached unit fails what it is given, with EIO, without the
    // device.
    let sd = last.expect("a unit");
    let started = disk.started().len();
    let mut b = getbuf().expect("buf");
    b.op = BufOp::Read;
    b.blkno = 0;
    b.bcount = DEV_BSIZE;
    b.data = Some(sd.alloc_buf(DEV_BSIZE).expect("data"));
    b.iodone = Some(IoDone::Call(record, arg));
    sd.strategy(b);
    let bp = done.borrow_mut().pop().expect("failed at once");
    assert_eq!(bp.error, Some(BioError::Io));
    assert_eq!(disk.started().len(), started, "the device saw nothing");
    drop(bp);
}
