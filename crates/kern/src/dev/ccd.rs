//! ccd: the concatenated disk driver, over sd units.
//!
//! With an interleave of *I* sectors, the ccd's sector *b* lives on
//! component `(b / I) mod n` at sector `(b / I / n) * I + b mod I` (every
//! component contributes the same number of whole stripes: the smallest
//! one's). With an interleave of 0 the components are concatenated.
//!
//! `strategy` splits a buf into component I/Os. As NetBSD's `ccdstart`, it
//! first allocates **every** component buf (with NOWAIT); if one is missing
//! it gives back those it got and keeps the buf for later (backoff), so an
//! I/O is either entirely in flight or not at all. Component bufs carry
//! views of the parent's data (lent with [`BufBox::lend_data`]: checked
//! disjoint, and the data is the parent's again only when every view has
//! come back) and typed links ([`ChildLink`]: the parent,
//! parked with [`BufBox::park`], this unit and the component; NetBSD's
//! `struct ccdbuf`); `biodone` hands them to [`StackedDev::child_done`],
//! which runs in the component's completion context: it frees the
//! component buf (to an IPL_BIO pool, or to `kmem` in the 1995
//! configuration, where that free races with thread code in the allocator)
//! and, after the last one, finishes the parent through ccd's own
//! completion mode: inline (`intr`), in ccd's softint, in ccd's thread, or
//! in an AST. Retries of backed-off bufs are single-threaded.
//!
//! # Contexts
//! `strategy`: any (it never sleeps).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

use super::completer::{self, Completer, WorkCtx};
use crate::bio::{
    BlockDev, BufAlloc, BufBox, BufOp, BufPool, BufQueue, BufqStrategy, ChildLink, DEV_BSIZE,
    IoDone, StackedDev, biodone, bounds_check,
};
use crate::callout::{CalloutHandle, CalloutsFull, callout_establish, callout_schedule};
use crate::completion::Completion;
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::once::Once;
use crate::vm::IoBuf;

/// Where component bufs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CbufAlloc {
    /// An IPL_BIO pool (safe from any completion context).
    Pool,
    /// `kmem`, as in 1995 (its protection decides whether completions at
    /// interrupt time corrupt it).
    Kmem,
}

/// Errors of [`Ccd::attach`], each naming the unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// No components were given.
    #[error("{unit}: no components")]
    NoComponents {
        /// The unit.
        unit: &'static str,
    },
    /// The components leave the ccd no sector: empty ones, or (with an
    /// interleave) a smallest one below one stripe.
    #[error(
        "{unit}: components too small for the interleave (smallest {smallest} sectors, interleave {interleave})"
    )]
    TooSmall {
        /// The unit.
        unit: &'static str,
        /// The smallest component's sectors.
        smallest: u64,
        /// The interleave in sectors (0: concatenation).
        interleave: u64,
    },
    /// The completion path could not be set up.
    #[error(transparent)]
    Completer(#[from] completer::AttachError),
    /// The backoff retry callout could not be established.
    #[error("{unit}: retry callout: {source}")]
    Callout {
        /// The unit.
        unit: &'static str,
        /// Why.
        #[source]
        source: CalloutsFull,
    },
}

/// Attach-time configuration.
pub struct CcdConfig {
    /// Unit name.
    pub name: &'static str,
    /// Components, in order.
    pub components: Vec<&'static dyn BlockDev>,
    /// Interleave in sectors (0: concatenation).
    pub interleave: u64,
    /// How the parent buf is finished.
    pub completion: Completion,
    /// CPU for the thread (thread mode).
    pub cpu: usize,
    /// Component buf allocator.
    pub cbufs: CbufAlloc,
    /// Component bufs in the pool.
    pub pool_size: usize,
    /// Refuse writes.
    pub read_only: bool,
}

/// Counters.
#[derive(Debug, Default)]
pub struct CcdStats {
    /// Parent bufs started.
    pub xfers: AtomicU64,
    /// Component I/Os issued.
    pub component_ios: AtomicU64,
    /// Starts that backed off for lack of component bufs.
    pub backoffs: AtomicU64,
    /// Parent bufs finished with an error.
    pub errors: AtomicU64,
}

struct State {
    /// Parents waiting for component bufs (backoff), in order.
    waiting: BufQueue,
    /// Parents whose components are all done, to finish in the mode.
    done: BufQueue,
}

/// A ccd unit.
pub struct Ccd {
    name: &'static str,
    comps: Box<[&'static dyn BlockDev]>,
    /// Cumulative start sector of each component (concatenation).
    starts: Box<[u64]>,
    ileave: u64,
    sectors: u64,
    read_only: bool,
    max_transfer: usize,
    completer: &'static Completer,
    cbufs: &'static dyn BufAlloc,
    state: SpinMutex<State>,
    retrying: AtomicBool,
    /// The unit itself, as its component bufs' `driver` link (set once at
    /// attach, before any I/O).
    me: Once<&'static Ccd>,
    /// Retries backed-off parents (set once at attach).
    retry: Once<CalloutHandle>,
    /// Counters.
    pub stats: CcdStats,
}

/// A piece of a parent I/O on one component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Component index.
    pub comp: usize,
    /// Sector on the component.
    pub blkno: u64,
    /// Sectors.
    pub nsect: u64,
    /// Byte offset in the parent's data.
    pub offset: usize,
}

impl Ccd {
    /// Attach a ccd over `cfg.components`. Thread or host context.
    pub fn attach(cfg: CcdConfig) -> Result<&'static Ccd, AttachError> {
        let unit = cfg.name;
        let n = cfg.components.len();
        if n == 0 {
            return Err(AttachError::NoComponents { unit });
        }
        let (starts, sectors): (Box<[u64]>, u64) =
            if let Some(ileave) = core::num::NonZeroU64::new(cfg.interleave) {
                // Every component contributes the smallest one's whole stripes.
                let min = cfg
                    .components
                    .iter()
                    .map(|c| c.sectors())
                    .min()
                    .unwrap_or(0);
                let per = min / ileave * ileave.get();
                (Box::new([]), per * n as u64)
            } else {
                let mut acc = 0;
                let starts = cfg
                    .components
                    .iter()
                    .map(|c| {
                        let s = acc;
                        acc += c.sectors();
                        s
                    })
                    .collect();
                (starts, acc)
            };
        if sectors == 0 {
            return Err(AttachError::TooSmall {
                unit,
                smallest: cfg
                    .components
                    .iter()
                    .map(|c| c.sectors())
                    .min()
                    .unwrap_or(0),
                interleave: cfg.interleave,
            });
        }
        let cbufs: &'static dyn BufAlloc = match cfg.cbufs {
            CbufAlloc::Pool => Box::leak(Box::new(BufPool::new(cfg.name, cfg.pool_size.max(4)))),
            CbufAlloc::Kmem => &crate::bio::KMEM_BUFS,
        };
        let max_transfer = cfg
            .components
            .iter()
            .map(|c| c.max_transfer())
            .min()
            .unwrap_or(DEV_BSIZE);
        let cell: &'static Once<&'static Ccd> = Box::leak(Box::new(Once::new()));
        let completer = Completer::attach(cfg.name, cfg.completion, cfg.cpu, move |ctx| {
            if let Some(c) = cell.get() {
                c.work(ctx);
            }
        })?;
        let ccd: &'static Ccd = Box::leak(Box::new(Ccd {
            name: cfg.name,
            comps: cfg.components.into_boxed_slice(),
            starts,
            ileave: cfg.interleave,
            sectors,
            read_only: cfg.read_only,
            // A parent can be as large as the component limit times the
            // stripes it spans; keep it to one component transfer per
            // component.
            max_transfer: max_transfer * n,
            completer,
            cbufs,
            state: SpinMutex::new(
                Ipl::Bio,
                State {
                    waiting: BufQueue::new(BufqStrategy::Fcfs),
                    done: BufQueue::new(BufqStrategy::Fcfs),
                },
            ),
            retrying: AtomicBool::new(false),
            me: Once::new(),
            retry: Once::new(),
            stats: CcdStats::default(),
        }));
        // The only sets of these cells: they cannot fail.
        let _ = cell.set(ccd);
        let _ = ccd.me.set(ccd);
        let retry = callout_establish(move |_| ccd.retry())
            .map_err(|source| AttachError::Callout { unit, source })?;
        let _ = ccd.retry.set(retry);
        Ok(ccd)
    }

    /// Its components.
    pub fn components(&self) -> &[&'static dyn BlockDev] {
        &self.comps
    }

    /// The component pieces of `nsect` sectors at `blkno`: calls `f` for
    /// each, in order.
    pub fn map(&self, blkno: u64, nsect: u64, mut f: impl FnMut(Chunk)) {
        let (mut b, mut left, mut off) = (blkno, nsect, 0usize);
        while left > 0 {
            let (comp, cblk, run) = if let Some(ileave) = core::num::NonZeroU64::new(self.ileave) {
                let n = self.comps.len() as u64;
                let unit = b / ileave;
                let o = b % ileave;
                (
                    (unit % n) as usize,
                    (unit / n) * self.ileave + o,
                    self.ileave - o,
                )
            } else {
                let i = self.starts.partition_point(|s| *s <= b) - 1;
                let cblk = b - self.starts[i];
                (i, cblk, self.comps[i].sectors() - cblk)
            };
            let take = run.min(left);
            f(Chunk {
                comp,
                blkno: cblk,
                nsect: take,
                offset: off,
            });
            b += take;
            left -= take;
            off += take as usize * DEV_BSIZE;
        }
    }

    /// Split `bp` into component I/Os and start them, or give it back if a
    /// component buf is missing.
    fn start_one(&self, mut bp: BufBox) -> Result<(), BufBox> {
        let Some(&me) = self.me.get() else {
            return Err(bp); // not attached yet: cannot happen
        };
        let (op, blkno, nsect, fua) = (bp.op, bp.blkno, (bp.bcount / DEV_BSIZE) as u64, bp.fua);
        let n = match op {
            BufOp::Flush => self.comps.len(),
            _ => {
                let mut n = 0;
                self.map(blkno, nsect, |_| n += 1);
                n
            }
        };
        // Every component buf first, or none.
        let mut bufs = BufQueue::new(BufqStrategy::Fcfs);
        let mut short = false;
        for _ in 0..n {
            match BufBox::new_in(self.cbufs) {
                Some(k) => bufs.put(k),
                None => short = true,
            }
        }
        if short {
            drop(bufs); // frees what we got
            return Err(bp);
        }
        // Fill them, in the order of the walk: a flush to every component,
        // or a piece of the parent's data each, as a view of it (the data
        // is lent until every child has given its view back).
        let mut kids = BufQueue::new(BufqStrategy::Fcfs);
        match op {
            BufOp::Flush => {
                while let Some(mut k) = bufs.get() {
                    k.op = BufOp::Flush;
                    kids.put(k);
                }
            }
            _ => {
                let mut lent = bp.lend_data();
                debug_assert!(lent.is_some(), "bounds_check saw the data");
                self.map(blkno, nsect, |ch| {
                    let Some(mut k) = bufs.get() else { return };
                    let bytes = ch.nsect as usize * DEV_BSIZE;
                    k.op = op;
                    k.fua = fua;
                    k.blkno = ch.blkno;
                    k.bcount = bytes;
                    // The chunks ascend without overlapping, so the view
                    // is always there.
                    k.data = lent.as_mut().and_then(|l| l.view(ch.offset, bytes));
                    kids.put(k);
                });
            }
        }
        // Issue the component bufs: the same walk as above, so the same
        // order as `kids`, which tells each its component.
        let mut parent = bp.park(kids.len() as u32);
        self.stats.xfers.fetch_add(1, Relaxed);
        let mut issue = |comp: usize| {
            let (Some(mut k), Some(share)) = (kids.get(), parent.child()) else {
                return;
            };
            k.iodone = Some(IoDone::Child(ChildLink {
                parent: share,
                driver: me,
                comp,
            }));
            self.stats.component_ios.fetch_add(1, Relaxed);
            self.comps[comp].strategy(k);
        };
        match op {
            BufOp::Flush => (0..self.comps.len()).for_each(&mut issue),
            _ => self.map(blkno, nsect, |ch| issue(ch.comp)),
        }
        Ok(())
    }

    /// Retry backed-off parents in a millisecond.
    fn schedule_retry(&self) {
        if let Some(&h) = self.retry.get() {
            callout_schedule(h, 1_000_000);
        }
    }

    /// Retry backed-off parents, in order, one retrier at a time.
    fn retry(&self) {
        if self.retrying.swap(true, AcqRel) {
            return;
        }
        loop {
            let bp = self.state.lock().waiting.get();
            let Some(bp) = bp else { break };
            if let Err(bp) = self.start_one(bp) {
                self.state.lock().waiting.put_front(bp);
                self.schedule_retry();
                break;
            }
        }
        self.retrying.store(false, Release);
    }

    /// ccd's completion work: finish the parents whose components are done,
    /// then retry backed-off ones.
    fn work(&self, _ctx: WorkCtx<'_>) {
        loop {
            let bp = self.state.lock().done.get();
            match bp {
                Some(bp) => biodone(bp),
                None => break,
            }
        }
        if !self.state.lock().waiting.is_empty() {
            self.retry();
        }
    }

    fn finish_parent(&self, mut bp: BufBox) {
        if bp.error.is_some() {
            bp.resid = bp.bcount;
            self.stats.errors.fetch_add(1, Relaxed);
        } else {
            bp.resid = 0;
        }
        if self.completer.mode() == Completion::Intr {
            biodone(bp);
            if !self.state.lock().waiting.is_empty() {
                self.retry();
            }
        } else {
            self.state.lock().done.put(bp);
            self.completer.post();
        }
    }
}

impl StackedDev for Ccd {
    /// A component I/O is done (component completion context).
    fn child_done(&self, mut child: BufBox, link: ChildLink) {
        let error = child.error;
        let view = child.data.take();
        // Free the component buf (the pool, or kmem).
        drop(child);
        // Give the view back with this child's share of the parent.
        if let Some(parent) = link.parent.release(error, view) {
            // The last child: the parent is ours again.
            self.finish_parent(parent);
        } else if !self.state.lock().waiting.is_empty() {
            // A component buf was freed: let a backed-off parent try again.
            if self.completer.mode() == Completion::Intr {
                self.retry();
            } else {
                self.completer.post();
            }
        }
    }
}

impl BlockDev for Ccd {
    fn name(&self) -> &'static str {
        self.name
    }

    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read_only(&self) -> bool {
        self.read_only || self.comps.iter().any(|c| c.read_only())
    }

    fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    fn strategy(&self, bp: BufBox) {
        let Some(bp) = bounds_check(self, bp) else {
            return;
        };
        // Keep the order: behind any backed-off buf.
        let queued = !self.state.lock().waiting.is_empty();
        if queued {
            self.state.lock().waiting.put(bp);
            return self.retry();
        }
        if let Err(bp) = self.start_one(bp) {
            self.stats.backoffs.fetch_add(1, Relaxed);
            self.state.lock().waiting.put(bp);
            self.schedule_retry();
        }
    }

    fn alloc_buf(&self, len: usize) -> Option<IoBuf> {
        // The first component's memory: with permanent DVMA every component
        // must be able to map it, so ccd requires components that share the
        // DVMA mode (checked by the configuration).
        self.comps[0].alloc_buf(len)
    }

    fn alloc_buf_wait(
        &self,
        ctx: &crate::ctx::ThreadCtx,
        len: usize,
    ) -> Result<IoBuf, crate::sched::Interrupted> {
        self.comps[0].alloc_buf_wait(ctx, len)
    }

    fn describe(&self) -> String {
        let names: Vec<&str> = self.comps.iter().map(|c| c.name()).collect();
        alloc::format!(
            "{} at {}: {} MiB, {}, completion {}",
            self.name,
            names.join("+"),
            (self.sectors * DEV_BSIZE as u64) >> 20,
            if self.ileave == 0 {
                String::from("concatenated")
            } else {
                alloc::format!("interleave {} KiB", self.ileave * DEV_BSIZE as u64 / 1024)
            },
            self.completer.mode()
        )
    }
}
