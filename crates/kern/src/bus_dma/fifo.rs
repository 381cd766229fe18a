//! The deferred-load FIFO: a load that finds no space is queued in its
//! tag's FIFO and completed, in order, by the `busdma` soft interrupt when
//! space is freed. Later loads never overtake it: while the FIFO is not
//! empty every load queues or fails (FreeBSD lets them overtake; dvma keeps
//! the order).

use core::sync::atomic::Ordering::*;

use super::{DmaDir, DmaError, DmaMap, DmaTag, LoadError, Wait, dmamap_load, tags};
use crate::ctx::SoftCtx;
use crate::ipl::Ipl;
use crate::kernel::kernel;
use crate::sched::{wakeup, wchan};
use crate::softint::{SoftintHandle, softint_schedule};
use crate::vm::IoBuf;

pub(super) struct Deferred {
    map: DmaMap,
    buf: IoBuf,
    dir: DmaDir,
    done: fn(&SoftCtx, DmaMap, Result<(), LoadError>, usize),
    arg: usize,
}

pub(super) fn busdma_softint() -> &'static SoftintHandle {
    let dom = kernel().dma_domain();
    if let Some(h) = dom.softint.get() {
        return h;
    }
    let h = crate::softint::softint_establish(Ipl::SoftBio, "busdma", |ctx| {
        for t in tags() {
            t.run_fifo(ctx);
        }
    })
    .expect("busdma softint");
    // Two first attaches racing: the loser's softint is never scheduled.
    let _ = dom.softint.set(h);
    dom.softint.get().expect("just set")
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
                let first = g.is_empty();
                let r = tag.enqueue(&mut g, map, e.buf, dir, done, arg);
                drop(g);
                if first && matches!(r, Ok(None)) {
                    // An unload between the failed load and the enqueue saw
                    // the FIFO empty and scheduled nothing (an interrupt on
                    // this CPU, or another CPU): without a retry this load
                    // would wait for the next unload, which may never come.
                    // The softint retries it now that it is queued (an
                    // unload after the enqueue sees the FIFO and schedules
                    // the softint itself).
                    softint_schedule(busdma_softint());
                }
                return r;
            }
            Err(e) => return Err((map, e)),
        }
    }
    tag.enqueue(&mut g, map, buf, dir, done, arg)
}

impl DmaTag {
    /// Space was freed: wake sleepers, run the FIFO.
    pub(super) fn space_freed(&self) {
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
