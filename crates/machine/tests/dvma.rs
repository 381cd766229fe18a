//! DVMA on the real window: every mode maps exactly what was loaded, in the
//! right direction; what a device can still reach after unload is what the
//! mode documents; running out fails, waits or defers in order; concurrent
//! loads on both CPUs never see each other's buffers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kern::Completion;
use kern::bio::{BioError, BlockDev, BufOp, BufqStrategy, bio_init, getbuf_wait, submit_wait};
use kern::bus_dma::*;
use kern::ctx::{SoftCtx, ThreadCtx};
use kern::dev::sd::{Sd, SdConfig};
use kern::dev::{DiskCmd, DiskController, DiskDone, DiskGeometry, DiskOp, DiskStatus};
use kern::intr::IntrHandle;
use kern::vm::IoBuf;
use machine::dev::{DiskConfig, DmaDisk};
use machine::dvma::Window;

mod common;
use common::*;

fn small(mode: DvmaMode) -> TagConfig {
    let mut c = TagConfig::new(mode);
    c.maxsize = 64 << 10;
    c.slots = 4;
    c.pool_bytes = 1 << 20;
    c
}

/// Every mode: the device reads exactly the loaded buffer (ToDevice), writes
/// land in it (FromDevice), a ToDevice mapping refuses device writes where
/// the mode maps per I/O, and after unload the device reaches what the mode
/// says it may.
#[test]
fn every_mode_maps_what_was_loaded() {
    let m = boot(1);
    let w: &'static Window = m.window();
    for mode in DvmaMode::ALL {
        let r = m
            .run(0, "dvma", move |ctx| {
                let tag = tag_create("t", small(mode)).unwrap();
                let mut map = dmamap_create(tag, 64 << 10).unwrap();
                let n = 12 << 10;
                let data = pattern(mode as u8, n);

                // ToDevice: the device reads the buffer's bytes.
                let mut buf = dmamem_alloc(tag, n).unwrap();
                buf.as_mut_slice().copy_from_slice(&data);
                dmamap_load(&mut map, buf, DmaDir::ToDevice, Wait::Ok(ctx)).unwrap();
                dmamap_sync(&mut map, SyncOp::PreWrite);
                let seg = map.segs()[0];
                assert_eq!(seg.len, n);
                let mut seen = vec![0u8; n];
                w.dma_read(seg.iova, &mut seen).unwrap();
                assert_eq!(seen, data, "{mode}: device read other bytes");
                let write_refused = w.dma_write(seg.iova, &[0xee; 16]).is_err();
                dmamap_sync(&mut map, SyncOp::PostWrite);
                let buf = dmamap_unload(&mut map).unwrap();
                if write_refused {
                    assert_eq!(
                        &buf.as_slice()[..16],
                        &data[..16],
                        "{mode}: a refused write changed memory"
                    );
                }
                let after_unload = w.dma_read(seg.iova, &mut [0u8; 16]).is_ok();

                // FromDevice: what the device writes lands in the buffer.
                let incoming = pattern(0x5a, n);
                dmamap_load(&mut map, buf, DmaDir::FromDevice, Wait::Ok(ctx)).unwrap();
                dmamap_sync(&mut map, SyncOp::PreRead);
                let seg2 = map.segs()[0];
                w.dma_write(seg2.iova, &incoming).unwrap();
                dmamap_sync(&mut map, SyncOp::PostRead);
                let buf = dmamap_unload(&mut map).unwrap();
                assert_eq!(buf.as_slice(), &incoming[..], "{mode}: device write lost");
                tag.flush();
                let after_flush = w.dma_read(seg2.iova, &mut [0u8; 16]).is_ok();
                (
                    write_refused,
                    after_unload,
                    after_flush,
                    tag.stats.enters.load(SeqCst),
                )
            })
            .unwrap();
        let (write_refused, after_unload, after_flush, enters) = r;
        eprintln!(
            "{mode}: write refused {write_refused}, reachable after unload {after_unload}, after flush {after_flush}, {enters} enters"
        );
        match mode {
            DvmaMode::Strict => {
                assert!(write_refused && !after_unload && !after_flush);
                assert_eq!(enters, 2);
            }
            DvmaMode::Lazy => {
                assert!(write_refused && after_unload && !after_flush);
            }
            DvmaMode::Slots => {
                assert!(write_refused && after_unload && after_flush);
            }
            DvmaMode::Permanent | DvmaMode::Shadow => {
                // The pool is mapped once, read-write: no per-I/O direction.
                assert!(!write_refused && after_unload && after_flush);
                // The shared pool was mapped once, when the first pool tag
                // attached (by the domain): no map per I/O.
                assert_eq!(enters, 0, "{mode}: a pool mode mapped per I/O");
            }
        }
    }
    m.shutdown().unwrap();
}

/// Submit one command to `disk` and poll for its completion.
fn exec_one(disk: &DmaDisk, cmd: DiskCmd) -> DiskStatus {
    let t0 = Instant::now();
    while !disk.submit(cmd) {
        assert!(t0.elapsed() < DEADLINE, "the disk refuses commands");
        std::thread::sleep(Duration::from_micros(100));
    }
    disk.doorbell();
    loop {
        if let Some(d) = disk.reap() {
            assert_eq!(d.id, cmd.id);
            return d.status;
        }
        assert!(t0.elapsed() < DEADLINE, "the disk never completed {cmd:?}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

const DEADLINE: Duration = Duration::from_secs(30);

/// The deliberately wrong driver: it unloads before its device copies. The
/// device is the real DMA disk controller, told to WRITE (memory to its
/// file) from the IOVA of a buffer already unloaded. `strict` turns that
/// into a DMA fault: the command completes `DmaFault`, the window and the
/// device count it, and the file is untouched. `slots` lets the stale
/// mapping through: the command succeeds and the file gets the old buffer.
#[test]
fn a_device_that_copies_after_unload() {
    let m = boot(1);
    let w: &'static Window = m.window();
    let tmp = TempFile::new("stale");
    let disk = Stopper(DmaDisk::open(w, DiskConfig::new(&tmp.0, 1 << 20)).unwrap());
    for (i, mode) in [DvmaMode::Strict, DvmaMode::Slots].into_iter().enumerate() {
        let lba = 8 * i as u64;
        let window_faults = w.stats.faults.load(SeqCst);
        let device_faults = disk.0.stats().dma_faults;
        let (stale, data) = m
            .run(0, "wrong", move |ctx| {
                let tag = tag_create("wrong", small(mode)).unwrap();
                let mut map = dmamap_create(tag, 64 << 10).unwrap();
                let data = pattern(7 + i as u8, 4096);
                let mut buf = dmamem_alloc(tag, 4096).unwrap();
                buf.as_mut_slice().copy_from_slice(&data);
                dmamap_load(&mut map, buf, DmaDir::ToDevice, Wait::Ok(ctx)).unwrap();
                dmamap_sync(&mut map, SyncOp::PreWrite);
                let stale = map.segs()[0].iova;
                dmamap_sync(&mut map, SyncOp::PostWrite);
                let _buf = dmamap_unload(&mut map); // too early
                (stale, data)
            })
            .unwrap();
        let status = exec_one(
            &disk.0,
            DiskCmd {
                id: i as u16,
                op: DiskOp::Write,
                lba,
                nsect: 8,
                iova: stale,
                fua: false,
            },
        );
        let on_disk = tmp.read_at(lba * 512, 4096);
        match mode {
            DvmaMode::Strict => {
                assert_eq!(status, DiskStatus::DmaFault, "strict: a stale IOVA worked");
                assert_eq!(w.stats.faults.load(SeqCst), window_faults + 1);
                assert_eq!(disk.0.stats().dma_faults, device_faults + 1);
                assert!(
                    on_disk.iter().all(|&b| b == 0),
                    "strict: a faulting write reached the file"
                );
            }
            _ => {
                assert_eq!(status, DiskStatus::Ok, "slots: the stale mapping faulted");
                assert_eq!(w.stats.faults.load(SeqCst), window_faults);
                assert!(
                    on_disk == data,
                    "slots: the stale mapping shows the old buffer"
                );
            }
        }
    }
    drop(disk);
    m.shutdown().unwrap();
}

/// A controller that hands the DMA disk one stale IOVA: the next command
/// submitted after `stale` is set goes to the disk with that IOVA instead
/// of the one its driver loaded (the wrong driver's mistake, below a
/// correct driver).
struct StaleIova {
    disk: Arc<DmaDisk>,
    stale: AtomicU64,
}

impl DiskController for StaleIova {
    fn geometry(&self) -> DiskGeometry {
        self.disk.geometry()
    }
    fn submit(&self, mut cmd: DiskCmd) -> bool {
        let stale = self.stale.swap(0, SeqCst);
        if stale != 0 {
            cmd.iova = kern::iommu::Iova(stale);
        }
        let ok = self.disk.submit(cmd);
        if !ok && stale != 0 {
            self.stale.store(stale, SeqCst); // not taken: the next one gets it
        }
        ok
    }
    fn doorbell(&self) {
        self.disk.doorbell()
    }
    fn reap(&self) -> Option<DiskDone> {
        self.disk.reap()
    }
    fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        self.disk.set_interrupt(cpu, vector)
    }
}

/// The driver's side of a device's DMA fault: `sd` (strict) on the real
/// DMA disk gets `DmaFault` back for a write whose IOVA belongs to a
/// buffer unloaded too early (a 64 KiB buffer loaded on sd's own tag and
/// unloaded at once: its IOVA is of another size class than the 4 KiB
/// write's, so the write's own load cannot be given it back). The buf
/// fails with EIO and sd counts the fault on its tag (what the per-tag
/// statistics report) as well as in its own counters; the next write
/// works and counts nothing.
#[test]
fn sd_counts_a_device_dma_fault_on_its_tag() {
    let m = boot(1);
    let w: &'static Window = m.window();
    let tmp = TempFile::new("sdfault");
    let disk = Stopper(DmaDisk::open(w, DiskConfig::new(&tmp.0, 1 << 20)).unwrap());
    let ctrl: &'static StaleIova = Box::leak(Box::new(StaleIova {
        disk: disk.0.clone(),
        stale: AtomicU64::new(0),
    }));
    let sd: &'static Sd = m
        .run(0, "attach", move |_| {
            bio_init(16);
            let mut dma = TagConfig::new(DvmaMode::Strict);
            dma.maxsize = 64 << 10;
            Sd::attach(
                SdConfig {
                    name: "sd7",
                    parent: "dmadisk0",
                    dma,
                    completion: Completion::Intr,
                    cpu: 0,
                    bufq: BufqStrategy::Fcfs,
                    read_only: false,
                },
                ctrl,
            )
            .unwrap()
        })
        .unwrap();
    let window_faults = w.stats.faults.load(SeqCst);
    let write = move |ctx: &ThreadCtx, lba: u64, seed: u8| {
        let mut data = sd.alloc_buf_wait(ctx, 4096).unwrap();
        data.set_len(4096);
        data.as_mut_slice().copy_from_slice(&pattern(seed, 4096));
        let mut bp = getbuf_wait(ctx).unwrap();
        bp.op = BufOp::Write;
        bp.blkno = lba;
        bp.bcount = 4096;
        bp.data = Some(data);
        let bp = submit_wait(ctx, sd, bp);
        (bp.error, bp.resid)
    };
    let (bad, good) = m
        .run(0, "io", move |ctx| {
            let tag = sd.tag();
            let mut map = dmamap_create(tag, 64 << 10).unwrap();
            let buf = dmamem_alloc(tag, 64 << 10).unwrap();
            dmamap_load(&mut map, buf, DmaDir::ToDevice, Wait::Ok(ctx)).unwrap();
            ctrl.stale.store(map.segs()[0].iova.get(), SeqCst);
            drop(dmamap_unload(&mut map)); // too early
            let bad = write(ctx, 0, 0x11);
            let good = write(ctx, 8, 0x22);
            (bad, good)
        })
        .unwrap();
    assert_eq!(
        bad,
        (Some(BioError::Io), 4096),
        "the write from a stale IOVA did not fail"
    );
    assert_eq!(good, (None, 0), "a correct write failed");
    assert_eq!(
        disk.0.stats().dma_faults,
        1,
        "the device reported no DMA fault"
    );
    assert_eq!(w.stats.faults.load(SeqCst), window_faults + 1);
    assert_eq!(sd.stats.dma_faults.load(SeqCst), 1);
    assert_eq!(
        sd.tag().stats.faults.load(SeqCst),
        1,
        "the fault was not counted on sd's tag"
    );
    assert!(tmp.read_at(0, 4096).iter().all(|&b| b == 0));
    assert!(tmp.read_at(8 * 512, 4096) == pattern(0x22, 4096));
    drop(disk);
    m.shutdown().unwrap();
}

/// Out of slots: NOWAIT fails with NoSpace; a waiting load sleeps until an
/// unload frees a slot; deferred loads complete in FIFO order and later
/// loads do not overtake them.
#[test]
fn running_out_fails_waits_or_defers_in_order() {
    let m = boot(2);
    static ORDER: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    fn done(_: &SoftCtx, mut map: DmaMap, r: Result<(), LoadError>, arg: usize) {
        assert!(r.is_ok());
        ORDER.lock().unwrap().push(arg);
        drop(dmamap_unload(&mut map));
    }
    let tag = m
        .run(0, "attach", |_| {
            tag_create("few", small(DvmaMode::Slots)).unwrap()
        })
        .unwrap();
    let held: Arc<Mutex<Vec<DmaMap>>> = Arc::new(Mutex::new(Vec::new()));
    let h2 = held.clone();
    m.run(0, "fill", move |ctx| {
        for _ in 0..4 {
            let mut map = dmamap_create(tag, 64 << 10).unwrap();
            dmamap_load(
                &mut map,
                IoBuf::alloc(4096).unwrap(),
                DmaDir::ToDevice,
                Wait::Ok(ctx),
            )
            .unwrap();
            h2.lock().unwrap().push(map);
        }
        // No slot left: NOWAIT fails and gives the buffer back.
        let mut map = dmamap_create(tag, 64 << 10).unwrap();
        let e = dmamap_load(
            &mut map,
            IoBuf::alloc(4096).unwrap(),
            DmaDir::ToDevice,
            Wait::NoWait,
        )
        .unwrap_err();
        assert!(matches!(e.error, DmaError::NoSpace { .. }));
        assert_eq!(e.buf.len(), 4096);
        // Three deferred loads queue up, in order.
        for i in 0..3 {
            let map = dmamap_create(tag, 64 << 10).unwrap();
            let r =
                dmamap_load_deferred(map, IoBuf::alloc(4096).unwrap(), DmaDir::ToDevice, done, i);
            assert!(matches!(r, Ok(None)), "deferred load {i} was not queued");
        }
        assert_eq!(tag.fifo_len(), 3);
    })
    .unwrap();

    // A waiting load on CPU 1 sleeps (behind the FIFO).
    let got = Arc::new(AtomicUsize::new(0));
    let g2 = got.clone();
    let waiter = m
        .spawn(Some(1), "waiter", move |ctx| {
            let mut map = dmamap_create(tag, 64 << 10).unwrap();
            dmamap_load(
                &mut map,
                IoBuf::alloc(4096).unwrap(),
                DmaDir::ToDevice,
                Wait::Ok(ctx),
            )
            .unwrap();
            g2.store(1, SeqCst);
            drop(dmamap_unload(&mut map));
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(got.load(SeqCst), 0, "a waiting load did not wait");
    assert!(ORDER.lock().unwrap().is_empty());

    // Free the slots one at a time: the FIFO drains first, in order, then
    // the waiter gets its turn.
    for _ in 0..4 {
        let h3 = held.clone();
        m.run(0, "unload", move |_| {
            let mut map = h3.lock().unwrap().pop().unwrap();
            drop(dmamap_unload(&mut map));
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    m.wait(&waiter).unwrap();
    assert_eq!(
        *ORDER.lock().unwrap(),
        vec![0, 1, 2],
        "deferred loads out of order"
    );
    assert_eq!(got.load(SeqCst), 1);
    assert!(tag.stats.waits.load(SeqCst) >= 1);
    assert_eq!(tag.stats.deferred.load(SeqCst), 3);
    assert_eq!(tag.fifo_len(), 0);
    m.shutdown().unwrap();
}

/// Both CPUs load and unload concurrently (strict: IOVAs recycled through
/// the per-CPU magazines, and freed on whichever CPU): every device read sees
/// its own buffer and never another's.
#[test]
fn concurrent_loads_never_alias() {
    let m = boot(2);
    let w: &'static Window = m.window();
    let bad = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    for mode in [DvmaMode::Strict, DvmaMode::Lazy, DvmaMode::Slots] {
        let tag = m
            .run(0, "attach", move |_| {
                let mut c = small(mode);
                c.slots = 16;
                c.lazy_batch = 8;
                tag_create("busy", c).unwrap()
            })
            .unwrap();
        let ts: Vec<_> = (0..4)
            .map(|i| {
                let (bad, done) = (bad.clone(), done.clone());
                m.spawn(Some(i % 2), "loader", move |ctx| {
                    let mut maps: Vec<DmaMap> = (0..3)
                        .map(|_| dmamap_create(tag, 64 << 10).unwrap())
                        .collect();
                    for round in 0..300u32 {
                        let seed = (i * 64 + round as usize) as u8;
                        for (j, map) in maps.iter_mut().enumerate() {
                            let len = 4096 << (j % 3);
                            let mut b = IoBuf::alloc(len).unwrap();
                            b.as_mut_slice()
                                .copy_from_slice(&pattern(seed ^ j as u8, len));
                            dmamap_load(map, b, DmaDir::ToDevice, Wait::Ok(ctx)).unwrap();
                        }
                        kern::sched::yield_now(ctx);
                        for (j, map) in maps.iter_mut().enumerate() {
                            let seg = map.segs()[0];
                            let mut seen = vec![0u8; seg.len];
                            if w.dma_read(seg.iova, &mut seen).is_err()
                                || seen != pattern(seed ^ j as u8, seg.len)
                            {
                                bad.fetch_add(1, SeqCst);
                            }
                            drop(dmamap_unload(map));
                            done.fetch_add(1, SeqCst);
                        }
                    }
                })
                .unwrap()
            })
            .collect();
        for t in &ts {
            m.wait(t).unwrap();
        }
        eprintln!(
            "{mode}: {} loads, {} enters, {} removes, peak {} pages held",
            tag.stats.loads.get(),
            tag.stats.enters.load(SeqCst),
            tag.stats.removes.load(SeqCst),
            tag.stats.pages_peak.load(SeqCst)
        );
    }
    assert_eq!(bad.load(SeqCst), 0, "a device saw another load's buffer");
    assert_eq!(done.load(SeqCst), 3 * 4 * 300 * 3);
    let arena = &kern::kernel().dma_domain().iova;
    assert!(
        arena.stats.mag_hits.load(SeqCst) > 0,
        "the magazines were never used"
    );
    m.shutdown().unwrap();
}

/// Accounting: pages held per tag and in the domain follow loads and
/// unloads, and the lazy timeout flushes by itself (through the clock).
#[test]
fn accounting_and_the_lazy_timeout() {
    let m = boot(1);
    let w: &'static Window = m.window();
    let (tag, iova) = m
        .run(0, "lazy", |ctx| {
            let mut c = small(DvmaMode::Lazy);
            c.lazy_timeout_ns = 20_000_000;
            let tag = tag_create("lazy", c).unwrap();
            let mut map = dmamap_create(tag, 64 << 10).unwrap();
            dmamap_load(
                &mut map,
                IoBuf::alloc(8192).unwrap(),
                DmaDir::ToDevice,
                Wait::Ok(ctx),
            )
            .unwrap();
            assert_eq!(tag.stats.pages_held.load(SeqCst), 2);
            let iova = map.segs()[0].iova;
            drop(dmamap_unload(&mut map));
            // Queued, not yet unmapped.
            assert_eq!(tag.stats.pages_held.load(SeqCst), 2);
            (tag, iova)
        })
        .unwrap();
    assert!(
        w.dma_read(iova, &mut [0u8; 8]).is_ok(),
        "lazy: still mapped right after unload"
    );
    std::thread::sleep(Duration::from_millis(120));
    assert!(
        w.dma_read(iova, &mut [0u8; 8]).is_err(),
        "lazy: the timeout never flushed"
    );
    assert_eq!(tag.stats.pages_held.load(SeqCst), 0);
    assert_eq!(tag.stats.pages_peak.load(SeqCst), 2);
    assert!(tag.stats.flushes.load(SeqCst) >= 1);
    m.shutdown().unwrap();
}

/// Views: the same memory as their buffer, loadable like it (a view of a
/// pool buffer loads through the pool), lengths of their own, and dropping
/// one frees nothing; the buffer comes back only when every view has, and
/// dropping it then frees its pages once.
#[test]
fn views_share_memory_and_free_nothing() {
    let _m = boot(1);
    let pm = kern::kernel::kernel().physmem();
    let used = || pm.stats.pages_used.load(SeqCst);
    let before = used();
    let mut b = IoBuf::alloc(16384).unwrap();
    assert_eq!(used(), before + 4);
    b.as_mut_slice().copy_from_slice(&pattern(7, 16384));
    let pa = b.pa();
    let mut lent = b.lend();
    let mut v1 = lent.view(4096, 4096).unwrap();
    assert!(lent.view(4096, 512).is_none(), "overlapping view");
    assert!(lent.view(8192, 16384).is_none(), "view past the end");
    let v2 = lent.view(8192, 8192).unwrap();
    assert_eq!((v1.len(), v2.len(), v1.capacity()), (4096, 8192, 4096));
    assert_eq!(v1.pa(), pa + 4096u64);
    assert_eq!(v1.as_slice(), &pattern(7, 16384)[4096..8192]);
    v1.set_len(100);
    assert_eq!(v1.len(), 100);
    v1.as_mut_slice().fill(0xee);
    let other = IoBuf::alloc(4096).unwrap();
    let other = lent
        .give_back(other)
        .expect_err("not a view of this lending");
    drop(other);
    lent.give_back(v1).unwrap();
    assert_eq!(lent.outstanding(), 1);
    let lent = lent.into_inner().expect_err("a view is still out");
    lent.give_back(v2).unwrap();
    let b = lent.into_inner().expect("every view is back");
    assert_eq!(used(), before + 4, "dropping views freed memory");
    assert!(b.as_slice()[4096..4196].iter().all(|&x| x == 0xee));
    assert_eq!(b.as_slice()[4196], pattern(7, 16384)[4196]);
    drop(b);
    assert_eq!(used(), before);

    // A lent buffer dropped with a view out leaks rather than free the
    // memory under the view.
    let mut lent = IoBuf::alloc(4096).unwrap().lend();
    let v = lent.view(0, 4096).unwrap();
    drop(lent);
    assert_eq!(used(), before + 1, "freed under a live view");
    drop(v);
    assert_eq!(used(), before + 1);

    // A view of a permanent-pool buffer loads through the pool.
    let tag = tag_create("views", small(DvmaMode::Permanent)).unwrap();
    let mut lent = dmamem_alloc(tag, 8192).unwrap().lend();
    let v = lent.view(4096, 4096).unwrap();
    let mut map = dmamap_create(tag, 64 << 10).unwrap();
    dmamap_load(&mut map, v, DmaDir::ToDevice, Wait::NoWait).unwrap();
    assert_eq!(map.segs()[0].len, 4096);
    let v = dmamap_unload(&mut map).unwrap();
    assert_eq!(v.len(), 4096);
    lent.give_back(v).unwrap();
    drop(lent.into_inner().unwrap());
}
