//! `slots` (the mail's proposal): a fixed number of IOVA slots reserved at
//! attach, with a free queue. A load maps the buffer into a free slot
//! (skipping the map if the slot still maps exactly that buffer); an unload
//! only returns the slot. The PTEs "hang around until someone else grabs
//! them": the device can reach the last buffer of every slot.

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
    let Some(i) = s.free.lock().pop() else {
        return fail(DmaError::NoSpace { len }, buf);
    };
    let slot_iova = s.base + i as usize * s.size;
    let (cpa, clen, cacc) = &s.cur[i as usize];
    let acc = dir.access() as usize + 1;
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

/// Return the slot; its PTEs stay.
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
            free: SpinMutex::new(Ipl::Vm, (0..cfg.slots as u16).rev().collect()),
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
