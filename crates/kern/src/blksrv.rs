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
use crate::intr::{IntrHandle, intr_establish};
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::sched::{kthread_create, sleep_interlocked, wakeup_one, wchan};
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
    /// Take the next request. Any context.
    fn take(&self) -> Option<Box<BlockReq>>;
    /// Are requests queued? Any context.
    fn pending(&self) -> bool;
    /// Give a served request back. Thread context.
    fn complete(&self, req: Box<BlockReq>);
    /// Post `vector` on `cpu` when requests are queued.
    fn set_interrupt(&self, cpu: usize, vector: IntrHandle);
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

/// Attach blksrv to `chan` with `per_cpu` threads on each of `ncpu` CPUs;
/// the channel interrupts CPU `cpu`. Returns its counters. Thread or host
/// context.
pub fn blksrv_attach(
    chan: &'static dyn RequestChannel,
    cpu: usize,
    ncpu: usize,
    per_cpu: usize,
) -> Result<&'static SrvStats, alloc::string::String> {
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
        // One thread; it passes the baton if more requests are queued.
        wakeup_one(wchan(&srv.work));
    })
    .map_err(|e| alloc::format!("blksrv: {e}"))?;
    chan.set_interrupt(cpu, vector);
    for c in 0..ncpu {
        for _ in 0..per_cpu.max(1) {
            kthread_create(Some(c), "blksrv", move |ctx| srv.thread(ctx))
                .map_err(|e| alloc::format!("blksrv: {e}"))?;
        }
    }
    Ok(&srv.stats)
}

impl Srv {
    fn thread(&self, ctx: &ThreadCtx) {
        loop {
            let req = loop {
                if let Some(r) = self.chan.take() {
                    if self.chan.pending() {
                        wakeup_one(wchan(&self.work));
                    }
                    break r;
                }
                let g = self.lock.lock();
                let seen = self.work.load(Acquire);
                // Re-check under the lock: an interrupt after the take above
                // has bumped `work` and will find us asleep.
                if let Some(r) = self.chan.take() {
                    drop(g);
                    break r;
                }
                if self.work.load(Acquire) != seen {
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
            ReqOp::Read | ReqOp::WriteZeroes => {
                // Buffers from the device's own DMA memory.
                req.chunks.clear();
                let mut left = req.len as usize;
                while left > 0 {
                    let n = left.min(max);
                    let Ok(mut b) = dev.alloc_buf_wait(ctx, n) else {
                        req.error = Some(BioError::Shutdown);
                        return req;
                    };
                    if req.op == ReqOp::WriteZeroes {
                        b.as_mut_slice().fill(0);
                    }
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
        let mut waits: Vec<(BufWait, usize)> = Vec::with_capacity(req.chunks.len());
        let mut off = req.offset;
        let chunks = core::mem::take(&mut req.chunks);
        let mut err = None;
        for (i, data) in chunks.into_iter().enumerate() {
            let Ok(mut bp) = getbuf_wait(ctx) else {
                err = Some(BioError::Shutdown);
                break;
            };
            bp.op = op;
            bp.fua = req.fua;
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
        req.chunks = back.into_iter().flatten().collect();
        req.error = err;
        req
    }
}
