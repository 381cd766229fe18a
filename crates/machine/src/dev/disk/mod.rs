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
//! | READ, write cache on | as above when no cached sector overlaps; else [`Window::dma_write`] of the file's sectors with the cached ones laid over them (read-your-writes) | as above |
//! | WRITE, write cache on | [`Window::dma_read`] into the controller's memory; completes `Ok` once cached (first destaging the oldest blocks to the file if the cache is full); with `fua`, or larger than the whole cache, written through: file, then `fdatasync` (`fua`), then the cached copies of those sectors dropped | `DmaFault` (the cache untouched); `MediaError(errno)` if a destage or the write-through fails |
//! | FLUSH, write cache on | every cached block to the file, then `fdatasync` | `MediaError(errno)` (the cache keeps what it holds) |
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
//! # The volatile write cache (`write_cache`, default off)
//!
//! With [`DiskConfig::write_cache`], the controller behaves as a disk with
//! a volatile write cache: a WRITE without FUA is acknowledged once its
//! data is in the controller's memory, and reaches the backing file only
//! * at FLUSH (every cached block is written, then `fdatasync`),
//! * when the cache is full (the least recently written blocks are
//!   destaged to the file, without `fdatasync`, before the new data is
//!   accepted),
//! * at [`DmaDisk::stop`] (and `Drop`): clean shutdown writes everything
//!   back and syncs.
//!
//! So a process killed with SIGKILL loses what was acknowledged but not
//! flushed, as a real disk loses its cache at a power cut: without the
//! cache, unflushed writes already sit in the host page cache and survive
//! the process (only a host crash would lose them).
//!
//! The cache is bounded: it holds at most
//! [`DiskConfig::write_cache_bytes`] of data in 4 KiB blocks (each with a
//! per-sector valid mask), whatever the write pattern; a WRITE larger than
//! the whole cache is written through. Transient buffers (one per command
//! being executed, at most `max_transfer`, and a staging buffer of at most
//! 1 MiB during a write-back) come on top. [`DmaDisk::cache_stats`] reports
//! the occupancy and its peak.
//!
//! Ordering, with any number of workers (one cache per controller, under
//! one lock):
//! * a FLUSH writes back every block cached when it takes the lock, so
//!   every WRITE acknowledged before the FLUSH was submitted, from any
//!   queue or connection, is covered (`NBD_FLAG_CAN_MULTI_CONN`);
//! * a write-through (FUA or oversized) writes the file and drops the
//!   older cached copies of its sectors under the lock, so an older cached
//!   copy can never be written back over it later;
//! * blocks leave the cache only after they are in the file (under the
//!   lock), so a READ sees each sector either in the cache or in the file,
//!   never a stale version from before an acknowledged write.
//!
//! Data still moves only through the DVMA window: a WRITE copies the
//! buffer through the window into the cache ([`Window::dma_read`]), a READ
//! through it out of the cache ([`Window::dma_write`]); an unmapped IOVA
//! still fails that command with `DmaFault`, and a faulting WRITE leaves
//! the cache and the file untouched.
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
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kern::dev::{DiskCmd, DiskController, DiskDone, DiskGeometry};
use kern::intr::IntrHandle;

use super::SECTOR;
use super::engine::{Counters, DeviceStats, Engine, Tuning};
use super::uring::UringEngine;
use crate::dvma::Window;

mod cache;
mod medium;

pub use cache::CacheStats;
use cache::{WriteCache, lock, media};
pub(super) use medium::DiskMedium;

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
    /// A volatile write cache (see the module documentation): WRITEs
    /// without FUA complete once in the controller's memory and reach the
    /// file at FLUSH, when the cache is full, and at `stop`. Default off.
    pub write_cache: bool,
    /// The write cache's capacity, bytes (rounded down to 4 KiB, at least
    /// 4 KiB). Default 16 MiB. Used only with `write_cache`.
    pub write_cache_bytes: usize,
    /// How commands are carried out. Default [`DiskEngine::Threads`].
    pub engine: DiskEngine,
}

/// How a [`DmaDisk`] carries out its commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskEngine {
    /// `workers` host threads, each doing `pread`/`pwrite`/`fdatasync`
    /// (the parent module's engine).
    #[default]
    Threads,
    /// io_uring: the doorbell submits from the calling vCPU, completions
    /// are reaped inline or by one reaper thread (see `dev/uring.rs`).
    /// Refuses `write_cache`; fails `open` where the host has no io_uring.
    Uring,
}

impl DiskEngine {
    /// Every engine.
    pub const ALL: [DiskEngine; 2] = [DiskEngine::Threads, DiskEngine::Uring];

    /// Can this host run the uring engine (io_uring set up and not
    /// disabled)? Makes and drops a small ring. Host context.
    pub fn uring_available() -> bool {
        super::uring::available()
    }

    /// The configuration name (`"threads"`, `"uring"`).
    pub fn name(self) -> &'static str {
        match self {
            DiskEngine::Threads => "threads",
            DiskEngine::Uring => "uring",
        }
    }
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
            write_cache: false,
            write_cache_bytes: 16 << 20,
            engine: DiskEngine::Threads,
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

/// A DMA disk controller on a host file. See the module documentation.
pub struct DmaDisk {
    engine: Eng,
    geometry: DiskGeometry,
    cfg: DiskConfig,
}

/// The engine a disk runs on ([`DiskConfig::engine`]).
enum Eng {
    Threads(Engine<DiskMedium>),
    Uring(UringEngine),
}

impl Eng {
    fn medium(&self) -> &DiskMedium {
        match self {
            Eng::Threads(e) => &e.core().medium,
            Eng::Uring(e) => &e.core().medium,
        }
    }

    fn stats(&self) -> &Counters {
        match self {
            Eng::Threads(e) => &e.core().stats,
            Eng::Uring(e) => &e.core().stats,
        }
    }
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
    /// `workers` is 0, or a thread cannot be started; with
    /// [`DiskEngine::Uring`]: the host has no io_uring (`ENOSYS`, `EPERM`),
    /// or `write_cache` is on (the uring engine has no write cache yet).
    pub fn open(window: &'static Window, cfg: DiskConfig) -> io::Result<Arc<DmaDisk>> {
        let bad_input = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if cfg.max_transfer < SECTOR as usize || !cfg.max_transfer.is_multiple_of(SECTOR as usize) {
            return Err(bad_input(format!(
                "dmadisk: max_transfer {} is not a positive multiple of {SECTOR}",
                cfg.max_transfer
            )));
        }
        if cfg.engine == DiskEngine::Uring && cfg.write_cache && !cfg.read_only {
            return Err(bad_input(format!(
                "dmadisk {}: write_cache = true needs engine = \"threads\" \
                 (the uring engine has no volatile write cache)",
                cfg.path.display()
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
            cache: (cfg.write_cache && !cfg.read_only)
                .then(|| Mutex::new(WriteCache::new(cfg.write_cache_bytes))),
        };
        let tuning = Tuning {
            name: "dmadisk",
            queue_depth: cfg.queue_depth,
            workers: cfg.workers,
            coalesce_count: cfg.coalesce_count,
            coalesce_ns: cfg.coalesce_ns,
            spin_ns: cfg.spin_ns,
        };
        let engine = match cfg.engine {
            DiskEngine::Threads => Eng::Threads(Engine::start(medium, &tuning)?),
            DiskEngine::Uring => Eng::Uring(UringEngine::start(medium, &tuning)?),
        };
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
    ///
    /// With the write cache on, everything cached is then written back
    /// and synced (clean shutdown); a failure is reported on stderr (the
    /// data stays cached, and is lost with the process).
    pub fn stop(&self) {
        match &self.engine {
            Eng::Threads(e) => e.stop(),
            Eng::Uring(e) => e.stop(),
        }
        let m = self.engine.medium();
        if let Some(cache) = &m.cache {
            let mut wc = lock(cache);
            if wc.blocks.is_empty() {
                return;
            }
            let r = wc.write_back_all(&m.file);
            drop(wc);
            if let Err(e) = r.map_err(media).and_then(|()| m.sync(self.engine.stats())) {
                eprintln!(
                    "dmadisk {}: writing back the write cache at stop: {e:?}",
                    self.cfg.path.display()
                );
            }
        }
    }

    /// The write cache's counters, or `None` without a write cache. Host or
    /// thread context (takes the cache's lock).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        let m = self.engine.medium();
        m.cache.as_ref().map(|c| lock(c).stats)
    }

    /// Has `stop` been called?
    pub fn is_stopped(&self) -> bool {
        match &self.engine {
            Eng::Threads(e) => e.core().is_stopping(),
            Eng::Uring(e) => e.core().is_stopping(),
        }
    }

    /// The counters now. Any context.
    pub fn stats(&self) -> DeviceStats {
        self.engine.stats().snapshot()
    }

    /// From now on READ and WRITE commands touching a sector of `lbas`
    /// complete with `MediaError(EIO)` without touching the file (one
    /// range at a time; replaces the previous one). Any context; commands
    /// already executing are not affected.
    pub fn inject_media_error(&self, lbas: Range<u64>) {
        self.engine.medium().bad.set(lbas);
    }

    /// Remove the injected bad range.
    pub fn clear_injection(&self) {
        self.engine.medium().bad.clear();
    }

    /// Delay every command by `d` before executing it (a slow medium; zero
    /// turns it off). Any context.
    pub fn inject_delay(&self, d: Duration) {
        match &self.engine {
            Eng::Threads(e) => e.core().set_delay(d),
            Eng::Uring(e) => e.core().set_delay(d),
        }
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }
}

impl Drop for DmaDisk {
    fn drop(&mut self) {
        self.stop();
    }
}

impl DiskController for DmaDisk {
    fn geometry(&self) -> DiskGeometry {
        self.geometry
    }

    fn submit(&self, cmd: DiskCmd) -> bool {
        match &self.engine {
            Eng::Threads(e) => e.core().submit(cmd),
            Eng::Uring(e) => e.core().submit(cmd),
        }
    }

    fn doorbell(&self) {
        match &self.engine {
            Eng::Threads(e) => e.core().doorbell(),
            Eng::Uring(e) => e.core().doorbell(),
        }
    }

    fn reap(&self) -> Option<DiskDone> {
        match &self.engine {
            Eng::Threads(e) => e.core().reap(),
            Eng::Uring(e) => e.core().reap(),
        }
    }

    fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        match &self.engine {
            Eng::Threads(e) => e.core().set_interrupt(cpu, vector),
            Eng::Uring(e) => e.core().set_interrupt(cpu, vector),
        }
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
