//! The host channel: the device through which host threads (the NBD
//! connections of `dvma serve`) hand block requests to the kernel, and get
//! them back served.
//!
//! It is the machine's side of [`kern::blksrv`]: a network adapter, in
//! effect, whose "wire" is the host threads that own the sockets.
//!
//! ```text
//! host thread ── submit(req, replies) ─► request ring ─► interrupt (IPL_NET)
//!                                                            │
//!       blksrv kernel thread: take() ─► Buf ─► strategy ... biowait
//!                                                            │
//! host thread ◄── ReplyQueue::pop ◄── complete(req) ◄────────┘
//! ```
//!
//! # The request ring and its interrupt
//! Requests go into a bounded lock-free ring ([`ArrayQueue`]). The kernel is
//! interrupted only when it would not otherwise look (as NAPI does): every
//! [`RequestChannel::take`] sets `need_intr`, since its caller stops looking
//! after it, and a submitter posts the vector only if it is the one that
//! clears it ([`IntrArm`], a Dekker pair with a loom model): either the
//! submitter sees the arm and posts, or the kernel's look after arming
//! (`take`'s second pop when the ring was empty; blksrv's `pending` check
//! after a successful take) sees the request. Requests that arrive while the kernel has not yet taken the
//! previous interrupt's work cost no further interrupt.
//!
//! # Replies
//! Each request carries its way back in [`BlockReq::route`]: a counted
//! reference to the submitter's [`ReplyQueue`], made by [`HostChannel::submit`]
//! and consumed by [`RequestChannel::complete`]. A reply queue is a lock-free
//! queue plus a futex word; `complete` wakes the host thread (one system
//! call) only if it announced that it sleeps.
//!
//! # Who may call what, from which context
//! | call | context |
//! |---|---|
//! | [`HostChannel::submit`], [`HostChannel::stop`] | host thread (may spin briefly when the ring is full) |
//! | `take`, `pending` | any (kernel thread, interrupt handler): atomics, no allocation |
//! | `complete` | kernel thread: pushes onto the reply queue (which may allocate a block) and may make one `futex_wake` system call |
//! | `set_interrupt` | thread or host, at attach |
//! | [`ReplyQueue`] methods | `push`/`notify`: any thread context; `pop`: any; `wait`: host thread only (it blocks) |

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};

use kern::pending::IntrArm;
use std::time::Duration;

use crossbeam_queue::{ArrayQueue, SegQueue};
use kern::blksrv::{BlockReq, RequestChannel};
use kern::intr::{IntrHandle, intr_post};

use crate::sys;

/// Requests the ring holds.
pub const RING: usize = 4096;

/// Counters (any context).
#[derive(Debug, Default)]
pub struct ChanStats {
    /// Requests submitted.
    pub submitted: AtomicU64,
    /// Interrupts posted.
    pub interrupts: AtomicU64,
    /// Requests given back.
    pub completed: AtomicU64,
    /// Times a submitter found the ring full and waited.
    pub ring_full: AtomicU64,
}

/// The host channel device. See the module documentation.
pub struct HostChannel {
    ring: ArrayQueue<Box<BlockReq>>,
    need_intr: IntrArm,
    irq: OnceLock<(usize, IntrHandle)>,
    stopped: AtomicBool,
    /// Counters.
    pub stats: ChanStats,
}

impl Default for HostChannel {
    fn default() -> Self {
        Self::new()
    }
}

impl HostChannel {
    /// A channel with an empty ring, not yet attached to an interrupt.
    pub fn new() -> HostChannel {
        HostChannel {
            ring: ArrayQueue::new(RING),
            need_intr: IntrArm::new(),
            irq: OnceLock::new(),
            stopped: AtomicBool::new(false),
            stats: ChanStats::default(),
        }
    }

    /// Leak it: the kernel holds `&'static` devices.
    pub fn leak(self) -> &'static HostChannel {
        Box::leak(Box::new(self))
    }

    /// Hand `req` to the kernel; its reply will come back on `replies`.
    /// Host thread. Returns the request if the channel is stopped.
    pub fn submit(
        &self,
        mut req: Box<BlockReq>,
        replies: &Arc<ReplyQueue>,
    ) -> Result<(), Box<BlockReq>> {
        if self.stopped.load(Acquire) {
            return Err(req);
        }
        req.route = Arc::into_raw(Arc::clone(replies)) as usize;
        let mut req = req;
        let mut spins = 0u32;
        loop {
            match self.ring.push(req) {
                Ok(()) => break,
                Err(back) => {
                    req = back;
                    if spins == 0 {
                        self.stats.ring_full.fetch_add(1, Relaxed);
                    }
                    spins += 1;
                    if self.stopped.load(Acquire) {
                        // SAFETY: `route` was made by `Arc::into_raw` above
                        // and has not been consumed.
                        drop(unsafe { Arc::from_raw(req.route as *const ReplyQueue) });
                        req.route = 0;
                        return Err(req);
                    }
                    self.kick();
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
        self.stats.submitted.fetch_add(1, Relaxed);
        self.kick();
        Ok(())
    }

    /// Post the interrupt if the kernel said it needs one.
    fn kick(&self) {
        if let Some(&(cpu, v)) = self.irq.get()
            && self.need_intr.fire()
        {
            self.stats.interrupts.fetch_add(1, Relaxed);
            intr_post(cpu, v);
        }
    }

    /// Refuse further requests (those queued are still served). Host.
    pub fn stop(&self) {
        self.stopped.store(true, Release);
    }

    /// Requests queued and not yet taken.
    pub fn queued(&self) -> usize {
        self.ring.len()
    }
}

impl RequestChannel for HostChannel {
    fn take(&self) -> Option<Box<BlockReq>> {
        let r = self.ring.pop();
        // Whoever calls `take` stops looking at the ring after this call
        // (it serves what it got, or sleeps): ask for an interrupt for what
        // comes next, then look once more if we got nothing. A caller that
        // got a request checks `pending` afterwards (blksrv passes the
        // baton), which closes the window between its pop and this store.
        self.need_intr.arm();
        if r.is_some() {
            return r;
        }
        self.ring.pop()
    }

    fn pending(&self) -> bool {
        !self.ring.is_empty()
    }

    fn complete(&self, mut req: Box<BlockReq>) {
        self.stats.completed.fetch_add(1, Relaxed);
        let route = core::mem::take(&mut req.route);
        if route == 0 {
            return;
        }
        // SAFETY: every request on the ring had `route` set by `submit` from
        // `Arc::into_raw`, and it is consumed exactly once, here.
        let rq = unsafe { Arc::from_raw(route as *const ReplyQueue) };
        rq.push(req);
    }

    fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        let _ = self.irq.set((cpu, vector));
        // Requests may have been queued before: look at them.
        self.need_intr.arm();
        if !self.ring.is_empty() {
            self.kick();
        }
    }
}

/// Where a submitter's served requests come back. See the module
/// documentation.
#[derive(Default)]
pub struct ReplyQueue {
    q: SegQueue<Box<BlockReq>>,
    /// Bumped by every push and notify: the futex word.
    seq: AtomicU32,
    /// The host thread is (about to be) asleep on `seq`.
    sleeping: AtomicBool,
}

impl ReplyQueue {
    /// An empty queue.
    pub fn new() -> ReplyQueue {
        ReplyQueue::default()
    }

    /// Give back a served request. Any thread context.
    pub fn push(&self, req: Box<BlockReq>) {
        self.q.push(req);
        self.notify();
    }

    /// Wake the waiting host thread (if it sleeps). Any thread context.
    ///
    /// Only the first notifier after the waiter went to sleep makes the
    /// system call: it takes `sleeping` (swap), so the notifiers that follow
    /// before the waiter runs again see it clear. The waiter cannot sleep
    /// through it: it sets `sleeping` before it reads `seq` for the last
    /// time, and this bumps `seq` before it looks at `sleeping` (all SeqCst),
    /// so either the waiter sees the new `seq` or this sees `sleeping`.
    pub fn notify(&self) {
        self.seq.fetch_add(1, SeqCst);
        if self.sleeping.load(Relaxed) && self.sleeping.swap(false, SeqCst) {
            sys::futex_wake(&self.seq, 1);
        }
    }

    /// The next served request, if any. Any context.
    pub fn pop(&self) -> Option<Box<BlockReq>> {
        self.q.pop()
    }

    /// The current sequence number: read it before looking for work, and
    /// pass it to [`ReplyQueue::wait`].
    pub fn seq(&self) -> u32 {
        self.seq.load(SeqCst)
    }

    /// Sleep until something is pushed or notified after `seen` was read,
    /// or `timeout` passes. Host thread only. Polls for `spin` first (a
    /// reply that arrives then costs no system call on either side).
    pub fn wait(&self, seen: u32, spin: Duration, timeout: Duration) {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < spin {
            if self.seq.load(SeqCst) != seen {
                return;
            }
            core::hint::spin_loop();
        }
        self.sleeping.store(true, SeqCst);
        if self.seq.load(SeqCst) == seen {
            sys::futex_wait_timeout(&self.seq, seen, timeout.as_nanos() as u64);
        }
        self.sleeping.store(false, SeqCst);
    }
}

impl Drop for ReplyQueue {
    fn drop(&mut self) {
        // Served requests nobody collected: their routes were consumed by
        // `complete`, so dropping them frees only their buffers.
        while self.q.pop().is_some() {}
    }
}
