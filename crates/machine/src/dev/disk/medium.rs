//! The medium of a DMA disk: the backing file, seen through the DVMA
//! window. [`DiskMedium`] checks a command before any I/O, executes it
//! (READ, WRITE, FLUSH; through the write cache when there is one) and
//! returns its status; both engines (worker threads, io_uring) run their
//! commands against it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use kern::dev::{DiskCmd, DiskOp, DiskStatus};

use super::super::SECTOR;
use super::super::engine::{Counters, Medium};
use super::Injection;
use super::cache::{Bounce, WriteCache, lock, media};
use crate::dvma::{DmaFault, Window};

/// A disk's backing file and what a command may do to it.
pub(in crate::dev) struct DiskMedium {
    pub(in crate::dev) window: &'static Window,
    pub(in crate::dev) file: File,
    pub(super) sectors: u64,
    pub(super) max_transfer: usize,
    pub(in crate::dev) read_only: bool,
    pub(super) bad: Injection,
    /// The volatile write cache, if configured.
    pub(super) cache: Option<Mutex<WriteCache>>,
}

impl DiskMedium {
    pub(super) fn sync(&self, stats: &Counters) -> Result<(), DiskStatus> {
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

    /// The checks before any I/O of a READ or WRITE (both engines): the
    /// status if it must complete without touching the file.
    pub(in crate::dev) fn precheck(&self, c: &DiskCmd, stats: &Counters) -> Option<DiskStatus> {
        let len = c.nsect as u64 * SECTOR as u64;
        let in_range = c
            .lba
            .checked_add(c.nsect as u64)
            .is_some_and(|e| e <= self.sectors);
        if c.nsect == 0 || len > self.max_transfer as u64 || !in_range {
            return Some(DiskStatus::Invalid);
        }
        if c.op == DiskOp::Write && self.read_only {
            return Some(DiskStatus::MediaError(libc::EROFS));
        }
        if self.bad.hits(c.lba, c.nsect as u64) {
            Counters::inc(&stats.injected);
            return Some(DiskStatus::MediaError(libc::EIO));
        }
        None
    }

    fn transfer(&self, c: &DiskCmd, stats: &Counters) -> DiskStatus {
        let write = c.op == DiskOp::Write;
        let len = c.nsect as u64 * SECTOR as u64;
        if let Some(s) = self.precheck(c, stats) {
            return s;
        }
        if let Some(cache) = &self.cache {
            return if write {
                self.write_cached(cache, c, len as usize, stats)
            } else {
                self.read_cached(cache, c, len as usize, stats)
            };
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

impl DiskMedium {
    /// A WRITE with the cache on: through the window into the controller's
    /// memory, then into the cache, or through to the file (FUA, or larger
    /// than the cache).
    fn write_cached(
        &self,
        cache: &Mutex<WriteCache>,
        c: &DiskCmd,
        len: usize,
        stats: &Counters,
    ) -> DiskStatus {
        let mut buf = Bounce::new(len);
        match self.window.dma_read(c.iova, buf.bytes_mut()) {
            Ok(()) => {}
            Err(DmaFault::Unmapped { .. }) => return DiskStatus::DmaFault,
            Err(DmaFault::Io { errno }) => return DiskStatus::MediaError(errno),
        }
        let n = c.nsect as u64;
        let mut wc = lock(cache);
        if c.fua || WriteCache::blocks_of(c.lba, n).count() > wc.cap {
            // Through: the file first, then the older cached copies go,
            // both under the lock (a READ finds the sectors in one or the
            // other; no write-back can put an older copy over this one).
            if let Err(e) = self.file.write_all_at(buf.bytes(), c.lba * SECTOR as u64) {
                return media(e);
            }
            wc.discard(c.lba, n);
            wc.stats.write_through += 1;
            drop(wc);
            Counters::add(&stats.bytes_written, len as u64);
            if c.fua
                && let Err(s) = self.sync(stats)
            {
                return s;
            }
            return DiskStatus::Ok;
        }
        if let Err(e) = wc.make_room(&self.file, c.lba, n) {
            return media(e);
        }
        wc.insert(c.lba, n, buf.bytes());
        wc.stats.cached_writes += 1;
        drop(wc);
        Counters::add(&stats.bytes_written, len as u64);
        DiskStatus::Ok
    }

    /// A READ with the cache on: straight from the file when nothing of the
    /// range is cached, else the file's sectors with the cached ones laid
    /// over them, through the window.
    fn read_cached(
        &self,
        cache: &Mutex<WriteCache>,
        c: &DiskCmd,
        len: usize,
        stats: &Counters,
    ) -> DiskStatus {
        let n = c.nsect as u64;
        let off = c.lba * SECTOR as u64;
        let mut wc = lock(cache);
        let r = if !wc.overlaps(c.lba, n) {
            drop(wc);
            // A sector not cached now is in the file: blocks leave the
            // cache only after they were written (under the lock).
            self.window.pread(self.file.as_raw_fd(), off, c.iova, len)
        } else {
            let mut buf = Bounce::new(len);
            let mut hit = vec![false; c.nsect as usize];
            wc.overlay(c.lba, n, buf.bytes_mut(), &mut hit);
            drop(wc);
            let sec = SECTOR as usize;
            let mut i = 0;
            while i < hit.len() {
                if hit[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < hit.len() && !hit[i] {
                    i += 1;
                }
                if let Err(e) = self.file.read_exact_at(
                    &mut buf.bytes_mut()[start * sec..i * sec],
                    off + (start * sec) as u64,
                ) {
                    return media(e);
                }
            }
            self.window.dma_write(c.iova, buf.bytes())
        };
        match r {
            Ok(()) => {
                Counters::add(&stats.bytes_read, len as u64);
                DiskStatus::Ok
            }
            Err(DmaFault::Unmapped { .. }) => DiskStatus::DmaFault,
            Err(DmaFault::Io { errno }) => DiskStatus::MediaError(errno),
        }
    }

    /// FLUSH, and `stop`: write the cache back, then `fdatasync`.
    fn flush(&self, stats: &Counters) -> Result<(), DiskStatus> {
        if let Some(cache) = &self.cache {
            // Everything acknowledged before the FLUSH was submitted is in
            // the cache now, whichever worker cached it.
            lock(cache).write_back_all(&self.file).map_err(media)?;
        }
        self.sync(stats)
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
                match self.flush(stats) {
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
