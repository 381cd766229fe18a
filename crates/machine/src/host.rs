//! Host-side helpers for measurements and devices: pinning, OS-thread
//! ping-pong (the baseline kernel threads are compared with).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::*};
use std::time::Instant;

use crate::sys;

/// Pin the calling host thread to host CPU `cpu`. Returns false if the
/// host refused.
pub fn pin_current_thread(cpu: usize) -> bool {
    // SAFETY: `cpu_set_t` is plain data; CPU_ZERO/CPU_SET only write into it
    // and `sched_setaffinity(0, ...)` reads it.
    unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Undo [`pin_current_thread`]: allow every host CPU.
pub fn unpin_current_thread() {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // SAFETY: as in `pin_current_thread`.
    unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for c in 0..n {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The calling host thread's CPU affinity, to put back with
/// [`Affinity::restore`] after pinning it.
pub struct Affinity(libc::cpu_set_t);

impl Affinity {
    /// The calling thread's affinity now (every CPU if the host refuses to
    /// say).
    pub fn current() -> Affinity {
        // SAFETY: `cpu_set_t` is plain data; `sched_getaffinity(0, ...)`
        // writes at most its size into it.
        unsafe {
            let mut set: libc::cpu_set_t = core::mem::zeroed();
            if libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                for c in 0..libc::CPU_SETSIZE as usize {
                    libc::CPU_SET(c, &mut set);
                }
            }
            Affinity(set)
        }
    }

    /// The host CPUs it allows, in order.
    pub fn cpus(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: reads the plain-data set.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &self.0) })
            .collect()
    }

    /// Make it the calling thread's affinity again.
    pub fn restore(&self) {
        // SAFETY: `sched_setaffinity(0, ...)` only reads the set.
        unsafe {
            libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &self.0);
        }
    }
}

/// Set the congestion control of the TCP socket `fd` (`TCP_CONGESTION`,
/// e.g. `cubic`; any the host allows unprivileged processes, listed in
/// `net.ipv4.tcp_allowed_congestion_control`). Host or thread context.
pub fn set_tcp_congestion(fd: std::os::fd::BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `fd` is a live descriptor for the borrow; the option value
    // is `name`'s bytes, valid for `name.len()` bytes during the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Nanoseconds per switch between two OS threads ping-ponging through a
/// futex `iters` times each; both pinned to host CPU 0 if `same_cpu`,
/// else to CPUs 0 and 1.
pub fn os_thread_switch_ns(iters: u32, same_cpu: bool) -> f64 {
    let word = Arc::new(AtomicU32::new(0));
    let w2 = word.clone();
    let other = if same_cpu { 0 } else { 1 };
    let b = std::thread::spawn(move || {
        pin_current_thread(other);
        for _ in 0..iters {
            while w2.load(Acquire) != 1 {
                sys::futex_wait(&w2, 0);
            }
            w2.store(0, Release);
            sys::futex_wake(&w2, 1);
        }
    });
    pin_current_thread(0);
    let t0 = Instant::now();
    for _ in 0..iters {
        word.store(1, Release);
        sys::futex_wake(&word, 1);
        while word.load(Acquire) != 0 {
            sys::futex_wait(&word, 1);
        }
    }
    let dt = t0.elapsed();
    unpin_current_thread();
    let _ = b.join();
    dt.as_nanos() as f64 / (2.0 * iters as f64)
}

/// Nanoseconds per bare `cpu_switchto` between two contexts running the
/// same code (as two kernel threads yielding to each other do), with no
/// kernel bookkeeping at all: the floor under a kernel-thread switch here.
pub fn raw_switch_ns(iters: u64) -> f64 {
    use std::sync::atomic::AtomicUsize;
    static MAIN_SP: AtomicUsize = AtomicUsize::new(0);
    static SP: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
    static LEFT: AtomicUsize = AtomicUsize::new(0);
    extern "C" fn bounce(me: usize) -> ! {
        loop {
            let n = LEFT.load(Relaxed);
            let to = if n == 0 {
                MAIN_SP.load(Relaxed)
            } else {
                LEFT.store(n - 1, Relaxed);
                SP[1 - me].load(Relaxed)
            };
            // SAFETY: `to` is a context saved by the other bouncer (or by
            // the main loop), parked in this very call or at its start.
            unsafe { kern::md::cpu_switchto(SP[me].as_ptr(), to) };
        }
    }
    let mut maps = Vec::new();
    for (i, sp) in SP.iter().enumerate() {
        let Some((addr, len)) = crate::mem::map_stack(64 * 1024) else {
            return f64::NAN;
        };
        // SAFETY: a fresh stack of ours; its top is page-aligned.
        sp.store(
            unsafe { kern::arch::thread_frame(addr + len, bounce, i) },
            Relaxed,
        );
        maps.push((addr, len));
    }
    LEFT.store(iters as usize, Relaxed);
    let t0 = Instant::now();
    // SAFETY: SP[0] is bouncer 0's fresh context; the bouncers switch back
    // to MAIN_SP once they have switched `iters` times.
    unsafe { kern::md::cpu_switchto(MAIN_SP.as_ptr(), SP[0].load(Relaxed)) };
    let dt = t0.elapsed();
    for (addr, len) in maps {
        // SAFETY: both bouncers are parked in a switch and never resumed.
        unsafe { crate::mem::unmap(addr, len) };
    }
    dt.as_nanos() as f64 / iters as f64
}
