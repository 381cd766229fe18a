//! `RamDisk`: a DMA disk controller with a zero-latency medium.
//!
//! Commands complete at once, from memory, on the doorbell: the vCPU that
//! rings it copies each command's data between the medium (a memfd, sized
//! at `open`) and `window + iova` with one `pread`/`pwrite` of the memfd,
//! queues the completion and posts the interrupt on itself. There is no
//! device thread, no host hand-off and no wait: what a closed loop on this
//! disk measures is the kernel's own cost per I/O (driver, `bus_dma`,
//! interrupt, completion mode), plus one 4 KiB copy by the host kernel.
//!
//! Data still moves only through the DVMA window: the host kernel copies
//! through the process's page tables at the time of the command, so an
//! unmapped (or, for a READ, read-only) IOVA page fails the command with
//! [`DiskStatus::DmaFault`], exactly as with [`super::DmaDisk`]; the
//! window's fault counter counts it.
//!
//! # Who may call what, from which context
//!
//! | call | context | |
//! |---|---|---|
//! | `submit`, `doorbell`, `reap`, `set_interrupt` ([`DiskController`]) | **any**: kernel thread, soft or hard interrupt handler, host thread | atomics; `doorbell` also one `pread`/`pwrite` per command (system calls that allocate nothing in this process; `errno` is saved by the signal entry; the zero-filling path of [`Window::pread`] past the end of a file, which allocates, is never taken: commands are range-checked against the memfd's fixed size first) |
//! | `stats` | any | atomics |
//! | [`RamDisk::open`] | host or kernel thread (attach) | creates the memfd and the rings |
//! | [`RamDisk::stop`] | host or kernel thread | refuses new commands; idempotent |
//!
//! # The doorbell's holder
//! The doorbell may run in a kernel thread and, on top of it on the same
//! vCPU, in an interrupt handler (sd in `intr` mode starts its next
//! commands from its completion). The rings are lock-free and the work of
//! a doorbell has one *holder* at a time, taken with an atomic swap that
//! never waits: whoever finds it held raises `pending` and returns, and
//! the holder runs another round while `pending` is set, then looks once
//! more after letting go (a Dekker handshake, SeqCst), as the io_uring
//! engine does. The completions of a round are posted after the holder
//! lets go, to the vCPU that rang ([`kern::intr::intr_post_inline`]: taken
//! right there, or by the `splx` that lowers the IPL, without a signal),
//! or, from a host thread, to the CPU given by `set_interrupt`.
//!
//! # Stopping
//! After `stop`, `submit` refuses and the medium's pages are freed (the
//! data is gone); commands already submitted were
//! completed by their doorbell (a command submitted and never rung for is
//! completed with `MediaError(ESHUTDOWN)` by `stop`). Stop the disk before
//! the machine shuts down.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};

use crossbeam_queue::ArrayQueue;
use kern::dev::{DiskCmd, DiskController, DiskDone, DiskGeometry, DiskOp, DiskStatus};
use kern::intr::IntrHandle;

use super::SECTOR;
use super::engine::{Counters, DeviceStats, IntrTarget, reserve};
use crate::dvma::{DmaFault, Window};

/// How to build a [`RamDisk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamDiskConfig {
    /// Size of the medium, bytes (rounded down to sectors; at least one).
    pub size_bytes: u64,
    /// Largest transfer of one command, bytes (a multiple of 512).
    pub max_transfer: usize,
    /// Commands outstanding at once.
    pub queue_depth: u16,
}

impl RamDiskConfig {
    /// A medium of `size_bytes`, 1 MiB transfers, queue depth 64 (the
    /// DMA disk's defaults).
    pub fn new(size_bytes: u64) -> Self {
        Self {
            size_bytes,
            max_transfer: 1 << 20,
            queue_depth: 64,
        }
    }
}

/// A zero-latency DMA disk controller. See the module documentation.
pub struct RamDisk {
    window: &'static Window,
    medium: File,
    geometry: DiskGeometry,
    stats: Counters,
    sq: ArrayQueue<DiskCmd>,
    cq: ArrayQueue<DiskDone>,
    depth: u32,
    outstanding: AtomicU32,
    stopping: AtomicBool,
    /// A doorbell is working the rings.
    busy: AtomicBool,
    /// A doorbell came while `busy`: run another round.
    pending: AtomicBool,
    target: IntrTarget,
}

impl RamDisk {
    /// A zero-filled medium of `cfg.size_bytes` in a memfd, reached by the
    /// device through `window`. Host or thread context.
    ///
    /// Errors: `max_transfer` is not a positive multiple of 512, the size
    /// is below one sector, the queue depth is 0, or the memfd cannot be
    /// made.
    pub fn open(window: &'static Window, cfg: RamDiskConfig) -> io::Result<Arc<RamDisk>> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let sect = SECTOR as usize;
        if cfg.max_transfer < sect || !cfg.max_transfer.is_multiple_of(sect) {
            return Err(bad(format!(
                "ramdisk: max_transfer {} is not a positive multiple of {SECTOR}",
                cfg.max_transfer
            )));
        }
        let sectors = cfg.size_bytes / SECTOR as u64;
        if sectors == 0 || cfg.queue_depth == 0 {
            return Err(bad(format!(
                "ramdisk: size {} and queue depth {} must hold a sector and a command",
                cfg.size_bytes, cfg.queue_depth
            )));
        }
        // SAFETY: a static C string name; valid flags.
        let fd = unsafe { libc::memfd_create(c"dvma-ramdisk".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is our fresh memfd, owned by nobody else.
        let medium = unsafe { File::from_raw_fd(fd) };
        medium.set_len(sectors * SECTOR as u64)?;
        let depth = cfg.queue_depth as usize;
        Ok(Arc::new(RamDisk {
            window,
            medium,
            geometry: DiskGeometry {
                sectors,
                sector_size: SECTOR,
                max_transfer: cfg.max_transfer,
                queue_depth: cfg.queue_depth,
            },
            stats: Counters::default(),
            sq: ArrayQueue::new(depth),
            cq: ArrayQueue::new(depth),
            depth: depth as u32,
            outstanding: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            target: IntrTarget::new(),
        }))
    }

    /// A `&'static` reference for a kernel driver. The disk is never
    /// freed; [`RamDisk::stop`] must still be called before the machine
    /// shuts down.
    pub fn leak(this: Arc<Self>) -> &'static RamDisk {
        let b: &'static Arc<RamDisk> = Box::leak(Box::new(this));
        b
    }

    /// Refuse new commands; complete those submitted and never rung for
    /// with `MediaError(ESHUTDOWN)` and post once for them; give the
    /// medium's memory back to the host (its data is gone: a disk is
    /// [`leak`](RamDisk::leak)ed for its driver, so without this every
    /// disk ever opened would keep its medium resident to the end of the
    /// process, 64 MiB per boot of `bench kernel`). Idempotent. Host or
    /// thread context.
    pub fn stop(&self) {
        self.stopping.store(true, SeqCst);
        // A doorbell's holder still in `execute` may write one more page
        // after this: the medium keeps its size, so that page is simply
        // allocated again (and a read of a hole reads zeros).
        // SAFETY: our own memfd; punching a hole only frees its pages.
        unsafe {
            libc::fallocate(
                self.medium.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                self.geometry.sectors as libc::off_t * SECTOR as libc::off_t,
            );
        }
        let mut aborted = false;
        while let Some(c) = self.sq.pop() {
            self.push_done(DiskDone {
                id: c.id,
                status: DiskStatus::MediaError(libc::ESHUTDOWN),
            });
            Counters::inc(&self.stats.aborted);
            aborted = true;
        }
        if aborted {
            self.signal();
        }
    }

    /// Bytes of the medium the host holds in memory now (pages written
    /// and not yet given back by [`RamDisk::stop`]). Host or thread
    /// context (one `fstat`).
    pub fn resident_bytes(&self) -> u64 {
        self.medium
            .metadata()
            .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
    }

    /// The counters now (the DMA disk's set). Any context.
    pub fn stats(&self) -> DeviceStats {
        self.stats.snapshot()
    }

    fn reserve(&self) -> bool {
        reserve(&self.outstanding, self.depth)
    }

    fn push_done(&self, d: DiskDone) {
        // Never full: at most `depth` commands are outstanding.
        if self.cq.push(d).is_ok() {
            Counters::inc(&self.stats.completed);
        }
    }

    /// Carry out one READ or WRITE (or FLUSH: nothing to make durable).
    fn execute(&self, c: &DiskCmd) -> DiskStatus {
        let s = &self.stats;
        if c.op == DiskOp::Flush {
            Counters::inc(&s.flushes);
            return DiskStatus::Ok;
        }
        let write = c.op == DiskOp::Write;
        Counters::inc(if write { &s.writes } else { &s.reads });
        let len = c.nsect as u64 * SECTOR as u64;
        let in_range = c
            .lba
            .checked_add(c.nsect as u64)
            .is_some_and(|e| e <= self.geometry.sectors);
        if c.nsect == 0 || len > self.geometry.max_transfer as u64 || !in_range {
            return DiskStatus::Invalid;
        }
        let fd = self.medium.as_raw_fd();
        let off = c.lba * SECTOR as u64;
        let r = if write {
            self.window.pwrite(fd, off, c.iova, len as usize)
        } else {
            self.window.pread(fd, off, c.iova, len as usize)
        };
        match r {
            Ok(()) => {
                Counters::add(
                    if write {
                        &s.bytes_written
                    } else {
                        &s.bytes_read
                    },
                    len,
                );
                DiskStatus::Ok
            }
            Err(DmaFault::Unmapped { .. }) => DiskStatus::DmaFault,
            Err(DmaFault::Io { errno }) => DiskStatus::MediaError(errno),
        }
    }

    /// Post the interrupt: to the calling vCPU, without a signal, or from
    /// a host thread to the `set_interrupt` CPU.
    fn signal(&self) {
        let Some((cpu, h)) = self.target.get() else {
            return;
        };
        match kern::kernel::try_kernel() {
            Some(k) if cpu < k.ncpu() => {
                let here = kern::cpu::curcpu_opt().map_or(cpu, |c| c.index());
                // Counted before it is posted (as the DMA disk's).
                Counters::inc(&self.stats.interrupts);
                kern::intr::intr_post_inline(here, h);
            }
            _ => Counters::inc(&self.stats.interrupts_dropped),
        }
    }

    /// Work the rings until no doorbell is pending. Any context.
    fn kick(&self) {
        self.pending.store(true, SeqCst);
        loop {
            if self.busy.swap(true, SeqCst) {
                return; // the holder runs another round for us
            }
            let mut n = 0u32;
            while self.pending.swap(false, SeqCst) {
                while let Some(c) = self.sq.pop() {
                    let status = self.execute(&c);
                    Counters::inc(match status {
                        DiskStatus::Ok => &self.stats.ok,
                        DiskStatus::DmaFault => &self.stats.dma_faults,
                        DiskStatus::MediaError(_) => &self.stats.media_errors,
                        DiskStatus::Invalid => &self.stats.invalid,
                    });
                    self.push_done(DiskDone { id: c.id, status });
                    n += 1;
                }
            }
            self.busy.store(false, SeqCst);
            if n > 0 {
                self.signal();
            }
            if !self.pending.load(SeqCst) {
                return;
            }
        }
    }
}

impl DiskController for RamDisk {
    fn geometry(&self) -> DiskGeometry {
        self.geometry
    }

    fn submit(&self, cmd: DiskCmd) -> bool {
        let ok = !self.stopping.load(SeqCst)
            && self.reserve()
            && match self.sq.push(cmd) {
                Ok(()) => true,
                Err(_) => {
                    self.outstanding.fetch_sub(1, SeqCst);
                    false
                }
            };
        Counters::inc(if ok {
            &self.stats.submitted
        } else {
            &self.stats.refused
        });
        ok
    }

    fn doorbell(&self) {
        Counters::inc(&self.stats.doorbells);
        self.kick();
    }

    fn reap(&self) -> Option<DiskDone> {
        let d = self.cq.pop()?;
        self.outstanding.fetch_sub(1, SeqCst);
        Some(d)
    }

    fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        self.target.set(cpu, vector);
        if !self.cq.is_empty() {
            self.signal();
        }
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for RamDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamDisk")
            .field("geometry", &self.geometry)
            .finish()
    }
}
