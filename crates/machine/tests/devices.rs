//! The machine's devices on a real machine: a DMA disk on a temporary file
//! (data through `bus_dma` maps and the DVMA window, DMA faults, media
//! errors, FLUSH/FUA, invalid commands, interrupts and their coalescing,
//! stopping with commands queued) and the programmed-I/O file device.
//!
//! Every test stops its devices before its machine (a `Stopper` guard does
//! it on failure too) and removes its temporary file.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use kern::Ipl;
use kern::bus_dma::*;
use kern::dev::{DiskCmd, DiskController, DiskDone, DiskOp, DiskStatus, FileCmd, FileDevice};
use kern::intr::{IntrHandle, intr_establish};
use kern::vm::IoBuf;
use machine::Machine;
use machine::dev::{DiskConfig, DmaDisk, FileConfig, FileDev};
use machine::dvma::Window;

mod common;
use common::*;

#[path = "../../../tests/common/skip.rs"]
mod skip;

const DISK_BYTES: u64 = 16 << 20;

fn disk_cfg(tmp: &TempFile) -> DiskConfig {
    DiskConfig::new(&tmp.0, DISK_BYTES)
}

fn open_disk(m: &Machine, cfg: DiskConfig) -> Stopper<DmaDisk> {
    Stopper(DmaDisk::open(m.window(), cfg).unwrap())
}

fn exec_file(d: &FileDev, cmds: &[FileCmd]) -> Vec<DiskStatus> {
    exec(
        cmds.len(),
        |i| {
            d.submit(FileCmd {
                id: i as u16,
                ..cmds[i]
            })
        },
        || d.doorbell(),
        || d.reap(),
    )
}

/// Writes through strict and permanent maps land in the file; reads bring
/// them back into other buffers; several commands run concurrently.
#[test]
fn data_integrity_through_dma_maps() {
    let m = boot(2);
    let tmp = TempFile::new("integrity");
    let disk = open_disk(&m, disk_cfg(&tmp));
    assert_eq!(disk.geometry().sectors, DISK_BYTES / 512);
    assert_eq!(disk.geometry().sector_size, 512);
    let sizes = [4096usize, 8192, 65536, 1 << 20, 512 * 3];
    for (round, mode) in [DvmaMode::Strict, DvmaMode::Permanent]
        .into_iter()
        .enumerate()
    {
        let t = tag(&m, mode);
        let seeds: Vec<u8> = (0..sizes.len())
            .map(|i| (round * 16 + i) as u8 + 1)
            .collect();
        // Sector ranges far apart, a different place per round.
        let lba = |i: usize| (round as u64 * 8 + i as u64) * 2048 + 5;
        let maps = load(
            &m,
            t,
            sizes
                .iter()
                .zip(&seeds)
                .map(|(&n, &s)| (n, Some(s)))
                .collect(),
            DmaDir::ToDevice,
        );
        let cmds: Vec<DiskCmd> = maps
            .iter()
            .enumerate()
            .map(|(i, map)| wr(lba(i), (sizes[i] / 512) as u32, iova(map), false))
            .collect();
        let st = exec_disk(&disk, &cmds);
        assert!(
            st.iter().all(|s| *s == DiskStatus::Ok),
            "{mode}: writes {st:?}"
        );
        let written = unload(&m, maps);
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(
                written[i],
                pattern(seeds[i], n),
                "{mode}: buffer {i} changed by a write"
            );
            assert!(
                tmp.read_at(lba(i) * 512, n) == pattern(seeds[i], n),
                "{mode}: file contents of write {i} differ"
            );
        }
        let maps = load(
            &m,
            t,
            sizes.iter().map(|&n| (n, None)).collect(),
            DmaDir::FromDevice,
        );
        let cmds: Vec<DiskCmd> = maps
            .iter()
            .enumerate()
            .map(|(i, map)| rd(lba(i), (sizes[i] / 512) as u32, iova(map)))
            .collect();
        let st = exec_disk(&disk, &cmds);
        assert!(
            st.iter().all(|s| *s == DiskStatus::Ok),
            "{mode}: reads {st:?}"
        );
        let read = unload(&m, maps);
        for (i, &n) in sizes.iter().enumerate() {
            assert!(
                read[i] == pattern(seeds[i], n),
                "{mode}: read {i} brought back other bytes"
            );
        }
    }
    let s = disk.stats();
    let total: u64 = sizes.iter().map(|&n| n as u64).sum::<u64>() * 2;
    assert_eq!((s.reads, s.writes, s.ok), (10, 10, 20));
    assert_eq!((s.bytes_read, s.bytes_written), (total, total));
    assert_eq!(
        s.interrupts, 0,
        "no interrupt was set: completions are only queued"
    );
    assert!(s.busy_ns > 0);
    disk.stop();
    m.shutdown().unwrap();
}

/// A command whose IOVA is not mapped (a strict map unloaded too early)
/// completes with DmaFault, counted by the device and the window; the file
/// is untouched; a read into a device-read-only mapping faults and leaves
/// the buffer alone; the device goes on serving.
#[test]
fn dma_fault_on_unmapped_iova() {
    let m = boot(1);
    let w: &'static Window = m.window();
    let tmp = TempFile::new("fault");
    let disk = open_disk(&m, disk_cfg(&tmp));
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
    assert_eq!(
        w.stats.faults.load(SeqCst),
        faults0 + 2,
        "the window counts them too"
    );
    assert!(
        tmp.read_at(100 * 512, 8192) == before,
        "a faulting write changed the file"
    );

    // A disk READ needs a device-writable mapping: ToDevice is read-only.
    let ro = load(&m, t, vec![(4096, Some(4))], DmaDir::ToDevice);
    let st = exec_disk(&disk, &[rd(100, 8, iova(&ro[0]))]);
    assert_eq!(st, vec![DiskStatus::DmaFault]);
    let bytes = unload(&m, ro);
    assert!(
        bytes[0] == pattern(4, 4096),
        "a refused DMA write changed memory"
    );

    // The device keeps serving.
    let ok = load(&m, t, vec![(8192, Some(0x44))], DmaDir::ToDevice);
    let st = exec_disk(&disk, &[wr(100, 16, iova(&ok[0]), false)]);
    assert_eq!(st, vec![DiskStatus::Ok]);
    unload(&m, ok);
    assert!(tmp.read_at(100 * 512, 8192) == pattern(0x44, 8192));
    let s = disk.stats();
    assert_eq!((s.dma_faults, s.ok, s.media_errors), (3, 1, 0));
    disk.stop();
    m.shutdown().unwrap();
}

/// Commands touching an injected bad range fail with EIO without touching
/// the file; commands next to it succeed; after clearing, all succeed.
#[test]
fn injected_media_error() {
    let m = boot(1);
    let tmp = TempFile::new("media");
    let disk = open_disk(&m, disk_cfg(&tmp));
    let old = pattern(0x21, 20 * 512);
    tmp.write_at(195 * 512, &old);
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(64 << 10, Some(0x77))], DmaDir::FromDevice);
    let io = iova(&maps[0]);
    disk.inject_media_error(200..210);
    let st = exec_disk(
        &disk,
        &[
            wr(195, 8, io, false),     // 195..203: touches 200
            rd(209, 4, io + 32768u64), // 209..213: touches 209
            wr(190, 10, io, false),    // 190..200: just below
            rd(210, 4, io + 32768u64), // 210..214: just above
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
    // 200..203 only the failing write would have touched.
    assert!(
        tmp.read_at(200 * 512, 15 * 512) == old[5 * 512..],
        "a failed write touched the file"
    );
    let s = disk.stats();
    assert_eq!(
        (s.media_errors, s.injected, s.ok, s.dma_faults, s.invalid),
        (2, 2, 2, 0, 0)
    );
    disk.clear_injection();
    let st = exec_disk(&disk, &[wr(195, 8, io, false)]);
    assert_eq!(st, vec![DiskStatus::Ok]);
    unload(&m, maps);
    assert!(tmp.read_at(195 * 512, 4096) == pattern(0x77, 4096));
    disk.stop();
    m.shutdown().unwrap();
}

/// FLUSH and FUA writes complete only after an fdatasync (the counter is
/// already raised when the completion is reaped); a plain write syncs
/// nothing; the data is in the file.
#[test]
fn flush_and_fua_complete_after_fdatasync() {
    let m = boot(1);
    let tmp = TempFile::new("flush");
    let disk = open_disk(&m, disk_cfg(&tmp));
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
    assert_eq!(
        (s.syncs, s.fua_writes),
        (1, 1),
        "FUA completed without fdatasync"
    );
    assert!(tmp.read_at(16 * 512, 4096) == pattern(2, 4096));
    assert_eq!(exec_disk(&disk, &[flush()]), vec![DiskStatus::Ok]);
    let s = disk.stats();
    assert_eq!(
        (s.syncs, s.flushes),
        (2, 1),
        "FLUSH completed without fdatasync"
    );
    assert!(tmp.read_at(8 * 512, 4096) == pattern(1, 4096));
    unload(&m, maps);
    disk.stop();
    m.shutdown().unwrap();
}

/// Out of range, zero-length and oversized commands are Invalid and touch
/// neither the file nor memory; a read-only disk refuses writes.
#[test]
fn invalid_commands_and_read_only() {
    let m = boot(1);
    let w: &'static Window = m.window();
    let tmp = TempFile::new("invalid");
    let mut cfg = disk_cfg(&tmp);
    cfg.max_transfer = 64 << 10;
    let disk = open_disk(&m, cfg);
    let last = disk.geometry().sectors;
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(128 << 10, Some(5))], DmaDir::FromDevice);
    let io = iova(&maps[0]);
    let accesses = w.stats.accesses.load(SeqCst);
    let st = exec_disk(
        &disk,
        &[
            rd(last, 1, io),
            wr(last - 4, 8, io, false),
            rd(u64::MAX - 2, 8, io),
            rd(0, 0, io),
            wr(0, 129, io, false), // 64.5 KiB > max_transfer
        ],
    );
    assert!(st.iter().all(|s| *s == DiskStatus::Invalid), "{st:?}");
    assert_eq!(
        w.stats.accesses.load(SeqCst),
        accesses,
        "an invalid command did DMA"
    );
    let s = disk.stats();
    assert_eq!((s.invalid, s.bytes_read, s.bytes_written), (5, 0, 0));
    assert_eq!(std::fs::metadata(&tmp.0).unwrap().len(), DISK_BYTES);
    // The largest valid transfer, at the very end, works.
    let st = exec_disk(&disk, &[wr(last - 128, 128, io, false)]);
    assert_eq!(st, vec![DiskStatus::Ok]);
    disk.stop();

    let mut cfg = disk_cfg(&tmp);
    cfg.read_only = true;
    let ro = open_disk(&m, cfg);
    let half = io + (64u64 << 10);
    let st = exec_disk(
        &ro,
        &[wr(0, 8, io, false), rd(last - 128, 128, half), flush()],
    );
    assert_eq!(
        st,
        vec![
            DiskStatus::MediaError(libc::EROFS),
            DiskStatus::Ok,
            DiskStatus::Ok
        ]
    );
    ro.stop();
    let bytes = unload(&m, maps);
    assert!(
        bytes[0][64 << 10..] == pattern(5, 64 << 10),
        "the read-only disk read back other bytes than were written at the end"
    );
    m.shutdown().unwrap();
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

/// With an interrupt established, the handler sees every completion of
/// thousands of commands (reads and writes, two workers, slots reused)
/// exactly once.
#[test]
fn interrupt_handler_sees_every_completion_once() {
    let m = boot(2);
    let tmp = TempFile::new("intr");
    let mut cfg = disk_cfg(&tmp);
    cfg.queue_depth = 32;
    let disk = open_disk(&m, cfg);
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
        let id = i % 32;
        // A slot is reused only once its previous command was reaped.
        while seen.per_id[id].load(SeqCst) != sent[id].load(SeqCst) {
            assert!(
                t0.elapsed() < DEADLINE,
                "completion of slot {id} never arrived"
            );
            std::hint::spin_loop();
        }
        let nsect = 1 + (i % 16) as u32;
        let lba = (i as u64 * 7919) % (sectors - 16);
        let io = base + (i % 32) * 8192;
        let mut cmd = if i % 3 == 0 {
            wr(lba, nsect, io, false)
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
    assert_eq!(
        seen.total.load(SeqCst),
        N as u64,
        "a completion was seen twice"
    );
    for (id, n) in sent.iter().enumerate() {
        assert_eq!(seen.per_id[id].load(SeqCst), n.load(SeqCst), "slot {id}");
    }
    assert_eq!(seen.not_ok.load(SeqCst), 0);
    assert!(disk.reap().is_none());
    let s = disk.stats();
    eprintln!(
        "{N} commands: {} interrupts posted, {} handler calls, {} doorbells, {} wakeups, {} sleeps",
        s.interrupts,
        seen.calls.load(SeqCst),
        s.doorbells,
        s.wakeups,
        s.sleeps
    );
    assert_eq!(s.completed, N as u64);
    assert!(s.interrupts >= 1 && s.interrupts <= N as u64);
    assert!(seen.calls.load(SeqCst) >= 1);
    disk.stop();
    unload(&m, maps);
    m.shutdown().unwrap();
}

/// A burst of 64 commands (one worker, found asleep, one doorbell): with
/// `coalesce_count` 1 every completion posts; with 8 the device posts 8
/// times; with a count that never triggers but `coalesce_ns` 0, the age
/// rule posts for every completion again. The handler sees all 64 each
/// time.
#[test]
fn coalescing_reduces_interrupts_under_a_burst() {
    let m = boot(2);
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(64 << 10, Some(3))], DmaDir::FromDevice);
    let base = iova(&maps[0]);
    let mut posted = Vec::new();
    for (count, ns) in [(1u32, 10_000_000_000u64), (8, 10_000_000_000), (1000, 0)] {
        let tmp = TempFile::new("coalesce");
        let mut cfg = disk_cfg(&tmp);
        cfg.workers = 1;
        cfg.spin_ns = 0;
        cfg.coalesce_count = count;
        cfg.coalesce_ns = ns;
        let disk = open_disk(&m, cfg);
        let seen = Seen::new(64);
        let v = disk_vector(&disk, &seen);
        disk.set_interrupt(1, v);
        wait_until("the worker to sleep", || disk.stats().sleeps >= 1);
        for i in 0..64u16 {
            let mut c = rd(i as u64 * 8, 8, base + (i as u64 % 16) * 4096);
            c.id = i;
            assert!(disk.submit(c));
        }
        disk.doorbell();
        wait_until("the burst", || seen.total.load(SeqCst) == 64);
        assert!((0..64).all(|i| seen.per_id[i].load(SeqCst) == 1));
        let s = disk.stats();
        eprintln!(
            "coalesce_count {count}, coalesce_ns {ns}: {} interrupts for 64 completions",
            s.interrupts
        );
        posted.push(s.interrupts);
        disk.stop();
    }
    assert_eq!(posted[0], 64, "coalesce_count 1 posts for every completion");
    assert_eq!(posted[1], 8, "coalesce_count 8 posts every 8 completions");
    assert_eq!(posted[2], 64, "coalesce_ns 0 posts for every completion");
    unload(&m, maps);
    m.shutdown().unwrap();
}

/// Neither the count nor the time would trigger (64, 10 s), yet a lone
/// command's completion is signalled at once: the ring is empty. Also,
/// before `set_interrupt` completions are only queued, and `set_interrupt`
/// posts for those already waiting.
#[test]
fn the_last_completion_is_never_delayed() {
    let m = boot(2);
    let tmp = TempFile::new("last");
    let mut cfg = disk_cfg(&tmp);
    cfg.coalesce_count = 64;
    cfg.coalesce_ns = 10_000_000_000;
    let disk = open_disk(&m, cfg);
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(4096, Some(3))], DmaDir::FromDevice);
    let io = iova(&maps[0]);
    let seen = Seen::new(64);
    let v = disk_vector(&disk, &seen);

    // No interrupt yet: the completions wait in the ring.
    for i in 0..3u16 {
        let mut c = rd(i as u64, 8, io);
        c.id = i;
        assert!(disk.submit(c));
    }
    disk.doorbell();
    wait_until("three completions", || disk.stats().completed == 3);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(seen.total.load(SeqCst), 0);
    assert_eq!(disk.stats().interrupts, 0);
    disk.set_interrupt(0, v);
    wait_until("set_interrupt to post", || seen.total.load(SeqCst) == 3);

    for i in 3..23u16 {
        let mut c = rd(i as u64, 8, io);
        c.id = i;
        assert!(disk.submit(c));
        disk.doorbell();
        let t0 = Instant::now();
        while seen.total.load(SeqCst) != i as u64 + 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "a lone completion was held back"
            );
            std::hint::spin_loop();
        }
    }
    // One post for the three, at most one per lone command (a completion
    // may ride on the next one's post if the next command was already
    // queued when it was pushed).
    assert!(disk.stats().interrupts <= 21);
    disk.stop();
    unload(&m, maps);
    m.shutdown().unwrap();
}

/// The device accepts `queue_depth` commands between submit and reap and
/// refuses the next one; reaping makes room.
#[test]
fn submit_refuses_beyond_the_queue_depth() {
    let m = boot(1);
    let tmp = TempFile::new("depth");
    let mut cfg = disk_cfg(&tmp);
    cfg.queue_depth = 4;
    let disk = open_disk(&m, cfg);
    for i in 0..4u16 {
        let mut c = flush();
        c.id = i;
        assert!(disk.submit(c), "command {i} refused");
    }
    disk.doorbell();
    wait_until("four completions", || disk.stats().completed == 4);
    assert!(
        !disk.submit(flush()),
        "a fifth outstanding command was accepted"
    );
    assert!(disk.reap().is_some());
    assert!(disk.submit(flush()));
    disk.doorbell();
    let s = disk.stats();
    assert_eq!((s.submitted, s.refused), (5, 1));
    disk.stop();
    m.shutdown().unwrap();
}

/// Stop with commands queued behind slow ones: the workers finish what
/// they execute and are joined (within a deadline), the queued commands
/// complete with ESHUTDOWN and an interrupt reports them; later submits
/// are refused.
#[test]
fn stop_with_commands_queued() {
    let m = boot(2);
    let tmp = TempFile::new("stop");
    let mut cfg = disk_cfg(&tmp);
    cfg.queue_depth = 32;
    let disk = open_disk(&m, cfg);
    let seen = Seen::new(32);
    let v = disk_vector(&disk, &seen);
    disk.set_interrupt(1, v);
    let t = tag(&m, DvmaMode::Permanent);
    let maps = load(&m, t, vec![(4096, Some(3))], DmaDir::FromDevice);
    let io = iova(&maps[0]);
    disk.inject_delay(Duration::from_millis(50));
    for i in 0..16u16 {
        let mut c = rd(i as u64, 8, io);
        c.id = i;
        assert!(disk.submit(c));
    }
    disk.doorbell();
    std::thread::sleep(Duration::from_millis(10));
    let (tx, rx) = std::sync::mpsc::channel();
    let d2 = disk.0.clone();
    std::thread::spawn(move || {
        d2.stop();
        let _ = tx.send(());
    });
    if rx.recv_timeout(DEADLINE).is_err() {
        // Leave the hung device alone (its stop would hang again).
        std::mem::forget(disk);
        panic!("stop did not join its workers");
    }
    assert!(disk.is_stopped());
    wait_until("the final interrupt", || seen.total.load(SeqCst) == 16);
    let s = disk.stats();
    let shut = seen.shutdown.load(SeqCst);
    eprintln!("stopped: {} ran, {shut} aborted", s.ok);
    assert_eq!(shut, s.aborted);
    assert_eq!(s.ok + s.aborted, 16);
    assert_eq!(seen.not_ok.load(SeqCst), 0);
    assert!(
        shut >= 10,
        "only {shut} of 16 were still queued behind 50 ms commands"
    );
    assert!(!disk.submit(flush()), "a stopped device accepted a command");
    disk.stop(); // idempotent
    unload(&m, maps);
    m.shutdown().unwrap();
}

/// O_DIRECT: data goes through the window without the page cache, intact.
/// A filesystem that refuses O_DIRECT (`open` must say so) fails the test,
/// unless skipping is allowed (`skip::skip`; never under `CI=true`).
#[test]
fn o_direct_disk() {
    let m = boot(1);
    let tmp = TempFile::new("direct");
    let mut cfg = disk_cfg(&tmp);
    cfg.o_direct = true;
    let disk = match DmaDisk::open(m.window(), cfg) {
        Ok(d) => Stopper(d),
        Err(e) => {
            assert!(e.to_string().contains("O_DIRECT"), "unexplained error: {e}");
            m.shutdown().unwrap();
            skip::skip(&format!(
                "the filesystem of {} refuses O_DIRECT: {e}",
                std::env::temp_dir().display()
            ));
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

/// Lost-wakeup hunt: three workers that sleep as soon as the ring is empty,
/// two host threads submitting one command at a time and waiting for it
/// (so the workers go to sleep and are woken thousands of times, racing
/// each other). A lost doorbell leaves a command unserved: the deadline
/// fails the test.
#[test]
fn doorbells_never_lose_a_command() {
    let m = boot(1);
    let tmp = TempFile::new("wakeups");
    let mut cfg = FileConfig::new(&tmp.0, 1 << 20);
    cfg.workers = 3;
    cfg.spin_ns = 0;
    let dev = Stopper(FileDev::open(cfg).unwrap());
    const PER_THREAD: usize = 4000;
    // Completions by submitter (the id); whoever reaps credits the owner.
    let got: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let threads: Vec<_> = (0..2u16)
        .map(|t| {
            let (dev, got) = (dev.0.clone(), got.clone());
            std::thread::spawn(move || {
                let b = IoBuf::alloc(512).unwrap();
                let k = kva(&b);
                let t0 = Instant::now();
                for i in 0..PER_THREAD {
                    let c = FileCmd {
                        id: t,
                        op: DiskOp::Read,
                        offset: (i as u64 % 2048) * 512,
                        kva: k,
                        len: 512,
                        fua: false,
                    };
                    assert!(dev.submit(c));
                    dev.doorbell();
                    if i % 4 == 0 {
                        // Let every worker fall asleep now and then.
                        std::thread::sleep(Duration::from_micros(20));
                    }
                    while got[t as usize].load(SeqCst) <= i as u64 {
                        assert!(t0.elapsed() < DEADLINE, "a doorbell was lost");
                        match dev.reap() {
                            Some(d) => {
                                assert_eq!(d.status, DiskStatus::Ok);
                                got[d.id as usize].fetch_add(1, SeqCst);
                            }
                            None => std::hint::spin_loop(),
                        }
                    }
                }
                drop(b);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        got[0].load(SeqCst) + got[1].load(SeqCst),
        2 * PER_THREAD as u64
    );
    let s = dev.stats();
    eprintln!(
        "{} commands: {} doorbells, {} wakeups, {} sleeps",
        s.completed, s.doorbells, s.wakeups, s.sleeps
    );
    assert_eq!(s.ok, 2 * PER_THREAD as u64);
    assert!(
        s.sleeps > 100,
        "the workers hardly slept: the test tested nothing"
    );
    dev.stop();
    m.shutdown().unwrap();
}

fn kva(b: &IoBuf) -> usize {
    kern::kernel().physmem().kva(b.pa()) as usize
}

fn fcmd(op: DiskOp, offset: u64, b: &IoBuf, fua: bool) -> FileCmd {
    FileCmd {
        id: 0,
        op,
        offset,
        kva: kva(b),
        len: b.len(),
        fua,
    }
}

/// The file device: writes from kernel buffers (by their direct-map
/// address) land in the file at any byte offset, reads bring them back
/// into other buffers; FUA and FLUSH sync; an injected bad range fails
/// with EIO; bad commands are Invalid; with an interrupt set, completions
/// arrive through it.
#[test]
fn file_device_integrity_through_kva() {
    let m = boot(2);
    let tmp = TempFile::new("filedev");
    let dev = Stopper(FileDev::open(FileConfig::new(&tmp.0, 4 << 20)).unwrap());
    assert_eq!(dev.size(), 4 << 20);
    let sizes = [4096usize, 65536, 200_000, 1];
    let offs = [0u64, 12_345, 1 << 20, (4 << 20) - 1];
    let mut out = Vec::new();
    let mut back = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut b = IoBuf::alloc(n).unwrap();
        b.as_mut_slice().copy_from_slice(&pattern(i as u8 + 40, n));
        out.push(b);
        let mut b = IoBuf::alloc(n).unwrap();
        b.as_mut_slice().fill(0xee);
        back.push(b);
    }
    let cmds: Vec<FileCmd> = out
        .iter()
        .zip(offs)
        .enumerate()
        .map(|(i, (b, off))| fcmd(DiskOp::Write, off, b, i == 1))
        .collect();
    let st = exec_file(&dev, &cmds);
    assert!(st.iter().all(|s| *s == DiskStatus::Ok), "writes {st:?}");
    assert_eq!(dev.stats().syncs, 1, "the FUA write did not sync");
    for (i, &n) in sizes.iter().enumerate() {
        assert!(
            tmp.read_at(offs[i], n) == pattern(i as u8 + 40, n),
            "file contents of write {i}"
        );
    }

    // An injected bad byte: the read covering it fails and leaves the
    // buffer alone, the one next to it succeeds.
    dev.inject_media_error(12_345..12_346);
    let st = exec_file(
        &dev,
        &[
            fcmd(DiskOp::Read, 0, &back[1], false),
            fcmd(DiskOp::Read, 12_346, &back[0], false),
        ],
    );
    assert_eq!(st, vec![DiskStatus::MediaError(libc::EIO), DiskStatus::Ok]);
    assert!(back[1].as_slice().iter().all(|&b| b == 0xee));
    assert!(back[0].as_slice() == tmp.read_at(12_346, 4096).as_slice());
    dev.clear_injection();

    // Invalid: past the end, zero length, too long, an address outside RAM.
    let mut bad = vec![fcmd(DiskOp::Read, (4 << 20) - 100, &back[0], false); 4];
    bad[1].len = 0;
    bad[2].offset = 0;
    bad[2].len = (1 << 20) + 1;
    bad[3].offset = 0;
    bad[3].kva = 0x1000;
    let st = exec_file(&dev, &bad);
    assert!(st.iter().all(|s| *s == DiskStatus::Invalid), "{st:?}");
    assert!(back[0].as_slice() == tmp.read_at(12_346, 4096).as_slice());

    // Read back, through the interrupt this time, and flush.
    let seen = Seen::new(8);
    let d = dev.0.clone();
    let s2 = seen.clone();
    let v = intr_establish(Ipl::Bio, "filedev", move |_| {
        while let Some(done) = d.reap() {
            s2.record(done);
        }
    })
    .unwrap();
    dev.set_interrupt(1, v);
    for (i, b) in back.iter().enumerate() {
        let mut c = fcmd(DiskOp::Read, offs[i], b, false);
        c.id = i as u16;
        assert!(dev.submit(c));
    }
    let mut f = fcmd(DiskOp::Flush, 0, &back[0], false);
    (f.id, f.len) = (4, 0);
    assert!(dev.submit(f));
    dev.doorbell();
    wait_until("the reads", || seen.total.load(SeqCst) == 5);
    assert_eq!(seen.not_ok.load(SeqCst), 0);
    for (i, b) in back.iter().enumerate() {
        assert!(
            b.as_slice() == out[i].as_slice(),
            "read {i} brought back other bytes"
        );
    }
    let s = dev.stats();
    assert_eq!((s.syncs, s.flushes), (2, 1));
    assert_eq!((s.invalid, s.injected, s.media_errors), (4, 1, 1));
    assert!(s.interrupts >= 1);
    dev.stop();
    drop((out, back));
    m.shutdown().unwrap();
}

/// A command queued behind a worker that blocks is served by a sibling, in
/// both ways a sibling can be asleep: untimed (the device was idle: the
/// doorbell wakes it) and timed (commands were outstanding when it slept:
/// the doorbell may leave the command to the busy worker, and the sibling
/// looks again within a millisecond). Each command blocks 500 ms, so one
/// worker serving both cannot finish before 1 s: finishing earlier is
/// proof that they ran side by side, not a timing goal (the margin is half
/// a second of scheduling delay).
#[test]
fn a_blocked_worker_does_not_hold_up_the_queue() {
    const SLOW: Duration = Duration::from_millis(500);
    let m = boot(1);
    let tmp = TempFile::new("blocked");
    let mut cfg = FileConfig::new(&tmp.0, 1 << 20);
    cfg.workers = 2;
    cfg.spin_ns = 0;
    let dev = Stopper(FileDev::open(cfg).unwrap());
    let b = IoBuf::alloc(512).unwrap();
    let cmd = |id: u16| FileCmd {
        id,
        ..fcmd(DiskOp::Read, 0, &b, false)
    };
    for keep_one_outstanding in [false, true] {
        dev.inject_delay(Duration::ZERO);
        if keep_one_outstanding {
            // Completed but not reaped: outstanding while the workers sleep.
            assert!(dev.submit(cmd(9)));
            dev.doorbell();
            wait_until("the first command", || dev.stats().completed >= 1);
        }
        std::thread::sleep(Duration::from_millis(20)); // every worker asleep
        dev.inject_delay(SLOW);
        let t0 = Instant::now();
        assert!(dev.submit(cmd(1)));
        assert!(dev.submit(cmd(2)));
        dev.doorbell();
        let mut done = Vec::new();
        while done.len() < 2 + usize::from(keep_one_outstanding) {
            assert!(t0.elapsed() < DEADLINE, "commands lost");
            match dev.reap() {
                Some(d) => {
                    assert_eq!(d.status, DiskStatus::Ok);
                    if d.id != 9 {
                        done.push((d.id, t0.elapsed()));
                    } else {
                        done.push((9, Duration::ZERO));
                    }
                }
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        let last = done.iter().map(|d| d.1).max().unwrap();
        assert!(
            last < 2 * SLOW,
            "outstanding={keep_one_outstanding}: the second command waited for the first: {done:?}"
        );
        let s = dev.stats();
        assert_eq!(s.completed, s.ok);
    }
    dev.stop();
    drop(b);
    m.shutdown().unwrap();
}
