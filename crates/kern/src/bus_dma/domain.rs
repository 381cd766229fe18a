//! The machine's IOMMU domain: the DVMA window, its IOVA arena, the page
//! counters of every tag, and the pool shared by `permanent` and `shadow`.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, Ordering::*};

use super::pool::DmaPool;
use super::{DmaError, DmaTag, MAX_TAGS, pages};
use crate::iommu::{DmaAccess, IOPAGE, Iommu, Iova, IovaArena};
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::lock::SpinMutex;
use crate::once::{Once, Registry};
use crate::softint::SoftintHandle;
use crate::vm::Paddr;

/// The machine's IOMMU domain: the window and its IOVA arena.
pub struct Domain {
    /// Every tag created since boot.
    pub(super) tags: Registry<&'static DmaTag, MAX_TAGS>,
    /// The `busdma` soft interrupt (established with the first tag).
    pub(super) softint: Once<SoftintHandle>,
    iommu: &'static dyn Iommu,
    /// IOVA allocator.
    pub iova: IovaArena,
    pool: SpinMutex<Option<&'static DmaPool>>,
    /// Pages mapped in the window now (all tags).
    pub pages_mapped: AtomicU64,
    /// The most ever mapped.
    pub pages_peak: AtomicU64,
}

impl Domain {
    /// The domain of `iommu`, for `ncpu` CPUs (IOVA 0 is never used).
    pub fn new(iommu: &'static dyn Iommu, ncpu: usize) -> Self {
        let size = iommu.size();
        Self {
            tags: Registry::new(),
            softint: Once::new(),
            iommu,
            iova: IovaArena::new(Iova(IOPAGE as u64), size - IOPAGE as u64, ncpu),
            pool: SpinMutex::new(Ipl::None, None),
            pages_mapped: AtomicU64::new(0),
            pages_peak: AtomicU64::new(0),
        }
    }

    /// The shared pool, made and mapped ("grab the pages at attach time")
    /// on first use with `bytes`. Thread or host context.
    pub(super) fn shared_pool(&self, bytes: usize) -> Result<&'static DmaPool, DmaError> {
        let mut g = self.pool.lock();
        if let Some(p) = *g {
            return Ok(p);
        }
        let k = kernel();
        let phys = k
            .physmem()
            .alloc(bytes)
            .ok_or(DmaError::NoSpace { len: bytes })?;
        let iova = match self.iova.alloc(phys.len) {
            Ok(i) => i,
            Err(_) => {
                k.physmem().free(phys);
                return Err(DmaError::NoSpace { len: phys.len });
            }
        };
        let tags = (phys.len / IOPAGE / 2).max(64);
        let arena = vmem::Vmem::new(phys.pa.get(), phys.len as u64, IOPAGE as u64, tags)
            .map_err(|_| DmaError::NoSpace { len: phys.len })?;
        self.iommu
            .enter(iova, phys.pa, phys.len, DmaAccess::ReadWrite)
            .map_err(DmaError::Iommu)?;
        self.held(pages(phys.len));
        let p: &'static DmaPool = Box::leak(Box::new(DmaPool {
            phys,
            iova,
            arena: SpinMutex::new(Ipl::Vm, arena),
        }));
        *g = Some(p);
        Ok(p)
    }

    pub(super) fn enter(
        &self,
        tag: &DmaTag,
        iova: Iova,
        pa: Paddr,
        len: usize,
        a: DmaAccess,
    ) -> Result<(), DmaError> {
        self.iommu
            .enter(iova, pa, len, a)
            .map_err(DmaError::Iommu)?;
        tag.stats.enters.fetch_add(1, Relaxed);
        Ok(())
    }

    pub(super) fn remove(&self, tag: &DmaTag, iova: Iova, len: usize) {
        self.iommu.remove(iova, len);
        tag.stats.removes.fetch_add(1, Relaxed);
    }

    pub(super) fn held(&self, delta: i64) {
        let v = if delta >= 0 {
            self.pages_mapped.fetch_add(delta as u64, Relaxed) + delta as u64
        } else {
            self.pages_mapped.fetch_sub((-delta) as u64, Relaxed) - (-delta) as u64
        };
        self.pages_peak.fetch_max(v, Relaxed);
    }
}
