//! Releasing the last spin mutex restores the level from before the first
//! one, even when an interrupt that takes a spin mutex of its own lands in
//! the middle of the release.
//!
//! A kernel thread at IPL none takes and releases a spin mutex at IPL_BIO
//! in a tight loop and checks, after every release, that it is back at
//! IPL none. A device interrupts it as fast as it can at IPL_NET (above
//! BIO, so it is taken while the thread holds its mutex), and the handler
//! takes and releases a spin mutex of its own.
//!
//! Before the fix, `lock.rs`'s release decremented the CPU's mutex count
//! and only then read `mtx_oldspl`; a handler landing between the two found
//! the count at zero, recorded *its* level (NET) there, and the thread then
//! "restored" NET and stayed raised. Under `dvma serve --completion ast`
//! that left the softint daemon spinning at a raised IPL, where no AST is
//! ever delivered: the livelock of issue 10. This test caught it within a
//! few hundred thousand iterations on the unfixed code (lazy and mask).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::{Duration, Instant};

use kern::Ipl;
use kern::intr::{intr_establish, intr_post};
use kern::lock::SpinMutex;
use machine::{Machine, MachineConfig, SplImpl};

struct Outcome {
    iterations: u64,
    leaked: Option<Ipl>,
    handler_runs: u64,
}

fn run(spl: SplImpl) -> Outcome {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = 1;
    cfg.kernel.spl = spl;
    let m = Machine::boot(cfg).unwrap();
    let thread_mtx: &'static SpinMutex<u64> = Box::leak(Box::new(SpinMutex::new(Ipl::Bio, 0)));
    let intr_mtx: &'static SpinMutex<u64> = Box::leak(Box::new(SpinMutex::new(Ipl::Net, 0)));
    let vec = intr_establish(Ipl::Net, "oldspl-dev", move |_| {
        *intr_mtx.lock() += 1;
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let dev = std::thread::spawn(move || {
        while !s2.load(Relaxed) {
            intr_post(0, vec);
            std::thread::sleep(Duration::from_micros(2));
        }
    });
    let (iterations, leaked) = m
        .run(0, "spin-loop", move |_| {
            let end = Instant::now() + Duration::from_millis(500);
            let mut n = 0u64;
            while Instant::now() < end {
                for _ in 0..1000 {
                    *thread_mtx.lock() += 1;
                    n += 1;
                    let now = kern::spl::current();
                    if now != Ipl::None {
                        return (n, Some(now));
                    }
                }
            }
            (n, None)
        })
        .unwrap();
    stop.store(true, SeqCst);
    dev.join().unwrap();
    let handler_runs = *intr_mtx.lock();
    m.shutdown().unwrap();
    Outcome {
        iterations,
        leaked,
        handler_runs,
    }
}

#[test]
fn last_release_restores_the_level_under_an_interrupt_storm() {
    for spl in [SplImpl::Lazy, SplImpl::Mask] {
        let o = run(spl);
        eprintln!(
            "{spl:?}: {} lock/unlock pairs, {} interrupts that took a mutex, leaked: {:?}",
            o.iterations, o.handler_runs, o.leaked
        );
        assert_eq!(
            o.leaked, None,
            "{spl:?}: after {} releases the CPU stayed at a raised IPL",
            o.iterations
        );
        assert!(
            o.handler_runs > 100,
            "{spl:?}: only {} interrupts: the storm did not happen",
            o.handler_runs
        );
    }
}
