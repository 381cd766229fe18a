//! The controller's volatile write cache (`DiskConfig::write_cache`; the
//! parent module's docs say what it promises): 4 KiB blocks with a
//! per-sector valid mask, bounded by `write_cache_bytes`, written back
//! oldest first, in contiguous runs of up to 1 MiB ([`Stager`]); and the
//! page-aligned controller memory ([`Bounce`]) commands and write-backs
//! move data through.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use kern::dev::DiskStatus;

use super::super::SECTOR;

/// Bytes per write-cache block.
pub(super) const CBLOCK: usize = 4096;
/// Sectors per write-cache block.
pub(super) const SPB: u64 = (CBLOCK / SECTOR as usize) as u64;
/// Largest single file write of a write-back (contiguous blocks are
/// gathered up to this).
const STAGE: usize = 1 << 20;

/// One page of memory, page aligned (so that the file may be `O_DIRECT`).
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
pub(super) struct Page([u8; CBLOCK]);

/// A zeroed, page-aligned buffer of `len` bytes: the controller's memory
/// for one command or one write-back.
pub(super) struct Bounce {
    pages: Vec<Page>,
    len: usize,
}

impl Bounce {
    pub(super) fn new(len: usize) -> Self {
        Bounce {
            pages: vec![Page([0; CBLOCK]); len.div_ceil(CBLOCK)],
            len,
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: `pages` holds `len.div_ceil(CBLOCK) * CBLOCK >= len`
        // initialised bytes (a `Page` is plain bytes, no padding), borrowed
        // immutably with `self`.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// A cached block: its data and which of its sectors hold data.
pub(super) struct CacheBlock {
    pub(super) data: Box<Page>,
    /// Bit `i`: sector `i` of the block is cached.
    pub(super) valid: u8,
    /// When it was last written (key in `WriteCache::order`).
    pub(super) seq: u64,
}

/// The counters of a disk's write cache ([`super::DmaDisk::cache_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Capacity, bytes.
    pub limit_bytes: u64,
    /// Bytes held now (whole 4 KiB blocks).
    pub cached_bytes: u64,
    /// The most ever held.
    pub peak_bytes: u64,
    /// WRITEs acknowledged from the cache.
    pub cached_writes: u64,
    /// WRITEs written through (FUA, or larger than the cache).
    pub write_through: u64,
    /// Blocks destaged to the file because the cache was full.
    pub destaged_blocks: u64,
    /// Blocks written back by FLUSH and `stop`.
    pub written_back_blocks: u64,
    /// Sectors READs took from the cache.
    pub read_hit_sectors: u64,
}

/// The volatile write cache: block number -> block, oldest first in
/// `order`. Bounded by `cap` blocks.
pub(super) struct WriteCache {
    pub(super) blocks: BTreeMap<u64, CacheBlock>,
    pub(super) order: BTreeMap<u64, u64>,
    pub(super) next_seq: u64,
    pub(super) cap: usize,
    pub(super) stats: CacheStats,
}

/// The sectors of block `b` inside `[lba, lba + n)`, as a range of sector
/// indexes within the block.
pub(super) fn in_block(b: u64, lba: u64, n: u64) -> Range<u64> {
    let lo = lba.max(b * SPB) - b * SPB;
    let hi = (lba + n).min((b + 1) * SPB) - b * SPB;
    lo..hi
}

pub(super) fn mask(r: &Range<u64>) -> u8 {
    (((1u16 << r.end) - (1u16 << r.start)) & 0xff) as u8
}

pub(super) fn media(e: io::Error) -> DiskStatus {
    DiskStatus::MediaError(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Gathers contiguous runs of sectors into one file write.
pub(super) struct Stager<'a> {
    file: &'a File,
    buf: Bounce,
    off: u64,
    len: usize,
}

impl Stager<'_> {
    pub(super) fn push(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        if self.len > 0 && (off != self.off + self.len as u64 || self.len + data.len() > STAGE) {
            self.emit()?;
        }
        if self.len == 0 {
            self.off = off;
        }
        self.buf.bytes_mut()[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
        Ok(())
    }

    pub(super) fn emit(&mut self) -> io::Result<()> {
        if self.len > 0 {
            self.file
                .write_all_at(&self.buf.bytes()[..self.len], self.off)?;
            self.len = 0;
        }
        Ok(())
    }
}

impl WriteCache {
    pub(super) fn new(bytes: usize) -> Self {
        let cap = (bytes / CBLOCK).max(1);
        WriteCache {
            blocks: BTreeMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            cap,
            stats: CacheStats {
                limit_bytes: (cap * CBLOCK) as u64,
                ..CacheStats::default()
            },
        }
    }

    pub(super) fn blocks_of(lba: u64, n: u64) -> Range<u64> {
        lba / SPB..(lba + n).div_ceil(SPB)
    }

    /// Blocks of `[lba, lba + n)` not cached now.
    pub(super) fn missing(&self, lba: u64, n: u64) -> usize {
        Self::blocks_of(lba, n)
            .filter(|b| !self.blocks.contains_key(b))
            .count()
    }

    /// Write blocks `nums` (ascending) to the file, then drop them. On an
    /// error they all stay cached.
    pub(super) fn write_out(&mut self, file: &File, nums: &[u64]) -> io::Result<()> {
        let total = nums.len() * CBLOCK;
        let mut st = Stager {
            file,
            buf: Bounce::new(total.min(STAGE)),
            off: 0,
            len: 0,
        };
        for b in nums {
            let blk = &self.blocks[b];
            let mut i = 0;
            while i < SPB {
                if blk.valid & (1 << i) == 0 {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < SPB && blk.valid & (1 << i) != 0 {
                    i += 1;
                }
                let (s, e) = (
                    start as usize * SECTOR as usize,
                    i as usize * SECTOR as usize,
                );
                st.push((b * SPB + start) * SECTOR as u64, &blk.data.0[s..e])?;
            }
        }
        st.emit()?;
        for b in nums {
            if let Some(blk) = self.blocks.remove(b) {
                self.order.remove(&blk.seq);
            }
        }
        self.note_size();
        Ok(())
    }

    /// Write everything back (FLUSH, stop).
    pub(super) fn write_back_all(&mut self, file: &File) -> io::Result<()> {
        let nums: Vec<u64> = self.blocks.keys().copied().collect();
        self.write_out(file, &nums)?;
        self.stats.written_back_blocks += nums.len() as u64;
        Ok(())
    }

    /// Destage the oldest blocks until `need` more fit (and then some, so
    /// that a stream of writes destages in batches).
    pub(super) fn make_room(&mut self, file: &File, lba: u64, n: u64) -> io::Result<()> {
        loop {
            let need = self.missing(lba, n);
            if self.blocks.len() + need <= self.cap {
                return Ok(());
            }
            let want = (self.blocks.len() + need - self.cap)
                .max(self.cap / 8)
                .max(1);
            let mut nums: Vec<u64> = self.order.values().take(want).copied().collect();
            nums.sort_unstable();
            self.write_out(file, &nums)?;
            self.stats.destaged_blocks += nums.len() as u64;
        }
    }

    /// Put `data` (sectors `[lba, lba + n)`) in the cache; there is room.
    pub(super) fn insert(&mut self, lba: u64, n: u64, data: &[u8]) {
        for b in Self::blocks_of(lba, n) {
            let r = in_block(b, lba, n);
            let seq = self.next_seq;
            self.next_seq += 1;
            let blk = self.blocks.entry(b).or_insert_with(|| CacheBlock {
                data: Box::new(Page([0; CBLOCK])),
                valid: 0,
                seq,
            });
            self.order.remove(&blk.seq);
            blk.seq = seq;
            self.order.insert(seq, b);
            let src = ((b * SPB + r.start - lba) * SECTOR as u64) as usize;
            let (s, e) = (
                r.start as usize * SECTOR as usize,
                r.end as usize * SECTOR as usize,
            );
            blk.data.0[s..e].copy_from_slice(&data[src..src + e - s]);
            blk.valid |= mask(&r);
        }
        self.note_size();
    }

    /// Forget the cached copies of sectors `[lba, lba + n)` (they were
    /// just written through).
    pub(super) fn discard(&mut self, lba: u64, n: u64) {
        for b in Self::blocks_of(lba, n) {
            let Some(blk) = self.blocks.get_mut(&b) else {
                continue;
            };
            blk.valid &= !mask(&in_block(b, lba, n));
            if blk.valid == 0 {
                let seq = blk.seq;
                self.blocks.remove(&b);
                self.order.remove(&seq);
            }
        }
        self.note_size();
    }

    /// Copy the cached sectors of `[lba, lba + n)` into `out` (the range's
    /// bytes), marking them in `hit`. Returns how many were cached.
    pub(super) fn overlay(&mut self, lba: u64, n: u64, out: &mut [u8], hit: &mut [bool]) -> u64 {
        let mut found = 0;
        let range = Self::blocks_of(lba, n);
        for (&b, blk) in self.blocks.range(range) {
            for i in in_block(b, lba, n) {
                if blk.valid & (1 << i) == 0 {
                    continue;
                }
                let k = (b * SPB + i - lba) as usize;
                let sec = SECTOR as usize;
                out[k * sec..(k + 1) * sec]
                    .copy_from_slice(&blk.data.0[i as usize * sec..(i as usize + 1) * sec]);
                hit[k] = true;
                found += 1;
            }
        }
        self.stats.read_hit_sectors += found;
        found
    }

    pub(super) fn overlaps(&self, lba: u64, n: u64) -> bool {
        self.blocks.range(Self::blocks_of(lba, n)).next().is_some()
    }

    pub(super) fn note_size(&mut self) {
        let now = (self.blocks.len() * CBLOCK) as u64;
        self.stats.cached_bytes = now;
        self.stats.peak_bytes = self.stats.peak_bytes.max(now);
    }
}

pub(super) fn lock(cache: &Mutex<WriteCache>) -> MutexGuard<'_, WriteCache> {
    cache.lock().unwrap_or_else(PoisonError::into_inner)
}
