//! A network interface that reports to a CPU's `hlt`.
//!
//! A [`Nic`] belongs to one vCPU. Host sockets attached to it
//! ([`Nic::attach`]) report their readiness (readable, writable, hung up)
//! to its *receive queue*, an edge-triggered `epoll` set. The queue itself
//! sits in that CPU's idle wait (`crate::hlt`): when the CPU idles and the
//! queue has events, the CPU posts the NIC's interrupt on itself, with no
//! host thread and no signal in between. The driver then takes the events
//! with [`Nic::poll`] (without sleeping) and does the socket I/O itself,
//! from kernel-thread context, with non-blocking calls: the NAPI model,
//! where the interrupt only says "look", and a driver that is already
//! looking (a busy CPU) polls instead of being interrupted.
//!
//! Events are edge-triggered: one is reported when a socket *becomes*
//! readable or writable, so the driver reads until `EAGAIN` (or remembers
//! that it stopped early) and drains the queue until [`Nic::poll`] returns
//! fewer events than it asked for.
//!
//! # Who may call what, from which context
//! * [`Nic::poll`], [`Nic::attach`], [`Nic::detach`]: thread or host
//!   context (system calls; never an interrupt handler).
//! * [`Nic::set_interrupt`], [`Nic::stop`], `Drop`: host or thread context;
//!   a NIC must be stopped before its machine shuts down, as every device.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, PoisonError};

use kern::intr::IntrHandle;

/// What a socket reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicEvent {
    /// The token the socket was attached with.
    pub token: u64,
    /// It became readable (data, or the peer's end of stream).
    pub readable: bool,
    /// It became writable.
    pub writable: bool,
    /// The peer shut down its sending side (what it sent before is still
    /// to be read; then reads return end of stream).
    pub peer_closed: bool,
    /// The connection hung up or failed.
    pub hangup: bool,
}

/// A network interface of one CPU (module docs).
pub struct Nic {
    queue: OwnedFd,
    cpu: usize,
    md: &'static crate::md::LinuxMd,
    slot: Mutex<Option<usize>>,
}

impl Nic {
    pub(crate) fn new(md: &'static crate::md::LinuxMd, cpu: usize) -> io::Result<Nic> {
        if cpu >= md.hlt.len() {
            return Err(io::Error::other(format!("no cpu{cpu}")));
        }
        // SAFETY: a plain system call creating a descriptor we then own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Nic {
            // SAFETY: a fresh descriptor nobody else owns.
            queue: unsafe { OwnedFd::from_raw_fd(fd) },
            cpu,
            md,
            slot: Mutex::new(None),
        })
    }

    /// The CPU whose wait this NIC reports to.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Report to the CPU's wait: when it idles and the receive queue has
    /// events, it posts `vector` on itself. Once.
    pub fn set_interrupt(&self, vector: IntrHandle) -> io::Result<()> {
        let mut s = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if s.is_none() {
            *s = Some(self.md.hlt[self.cpu].attach(self.queue.as_raw_fd(), vector)?);
        }
        Ok(())
    }

    /// Attach socket `fd` (non-blocking, the caller's): its readiness
    /// changes arrive in the receive queue with `token`.
    pub fn attach(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: a valid event; both descriptors are open.
        if unsafe { libc::epoll_ctl(self.queue.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Detach socket `fd` (closing it does too).
    pub fn detach(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `attach`; failure (not attached) is harmless.
        unsafe { libc::epoll_ctl(self.queue.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Take up to `out.len()` events without sleeping; returns how many.
    pub fn poll(&self, out: &mut [NicEvent]) -> usize {
        const MAX: usize = 64;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        let want = out.len().min(MAX);
        // SAFETY: `evs` holds `want` events.
        let n =
            unsafe { libc::epoll_wait(self.queue.as_raw_fd(), evs.as_mut_ptr(), want as i32, 0) };
        let n = n.max(0) as usize;
        for (o, e) in out.iter_mut().zip(&evs[..n]) {
            let bits = e.events as i32;
            *o = NicEvent {
                token: e.u64,
                readable: bits & (libc::EPOLLIN | libc::EPOLLRDHUP) != 0,
                writable: bits & libc::EPOLLOUT != 0,
                peer_closed: bits & libc::EPOLLRDHUP != 0,
                hangup: bits & (libc::EPOLLHUP | libc::EPOLLERR) != 0,
            };
        }
        n
    }

    /// Stop reporting to the CPU's wait. Idempotent.
    pub fn stop(&self) {
        if let Some(slot) = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            self.md.hlt[self.cpu].detach(self.queue.as_raw_fd(), slot);
        }
    }
}

impl Drop for Nic {
    fn drop(&mut self) {
        self.stop();
    }
}

impl crate::Machine {
    /// A network interface reporting to CPU `cpu`'s wait.
    pub fn nic(&self, cpu: usize) -> io::Result<Nic> {
        Nic::new(self.md, cpu)
    }
}
