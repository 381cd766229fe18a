//! The statclock's timer: a CPU-time profiling timer per vCPU thread.
//!
//! Each vCPU thread gets a POSIX timer on its own thread CPU clock
//! (`timer_create` on the clock id of `pthread_getcpuclockid`, which is
//! `MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`), delivering
//! [`crate::signals::statclock_sig`] to that thread only
//! (`SIGEV_THREAD_ID`), every `period` of the vCPU's CPU time. The signal
//! is not an interrupt signal: the `mask` spl never blocks it (an NMI), so
//! it samples code running at any IPL, interrupt handlers included. Its
//! handler (`signals::dvma_statclock`) counts one sample for the part the
//! interrupted code is in (`kern::statclock`).
//!
//! Linux checks CPU-clock timers at the scheduler tick, so a timer fires at
//! most once per tick of the thread's CPU time (`CONFIG_HZ`: every 4 ms at
//! 250 Hz), whatever shorter period is asked for; [`Statclock::start`]
//! takes the period anyway, and the bench reports the samples it got. A
//! tick that lands while the thread is in the host kernel (a system call)
//! is delivered on the way back to user space, to the code that made the
//! call: a system call's time is counted for the part that made it.
//!
//! # Contexts
//! [`Statclock::start`] and [`Statclock::stop`] are host or thread context
//! (any thread, kernel threads included: they are system calls under a
//! host mutex that nothing in interrupt context takes).

use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::Duration;

use crate::signals;

/// Which clock drives the statclock's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// Each vCPU thread's CPU clock: samples are spread over CPU time (the
    /// statclock proper; at most one per host tick).
    Cpu,
    /// The monotonic clock (high-resolution timers, any rate): samples
    /// also land on a sleeping vCPU and wake it. A stress of the signal
    /// path (`dvma race --statclock-us`), not a profile.
    Wall,
}

/// The statclock of a machine: a timer per vCPU while it runs.
#[derive(Debug)]
pub struct Statclock {
    tids: Vec<i32>,
    /// The armed timers (`timer_t` as an address), empty when stopped.
    timers: Mutex<Vec<usize>>,
}

impl Statclock {
    pub(crate) fn new(tids: Vec<i32>) -> Self {
        Self {
            tids,
            timers: Mutex::new(Vec::new()),
        }
    }

    /// Start sampling every vCPU every `period` of its CPU time (restarts
    /// it if it runs). Host or thread context.
    pub fn start(&self, period: Duration) -> std::io::Result<()> {
        self.start_on(Clock::Cpu, period)
    }

    /// [`Statclock::start`] on the clock `clock`.
    pub fn start_on(&self, clock: Clock, period: Duration) -> std::io::Result<()> {
        let mut timers = self.timers.lock().unwrap_or_else(PoisonError::into_inner);
        delete(&mut timers);
        let ns = period.as_nanos().clamp(1_000, 1_000_000_000) as i64;
        let its = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: ns / 1_000_000_000,
                tv_nsec: ns % 1_000_000_000,
            },
            it_value: libc::timespec {
                tv_sec: ns / 1_000_000_000,
                tv_nsec: ns % 1_000_000_000,
            },
        };
        for &tid in &self.tids {
            let clk: libc::clockid_t = match clock {
                // The thread's CPU clock: MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED).
                Clock::Cpu => ((!tid) << 3) | 6,
                Clock::Wall => libc::CLOCK_MONOTONIC,
            };
            // SAFETY: all-zero is a valid `sigevent` (plain integers and a
            // union of an integer and a pointer).
            let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
            ev.sigev_notify = libc::SIGEV_THREAD_ID;
            ev.sigev_signo = signals::statclock_sig();
            ev.sigev_notify_thread_id = tid;
            let mut t: libc::timer_t = std::ptr::null_mut();
            // SAFETY: valid pointers to a filled `sigevent` and an out slot.
            if unsafe { libc::timer_create(clk, &mut ev, &mut t) } != 0 {
                let e = std::io::Error::last_os_error();
                delete(&mut timers);
                return Err(e);
            }
            timers.push(t as usize);
            // SAFETY: `t` is the timer just created; valid `itimerspec`.
            if unsafe { libc::timer_settime(t, 0, &its, std::ptr::null_mut()) } != 0 {
                let e = std::io::Error::last_os_error();
                delete(&mut timers);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stop sampling (nothing if it does not run). A signal already queued
    /// may still be taken. Host or thread context.
    pub fn stop(&self) {
        delete(&mut self.timers.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Is it sampling?
    pub fn running(&self) -> bool {
        !self
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

fn delete(timers: &mut Vec<usize>) {
    for t in timers.drain(..) {
        // SAFETY: a timer created by `start` and not deleted yet.
        unsafe { libc::timer_delete(t as libc::timer_t) };
    }
}

impl Drop for Statclock {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The statclock's signal number (for tests that check it is never
/// blocked).
pub fn signal() -> i32 {
    signals::statclock_sig()
}

/// The statclock samples of CPU `cpu` so far, by part id
/// (`kern::statclock::samples`). Any thread.
pub fn samples(cpu: usize) -> [u64; kern::statclock::Part::COUNT] {
    kern::statclock::samples(cpu)
}
