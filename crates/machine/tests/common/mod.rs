//! What the machine's integration tests share: booting a small machine, a
//! temporary backing file, a device that stops when dropped, a data pattern.
// Each test binary uses only some of these.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

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
