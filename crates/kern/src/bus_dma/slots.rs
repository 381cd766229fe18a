//! `slots` (the mail's proposal): a fixed number of IOVA slots reserved at
//! attach, with a free queue. A load takes the free slot that still maps
//! exactly that buffer if there is one (no PTE written), else the slot
//! freed longest ago, and maps the buffer there; an unload only returns the
//! slot, at the tail of the queue. The PTEs "hang around until someone else
//! grabs them": the device can reach the last buffer of every slot.
//!
//! The free queue is least recently freed first. A stack (the slot freed
//! last is taken first) gave the last-freed slot's mapping to the next
//! buffer even when that buffer still had a mapping of its own in another
//! free slot: when buffers come back in a different order than they went
//! (a driver thread finishing a batch), almost every load wrote PTEs
//! (`dvma bench kernel`: slots/thread at queue depth 32, 0.97 maps per
//! I/O).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

use super::{
    DmaDir, DmaError, DmaSeg, DmaTag, Domain, How, LoadError, Loaded, TagConfig, page_span, pages,
};
use crate::iommu::{IOPAGE, Iova, IovaError};
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::vm::IoBuf;

pub(super) struct SlotSet {
    pub(super) base: Iova,
    pub(super) size: usize,
    pub(super) free: SpinMutex<Vec<u16>>,
    /// What each slot maps now: (pa, len, access as u8); len 0 = nothing.
    pub(super) cur: Box<[(AtomicU64, AtomicUsize, AtomicUsize)]>,
}

/// Map `buf` into a free slot (or find it still mapped there).
pub(super) fn load(
    tag: &DmaTag,
    s: &SlotSet,
    out: &mut Option<Loaded>,
    buf: IoBuf,
    dir: DmaDir,
) -> Result<(), LoadError> {
    let len = buf.capacity();
    let fail = |error, buf| Err(LoadError { error, buf });
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
    let acc = dir.access() as usize + 1;
    let maps_it = |i: u16| {
        let (cpa, clen, cacc) = &s.cur[i as usize];
        cpa.load(Relaxed) == mpa.get() && clen.load(Relaxed) == mlen && cacc.load(Relaxed) == acc
    };
    let i = {
        let mut free = s.free.lock();
        if free.is_empty() {
            drop(free);
            return fail(DmaError::NoSpace { len }, buf);
        }
        // The slot that still maps this buffer, else the one freed longest
        // ago (at most `slots` entries, under the lock, no allocation).
        let at = free.iter().position(|&i| maps_it(i)).unwrap_or(0);
        free.remove(at)
    };
    let slot_iova = s.base + i as usize * s.size;
    let (cpa, clen, cacc) = &s.cur[i as usize];
    if cpa.load(Relaxed) == mpa.get() && clen.load(Relaxed) == mlen && cacc.load(Relaxed) == acc {
        tag.stats.loads_no_pte.inc();
    } else {
        if let Err(e) = tag.dom.enter(tag, slot_iova, mpa, mlen, dir.access()) {
            s.free.lock().push(i);
            return fail(e, buf);
        }
        let delta = pages(mlen) - pages(clen.load(Relaxed));
        tag.dom.held(delta);
        tag.stats.held(delta);
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

/// Return the slot, at the tail of the free queue; its PTEs stay.
pub(super) fn unload(tag: &DmaTag, s: &SlotSet, i: u16) {
    s.free.lock().push(i);
    tag.space_freed();
}

impl SlotSet {
    /// Reserve `cfg.slots` slots of `cfg.maxsize` (rounded to pages) in the
    /// window, none mapping anything yet.
    pub(super) fn new(dom: &Domain, cfg: &TagConfig) -> Result<Self, DmaError> {
        let size = cfg.maxsize.div_ceil(IOPAGE) * IOPAGE;
        let total = size * cfg.slots;
        let base = dom
            .iova
            .alloc(total)
            .map_err(|IovaError::NoSpace { len }| DmaError::NoSpace { len })?;
        Ok(SlotSet {
            base,
            size,
            free: SpinMutex::new(Ipl::Vm, (0..cfg.slots as u16).collect()),
            cur: (0..cfg.slots)
                .map(|_| (AtomicU64::new(0), AtomicUsize::new(0), AtomicUsize::new(0)))
                .collect(),
        })
    }

    /// IOVA pages it reserves.
    pub(super) fn pages(&self) -> u64 {
        (self.size * self.cur.len() / IOPAGE) as u64
    }
}
