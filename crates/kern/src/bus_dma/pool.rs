//! `permanent` and `shadow`: the domain's pool, mapped once at attach.
//!
//! `permanent` loads a buffer that comes from the pool and writes no PTE;
//! `shadow` loads any buffer by taking a bounce buffer from the pool, and
//! copies between the two at sync time.

use core::sync::atomic::Ordering::*;

use super::{DmaDir, DmaError, DmaSeg, DmaTag, How, LoadError, Loaded, SyncOp, tags};
use crate::iommu::{IOPAGE, Iova};
use crate::kernel::kernel;
use crate::lock::SpinMutex;
use crate::vm::{BufSource, IoBuf, Paddr, PhysRange};

/// The domain's pool of physical memory, mapped once when the first
/// `permanent` or `shadow` tag attaches and shared by every such tag (one
/// IOMMU, one permanently mapped pool: a buffer from it can be given to any
/// of their devices, as ccd does across its components).
pub struct DmaPool {
    pub(super) phys: PhysRange,
    pub(super) iova: Iova,
    pub(super) arena: SpinMutex<vmem::Vmem>,
}

impl BufSource for DmaPool {
    fn release(&self, r: PhysRange) {
        let _ = self.arena.lock().free(r.pa.get(), r.len as u64);
        for t in tags() {
            if t.kind.pool().is_some() {
                t.space_freed();
            }
        }
    }
    fn kva(&self, pa: Paddr) -> *mut u8 {
        kernel().physmem().kva(pa)
    }
}

impl DmaPool {
    pub(super) fn alloc(&self, len: usize) -> Option<PhysRange> {
        let len = len.max(1).div_ceil(IOPAGE) * IOPAGE;
        let pa = self
            .arena
            .lock()
            .alloc(len as u64, vmem::AllocPolicy::BestFit)
            .ok()?;
        Some(PhysRange { pa: Paddr(pa), len })
    }

    fn contains(&self, r: PhysRange) -> bool {
        r.pa >= self.phys.pa && r.pa + r.len <= self.phys.pa + self.phys.len
    }

    /// Its size in pages.
    pub fn pages(&self) -> u64 {
        (self.phys.len / IOPAGE) as u64
    }
}

/// `permanent`: the buffer must come from the pool; its IOVA is fixed.
#[inline]
pub(super) fn load_permanent(
    p: &'static DmaPool,
    out: &mut Option<Loaded>,
    buf: IoBuf,
    dir: DmaDir,
) -> Result<(), LoadError> {
    if !p.contains(buf.range()) || !buf.is_from(p) {
        return Err(LoadError {
            error: DmaError::NotFromPool,
            buf,
        });
    }
    let seg = DmaSeg {
        iova: p.iova + (buf.pa() - p.phys.pa),
        len: buf.len(),
    };
    *out = Some(Loaded {
        buf,
        dir,
        seg,
        how: How::Pool,
    });
    Ok(())
}

/// `shadow`: a bounce buffer from the pool stands in for the caller's.
pub(super) fn load_shadow(
    p: &'static DmaPool,
    out: &mut Option<Loaded>,
    buf: IoBuf,
    dir: DmaDir,
) -> Result<(), LoadError> {
    let Some(r) = p.alloc(buf.len()) else {
        let len = buf.capacity();
        return Err(LoadError {
            error: DmaError::NoSpace { len },
            buf,
        });
    };
    let seg = DmaSeg {
        iova: p.iova + (r.pa - p.phys.pa),
        len: buf.len(),
    };
    *out = Some(Loaded {
        buf,
        dir,
        seg,
        how: How::Bounce(r),
    });
    Ok(())
}

/// `shadow`: copy between the caller's buffer and the bounce buffer `r`.
pub(super) fn sync_bounce(
    tag: &DmaTag,
    p: &'static DmaPool,
    l: &mut Loaded,
    r: PhysRange,
    op: SyncOp,
) {
    // The bounce buffer, borrowed: the map still owns its range.
    let n = l.buf.len();
    let mut b = core::mem::ManuallyDrop::new(IoBuf::from_range(r, n, p));
    match op {
        SyncOp::PreWrite if l.dir == DmaDir::ToDevice => {
            b.as_mut_slice().copy_from_slice(l.buf.as_slice());
            tag.stats.bounce_bytes.fetch_add(n as u64, Relaxed);
        }
        SyncOp::PostRead if l.dir == DmaDir::FromDevice => {
            l.buf.as_mut_slice().copy_from_slice(b.as_slice());
            tag.stats.bounce_bytes.fetch_add(n as u64, Relaxed);
        }
        _ => {}
    }
}

/// `shadow`: give the bounce buffer back to the pool.
pub(super) fn unload_bounce(p: &'static DmaPool, r: PhysRange) {
    drop(IoBuf::from_range(r, r.len, p));
}
