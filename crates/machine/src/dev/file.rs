//! `FileDev`: a non-DMA asynchronous file device (the backend of `vnd`).
//!
//! Same rings, doorbell, workers and interrupt as [`super::DmaDisk`], but a
//! [`FileCmd`] names a byte `offset` in the file and a kernel direct-map
//! address `kva`: the worker `pread`s/`pwrite`s between the file and that
//! address itself, as a programmed-I/O device would. There is no IOMMU in
//! the way, so there are no DMA faults; FLUSH (and a FUA write, after
//! writing) is `fdatasync`.
//!
//! | op | what the worker does |
//! |---|---|
//! | READ | `pread(fd, kva, len, offset)`: file to memory (zeroes past the end of a file shortened behind the device's back) |
//! | WRITE | `pwrite(fd, kva, len, offset)`; with `fua`, then `fdatasync` |
//! | FLUSH | `fdatasync` |
//!
//! A READ or WRITE with `len` 0, above `max_transfer`, past the end of the
//! file, or whose `kva` range is not inside the kernel's direct map of RAM
//! completes `Invalid`; a WRITE on a read-only device `MediaError(EROFS)`;
//! one touching an injected bad byte range `MediaError(EIO)`. None of these
//! touches the file or memory.
//!
//! # The safety contract
//! The device writes (READ) or reads (WRITE) `len` bytes at `kva` on a host
//! thread while the kernel runs. The **kernel guarantees** that `kva..kva +
//! len` is a live buffer in its direct map that nothing else touches from
//! `submit` until the command's completion is reaped: the `vnd` driver owns
//! the buffer (an `IoBuf`) by value for that time and holds no reference
//! into it. The device checks only that the range lies inside RAM's direct
//! map, so a driver that breaks the contract corrupts kernel memory, never
//! the host process outside RAM.
//!
//! Contexts: as for the disk (see the parent module). Stop the device before
//! the machine shuts down (RAM goes away with the machine).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kern::dev::{DiskDone, DiskOp, DiskStatus, FileCmd, FileDevice};
use kern::intr::IntrHandle;

use super::disk::{Injection, open_backing};
use super::engine::{Counters, DeviceStats, Engine, Medium, Tuning};

/// How to build a [`FileDev`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileConfig {
    /// The backing file.
    pub path: PathBuf,
    /// Size of the file when `open` creates it; an existing file keeps its
    /// size.
    pub size_bytes: u64,
    /// Create the file (sparse) if it is missing.
    pub create: bool,
    /// Largest transfer of one command, bytes. Default 1 MiB.
    pub max_transfer: usize,
    /// Commands outstanding at once. Default 64.
    pub queue_depth: u16,
    /// Worker threads. Default 2.
    pub workers: usize,
    /// Post after this many un-signalled completions. Default 8.
    pub coalesce_count: u32,
    /// ... or when the oldest is this old, ns. Default 20 000.
    pub coalesce_ns: u64,
    /// Idle workers poll this long before sleeping, ns. Default 30 000.
    pub spin_ns: u64,
    /// Refuse writes (`MediaError(EROFS)`).
    pub read_only: bool,
}

impl FileConfig {
    /// The defaults, for `path` (created with `size_bytes` if missing).
    pub fn new(path: impl Into<PathBuf>, size_bytes: u64) -> Self {
        Self {
            path: path.into(),
            size_bytes,
            create: true,
            max_transfer: 1 << 20,
            queue_depth: 64,
            workers: 2,
            coalesce_count: 8,
            coalesce_ns: 20_000,
            spin_ns: 30_000,
            read_only: false,
        }
    }
}

struct FileMedium {
    file: File,
    size: u64,
    max_transfer: usize,
    read_only: bool,
    /// The kernel's direct map of RAM: `[ram, ram + ram_len)`.
    ram: usize,
    ram_len: usize,
    bad: Injection,
}

impl FileMedium {
    fn sync(&self, stats: &Counters) -> DiskStatus {
        match self.file.sync_data() {
            Ok(()) => {
                Counters::inc(&stats.syncs);
                DiskStatus::Ok
            }
            Err(e) => DiskStatus::MediaError(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn transfer(&self, c: &FileCmd, stats: &Counters) -> DiskStatus {
        let write = c.op == DiskOp::Write;
        let in_file = c
            .offset
            .checked_add(c.len as u64)
            .is_some_and(|e| e <= self.size);
        let in_ram = c.kva >= self.ram
            && c.kva
                .checked_add(c.len)
                .is_some_and(|e| e <= self.ram + self.ram_len);
        if c.len == 0 || c.len > self.max_transfer || !in_file || !in_ram {
            return DiskStatus::Invalid;
        }
        if write && self.read_only {
            return DiskStatus::MediaError(libc::EROFS);
        }
        if self.bad.hits(c.offset, c.len as u64) {
            Counters::inc(&stats.injected);
            return DiskStatus::MediaError(libc::EIO);
        }
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < c.len {
            let p = c.kva + done;
            let n = c.len - done;
            let off = (c.offset + done as u64) as libc::off_t;
            let r = if write {
                // SAFETY: `p..p+n` lies in the direct map (checked above),
                // which stays mapped while the machine runs; by the
                // module's contract the kernel neither touches nor frees the
                // buffer until this command is reaped. pwrite only reads it.
                unsafe { libc::pwrite(fd, p as *const libc::c_void, n, off) }
            } else {
                // SAFETY: as above; pread writes the buffer, which the
                // kernel has handed to the device until the completion is
                // reaped.
                unsafe { libc::pread(fd, p as *mut libc::c_void, n, off) }
            };
            if r > 0 {
                done += r as usize;
                continue;
            }
            if r == 0 {
                if write {
                    return DiskStatus::MediaError(libc::EIO);
                }
                // The file was shortened under us: the rest reads as zeroes.
                // SAFETY: the same range as the pread above.
                unsafe { core::ptr::write_bytes(p as *mut u8, 0, n) };
                break;
            }
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno == libc::EINTR {
                continue;
            }
            return DiskStatus::MediaError(errno);
        }
        if write {
            Counters::add(&stats.bytes_written, c.len as u64);
            if c.fua {
                return self.sync(stats);
            }
        } else {
            Counters::add(&stats.bytes_read, c.len as u64);
        }
        DiskStatus::Ok
    }
}

impl Medium for FileMedium {
    type Cmd = FileCmd;

    fn id(cmd: &FileCmd) -> u16 {
        cmd.id
    }

    fn execute(&self, c: &FileCmd, stats: &Counters) -> DiskStatus {
        match c.op {
            DiskOp::Flush => {
                Counters::inc(&stats.flushes);
                if self.read_only {
                    DiskStatus::Ok
                } else {
                    self.sync(stats)
                }
            }
            DiskOp::Read => {
                Counters::inc(&stats.reads);
                self.transfer(c, stats)
            }
            DiskOp::Write => {
                Counters::inc(&stats.writes);
                if c.fua {
                    Counters::inc(&stats.fua_writes);
                }
                self.transfer(c, stats)
            }
        }
    }
}

/// A non-DMA asynchronous file device. See the module documentation.
pub struct FileDev {
    engine: Engine<FileMedium>,
    size: u64,
    cfg: FileConfig,
}

impl FileDev {
    /// Open the backing file and start the workers. The kernel must be
    /// booted (the device learns where the direct map of RAM is, to check
    /// every `kva`). Host or thread context.
    pub fn open(cfg: FileConfig) -> io::Result<Arc<FileDev>> {
        let Some(k) = kern::kernel::try_kernel() else {
            return Err(io::Error::other(
                "filedev: no kernel is booted (the device needs its direct map)",
            ));
        };
        let pm = k.physmem();
        let (ram, ram_len) = (pm.kva(kern::vm::Paddr(0)) as usize, pm.size() as usize);
        if cfg.max_transfer == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "filedev: max_transfer is 0",
            ));
        }
        let file = open_backing(&cfg.path, cfg.size_bytes, cfg.create, cfg.read_only, 0)?;
        let size = file.metadata()?.len();
        let medium = FileMedium {
            file,
            size,
            max_transfer: cfg.max_transfer,
            read_only: cfg.read_only,
            ram,
            ram_len,
            bad: Injection::default(),
        };
        let engine = Engine::start(
            medium,
            &Tuning {
                name: "filedev",
                queue_depth: cfg.queue_depth,
                workers: cfg.workers,
                coalesce_count: cfg.coalesce_count,
                coalesce_ns: cfg.coalesce_ns,
                spin_ns: cfg.spin_ns,
            },
        )?;
        Ok(Arc::new(FileDev { engine, size, cfg }))
    }

    /// A `&'static` reference for a kernel driver; never freed. Call
    /// [`FileDev::stop`] before the machine shuts down.
    pub fn leak(this: Arc<Self>) -> &'static FileDev {
        let b: &'static Arc<FileDev> = Box::leak(Box::new(this));
        b
    }

    /// Stop the workers; queued commands complete with
    /// `MediaError(ESHUTDOWN)`. Idempotent; `Drop` calls it. Host or
    /// thread context, never an interrupt handler.
    pub fn stop(&self) {
        self.engine.stop();
    }

    /// Has `stop` been called?
    pub fn is_stopped(&self) -> bool {
        self.engine.core().is_stopping()
    }

    /// The counters now. Any context.
    pub fn stats(&self) -> DeviceStats {
        self.engine.core().stats.snapshot()
    }

    /// READ and WRITE commands touching a byte of `bytes` complete with
    /// `MediaError(EIO)` without touching the file. Any context.
    pub fn inject_media_error(&self, bytes: Range<u64>) {
        self.engine.core().medium.bad.set(bytes);
    }

    /// Remove the injected bad range.
    pub fn clear_injection(&self) {
        self.engine.core().medium.bad.clear();
    }

    /// Delay every command by `d` (zero turns it off). Any context.
    pub fn inject_delay(&self, d: Duration) {
        self.engine.core().set_delay(d);
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &FileConfig {
        &self.cfg
    }
}

impl FileDevice for FileDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&self, cmd: FileCmd) -> bool {
        self.engine.core().submit(cmd)
    }

    fn doorbell(&self) {
        self.engine.core().doorbell()
    }

    fn reap(&self) -> Option<DiskDone> {
        self.engine.core().reap()
    }

    fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        self.engine.core().set_interrupt(cpu, vector)
    }
}

impl std::fmt::Debug for FileDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDev")
            .field("path", &self.cfg.path)
            .field("size", &self.size)
            .field("stopped", &self.is_stopped())
            .finish()
    }
}
