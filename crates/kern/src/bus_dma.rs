//! bus_dma(9): DMA maps, and the five DVMA modes.
//!
//! The NetBSD shape, with buffer ownership in the types (Tock style):
//!
//! | call | context | |
//! |---|---|---|
//! | [`tag_create`] | thread or host (attach) | a driver instance's tag, in one [`DvmaMode`] |
//! | [`dmamap_create`] | thread or host (attach) | a map for transfers up to `maxsize` |
//! | [`dmamem_alloc`] | any (NOWAIT) | an I/O buffer the tag can map (from its pool in `permanent`) |
//! | [`dmamap_load`] | any with `Wait::NoWait`; thread with `Wait::Ok` | the map takes the buffer and gives the device its segments |
//! | [`dmamap_load_deferred`] | any | the same, or queued in the tag's FIFO and finished later by a callback |
//! | [`dmamap_sync`] | any | PRE before the device starts, POST after it is done |
//! | [`dmamap_unload`] | any | the map gives the buffer back |
//!
//! While a map holds a buffer, the kernel has no reference into it: the
//! only access is the device's, through the segments. Direction is part of
//! the mapping: a `ToDevice` load is mapped read-only for the device, a
//! `FromDevice` load write-only-in-effect (read and write).
//!
//! # The modes
//! * **`strict`**: load allocates an IOVA range and maps the buffer; unload
//!   unmaps it (the host MMU invalidates, with shootdowns) and frees the
//!   range. After unload the device can reach nothing.
//! * **`lazy`**: as strict, but unloads are queued and the unmaps done in a
//!   batch when the queue is full or its oldest entry is older than the
//!   timeout (Linux: 256 entries, 10 ms). Until then the device can still
//!   reach those buffers.
//! * **`slots`** (the mail's proposal): a fixed number of IOVA slots is
//!   reserved at attach, with a free queue. A load maps the buffer into a
//!   free slot (skipping the map if the slot still maps exactly that
//!   buffer); unload only returns the slot. The PTEs "hang around until
//!   someone else grabs them": the device can reach the last buffer of every
//!   slot.
//! * **`permanent`**: a pool of pages is mapped once at attach; I/O buffers
//!   are allocated from it ([`dmamem_alloc`]) and a load writes no PTE at
//!   all. "The space is always taken": the device can always reach the
//!   whole pool.
//! * **`shadow`**: the same pool, plus a copy between the caller's buffer
//!   and a bounce buffer from the pool at sync time: the device never sees
//!   anything but the pool, and callers use any memory.
//!
//! # Running out
//! A `NoWait` load that finds no space fails with [`DmaError::NoSpace`]. A
//! `Wait::Ok` load sleeps until an unload frees space. A deferred load that
//! finds no space is queued in the tag's FIFO and completed, in order, by
//! the `busdma` soft interrupt when space is freed. Later loads never
//! overtake it: while the FIFO is not empty every load queues or fails
//! (FreeBSD lets them overtake; dvma keeps the order).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};

use crate::ctx::{SoftCtx, ThreadCtx};
use crate::iommu::{DmaAccess, IOPAGE, Iommu, Iova, IovaArena, IovaError};
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::lock::SpinMutex;
use crate::percpu::PerCpuCounter;
use crate::sched::{Interrupted, sleep_interlocked, wakeup, wchan};
use crate::softint::{SoftintHandle, softint_schedule};
use crate::vm::{BufSource, IoBuf, Paddr, PhysRange};

/// How a driver instance maps its I/O for devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DvmaMode {
    /// Map at load, unmap and invalidate at unload.
    Strict,
    /// Map at load, unmap in batches.
    Lazy,
    /// Slots reserved at attach, PTEs left until reuse.
    Slots,
    /// Buffers from a pool mapped once at attach.
    Permanent,
    /// The pool, with copies to and from the caller's buffer.
    Shadow,
}

impl DvmaMode {
    /// Every mode.
    pub const ALL: [DvmaMode; 5] = [
        DvmaMode::Strict,
        DvmaMode::Lazy,
        DvmaMode::Slots,
        DvmaMode::Permanent,
        DvmaMode::Shadow,
    ];

    /// Its name.
    pub const fn name(self) -> &'static str {
        match self {
            DvmaMode::Strict => "strict",
            DvmaMode::Lazy => "lazy",
            DvmaMode::Slots => "slots",
            DvmaMode::Permanent => "permanent",
            DvmaMode::Shadow => "shadow",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    /// What a device can still reach after an I/O has completed.
    pub const fn protection(self) -> &'static str {
        match self {
            DvmaMode::Strict => "nothing: every mapping is removed at unload",
            DvmaMode::Lazy => {
                "the buffers of the unloads still queued for flushing (up to the batch size, or the timeout)"
            }
            DvmaMode::Slots => "the last buffer mapped in each slot, until the slot is reused",
            DvmaMode::Permanent => "the whole pool, always (I/O buffers live there)",
            DvmaMode::Shadow => "the whole pool, always; never a caller's own buffer",
        }
    }
}

impl core::fmt::Display for DvmaMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Transfer direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaDir {
    /// The device reads memory (a disk write).
    ToDevice,
    /// The device writes memory (a disk read).
    FromDevice,
}

impl DmaDir {
    fn access(self) -> DmaAccess {
        match self {
            DmaDir::ToDevice => DmaAccess::Read,
            DmaDir::FromDevice => DmaAccess::ReadWrite,
        }
    }
}

/// `bus_dmamap_sync` operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOp {
    /// Before the device reads memory.
    PreWrite,
    /// Before the device writes memory.
    PreRead,
    /// After the device read memory.
    PostWrite,
    /// After the device wrote memory.
    PostRead,
}

/// A device-visible segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaSeg {
    /// I/O virtual address.
    pub iova: Iova,
    /// Length.
    pub len: usize,
}

/// bus_dma errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaError {
    /// No DVMA space (or pool memory) left.
    NoSpace {
        /// Bytes asked for.
        len: usize,
    },
    /// The buffer is larger than the map (or slot) allows.
    TooBig {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `permanent`: the buffer is not from the tag's pool.
    NotFromPool,
    /// The map already holds a buffer.
    Busy,
    /// The deferred-load FIFO is full.
    FifoFull,
    /// The IOMMU refused the mapping.
    Iommu(crate::iommu::IommuError),
    /// The kernel is shutting down.
    Interrupted,
}

impl core::fmt::Display for DmaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DmaError::NoSpace { len } => write!(f, "bus_dma: no DVMA space for {len} bytes"),
            DmaError::TooBig { len, max } => {
                write!(f, "bus_dma: {len} bytes exceed the map's {max}")
            }
            DmaError::NotFromPool => {
                write!(f, "bus_dma: permanent mode needs buffers from dmamem_alloc")
            }
            DmaError::Busy => write!(f, "bus_dma: map already loaded"),
            DmaError::FifoFull => write!(f, "bus_dma: deferred-load queue full"),
            DmaError::Iommu(e) => write!(f, "bus_dma: {e}"),
            DmaError::Interrupted => write!(f, "bus_dma: interrupted by shutdown"),
        }
    }
}

impl From<Interrupted> for DmaError {
    fn from(_: Interrupted) -> Self {
        DmaError::Interrupted
    }
}

/// A failed load gives the buffer back.
#[derive(Debug)]
pub struct LoadError {
    /// Why.
    pub error: DmaError,
    /// The buffer.
    pub buf: IoBuf,
}

/// Whether a load may sleep.
pub enum Wait<'a> {
    /// Fail at once when out of space.
    NoWait,
    /// Sleep until space is freed (thread context).
    Ok(&'a ThreadCtx),
}

/// Tag configuration.
#[derive(Clone, Debug)]
pub struct TagConfig {
    /// The mode.
    pub mode: DvmaMode,
    /// Largest transfer of a map.
    pub maxsize: usize,
    /// `slots`: number of slots (each `maxsize`).
    pub slots: usize,
    /// `permanent`/`shadow`: pool size.
    pub pool_bytes: usize,
    /// `lazy`: unloads per flush.
    pub lazy_batch: usize,
    /// `lazy`: the oldest queued unload is flushed after this long.
    pub lazy_timeout_ns: u64,
    /// Deferred loads that may wait in the FIFO.
    pub fifo_depth: usize,
}

impl TagConfig {
    /// Defaults for `mode`: 1 MiB transfers, 64 slots, a 64 MiB pool,
    /// Linux's lazy flush (256 entries, 10 ms), 256 deferred loads.
    pub fn new(mode: DvmaMode) -> Self {
        Self {
            mode,
            maxsize: 1 << 20,
            slots: 64,
            pool_bytes: 64 << 20,
            lazy_batch: 256,
            lazy_timeout_ns: 10_000_000,
            fifo_depth: 256,
        }
    }
}

/// Counters of a tag. The per-I/O ones are per-CPU.
#[derive(Debug, Default)]
pub struct TagStats {
    /// Loads that succeeded.
    pub loads: PerCpuCounter,
    /// `slots`: loads that found their slot still mapping that very buffer
    /// and wrote no PTE. (`permanent` and `shadow` never write one: every
    /// load of theirs is such a load, so it is not counted twice.)
    pub loads_no_pte: PerCpuCounter,
    /// Unloads.
    pub unloads: PerCpuCounter,
    /// Loads refused for lack of space (NoWait).
    pub no_space: AtomicU64,
    /// Sleeps of waiting loads.
    pub waits: AtomicU64,
    /// Loads queued in the FIFO.
    pub deferred: AtomicU64,
    /// IOMMU enter calls.
    pub enters: AtomicU64,
    /// IOMMU remove calls.
    pub removes: AtomicU64,
    /// Lazy flushes.
    pub flushes: AtomicU64,
    /// Lazy unloads that found the flush queue full and flushed it
    /// themselves (another CPU filled it between a push and its flush).
    pub lazy_full: AtomicU64,
    /// Bytes copied (shadow).
    pub bounce_bytes: AtomicU64,
    /// DMA faults the tag's devices reported.
    pub faults: AtomicU64,
    /// Pages this tag keeps mapped in the window now.
    pub pages_held: AtomicU64,
    /// The most it ever held.
    pub pages_peak: AtomicU64,
}

impl TagStats {
    fn held(&self, delta: i64) {
        let v = if delta >= 0 {
            self.pages_held.fetch_add(delta as u64, Relaxed) + delta as u64
        } else {
            self.pages_held.fetch_sub((-delta) as u64, Relaxed) - (-delta) as u64
        };
        self.pages_peak.fetch_max(v, Relaxed);
    }
}

/// The machine's IOMMU domain: the window and its IOVA arena.
pub struct Domain {
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
            iommu,
            iova: IovaArena::new(Iova(IOPAGE as u64), size - IOPAGE as u64, ncpu),
            pool: SpinMutex::new(Ipl::None, None),
            pages_mapped: AtomicU64::new(0),
            pages_peak: AtomicU64::new(0),
        }
    }

    /// The shared pool, made and mapped ("grab the pages at attach time")
    /// on first use with `bytes`. Thread or host context.
    fn shared_pool(&self, bytes: usize) -> Result<&'static DmaPool, DmaError> {
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

    fn enter(
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

    fn remove(&self, tag: &DmaTag, iova: Iova, len: usize) {
        self.iommu.remove(iova, len);
        tag.stats.removes.fetch_add(1, Relaxed);
    }

    fn held(&self, delta: i64) {
        let v = if delta >= 0 {
            self.pages_mapped.fetch_add(delta as u64, Relaxed) + delta as u64
        } else {
            self.pages_mapped.fetch_sub((-delta) as u64, Relaxed) - (-delta) as u64
        };
        self.pages_peak.fetch_max(v, Relaxed);
    }
}

/// The page-aligned physical span of a buffer (which may be a view that
/// starts inside a page): (first page, offset in it, bytes to map).
fn page_span(buf: &IoBuf) -> (Paddr, usize, usize) {
    let pa = buf.pa();
    let mpa = pa.align_down(IOPAGE as u64);
    let off = (pa - mpa) as usize;
    (mpa, off, (off + buf.len().max(1)).div_ceil(IOPAGE) * IOPAGE)
}

fn pages(len: usize) -> i64 {
    len.div_ceil(IOPAGE) as i64
}

/// The domain's pool of physical memory, mapped once when the first
/// `permanent` or `shadow` tag attaches and shared by every such tag (one
/// IOMMU, one permanently mapped pool: a buffer from it can be given to any
/// of their devices, as ccd does across its components).
pub struct DmaPool {
    phys: PhysRange,
    iova: Iova,
    arena: SpinMutex<vmem::Vmem>,
}

impl BufSource for DmaPool {
    fn release(&self, r: PhysRange) {
        let _ = self.arena.lock().free(r.pa.get(), r.len as u64);
        for t in tags() {
            if matches!(t.kind, Kind::Pool(_)) {
                t.space_freed();
            }
        }
    }
    fn kva(&self, pa: Paddr) -> *mut u8 {
        kernel().physmem().kva(pa)
    }
}

impl DmaPool {
    fn alloc(&self, len: usize) -> Option<PhysRange> {
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

/// `lazy`: the queue of unmaps not yet done. A fixed array sized at attach
/// (`lazy_batch` entries): unloads run in interrupt context, which must not
/// allocate, so the queue never grows. A push that finds it full (another
/// CPU filled it between a push and its flush) flushes and tries again.
struct FlushQ {
    entries: Box<[(Iova, usize)]>,
    len: usize,
    oldest_ns: u64,
}

impl FlushQ {
    fn new(cap: usize) -> Self {
        Self {
            entries: alloc::vec![(Iova(0), 0); cap.max(1)].into_boxed_slice(),
            len: 0,
            oldest_ns: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue an unmap; `false` if the queue is full.
    fn push(&mut self, e: (Iova, usize)) -> bool {
        match self.entries.get_mut(self.len) {
            Some(slot) => {
                *slot = e;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// Move up to `out.len()` entries into `out`; returns how many.
    fn take(&mut self, out: &mut [(Iova, usize)]) -> usize {
        let n = self.len.min(out.len());
        let start = self.len - n;
        out[..n].copy_from_slice(&self.entries[start..self.len]);
        self.len = start;
        n
    }
}

struct SlotSet {
    base: Iova,
    size: usize,
    free: SpinMutex<Vec<u16>>,
    /// What each slot maps now: (pa, len, access as u8); len 0 = nothing.
    cur: Box<[(AtomicU64, AtomicUsize, AtomicUsize)]>,
}

// The tag is leaked once per driver instance: the size of its largest
// variant costs nothing, and boxing would be one more indirection per load.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Strict,
    Lazy(SpinMutex<FlushQ>),
    Slots(SlotSet),
    Pool(&'static DmaPool),
}

struct Deferred {
    map: DmaMap,
    buf: IoBuf,
    dir: DmaDir,
    done: fn(&SoftCtx, DmaMap, Result<(), LoadError>, usize),
    arg: usize,
}

/// A DMA tag: one driver instance's way of mapping for its devices.
pub struct DmaTag {
    name: &'static str,
    cfg: TagConfig,
    dom: &'static Domain,
    kind: Kind,
    fifo: SpinMutex<alloc::collections::VecDeque<Deferred>>,
    fifo_len: AtomicUsize,
    waiters: AtomicUsize,
    /// Counters.
    pub stats: TagStats,
}

const MAX_TAGS: usize = 64;
static TAGS: [AtomicPtr<DmaTag>; MAX_TAGS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_TAGS];
static BUSDMA_SI: AtomicPtr<SoftintHandle> = AtomicPtr::new(core::ptr::null_mut());

/// Every tag created since boot.
pub fn tags() -> impl Iterator<Item = &'static DmaTag> {
    TAGS.iter().filter_map(|p| {
        // SAFETY: tags are leaked at creation and forgotten only by
        // `reset_tags` at kernel teardown.
        unsafe { p.load(Acquire).as_ref() }
    })
}

/// Forget every tag (kernel teardown; their memory is leaked with their
/// mappings, which die with the machine).
pub(crate) fn reset_tags() {
    for p in &TAGS {
        p.store(core::ptr::null_mut(), Release);
    }
    BUSDMA_SI.store(core::ptr::null_mut(), Release);
}

fn busdma_softint() -> &'static SoftintHandle {
    let p = BUSDMA_SI.load(Acquire);
    // SAFETY: a leaked handle, set once below.
    if let Some(h) = unsafe { p.as_ref() } {
        return h;
    }
    let h = crate::softint::softint_establish(Ipl::SoftBio, "busdma", |ctx| {
        for t in tags() {
            t.run_fifo(ctx);
        }
    })
    .expect("busdma softint");
    let b = Box::into_raw(Box::new(h));
    match BUSDMA_SI.compare_exchange(core::ptr::null_mut(), b, AcqRel, Acquire) {
        Ok(_) => {
            // SAFETY: just leaked.
            unsafe { &*b }
        }
        Err(other) => {
            // SAFETY: ours lost the race and was never shared.
            drop(unsafe { Box::from_raw(b) });
            // SAFETY: `other` is the winner's leaked handle.
            unsafe { &*other }
        }
    }
}

/// Create a tag (driver attach). Thread or host context.
pub fn tag_create(name: &'static str, cfg: TagConfig) -> Result<&'static DmaTag, DmaError> {
    let k = kernel();
    let dom = k.dma_domain();
    busdma_softint();
    let kind = match cfg.mode {
        DvmaMode::Strict => Kind::Strict,
        DvmaMode::Lazy => Kind::Lazy(SpinMutex::new(Ipl::Vm, FlushQ::new(cfg.lazy_batch))),
        DvmaMode::Slots => {
            let size = cfg.maxsize.div_ceil(IOPAGE) * IOPAGE;
            let total = size * cfg.slots;
            let base = dom
                .iova
                .alloc(total)
                .map_err(|IovaError::NoSpace { len }| DmaError::NoSpace { len })?;
            Kind::Slots(SlotSet {
                base,
                size,
                free: SpinMutex::new(Ipl::Vm, (0..cfg.slots as u16).rev().collect()),
                cur: (0..cfg.slots)
                    .map(|_| (AtomicU64::new(0), AtomicUsize::new(0), AtomicUsize::new(0)))
                    .collect(),
            })
        }
        DvmaMode::Permanent | DvmaMode::Shadow => Kind::Pool(dom.shared_pool(cfg.pool_bytes)?),
    };
    let tag: &'static DmaTag = Box::leak(Box::new(DmaTag {
        name,
        fifo: SpinMutex::new(
            Ipl::Vm,
            alloc::collections::VecDeque::with_capacity(cfg.fifo_depth),
        ),
        fifo_len: AtomicUsize::new(0),
        cfg,
        dom,
        kind,
        waiters: AtomicUsize::new(0),
        stats: TagStats::default(),
    }));
    if let Kind::Pool(p) = &tag.kind {
        // The pool's pages are held for this tag's devices, always.
        tag.stats.held(p.pages() as i64);
    }
    let p = tag as *const DmaTag as *mut DmaTag;
    if !TAGS.iter().any(|s| {
        s.compare_exchange(core::ptr::null_mut(), p, AcqRel, Relaxed)
            .is_ok()
    }) {
        return Err(DmaError::NoSpace { len: 0 });
    }
    Ok(tag)
}

/// A DMA map.
pub struct DmaMap {
    tag: &'static DmaTag,
    maxsize: usize,
    loaded: Option<Loaded>,
}

struct Loaded {
    buf: IoBuf,
    dir: DmaDir,
    seg: DmaSeg,
    how: How,
}

enum How {
    Mapped {
        iova: Iova,
        len: usize,
    },
    Slot(u16),
    Pool,
    /// The bounce buffer's range in the tag's pool (not an `IoBuf`: this
    /// keeps `How`, hence every load and unload, small: the pool is the
    /// tag's, so the buffer is rebuilt where it is needed).
    Bounce(PhysRange),
}

impl core::fmt::Debug for DmaMap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "DmaMap({}, loaded: {})",
            self.tag.name,
            self.loaded.is_some()
        )
    }
}

/// `bus_dmamap_create`: a map for transfers of up to `maxsize` bytes.
pub fn dmamap_create(tag: &'static DmaTag, maxsize: usize) -> Result<DmaMap, DmaError> {
    if maxsize > tag.cfg.maxsize {
        return Err(DmaError::TooBig {
            len: maxsize,
            max: tag.cfg.maxsize,
        });
    }
    Ok(DmaMap {
        tag,
        maxsize,
        loaded: None,
    })
}

/// `bus_dmamem_alloc`: a buffer of `len` bytes the tag can map. In
/// `permanent` mode it comes from the tag's pool; otherwise from general
/// physical memory. Any context.
pub fn dmamem_alloc(tag: &'static DmaTag, len: usize) -> Option<IoBuf> {
    match (&tag.kind, tag.cfg.mode) {
        (Kind::Pool(p), DvmaMode::Permanent) => {
            let r = p.alloc(len)?;
            Some(IoBuf::from_range(r, len, *p))
        }
        _ => IoBuf::alloc(len),
    }
}

/// `bus_dmamem_alloc` that sleeps until memory is available. Thread context.
pub fn dmamem_alloc_wait(
    tag: &'static DmaTag,
    ctx: &ThreadCtx,
    len: usize,
) -> Result<IoBuf, Interrupted> {
    loop {
        if let Some(b) = dmamem_alloc(tag, len) {
            return Ok(b);
        }
        if !matches!(tag.cfg.mode, DvmaMode::Permanent) {
            return IoBuf::alloc_wait(ctx, len);
        }
        let g = tag.fifo.lock();
        tag.waiters.fetch_add(1, AcqRel);
        // Try again under the lock: a free in between has to pass through it
        // to wake us (`space_freed`), so it cannot be missed.
        if let Some(b) = dmamem_alloc(tag, len) {
            tag.waiters.fetch_sub(1, AcqRel);
            return Ok(b);
        }
        let r = sleep_interlocked(ctx, wchan(tag), g);
        tag.waiters.fetch_sub(1, AcqRel);
        r?;
    }
}

/// `bus_dmamap_load`.
pub fn dmamap_load(
    map: &mut DmaMap,
    buf: IoBuf,
    dir: DmaDir,
    wait: Wait<'_>,
) -> Result<(), LoadError> {
    let tag = map.tag;
    if map.loaded.is_some() {
        return Err(LoadError {
            error: DmaError::Busy,
            buf,
        });
    }
    if buf.capacity() > map.maxsize {
        return Err(LoadError {
            error: DmaError::TooBig {
                len: buf.capacity(),
                max: map.maxsize,
            },
            buf,
        });
    }
    let mut buf = buf;
    loop {
        // Never overtake a deferred load.
        let queued = tag.fifo_len.load(Acquire) > 0;
        if !queued {
            match tag.try_load(&mut map.loaded, buf, dir) {
                Ok(()) => {
                    tag.stats.loads.inc();
                    return Ok(());
                }
                Err(e) if !matches!(e.error, DmaError::NoSpace { .. }) => return Err(e),
                Err(e) => buf = e.buf,
            }
        }
        match wait {
            Wait::NoWait => {
                tag.stats.no_space.fetch_add(1, Relaxed);
                return Err(LoadError {
                    error: DmaError::NoSpace { len: buf.len() },
                    buf,
                });
            }
            Wait::Ok(ctx) => {
                let g = tag.fifo.lock();
                tag.waiters.fetch_add(1, AcqRel);
                // Try again under the lock (see `dmamem_alloc_wait`).
                if tag.fifo_len.load(Acquire) == 0 {
                    match tag.try_load(&mut map.loaded, buf, dir) {
                        Ok(()) => {
                            tag.waiters.fetch_sub(1, AcqRel);
                            tag.stats.loads.inc();
                            return Ok(());
                        }
                        Err(e) if matches!(e.error, DmaError::NoSpace { .. }) => buf = e.buf,
                        Err(e) => {
                            tag.waiters.fetch_sub(1, AcqRel);
                            return Err(e);
                        }
                    }
                }
                tag.stats.waits.fetch_add(1, Relaxed);
                let r = sleep_interlocked(ctx, wchan(tag), g);
                tag.waiters.fetch_sub(1, AcqRel);
                if r.is_err() {
                    return Err(LoadError {
                        error: DmaError::Interrupted,
                        buf,
                    });
                }
            }
        }
    }
}

/// A load that, when out of space, is queued in the tag's FIFO and
/// completed in order by the `busdma` soft interrupt when space frees up.
/// `done` is called exactly once, with the map, either here (at once) or
/// later from soft-interrupt context. Any context.
// The map and the buffer travel back by value on failure: boxing them would
// allocate, and this is called from interrupt context.
#[allow(clippy::result_large_err)]
pub fn dmamap_load_deferred(
    map: DmaMap,
    buf: IoBuf,
    dir: DmaDir,
    done: fn(&SoftCtx, DmaMap, Result<(), LoadError>, usize),
    arg: usize,
) -> Result<Option<DmaMap>, (DmaMap, LoadError)> {
    let tag = map.tag;
    let mut map = map;
    let mut g = tag.fifo.lock();
    if g.is_empty() {
        drop(g);
        match dmamap_load(&mut map, buf, dir, Wait::NoWait) {
            Ok(()) => return Ok(Some(map)),
            Err(e) if matches!(e.error, DmaError::NoSpace { .. }) => {
                g = tag.fifo.lock();
                return tag.enqueue(&mut g, map, e.buf, dir, done, arg);
            }
            Err(e) => return Err((map, e)),
        }
    }
    tag.enqueue(&mut g, map, buf, dir, done, arg)
}

/// `bus_dmamap_sync`.
pub fn dmamap_sync(map: &mut DmaMap, op: SyncOp) {
    let Some(l) = map.loaded.as_mut() else { return };
    if let (How::Bounce(r), Kind::Pool(p)) = (&l.how, &map.tag.kind) {
        // The bounce buffer, borrowed: the map still owns its range.
        let n = l.buf.len();
        let mut b = core::mem::ManuallyDrop::new(IoBuf::from_range(*r, n, *p));
        match op {
            SyncOp::PreWrite if l.dir == DmaDir::ToDevice => {
                b.as_mut_slice().copy_from_slice(l.buf.as_slice());
                map.tag.stats.bounce_bytes.fetch_add(n as u64, Relaxed);
            }
            SyncOp::PostRead if l.dir == DmaDir::FromDevice => {
                l.buf.as_mut_slice().copy_from_slice(b.as_slice());
                map.tag.stats.bounce_bytes.fetch_add(n as u64, Relaxed);
            }
            _ => {}
        }
    }
    match op {
        SyncOp::PreRead | SyncOp::PreWrite => core::sync::atomic::fence(Release),
        SyncOp::PostRead | SyncOp::PostWrite => core::sync::atomic::fence(Acquire),
    }
}

/// `bus_dmamap_unload`: the map gives its buffer back. Any context.
pub fn dmamap_unload(map: &mut DmaMap) -> Option<IoBuf> {
    let l = map.loaded.take()?;
    let tag = map.tag;
    tag.stats.unloads.inc();
    match l.how {
        How::Mapped { iova, len } => match &tag.kind {
            Kind::Lazy(q) => tag.lazy_unload(q, iova, len),
            _ => {
                tag.dom.remove(tag, iova, len);
                tag.dom.held(-pages(len));
                tag.stats.held(-pages(len));
                tag.dom.iova.free(iova, len);
                tag.space_freed();
            }
        },
        How::Slot(i) => {
            if let Kind::Slots(s) = &tag.kind {
                s.free.lock().push(i);
                tag.space_freed();
            }
        }
        How::Pool => {}
        How::Bounce(r) => {
            if let Kind::Pool(p) = &tag.kind {
                drop(IoBuf::from_range(r, r.len, *p));
            }
        }
    }
    Some(l.buf)
}

impl DmaMap {
    /// The device-visible segments of the loaded buffer.
    pub fn segs(&self) -> &[DmaSeg] {
        match &self.loaded {
            Some(l) => core::slice::from_ref(&l.seg),
            None => &[],
        }
    }

    /// Is a buffer loaded?
    pub fn is_loaded(&self) -> bool {
        self.loaded.is_some()
    }

    /// Its tag.
    pub fn tag(&self) -> &'static DmaTag {
        self.tag
    }

    /// The loaded buffer's length.
    pub fn len(&self) -> usize {
        self.loaded.as_ref().map(|l| l.buf.len()).unwrap_or(0)
    }

    /// Is nothing loaded?
    pub fn is_empty(&self) -> bool {
        self.loaded.is_none()
    }
}

impl DmaTag {
    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its mode.
    pub fn mode(&self) -> DvmaMode {
        self.cfg.mode
    }

    /// Its configuration.
    pub fn config(&self) -> &TagConfig {
        &self.cfg
    }

    /// A device of this tag reported a DMA fault.
    pub fn fault(&self) {
        self.stats.faults.fetch_add(1, Relaxed);
    }

    /// IOVA pages this tag reserves beyond what is mapped (slots).
    pub fn pages_reserved(&self) -> u64 {
        match &self.kind {
            Kind::Slots(s) => (s.size * s.cur.len() / IOPAGE) as u64,
            Kind::Pool(p) => (p.phys.len / IOPAGE) as u64,
            _ => 0,
        }
    }

    /// Deferred loads waiting now.
    pub fn fifo_len(&self) -> usize {
        self.fifo_len.load(Acquire)
    }

    /// Load `buf` into `out` (an empty map's slot), or give it back.
    fn try_load(
        &'static self,
        out: &mut Option<Loaded>,
        buf: IoBuf,
        dir: DmaDir,
    ) -> Result<(), LoadError> {
        let len = buf.capacity();
        let fail = |error, buf| Err(LoadError { error, buf });
        match &self.kind {
            Kind::Strict | Kind::Lazy(_) => {
                let (_, _, mlen) = page_span(&buf);
                let iova = match self.dom.iova.alloc(mlen) {
                    Ok(i) => i,
                    Err(_) => {
                        // Lazy: space may be sitting in the flush queue.
                        if let Kind::Lazy(q) = &self.kind {
                            self.lazy_release(q);
                            if let Ok(i) = self.dom.iova.alloc(mlen) {
                                return self.finish_map(out, buf, dir, i, mlen);
                            }
                        }
                        return fail(DmaError::NoSpace { len }, buf);
                    }
                };
                self.finish_map(out, buf, dir, iova, mlen)
            }
            Kind::Slots(s) => {
                let (mpa, off, mlen) = page_span(&buf);
                if mlen > s.size {
                    return fail(
                        DmaError::TooBig {
                            len: mlen,
                            max: s.size,
                        },
                        buf,
                    );
                }
                let Some(i) = s.free.lock().pop() else {
                    return fail(DmaError::NoSpace { len }, buf);
                };
                let slot_iova = s.base + i as usize * s.size;
                let (cpa, clen, cacc) = &s.cur[i as usize];
                let acc = dir.access() as usize + 1;
                if cpa.load(Relaxed) == mpa.get()
                    && clen.load(Relaxed) == mlen
                    && cacc.load(Relaxed) == acc
                {
                    self.stats.loads_no_pte.inc();
                } else {
                    if let Err(e) = self.dom.enter(self, slot_iova, mpa, mlen, dir.access()) {
                        s.free.lock().push(i);
                        return fail(e, buf);
                    }
                    let delta = pages(mlen) - pages(clen.load(Relaxed));
                    self.dom.held(delta);
                    self.stats.held(delta);
                    cpa.store(mpa.get(), Relaxed);
                    clen.store(mlen, Relaxed);
                    cacc.store(acc, Relaxed);
                }
                let seg = DmaSeg {
                    iova: slot_iova + off,
                    len: buf.len(),
                };
                *out = Some(Loaded {
                    buf,
                    dir,
                    seg,
                    how: How::Slot(i),
                });
                Ok(())
            }
            Kind::Pool(p) => match self.cfg.mode {
                DvmaMode::Permanent => {
                    if !p.contains(buf.range()) || !buf.is_from(*p) {
                        return fail(DmaError::NotFromPool, buf);
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
                _ => {
                    let Some(r) = p.alloc(buf.len()) else {
                        return fail(DmaError::NoSpace { len }, buf);
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
            },
        }
    }

    fn finish_map(
        &self,
        out: &mut Option<Loaded>,
        buf: IoBuf,
        dir: DmaDir,
        iova: Iova,
        len: usize,
    ) -> Result<(), LoadError> {
        let (mpa, off, _) = page_span(&buf);
        if let Err(error) = self.dom.enter(self, iova, mpa, len, dir.access()) {
            self.dom.iova.free(iova, len);
            return Err(LoadError { error, buf });
        }
        self.dom.held(pages(len));
        self.stats.held(pages(len));
        let seg = DmaSeg {
            iova: iova + off,
            len: buf.len(),
        };
        *out = Some(Loaded {
            buf,
            dir,
            seg,
            how: How::Mapped { iova, len },
        });
        Ok(())
    }

    fn lazy_unload(&self, q: &SpinMutex<FlushQ>, iova: Iova, len: usize) {
        let now = kernel().md().nanotime();
        loop {
            let mut g = q.lock();
            if g.is_empty() {
                g.oldest_ns = now;
            }
            if !g.push((iova, len)) {
                // Full: make room ourselves (never grow: we may be in an
                // interrupt handler).
                drop(g);
                self.stats.lazy_full.fetch_add(1, Relaxed);
                self.lazy_flush(q);
                continue;
            }
            let due = g.len >= self.cfg.lazy_batch
                || now.saturating_sub(g.oldest_ns) >= self.cfg.lazy_timeout_ns;
            drop(g);
            if due {
                self.lazy_flush(q);
            } else {
                crate::callout::callout_schedule(&LAZY_CALLOUT, self.cfg.lazy_timeout_ns);
            }
            return;
        }
    }

    /// Release every queued unload: unmap (adjacent ranges in one call, as
    /// one IOTLB invalidation covers a batch), then free the IOVAs.
    fn lazy_flush(&self, q: &SpinMutex<FlushQ>) {
        if self.lazy_release(q) {
            self.space_freed();
        }
    }

    /// The work of [`DmaTag::lazy_flush`], without waking anyone (the loader
    /// that flushes to make room for itself holds the FIFO lock). Returns
    /// whether anything was released.
    fn lazy_release(&self, q: &SpinMutex<FlushQ>) -> bool {
        let mut batch = [(Iova(0), 0usize); 256];
        let mut any = false;
        loop {
            let n = q.lock().take(&mut batch);
            if n == 0 {
                return any;
            }
            any = true;
            let b = &mut batch[..n];
            b.sort_unstable_by_key(|e| e.0);
            let mut i = 0;
            while i < n {
                let (run_start, mut run_end) = (b[i].0, b[i].0 + b[i].1);
                let mut j = i + 1;
                while j < n && b[j].0 == run_end {
                    run_end = run_end + b[j].1;
                    j += 1;
                }
                self.dom
                    .remove(self, run_start, (run_end - run_start) as usize);
                i = j;
            }
            for &(iova, len) in b.iter() {
                self.dom.held(-pages(len));
                self.stats.held(-pages(len));
                self.dom.iova.free(iova, len);
            }
            self.stats.flushes.fetch_add(1, Relaxed);
        }
    }

    /// Lazy mode: flush what is older than the timeout (callout).
    fn lazy_tick(&self) {
        if let Kind::Lazy(q) = &self.kind {
            let now = kernel().md().nanotime();
            let g = q.lock();
            let due = !g.is_empty() && now.saturating_sub(g.oldest_ns) >= self.cfg.lazy_timeout_ns;
            let any = !g.is_empty();
            drop(g);
            if due {
                self.lazy_flush(q);
            } else if any {
                crate::callout::callout_schedule(&LAZY_CALLOUT, self.cfg.lazy_timeout_ns / 2);
            }
        }
    }

    /// Lazy mode: flush everything now (tests, shutdown).
    pub fn flush(&self) {
        if let Kind::Lazy(q) = &self.kind {
            self.lazy_flush(q);
        }
    }

    /// Space was freed: wake sleepers, run the FIFO.
    fn space_freed(&self) {
        if self.waiters.load(Acquire) > 0 {
            // Waiters test and sleep under the FIFO lock: passing through it
            // orders this wakeup after any sleeper is queued.
            drop(self.fifo.lock());
            wakeup(wchan(self));
        }
        if self.fifo_len.load(Acquire) > 0 {
            softint_schedule(busdma_softint());
        }
    }

    #[allow(clippy::result_large_err)] // see `dmamap_load_deferred`
    fn enqueue(
        &self,
        g: &mut crate::lock::SpinGuard<'_, alloc::collections::VecDeque<Deferred>>,
        map: DmaMap,
        buf: IoBuf,
        dir: DmaDir,
        done: fn(&SoftCtx, DmaMap, Result<(), LoadError>, usize),
        arg: usize,
    ) -> Result<Option<DmaMap>, (DmaMap, LoadError)> {
        if g.len() >= self.cfg.fifo_depth {
            return Err((
                map,
                LoadError {
                    error: DmaError::FifoFull,
                    buf,
                },
            ));
        }
        g.push_back(Deferred {
            map,
            buf,
            dir,
            done,
            arg,
        });
        self.fifo_len.store(g.len(), Release);
        self.stats.deferred.fetch_add(1, Relaxed);
        Ok(None)
    }

    /// The busdma softint: complete deferred loads in order while they fit.
    fn run_fifo(&'static self, ctx: &SoftCtx) {
        loop {
            let mut g = self.fifo.lock();
            let Some(mut d) = g.pop_front() else { return };
            match self.try_load(&mut d.map.loaded, d.buf, d.dir) {
                Ok(()) => {
                    self.fifo_len.store(g.len(), Release);
                    drop(g);
                    self.stats.loads.inc();
                    (d.done)(ctx, d.map, Ok(()), d.arg);
                }
                Err(e) if matches!(e.error, DmaError::NoSpace { .. }) => {
                    // Still no room: put it back at the head, keep the order.
                    d.buf = e.buf;
                    g.push_front(d);
                    return;
                }
                Err(e) => {
                    self.fifo_len.store(g.len(), Release);
                    drop(g);
                    (d.done)(ctx, d.map, Err(e), d.arg);
                }
            }
            if self.fifo_len.load(Acquire) == 0 && self.waiters.load(Relaxed) > 0 {
                // Loads that waited behind the FIFO may go now.
                wakeup(wchan(self));
            }
        }
    }
}

/// The lazy-flush callout (shared by every lazy tag).
static LAZY_CALLOUT: crate::callout::Callout = crate::callout::Callout::new(lazy_callout);

fn lazy_callout(_: &SoftCtx) {
    for t in tags() {
        t.lazy_tick();
    }
}

/// The domain's counters: (pages mapped now, peak).
pub fn domain_pages() -> (u64, u64) {
    let d = kernel().dma_domain();
    (d.pages_mapped.load(Relaxed), d.pages_peak.load(Relaxed))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::FlushQ;
    use crate::iommu::Iova;

    /// The lazy queue is bounded by construction: a push past its capacity
    /// is refused (the caller flushes), never grown; `take` empties it in
    /// chunks and makes room again.
    #[test]
    fn flush_queue_is_bounded() {
        let mut q = FlushQ::new(3);
        assert!(q.is_empty());
        for i in 0..3u64 {
            assert!(q.push((Iova(i << 12), 4096)));
        }
        assert!(!q.push((Iova(9 << 12), 4096)), "a full queue refuses");
        assert_eq!(q.entries.len(), 3, "and does not grow");
        let mut out = [(Iova(0), 0); 2];
        assert_eq!(q.take(&mut out), 2);
        assert_eq!(out, [(Iova(1 << 12), 4096), (Iova(2 << 12), 4096)]);
        assert!(q.push((Iova(9 << 12), 4096)), "room again after a take");
        let mut all = [(Iova(0), 0); 8];
        assert_eq!(q.take(&mut all), 2);
        assert_eq!(&all[..2], &[(Iova(0), 4096), (Iova(9 << 12), 4096)]);
        assert!(q.is_empty());
        assert_eq!(q.take(&mut all), 0);
        // A zero batch still has room for one entry (flushed at once).
        let mut z = FlushQ::new(0);
        assert!(z.push((Iova(0), 4096)));
        assert!(!z.push((Iova(4096), 4096)));
    }
}
