//! `lazy`: map at load as `strict` does, but queue the unmaps and do them
//! in batches, when the queue is full or its oldest entry is older than the
//! timeout (Linux: 256 entries, 10 ms). Until then the device can still
//! reach those buffers.

use alloc::boxed::Box;
use core::sync::atomic::Ordering::*;

use super::{DmaDir, DmaError, DmaTag, Kind, LoadError, Loaded, page_span, pages, strict};
use crate::iommu::Iova;
use crate::kernel::kernel;
use crate::lock::SpinMutex;
use crate::vm::IoBuf;

/// `lazy`: the queue of unmaps not yet done. A fixed array sized at attach
/// (`lazy_batch` entries): unloads run in interrupt context, which must not
/// allocate, so the queue never grows. A push that finds it full (another
/// CPU filled it between a push and its flush) flushes and tries again.
pub(super) struct FlushQ {
    entries: Box<[(Iova, usize)]>,
    len: usize,
    oldest_ns: u64,
}

impl FlushQ {
    pub(super) fn new(cap: usize) -> Self {
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
/// `lazy`: allocate an IOVA range and map, as `strict`; when the window is
/// full, the space may be sitting in the flush queue: release it and retry.
pub(super) fn load(
    tag: &DmaTag,
    q: &SpinMutex<FlushQ>,
    out: &mut Option<Loaded>,
    buf: IoBuf,
    dir: DmaDir,
) -> Result<(), LoadError> {
    let (_, _, mlen) = page_span(&buf);
    let iova = match tag.dom.iova.alloc(mlen) {
        Ok(i) => i,
        Err(_) => {
            tag.lazy_release(q);
            match tag.dom.iova.alloc(mlen) {
                Ok(i) => i,
                Err(_) => {
                    let len = buf.capacity();
                    return Err(LoadError {
                        error: DmaError::NoSpace { len },
                        buf,
                    });
                }
            }
        }
    };
    strict::map(tag, out, buf, dir, iova, mlen)
}

impl DmaTag {
    pub(super) fn lazy_unload(&self, q: &SpinMutex<FlushQ>, iova: Iova, len: usize) {
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
                self.lazy_schedule(self.cfg.lazy_timeout_ns);
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
    pub(super) fn lazy_release(&self, q: &SpinMutex<FlushQ>) -> bool {
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

    /// Arm the tag's flush callout.
    fn lazy_schedule(&self, delay_ns: u64) {
        if let Some(&h) = self.lazy_callout.get() {
            crate::callout::callout_schedule(h, delay_ns);
        }
    }

    /// Lazy mode: flush what is older than the timeout (its callout).
    pub(super) fn lazy_tick(&self) {
        if let Kind::Lazy(q) = &self.kind {
            let now = kernel().md().nanotime();
            let g = q.lock();
            let due = !g.is_empty() && now.saturating_sub(g.oldest_ns) >= self.cfg.lazy_timeout_ns;
            let any = !g.is_empty();
            drop(g);
            if due {
                self.lazy_flush(q);
            } else if any {
                self.lazy_schedule(self.cfg.lazy_timeout_ns / 2);
            }
        }
    }

    /// Lazy mode: flush everything now (tests, shutdown).
    pub fn flush(&self) {
        if let Kind::Lazy(q) = &self.kind {
            self.lazy_flush(q);
        }
    }
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
