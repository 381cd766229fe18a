//! The statclock on a real machine: its samples arrive, they land in the
//! part the vCPU is running, even at IPL_HIGH under the `mask` spl (which
//! blocks every interrupt signal), and the sampling runs no interrupt.

use std::time::Duration;

use kern::statclock::{Part, enter, samples};
use kern::{Ipl, spl};
use machine::statclock::{Clock, Source};
use machine::{Machine, MachineConfig, SplImpl};

/// CPU time of the calling host thread, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn boot(spl: SplImpl) -> Machine {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = 1;
    cfg.kernel.spl = spl;
    Machine::boot(cfg).expect("boot")
}

fn diff(a: &[u64; Part::COUNT], b: &[u64; Part::COUNT]) -> [u64; Part::COUNT] {
    std::array::from_fn(|i| b[i] - a[i])
}

/// A kernel thread at IPL_HIGH under the `mask` spl spins for 300 ms of
/// CPU time inside a part: the statclock's samples keep coming (the signal
/// is not blocked by the spl), nearly all of them in that part, and not one
/// interrupt is taken meanwhile (the clock posts every 10 ms: they stay
/// blocked until the `splx`).
///
/// Both sources: perf sampling where the host allows it (else the timer
/// again), and the CPU-clock timer.
#[test]
fn samples_arrive_at_ipl_high_under_mask_spl_in_the_part_that_runs() {
    for clock in [Clock::Cpu, Clock::CpuTimer] {
        at_ipl_high(clock);
    }
}

fn at_ipl_high(clock: Clock) {
    let m = boot(SplImpl::Mask);
    let sc = m.statclock();
    sc.start_on(clock, Duration::from_micros(100))
        .expect("start the statclock");
    assert!(sc.running());
    let source = sc.source();
    if clock == Clock::CpuTimer {
        assert_eq!(source, Some(Source::Timer));
    }
    let (d, traps) = m
        .run(0, "spin", |_| {
            let s = spl::splhigh();
            assert_eq!(spl::current(), Ipl::High);
            let traps0 = kern::stats::snapshot().total(|c| c.traps);
            let a = samples(0);
            {
                let _p = enter(Part::Driver);
                let t0 = thread_cpu_ns();
                while thread_cpu_ns() - t0 < 300_000_000 {
                    std::hint::spin_loop();
                }
            }
            let b = samples(0);
            let traps = kern::stats::snapshot().total(|c| c.traps) - traps0;
            drop(s);
            (diff(&a, &b), traps)
        })
        .expect("run");
    sc.stop();
    assert!(!sc.running());
    let total: u64 = d.iter().sum();
    eprintln!("{source:?}: samples by part: {d:?}, traps {traps}");
    let driver = d[Part::Driver as usize];
    // 300 ms of CPU time: 75 ticks at 250 Hz, 300 at 1000 Hz.
    assert!(driver >= 20, "only {driver} samples in the part: {d:?}");
    assert!(
        driver * 100 >= total * 95,
        "samples outside the part that ran: {d:?}"
    );
    assert_eq!(
        traps, 0,
        "an interrupt was taken at IPL_HIGH under mask spl"
    );
    m.shutdown().expect("shutdown");
}

/// A kernel thread that does nothing but spl pairs (`mask` spl: two host
/// `sigprocmask` calls each) is sampled mostly as `spl`: the markers are in
/// spl, and a system call's time is counted for the part that made it.
#[test]
fn a_thread_doing_spl_pairs_is_sampled_as_spl() {
    let m = boot(SplImpl::Mask);
    let sc = m.statclock();
    sc.start(Duration::from_micros(100))
        .expect("start the statclock");
    let d = m
        .run(0, "spl", |_| {
            let _p = enter(Part::Thread);
            let a = samples(0);
            let t0 = thread_cpu_ns();
            while thread_cpu_ns() - t0 < 300_000_000 {
                for _ in 0..256 {
                    let s = spl::splbio();
                    drop(s);
                }
            }
            diff(&a, &samples(0))
        })
        .expect("run");
    sc.stop();
    let total: u64 = d.iter().sum();
    eprintln!("samples by part: {d:?}");
    let in_spl = d[Part::Spl as usize];
    assert!(total >= 20, "only {total} samples: {d:?}");
    assert!(in_spl * 100 >= total * 70, "spl has too few samples: {d:?}");
    m.shutdown().expect("shutdown");
}

/// Stopped, it samples nothing.
#[test]
fn a_stopped_statclock_samples_nothing() {
    let m = boot(SplImpl::Lazy);
    let sc = m.statclock();
    sc.start(Duration::from_micros(100)).expect("start");
    sc.stop();
    std::thread::sleep(Duration::from_millis(10));
    let d = m
        .run(0, "quiet", |_| {
            let a = samples(0);
            let t0 = thread_cpu_ns();
            while thread_cpu_ns() - t0 < 50_000_000 {
                std::hint::spin_loop();
            }
            diff(&a, &samples(0))
        })
        .expect("run");
    assert_eq!(d, [0; Part::COUNT]);
    m.shutdown().expect("shutdown");
}
