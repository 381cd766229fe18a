//! `kern::intr::intr_disestablish` on two real vCPUs: when it returns,
//! the handler is not running on the other CPU (it waits for it) and is
//! never called again, however often the vector is posted afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use kern::Ipl;
use kern::intr::{intr_disestablish, intr_establish, intr_post};

mod common;
use common::*;

/// A slow handler on CPU 1, posted from a host thread without pause;
/// CPU 0 disestablishes it while it runs. Afterwards nothing of it is
/// running and its run count stays put while the posts go on.
#[test]
fn disestablish_waits_for_a_running_handler_on_another_cpu() {
    let m = boot(2);
    static INSIDE: AtomicBool = AtomicBool::new(false);
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let h = intr_establish(Ipl::Bio, "slow", |_| {
        INSIDE.store(true, SeqCst);
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(300) {
            std::hint::spin_loop();
        }
        RUNS.fetch_add(1, SeqCst);
        INSIDE.store(false, SeqCst);
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                intr_post(1, h);
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    let (inside_after, runs_after) = m
        .run(0, "detacher", move |ctx| {
            // Let the handler get going, then catch it inside if we can.
            let t = Instant::now();
            while RUNS.load(SeqCst) < 5 && t.elapsed() < Duration::from_secs(10) {
                kern::sched::yield_now(ctx);
            }
            while !INSIDE.load(SeqCst) && t.elapsed() < Duration::from_secs(10) {
                std::hint::spin_loop();
            }
            intr_disestablish(ctx, h);
            (INSIDE.load(SeqCst), RUNS.load(SeqCst))
        })
        .unwrap();
    assert!(runs_after >= 5, "the handler ran before ({runs_after})");
    assert!(
        !inside_after,
        "disestablish returned with the handler running"
    );
    // The posts go on for a while: nothing runs it any more.
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, SeqCst);
    poster.join().unwrap();
    assert_eq!(RUNS.load(SeqCst), runs_after, "it ran after disestablish");
    m.shutdown().unwrap();
}
