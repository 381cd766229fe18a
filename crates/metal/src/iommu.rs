//! [`SoftIommu`]: the `kern::iommu::Iommu` of a machine without one.
//!
//! **It protects nothing from the device.** Without VT-d (`--iommu vtd`
//! gives [`crate::vtd::Vtd`] instead) a device that does DMA (virtio-blk)
//! sees physical addresses and can reach all of RAM. What this gives kern's `bus_dma` is
//! the translation it needs to work: `enter` writes IOVA page -> physical
//! page (and the device's rights) into a flat table, `remove` clears it,
//! and the *driver* looks each command's IOVA range up here
//! ([`SoftIommu::translate`]) to build the physical addresses it gives the
//! device. A command naming an IOVA that is not mapped (or not with the
//! rights it needs) fails with a DMA fault before the device sees it, so
//! the driver's side of every DVMA mode is exercised (strict really
//! removes, lazy removes in batches, slots and permanent leave entries),
//! but the modes differ only in this bookkeeping: the device itself is
//! never stopped.
//!
//! The table is a static array of words (one per 4 KiB IOVA page of a
//! [`WINDOW`]-byte space), so `enter`, `remove` and `translate` are atomic
//! stores and loads: any context, no lock, no allocation.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use kern::iommu::{DmaAccess, IOPAGE, Iommu, IommuError, Iova};
use kern::vm::Paddr;

/// Bytes of IOVA space.
pub const WINDOW: u64 = 64 << 20;
const PAGES: usize = (WINDOW / IOPAGE as u64) as usize;

/// The device may read the page (a write to the disk).
const DEV_READ: u64 = 1;
/// The device may write the page (a read from the disk).
const DEV_WRITE: u64 = 2;

/// The translation table (see the module docs).
#[derive(Debug)]
pub struct SoftIommu {
    table: [AtomicU64; PAGES],
    /// The physical address of kern's physical address 0 (kern's
    /// physical memory is a block of the identity-mapped heap).
    base: AtomicUsize,
    /// Translations refused by [`SoftIommu::translate`].
    pub faults: AtomicU64,
}

/// The one table.
pub static SOFT_IOMMU: SoftIommu = SoftIommu {
    table: [const { AtomicU64::new(0) }; PAGES],
    base: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
};

impl SoftIommu {
    /// Set where kern's physical memory starts (boot, before kern).
    pub fn set_base(&self, base: usize) {
        self.base.store(base, Relaxed);
    }

    /// Where kern's physical memory starts.
    pub fn base(&self) -> usize {
        self.base.load(Relaxed)
    }

    /// Translate `[iova, iova + len)` for a device that `writes` memory
    /// (or reads it), calling `seg(physical address, bytes)` for each
    /// physically contiguous piece in order. `false` (and a fault counted)
    /// if a page is unmapped or lacks the right; `seg` may then have been
    /// called for a prefix. Any context.
    pub fn translate(
        &self,
        iova: Iova,
        len: usize,
        writes: bool,
        mut seg: impl FnMut(u64, usize),
    ) -> bool {
        let need = if writes { DEV_WRITE } else { DEV_READ };
        let (mut at, end) = (iova.get(), iova.get() + len as u64);
        let mut cur: Option<(u64, usize)> = None;
        while at < end {
            let page = (at / IOPAGE as u64) as usize;
            let e = match self.table.get(page) {
                Some(e) => e.load(Relaxed),
                None => 0,
            };
            if e & need == 0 {
                self.faults.fetch_add(1, Relaxed);
                return false;
            }
            let off = at % IOPAGE as u64;
            let n = ((IOPAGE as u64 - off).min(end - at)) as usize;
            let pa = (e & !(IOPAGE as u64 - 1)) + off;
            cur = match cur {
                Some((p, l)) if p + l as u64 == pa => Some((p, l + n)),
                Some((p, l)) => {
                    seg(p, l);
                    Some((pa, n))
                }
                None => Some((pa, n)),
            };
            at += n as u64;
        }
        if let Some((p, l)) = cur {
            seg(p, l);
        }
        true
    }
}

impl Iommu for SoftIommu {
    fn size(&self) -> u64 {
        WINDOW
    }

    fn enter(
        &self,
        iova: Iova,
        pa: Paddr,
        len: usize,
        access: DmaAccess,
    ) -> Result<(), IommuError> {
        IommuError::check(iova, len, WINDOW)?;
        let rights = match access {
            DmaAccess::Read => DEV_READ,
            DmaAccess::Write => DEV_WRITE,
            DmaAccess::ReadWrite => DEV_READ | DEV_WRITE,
        };
        let phys = self.base.load(Relaxed) as u64 + pa.get();
        let first = (iova.get() / IOPAGE as u64) as usize;
        for i in 0..len.div_ceil(IOPAGE) {
            self.table[first + i].store((phys + (i * IOPAGE) as u64) | rights, Relaxed);
        }
        Ok(())
    }

    fn remove(&self, iova: Iova, len: usize) {
        let first = (iova.get() / IOPAGE as u64) as usize;
        for i in 0..len.div_ceil(IOPAGE) {
            if let Some(e) = self.table.get(first + i) {
                e.store(0, Relaxed);
            }
        }
    }
}
