//! The statclock's timer: a CPU-time profiling timer per vCPU thread.
//!
//! Each vCPU thread gets a sampling event on its own CPU time that sends
//! `signals::statclock_sig` to that thread only, every `period`
//! of the vCPU's CPU time. Two sources, the first that works:
//!
//! * **perf** (`perf_event_open` of the software event `task-clock` on the
//!   vCPU thread, `sample_period` = the period in ns, its overflows
//!   signalled through `fcntl(F_SETOWN_EX` to the thread`, F_SETSIG,
//!   O_ASYNC)`): the kernel samples with a high-resolution timer that
//!   runs only while the thread does, so any period works (250 µs: 4000
//!   samples per CPU second). Needs `perf_event_open` for the process's
//!   own threads with kernel time included (root, `CAP_PERFMON`, or
//!   `perf_event_paranoid` ≤ 1).
//! * **timer** (`timer_create` on the thread's CPU clock, the clock id of
//!   `pthread_getcpuclockid`, `SIGEV_THREAD_ID`): always available, but
//!   Linux checks CPU-clock timers at the scheduler tick, so it fires at
//!   most once per tick of the thread's CPU time (`CONFIG_HZ`: every 4 ms
//!   at 250 Hz), whatever shorter period is asked for.
//!
//! [`Statclock::source`] says which one runs. The signal is not an
//! interrupt signal: the `mask` spl never blocks it (an NMI), so it samples
//! code running at any IPL, interrupt handlers included. Its handler
//! (`signals::dvma_statclock`) counts one sample for the part the
//! interrupted code is in (`kern::statclock`). A sample due while the
//! thread is in the host kernel (a system call) is delivered on the way
//! back to user space, to the code that made the call: a system call's
//! time is counted for the part that made it. (If the host cannot queue a
//! perf sample's real-time signal it sends `SIGIO` instead; the same
//! handler takes it.)
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
    /// Each vCPU thread's CPU time, sampled by perf if the host allows it,
    /// else by the CPU-clock timer (the statclock proper).
    Cpu,
    /// The CPU-clock timer even where perf would work (at most one sample
    /// per host tick).
    CpuTimer,
    /// The monotonic clock (high-resolution timers, any rate): samples
    /// also land on a sleeping vCPU and wake it. A stress of the signal
    /// path (`dvma race --statclock-us`), not a profile.
    Wall,
}

/// What samples the vCPUs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `perf_event_open` task-clock sampling: any period.
    Perf,
    /// `timer_create` on the thread CPU clock: at most once per host tick.
    Timer,
    /// `timer_create` on the monotonic clock ([`Clock::Wall`]).
    WallTimer,
}

impl Source {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Source::Perf => "perf_event_open task-clock sampling of each vCPU thread",
            Source::Timer => {
                "timer_create on each vCPU thread's CPU clock (at most one per host tick)"
            }
            Source::WallTimer => "timer_create on the monotonic clock",
        }
    }
}

/// What runs: perf event fds or POSIX timers (`timer_t` as an address).
#[derive(Debug, Default)]
struct Armed {
    perf_fds: Vec<i32>,
    timers: Vec<usize>,
    source: Option<Source>,
}

/// The statclock of a machine: a sampling event per vCPU while it runs.
#[derive(Debug)]
pub struct Statclock {
    tids: Vec<i32>,
    armed: Mutex<Armed>,
}

impl Statclock {
    pub(crate) fn new(tids: Vec<i32>) -> Self {
        Self {
            tids,
            armed: Mutex::new(Armed::default()),
        }
    }

    /// What samples now (`None`: stopped).
    pub fn source(&self) -> Option<Source> {
        self.armed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .source
    }

    /// Start sampling every vCPU every `period` of its CPU time (restarts
    /// it if it runs). Host or thread context.
    pub fn start(&self, period: Duration) -> std::io::Result<()> {
        self.start_on(Clock::Cpu, period)
    }

    /// [`Statclock::start`] on the clock `clock` (on the CPU clock: perf
    /// if the host allows it, else the CPU-clock timer).
    pub fn start_on(&self, clock: Clock, period: Duration) -> std::io::Result<()> {
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        disarm(&mut armed);
        let ns = period.as_nanos().clamp(1_000, 1_000_000_000) as u64;
        if clock == Clock::Cpu {
            match self.arm_perf(&mut armed, ns) {
                Ok(()) => {
                    armed.source = Some(Source::Perf);
                    return Ok(());
                }
                Err(_) => disarm(&mut armed),
            }
        }
        self.arm_timers(&mut armed, clock, ns)?;
        armed.source = Some(match clock {
            Clock::Cpu | Clock::CpuTimer => Source::Timer,
            Clock::Wall => Source::WallTimer,
        });
        Ok(())
    }

    fn arm_perf(&self, armed: &mut Armed, period_ns: u64) -> std::io::Result<()> {
        signals::install_sigio_statclock()?;
        for &tid in &self.tids {
            let fd = perf_open_task_clock(tid, period_ns)?;
            armed.perf_fds.push(fd);
            let owner = FOwnerEx {
                kind: F_OWNER_TID,
                pid: tid,
            };
            // SAFETY: fcntl on our own fd with valid arguments (a pointer
            // to a filled `f_owner_ex`, integers).
            let ok = unsafe {
                libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) == 0
                    && libc::fcntl(fd, F_SETSIG, signals::statclock_sig()) == 0
                    && libc::fcntl(
                        fd,
                        libc::F_SETFL,
                        libc::fcntl(fd, libc::F_GETFL) | libc::O_ASYNC,
                    ) == 0
                    && libc::ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) == 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn arm_timers(&self, armed: &mut Armed, clock: Clock, ns: u64) -> std::io::Result<()> {
        let ns = ns as i64;
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
                Clock::Cpu | Clock::CpuTimer => ((!tid) << 3) | 6,
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
                disarm(armed);
                return Err(e);
            }
            armed.timers.push(t as usize);
            // SAFETY: `t` is the timer just created; valid `itimerspec`.
            if unsafe { libc::timer_settime(t, 0, &its, std::ptr::null_mut()) } != 0 {
                let e = std::io::Error::last_os_error();
                disarm(armed);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stop sampling (nothing if it does not run). A signal already queued
    /// may still be taken. Host or thread context.
    pub fn stop(&self) {
        disarm(&mut self.armed.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Is it sampling?
    pub fn running(&self) -> bool {
        self.source().is_some()
    }
}

fn disarm(armed: &mut Armed) {
    for fd in armed.perf_fds.drain(..) {
        // SAFETY: our own perf event fd, closed once.
        unsafe {
            libc::ioctl(fd, PERF_EVENT_IOC_DISABLE, 0);
            libc::close(fd);
        }
    }
    for t in armed.timers.drain(..) {
        // SAFETY: a timer created by `arm_timers` and not deleted yet.
        unsafe { libc::timer_delete(t as libc::timer_t) };
    }
    armed.source = None;
}

impl Drop for Statclock {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- perf_event_open, the few pieces the libc crate does not have -------

/// `PERF_TYPE_SOFTWARE`.
const PERF_TYPE_SOFTWARE: u32 = 1;
/// `PERF_COUNT_SW_TASK_CLOCK`.
const PERF_COUNT_SW_TASK_CLOCK: u64 = 1;
/// `PERF_ATTR_SIZE_VER0`: the first 64 bytes of `perf_event_attr`, which
/// every kernel accepts.
const PERF_ATTR_SIZE_VER0: u32 = 64;
/// `perf_event_attr` flag bits: `disabled`, `exclude_hv`.
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_EXCLUDE_HV: u64 = 1 << 6;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `_IO('$', 0)` and `_IO('$', 1)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
/// `fcntl` commands and owner kind (x86_64).
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// `struct perf_event_attr`, its first 64 bytes (`PERF_ATTR_SIZE_VER0`).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// A disabled task-clock sampling event on thread `tid` (kernel time
/// included), overflowing every `period_ns` of its CPU time; every
/// overflow wakes the fd's owner.
fn perf_open_task_clock(tid: i32, period_ns: u64) -> std::io::Result<i32> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_SOFTWARE,
        size: PERF_ATTR_SIZE_VER0,
        config: PERF_COUNT_SW_TASK_CLOCK,
        sample_period: period_ns,
        flags: ATTR_DISABLED | ATTR_EXCLUDE_HV,
        wakeup_events: 1,
        ..PerfEventAttr::default()
    };
    const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == PERF_ATTR_SIZE_VER0 as usize);
    // SAFETY: `attr` is a valid `perf_event_attr` of the size it declares;
    // pid = the thread, cpu = any, no group.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            tid as libc::c_long,
            -1 as libc::c_long,
            -1 as libc::c_long,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd as i32)
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
