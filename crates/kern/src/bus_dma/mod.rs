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
//!
//! # Where the code is
//! This file holds the tag, the map and the `match`es over the five modes
//! side by side (load, unload, sync); each mode's work is in its own file:
//! `strict.rs`, `lazy.rs`, `slots.rs`, and `pool.rs` for `permanent` and
//! `shadow`, which share the domain's pool. The window is `domain.rs`; the
//! deferred-load FIFO and its soft interrupt are `fifo.rs`.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

use crate::callout::CalloutHandle;
use crate::ctx::ThreadCtx;
use crate::iommu::{DmaAccess, IOPAGE, Iova};
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::lock::SpinMutex;
use crate::once::Once;
use crate::percpu::PerCpuCounter;
use crate::sched::{Interrupted, sleep_interlocked, wchan};
use crate::statclock::{self, Part};
use crate::vm::{IoBuf, Paddr, PhysRange};

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

impl core::error::Error for DmaError {}

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

mod domain;
mod fifo;
mod lazy;
mod pool;
mod slots;
mod strict;

pub use domain::Domain;
pub use fifo::dmamap_load_deferred;
pub use pool::DmaPool;

use fifo::Deferred;
use lazy::FlushQ;
use slots::SlotSet;

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

/// How a tag maps: one variant per [`DvmaMode`], each implemented in its
/// own file (`strict.rs`, `lazy.rs`, `slots.rs`, `pool.rs` for the two that
/// share the pool). The `match`es over it in this file (load, unload, sync)
/// are the five modes side by side.
// The tag is leaked once per driver instance: the size of its largest
// variant costs nothing, and boxing would be one more indirection per load.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Strict,
    Lazy(SpinMutex<FlushQ>),
    Slots(SlotSet),
    Permanent(&'static DmaPool),
    Shadow(&'static DmaPool),
}

impl Kind {
    /// The pool of `permanent` and `shadow`.
    fn pool(&self) -> Option<&'static DmaPool> {
        match self {
            Kind::Permanent(p) | Kind::Shadow(p) => Some(p),
            Kind::Strict | Kind::Lazy(_) | Kind::Slots(_) => None,
        }
    }
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
    /// `lazy`: the callout that flushes old unloads (set at creation).
    lazy_callout: Once<CalloutHandle>,
    /// Counters.
    pub stats: TagStats,
}

/// Tags a boot may create.
const MAX_TAGS: usize = 256;

/// Every tag created since boot (none when no kernel is booted). A tag
/// lives as long as the boot: its memory is leaked with its mappings,
/// which die with the machine; the kernel's table of them is dropped with
/// the kernel.
pub fn tags() -> impl Iterator<Item = &'static DmaTag> {
    crate::kernel::try_kernel()
        .into_iter()
        .flat_map(|k| k.dma_domain().tags.iter().copied())
}

/// Create a tag (driver attach). Thread or host context.
pub fn tag_create(name: &'static str, cfg: TagConfig) -> Result<&'static DmaTag, DmaError> {
    let k = kernel();
    let dom = k.dma_domain();
    fifo::busdma_softint();
    let kind = match cfg.mode {
        DvmaMode::Strict => Kind::Strict,
        DvmaMode::Lazy => Kind::Lazy(SpinMutex::new(Ipl::Vm, FlushQ::new(cfg.lazy_batch))),
        DvmaMode::Slots => Kind::Slots(SlotSet::new(dom, &cfg)?),
        DvmaMode::Permanent => Kind::Permanent(dom.shared_pool(cfg.pool_bytes)?),
        DvmaMode::Shadow => Kind::Shadow(dom.shared_pool(cfg.pool_bytes)?),
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
        lazy_callout: Once::new(),
        stats: TagStats::default(),
    }));
    if let Some(p) = tag.kind.pool() {
        // The pool's pages are held for this tag's devices, always.
        tag.stats.held(p.pages() as i64);
    }
    if let Kind::Lazy(_) = &tag.kind {
        let h = crate::callout::callout_establish(move |_| tag.lazy_tick())
            .map_err(|_| DmaError::NoSpace { len: 0 })?;
        let _ = tag.lazy_callout.set(h); // the only set
    }
    if dom.tags.register(tag).is_err() {
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

#[derive(Clone, Copy)]
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
    match &tag.kind {
        Kind::Permanent(p) => {
            let r = p.alloc(len)?;
            Some(IoBuf::from_range(r, len, *p))
        }
        Kind::Strict | Kind::Lazy(_) | Kind::Slots(_) | Kind::Shadow(_) => IoBuf::alloc(len),
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
///
/// The common case (nothing queued for DVMA space, and the mode's load
/// succeeds at once) is inlined into the caller: the buffer then moves into
/// the map in registers. Passed by memory through a call chain, the
/// 48-byte `IoBuf` was written with one width and read back with another,
/// and every such read waited for the stores to retire (store-to-load
/// forwarding fails): `perf annotate` put half of `try_load`'s and of the
/// bench loop's samples on those loads. Waiting and failures go out of line
/// (`load_slow`).
#[inline]
pub fn dmamap_load(
    map: &mut DmaMap,
    buf: IoBuf,
    dir: DmaDir,
    wait: Wait<'_>,
) -> Result<(), LoadError> {
    let _part = statclock::enter(Part::BusDma);
    let tag = map.tag;
    if map.loaded.is_some() || buf.capacity() > map.maxsize {
        return load_slow(map, buf, dir, wait);
    }
    // Never overtake a deferred load.
    if tag.fifo_len.load(Acquire) > 0 {
        return load_slow(map, buf, dir, wait);
    }
    match tag.try_load(&mut map.loaded, buf, dir) {
        Ok(()) => {
            tag.stats.loads.inc();
            Ok(())
        }
        Err(e) if !matches!(e.error, DmaError::NoSpace { .. }) => Err(e),
        Err(e) => load_slow(map, e.buf, dir, wait),
    }
}

/// [`dmamap_load`] when its fast path does not apply: a busy map, a buffer
/// too big, loads queued before this one, or no DVMA space (then wait, or
/// fail with `NoSpace`).
#[inline(never)]
#[cold]
fn load_slow(map: &mut DmaMap, buf: IoBuf, dir: DmaDir, wait: Wait<'_>) -> Result<(), LoadError> {
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

/// `bus_dmamap_sync`.
pub fn dmamap_sync(map: &mut DmaMap, op: SyncOp) {
    let Some(l) = map.loaded.as_mut() else { return };
    if let (How::Bounce(r), Kind::Shadow(p)) = (l.how, &map.tag.kind) {
        // The only sync that does work (the bounce copy); the others are
        // a fence, left to the caller's part rather than pay a marker.
        let _part = statclock::enter(Part::BusDma);
        pool::sync_bounce(map.tag, p, l, r, op);
    }
    match op {
        SyncOp::PreRead | SyncOp::PreWrite => core::sync::atomic::fence(Release),
        SyncOp::PostRead | SyncOp::PostWrite => core::sync::atomic::fence(Acquire),
    }
}

/// `bus_dmamap_unload`: the map gives its buffer back. Any context.
/// Inlined, as [`dmamap_load`] is, so that the buffer leaves the map in
/// registers.
#[inline]
pub fn dmamap_unload(map: &mut DmaMap) -> Option<IoBuf> {
    let _part = statclock::enter(Part::BusDma);
    let l = map.loaded.take()?;
    let tag = map.tag;
    tag.stats.unloads.inc();
    match (&tag.kind, l.how) {
        (Kind::Strict, How::Mapped { iova, len }) => strict::unload(tag, iova, len),
        (Kind::Lazy(q), How::Mapped { iova, len }) => tag.lazy_unload(q, iova, len),
        (Kind::Slots(s), How::Slot(i)) => slots::unload(tag, s, i),
        (Kind::Permanent(_), How::Pool) => {}
        (Kind::Shadow(p), How::Bounce(r)) => pool::unload_bounce(p, r),
        // A map is loaded by its own tag, whose kind never changes.
        _ => debug_assert!(false, "bus_dma: a load that does not match its tag"),
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
            Kind::Slots(s) => s.pages(),
            Kind::Permanent(p) | Kind::Shadow(p) => p.pages(),
            Kind::Strict | Kind::Lazy(_) => 0,
        }
    }

    /// Deferred loads waiting now.
    pub fn fifo_len(&self) -> usize {
        self.fifo_len.load(Acquire)
    }

    /// Load `buf` into `out` (an empty map's slot), or give it back.
    #[inline]
    fn try_load(
        &'static self,
        out: &mut Option<Loaded>,
        buf: IoBuf,
        dir: DmaDir,
    ) -> Result<(), LoadError> {
        match &self.kind {
            Kind::Strict => strict::load(self, out, buf, dir),
            Kind::Lazy(q) => lazy::load(self, q, out, buf, dir),
            Kind::Slots(s) => slots::load(self, s, out, buf, dir),
            Kind::Permanent(p) => pool::load_permanent(p, out, buf, dir),
            Kind::Shadow(p) => pool::load_shadow(p, out, buf, dir),
        }
    }
}

/// The domain's counters: (pages mapped now, peak).
pub fn domain_pages() -> (u64, u64) {
    let d = kernel().dma_domain();
    (d.pages_mapped.load(Relaxed), d.pages_peak.load(Relaxed))
}
