//! Physical memory: the machine's RAM, handed out in pages.
//!
//! The machine provides RAM (on Linux: a memfd) and a *direct map* of all of
//! it in the kernel's address space (one shared mapping of the memfd, as a
//! kernel maps physical memory at a fixed offset). [`PhysMem`] allocates
//! physically contiguous, page-aligned ranges of it from a vmem arena at
//! IPL_VM, so any context may allocate with NOWAIT; thread context may wait.
//!
//! An [`IoBuf`] is an owned I/O buffer in physical memory: what the block
//! layer moves, what `bus_dma` maps for devices. The kernel touches its bytes
//! through the direct map; devices only through the DVMA window, and only
//! while a DMA map holds the buffer (`bus_dma` takes it by value while it is
//! loaded, so the kernel holds no reference into it during a transfer).
//!
//! A stacking driver (ccd) gives pieces of one buffer to several devices
//! at once: [`IoBuf::lend`] turns the buffer into a [`LentIoBuf`], which
//! hands out disjoint *views* of it ([`LentIoBuf::view`], checked: in range,
//! not overlapping), each an `IoBuf` of its own that frees nothing. The buffer comes back with
//! [`LentIoBuf::into_inner`] only once every view has been given back
//! ([`LentIoBuf::give_back`], which accepts only this lending's views); a
//! `LentIoBuf` dropped with views out leaks the memory rather than free it
//! under them. So no safe code reaches freed memory, or one byte through
//! two buffers.
//!
//! # Contexts
//! `IoBuf::alloc`, `lend`, `give_back`, `into_inner`, dropping: any
//! context (the allocator is at IPL_VM; the rest are plain or atomic
//! operations). `alloc_wait`: thread context.

use core::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};

use vmem::{AllocPolicy, Vmem};

use crate::ctx::ThreadCtx;
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::sched::{Interrupted, sleep_interlocked, wakeup, wchan};

/// The page size.
pub const PAGE: usize = 4096;

address_type! {
    /// A physical address: an offset in the machine's RAM. Not an
    /// [`Iova`](crate::iommu::Iova): a device never sees one.
    ///
    /// ```compile_fail,E0308
    /// use kern::{iommu::Iova, vm::Paddr};
    /// fn phys(_: Paddr) {}
    /// phys(Iova(0x1000)); // an I/O virtual address is not a physical one
    /// ```
    Paddr
}

/// Counters of physical memory.
#[derive(Debug, Default)]
pub struct PhysStats {
    /// Pages allocated now.
    pub pages_used: AtomicU64,
    /// The most ever allocated at once.
    pub pages_peak: AtomicU64,
    /// Allocations that found no space.
    pub failures: AtomicU64,
}

/// The machine's RAM.
pub struct PhysMem {
    kva: usize,
    size: u64,
    arena: SpinMutex<Vmem>,
    waiters: AtomicU64,
    /// Counters.
    pub stats: PhysStats,
}

/// A physically contiguous, page-aligned range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    /// Physical address.
    pub pa: Paddr,
    /// Length in bytes (a multiple of the page size).
    pub len: usize,
}

impl PhysMem {
    /// RAM of `size` bytes whose direct map starts at `kva`. Page 0 is never
    /// handed out. Host context, at boot.
    pub fn new(kva: usize, size: u64) -> Self {
        let pages = (size / PAGE as u64) as usize;
        let v = Vmem::new(
            PAGE as u64,
            size - PAGE as u64,
            PAGE as u64,
            (pages / 2).clamp(256, 1 << 20),
        )
        .expect("physical memory arena parameters");
        Self {
            kva,
            size,
            arena: SpinMutex::new(Ipl::Vm, v),
            waiters: AtomicU64::new(0),
            stats: PhysStats::default(),
        }
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Allocate `len` bytes (rounded up to pages). Any context.
    pub fn alloc(&self, len: usize) -> Option<PhysRange> {
        let len = len.max(1).div_ceil(PAGE) * PAGE;
        let r = self.arena.lock().alloc(len as u64, AllocPolicy::BestFit);
        match r {
            Ok(pa) => {
                let pa = Paddr(pa);
                let used = self
                    .stats
                    .pages_used
                    .fetch_add((len / PAGE) as u64, Relaxed)
                    + (len / PAGE) as u64;
                self.stats.pages_peak.fetch_max(used, Relaxed);
                Some(PhysRange { pa, len })
            }
            Err(_) => {
                self.stats.failures.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Allocate, sleeping until memory is freed. Thread context.
    pub fn alloc_wait(&self, ctx: &ThreadCtx, len: usize) -> Result<PhysRange, Interrupted> {
        loop {
            if let Some(r) = self.alloc(len) {
                return Ok(r);
            }
            let g = self.arena.lock();
            // Re-test under the lock: a free in between is not missed.
            let len_r = len.max(1).div_ceil(PAGE) as u64 * PAGE as u64;
            if g.stats().largest_free >= len_r {
                continue;
            }
            self.waiters.fetch_add(1, Relaxed);
            let r = sleep_interlocked(ctx, wchan(self), g);
            self.waiters.fetch_sub(1, Relaxed);
            r?;
        }
    }

    /// Free a range from `alloc`. Any context.
    pub fn free(&self, r: PhysRange) {
        let res = self.arena.lock().free(r.pa.get(), r.len as u64);
        debug_assert!(res.is_ok(), "freeing {r:?}: {res:?}");
        self.stats
            .pages_used
            .fetch_sub((r.len / PAGE) as u64, Relaxed);
        if self.waiters.load(Relaxed) > 0 {
            wakeup(wchan(self));
        }
    }

    /// The kernel address of physical address `pa` (the direct map).
    #[inline]
    pub fn kva(&self, pa: Paddr) -> *mut u8 {
        debug_assert!(pa.get() < self.size);
        (self.kva + pa.get() as usize) as *mut u8
    }
}

/// Who takes an [`IoBuf`]'s memory back.
pub trait BufSource: Sync {
    /// Free the range.
    fn release(&self, r: PhysRange);
    /// The kernel address of `pa`.
    fn kva(&self, pa: Paddr) -> *mut u8;
}

impl BufSource for PhysMem {
    fn release(&self, r: PhysRange) {
        self.free(r)
    }
    fn kva(&self, pa: Paddr) -> *mut u8 {
        PhysMem::kva(self, pa)
    }
}

/// An owned I/O buffer in physical memory (contiguous).
///
/// It owns its range exclusively: the allocator handed it out once, or it
/// is a view whose range no other live buffer covers (see the module docs).
pub struct IoBuf {
    range: PhysRange,
    len: usize,
    /// 0 for a buffer that frees its range when dropped; for a view, the
    /// number of the [`IoBuf::lend`] that made it (dropping it frees
    /// nothing). A whole word, not a `bool`: a `bool` lends its spare
    /// values to the enums that carry an `IoBuf` (bus_dma's load state),
    /// whose tags then go to odd bytes written and read back in mismatched
    /// pieces on every load and unload (`dvma bench dvma --modes
    /// permanent` shows the difference).
    lending: u64,
    src: &'static dyn BufSource,
}

/// Numbers of lendings: a view is given back only to its own lending.
static LENDINGS: AtomicU64 = AtomicU64::new(1);

impl IoBuf {
    /// A buffer of `len` bytes from general physical memory. Any context;
    /// `None` if memory is short.
    pub fn alloc(len: usize) -> Option<IoBuf> {
        let pm = crate::kernel::kernel().physmem();
        let range = pm.alloc(len)?;
        Some(IoBuf {
            range,
            len,
            lending: 0,
            src: pm,
        })
    }

    /// The same, sleeping until memory is available. Thread context.
    pub fn alloc_wait(ctx: &ThreadCtx, len: usize) -> Result<IoBuf, Interrupted> {
        let pm = crate::kernel::kernel().physmem();
        let range = pm.alloc_wait(ctx, len)?;
        Ok(IoBuf {
            range,
            len,
            lending: 0,
            src: pm,
        })
    }

    /// Wrap a range owned by `src` (a DMA pool).
    pub fn from_range(range: PhysRange, len: usize, src: &'static dyn BufSource) -> IoBuf {
        assert!(len <= range.len);
        IoBuf {
            range,
            len,
            lending: 0,
            src,
        }
    }

    /// Lend this buffer out as views ([`LentIoBuf::view`]): a stacking
    /// driver (ccd) gives the views to its component I/Os and takes the
    /// buffer back with [`LentIoBuf::into_inner`] once every view is given
    /// back. Any context; never allocates.
    pub fn lend(self) -> LentIoBuf {
        LentIoBuf {
            lending: LENDINGS.fetch_add(1, Relaxed),
            out: AtomicUsize::new(0),
            end: 0,
            buf: Some(self),
        }
    }

    /// Its physical address.
    pub fn pa(&self) -> Paddr {
        self.range.pa
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its capacity (page-rounded for a buffer, exact for a view).
    pub fn capacity(&self) -> usize {
        self.range.len
    }

    /// Its physical range.
    pub fn range(&self) -> PhysRange {
        self.range
    }

    /// Change the length (at most the capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.range.len, "IoBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Does it come from `src`?
    pub fn is_from(&self, src: &dyn BufSource) -> bool {
        core::ptr::addr_eq(
            self.src as *const dyn BufSource,
            src as *const dyn BufSource,
        )
    }

    /// Its bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the range is mapped in the direct map for the kernel's
        // lifetime and owned by this buffer alone; while `&self` lives no
        // DMA map holds it (a loaded map owns the IoBuf by value).
        unsafe { core::slice::from_raw_parts(self.src.kva(self.range.pa), self.len()) }
    }

    /// Its bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes it unique.
        unsafe { core::slice::from_raw_parts_mut(self.src.kva(self.range.pa), self.len()) }
    }
}

impl core::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "IoBuf({:#x}+{:#x}, len {})",
            self.range.pa,
            self.range.len,
            self.len()
        )
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.lending == 0 {
            self.src.release(self.range);
        }
    }
}

/// A buffer lent out as views by [`IoBuf::lend`]: it owns the memory while
/// the views use it, and gives the buffer back once they all came back.
#[derive(Debug)]
pub struct LentIoBuf {
    /// `Some` until `into_inner` takes it.
    buf: Option<IoBuf>,
    /// Which lending (the views carry it).
    lending: u64,
    /// Views not given back yet.
    out: AtomicUsize,
    /// The end of the last view (the next starts at or after it).
    end: usize,
}

impl LentIoBuf {
    /// A view of `len` bytes at `off`: the same memory with the same source
    /// (so `bus_dma` treats it as the buffer's), freeing nothing when
    /// dropped. Views are taken in increasing order and do not overlap:
    /// `None` if this one starts before the end of the previous one or
    /// ends past the buffer's length.
    pub fn view(&mut self, off: usize, len: usize) -> Option<IoBuf> {
        let buf = self.buf.as_ref()?;
        let end = off.checked_add(len)?;
        if off < self.end || end > buf.len() {
            return None;
        }
        self.end = end;
        *self.out.get_mut() += 1;
        Some(IoBuf {
            range: PhysRange {
                pa: buf.range.pa + off,
                len,
            },
            len,
            lending: self.lending,
            src: buf.src,
        })
    }

    /// Give back a view of this lending (it is dropped); any other buffer
    /// is refused and handed back. Any context; one atomic operation.
    pub fn give_back(&self, view: IoBuf) -> Result<(), IoBuf> {
        if view.lending != self.lending {
            return Err(view);
        }
        drop(view); // frees nothing
        self.out.fetch_sub(1, Release);
        Ok(())
    }

    /// Views still out.
    pub fn outstanding(&self) -> usize {
        self.out.load(Acquire)
    }

    /// The buffer back, once every view has been given back; otherwise
    /// `Err(self)`.
    pub fn into_inner(mut self) -> Result<IoBuf, LentIoBuf> {
        if self.out.load(Acquire) != 0 {
            return Err(self);
        }
        Ok(self.buf.take().expect("vm: a lent buffer taken twice"))
    }
}

impl Drop for LentIoBuf {
    fn drop(&mut self) {
        if self.out.load(Acquire) != 0 {
            // Views are still out (a device kept one): the memory may be in
            // use under them. Leak it rather than free it.
            core::mem::forget(self.buf.take());
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{BufSource, IoBuf, Paddr, PhysRange};
    use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    /// A source that counts releases (no memory: nothing here touches the
    /// bytes).
    struct Counting(AtomicUsize);
    impl BufSource for Counting {
        fn release(&self, _r: PhysRange) {
            self.0.fetch_add(1, SeqCst);
        }
        fn kva(&self, _pa: Paddr) -> *mut u8 {
            core::ptr::null_mut()
        }
    }

    fn buf(src: &'static Counting, len: usize) -> IoBuf {
        let range = PhysRange {
            pa: Paddr(0x10000),
            len,
        };
        IoBuf::from_range(range, len, src)
    }

    #[test]
    fn views_are_checked_and_the_buffer_comes_back_once() {
        static SRC: Counting = Counting(AtomicUsize::new(0));
        let mut lent = buf(&SRC, 16384).lend();
        let v1 = lent.view(0, 4096).unwrap();
        assert!(lent.view(2048, 4096).is_none(), "overlaps the last view");
        assert!(lent.view(8192, 8193).is_none(), "past the end");
        assert!(lent.view(usize::MAX, 2).is_none(), "overflows");
        let v2 = lent.view(8192, 8192).unwrap();
        assert_eq!((v2.pa(), v2.len()), (Paddr(0x10000 + 8192), 8192));
        assert_eq!(lent.outstanding(), 2);

        // Another lending's view, or an owning buffer, is refused.
        let mut other = buf(&SRC, 4096).lend();
        let ov = other.view(0, 4096).unwrap();
        let ov = lent.give_back(ov).expect_err("another lending's view");
        other.give_back(ov).unwrap();
        drop(other.into_inner().unwrap());
        assert_eq!(SRC.0.load(SeqCst), 1);

        lent.give_back(v1).unwrap();
        let lent = lent.into_inner().expect_err("a view is out");
        drop(v2); // dropping a view frees nothing ...
        assert_eq!(SRC.0.load(SeqCst), 1);
        drop(lent); // ... and its lending, with it not given back, leaks
        assert_eq!(SRC.0.load(SeqCst), 1, "freed under a live view");

        let mut lent = buf(&SRC, 8192).lend();
        let v = lent.view(4096, 4096).unwrap();
        lent.give_back(v).unwrap();
        let b = lent.into_inner().expect("every view is back");
        assert_eq!(b.len(), 8192);
        drop(b);
        assert_eq!(SRC.0.load(SeqCst), 2, "freed once");
    }
}
