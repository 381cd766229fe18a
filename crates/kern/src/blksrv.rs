//! blksrv: kernel threads that serve block requests arriving on a channel.
//!
//! The kernel side of `dvma serve`. Requests come from a [`RequestChannel`]
//! (on Linux: a host device fed by the NBD connections, which raises an
//! interrupt when it queues requests). A pool of kernel threads per CPU
//! takes them, and for each one: gets the data buffers (a read's from the
//! device's own DMA memory; a write's arrive filled), builds a [`Buf`] per
//! piece of at most the device's transfer size, calls the driver's
//! `strategy` for all of them, `biowait`s, and gives the request back to the
//! channel with its outcome. Every byte goes through the driver, `bus_dma`
//! and the device; there is no other way to the backing files.
//!
//! ```text
//! channel --intr--> blksrv thread: getbuf, strategy --> sd/ccd/vnd --> device
//!                                   biowait <-- biodone <-- completion mode
//! channel <-- complete(req) --------'
//! ```
//!
//! # Contexts
//! [`blksrv_attach`]: thread or host. The threads run in thread context and
//! may sleep; the channel's interrupt handler only wakes them.
//!
//! [`Buf`]: crate::bio::Buf

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use crate::bio::{
    BioError, BlockDev, BufOp, BufWait, DEV_BSIZE, bio_prepare, biowait, getbuf_wait,
};
use crate::ctx::ThreadCtx;
use crate::intr::{IntrError, IntrHandle, intr_establish};
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::sched::{
    SchedError, kthread_create, sleep_interlocked, wakeup_one_local, wakeup_one_on, wchan,
};
use crate::vm::IoBuf;

/// A block request.
pub struct BlockReq {
    /// The requester's cookie.
    pub cookie: u64,
    /// The device.
    pub dev: &'static dyn BlockDev,
    /// Operation.
    pub op: ReqOp,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Force unit access (writes).
    pub fua: bool,
    /// The data, in pieces of at most the device's transfer size: filled
    /// by the requester for a write; filled by blksrv for a read (the
    /// requester leaves it empty).
    pub chunks: Vec<IoBuf>,
    /// The outcome, set by blksrv.
    pub error: Option<BioError>,
    /// Requester-private word (its route back).
    pub route: usize,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqOp {
    /// Read `len` bytes at `offset`.
    Read,
    /// Write the chunks at `offset`.
    Write,
    /// Write `len` zero bytes at `offset`.
    WriteZeroes,
    /// Make every completed write durable.
    Flush,
    /// The range's contents are no longer needed (advisory: accepted and
    /// checked, not acted upon).
    Trim,
}

/// Where requests come from.
pub trait RequestChannel: Sync {
    /// Take the next request. Any context. The caller stops looking at the
    /// channel after this call, so the channel arms its interrupt for the
    /// next request; a caller that got one checks [`pending`] afterwards
    /// and makes sure someone takes the rest.
    ///
    /// [`pending`]: RequestChannel::pending
    fn take(&self) -> Option<Box<BlockReq>>;
    /// Are requests queued, or is there anything else a `take` would act
    /// on? Any context; called under a spin mutex, so it must be cheap and
    /// take no lock. Whoever makes it true and then posts the channel's
    /// interrupt is never missed.
    fn pending(&self) -> bool;
    /// Give a served request back. Thread context.
    fn complete(&self, req: Box<BlockReq>);
    /// Post `vector` on `cpu` when requests are queued.
    fn set_interrupt(&self, cpu: usize, vector: IntrHandle);
    /// Are requests queued per CPU, for that CPU's threads only (a NIC
    /// per CPU, as receive-side scaling has)? Then the interrupt and the
    /// baton wake a thread of the calling CPU and never another CPU's,
    /// and [`RequestChannel::take`] and [`RequestChannel::pending`] look at
    /// the calling CPU's queue. Default: one queue for every CPU.
    fn per_cpu(&self) -> bool {
        false
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct SrvStats {
    /// Requests served.
    pub requests: AtomicU64,
    /// Bufs issued.
    pub bufs: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
}

struct Srv {
    chan: &'static dyn RequestChannel,
    lock: SpinMutex<()>,
    work: AtomicU32,
    stats: SrvStats,
}

/// Errors of [`blksrv_attach`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// The channel's interrupt could not be established.
    #[error("blksrv: interrupt: {source}")]
    Intr {
        /// Why.
        #[source]
        source: IntrError,
    },
    /// A server thread could not be created.
    #[error("blksrv: thread on cpu{cpu}: {source}")]
    Thread {
        /// Its CPU.
        cpu: usize,
        /// Why.
        #[source]
        source: SchedError,
    },
}

/// Attach blksrv to `chan` with `per_cpu` threads on each of `ncpu` CPUs;
/// the channel interrupts CPU `cpu`. Returns its counters. Thread or host
/// context.
pub fn blksrv_attach(
    chan: &'static dyn RequestChannel,
    cpu: usize,
    ncpu: usize,
    per_cpu: usize,
) -> Result<&'static SrvStats, AttachError> {
    let srv: &'static Srv = Box::leak(Box::new(Srv {
        chan,
        lock: SpinMutex::new(Ipl::Net, ()),
        work: AtomicU32::new(0),
        stats: SrvStats::default(),
    }));
    let vector = intr_establish(Ipl::Net, "blksrv", move |_| {
        let g = srv.lock.lock();
        srv.work.fetch_add(1, Release);
        drop(g);
        // One thread, on this CPU if one sleeps here (the requests' data
        // and the disk's interrupts stay on one CPU, and no other CPU has
        // to be kicked awake); it passes the baton if more are queued.
        srv.wake();
    })
    .map_err(|source| AttachError::Intr { source })?;
    chan.set_interrupt(cpu, vector);
    for c in 0..ncpu {
        for _ in 0..per_cpu.max(1) {
            kthread_create(Some(c), "blksrv", move |ctx| srv.thread(ctx))
                .map_err(|source| AttachError::Thread { cpu: c, source })?;
        }
    }
    Ok(&srv.stats)
}

impl Srv {
    /// Wake one thread: of this CPU for a per-CPU channel, else preferably.
    fn wake(&self) {
        match crate::cpu::curcpu_opt() {
            Some(c) if self.chan.per_cpu() => {
                wakeup_one_on(wchan(&self.work), c.index());
            }
            _ => {
                wakeup_one_local(wchan(&self.work));
            }
        }
    }

    fn thread(&self, ctx: &ThreadCtx) {
        loop {
            let req = loop {
                if let Some(r) = self.chan.take() {
                    if self.chan.pending() {
                        self.wake();
                    }
                    break r;
                }
                let g = self.lock.lock();
                let seen = self.work.load(Acquire);
                // Re-check under the lock: an interrupt after the take above
                // has bumped `work` and will find us asleep. Only `pending`:
                // `take` may do real work (a NIC channel reads sockets and
                // takes host locks), which must not happen under a spin
                // mutex that this CPU's interrupt handler takes.
                if self.chan.pending() || self.work.load(Acquire) != seen {
                    drop(g);
                    continue;
                }
                if sleep_interlocked(ctx, wchan(&self.work), g).is_err() {
                    return;
                }
            };
            let req = self.serve(ctx, req);
            self.stats.requests.fetch_add(1, Relaxed);
            if req.error.is_some() {
                self.stats.errors.fetch_add(1, Relaxed);
            }
            self.chan.complete(req);
        }
    }

    /// Serve one request.
    fn serve(&self, ctx: &ThreadCtx, mut req: Box<BlockReq>) -> Box<BlockReq> {
        let dev = req.dev;
        let max = dev.max_transfer().max(DEV_BSIZE) / DEV_BSIZE * DEV_BSIZE;
        match req.op {
            ReqOp::Trim => {
                let end = req.offset.checked_add(req.len);
                if end.is_none_or(|e| e > dev.sectors() * DEV_BSIZE as u64) {
                    req.error = Some(BioError::Inval);
                } else if dev.read_only() {
                    req.error = Some(BioError::Perm);
                }
                return req;
            }
            ReqOp::Flush => {
                let Ok(mut bp) = getbuf_wait(ctx) else {
                    req.error = Some(BioError::Shutdown);
                    return req;
                };
                bp.op = BufOp::Flush;
                let w = bio_prepare(&mut bp);
                dev.strategy(bp);
                let bp = biowait(ctx, w);
                req.error = bp.error;
                return req;
            }
            ReqOp::WriteZeroes => return self.write_zeroes(ctx, req, max),
            ReqOp::Read => {
                // Buffers from the device's own DMA memory.
                req.chunks.clear();
                let mut left = req.len as usize;
                while left > 0 {
                    let n = left.min(max);
                    let Ok(b) = dev.alloc_buf_wait(ctx, n) else {
                        req.error = Some(BioError::Shutdown);
                        return req;
                    };
                    req.chunks.push(b);
                    left -= n;
                }
            }
            ReqOp::Write => {}
        }
        let op = if req.op == ReqOp::Read {
            BufOp::Read
        } else {
            BufOp::Write
        };
        let chunks = core::mem::take(&mut req.chunks);
        let (back, err) = self.transfer(ctx, dev, op, req.offset, req.fua, chunks);
        req.chunks = back;
        req.error = err;
        req
    }

    /// WRITE_ZEROES: at most [`ZERO_BUFS`] zeroed buffers of the device's
    /// transfer size, written over the range again and again.
    fn write_zeroes(&self, ctx: &ThreadCtx, mut req: Box<BlockReq>, max: usize) -> Box<BlockReq> {
        let dev = req.dev;
        let n = (req.len as usize).div_ceil(max).min(ZERO_BUFS);
        let mut bufs = Vec::with_capacity(n);
        for _ in 0..n {
            let Ok(mut b) = dev.alloc_buf_wait(ctx, max.min(req.len as usize)) else {
                req.error = Some(BioError::Shutdown);
                return req;
            };
            b.as_mut_slice().fill(0);
            bufs.push(b);
        }
        let (mut off, end) = (req.offset, req.offset + req.len);
        while off < end && req.error.is_none() {
            let mut live = Vec::with_capacity(bufs.len());
            let mut idle = Vec::new();
            let mut o = off;
            for mut b in bufs.drain(..) {
                if o < end {
                    let l = (end - o).min(b.capacity().min(max) as u64) as usize;
                    b.set_len(l);
                    o += l as u64;
                    live.push(b);
                } else {
                    idle.push(b);
                }
            }
            let (back, err) = self.transfer(ctx, dev, BufOp::Write, off, req.fua, live);
            bufs = back;
            bufs.append(&mut idle);
            req.error = err;
            off = o;
        }
        req
    }

    /// Issue one buf per chunk at `offset` onwards, wait for all; returns
    /// the chunks in order and the first error.
    fn transfer(
        &self,
        ctx: &ThreadCtx,
        dev: &'static dyn BlockDev,
        op: BufOp,
        offset: u64,
        fua: bool,
        chunks: Vec<IoBuf>,
    ) -> (Vec<IoBuf>, Option<BioError>) {
        let mut waits: Vec<(BufWait, usize)> = Vec::with_capacity(chunks.len());
        let mut off = offset;
        let mut err = None;
        for (i, data) in chunks.into_iter().enumerate() {
            let Ok(mut bp) = getbuf_wait(ctx) else {
                err = Some(BioError::Shutdown);
                break;
            };
            bp.op = op;
            bp.fua = fua;
            bp.blkno = off / DEV_BSIZE as u64;
            bp.bcount = data.len();
            off += data.len() as u64;
            bp.data = Some(data);
            waits.push((bio_prepare(&mut bp), i));
            self.stats.bufs.fetch_add(1, Relaxed);
            dev.strategy(bp);
        }
        let mut back: Vec<Option<IoBuf>> = (0..waits.len()).map(|_| None).collect();
        for (w, i) in waits {
            let mut bp = biowait(ctx, w);
            if err.is_none() {
                err = bp.error;
            }
            back[i] = bp.data.take();
        }
        (back.into_iter().flatten().collect(), err)
    }
}

/// Most zeroed buffers one WRITE_ZEROES request holds at a time.
pub const ZERO_BUFS: usize = 4;

/// The I/O memory a request of `op` over `len` bytes holds at most while it
/// is served, on a device whose transfers are at most `max_transfer` bytes
/// (for admission control by the requester).
pub fn request_memory(op: ReqOp, len: u64, max_transfer: usize) -> u64 {
    let max = max_transfer.max(DEV_BSIZE) as u64;
    match op {
        ReqOp::Read | ReqOp::Write => len,
        ReqOp::WriteZeroes => len.min(max * ZERO_BUFS as u64),
        ReqOp::Flush | ReqOp::Trim => 0,
    }
}
