//! vnd: a disk backed by a host file, through a non-DMA file device.
//!
//! As NetBSD's `vnd`, the unit is served by its own kernel thread,
//! `vndthread`: `strategy` queues the buf and wakes it; the thread hands
//! each buf to the file device (the buffer's kernel address: programmed
//! I/O, no IOMMU) and goes back to sleep. The device interrupts when a
//! command is done; the completion (reap, set the error, `biodone`) runs in
//! the unit's completion mode, and wakes the thread if bufs wait for a free
//! command slot.
//!
//! A command slot holds the buf while the device works on it: the device
//! writes into, or reads from, the buf's data, which nothing else touches
//! until the slot is reaped. The slots are a [`crate::slot::SlotTable`]:
//! vndthread claims the id it took off the free list and lends it to the
//! device with the command; the completion reclaims it by the id the
//! device echoes (a completion for a slot that is not out is ignored).
//!
//! # Contexts
//! `strategy`: any (it never sleeps).

use alloc::boxed::Box;
use alloc::string::String;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};

use super::completer::{self, Completer, WorkCtx};
use super::{DiskOp, DiskStatus, FileCmd, FileDevice};
use crate::bio::{
    BioError, BlockDev, BufBox, BufOp, BufQueue, BufqStrategy, DEV_BSIZE, biodone, bounds_check,
};
use crate::completion::Completion;
use crate::ctx::ThreadCtx;
use crate::intr::{IntrError, intr_establish};
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::once::Once;
use crate::sched::{KThread, SchedError, kthread_create, sleep_interlocked, wakeup, wchan};
use crate::slot::SlotTable;

/// Errors of [`Vnd::attach`], each naming the unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// The completion path could not be set up.
    #[error(transparent)]
    Completer(#[from] completer::AttachError),
    /// The interrupt could not be established.
    #[error("{unit}: interrupt: {source}")]
    Intr {
        /// The unit.
        unit: &'static str,
        /// Why.
        #[source]
        source: IntrError,
    },
    /// `vndthread` could not be created.
    #[error("{unit}: vndthread on cpu{cpu}: {source}")]
    Thread {
        /// The unit.
        unit: &'static str,
        /// The CPU it was to run on.
        cpu: usize,
        /// Why.
        #[source]
        source: SchedError,
    },
}

/// Attach-time configuration.
#[derive(Clone, Debug)]
pub struct VndConfig {
    /// Unit name.
    pub name: &'static str,
    /// The file device's name, as the attach message shows it (`filedev0`).
    pub parent: &'static str,
    /// Completion mode.
    pub completion: Completion,
    /// CPU of its thread and interrupts.
    pub cpu: usize,
    /// Commands in flight at once.
    pub slots: usize,
    /// Largest transfer.
    pub max_transfer: usize,
    /// Refuse writes.
    pub read_only: bool,
}

/// Counters.
#[derive(Debug, Default)]
pub struct VndStats {
    /// Commands submitted.
    pub xfers: AtomicU64,
    /// Bufs finished with an error.
    pub errors: AtomicU64,
}

struct State {
    bufq: BufQueue,
    free: alloc::vec::Vec<u16>,
}

/// A vnd unit.
pub struct Vnd {
    name: &'static str,
    parent: &'static str,
    dev: &'static dyn FileDevice,
    sectors: u64,
    read_only: bool,
    max_transfer: usize,
    completer: &'static Completer,
    state: SpinMutex<State>,
    slots: SlotTable<Option<BufBox>>,
    chan: AtomicU32,
    stop: AtomicBool,
    thread: SpinMutex<Option<KThread>>,
    /// Counters.
    pub stats: VndStats,
}

impl Vnd {
    /// Attach a vnd on file device `dev`. Thread or host context.
    pub fn attach(
        cfg: VndConfig,
        dev: &'static dyn FileDevice,
    ) -> Result<&'static Vnd, AttachError> {
        let unit = cfg.name;
        let cell: &'static Once<&'static Vnd> = Box::leak(Box::new(Once::new()));
        let completer = Completer::attach(cfg.name, cfg.completion, cfg.cpu, move |ctx| {
            if let Some(v) = cell.get() {
                v.done(ctx);
            }
        })?;
        let n = cfg.slots.clamp(1, 1024);
        let vnd: &'static Vnd = Box::leak(Box::new(Vnd {
            name: cfg.name,
            parent: cfg.parent,
            dev,
            sectors: dev.size() / DEV_BSIZE as u64,
            read_only: cfg.read_only,
            max_transfer: cfg.max_transfer,
            completer,
            state: SpinMutex::new(
                Ipl::Bio,
                State {
                    bufq: BufQueue::new(BufqStrategy::Fcfs),
                    free: (0..n as u16).rev().collect(),
                },
            ),
            slots: SlotTable::new(n, |_| None),
            chan: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            thread: SpinMutex::new(Ipl::None, None),
            stats: VndStats::default(),
        }));
        let _ = cell.set(vnd); // the only set: before the device can interrupt
        let vector = intr_establish(Ipl::Bio, cfg.name, move |ctx| vnd.completer.interrupt(ctx))
            .map_err(|source| AttachError::Intr { unit, source })?;
        dev.set_interrupt(cfg.cpu, vector);
        let t = kthread_create(Some(cfg.cpu), "vndthread", move |ctx| vnd.vndthread(ctx)).map_err(
            |source| AttachError::Thread {
                unit,
                cpu: cfg.cpu,
                source,
            },
        )?;
        *vnd.thread.lock() = Some(t);
        Ok(vnd)
    }

    /// The unit's own thread: hand queued bufs to the file device.
    fn vndthread(&self, ctx: &ThreadCtx) {
        loop {
            let mut st = self.state.lock();
            while st.bufq.is_empty() || st.free.is_empty() {
                if self.stop.load(Acquire) {
                    return;
                }
                if sleep_interlocked(ctx, wchan(&self.chan), st).is_err() {
                    return;
                }
                st = self.state.lock();
            }
            let mut sent = false;
            while let (false, Some(&id)) = (st.bufq.is_empty(), st.free.last()) {
                st.free.pop();
                let Some(bp) = st.bufq.get() else {
                    st.free.push(id);
                    break;
                };
                drop(st);
                self.submit(id, bp);
                sent = true;
                st = self.state.lock();
            }
            drop(st);
            if sent {
                self.dev.doorbell();
            }
        }
    }

    fn submit(&self, id: u16, bp: BufBox) {
        let op = match bp.op {
            BufOp::Read => DiskOp::Read,
            BufOp::Write => DiskOp::Write,
            BufOp::Flush => DiskOp::Flush,
        };
        let (kva, len) = match (&bp.data, bp.op) {
            (Some(d), BufOp::Read | BufOp::Write) => (
                crate::kernel::kernel().physmem().kva(d.pa()) as usize,
                bp.bcount,
            ),
            _ => (0, 0),
        };
        let cmd = FileCmd {
            id,
            op,
            offset: bp.offset(),
            kva,
            len,
            fua: bp.fua,
        };
        // `id` came off the free list: the slot is ours until the device
        // has it.
        let Some(mut slot) = self.slots.claim(id.into()) else {
            debug_assert!(false, "{}: slot {id} listed free but taken", self.name);
            return;
        };
        *slot = Some(bp);
        slot.lend();
        self.stats.xfers.fetch_add(1, Relaxed);
        if !self.dev.submit(cmd) {
            // The ring has a place per slot: it cannot be full.
            self.finish(id, DiskStatus::Invalid);
        }
    }

    fn finish(&self, id: u16, status: DiskStatus) {
        // The device returned `id`: the slot is ours again (unless it is
        // not out: then the completion is ignored).
        let Some(mut slot) = self.slots.reclaim(id.into()) else {
            return;
        };
        let Some(mut bp) = slot.take() else {
            return;
        };
        drop(slot); // free before listed, so the next claim finds it free
        match status {
            DiskStatus::Ok => bp.resid = 0,
            DiskStatus::Invalid => {
                bp.error = Some(BioError::Inval);
                bp.resid = bp.bcount;
            }
            DiskStatus::DmaFault => {
                bp.error = Some(BioError::Io);
                bp.resid = bp.bcount;
            }
            DiskStatus::MediaError(errno) => {
                bp.error = Some(BioError::from_media(errno));
                bp.resid = bp.bcount;
            }
        }
        if bp.error.is_some() {
            self.stats.errors.fetch_add(1, Relaxed);
        }
        self.state.lock().free.push(id);
        biodone(bp);
    }

    fn done(&self, _ctx: WorkCtx<'_>) {
        let mut any = false;
        while let Some(d) = self.dev.reap() {
            if (d.id as usize) < self.slots.len() {
                self.finish(d.id, d.status);
                any = true;
            }
        }
        if any {
            // Slots came free: bufs may be waiting for one.
            wakeup(wchan(&self.chan));
        }
    }

    /// Stop the unit's threads (detach). Thread context.
    pub fn detach(&self, ctx: &ThreadCtx) {
        self.stop.store(true, Release);
        wakeup(wchan(&self.chan));
        let t = self.thread.lock().take();
        if let Some(t) = t {
            let _ = t.join(ctx);
        }
        self.completer.detach(ctx);
    }
}

impl BlockDev for Vnd {
    fn name(&self) -> &'static str {
        self.name
    }

    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    fn strategy(&self, bp: BufBox) {
        let Some(bp) = bounds_check(self, bp) else {
            return;
        };
        let g = self.state.lock();
        let mut g = g;
        g.bufq.put(bp);
        drop(g);
        wakeup(wchan(&self.chan));
    }

    fn describe(&self) -> String {
        alloc::format!(
            "{} at {}: {} MiB, {}-byte sectors, completion {}, served by vndthread",
            self.name,
            self.parent,
            (self.sectors * DEV_BSIZE as u64) >> 20,
            DEV_BSIZE,
            self.completer.mode()
        )
    }
}
