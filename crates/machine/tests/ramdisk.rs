//! The zero-latency DMA disk (`RamDisk`): data through `bus_dma` maps and
//! the DVMA window, completed on the doorbell; DMA faults on unmapped,
//! device-read-only and out-of-window IOVAs (counted by the device and the
//! window, memory untouched); invalid commands; the interrupt posted from
//! the doorbell; stopping. Every test stops its disk and its machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use kern::Ipl;
use kern::bus_dma::*;
use kern::dev::{DiskCmd, DiskController, DiskStatus};
use kern::intr::intr_establish;
use kern::iommu::Iova;
use machine::dev::{RamDisk, RamDiskConfig};

mod common;

use common::*;

const DISK_BYTES: u64 = 4 << 20;

fn exec_ram(d: &RamDisk, cmds: &[DiskCmd]) -> Vec<DiskStatus> {
    exec(
        cmds.len(),
        |i| {
            d.submit(DiskCmd {
                id: i as u16,
                ..cmds[i]
            })
        },
        || d.doorbell(),
        || d.reap(),
    )
}

/// Written through one map, read back through another, in every DVMA
/// mode; completed by the doorbell itself (no device thread).
#[test]
fn write_then_read_back_through_the_window() {
    let m = boot(1);
    let disk = RamDisk::open(m.window(), RamDiskConfig::new(DISK_BYTES)).unwrap();
    for (k, mode) in DvmaMode::ALL.into_iter().enumerate() {
        let t = tag(&m, mode);
        let seed = 0x40 + k as u8;
        let lba = 64 * k as u64;
        let maps = load(&m, t, vec![(8192, Some(seed))], DmaDir::ToDevice);
        let st = exec_ram(&disk, &[wr(lba, 16, iova(&maps[0]), false)]);
        assert_eq!(st, vec![DiskStatus::Ok], "{mode}: write");
        unload(&m, maps);
        let maps = load(&m, t, vec![(8192, None)], DmaDir::FromDevice);
        let st = exec_ram(&disk, &[rd(lba, 16, iova(&maps[0]))]);
        assert_eq!(st, vec![DiskStatus::Ok], "{mode}: read");
        let bytes = unload(&m, maps);
        assert!(bytes[0] == pattern(seed, 8192), "{mode}: read back");
    }
    let s = disk.stats();
    assert_eq!((s.ok, s.dma_faults, s.completed), (10, 0, 10));
    assert_eq!((s.bytes_written, s.bytes_read), (5 * 8192, 5 * 8192));
    assert!(
        disk.resident_bytes() >= 5 * 8192,
        "the written pages are held"
    );
    disk.stop();
    // A leaked disk keeps nothing: `bench kernel` opens one per boot.
    assert_eq!(disk.resident_bytes(), 0, "stop gives the medium back");
    m.shutdown().unwrap();
}

/// A stale IOVA, a device-read-only mapping for a disk READ and an IOVA
/// outside the window: DmaFault, counted; memory untouched; out-of-range
/// commands are Invalid; after `stop` nothing is accepted.
#[test]
fn an_unmapped_iova_still_faults() {
    let m = boot(1);
    let w = m.window();
    let disk = RamDisk::open(w, RamDiskConfig::new(DISK_BYTES)).unwrap();
    let t = tag(&m, DvmaMode::Strict);
    let gone = load(&m, t, vec![(8192, Some(9))], DmaDir::ToDevice);
    let stale = iova(&gone[0]);
    unload(&m, gone);
    let faults0 = w.stats.faults.load(SeqCst);
    let st = exec_ram(&disk, &[wr(100, 16, stale, false), rd(100, 16, stale)]);
    assert_eq!(st, vec![DiskStatus::DmaFault, DiskStatus::DmaFault]);
    assert_eq!(w.stats.faults.load(SeqCst), faults0 + 2, "window count");

    let ro = load(&m, t, vec![(4096, Some(4))], DmaDir::ToDevice);
    let st = exec_ram(&disk, &[rd(100, 8, iova(&ro[0]))]);
    assert_eq!(st, vec![DiskStatus::DmaFault], "READ into a read-only page");
    let bytes = unload(&m, ro);
    assert!(bytes[0] == pattern(4, 4096), "a refused DMA changed memory");

    let st = exec_ram(
        &disk,
        &[
            rd(0, 8, Iova(u64::MAX - 4095)),
            rd(DISK_BYTES / 512, 8, Iova(0)),
            rd(0, 0, Iova(0)),
        ],
    );
    assert_eq!(
        st,
        vec![
            DiskStatus::DmaFault,
            DiskStatus::Invalid,
            DiskStatus::Invalid
        ]
    );
    assert_eq!(disk.stats().dma_faults, 4);
    disk.stop();
    assert!(!disk.submit(rd(0, 8, Iova(0))), "accepted after stop");
    m.shutdown().unwrap();
}

/// With an interrupt set, completions posted by a doorbell on a host
/// thread reach the `set_interrupt` CPU's handler.
#[test]
fn completions_interrupt() {
    let m = boot(1);
    let disk: &'static RamDisk =
        RamDisk::leak(RamDisk::open(m.window(), RamDiskConfig::new(DISK_BYTES)).unwrap());
    let runs = Arc::new(AtomicU32::new(0));
    let r2 = runs.clone();
    let v = m
        .run(0, "attach", move |_| {
            intr_establish(Ipl::Bio, "ramdisk-test", move |_| {
                r2.fetch_add(1, SeqCst);
            })
            .unwrap()
        })
        .unwrap();
    disk.set_interrupt(0, v);
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(4096, None)], DmaDir::FromDevice);
    let st = exec_ram(disk, &[rd(0, 8, iova(&maps[0]))]);
    assert_eq!(st, vec![DiskStatus::Ok]);
    wait_until("the interrupt", || runs.load(SeqCst) >= 1);
    assert!(disk.stats().interrupts >= 1);
    unload(&m, maps);
    disk.stop();
    m.shutdown().unwrap();
}
