//! sd: the disk driver of a DMA disk controller.
//!
//! ```text
//! strategy(bp) ── bounds check ──> bufq ──> sd_start:
//!        take a command slot, dmamap_load(bp.data) (NoWait, or Wait in
//!        thread context), dmamap_sync PRE, submit a descriptor; doorbell
//! device ── DMA through the IOMMU ──> completion ring, interrupt (coalesced)
//! sdintr ──> Completer (intr | softint | ast | thread) ──> sd_done:
//!        reap, dmamap_sync POST, dmamap_unload, status -> error, biodone;
//!        sd_start again
//! ```
//!
//! A command slot owns its DMA map (created at attach) and, while in
//! flight, the buf. Slots move between the free list (under the driver's
//! IPL_BIO spin mutex), the context that starts them, the device, and the
//! context that reaps them; exactly one of these owns a slot at a time,
//! which the slot table ([`crate::slot`]) enforces: the starting context
//! claims the id it took off the free list, lends it to the device with the
//! command, and the reaping context reclaims it by the id the device
//! echoes (a completion for a slot that is not out is ignored).
//!
//! Out of DVMA space, a buf goes back to the head of the queue and the
//! driver retries when one of its own commands completes, or, with none in
//! flight, on the next clock tick; in `thread` mode the driver's thread
//! simply waits for space. Device errors (a media error, a DMA fault)
//! become EIO on that buf and nothing else.
//!
//! # Detach
//! [`Sd::detach`] (thread context) gives back what the unit holds of the
//! kernel's fixed tables that a later attach could run out of: its
//! interrupt vector ([`crate::intr::intr_disestablish`]: there are 16 at
//! IPL_BIO) and, in `thread` mode, its completion thread. A unit must be
//! idle (nothing queued, nothing in flight) to detach. Its DMA tag and
//! maps, its retry callout and (in `softint` and `ast` mode) its
//! completion softint or AST stay, unused, until the kernel goes down
//! (bounded tables: 256 tags, 128 callouts, 64 softints, 64 ASTs per
//! boot); a softint or AST already scheduled when it detached finds the
//! unit detached and does nothing, so it cannot take the completions of
//! the controller's next unit. After detach `strategy` fails every buf
//! with EIO. The controller keeps its unit's vector until the next
//! attach points it elsewhere ([`DiskController::set_interrupt`]): a post
//! in between reaches whichever handler has the vector then, which
//! tolerates it.
//!
//! # Contexts
//! `strategy`: any (it never sleeps). The work of completion runs in the
//! context of the completion mode ([`super::completer`]). `attach`: thread
//! or host; `detach`: thread.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};

use super::completer::{self, Completer, WorkCtx};
use super::{DiskCmd, DiskController, DiskGeometry, DiskOp, DiskStatus};
use crate::bio::{
    BioError, BlockDev, BufBox, BufOp, BufQueue, BufqStrategy, DEV_BSIZE, biodone, bounds_check,
};
use crate::bus_dma::{
    DmaDir, DmaError, DmaMap, DmaTag, SyncOp, TagConfig, Wait, dmamap_create, dmamap_load,
    dmamap_sync, dmamap_unload, tag_create,
};
use crate::callout::{CalloutHandle, CalloutsFull, callout_establish, callout_schedule};
use crate::completion::Completion;
use crate::ctx::ThreadCtx;
use crate::intr::{IntrError, IntrHandle, intr_disestablish, intr_establish};
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::once::Once;
use crate::slot::{SlotRef, SlotTable};
use crate::statclock::{self, Part};
use crate::vm::IoBuf;

/// Errors of [`Sd::attach`], each naming the unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// The controller's sectors are not the buf layer's.
    #[error("{unit}: sector size {got} (only {want})")]
    SectorSize {
        /// The unit.
        unit: &'static str,
        /// The controller's sector size.
        got: u32,
        /// The only one supported ([`DEV_BSIZE`]).
        want: usize,
    },
    /// The unit's DMA tag could not be created.
    #[error("{unit}: DMA tag: {source}")]
    Tag {
        /// The unit.
        unit: &'static str,
        /// Why.
        #[source]
        source: DmaError,
    },
    /// A command slot's DMA map could not be created.
    #[error("{unit}: DMA map of command slot {slot}: {source}")]
    Map {
        /// The unit.
        unit: &'static str,
        /// The slot.
        slot: usize,
        /// Why.
        #[source]
        source: DmaError,
    },
    /// The completion path could not be set up.
    #[error(transparent)]
    Completer(#[from] completer::AttachError),
    /// The DVMA retry callout could not be established.
    #[error("{unit}: retry callout: {source}")]
    Callout {
        /// The unit.
        unit: &'static str,
        /// Why.
        #[source]
        source: CalloutsFull,
    },
    /// The interrupt could not be established.
    #[error("{unit}: interrupt: {source}")]
    Intr {
        /// The unit.
        unit: &'static str,
        /// Why.
        #[source]
        source: IntrError,
    },
}

/// Errors of [`Sd::detach`], each naming the unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetachError {
    /// I/O is queued or in flight: the unit stays attached.
    #[error("{unit}: busy ({inflight} commands in flight, bufs queued: {queued})")]
    Busy {
        /// The unit.
        unit: &'static str,
        /// Commands in flight.
        inflight: usize,
        /// Whether bufs wait in its queue.
        queued: bool,
    },
    /// It was detached already.
    #[error("{unit}: already detached")]
    Detached {
        /// The unit.
        unit: &'static str,
    },
}

/// Attach-time configuration of an sd unit.
#[derive(Clone, Debug)]
pub struct SdConfig {
    /// Unit name (`sd0`).
    pub name: &'static str,
    /// The controller's name, as the attach message shows it (`dmadisk0`).
    pub parent: &'static str,
    /// DVMA.
    pub dma: TagConfig,
    /// Completion mode.
    pub completion: Completion,
    /// CPU that takes the interrupts (and runs the thread).
    pub cpu: usize,
    /// Queue discipline.
    pub bufq: BufqStrategy,
    /// Refuse writes.
    pub read_only: bool,
}

/// Counters.
#[derive(Debug, Default)]
pub struct SdStats {
    /// Commands submitted.
    pub xfers: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Bufs finished with an error.
    pub errors: AtomicU64,
    /// Commands that faulted in DMA.
    pub dma_faults: AtomicU64,
    /// Starts that found no DVMA space and requeued.
    pub dvma_requeues: AtomicU64,
    /// Interrupts taken.
    pub intrs: AtomicU64,
}

struct Slot {
    map: DmaMap,
    bp: Option<BufBox>,
}

/// What loading a buf into a slot gave.
enum Loaded {
    /// A command to submit.
    Cmd(DiskCmd),
    /// No DVMA space: the buf back, with its data.
    NoSpace(BufBox),
    /// The buf failed (its error is set; it is in the slot).
    Failed,
}

struct State {
    bufq: BufQueue,
    free: Vec<u16>,
    starved: bool,
}

/// An sd unit.
pub struct Sd {
    name: &'static str,
    parent: &'static str,
    ctrl: &'static dyn DiskController,
    geom: DiskGeometry,
    tag: &'static DmaTag,
    completer: &'static Completer,
    read_only: bool,
    state: SpinMutex<State>,
    slots: SlotTable<Slot>,
    inflight: AtomicUsize,
    /// Retries the unit when it is starved of DVMA space with nothing in
    /// flight (set once at attach).
    retry: Once<CalloutHandle>,
    /// Its interrupt vector (set once at attach).
    vector: Once<IntrHandle>,
    /// Set by `detach`: the completion work and `strategy` do nothing more.
    detached: AtomicBool,
    /// Counters.
    pub stats: SdStats,
}

impl Sd {
    /// Attach an sd unit to controller `ctrl`. Thread or host context.
    pub fn attach(
        cfg: SdConfig,
        ctrl: &'static dyn DiskController,
    ) -> Result<&'static Sd, AttachError> {
        let unit = cfg.name;
        let geom = ctrl.geometry();
        if geom.sector_size as usize != DEV_BSIZE {
            return Err(AttachError::SectorSize {
                unit,
                got: geom.sector_size,
                want: DEV_BSIZE,
            });
        }
        let mut dma = cfg.dma.clone();
        dma.maxsize = dma.maxsize.min(geom.max_transfer);
        let tag =
            tag_create(unit, dma.clone()).map_err(|source| AttachError::Tag { unit, source })?;
        let depth = geom.queue_depth.max(1) as usize;
        let maps: Vec<DmaMap> = (0..depth)
            .map(|slot| {
                dmamap_create(tag, dma.maxsize).map_err(|source| AttachError::Map {
                    unit,
                    slot,
                    source,
                })
            })
            .collect::<Result<_, AttachError>>()?;
        let mut maps = maps.into_iter();
        let slots = SlotTable::new(depth, |_| Slot {
            map: maps.next().expect("a map per slot"),
            bp: None,
        });
        // The completer needs the unit and the unit needs the completer:
        // the unit is built first with a placeholder-free two-step leak.
        let cell: &'static Once<&'static Sd> = Box::leak(Box::new(Once::new()));
        let completer = Completer::attach(cfg.name, cfg.completion, cfg.cpu, move |ctx| {
            if let Some(sd) = cell.get() {
                sd.done(ctx);
            }
        })?;
        let sd: &'static Sd = Box::leak(Box::new(Sd {
            name: cfg.name,
            parent: cfg.parent,
            ctrl,
            geom,
            tag,
            completer,
            read_only: cfg.read_only,
            state: SpinMutex::new(
                Ipl::Bio,
                State {
                    bufq: BufQueue::new(cfg.bufq),
                    free: (0..depth as u16).rev().collect(),
                    starved: false,
                },
            ),
            slots,
            inflight: AtomicUsize::new(0),
            retry: Once::new(),
            vector: Once::new(),
            detached: AtomicBool::new(false),
            stats: SdStats::default(),
        }));
        let _ = cell.set(sd); // the only set
        let retry = callout_establish(move |_| {
            if sd.state.lock().starved {
                sd.start(None);
            }
        })
        .map_err(|source| AttachError::Callout { unit, source })?;
        let _ = sd.retry.set(retry); // the only set
        let vector = intr_establish(Ipl::Bio, cfg.name, move |ctx| {
            sd.stats.intrs.fetch_add(1, Relaxed);
            sd.completer.interrupt(ctx);
        })
        .map_err(|source| AttachError::Intr { unit, source })?;
        let _ = sd.vector.set(vector); // the only set
        ctrl.set_interrupt(cfg.cpu, vector);
        Ok(sd)
    }

    /// Detach the unit (see the module docs): it must be idle. When this
    /// returns its interrupt handler and completion work run nowhere and
    /// will not run again, and its vector and thread are free for the
    /// next attach. Thread context.
    pub fn detach(&self, ctx: &ThreadCtx) -> Result<(), DetachError> {
        {
            let st = self.state.lock();
            let inflight = self.inflight.load(Relaxed);
            if inflight != 0 || !st.bufq.is_empty() {
                return Err(DetachError::Busy {
                    unit: self.name,
                    inflight,
                    queued: !st.bufq.is_empty(),
                });
            }
            if self.detached.swap(true, AcqRel) {
                return Err(DetachError::Detached { unit: self.name });
            }
        }
        // After this no handler of ours runs anywhere; and every CPU has
        // run thread code since `detached` was set, so a softint or AST
        // of ours that runs later sees it.
        if let Some(&v) = self.vector.get() {
            intr_disestablish(ctx, v);
        }
        self.completer.detach(ctx);
        Ok(())
    }

    /// Has it been detached?
    pub fn is_detached(&self) -> bool {
        self.detached.load(Acquire)
    }

    /// Its DMA tag.
    pub fn tag(&self) -> &'static DmaTag {
        self.tag
    }

    /// Its completion mode.
    pub fn completion(&self) -> Completion {
        self.completer.mode()
    }

    /// Commands in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Relaxed)
    }

    /// Start what can be started. `ctx`: a thread context, if the caller may
    /// sleep for DVMA space.
    fn start(&self, ctx: Option<&crate::ctx::ThreadCtx>) {
        let mut rang = false;
        loop {
            let (mut slot, bp) = {
                let mut st = self.state.lock();
                if st.free.is_empty() || st.bufq.is_empty() {
                    break;
                }
                let id = st.free.pop().unwrap_or(0);
                // The slot is ours now: it was on the free list.
                let Some(slot) = self.slots.claim(id.into()) else {
                    debug_assert!(false, "{}: slot {id} listed free but taken", self.name);
                    break;
                };
                let bp = st.bufq.get();
                st.starved = false;
                match bp {
                    Some(bp) => (slot, bp),
                    None => {
                        drop(slot);
                        st.free.push(id);
                        break;
                    }
                }
            };
            // Sleep for DVMA space only in the driver's own thread, and only
            // when none of our commands is in flight: their completions are
            // reaped by this very thread, so sleeping with any outstanding
            // would wait on ourselves. With commands in flight, requeue; the
            // next completion runs `start` again.
            let may_sleep = match ctx {
                Some(c)
                    if self.completer.mode() == Completion::Thread
                        && self.inflight.load(Relaxed) == 0 =>
                {
                    Some(c)
                }
                _ => None,
            };
            if rang && may_sleep.is_some() {
                // Commands submitted but not yet rung for may hold DVMA
                // space; ring before sleeping for it.
                self.ring();
                rang = false;
            }
            self.inflight.fetch_add(1, Relaxed);
            match self.load(&mut slot, bp, may_sleep) {
                Loaded::Cmd(cmd) => {
                    // The device owns the slot until it completes `id`.
                    let id = slot.lend() as u16;
                    let cmd = DiskCmd { id, ..cmd };
                    self.stats.xfers.fetch_add(1, Relaxed);
                    if !self.ctrl.submit(cmd) {
                        // The ring holds queue_depth commands and we have at
                        // most that many slots: it cannot be full.
                        self.finish(id, DiskStatus::Invalid);
                    }
                    rang = true;
                }
                Loaded::Failed => self.complete(slot, DiskStatus::Invalid),
                Loaded::NoSpace(bp) => {
                    self.inflight.fetch_sub(1, Relaxed);
                    // No DVMA space: back to the head of the queue.
                    self.stats.dvma_requeues.fetch_add(1, Relaxed);
                    let id = slot.id() as u16;
                    drop(slot);
                    let mut st = self.state.lock();
                    st.bufq.put_front(bp);
                    st.free.push(id);
                    st.starved = true;
                    drop(st);
                    if self.inflight.load(Relaxed) == 0
                        && let Some(&h) = self.retry.get()
                    {
                        callout_schedule(h, 1_000_000);
                    }
                    break;
                }
            }
        }
        if rang {
            self.ring();
        }
    }

    /// Ring the controller's doorbell: the device's part of the CPU's time
    /// (the zero-latency RAM disk copies the data right there).
    fn ring(&self) {
        let _part = statclock::enter(Part::Device);
        self.ctrl.doorbell();
    }

    /// Load `bp` into `slot` and build its command.
    fn load(&self, slot: &mut Slot, mut bp: BufBox, ctx: Option<&crate::ctx::ThreadCtx>) -> Loaded {
        let nsect = (bp.bcount / DEV_BSIZE) as u32;
        let (op, dir) = match bp.op {
            BufOp::Flush => {
                let cmd = DiskCmd {
                    id: 0,
                    op: DiskOp::Flush,
                    lba: 0,
                    nsect: 0,
                    iova: crate::iommu::Iova(0),
                    fua: false,
                };
                slot.bp = Some(bp);
                return Loaded::Cmd(cmd);
            }
            BufOp::Read => (DiskOp::Read, DmaDir::FromDevice),
            BufOp::Write => (DiskOp::Write, DmaDir::ToDevice),
        };
        let data = bp.data.take().expect("bounds_check saw the data");
        let wait = match ctx {
            Some(c) => Wait::Ok(c),
            None => Wait::NoWait,
        };
        match dmamap_load(&mut slot.map, data, dir, wait) {
            Ok(()) => {}
            Err(e) => {
                bp.data = Some(e.buf);
                if matches!(e.error, DmaError::NoSpace { .. } | DmaError::FifoFull) {
                    return Loaded::NoSpace(bp);
                }
                // Anything else is this buf's error, not the device's.
                bp.error = Some(BioError::Inval);
                bp.resid = bp.bcount;
                slot.bp = Some(bp);
                return Loaded::Failed;
            }
        }
        dmamap_sync(
            &mut slot.map,
            if dir == DmaDir::ToDevice {
                SyncOp::PreWrite
            } else {
                SyncOp::PreRead
            },
        );
        let cmd = DiskCmd {
            id: 0,
            op,
            lba: bp.blkno,
            nsect,
            iova: slot.map.segs()[0].iova,
            fua: bp.fua,
        };
        slot.bp = Some(bp);
        Loaded::Cmd(cmd)
    }

    /// Finish the command in slot `id` with `status`: the device gave the
    /// slot back (a completion for a slot that is not out is ignored).
    fn finish(&self, id: u16, status: DiskStatus) {
        if let Some(slot) = self.slots.reclaim(id.into()) {
            self.complete(slot, status);
        }
    }

    /// Finish the command in `slot` with `status`, and free the slot.
    fn complete(&self, mut slot: SlotRef<'_, Slot>, status: DiskStatus) {
        let Some(mut bp) = slot.bp.take() else { return };
        if slot.map.is_loaded() {
            let dir_read = bp.op == BufOp::Read;
            dmamap_sync(
                &mut slot.map,
                if dir_read {
                    SyncOp::PostRead
                } else {
                    SyncOp::PostWrite
                },
            );
            bp.data = dmamap_unload(&mut slot.map);
        }
        if bp.error.is_none() {
            match status {
                DiskStatus::Ok => {
                    bp.resid = 0;
                    match bp.op {
                        BufOp::Read => self.stats.bytes_read.fetch_add(bp.bcount as u64, Relaxed),
                        BufOp::Write => self
                            .stats
                            .bytes_written
                            .fetch_add(bp.bcount as u64, Relaxed),
                        BufOp::Flush => 0,
                    };
                }
                DiskStatus::DmaFault => {
                    self.stats.dma_faults.fetch_add(1, Relaxed);
                    self.tag.fault();
                    bp.error = Some(BioError::Io);
                    bp.resid = bp.bcount;
                }
                DiskStatus::MediaError(errno) => {
                    bp.error = Some(BioError::from_media(errno));
                    bp.resid = bp.bcount;
                }
                DiskStatus::Invalid => {
                    bp.error = Some(BioError::Inval);
                    bp.resid = bp.bcount;
                }
            }
        }
        if bp.error.is_some() {
            self.stats.errors.fetch_add(1, Relaxed);
        }
        self.inflight.fetch_sub(1, Relaxed);
        let id = slot.id() as u16;
        drop(slot); // free before listed, so the next claim finds it free
        self.state.lock().free.push(id);
        biodone(bp);
    }

    /// The completion work: reap everything, finish it, start more.
    fn done(&self, ctx: WorkCtx<'_>) {
        if self.detached.load(Acquire) {
            // A softint or AST scheduled before the detach: the controller
            // may belong to another unit now.
            return;
        }
        let _part = statclock::enter(Part::Driver);
        while let Some(d) = self.ctrl.reap() {
            self.finish(d.id, d.status);
        }
        self.start(ctx.thread());
    }
}

impl BlockDev for Sd {
    fn name(&self) -> &'static str {
        self.name
    }

    fn sectors(&self) -> u64 {
        self.geom.sectors
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn max_transfer(&self) -> usize {
        self.tag.config().maxsize.min(self.geom.max_transfer)
    }

    fn strategy(&self, bp: BufBox) {
        let _part = statclock::enter(Part::Driver);
        let Some(mut bp) = bounds_check(self, bp) else {
            return;
        };
        if self.detached.load(Acquire) {
            bp.error = Some(BioError::Io);
            bp.resid = bp.bcount;
            self.stats.errors.fetch_add(1, Relaxed);
            return biodone(bp);
        }
        self.state.lock().bufq.put(bp);
        if self.completer.mode() == Completion::Thread {
            // "Have each driver occupy one thread": it starts the I/O.
            self.completer.kick();
        } else {
            self.start(None);
        }
    }

    fn alloc_buf(&self, len: usize) -> Option<IoBuf> {
        crate::bus_dma::dmamem_alloc(self.tag, len)
    }

    fn alloc_buf_wait(
        &self,
        ctx: &crate::ctx::ThreadCtx,
        len: usize,
    ) -> Result<IoBuf, crate::sched::Interrupted> {
        crate::bus_dma::dmamem_alloc_wait(self.tag, ctx, len)
    }

    fn describe(&self) -> String {
        let g = &self.geom;
        let extra = match self.tag.mode() {
            crate::bus_dma::DvmaMode::Slots => {
                alloc::format!(" ({} slots)", self.tag.config().slots)
            }
            crate::bus_dma::DvmaMode::Permanent | crate::bus_dma::DvmaMode::Shadow => {
                alloc::format!(" ({} pages)", self.tag.pages_reserved())
            }
            _ => String::new(),
        };
        alloc::format!(
            "{} at {}: {} MiB, {}-byte sectors, dvma {}{}, completion {}",
            self.name,
            self.parent,
            (g.sectors * g.sector_size as u64) >> 20,
            g.sector_size,
            self.tag.mode(),
            extra,
            self.completer.mode()
        )
    }
}
