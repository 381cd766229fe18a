//! Block-layer integrity: a random read/write workload with checksums
//! through sd, ccd and vnd, in every DVMA mode and every completion mode,
//! while another device raises spurious interrupts at a high rate. Zero
//! mismatches; every request completed exactly once.
//!
//! Plus: DVMA exhaustion, device error injection, FLUSH and FUA reaching
//! the backing file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::*};
use std::time::{Duration, Instant};

use dvma::config::{MachineSpec, Overrides};
use dvma::system::System;
use kern::bio::{BioError, BlockDev, BufBox, BufOp, bdev_lookup, getbuf_wait, submit_wait};
use kern::bus_dma::DvmaMode;
use kern::intr::{intr_establish, intr_post};
use kern::{Completion, Ipl, ThreadCtx};

#[path = "common/skip.rs"]
mod skip;

/// The DMA disk engines (`[[disk]] engine`) the sd tests run on.
const ENGINES: [&str; 2] = ["threads", "uring"];

/// Boot `toml`; `None` (after `skip::skip`: a failure unless skipping is
/// allowed) where the host has no io_uring for `engine = "uring"`.
fn boot_engine(toml: &str, dir: &Path) -> Option<System> {
    match System::boot(spec_from(toml, dir)) {
        Ok(sys) => Some(sys),
        Err(e) if e.to_string().contains("io_uring is unavailable") => {
            skip::skip(&format!("engine = \"uring\": {e}"));
            None
        }
        Err(e) => panic!("boot: {e}"),
    }
}

const SECT: usize = 512;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dvma-block-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spec_from(toml: &str, dir: &Path) -> MachineSpec {
    MachineSpec::from_toml(toml, Path::new("test.toml"), dir, &Overrides::default())
        .unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn machine_toml(dir: &Path) -> String {
    format!(
        "[machine]\ncpus = 2\nmemory = \"192M\"\ndata_dir = \"{}\"\n",
        dir.display()
    )
}

fn disk_toml(name: &str, mode: DvmaMode, completion: Completion, extra: &str) -> String {
    format!(
        "[[disk]]\nname = \"{name}\"\nfile = \"{name}.img\"\nsize = \"16M\"\ndvma = \"{}\"\ncompletion = \"{}\"\npool = \"16M\"\nslots = 16\nqueue_depth = 16\nmax_transfer = \"64K\"\n{extra}\n",
        mode.name(),
        completion.name()
    )
}

/// The bytes of sector `s` written at generation `g` by writer `w`.
fn pattern(w: u64, s: u64, g: u64, out: &mut [u8]) {
    let mut x = (w << 56) ^ (s << 20) ^ g ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

static COUNTS: [AtomicU8; 1 << 16] = [const { AtomicU8::new(0) }; 1 << 16];
static NEXT: AtomicUsize = AtomicUsize::new(0);

#[derive(Default)]
struct Tally {
    ios: AtomicU64,
    mismatches: AtomicU64,
    errors: AtomicU64,
    async_done: AtomicU64,
    async_issued: AtomicU64,
    twice: AtomicU64,
}

/// One writer's workload on its own region of `dev`: random writes of 1..=64
/// sectors with a per-sector generation, random read-backs, async writes
/// with iodone callbacks counted per request, and a final full check.
fn workload(
    ctx: &ThreadCtx,
    dev: &'static dyn BlockDev,
    w: u64,
    region: (u64, u64),
    n: usize,
    t: &Tally,
) {
    let (lo, hi) = region;
    let mut gens = vec![0u64; (hi - lo) as usize];
    let mut x = 0x1234_5678_9abc_def0u64 ^ (w * 0x100_0001);
    let mut rnd = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    // Completion context may be an interrupt handler: a lock-free counter
    // per request, no host lock.
    fn counted(bp: BufBox, arg: usize) {
        COUNTS[arg].fetch_add(1, SeqCst);
        drop(bp);
    }
    for i in 0..n {
        let nsect = 1 + rnd(64.min(hi - lo));
        let start = lo + rnd(hi - lo - nsect + 1);
        let bytes = nsect as usize * SECT;
        let write = rnd(3) != 0;
        let mut data = dev.alloc_buf_wait(ctx, bytes).unwrap();
        data.set_len(bytes);
        let mut bp = getbuf_wait(ctx).unwrap();
        bp.blkno = start;
        bp.bcount = bytes;
        if write {
            for k in 0..nsect {
                let s = start + k;
                let g = gens[(s - lo) as usize] + 1;
                gens[(s - lo) as usize] = g;
                pattern(
                    w,
                    s,
                    g,
                    &mut data.as_mut_slice()[k as usize * SECT..(k as usize + 1) * SECT],
                );
            }
            bp.op = BufOp::Write;
            bp.fua = rnd(8) == 0;
            bp.data = Some(data);
            if i % 4 == 3 {
                // Asynchronously, with a callback that counts completions.
                let idx = NEXT.fetch_add(1, SeqCst) % COUNTS.len();
                let c = &COUNTS[idx];
                c.store(0, SeqCst);
                bp.iodone = Some(kern::bio::IoDone::Call(counted, idx));
                t.async_issued.fetch_add(1, SeqCst);
                dev.strategy(bp);
                // Wait for it before the region is read again (ordering).
                let t0 = Instant::now();
                while c.load(SeqCst) == 0 {
                    kern::sched::yield_now(ctx);
                    assert!(
                        t0.elapsed() < Duration::from_secs(30),
                        "async write never completed"
                    );
                }
                t.async_done.fetch_add(1, SeqCst);
                if c.load(SeqCst) != 1 {
                    t.twice.fetch_add(1, SeqCst);
                }
                t.ios.fetch_add(1, SeqCst);
                continue;
            }
            let bp = submit_wait(ctx, dev, bp);
            if bp.error.is_some() {
                t.errors.fetch_add(1, SeqCst);
            }
        } else {
            bp.op = BufOp::Read;
            bp.data = Some(data);
            let mut bp = submit_wait(ctx, dev, bp);
            if bp.error.is_some() {
                t.errors.fetch_add(1, SeqCst);
            } else {
                let d = bp.data.take().unwrap();
                let mut exp = [0u8; SECT];
                for k in 0..nsect {
                    let s = start + k;
                    let g = gens[(s - lo) as usize];
                    let got = &d.as_slice()[k as usize * SECT..(k as usize + 1) * SECT];
                    if g == 0 {
                        continue; // never written: whatever the file held
                    }
                    pattern(w, s, g, &mut exp);
                    if got != exp {
                        t.mismatches.fetch_add(1, SeqCst);
                    }
                }
            }
        }
        t.ios.fetch_add(1, SeqCst);
    }
    // Final check of every written sector.
    let mut s = lo;
    while s < hi {
        let nsect = 64.min(hi - s);
        let bytes = nsect as usize * SECT;
        let mut data = dev.alloc_buf_wait(ctx, bytes).unwrap();
        data.set_len(bytes);
        let mut bp = getbuf_wait(ctx).unwrap();
        bp.op = BufOp::Read;
        bp.blkno = s;
        bp.bcount = bytes;
        bp.data = Some(data);
        let mut bp = submit_wait(ctx, dev, bp);
        assert!(bp.error.is_none(), "final read failed: {:?}", bp.error);
        let d = bp.data.take().unwrap();
        let mut exp = [0u8; SECT];
        for k in 0..nsect {
            let g = gens[(s + k - lo) as usize];
            if g != 0 {
                pattern(w, s + k, g, &mut exp);
                if d.as_slice()[k as usize * SECT..(k as usize + 1) * SECT] != exp {
                    t.mismatches.fetch_add(1, SeqCst);
                }
            }
        }
        s += nsect;
    }
}

/// Run the workload on `name` with 4 writers (2 per CPU) while a device
/// storms interrupts at bio and net.
fn run_workload(sys: &System, name: &str, n: usize) -> Arc<Tally> {
    let dev = bdev_lookup(name).unwrap();
    let sectors = dev.sectors();
    let writers = 4u64;
    let per = sectors / writers;
    let t = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let spurious = Arc::new(AtomicU64::new(0));
    let (sp1, sp2) = (spurious.clone(), spurious.clone());
    let v1 = intr_establish(Ipl::Bio, "spurious", move |_| {
        sp1.fetch_add(1, Relaxed);
    })
    .unwrap();
    let v2 = intr_establish(Ipl::Net, "spurious-net", move |_| {
        sp2.fetch_add(1, Relaxed);
    })
    .unwrap();
    let s2 = stop.clone();
    let storm = std::thread::spawn(move || {
        let mut i = 0usize;
        while !s2.load(Relaxed) {
            intr_post(i % 2, if i.is_multiple_of(3) { v2 } else { v1 });
            i += 1;
            std::thread::sleep(Duration::from_micros(20));
        }
    });
    let ts: Vec<_> = (0..writers)
        .map(|w| {
            let t = t.clone();
            sys.machine
                .spawn(Some(w as usize % 2), "workload", move |ctx| {
                    workload(ctx, dev, w, (w * per, (w + 1) * per), n, &t)
                })
                .unwrap()
        })
        .collect();
    let t0 = Instant::now();
    while !ts.iter().all(|th| th.is_done()) {
        std::thread::sleep(Duration::from_millis(50));
        sys.machine.check().unwrap();
        if t0.elapsed() > Duration::from_secs(60) {
            let mut what = String::new();
            for sd in &sys.sds {
                what += &format!(
                    "{}: inflight {} requeues {} xfers {} errors {}; ",
                    kern::bio::BlockDev::name(*sd),
                    sd.inflight(),
                    sd.stats.dvma_requeues.load(SeqCst),
                    sd.stats.xfers.load(SeqCst),
                    sd.stats.errors.load(SeqCst)
                );
            }
            for (n, d) in &sys.disks {
                what += &format!("{n}: {:?}; ", d.stats());
            }
            panic!(
                "{name}: the workload hung after {} I/Os: {what}",
                t.ios.load(SeqCst)
            );
        }
    }
    stop.store(true, SeqCst);
    storm.join().unwrap();
    assert!(
        spurious.load(SeqCst) > 0,
        "no spurious interrupt was handled"
    );
    t
}

fn check(t: &Tally, what: &str, n: usize) {
    assert_eq!(t.mismatches.load(SeqCst), 0, "{what}: data mismatches");
    assert_eq!(t.errors.load(SeqCst), 0, "{what}: I/O errors");
    assert_eq!(t.twice.load(SeqCst), 0, "{what}: a request completed twice");
    assert_eq!(
        t.async_done.load(SeqCst),
        t.async_issued.load(SeqCst),
        "{what}: async requests lost"
    );
    assert_eq!(t.ios.load(SeqCst), 4 * n as u64, "{what}: requests lost");
}

/// Interrupt handlers allocate nothing (ARCHITECTURE: interrupt context):
/// the kernel counts every host-allocator call made at interrupt depth.
/// Call while the system is up, after the workload.
fn assert_no_interrupt_allocation(what: &str) {
    let n = kern::stats::snapshot().total(|c| c.intr_mallocs);
    assert_eq!(n, 0, "{what}: {n} allocations in interrupt context");
}

#[test]
fn sd_every_dvma_mode_and_completion_mode() {
    for engine in ENGINES {
        for mode in DvmaMode::ALL {
            for comp in Completion::ALL {
                let what = format!("sd0 {engine} {mode}/{comp}");
                let dir = tmpdir(&format!("sd-{engine}-{mode}-{comp}"));
                let toml = machine_toml(&dir)
                    + &disk_toml("sd0", mode, comp, &format!("engine = \"{engine}\""));
                let Some(sys) = boot_engine(&toml, &dir) else {
                    return;
                };
                let t = run_workload(&sys, "sd0", 120);
                assert_no_interrupt_allocation(&what);
                let stats = sys.shutdown().unwrap();
                check(&t, &what, 120);
                assert!(stats.contains("sd0"), "{stats}");
                std::fs::remove_dir_all(&dir).unwrap();
            }
        }
    }
}

#[test]
fn ccd_striped_and_concatenated_every_mode() {
    for (ileave, cbufs) in [("16K", "pool"), ("0", "pool"), ("4K", "kmem")] {
        for mode in DvmaMode::ALL {
            for comp in Completion::ALL {
                let dir = tmpdir(&format!("ccd-{ileave}-{mode}-{comp}"));
                let toml = machine_toml(&dir)
                    + &disk_toml("sd0", mode, comp, "")
                    + &disk_toml("sd1", mode, Completion::Softint, "")
                    + &format!(
                        "[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd0\", \"sd1\"]\ninterleave = \"{ileave}\"\ncompletion = \"{}\"\ncbufs = \"{cbufs}\"\n",
                        comp.name()
                    );
                let sys = System::boot(spec_from(&toml, &dir)).unwrap();
                let t = run_workload(&sys, "ccd0", 60);
                assert_no_interrupt_allocation(&format!("ccd0 {ileave} {cbufs} {mode}/{comp}"));
                sys.shutdown().unwrap();
                check(&t, &format!("ccd0 {ileave} {cbufs} {mode}/{comp}"), 60);
                std::fs::remove_dir_all(&dir).unwrap();
                if cbufs == "kmem" && mode != DvmaMode::Strict {
                    break; // the kmem variant once per completion mode is enough
                }
            }
        }
    }
}

#[test]
fn vnd_every_completion_mode() {
    for comp in Completion::ALL {
        let dir = tmpdir(&format!("vnd-{comp}"));
        let toml = machine_toml(&dir)
            + &format!(
                "[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\nsize = \"16M\"\ncompletion = \"{}\"\n",
                comp.name()
            );
        let sys = System::boot(spec_from(&toml, &dir)).unwrap();
        let t = run_workload(&sys, "vnd0", 120);
        assert_no_interrupt_allocation(&format!("vnd0 {comp}"));
        sys.shutdown().unwrap();
        check(&t, &format!("vnd0 {comp}"), 120);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A slots tag with 2 slots and a queue depth of 16: loads run out of DVMA
/// space all the time; every I/O still completes, correctly.
#[test]
fn dvma_exhaustion_requeues_and_completes() {
    for comp in Completion::ALL {
        let dir = tmpdir(&format!("exhaust-{comp}"));
        let toml = machine_toml(&dir)
            + &disk_toml("sd0", DvmaMode::Slots, comp, "").replace("slots = 16", "slots = 2");
        let sys = System::boot(spec_from(&toml, &dir)).unwrap();
        let t = run_workload(&sys, "sd0", 100);
        let sd = sys.sds[0];
        let requeues = sd.stats.dvma_requeues.load(SeqCst);
        let waits = sd.tag().stats.waits.load(SeqCst);
        sys.shutdown().unwrap();
        check(&t, &format!("exhaustion {comp}"), 100);
        assert!(
            requeues + waits > 0,
            "{comp}: DVMA never ran out ({requeues} requeues, {waits} waits)"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// An injected media error reaches the caller as EIO on that buf only.
#[test]
fn device_errors_become_eio_and_nothing_else_is_lost() {
    for engine in ENGINES {
        device_errors_on(engine);
    }
}

fn device_errors_on(engine: &str) {
    let dir = tmpdir(&format!("errors-{engine}"));
    let extra = format!("engine = \"{engine}\"");
    let toml =
        machine_toml(&dir) + &disk_toml("sd0", DvmaMode::Strict, Completion::Softint, &extra);
    let Some(sys) = boot_engine(&toml, &dir) else {
        return;
    };
    let disk = sys.disks[0].1;
    disk.inject_media_error(100..108);
    let dev = bdev_lookup("sd0").unwrap();
    let out = sys
        .machine
        .run(0, "errors", move |ctx| {
            let mut res = Vec::new();
            for (blk, n) in [(96u64, 8u64), (104, 8), (0, 8), (200, 16), (107, 1)] {
                let mut data = dev.alloc_buf_wait(ctx, n as usize * SECT).unwrap();
                data.set_len(n as usize * SECT);
                data.as_mut_slice().fill(0xab);
                let mut bp = getbuf_wait(ctx).unwrap();
                bp.op = BufOp::Write;
                bp.blkno = blk;
                bp.bcount = n as usize * SECT;
                bp.data = Some(data);
                let bp = submit_wait(ctx, dev, bp);
                res.push((blk, bp.error, bp.resid));
            }
            res
        })
        .unwrap();
    disk.clear_injection();
    sys.shutdown().unwrap();
    assert_eq!(out[0].1, Some(BioError::Io), "{out:?}");
    assert_eq!(out[1].1, Some(BioError::Io));
    assert_eq!(out[1].2, 8 * SECT, "resid is the whole transfer");
    assert_eq!(out[2].1, None);
    assert_eq!(out[3].1, None);
    assert_eq!(out[4].1, Some(BioError::Io));
    let f = std::fs::read(dir.join("sd0.img")).unwrap();
    assert!(
        f[..8 * SECT].iter().all(|b| *b == 0xab),
        "the good write did not land"
    );
    assert!(
        f[96 * SECT..112 * SECT].iter().all(|b| *b == 0),
        "a failed write touched the file"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every driver refuses the same bad bufs the same way, before any I/O:
/// longer than its transfer size, not whole sectors, past its end (EINVAL
/// for a read, ENOSPC for a write); a good buf next to them goes through.
#[test]
fn every_driver_refuses_bad_bufs() {
    let dir = tmpdir("badbufs");
    let toml = machine_toml(&dir)
        + &disk_toml("sd0", DvmaMode::Permanent, Completion::Intr, "")
        + &disk_toml("sd1", DvmaMode::Permanent, Completion::Intr, "")
        + "[[ccd]]\nname = \"ccd0\"\ncomponents = [\"sd0\", \"sd1\"]\ninterleave = \"64K\"\n"
        + "[[vnd]]\nname = \"vnd0\"\nfile = \"vnd0.img\"\nsize = \"8M\"\n";
    let sys = System::boot(spec_from(&toml, &dir)).unwrap();
    for name in ["sd0", "ccd0", "vnd0"] {
        let dev = bdev_lookup(name).unwrap();
        let (max, end) = (dev.max_transfer(), dev.sectors());
        let cases = [
            (BufOp::Read, 0, max + SECT, Some(BioError::Inval)),
            (BufOp::Write, 0, max + SECT, Some(BioError::Inval)),
            (BufOp::Write, 0, SECT + 1, Some(BioError::Inval)),
            (BufOp::Read, end - 1, 2 * SECT, Some(BioError::Inval)),
            (BufOp::Write, end - 1, 2 * SECT, Some(BioError::NoSpc)),
            (BufOp::Write, end - 1, SECT, None),
        ];
        let out = sys
            .machine
            .run(0, "badbufs", move |ctx| {
                let mut res = Vec::new();
                for (op, blk, len, _) in cases {
                    let mut data = dev.alloc_buf_wait(ctx, len).unwrap();
                    data.set_len(len);
                    let mut bp = getbuf_wait(ctx).unwrap();
                    bp.op = op;
                    bp.blkno = blk;
                    bp.bcount = len;
                    bp.data = Some(data);
                    let bp = submit_wait(ctx, dev, bp);
                    res.push((bp.error, bp.resid));
                }
                res
            })
            .unwrap();
        for ((op, blk, len, want), (got, resid)) in cases.iter().zip(&out) {
            assert_eq!(got, want, "{name}: {op:?} of {len} bytes at {blk}");
            if want.is_some() {
                assert_eq!(*resid, *len, "{name}: the whole buf is residual");
            }
        }
    }
    sys.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// FLUSH and FUA reach the backing file: after they complete, the bytes are
/// in the file (read back with the host, bypassing dvma), and the device
/// counted its fdatasync calls.
#[test]
fn flush_and_fua_reach_the_backing_file() {
    for engine in ENGINES {
        flush_and_fua_on(engine);
    }
}

fn flush_and_fua_on(engine: &str) {
    let dir = tmpdir(&format!("flush-{engine}"));
    let extra = format!("engine = \"{engine}\"");
    let toml =
        machine_toml(&dir) + &disk_toml("sd0", DvmaMode::Permanent, Completion::Thread, &extra);
    let Some(sys) = boot_engine(&toml, &dir) else {
        return;
    };
    let disk = sys.disks[0].1;
    let dev = bdev_lookup("sd0").unwrap();
    let f0 = disk.stats().syncs;
    let img = dir.join("sd0.img");
    let img2 = img.clone();
    let ok = sys
        .machine
        .run(0, "flush", move |ctx| {
            let write = |blk: u64, byte: u8, fua: bool| {
                let mut data = dev.alloc_buf_wait(ctx, 4096).unwrap();
                data.set_len(4096);
                data.as_mut_slice().fill(byte);
                let mut bp = getbuf_wait(ctx).unwrap();
                bp.op = BufOp::Write;
                bp.fua = fua;
                bp.blkno = blk;
                bp.bcount = 4096;
                bp.data = Some(data);
                submit_wait(ctx, dev, bp).error
            };
            let a = write(0, 0x11, true);
            let on_disk = std::fs::read(&img2).unwrap()[..4096]
                .iter()
                .all(|b| *b == 0x11);
            let b = write(8, 0x22, false);
            let mut bp = getbuf_wait(ctx).unwrap();
            bp.op = BufOp::Flush;
            let c = submit_wait(ctx, dev, bp).error;
            (a, b, c, on_disk)
        })
        .unwrap();
    let f1 = disk.stats().syncs;
    sys.shutdown().unwrap();
    assert_eq!((ok.0, ok.1, ok.2), (None, None, None));
    assert!(ok.3, "the FUA write was not in the file when it completed");
    assert!(
        f1 >= f0 + 2,
        "expected an fdatasync for the FUA write and one for the flush ({f0} -> {f1})"
    );
    let f = std::fs::read(&img).unwrap();
    assert!(f[4096..8192].iter().all(|b| *b == 0x22));
    std::fs::remove_dir_all(&dir).unwrap();
}
