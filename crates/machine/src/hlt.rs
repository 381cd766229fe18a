//! A CPU's `hlt`: an `epoll` set per vCPU.
//!
//! An idle vCPU sleeps in `epoll_wait` on its own set, which holds
//! * an `eventfd`, written to wake the CPU (`Kick::Wake`: a post or a
//!   wakeup found it asleep), and
//! * the event queues of the host devices attached to this CPU (a
//!   [`crate::dev::Nic`]'s receive queue is itself an `epoll` set,
//!   registered here edge-triggered): when one has events, the CPU posts
//!   that device's interrupt on itself.
//!
//! So a device that reports to a CPU's wait needs no host thread of its
//! own and no signal: its events end the CPU's `hlt`, as a NIC's receive
//! interrupt ends a real CPU's. While the CPU runs threads, devices still
//! interrupt it with signals as before; the wait only replaces sleeping.
//!
//! # Who may call what, from which context
//! * [`Hlt::wake`]: any context, interrupt handlers included: one raw
//!   `write(2)` of the eventfd, no allocation, no lock, errno untouched.
//! * [`Hlt::wait`], [`Hlt::poll`]: the CPU's own thread, in its idle
//!   context (not a signal handler).
//! * [`Hlt::attach`], [`Hlt::detach`]: host or thread context.
//! * [`Hlt::release`]: once, after the CPU's thread has exited.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};

use kern::intr::IntrHandle;

use crate::sys;

/// Device slots per CPU.
pub const MAX_DEVS: usize = 8;

/// Least time between two looks at the set while the CPU spins idle.
pub const POLL_GAP_NS: u64 = 2_000;

/// The token of the wake eventfd in the set (device slots are 0..MAX_DEVS).
const KICK: u64 = u64::MAX;

/// One vCPU's wait.
pub(crate) struct Hlt {
    epfd: AtomicI32,
    kick: AtomicI32,
    /// Each slot's interrupt vector (`None`: free).
    slots: Mutex<[Option<IntrHandle>; MAX_DEVS]>,
    /// Attached devices (the idle poll skips its system call without any).
    ndevs: AtomicU32,
    /// Slots a blocking wait saw ready; the next poll posts them.
    ready: AtomicU64,
    /// When the idle loop last looked without sleeping (ns).
    polled: AtomicU64,
}

impl Hlt {
    pub(crate) fn new() -> std::io::Result<Hlt> {
        // SAFETY: plain system calls creating new descriptors we own.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        let kick = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if kick < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: our descriptor.
            unsafe { libc::close(epfd) };
            return Err(e);
        }
        let h = Hlt {
            epfd: AtomicI32::new(epfd),
            kick: AtomicI32::new(kick),
            slots: Mutex::new([None; MAX_DEVS]),
            ndevs: AtomicU32::new(0),
            ready: AtomicU64::new(0),
            polled: AtomicU64::new(0),
        };
        // Edge-triggered: every write is a new edge, so the counter is
        // never read back (one system call less per wake-up).
        h.ctl(
            libc::EPOLL_CTL_ADD,
            kick,
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            KICK,
        )?;
        Ok(h)
    }

    fn ctl(&self, op: i32, fd: i32, events: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid event; the descriptors are the caller's.
        if unsafe { libc::epoll_ctl(self.epfd.load(Relaxed), op, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wake the CPU from [`Hlt::wait`] (or make its next wait return at
    /// once). Any context; async-signal-safe.
    pub(crate) fn wake(&self) {
        let one = 1u64;
        sys::write(self.kick.load(Relaxed), (&one as *const u64).cast(), 8);
    }

    /// Attach a device's event queue `fd`: when it has events, the CPU
    /// posts `vector` on itself. Returns the slot.
    pub(crate) fn attach(&self, fd: i32, vector: IntrHandle) -> std::io::Result<usize> {
        let mut s = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slot) = s.iter().position(|v| v.is_none()) else {
            return Err(std::io::Error::other(format!(
                "every one of the CPU's {MAX_DEVS} device slots is taken"
            )));
        };
        s[slot] = Some(vector);
        if let Err(e) = self.ctl(
            libc::EPOLL_CTL_ADD,
            fd,
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            slot as u64,
        ) {
            s[slot] = None;
            return Err(e);
        }
        self.ndevs.fetch_add(1, SeqCst);
        Ok(slot)
    }

    /// Detach what [`Hlt::attach`] attached.
    pub(crate) fn detach(&self, fd: i32, slot: usize) {
        let mut s = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if s[slot].take().is_some() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
            self.ndevs.fetch_sub(1, SeqCst);
        }
    }

    /// Sleep until woken, a device has events or a signal arrives.
    pub(crate) fn wait(&self) {
        self.collect(-1);
    }

    /// Post the interrupts of the devices that have events (without
    /// sleeping): what a blocking wait saw, and what a look at the set
    /// finds, at most once per [`POLL_GAP_NS`] (`now`: the CPU's clock; the
    /// idle loop spins much faster than that, and each look is a system
    /// call). The CPU's idle context.
    pub(crate) fn poll(&self, cpu: usize, now: u64) {
        if self.ndevs.load(Relaxed) != 0
            && now.wrapping_sub(self.polled.load(Relaxed)) >= POLL_GAP_NS
        {
            self.polled.store(now, Relaxed);
            self.collect(0);
        }
        let mut r = self.ready.swap(0, Acquire);
        if r == 0 {
            return;
        }
        let s = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        while r != 0 {
            let slot = r.trailing_zeros() as usize;
            r &= r - 1;
            if let Some(v) = s[slot] {
                kern::intr::intr_post(cpu, v);
            }
        }
    }

    fn collect(&self, timeout_ms: i32) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX_DEVS + 1];
        // SAFETY: `evs` is a valid buffer of that many events.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.load(Relaxed),
                evs.as_mut_ptr(),
                evs.len() as i32,
                timeout_ms,
            )
        };
        let mut ready = 0u64;
        for e in evs.iter().take(n.max(0) as usize) {
            let token = e.u64;
            if token < MAX_DEVS as u64 {
                ready |= 1 << token;
            }
        }
        if ready != 0 {
            self.ready.fetch_or(ready, Release);
        }
    }

    /// Close the descriptors.
    ///
    /// # Safety
    /// 1. The CPU's thread has exited (nothing waits or polls any more).
    /// 2. No device is attached, and nobody calls [`Hlt::wake`] any more.
    pub(crate) unsafe fn release(&self) {
        for fd in [&self.epfd, &self.kick] {
            let f = fd.swap(-1, SeqCst);
            if f >= 0 {
                // SAFETY: our descriptor, unused by the obligations above.
                unsafe { libc::close(f) };
            }
        }
    }
}
