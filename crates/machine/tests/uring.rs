//! The DMA disk controller on its io_uring engine (`engine = "uring"`):
//! the device tests of `devices.rs` that concern the engine, run on it.
//! Data through `bus_dma` maps and the DVMA window (plain buffers at
//! `window + iova`, never registered ones), DMA faults on unmapped,
//! read-only and half-mapped IOVAs (counted by the device and the window,
//! the file untouched), FLUSH/FUA after `fdatasync`, injected media errors
//! and delays, interrupts from the doorbell and the reaper, stopping, the
//! write cache refused, `O_DIRECT`.
//!
//! A host without io_uring (`ENOSYS`/`EPERM` at setup) fails these tests
//! with the reason, unless `DVMA_ALLOW_SKIP=1` (never under `CI=true`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use kern::Ipl;
use kern::bus_dma::*;
use kern::dev::{DiskCmd, DiskController, DiskDone, DiskStatus};
use kern::intr::{IntrHandle, intr_establish};
use kern::iommu::Iova;
use machine::Machine;
use machine::dev::{DiskConfig, DiskEngine, DmaDisk};
use machine::dvma::Window;

mod common;
#[path = "../../../tests/common/skip.rs"]
mod skip;

use common::*;

const DISK_BYTES: u64 = 16 << 20;

fn disk_cfg(tmp: &TempFile) -> DiskConfig {
    let mut c = DiskConfig::new(&tmp.0, DISK_BYTES);
    c.engine = DiskEngine::Uring;
    c
}

/// Open a uring disk; `None` (after `skip::skip`, which fails the test
/// unless skipping is allowed) where the host has no io_uring.
fn open_disk(m: &Machine, cfg: DiskConfig) -> Option<Stopper<DmaDisk>> {
    match DmaDisk::open(m.window(), cfg) {
        Ok(d) => Some(Stopper(d)),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            assert!(e.to_string().contains("io_uring"), "unexplained error: {e}");
            skip::skip(&format!("no io_uring on this host: {e}"));
            None
        }
        Err(e) => panic!("opening a uring disk: {e}"),
    }
}

/// What an interrupt handler saw.
struct Seen {
    per_id: Vec<AtomicU32>,
    total: AtomicU64,
    not_ok: AtomicU64,
    shutdown: AtomicU64,
    calls: AtomicU64,
}

impl Seen {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Seen {
            per_id: (0..n).map(|_| AtomicU32::new(0)).collect(),
            total: AtomicU64::new(0),
            not_ok: AtomicU64::new(0),
            shutdown: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        })
    }

    /// Interrupt context: atomics only.
    fn record(&self, d: DiskDone) {
        self.per_id[d.id as usize].fetch_add(1, SeqCst);
        match d.status {
            DiskStatus::Ok => {}
            DiskStatus::MediaError(e) if e == libc::ESHUTDOWN => {
                self.shutdown.fetch_add(1, SeqCst);
            }
            _ => {
                self.not_ok.fetch_add(1, SeqCst);
            }
        }
        self.total.fetch_add(1, SeqCst);
    }
}

/// Establish a BIO vector whose handler reaps `disk` until empty.
fn disk_vector(disk: &Arc<DmaDisk>, seen: &Arc<Seen>) -> IntrHandle {
    let (d, s) = (disk.clone(), seen.clone());
    intr_establish(Ipl::Bio, "dmadisk", move |_| {
        s.calls.fetch_add(1, SeqCst);
        while let Some(done) = d.reap() {
            s.record(done);
        }
    })
    .unwrap()
}

/// Writes through strict and permanent maps land in the file; reads bring
/// them back into other buffers; several commands in the ring at once.
#[test]
fn data_integrity_through_dma_maps() {
    let m = boot(2);
    let tmp = TempFile::new("integrity");
    let Some(disk) = open_disk(&m, disk_cfg(&tmp)) else {
        m.shutdown().unwrap();
        return;
    };
    let faults0 = m.window().stats.faults.load(SeqCst);
    let sizes = [4096usize, 8192, 65536, 1 << 20, 512 * 3];
    for (round, mode) in [DvmaMode::Strict, DvmaMode::Permanent]
        .into_iter()
        .enumerate()
    {
        let t = tag(&m, mode);
        let seeds: Vec<u8> = (0..sizes.len())
            .map(|i| (round * 16 + i) as u8 + 1)
            .collect();
        let lbas: Vec<u64> = (0..sizes.len()).map(|i| (i as u64) * 4096 + 8).collect();
        let maps = load(
            &m,
            t,
            sizes
                .iter()
                .zip(&seeds)
                .map(|(&l, &s)| (l, Some(s)))
                .collect(),
            DmaDir::ToDevice,
        );
        let cmds: Vec<DiskCmd> = maps
            .iter()
            .zip(&sizes)
            .zip(&lbas)
            .map(|((map, &len), &lba)| wr(lba, (len / 512) as u32, iova(map), false))
            .collect();
        assert!(exec_disk(&disk, &cmds).iter().all(|s| *s == DiskStatus::Ok));
        unload(&m, maps);
        for ((&len, &seed), &lba) in sizes.iter().zip(&seeds).zip(&lbas) {
            assert!(tmp.read_at(lba * 512, len) == pattern(seed, len), "file");
        }
        let maps = load(
            &m,
            t,
            sizes.iter().map(|&l| (l, None)).collect(),
            DmaDir::FromDevice,
        );
        let cmds: Vec<DiskCmd> = maps
            .iter()
            .zip(&sizes)
            .zip(&lbas)
            .map(|((map, &len), &lba)| rd(lba, (len / 512) as u32, iova(map)))
            .collect();
        assert!(exec_disk(&disk, &cmds).iter().all(|s| *s == DiskStatus::Ok));
        let bytes = unload(&m, maps);
        for ((b, &len), &seed) in bytes.iter().zip(&sizes).zip(&seeds) {
            assert!(*b == pattern(seed, len), "read back");
        }
    }
    let s = disk.stats();
    assert_eq!((s.ok, s.dma_faults, s.completed), (20, 0, 20));
    assert_eq!(s.bytes_written, s.bytes_read);
    assert_eq!(m.window().stats.faults.load(SeqCst), faults0);
    disk.stop();
    m.shutdown().unwrap();
}

/// Unmapped, device-read-only and half-mapped IOVAs: DmaFault, counted by
/// the device and the window, the file and memory untouched; the device
/// goes on serving.
#[test]
fn dma_fault_on_unmapped_iova() {
    let m = boot(1);
    let w: &'static Window = m.window();
    let tmp = TempFile::new("fault");
    let Some(disk) = open_disk(&m, disk_cfg(&tmp)) else {
        m.shutdown().unwrap();
        return;
    };
    let before = pattern(0x33, 8192);
    tmp.write_at(100 * 512, &before);
    let t = tag(&m, DvmaMode::Strict);

    let gone = load(&m, t, vec![(8192, Some(9))], DmaDir::ToDevice);
    let stale = iova(&gone[0]);
    unload(&m, gone);
    let faults0 = w.stats.faults.load(SeqCst);
    let st = exec_disk(&disk, &[wr(100, 16, stale, false), rd(100, 16, stale)]);
    assert_eq!(st, vec![DiskStatus::DmaFault, DiskStatus::DmaFault]);
    assert_eq!(disk.stats().dma_faults, 2);
    assert_eq!(w.stats.faults.load(SeqCst), faults0 + 2, "window count");
    assert!(tmp.read_at(100 * 512, 8192) == before, "file changed");

    // A disk READ needs a device-writable mapping.
    let ro = load(&m, t, vec![(4096, Some(4))], DmaDir::ToDevice);
    let st = exec_disk(&disk, &[rd(100, 8, iova(&ro[0]))]);
    assert_eq!(st, vec![DiskStatus::DmaFault]);
    let bytes = unload(&m, ro);
    assert!(
        bytes[0] == pattern(4, 4096),
        "a refused DMA write changed memory"
    );

    // Half mapped: 4 KiB mapped, the next page not. The host moves the
    // first page (a short count) and faults on the rest: still a fault.
    let half = load(&m, t, vec![(4096, None)], DmaDir::FromDevice);
    let at = iova(&half[0]);
    let st = exec_disk(&disk, &[rd(100, 16, at)]);
    assert_eq!(st, vec![DiskStatus::DmaFault], "a half-mapped read");
    unload(&m, half);
    // Outside the window altogether.
    let st = exec_disk(&disk, &[rd(0, 8, Iova(u64::MAX - 4095))]);
    assert_eq!(st, vec![DiskStatus::DmaFault]);
    assert_eq!(w.stats.faults.load(SeqCst), faults0 + 5);

    let ok = load(&m, t, vec![(8192, Some(0x44))], DmaDir::ToDevice);
    let inline0 = disk.stats().inline_writes;
    let st = exec_disk(&disk, &[wr(100, 16, iova(&ok[0]), false)]);
    assert_eq!(st, vec![DiskStatus::Ok]);
    // Written by the doorbell itself, not handed to io_uring.
    assert_eq!(disk.stats().inline_writes, inline0 + 1);
    unload(&m, ok);
    assert!(tmp.read_at(100 * 512, 8192) == pattern(0x44, 8192));
    let s = disk.stats();
    assert_eq!((s.dma_faults, s.ok, s.media_errors), (5, 1, 0));
    disk.stop();
    m.shutdown().unwrap();
}

/// Injected bad ranges fail with EIO before any I/O.
#[test]
fn injected_media_error() {
    let m = boot(1);
    let tmp = TempFile::new("media");
    let Some(disk) = open_disk(&m, disk_cfg(&tmp)) else {
        m.shutdown().unwrap();
        return;
    };
    let old = pattern(0x21, 20 * 512);
    tmp.write_at(195 * 512, &old);
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(64 << 10, Some(0x77))], DmaDir::FromDevice);
    let io = iova(&maps[0]);
    disk.inject_media_error(200..210);
    let st = exec_disk(
        &disk,
        &[
            wr(195, 8, io, false),
            rd(209, 4, io + 32768u64),
            wr(190, 10, io, false),
            rd(210, 4, io + 32768u64),
        ],
    );
    assert_eq!(
        st,
        vec![
            DiskStatus::MediaError(libc::EIO),
            DiskStatus::MediaError(libc::EIO),
            DiskStatus::Ok,
            DiskStatus::Ok
        ]
    );
    assert!(tmp.read_at(200 * 512, 15 * 512) == old[5 * 512..]);
    let s = disk.stats();
    assert_eq!((s.media_errors, s.injected, s.ok), (2, 2, 2));
    disk.clear_injection();
    assert_eq!(
        exec_disk(&disk, &[wr(195, 8, io, false)]),
        vec![DiskStatus::Ok]
    );
    unload(&m, maps);
    disk.stop();
    m.shutdown().unwrap();
}

/// FLUSH and FUA writes complete only after an fdatasync; a plain write
/// syncs nothing.
#[test]
fn flush_and_fua_complete_after_fdatasync() {
    let m = boot(1);
    let tmp = TempFile::new("flush");
    let Some(disk) = open_disk(&m, disk_cfg(&tmp)) else {
        m.shutdown().unwrap();
        return;
    };
    let t = tag(&m, DvmaMode::Strict);
    let maps = load(
        &m,
        t,
        vec![(4096, Some(1)), (4096, Some(2))],
        DmaDir::ToDevice,
    );
    assert_eq!(
        exec_disk(&disk, &[wr(8, 8, iova(&maps[0]), false)]),
        vec![DiskStatus::Ok]
    );
    assert_eq!(disk.stats().syncs, 0, "a plain write synced");
    assert_eq!(
        exec_disk(&disk, &[wr(16, 8, iova(&maps[1]), true)]),
        vec![DiskStatus::Ok]
    );
    let s = disk.stats();
    assert_eq!((s.syncs, s.fua_writes), (1, 1), "FUA without fdatasync");
    assert!(tmp.read_at(16 * 512, 4096) == pattern(2, 4096));
    assert_eq!(exec_disk(&disk, &[flush()]), vec![DiskStatus::Ok]);
    let s = disk.stats();
    assert_eq!((s.syncs, s.flushes), (2, 1), "FLUSH without fdatasync");
    assert!(tmp.read_at(8 * 512, 4096) == pattern(1, 4096));
    unload(&m, maps);
    disk.stop();
    m.shutdown().unwrap();
}

/// Interrupts: an established handler sees every completion of thousands
/// of commands exactly once, whether the doorbell reaped them inline or
/// the reaper did (the injected delay sends some through the reaper).
#[test]
fn interrupt_handler_sees_every_completion_once() {
    let m = boot(2);
    let tmp = TempFile::new("intr");
    let mut cfg = disk_cfg(&tmp);
    cfg.queue_depth = 32;
    cfg.coalesce_count = 4;
    let Some(disk) = open_disk(&m, cfg) else {
        m.shutdown().unwrap();
        return;
    };
    let seen = Seen::new(32);
    let v = disk_vector(&disk, &seen);
    disk.set_interrupt(1, v);
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(256 << 10, Some(3))], DmaDir::FromDevice);
    let base = iova(&maps[0]);
    const N: usize = 3000;
    let sent: Vec<AtomicU32> = (0..32).map(|_| AtomicU32::new(0)).collect();
    let sectors = disk.geometry().sectors;
    let t0 = Instant::now();
    for i in 0..N {
        if i % 500 == 0 {
            disk.inject_delay(if i % 1000 == 0 {
                Duration::from_micros(200)
            } else {
                Duration::ZERO
            });
        }
        let id = i % 32;
        while seen.per_id[id].load(SeqCst) != sent[id].load(SeqCst) {
            assert!(
                t0.elapsed() < DEADLINE,
                "completion of slot {id} never arrived"
            );
            std::hint::spin_loop();
        }
        let nsect = 1 + (i % 16) as u32;
        let lba = (i as u64 * 7919) % (sectors - 16);
        let io = base + (i % 32) as u64 * 8192;
        let mut cmd = if i % 3 == 0 {
            wr(lba, nsect, io, i % 7 == 0)
        } else {
            rd(lba, nsect, io)
        };
        cmd.id = id as u16;
        sent[id].fetch_add(1, SeqCst);
        assert!(disk.submit(cmd), "submit refused with a free slot");
        disk.doorbell();
    }
    wait_until("every completion", || seen.total.load(SeqCst) == N as u64);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(seen.total.load(SeqCst), N as u64, "a completion seen twice");
    for (id, n) in sent.iter().enumerate() {
        assert_eq!(seen.per_id[id].load(SeqCst), n.load(SeqCst), "slot {id}");
    }
    assert_eq!(seen.not_ok.load(SeqCst), 0);
    let s = disk.stats();
    eprintln!(
        "{N} commands: {} interrupts, {} handler calls, {} doorbells, {} reaper wakeups",
        s.interrupts,
        seen.calls.load(SeqCst),
        s.doorbells,
        s.wakeups,
    );
    assert_eq!(s.completed, N as u64);
    assert!(
        s.wakeups > 0,
        "the delayed commands never went through the reaper"
    );
    disk.stop();
    unload(&m, maps);
    m.shutdown().unwrap();
}

/// Stop: commands in the ring (delayed 50 ms) finish, commands submitted
/// without a doorbell complete with ESHUTDOWN and an interrupt reports
/// them; later submits are refused.
#[test]
fn stop_with_commands_queued() {
    let m = boot(2);
    let tmp = TempFile::new("stop");
    let mut cfg = disk_cfg(&tmp);
    cfg.queue_depth = 32;
    let Some(disk) = open_disk(&m, cfg) else {
        m.shutdown().unwrap();
        return;
    };
    let seen = Seen::new(32);
    let v = disk_vector(&disk, &seen);
    disk.set_interrupt(1, v);
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(4096, Some(3))], DmaDir::FromDevice);
    let io = iova(&maps[0]);
    disk.inject_delay(Duration::from_millis(50));
    let t0 = Instant::now();
    for i in 0..16u16 {
        let mut c = rd(i as u64, 8, io);
        c.id = i;
        assert!(disk.submit(c));
        if i == 7 {
            disk.doorbell();
        }
    }
    disk.stop();
    assert!(
        t0.elapsed() >= Duration::from_millis(50),
        "the delay was not applied"
    );
    wait_until("the final interrupt", || seen.total.load(SeqCst) == 16);
    let s = disk.stats();
    assert_eq!((s.ok, s.aborted), (8, 8));
    assert_eq!(seen.shutdown.load(SeqCst), 8);
    assert_eq!(seen.not_ok.load(SeqCst), 0);
    assert!(!disk.submit(flush()), "a stopped device accepted a command");
    disk.stop();
    unload(&m, maps);
    m.shutdown().unwrap();
}

/// The write cache is the thread engine's: asking for it with the uring
/// engine fails at open, saying so.
#[test]
fn write_cache_is_refused() {
    let m = boot(1);
    let tmp = TempFile::new("wc");
    let mut cfg = disk_cfg(&tmp);
    cfg.write_cache = true;
    let e = DmaDisk::open(m.window(), cfg).unwrap_err();
    assert!(
        e.to_string().contains("write_cache") && e.to_string().contains("threads"),
        "{e}"
    );
    m.shutdown().unwrap();
}

/// O_DIRECT through the ring.
#[test]
fn o_direct_disk() {
    let m = boot(1);
    let tmp = TempFile::new("direct");
    let mut cfg = disk_cfg(&tmp);
    cfg.o_direct = true;
    let disk = match DmaDisk::open(m.window(), cfg) {
        Ok(d) => Stopper(d),
        Err(e) => {
            m.shutdown().unwrap();
            skip::skip(&format!("O_DIRECT or io_uring unavailable: {e}"));
            return;
        }
    };
    let t = tag(&m, DvmaMode::Strict);
    let maps = load(&m, t, vec![(64 << 10, Some(8))], DmaDir::ToDevice);
    assert_eq!(
        exec_disk(&disk, &[wr(64, 128, iova(&maps[0]), true)]),
        vec![DiskStatus::Ok]
    );
    unload(&m, maps);
    let maps = load(&m, t, vec![(64 << 10, None)], DmaDir::FromDevice);
    assert_eq!(
        exec_disk(&disk, &[rd(64, 128, iova(&maps[0]))]),
        vec![DiskStatus::Ok]
    );
    let bytes = unload(&m, maps);
    assert!(bytes[0] == pattern(8, 64 << 10));
    assert!(tmp.read_at(64 * 512, 64 << 10) == pattern(8, 64 << 10));
    disk.stop();
    m.shutdown().unwrap();
}
