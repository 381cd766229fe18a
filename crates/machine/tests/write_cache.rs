//! The DMA disk's volatile write cache (`DiskConfig::write_cache`) on a
//! real machine: read-your-writes over partly overlapping ranges, FLUSH
//! writes back (and the file does not have the data before it), FUA and
//! oversized writes go through and are never overtaken by an older cached
//! copy, the cache stays within its bound under a flood of writes from
//! several workers and one FLUSH then covers every acknowledged write,
//! `stop` writes back, and a DMA fault still fails the command without
//! touching the cache or the file.
//!
//! The backing file is checked with `std::fs`, beside the device.

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use kern::bus_dma::*;
use kern::dev::{DiskCmd, DiskController, DiskDone, DiskOp, DiskStatus};
use kern::iommu::Iova;
use machine::Machine;
use machine::dev::disk::CacheStats;
use machine::dev::{DiskConfig, DmaDisk};
use machine::dvma::Window;

mod common;
use common::*;

const DEADLINE: Duration = Duration::from_secs(30);
const DISK_BYTES: u64 = 16 << 20;
const SECTOR: usize = 512;

/// A disk with a write cache of `cache` bytes; the file is created (and
/// filled with `pattern(0xf0)` by the caller where it matters).
fn cached_cfg(tmp: &TempFile, cache: usize) -> DiskConfig {
    let mut c = DiskConfig::new(&tmp.0, DISK_BYTES);
    c.write_cache = true;
    c.write_cache_bytes = cache;
    c
}

fn open_disk(m: &Machine, cfg: DiskConfig) -> Stopper<DmaDisk> {
    Stopper(DmaDisk::open(m.window(), cfg).unwrap())
}

fn cstats(d: &DmaDisk) -> CacheStats {
    d.cache_stats().expect("the disk has a write cache")
}

fn cmd(op: DiskOp, lba: u64, nsect: u32, iova: Iova, fua: bool) -> DiskCmd {
    DiskCmd {
        id: 0,
        op,
        lba,
        nsect,
        iova,
        fua,
    }
}

fn rd(lba: u64, nsect: u32, iova: Iova) -> DiskCmd {
    cmd(DiskOp::Read, lba, nsect, iova, false)
}

fn wr(lba: u64, nsect: u32, iova: Iova, fua: bool) -> DiskCmd {
    cmd(DiskOp::Write, lba, nsect, iova, fua)
}

fn flush() -> DiskCmd {
    cmd(DiskOp::Flush, 0, 0, Iova(0), false)
}

/// Submit the commands (command `i` gets id `i`) as fast as the queue
/// takes them, ring, and poll for their completions: the statuses by id.
fn exec(d: &DmaDisk, cmds: &[DiskCmd]) -> Vec<DiskStatus> {
    let n = cmds.len();
    let mut out: Vec<Option<DiskStatus>> = vec![None; n];
    let (mut next, mut got) = (0, 0);
    let t0 = Instant::now();
    while got < n {
        assert!(
            t0.elapsed() < DEADLINE,
            "device hung: {got}/{n} completions"
        );
        let before = next;
        while next < n
            && d.submit(DiskCmd {
                id: next as u16,
                ..cmds[next]
            })
        {
            next += 1;
        }
        if next > before {
            d.doorbell();
        }
        while let Some(DiskDone { id, status }) = d.reap() {
            let slot = &mut out[id as usize];
            assert!(slot.is_none(), "command {id} completed twice");
            *slot = Some(status);
            got += 1;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn all_ok(st: &[DiskStatus], what: &str) {
    assert!(st.iter().all(|s| *s == DiskStatus::Ok), "{what}: {st:?}");
}

fn tag(m: &Machine, mode: DvmaMode) -> &'static DmaTag {
    m.run(0, "attach", move |_| {
        let mut c = TagConfig::new(mode);
        c.pool_bytes = 8 << 20;
        c.slots = 8;
        tag_create("wcache", c).unwrap()
    })
    .unwrap()
}

/// Load one map per buffer: `Some(bytes)` is copied in (for the device to
/// read), `None(len)` is a buffer of 0xee (for the device to fill).
fn load(
    m: &Machine,
    tag: &'static DmaTag,
    bufs: Vec<Result<Vec<u8>, usize>>,
    dir: DmaDir,
) -> Vec<DmaMap> {
    m.run(0, "load", move |ctx| {
        bufs.into_iter()
            .map(|b| {
                let len = match &b {
                    Ok(v) => v.len(),
                    Err(n) => *n,
                };
                let mut mem = dmamem_alloc(tag, len).unwrap();
                match b {
                    Ok(v) => mem.as_mut_slice().copy_from_slice(&v),
                    Err(_) => mem.as_mut_slice().fill(0xee),
                }
                let mut map = dmamap_create(tag, 1 << 20).unwrap();
                dmamap_load(&mut map, mem, dir, Wait::Ok(ctx)).unwrap();
                dmamap_sync(
                    &mut map,
                    match dir {
                        DmaDir::ToDevice => SyncOp::PreWrite,
                        DmaDir::FromDevice => SyncOp::PreRead,
                    },
                );
                map
            })
            .collect()
    })
    .unwrap()
}

/// Unload the maps and return their buffers' bytes.
fn unload(m: &Machine, maps: Vec<DmaMap>) -> Vec<Vec<u8>> {
    m.run(0, "unload", move |_| {
        maps.into_iter()
            .map(|mut map| {
                dmamap_sync(&mut map, SyncOp::PostRead);
                dmamap_unload(&mut map).unwrap().as_slice().to_vec()
            })
            .collect()
    })
    .unwrap()
}

fn iova(map: &DmaMap) -> Iova {
    map.segs()[0].iova
}

/// Write `data` at `lba` (one command).
fn write(m: &Machine, d: &DmaDisk, t: &'static DmaTag, lba: u64, data: &[u8], fua: bool) {
    let maps = load(m, t, vec![Ok(data.to_vec())], DmaDir::ToDevice);
    let st = exec(
        d,
        &[wr(lba, (data.len() / SECTOR) as u32, iova(&maps[0]), fua)],
    );
    unload(m, maps);
    all_ok(&st, "write");
}

/// Read `nsect` sectors at `lba` through the device.
fn read(m: &Machine, d: &DmaDisk, t: &'static DmaTag, lba: u64, nsect: u32) -> Vec<u8> {
    let maps = load(m, t, vec![Err(nsect as usize * SECTOR)], DmaDir::FromDevice);
    let st = exec(d, &[rd(lba, nsect, iova(&maps[0]))]);
    all_ok(&st, "read");
    unload(m, maps).pop().unwrap()
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Reads see cached data over the file's, sector by sector, with writes
/// partly overlapping each other and the block boundaries; the file keeps
/// its old contents until the FLUSH; then it holds exactly the model.
#[test]
fn read_your_writes_with_overlaps() {
    let m = boot(2);
    let tmp = TempFile::new("ryw");
    let disk = open_disk(&m, cached_cfg(&tmp, 1 << 20));
    let old = pattern(0xf0, 64 * SECTOR);
    tmp.write_at(0, &old);
    let t = tag(&m, DvmaMode::Strict);

    // B over sectors 3..29, C over 20..25 (inside B), D over 27..35
    // (overlapping B's end and running past it).
    let b = pattern(0x0b, 26 * SECTOR);
    let c = pattern(0x0c, 5 * SECTOR);
    let dd = pattern(0x0d, 8 * SECTOR);
    write(&m, &disk, t, 3, &b, false);
    write(&m, &disk, t, 20, &c, false);
    write(&m, &disk, t, 27, &dd, false);
    let mut model = old.clone();
    model[3 * SECTOR..29 * SECTOR].copy_from_slice(&b);
    model[20 * SECTOR..25 * SECTOR].copy_from_slice(&c);
    model[27 * SECTOR..35 * SECTOR].copy_from_slice(&dd);

    // Whole range, and ranges cut at odd places.
    assert!(read(&m, &disk, t, 0, 64) == model, "whole range");
    for (lba, n) in [
        (0u64, 4u32),
        (2, 3),
        (19, 2),
        (24, 4),
        (28, 1),
        (34, 3),
        (36, 8),
    ] {
        let s = lba as usize * SECTOR;
        let got = read(&m, &disk, t, lba, n);
        assert!(
            got == model[s..s + n as usize * SECTOR],
            "read of {n} sectors at {lba}"
        );
    }
    assert!(
        tmp.read_at(0, 64 * SECTOR) == old,
        "a plain write reached the file before any FLUSH"
    );
    let cs = cstats(&disk);
    assert_eq!(cs.cached_writes, 3);
    assert!(cs.read_hit_sectors > 0);
    assert_eq!(disk.stats().syncs, 0, "a plain write synced");

    // Random overlapping writes and reads against a model.
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..200u32 {
        let lba = r.below(60);
        let n = 1 + r.below(64 - lba).min(19) as u32;
        if r.below(3) == 0 {
            let s = lba as usize * SECTOR;
            assert!(
                read(&m, &disk, t, lba, n) == model[s..s + n as usize * SECTOR],
                "random read {i}: {n} sectors at {lba}"
            );
        } else {
            let data = pattern(i as u8, n as usize * SECTOR);
            let fua = r.below(5) == 0;
            write(&m, &disk, t, lba, &data, fua);
            let s = lba as usize * SECTOR;
            model[s..s + data.len()].copy_from_slice(&data);
        }
    }
    assert!(
        read(&m, &disk, t, 0, 64) == model,
        "after the random writes"
    );
    all_ok(&exec(&disk, &[flush()]), "flush");
    assert!(
        tmp.read_at(0, 64 * SECTOR) == model,
        "after FLUSH the file differs from what was written"
    );
    assert_eq!(cstats(&disk).cached_bytes, 0);
    assert!(read(&m, &disk, t, 0, 64) == model, "after the FLUSH");
    disk.stop();
    m.shutdown().unwrap();
}

/// Plain writes stay in the controller until FLUSH; FLUSH writes them
/// back and syncs; `stop` writes back what is cached (clean shutdown).
#[test]
fn flush_writes_back_and_stop_too() {
    let m = boot(1);
    let tmp = TempFile::new("flush");
    let disk = open_disk(&m, cached_cfg(&tmp, 1 << 20));
    let t = tag(&m, DvmaMode::Permanent);
    let zeros = vec![0u8; 16 << 10];
    let a = pattern(1, 16 << 10);
    write(&m, &disk, t, 100, &a, false);
    assert!(
        tmp.read_at(100 * 512, 16 << 10) == zeros,
        "the file has the data before FLUSH"
    );
    // Sectors 100..132 are not block aligned: five 4 KiB blocks.
    assert_eq!(cstats(&disk).cached_bytes, 5 * 4096);
    assert_eq!(disk.stats().syncs, 0);
    all_ok(&exec(&disk, &[flush()]), "flush");
    assert!(
        tmp.read_at(100 * 512, 16 << 10) == a,
        "FLUSH did not write the cache back"
    );
    let (s, cs) = (disk.stats(), cstats(&disk));
    assert_eq!((s.syncs, s.flushes), (1, 1), "FLUSH without fdatasync");
    assert_eq!((cs.cached_bytes, cs.written_back_blocks), (0, 5));

    let b = pattern(2, 8 << 10);
    write(&m, &disk, t, 7, &b, false);
    assert!(tmp.read_at(7 * 512, 8 << 10) == zeros[..8 << 10]);
    disk.stop();
    assert!(
        tmp.read_at(7 * 512, 8 << 10) == b,
        "stop did not write the cache back"
    );
    assert_eq!(disk.stats().syncs, 2, "stop wrote back without fdatasync");
    m.shutdown().unwrap();
}

/// A FUA write is in the file (synced) when it completes; the older cached
/// copy of its sectors never overwrites it at a later FLUSH, while the
/// cached sectors around it are still written back. A write larger than
/// the whole cache goes through too.
#[test]
fn fua_writes_through_and_is_not_overtaken() {
    let m = boot(1);
    let tmp = TempFile::new("fua");
    let disk = open_disk(&m, cached_cfg(&tmp, 64 << 10));
    let t = tag(&m, DvmaMode::Strict);
    let zeros = vec![0u8; 16 * SECTOR];
    let x = pattern(0x11, 16 * SECTOR);
    let y = pattern(0x22, 8 * SECTOR);
    write(&m, &disk, t, 0, &x, false);
    write(&m, &disk, t, 4, &y, true);
    let s = disk.stats();
    assert_eq!((s.syncs, s.fua_writes), (1, 1), "FUA without fdatasync");
    let mut want = zeros.clone();
    want[4 * SECTOR..12 * SECTOR].copy_from_slice(&y);
    assert!(
        tmp.read_at(0, 16 * SECTOR) == want,
        "the FUA write is not (only) in the file"
    );
    let mut model = x.clone();
    model[4 * SECTOR..12 * SECTOR].copy_from_slice(&y);
    assert!(read(&m, &disk, t, 0, 16) == model, "read after FUA");
    all_ok(&exec(&disk, &[flush()]), "flush");
    assert!(
        tmp.read_at(0, 16 * SECTOR) == model,
        "an older cached copy overtook the FUA write at FLUSH"
    );

    // Larger than the 64 KiB cache: through at once, no FUA needed.
    let big = pattern(0x33, 128 << 10);
    write(&m, &disk, t, 1000, &big, false);
    assert!(tmp.read_at(1000 * 512, 128 << 10) == big);
    assert_eq!(cstats(&disk).write_through, 2);
    disk.stop();
    m.shutdown().unwrap();
}

/// A flood of writes from several workers (each batch of disjoint ranges,
/// ranges overlapping across batches) keeps the cache within its bound,
/// destaging the oldest blocks; reads see the newest data throughout; one
/// FLUSH at the end puts every acknowledged write in the file, whichever
/// worker cached it.
#[test]
fn bounded_under_a_flood_and_one_flush_covers_all() {
    let m = boot(2);
    let tmp = TempFile::new("flood");
    let mut cfg = cached_cfg(&tmp, 256 << 10);
    cfg.workers = 4;
    cfg.queue_depth = 64;
    let disk = open_disk(&m, cfg);
    let t = tag(&m, DvmaMode::Permanent);
    // The flood covers the first 4 MiB, so writes overlap.
    const SPAN: u64 = (4 << 20) / SECTOR as u64;
    const ZONES: u64 = 32;
    let mut model = vec![0u8; (SPAN as usize) * SECTOR];
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let mut written = 0u64;
    for batch in 0..40u64 {
        let mut bufs = Vec::new();
        let mut where_ = Vec::new();
        for z in 0..ZONES {
            let zone = SPAN / ZONES;
            let n = 1 + r.below(64);
            let lba = z * zone + r.below(zone - n);
            let data = pattern((batch * ZONES + z) as u8 ^ 0x5a, n as usize * SECTOR);
            where_.push((lba, n as u32));
            bufs.push(Ok(data));
        }
        let datas: Vec<Vec<u8>> = bufs
            .iter()
            .map(|b: &Result<Vec<u8>, usize>| b.clone().unwrap())
            .collect();
        let maps = load(&m, t, bufs, DmaDir::ToDevice);
        let cmds: Vec<DiskCmd> = maps
            .iter()
            .zip(&where_)
            .map(|(map, &(lba, n))| wr(lba, n, iova(map), false))
            .collect();
        all_ok(&exec(&disk, &cmds), "flood writes");
        unload(&m, maps);
        for ((lba, _), data) in where_.iter().zip(&datas) {
            let s = *lba as usize * SECTOR;
            model[s..s + data.len()].copy_from_slice(data);
            written += data.len() as u64;
        }
        let cs = cstats(&disk);
        assert!(
            cs.cached_bytes <= cs.limit_bytes,
            "batch {batch}: {cs:?} over its limit"
        );
        if batch % 8 == 7 {
            // Read a zone back through the cache and the file.
            let z = r.below(ZONES);
            let zone = SPAN / ZONES;
            let got = read(&m, &disk, t, z * zone, zone as u32);
            let s = (z * zone) as usize * SECTOR;
            assert!(
                got == model[s..s + zone as usize * SECTOR],
                "batch {batch}: zone {z} reads back other data"
            );
        }
    }
    let cs = cstats(&disk);
    eprintln!("flood: {written} bytes written, {cs:?}");
    assert!(
        cs.peak_bytes <= cs.limit_bytes && cs.limit_bytes == 256 << 10,
        "{cs:?}"
    );
    assert!(
        written > 4 * cs.limit_bytes,
        "the flood did not outgrow the cache"
    );
    assert!(cs.destaged_blocks > 0, "a full cache destaged nothing");
    all_ok(&exec(&disk, &[flush()]), "flush");
    assert!(
        tmp.read_at(0, model.len()) == model,
        "after one FLUSH the file misses acknowledged writes"
    );
    disk.stop();
    m.shutdown().unwrap();
}

/// A WRITE from an unmapped IOVA fails with DmaFault and changes neither
/// the cache nor the file; a READ of cached sectors into a mapping the
/// device may not write faults and leaves memory alone; the disk goes on.
#[test]
fn dma_fault_still_fails_the_io() {
    let m = boot(1);
    let w: &'static Window = m.window();
    let tmp = TempFile::new("fault");
    let disk = open_disk(&m, cached_cfg(&tmp, 1 << 20));
    let before = pattern(0x33, 8192);
    tmp.write_at(100 * 512, &before);
    let t = tag(&m, DvmaMode::Strict);

    let gone = load(&m, t, vec![Ok(pattern(9, 8192))], DmaDir::ToDevice);
    let stale = iova(&gone[0]);
    unload(&m, gone);
    let faults0 = w.stats.faults.load(SeqCst);
    let st = exec(
        &disk,
        &[wr(100, 16, stale, false), wr(100, 16, stale, true)],
    );
    assert_eq!(st, vec![DiskStatus::DmaFault, DiskStatus::DmaFault]);
    assert_eq!(w.stats.faults.load(SeqCst), faults0 + 2);
    let cs = cstats(&disk);
    assert_eq!(
        (cs.cached_bytes, cs.cached_writes, cs.write_through),
        (0, 0, 0),
        "a faulting write reached the cache"
    );
    all_ok(&exec(&disk, &[flush()]), "flush");
    assert!(
        tmp.read_at(100 * 512, 8192) == before,
        "a faulting write changed the file"
    );

    // Cached sectors, read into a device-read-only mapping: the overlay
    // path faults too.
    write(&m, &disk, t, 100, &pattern(0x44, 4096), false);
    let ro = load(&m, t, vec![Ok(pattern(4, 4096))], DmaDir::ToDevice);
    assert_eq!(
        exec(&disk, &[rd(100, 8, iova(&ro[0]))]),
        vec![DiskStatus::DmaFault]
    );
    assert!(
        unload(&m, ro)[0] == pattern(4, 4096),
        "a refused DMA write changed memory"
    );
    assert!(read(&m, &disk, t, 100, 8) == pattern(0x44, 4096));
    let s = disk.stats();
    assert_eq!(s.dma_faults, 3);
    disk.stop();
    assert!(tmp.read_at(100 * 512, 4096) == pattern(0x44, 4096));
    m.shutdown().unwrap();
}

/// Without `write_cache` there is no cache and writes land in the file at
/// once (the default is unchanged).
#[test]
fn off_by_default() {
    let m = boot(1);
    let tmp = TempFile::new("off");
    let cfg = DiskConfig::new(&tmp.0, DISK_BYTES);
    assert!(!cfg.write_cache);
    let disk = open_disk(&m, cfg);
    assert!(disk.cache_stats().is_none());
    let t = tag(&m, DvmaMode::Strict);
    write(&m, &disk, t, 8, &pattern(5, 4096), false);
    assert!(tmp.read_at(8 * 512, 4096) == pattern(5, 4096));
    disk.stop();
    m.shutdown().unwrap();
}
