//! What the machine's integration tests share: booting a small machine, a
//! temporary backing file, a device that stops when dropped, a data pattern.
// Each test binary uses only some of these.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use std::time::{Duration, Instant};

use kern::bus_dma::*;
use kern::dev::{DiskCmd, DiskController, DiskDone, DiskOp, DiskStatus};
use kern::iommu::Iova;
use machine::dev::{DmaDisk, FileDev};
use machine::{Machine, MachineConfig};

/// Boot a machine of `ncpu` CPUs and 128 MiB of RAM.
pub fn boot(ncpu: usize) -> Machine {
    boot_with(ncpu, |c| c.ram_bytes = 128 << 20)
}

/// Boot a machine of `ncpu` CPUs, configured further by `f`.
pub fn boot_with(ncpu: usize, f: impl FnOnce(&mut MachineConfig)) -> Machine {
    let mut c = MachineConfig::default();
    c.kernel.ncpu = ncpu;
    f(&mut c);
    Machine::boot(c).unwrap()
}

/// A temporary backing file (not created here), removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A fresh path in the temporary directory, unique to this process and
    /// this call.
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "dvma-machine-{}-{name}-{}.img",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_file(&p);
        TempFile(p)
    }

    /// `len` bytes of the file at `off`.
    pub fn read_at(&self, off: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.0).unwrap();
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, off).unwrap();
        v
    }

    /// Write `data` into the file at `off`.
    pub fn write_at(&self, off: u64, data: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.0)
            .unwrap();
        f.write_all_at(data, off).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Stops a device when dropped (a failing test unwinds through it before
/// its machine shuts down).
pub struct Stopper<T: Stop>(pub Arc<T>);

/// A device [`Stopper`] can stop.
pub trait Stop {
    /// Stop it.
    fn stop_dev(&self);
}

impl Stop for DmaDisk {
    fn stop_dev(&self) {
        self.stop()
    }
}

impl Stop for FileDev {
    fn stop_dev(&self) {
        self.stop()
    }
}

impl<T: Stop> Drop for Stopper<T> {
    fn drop(&mut self) {
        self.0.stop_dev();
    }
}

impl<T: Stop> std::ops::Deref for Stopper<T> {
    type Target = Arc<T>;
    fn deref(&self) -> &Arc<T> {
        &self.0
    }
}

/// `n` bytes of a pattern that differs with `seed` and from sector to sector.
pub fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

// ---- driving a DMA disk by hand (devices.rs, uring.rs) ----------------------

/// How long a test waits for a device before calling it hung.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn rd(lba: u64, nsect: u32, iova: Iova) -> DiskCmd {
    DiskCmd {
        id: 0,
        op: DiskOp::Read,
        lba,
        nsect,
        iova,
        fua: false,
    }
}

pub fn wr(lba: u64, nsect: u32, iova: Iova, fua: bool) -> DiskCmd {
    DiskCmd {
        id: 0,
        op: DiskOp::Write,
        lba,
        nsect,
        iova,
        fua,
    }
}

pub fn flush() -> DiskCmd {
    DiskCmd {
        id: 0,
        op: DiskOp::Flush,
        lba: 0,
        nsect: 0,
        iova: Iova(0),
        fua: false,
    }
}

/// Submit `n` commands (command `i` gets id `i`), ring, and poll for their
/// completions: the statuses by id. Fails on a duplicate completion or on
/// a hang.
pub fn exec(
    n: usize,
    submit: impl Fn(usize) -> bool,
    doorbell: impl Fn(),
    reap: impl Fn() -> Option<DiskDone>,
) -> Vec<DiskStatus> {
    let mut out: Vec<Option<DiskStatus>> = vec![None; n];
    let (mut next, mut got) = (0, 0);
    let t0 = Instant::now();
    while got < n {
        assert!(
            t0.elapsed() < DEADLINE,
            "device hung: {got}/{n} completions"
        );
        let before = next;
        while next < n && submit(next) {
            next += 1;
        }
        if next > before {
            doorbell();
        }
        while let Some(d) = reap() {
            let slot = &mut out[d.id as usize];
            assert!(slot.is_none(), "command {} completed twice", d.id);
            *slot = Some(d.status);
            got += 1;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    out.into_iter().map(Option::unwrap).collect()
}

pub fn exec_disk(d: &DmaDisk, cmds: &[DiskCmd]) -> Vec<DiskStatus> {
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

pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn tag(m: &Machine, mode: DvmaMode) -> &'static DmaTag {
    m.run(0, "attach", move |_| {
        let mut c = TagConfig::new(mode);
        c.pool_bytes = 8 << 20;
        c.slots = 8;
        tag_create("devtest", c).unwrap()
    })
    .unwrap()
}

/// Load one map per `(len, fill)`: the buffer filled with `pattern(seed)`
/// or 0xee.
pub fn load(
    m: &Machine,
    tag: &'static DmaTag,
    bufs: Vec<(usize, Option<u8>)>,
    dir: DmaDir,
) -> Vec<DmaMap> {
    m.run(0, "load", move |ctx| {
        bufs.into_iter()
            .map(|(len, seed)| {
                let mut b = dmamem_alloc(tag, len).unwrap();
                match seed {
                    Some(s) => b.as_mut_slice().copy_from_slice(&pattern(s, len)),
                    None => b.as_mut_slice().fill(0xee),
                }
                let mut map = dmamap_create(tag, 1 << 20).unwrap();
                dmamap_load(&mut map, b, dir, Wait::Ok(ctx)).unwrap();
                let op = match dir {
                    DmaDir::ToDevice => SyncOp::PreWrite,
                    DmaDir::FromDevice => SyncOp::PreRead,
                };
                dmamap_sync(&mut map, op);
                map
            })
            .collect()
    })
    .unwrap()
}

/// Unload the maps and return their buffers' bytes.
pub fn unload(m: &Machine, maps: Vec<DmaMap>) -> Vec<Vec<u8>> {
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

pub fn iova(map: &DmaMap) -> Iova {
    map.segs()[0].iova
}
