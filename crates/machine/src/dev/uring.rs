//! The DMA disk controller's io_uring engine (`engine = "uring"`): the
//! vCPU that rings the doorbell submits the commands' reads, writes and
//! flushes to the host kernel itself, with no hand-off to a worker thread.
//!
//! # The data path
//! * `submit` puts the command on the same bounded lock-free submission
//!   ring as the thread engine (any context, never blocks).
//! * `doorbell` takes the io_uring (see *The ring's holder* below), turns
//!   every queued command into SQEs and calls `io_uring_enter` to submit
//!   them: READ is `IORING_OP_READ` into `window + iova`, WRITE is
//!   `IORING_OP_WRITE` from it, FLUSH is `IORING_OP_FSYNC` with
//!   `IORING_FSYNC_DATASYNC`, and a WRITE with FUA is the write, then (when
//!   its last byte is written) the `fdatasync`, as two steps. Then it reaps
//!   the CQEs already there (a read that hits the page cache completes
//!   inline, during the submission) and posts their completions and the
//!   interrupt itself.
//! * Completions that finish later (a cold read, a write the filesystem
//!   cannot do without blocking, every `fdatasync`: io_uring's own
//!   in-kernel workers, or task work) are reaped by the **reaper**, one
//!   host thread per disk blocked on an eventfd registered with the ring.
//!   While a holder works the ring it keeps the eventfd disabled
//!   (`IORING_CQ_EVENTFD_DISABLED`), so completions it reaps itself (the
//!   inline ones) never wake the reaper; after enabling it again it looks
//!   at the completion ring once more, so a completion posted in between is
//!   not left behind. The reaper also wakes every 10 ms while requests are
//!   in flight (every 100 ms when idle): the host kernel posts a CQE and
//!   then reads the eventfd flag without a full barrier between the two, so
//!   in theory a completion can slip between our re-enable and our last
//!   look; the timed wake bounds what that would cost, and retries a
//!   submission the host refused for a moment (`EAGAIN`, `EBUSY`).
//!
//! # Which CPU is interrupted
//! Completions reaped by a doorbell, which runs on the vCPU that submitted
//! the commands, interrupt that vCPU, as blk-mq completes a request on the
//! CPU that submitted it: the request's thread, its buffers and its
//! completion stay on one CPU, and a post to oneself costs no signal
//! (`kern::intr::intr_post_inline`). Completions the reaper finds go to the CPU
//! given by `set_interrupt`. The driver's completion work may so run on
//! several CPUs at once; sd's does not mind (a command's slot belongs to
//! whoever took its id off the completion ring).
//!
//! # Writes
//! A WRITE is not handed to io_uring: the doorbell's caller writes it
//! itself, with one `pwrite(2)` from `window + iova` (a plain buffered
//! write: the copy into the page cache). io_uring would hand every
//! buffered write on ext4 to one of its worker threads (ext4 cannot do a
//! buffered write without blocking: `RWF_NOWAIT` gives `EOPNOTSUPP`), and
//! each would cost a worker's and the reaper's wake-ups, where the copy
//! costs a few microseconds of the vCPU. Its result goes where its CQE's
//! would: a short write's rest, and a FUA write's `fdatasync`, go to the
//! ring. (With an injected delay the write goes to the ring, linked to its
//! timeout, as before.) The doorbell may run in an interrupt handler: the
//! raw system call allocates nothing, takes no lock of ours and leaves
//! `errno` alone, though it may block in the host kernel for as long as
//! the page cache makes it.
//!
//! # The DVMA guarantees
//! Data moves only between the file and `window + iova`, with plain
//! (not registered, not fixed) buffers: the host kernel copies through the
//! process's page tables at the time of the I/O, so an unmapped or
//! read-only IOVA page fails the request with `-EFAULT`, or a short count
//! at a mapped/unmapped boundary (the rest is then resubmitted, which
//! faults). Either way the command completes [`DiskStatus::DmaFault`] and
//! the window's fault counter is bumped, as [`crate::dvma::Window::pread`]
//! does for the thread engine. Registered buffers would pin the pages
//! present at registration and bypass the IOMMU, so they are never used.
//! A range outside the window is a DMA fault without any I/O. Host errors
//! are [`DiskStatus::MediaError`]`(errno)`. A read past the end of the file
//! (a file shrunk underneath) reads zeroes, as with the thread engine.
//!
//! # The ring's holder, and interrupt context
//! The doorbell may run in a kernel thread or in an interrupt handler (sd
//! in `intr` completion mode starts the next commands from its completion),
//! possibly on top of a kernel thread of the same vCPU that was itself in
//! the middle of a doorbell. So the io_uring (its SQ and CQ, the
//! per-command slots) is not behind a lock anybody waits for: it has one
//! *holder* at a time, taken with an atomic swap that never waits. Whoever
//! finds it held raises `pending` and returns; the holder, before it lets
//! go, runs another round while `pending` is set, and after letting go
//! looks at `pending` once more (a Dekker handshake, SeqCst) and takes the
//! ring again if it was raised. So a doorbell is never lost, nobody spins
//! or sleeps, and an interrupt handler that finds its own CPU's thread
//! holding the ring simply leaves its commands to it (the thread resumes
//! when the handler returns). The holder allocates nothing (slots, the
//! free tag stack and the follow-up list are sized at `open`), takes no
//! host lock, and makes only raw system calls (`io_uring_enter` through
//! [`crate::sys`], which leaves `errno` alone); the rare read past the end
//! of the file zero-fills through [`crate::dvma::Window::dma_write`].
//!
//! # Interrupts and coalescing
//! As the thread engine: a post after `coalesce_count` un-signalled
//! completions, and one at the end of every round that reaped any (the
//! completion ring then has nothing more ready: the thread engine's
//! "nothing more is coming soon" rule), so a completion is never held for
//! a timer and every completion is followed by a post made after it was
//! pushed. The post comes from whoever reaped: the vCPU that rang the
//! doorbell (inline completions), or the reaper.
//!
//! # What the thread engine has and this one does not (yet)
//! The volatile write cache: `open` refuses `write_cache = true` with
//! `engine = "uring"`. `inject_media_error` is supported (checked before
//! any I/O, like `Invalid` and read-only); `inject_delay` is a linked
//! `IORING_OP_TIMEOUT` (`IORING_TIMEOUT_ETIME_SUCCESS`) in front of each
//! read or write.
//!
//! # Stopping
//! As the thread engine: new commands are refused, requests in the ring
//! finish (the reaper reaps them), commands submitted but never rung for
//! complete with `MediaError(ESHUTDOWN)`, one last interrupt is posted.
//!
//! If the host has no io_uring (`ENOSYS`, or `EPERM` where it is
//! disabled), `open` fails saying so.

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64,
    Ordering::{Relaxed, SeqCst},
    fence,
};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use io_uring::{IoUring, opcode, squeue, types};
use kern::dev::{DiskCmd, DiskDone, DiskOp, DiskStatus};
use kern::intr::IntrHandle;
use kern::iommu::Iommu;

use super::SECTOR;
use super::disk::DiskMedium;
use super::engine::{Counters, IntrTarget, Tuning, reserve};
use crate::sys;

/// What a CQE completes (the high half of its `user_data`; the low half
/// is the command's tag).
const KIND_DATA: u64 = 0;
const KIND_SYNC: u64 = 1;
const KIND_DELAY: u64 = 2;

fn user_data(tag: u16, kind: u64) -> u64 {
    (kind << 32) | tag as u64
}

/// A command in the ring.
#[derive(Clone, Copy)]
struct Slot {
    cmd: Option<DiskCmd>,
    /// Bytes of the transfer.
    len: usize,
    /// Bytes moved so far (short counts are resubmitted).
    done: usize,
    /// The injected delay's timeout (read by the host at submission).
    ts: types::Timespec,
}

/// Zeroes for a read past the end of the file.
static ZEROES: [u8; 4096] = [0; 4096];

/// What only the ring's holder touches.
struct Held {
    ring: IoUring,
    slots: Box<[Slot]>,
    /// Free tags (capacity `depth`: pushes never allocate).
    free: Vec<u16>,
    /// Follow-ups found while reaping, submitted after (capacity `depth`).
    redo: Vec<(u16, u64)>,
    /// Completions pushed and not yet covered by a post.
    unsignalled: u32,
}

/// The state shared by the disk object, the vCPUs and the reaper.
pub(crate) struct UringCore {
    pub(crate) medium: DiskMedium,
    pub(crate) stats: Counters,
    held: UnsafeCell<Held>,
    ring_fd: RawFd,
    efd: RawFd,
    sq: ArrayQueue<DiskCmd>,
    cq: ArrayQueue<DiskDone>,
    depth: u32,
    outstanding: AtomicU32,
    submitting: AtomicU32,
    stopping: AtomicBool,
    /// Someone holds `held`.
    busy: AtomicBool,
    /// Work for the holder: set by every doorbell and reaper wake.
    pending: AtomicBool,
    /// SQEs pushed whose CQE has not been reaped.
    inflight: AtomicU32,
    target: IntrTarget,
    coalesce_count: u32,
    delay_ns: AtomicU64,
}

// SAFETY: `held` is touched only by the thread that moved `busy` from
// false to true (SeqCst swap), until it stores false again: never by two
// threads at once. Everything else is atomics or lock-free queues.
unsafe impl Sync for UringCore {}
// SAFETY: as above; the raw fds are plain integers owned by the core.
unsafe impl Send for UringCore {}

/// Whether an io_uring can be set up here.
pub(crate) fn available() -> bool {
    IoUring::new(8).is_ok()
}

fn unavailable(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) => io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "dmadisk: engine = \"uring\": io_uring is unavailable on this host \
                 (io_uring_setup: {e}; see /proc/sys/kernel/io_uring_disabled); \
                 use engine = \"threads\""
            ),
        ),
        _ => io::Error::new(e.kind(), format!("dmadisk: engine = \"uring\": {e}")),
    }
}

impl UringCore {
    fn new(medium: DiskMedium, t: &Tuning) -> io::Result<Self> {
        let depth = t.queue_depth as usize;
        // At most `depth` commands in the ring, each with at most two SQEs
        // (a delay and its transfer) and two CQEs not yet reaped.
        let entries = (2 * depth).next_power_of_two().max(8) as u32;
        let ring = IoUring::builder()
            .setup_submit_all()
            .build(entries)
            .map_err(unavailable)?;
        // SAFETY: a plain eventfd; we own the new descriptor.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Err(e) = ring.submitter().register_eventfd(efd) {
            // SAFETY: our descriptor.
            unsafe { libc::close(efd) };
            return Err(unavailable(e));
        }
        let ring_fd = ring.as_raw_fd();
        let mut free = Vec::with_capacity(depth);
        free.extend((0..depth as u16).rev());
        Ok(UringCore {
            medium,
            stats: Counters::default(),
            held: UnsafeCell::new(Held {
                ring,
                slots: vec![
                    Slot {
                        cmd: None,
                        len: 0,
                        done: 0,
                        ts: types::Timespec::new(),
                    };
                    depth
                ]
                .into_boxed_slice(),
                free,
                redo: Vec::with_capacity(depth),
                unsignalled: 0,
            }),
            ring_fd,
            efd,
            sq: ArrayQueue::new(depth),
            cq: ArrayQueue::new(depth),
            depth: depth as u32,
            outstanding: AtomicU32::new(0),
            submitting: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            inflight: AtomicU32::new(0),
            target: IntrTarget::new(),
            coalesce_count: t.coalesce_count.max(1),
            delay_ns: AtomicU64::new(0),
        })
    }

    /// Put a command on the submission ring. Any context.
    pub(crate) fn submit(&self, cmd: DiskCmd) -> bool {
        self.submitting.fetch_add(1, SeqCst);
        let ok = !self.stopping.load(SeqCst) && self.reserve() && {
            match self.sq.push(cmd) {
                Ok(()) => true,
                Err(_) => {
                    self.outstanding.fetch_sub(1, SeqCst);
                    false
                }
            }
        };
        self.submitting.fetch_sub(1, SeqCst);
        Counters::inc(if ok {
            &self.stats.submitted
        } else {
            &self.stats.refused
        });
        ok
    }

    fn reserve(&self) -> bool {
        reserve(&self.outstanding, self.depth)
    }

    /// Ring the doorbell: submit what is queued and reap what is done, or
    /// leave it to the current holder. Any context (see the module docs).
    pub(crate) fn doorbell(&self) {
        Counters::inc(&self.stats.doorbells);
        self.kick();
    }

    /// Take a completion. Any context.
    pub(crate) fn reap(&self) -> Option<DiskDone> {
        let d = self.cq.pop()?;
        self.outstanding.fetch_sub(1, SeqCst);
        Some(d)
    }

    /// Post `vector` on `cpu` from now on. Any context.
    pub(crate) fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        self.target.set(cpu, vector);
        // Pairs with the fence in `finish`: either its `signal` sees the
        // target, or we see its completion here.
        fence(SeqCst);
        if !self.cq.is_empty() {
            self.post(cpu, vector);
        }
    }

    /// Extra latency before every read and write. Any context.
    pub(crate) fn set_delay(&self, d: Duration) {
        self.delay_ns
            .store(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Has `stop` begun?
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(SeqCst)
    }

    /// Become the holder and work, or leave the work to the holder.
    fn kick(&self) {
        self.pending.store(true, SeqCst);
        loop {
            if self.busy.swap(true, SeqCst) {
                // The holder looks at `pending` before and after it lets go.
                return;
            }
            // SAFETY: we moved `busy` false -> true: we are the only
            // holder until we store false (see `impl Sync`).
            let h = unsafe { &mut *self.held.get() };
            h.ring.completion().disable_eventfd();
            while self.pending.swap(false, SeqCst) {
                self.work(h);
            }
            // `enable_eventfd` is a locked RMW (a full barrier here), so
            // the look at the ring below comes after it.
            h.ring.completion().enable_eventfd();
            if !h.ring.completion().is_empty() {
                self.pending.store(true, SeqCst);
            }
            self.busy.store(false, SeqCst);
            if !self.pending.load(SeqCst) {
                return;
            }
        }
    }

    /// One round: reap, start what is queued, submit; until nothing moves.
    /// Then post for what was reaped.
    fn work(&self, h: &mut Held) {
        let Held {
            ring,
            slots,
            free,
            redo,
            unsignalled,
        } = h;
        loop {
            let mut moved = 0usize;
            for cqe in ring.completion() {
                moved += 1;
                self.inflight.fetch_sub(1, SeqCst);
                let tag = (cqe.user_data() & 0xffff) as u16;
                let kind = cqe.user_data() >> 32;
                self.on_cqe(slots, free, redo, unsignalled, tag, kind, cqe.result());
            }
            let mut sq = ring.submission();
            for (tag, kind) in redo.drain(..) {
                let delay = false;
                self.push(&mut sq, &mut slots[tag as usize], tag, kind, delay);
            }
            while !self.stopping.load(SeqCst)
                && sq.capacity() - sq.len() >= 2
                && let Some(cmd) = self.sq.pop()
            {
                moved += 1;
                self.start(&mut sq, slots, free, redo, unsignalled, cmd);
            }
            let n = sq.len() as u32;
            drop(sq); // publishes the tail
            if n > 0 {
                let r = sys::io_uring_enter(self.ring_fd, n, 0, 0);
                if r < 0 {
                    // EAGAIN/EBUSY/EINTR: the SQEs stay in the ring; the
                    // reaper's timed wake retries.
                    break;
                }
            }
            if moved == 0 {
                break;
            }
        }
        if *unsignalled > 0 {
            self.signal(unsignalled);
        }
    }

    /// A new command: check it, then give it a tag and its SQEs, or
    /// complete it at once.
    fn start(
        &self,
        sq: &mut squeue::SubmissionQueue<'_>,
        slots: &mut [Slot],
        free: &mut Vec<u16>,
        redo: &mut Vec<(u16, u64)>,
        unsignalled: &mut u32,
        c: DiskCmd,
    ) {
        let s = &self.stats;
        let m = &self.medium;
        let kind = match c.op {
            DiskOp::Flush => {
                Counters::inc(&s.flushes);
                if m.read_only {
                    return self.finish(unsignalled, c.id, DiskStatus::Ok);
                }
                KIND_SYNC
            }
            DiskOp::Read | DiskOp::Write => {
                Counters::inc(if c.op == DiskOp::Read {
                    &s.reads
                } else {
                    &s.writes
                });
                if c.fua && c.op == DiskOp::Write {
                    Counters::inc(&s.fua_writes);
                }
                if let Some(st) = m.precheck(&c, s) {
                    return self.finish(unsignalled, c.id, st);
                }
                let w = m.window;
                w.stats.accesses.fetch_add(1, Relaxed);
                let len = c.nsect as u64 * SECTOR as u64;
                if c.iova
                    .get()
                    .checked_add(len)
                    .is_none_or(|e| e > Iommu::size(w))
                {
                    w.stats.faults.fetch_add(1, Relaxed);
                    return self.finish(unsignalled, c.id, DiskStatus::DmaFault);
                }
                KIND_DATA
            }
        };
        let Some(tag) = free.pop() else {
            // Cannot happen: tags in use <= outstanding <= depth.
            return self.finish(unsignalled, c.id, DiskStatus::MediaError(libc::EBUSY));
        };
        let slot = &mut slots[tag as usize];
        *slot = Slot {
            cmd: Some(c),
            len: c.nsect as usize * SECTOR as usize,
            done: 0,
            ts: slot.ts,
        };
        if kind == KIND_DATA && c.op == DiskOp::Write && self.delay_ns.load(Relaxed) == 0 {
            // A buffered write, done here (module docs: writes). Its result
            // goes where its CQE's would; a short write's rest, and a FUA
            // write's fdatasync, go to the ring.
            let addr = self.medium.window.base() + c.iova.get() as usize;
            let off = c.lba * SECTOR as u64;
            let res = sys::pwrite(self.medium.file.as_raw_fd(), addr, slot.len, off);
            Counters::inc(&self.stats.inline_writes);
            return self.on_cqe(slots, free, redo, unsignalled, tag, KIND_DATA, res as i32);
        }
        self.push(sq, slot, tag, kind, true);
    }

    /// Queue the SQE(s) of step `kind` of the command in `slot`.
    fn push(
        &self,
        sq: &mut squeue::SubmissionQueue<'_>,
        slot: &mut Slot,
        tag: u16,
        kind: u64,
        with_delay: bool,
    ) {
        let Some(c) = slot.cmd else { return };
        let fd = types::Fd(self.medium.file.as_raw_fd());
        let mut entries = [None, None];
        if kind == KIND_SYNC {
            entries[0] = Some(
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(user_data(tag, KIND_SYNC)),
            );
        } else {
            let delay = self.delay_ns.load(Relaxed);
            if with_delay && delay > 0 {
                slot.ts = types::Timespec::from(Duration::from_nanos(delay));
                entries[0] = Some(
                    opcode::Timeout::new(&slot.ts)
                        .flags(types::TimeoutFlags::ETIME_SUCCESS)
                        .build()
                        .flags(squeue::Flags::IO_LINK)
                        .user_data(user_data(tag, KIND_DELAY)),
                );
            }
            let addr = self.medium.window.base() + (c.iova.get() as usize) + slot.done;
            let n = (slot.len - slot.done) as u32;
            let off = c.lba * SECTOR as u64 + slot.done as u64;
            let e = if c.op == DiskOp::Write {
                opcode::Write::new(fd, addr as *const u8, n)
                    .offset(off)
                    .build()
            } else {
                opcode::Read::new(fd, addr as *mut u8, n)
                    .offset(off)
                    .build()
            };
            entries[1] = Some(e.user_data(user_data(tag, KIND_DATA)));
        }
        for e in entries.into_iter().flatten() {
            // SAFETY: the buffer is `window + iova`: the host checks it at
            // the time of the I/O against the window's current mappings
            // (EFAULT if unmapped), and the window's reservation outlives
            // the disk (stopped before the machine shuts down). The
            // timeout's timespec lives in the slot, which outlives the
            // request. A failed push cannot happen (the ring has room for
            // two SQEs per command) and would only drop the SQE, caught by
            // the `inflight` count never reaching zero.
            if unsafe { sq.push(&e) }.is_ok() {
                self.inflight.fetch_add(1, SeqCst);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_cqe(
        &self,
        slots: &mut [Slot],
        free: &mut Vec<u16>,
        redo: &mut Vec<(u16, u64)>,
        unsignalled: &mut u32,
        tag: u16,
        kind: u64,
        res: i32,
    ) {
        let s = &self.stats;
        let w = self.medium.window;
        let Some(slot) = slots.get_mut(tag as usize) else {
            return;
        };
        let Some(c) = slot.cmd else { return };
        let status = match kind {
            KIND_DELAY => return, // its transfer follows (or is cancelled)
            KIND_SYNC => {
                if res >= 0 {
                    Counters::inc(&s.syncs);
                    DiskStatus::Ok
                } else {
                    DiskStatus::MediaError(-res)
                }
            }
            _ => {
                let write = c.op == DiskOp::Write;
                if res == -libc::ECANCELED || res == -libc::EAGAIN || res == -libc::EINTR {
                    // A failed delay broke the link, or the host asks us to
                    // try again: resubmit (without the delay).
                    redo.push((tag, KIND_DATA));
                    return;
                }
                if res == -libc::EFAULT || (res == 0 && write) {
                    w.stats.faults.fetch_add(1, Relaxed);
                    DiskStatus::DmaFault
                } else if res < 0 {
                    DiskStatus::MediaError(-res)
                } else if res == 0 {
                    // Past the end of the file: the rest reads as zeroes.
                    let mut st = DiskStatus::Ok;
                    while slot.done < slot.len {
                        let n = (slot.len - slot.done).min(ZEROES.len());
                        let at = c.iova + slot.done as u64;
                        if w.dma_write(at, &ZEROES[..n]).is_err() {
                            st = DiskStatus::DmaFault;
                            break;
                        }
                        slot.done += n;
                    }
                    if st == DiskStatus::Ok {
                        Counters::add(&s.bytes_read, slot.len as u64);
                    }
                    st
                } else {
                    slot.done += res as usize;
                    if slot.done < slot.len {
                        redo.push((tag, KIND_DATA));
                        return;
                    }
                    if write {
                        Counters::add(&s.bytes_written, slot.len as u64);
                        if c.fua {
                            redo.push((tag, KIND_SYNC));
                            return;
                        }
                    } else {
                        Counters::add(&s.bytes_read, slot.len as u64);
                    }
                    DiskStatus::Ok
                }
            }
        };
        slot.cmd = None;
        free.push(tag);
        self.finish(unsignalled, c.id, status);
    }

    /// Push a completion; post if `coalesce_count` are un-signalled.
    fn finish(&self, unsignalled: &mut u32, id: u16, status: DiskStatus) {
        let s = &self.stats;
        Counters::inc(match status {
            DiskStatus::Ok => &s.ok,
            DiskStatus::DmaFault => &s.dma_faults,
            DiskStatus::MediaError(_) => &s.media_errors,
            DiskStatus::Invalid => &s.invalid,
        });
        // Never fails: at most `depth` commands are outstanding.
        let _ = self.cq.push(DiskDone { id, status });
        Counters::inc(&s.completed);
        // The push before the read of the target (pairs with
        // `set_interrupt`).
        fence(SeqCst);
        *unsignalled += 1;
        if *unsignalled >= self.coalesce_count {
            self.signal(unsignalled);
        }
    }

    /// Post for the un-signalled completions, if an interrupt is set (if
    /// not, `set_interrupt` posts when it comes).
    fn signal(&self, unsignalled: &mut u32) {
        let Some((cpu, h)) = self.target.get() else {
            return;
        };
        *unsignalled = 0;
        // Reaped by a doorbell on a vCPU: interrupt that vCPU (module docs:
        // completion on the submitting CPU); by the reaper: the set CPU.
        let here = kern::cpu::curcpu_opt().map_or(cpu, |c| c.index());
        self.post(here, h);
    }

    fn post(&self, cpu: usize, h: IntrHandle) {
        match kern::kernel::try_kernel() {
            Some(k) if cpu < k.ncpu() => {
                // A doorbell's own CPU takes it without a signal.
                // Counted before it is posted (as the DMA disk's).
                Counters::inc(&self.stats.interrupts);
                kern::intr::intr_post_inline(cpu, h);
            }
            _ => Counters::inc(&self.stats.interrupts_dropped),
        }
    }
}

impl Drop for UringCore {
    fn drop(&mut self) {
        // SAFETY: our eventfd; the ring (closed with `held`) no longer
        // signals it once dropped, and nobody else uses it (we are dropped).
        unsafe { libc::close(self.efd) };
    }
}

/// The reaper: waits on the eventfd (or its timer), then works the ring.
fn run_reaper(c: Arc<UringCore>) {
    loop {
        let inflight = c.inflight.load(SeqCst);
        let stopping = c.stopping.load(SeqCst);
        if stopping && inflight == 0 && !c.busy.load(SeqCst) {
            break;
        }
        let timeout_ms = if inflight > 0 || stopping { 10 } else { 100 };
        let mut pfd = libc::pollfd {
            fd: c.efd,
            events: libc::POLLIN,
            revents: 0,
        };
        Counters::inc(&c.stats.sleeps);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r > 0 {
            let mut v = 0u64;
            // SAFETY: an eventfd read of 8 bytes into `v`.
            unsafe { libc::read(c.efd, (&raw mut v).cast(), 8) };
            Counters::inc(&c.stats.wakeups);
        }
        c.kick();
    }
}

/// A running io_uring disk engine: its core and its reaper.
pub(crate) struct UringEngine {
    core: Arc<UringCore>,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

impl UringEngine {
    /// Set up the ring and start the reaper. Host or thread context.
    pub(crate) fn start(medium: DiskMedium, t: &Tuning) -> io::Result<Self> {
        if t.queue_depth == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: queue_depth must be at least 1", t.name),
            ));
        }
        let core = Arc::new(UringCore::new(medium, t)?);
        let c = core.clone();
        let h = std::thread::Builder::new()
            .name(format!("{}/reaper", t.name))
            .spawn(move || run_reaper(c))?;
        Ok(UringEngine {
            core,
            reaper: Mutex::new(Some(h)),
        })
    }

    /// The shared state.
    pub(crate) fn core(&self) -> &UringCore {
        &self.core
    }

    /// Stop (see the module docs). Idempotent; host or thread context,
    /// never an interrupt handler.
    pub(crate) fn stop(&self) {
        let mut reaper = self.reaper.lock().unwrap_or_else(PoisonError::into_inner);
        let c = &*self.core;
        c.stopping.store(true, SeqCst);
        let one = 1u64;
        // SAFETY: an eventfd write of 8 bytes from `one`: wakes the reaper.
        unsafe { libc::write(c.efd, (&raw const one).cast(), 8) };
        if let Some(h) = reaper.take() {
            let _ = h.join();
        }
        while c.submitting.load(SeqCst) != 0 {
            std::thread::yield_now();
        }
        let mut aborted = false;
        while let Some(cmd) = c.sq.pop() {
            let _ = c.cq.push(DiskDone {
                id: cmd.id,
                status: DiskStatus::MediaError(libc::ESHUTDOWN),
            });
            Counters::inc(&c.stats.completed);
            Counters::inc(&c.stats.aborted);
            aborted = true;
        }
        fence(SeqCst);
        if aborted && let Some((cpu, h)) = c.target.get() {
            c.post(cpu, h);
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.stop();
    }
}
