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

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
pub struct IoBuf {
    range: PhysRange,
    /// The length, and [`VIEW`] for a view (dropping it frees nothing).
    /// The flag is a bit of this word, not a `bool` field: a `bool` lends
    /// its spare values to the enums that carry an `IoBuf` (bus_dma's load
    /// state), whose tags then go to odd bytes written and read back in
    /// mismatched pieces on every load and unload (`dvma bench dvma
    /// --modes permanent` shows the difference).
    len: usize,
    src: &'static dyn BufSource,
}

/// The bit of `IoBuf::len` that marks a view.
const VIEW: usize = 1 << (usize::BITS - 1);

// SAFETY: an IoBuf owns its range exclusively (the allocator handed it out
// once), so moving it between threads moves that ownership.
unsafe impl Send for IoBuf {}

impl IoBuf {
    /// A buffer of `len` bytes from general physical memory. Any context;
    /// `None` if memory is short.
    pub fn alloc(len: usize) -> Option<IoBuf> {
        let pm = crate::kernel::kernel().physmem();
        let range = pm.alloc(len)?;
        Some(IoBuf {
            range,
            len,
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
            src: pm,
        })
    }

    /// Wrap a range owned by `src` (a DMA pool).
    pub fn from_range(range: PhysRange, len: usize, src: &'static dyn BufSource) -> IoBuf {
        assert!(len <= range.len);
        IoBuf { range, len, src }
    }

    /// A view of `len` bytes at `off` in this buffer: the same memory, with
    /// the same source (so `bus_dma` treats it as this buffer's), freeing
    /// nothing when dropped. Stacking drivers (ccd) give views of a parent's
    /// buffer to their component I/Os.
    ///
    /// # Safety
    /// 1. The views of one buffer that are alive at the same time do not
    ///    overlap.
    /// 2. The buffer is neither used nor dropped while a view of it lives.
    pub unsafe fn view(&self, off: usize, len: usize) -> IoBuf {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len()),
            "IoBuf::view out of range"
        );
        IoBuf {
            range: PhysRange {
                pa: self.range.pa + off,
                len,
            },
            len: len | VIEW,
            src: self.src,
        }
    }

    /// Its physical address.
    pub fn pa(&self) -> Paddr {
        self.range.pa
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len & !VIEW
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
        self.len = len | (self.len & VIEW);
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
        if self.len & VIEW == 0 {
            self.src.release(self.range);
        }
    }
}
