//! `DmaDisk`: a DMA disk controller backed by a host file.
//!
//! The kernel's `sd`-style driver sees a [`DiskController`]: it loads a
//! `bus_dma` map, puts a [`DiskCmd`] with the segment's IOVA on the
//! submission ring, rings the doorbell, and later reaps a [`DiskDone`]
//! (usually from its interrupt handler). A worker thread executes the
//! command against the backing file, reaching memory only through the DVMA
//! window:
//!
//! | op | what the worker does | status on failure |
//! |---|---|---|
//! | READ | [`Window::pread`]`(fd, lba*512, iova, nsect*512)`: file to memory | `DmaFault` if the IOVA range is not mapped writable; `MediaError(errno)` if the file fails |
//! | WRITE | [`Window::pwrite`]: memory to file; with `fua`, then `fdatasync` | `DmaFault` if not mapped readable; `MediaError(errno)` |
//! | FLUSH | `fdatasync` | `MediaError(errno)` |
//!
//! Before any I/O a READ or WRITE is checked: `nsect` of 0, a range past
//! the last sector or a transfer above `max_transfer` completes `Invalid`;
//! a WRITE to a read-only disk `MediaError(EROFS)`; a command touching an
//! injected bad range `MediaError(EIO)`. None of these touches the file.
//! A DMA fault may leave a partial transfer behind (the part before the
//! first unmapped page), as a real controller's aborted DMA does.
//!
//! Contexts: see the parent module. `submit`, `doorbell`, `reap`,
//! `set_interrupt`, `stats` and the injection calls are safe from interrupt
//! handlers; `open` and `stop` are not. Stop the disk before the machine
//! shuts down (its window goes away with the machine).
//!
//! `O_DIRECT` (optional) needs the file offset, the memory address and the
//! length aligned to the filesystem's logical block size: offsets and
//! lengths are sector multiples and window addresses of a loaded map are
//! page aligned, so it works on filesystems with 512-byte logical blocks
//! (ext4, xfs on most devices); a filesystem that refuses `O_DIRECT` fails
//! `open` with a message saying so.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use kern::dev::{DiskCmd, DiskController, DiskDone, DiskGeometry, DiskOp, DiskStatus};
use kern::intr::IntrHandle;

use super::SECTOR;
use super::engine::{Counters, DeviceStats, Engine, Medium, Tuning};
use crate::dvma::{DmaFault, Window};

/// How to build a [`DmaDisk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The backing file.
    pub path: PathBuf,
    /// Size of the file when `open` creates it (rounded down to sectors).
    /// An existing file keeps its size.
    pub size_bytes: u64,
    /// Create the file (sparse) if it is missing; otherwise a missing file
    /// is an error.
    pub create: bool,
    /// Open the file with `O_DIRECT` (no host page cache).
    pub o_direct: bool,
    /// Largest transfer of one command, bytes (a multiple of 512).
    /// Default 1 MiB.
    pub max_transfer: usize,
    /// Commands outstanding at once (submitted, not yet reaped). Default 64.
    pub queue_depth: u16,
    /// Worker threads. Default 2.
    pub workers: usize,
    /// Post an interrupt after this many un-signalled completions.
    /// Default 8; 1 posts for every completion.
    pub coalesce_count: u32,
    /// ... or when the oldest un-signalled completion is this old, ns.
    /// Default 20 000 (20 us).
    pub coalesce_ns: u64,
    /// Idle workers poll the ring this long before sleeping, ns.
    /// Default 30 000 (30 us).
    pub spin_ns: u64,
    /// Refuse writes (`MediaError(EROFS)`); the file is opened read-only.
    pub read_only: bool,
}

impl DiskConfig {
    /// The defaults, for `path` (created with `size_bytes` if missing).
    pub fn new(path: impl Into<PathBuf>, size_bytes: u64) -> Self {
        Self {
            path: path.into(),
            size_bytes,
            create: true,
            o_direct: false,
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

/// Open (creating it sparse with `size` bytes if missing and `create`) the
/// backing file of a device.
pub(super) fn open_backing(
    path: &Path,
    size: u64,
    create: bool,
    read_only: bool,
    flags: i32,
) -> io::Result<File> {
    if create {
        match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(f) => f.set_len(size)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", path.display()),
                ));
            }
        }
    }
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))
}

/// A bad range for tests: commands touching `[start, end)` fail.
#[derive(Default)]
pub(super) struct Injection {
    start: AtomicU64,
    end: AtomicU64,
}

impl Injection {
    pub(super) fn set(&self, r: Range<u64>) {
        // `end == 0` disables the range while it changes.
        self.end.store(0, SeqCst);
        self.start.store(r.start, SeqCst);
        self.end.store(r.end, SeqCst);
    }

    pub(super) fn clear(&self) {
        self.end.store(0, SeqCst);
    }

    pub(super) fn hits(&self, first: u64, count: u64) -> bool {
        let end = self.end.load(SeqCst);
        let start = self.start.load(SeqCst);
        end != 0 && first < end && first.saturating_add(count) > start
    }
}

struct DiskMedium {
    window: &'static Window,
    file: File,
    sectors: u64,
    max_transfer: usize,
    read_only: bool,
    bad: Injection,
}

impl DiskMedium {
    fn sync(&self, stats: &Counters) -> Result<(), DiskStatus> {
        match self.file.sync_data() {
            Ok(()) => {
                Counters::inc(&stats.syncs);
                Ok(())
            }
            Err(e) => Err(DiskStatus::MediaError(
                e.raw_os_error().unwrap_or(libc::EIO),
            )),
        }
    }

    fn transfer(&self, c: &DiskCmd, stats: &Counters) -> DiskStatus {
        let write = c.op == DiskOp::Write;
        let len = c.nsect as u64 * SECTOR as u64;
        let in_range = c
            .lba
            .checked_add(c.nsect as u64)
            .is_some_and(|e| e <= self.sectors);
        if c.nsect == 0 || len > self.max_transfer as u64 || !in_range {
            return DiskStatus::Invalid;
        }
        if write && self.read_only {
            return DiskStatus::MediaError(libc::EROFS);
        }
        if self.bad.hits(c.lba, c.nsect as u64) {
            Counters::inc(&stats.injected);
            return DiskStatus::MediaError(libc::EIO);
        }
        let fd = self.file.as_raw_fd();
        let off = c.lba * SECTOR as u64;
        let r = if write {
            self.window.pwrite(fd, off, c.iova, len as usize)
        } else {
            self.window.pread(fd, off, c.iova, len as usize)
        };
        match r {
            Ok(()) => {
                if write {
                    Counters::add(&stats.bytes_written, len);
                    if c.fua
                        && let Err(s) = self.sync(stats)
                    {
                        return s;
                    }
                } else {
                    Counters::add(&stats.bytes_read, len);
                }
                DiskStatus::Ok
            }
            Err(DmaFault::Unmapped { .. }) => DiskStatus::DmaFault,
            Err(DmaFault::Io { errno }) => DiskStatus::MediaError(errno),
        }
    }
}

impl Medium for DiskMedium {
    type Cmd = DiskCmd;

    fn id(cmd: &DiskCmd) -> u16 {
        cmd.id
    }

    fn execute(&self, c: &DiskCmd, stats: &Counters) -> DiskStatus {
        match c.op {
            DiskOp::Flush => {
                Counters::inc(&stats.flushes);
                if self.read_only {
                    return DiskStatus::Ok;
                }
                match self.sync(stats) {
                    Ok(()) => DiskStatus::Ok,
                    Err(s) => s,
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

/// A DMA disk controller on a host file. See the module documentation.
pub struct DmaDisk {
    engine: Engine<DiskMedium>,
    geometry: DiskGeometry,
    cfg: DiskConfig,
}

impl DmaDisk {
    /// Open the backing file (creating it if configured), allocate the
    /// rings and start the workers. The disk reaches memory through
    /// `window` (the machine's: [`crate::Machine::window`]). Host or thread
    /// context.
    ///
    /// Errors: the file cannot be created or opened (a filesystem that
    /// refuses `O_DIRECT` says so), it is smaller than one sector,
    /// `max_transfer` is not a positive multiple of 512, `queue_depth` or
    /// `workers` is 0, or a thread cannot be started.
    pub fn open(window: &'static Window, cfg: DiskConfig) -> io::Result<Arc<DmaDisk>> {
        let bad_input = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if cfg.max_transfer < SECTOR as usize || !cfg.max_transfer.is_multiple_of(SECTOR as usize) {
            return Err(bad_input(format!(
                "dmadisk: max_transfer {} is not a positive multiple of {SECTOR}",
                cfg.max_transfer
            )));
        }
        let flags = if cfg.o_direct { libc::O_DIRECT } else { 0 };
        let file = open_backing(&cfg.path, cfg.size_bytes, cfg.create, cfg.read_only, flags)
            .map_err(|e| {
                if cfg.o_direct && e.raw_os_error() == Some(libc::EINVAL) {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{e}: the filesystem refuses O_DIRECT; open the disk with o_direct = false"
                        ),
                    )
                } else {
                    e
                }
            })?;
        let sectors = file.metadata()?.len() / SECTOR as u64;
        if sectors == 0 {
            return Err(bad_input(format!(
                "dmadisk: {} is smaller than one sector",
                cfg.path.display()
            )));
        }
        let geometry = DiskGeometry {
            sectors,
            sector_size: SECTOR,
            max_transfer: cfg.max_transfer,
            queue_depth: cfg.queue_depth,
        };
        let medium = DiskMedium {
            window,
            file,
            sectors,
            max_transfer: cfg.max_transfer,
            read_only: cfg.read_only,
            bad: Injection::default(),
        };
        let engine = Engine::start(
            medium,
            &Tuning {
                name: "dmadisk",
                queue_depth: cfg.queue_depth,
                workers: cfg.workers,
                coalesce_count: cfg.coalesce_count,
                coalesce_ns: cfg.coalesce_ns,
                spin_ns: cfg.spin_ns,
            },
        )?;
        Ok(Arc::new(DmaDisk {
            engine,
            geometry,
            cfg,
        }))
    }

    /// A `&'static` reference for a kernel driver (which holds a
    /// `&'static dyn DiskController`). The disk is never freed and its file
    /// never closed; [`DmaDisk::stop`] must still be called before the
    /// machine shuts down.
    pub fn leak(this: Arc<Self>) -> &'static DmaDisk {
        let b: &'static Arc<DmaDisk> = Box::leak(Box::new(this));
        b
    }

    /// Stop the workers (see the parent module): new commands are refused,
    /// commands being executed finish, commands still queued complete with
    /// `MediaError(ESHUTDOWN)`, one last interrupt is posted for them.
    /// Idempotent; `Drop` calls it. Host or thread context, never an
    /// interrupt handler.
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

    /// From now on READ and WRITE commands touching a sector of `lbas`
    /// complete with `MediaError(EIO)` without touching the file (one
    /// range at a time; replaces the previous one). Any context; commands
    /// already executing are not affected.
    pub fn inject_media_error(&self, lbas: Range<u64>) {
        self.engine.core().medium.bad.set(lbas);
    }

    /// Remove the injected bad range.
    pub fn clear_injection(&self) {
        self.engine.core().medium.bad.clear();
    }

    /// Delay every command by `d` before executing it (a slow medium; zero
    /// turns it off). Any context.
    pub fn inject_delay(&self, d: Duration) {
        self.engine.core().set_delay(d);
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }
}

impl DiskController for DmaDisk {
    fn geometry(&self) -> DiskGeometry {
        self.geometry
    }

    fn submit(&self, cmd: DiskCmd) -> bool {
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

impl std::fmt::Debug for DmaDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaDisk")
            .field("path", &self.cfg.path)
            .field("geometry", &self.geometry)
            .field("stopped", &self.is_stopped())
            .finish()
    }
}
