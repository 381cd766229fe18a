//! Interrupt stress with real signals: nothing lost, nothing runs at or
//! below the level it interrupted, higher levels nest into lower ones.
//!
//! Three devices (host threads) post vectors at bio, net and high to both
//! CPUs as fast as they can, while a kernel thread on each CPU raises and
//! lowers its IPL at random and checks, inside every critical section, that
//! no handler at or below its level ran. Each handler checks the same for
//! the handlers it could interrupt, and records how deep interrupts nest.
//! Finally both CPUs spin in thread code without ever calling splx while
//! the devices post once more: only signals can deliver those.

#![allow(clippy::needless_range_loop)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

use kern::intr::{IntrHandle, intr_establish, intr_post};
use kern::{Ipl, spl};
use machine::{Machine, MachineConfig, SplImpl};

const LEVELS: [Ipl; 3] = [Ipl::Bio, Ipl::Net, Ipl::High];
const THREAD_LEVELS: [Ipl; 7] = [
    Ipl::None,
    Ipl::SoftBio,
    Ipl::Bio,
    Ipl::Net,
    Ipl::Tty,
    Ipl::Sched,
    Ipl::High,
];

#[derive(Default)]
struct PerCpu {
    runs: [AtomicU64; 3],
    active: [AtomicU32; 3],
    depth: AtomicU32,
    max_depth: AtomicU32,
    nested: AtomicU64,
}

#[derive(Default)]
struct State {
    cpus: [PerCpu; 2],
    events: [AtomicU64; 3],
    posted: [AtomicU64; 3],
    handled: [AtomicU64; 3],
    handler_violations: AtomicU64,
    thread_violations: AtomicU64,
    thread_sections: AtomicU64,
    stop_threads: AtomicBool,
}

impl PerCpu {
    fn runs_at_or_below(&self, level: Ipl) -> u64 {
        (0..3)
            .filter(|&j| LEVELS[j] <= level)
            .map(|j| self.runs[j].load(SeqCst))
            .sum()
    }
}

fn spin(n: u32) {
    for _ in 0..n {
        std::hint::spin_loop();
    }
}

fn handler(st: &State, i: usize, cpu: usize) {
    let me = LEVELS[i];
    let c = &st.cpus[cpu];
    if spl::current() != me {
        st.handler_violations.fetch_add(1, SeqCst);
    }
    let mut lower_active = false;
    for j in 0..3 {
        let a = c.active[j].load(SeqCst);
        if a > 0 && LEVELS[j] >= me {
            st.handler_violations.fetch_add(1, SeqCst); // interrupted an equal or higher handler
        }
        if a > 0 && LEVELS[j] < me {
            lower_active = true;
        }
    }
    if lower_active {
        c.nested.fetch_add(1, SeqCst);
    }
    c.active[i].fetch_add(1, SeqCst);
    let d = c.depth.fetch_add(1, SeqCst) + 1;
    c.max_depth.fetch_max(d, SeqCst);
    let before = c.runs_at_or_below(me);
    spin(300);
    if c.runs_at_or_below(me) != before {
        st.handler_violations.fetch_add(1, SeqCst); // an equal or lower handler ran inside us
    }
    st.handled[i].fetch_add(st.events[i].swap(0, SeqCst), SeqCst);
    c.runs[i].fetch_add(1, SeqCst);
    c.depth.fetch_sub(1, SeqCst);
    c.active[i].fetch_sub(1, SeqCst);
}

fn total_runs(st: &State) -> u64 {
    st.cpus
        .iter()
        .flat_map(|c| c.runs.iter())
        .map(|r| r.load(SeqCst))
        .sum()
}

fn stress(spl_impl: SplImpl, intr_stack: bool, target: u64, signal_min: u64) {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = 2;
    cfg.kernel.spl = spl_impl;
    cfg.intr_stack = intr_stack;
    let m = Machine::boot(cfg).unwrap();
    let st: Arc<State> = Arc::new(State::default());
    let handles: Vec<IntrHandle> = (0..3)
        .map(|i| {
            let s = st.clone();
            intr_establish(LEVELS[i], "stress", move |ctx| handler(&s, i, ctx.cpu())).unwrap()
        })
        .collect();

    // Phase 1: kernel threads raising and lowering at random.
    let mut threads = Vec::new();
    for cpu in 0..2 {
        let s = st.clone();
        threads.push(
            m.spawn(Some(cpu), "spl-walker", move |_ctx| {
                let c = &s.cpus[cpu];
                let mut x: u32 = 0x9e37_79b9 ^ cpu as u32;
                while !s.stop_threads.load(Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let l = THREAD_LEVELS[(x % THREAD_LEVELS.len() as u32) as usize];
                    let g = spl::raise(l);
                    let before = c.runs_at_or_below(l);
                    spin(200 + (x >> 24));
                    if c.runs_at_or_below(l) != before {
                        s.thread_violations.fetch_add(1, SeqCst);
                    }
                    drop(g);
                    s.thread_sections.fetch_add(1, Relaxed);
                }
            })
            .unwrap(),
        );
    }
    let stop_dev = Arc::new(AtomicBool::new(false));
    let devs: Vec<_> = (0..3)
        .map(|i| {
            let (s, stop, h) = (st.clone(), stop_dev.clone(), handles[i]);
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Relaxed) {
                    s.posted[i].fetch_add(1, SeqCst);
                    s.events[i].fetch_add(1, SeqCst);
                    intr_post(n % 2, h);
                    n += 1;
                    spin(100 + 150 * i as u32);
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    while total_runs(&st) < target && t0.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(20));
        m.check().unwrap();
    }
    stop_dev.store(true, SeqCst);
    for d in devs {
        d.join().unwrap();
    }
    st.stop_threads.store(true, SeqCst);
    for t in &threads {
        m.wait(t).unwrap();
    }
    let runs = total_runs(&st);

    // Phase 2: nothing lost, even with CPUs that never look by themselves.
    let spinning = Arc::new(AtomicU32::new(0));
    let release = Arc::new(AtomicBool::new(false));
    let mut spinners = Vec::new();
    for cpu in 0..2 {
        let (sp, rel) = (spinning.clone(), release.clone());
        spinners.push(
            m.spawn(Some(cpu), "spinner", move |_| {
                sp.fetch_add(1, SeqCst);
                while !rel.load(Relaxed) {
                    std::hint::spin_loop();
                }
            })
            .unwrap(),
        );
    }
    while spinning.load(SeqCst) < 2 {
        std::thread::yield_now();
    }
    for round in 0..20 {
        for i in 0..3 {
            st.posted[i].fetch_add(1, SeqCst);
            st.events[i].fetch_add(1, SeqCst);
            intr_post(round % 2, handles[i]);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let all_handled =
        |s: &State| (0..3).all(|i| s.handled[i].load(SeqCst) == s.posted[i].load(SeqCst));
    while !all_handled(&st) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let handled_while_spinning = all_handled(&st);
    release.store(true, SeqCst);
    for t in &spinners {
        m.wait(t).unwrap();
    }
    let kicks_failed = m.kicks_failed();
    let stats = m.shutdown().unwrap();

    let max_depth = st
        .cpus
        .iter()
        .map(|c| c.max_depth.load(SeqCst))
        .max()
        .unwrap();
    let nested: u64 = st.cpus.iter().map(|c| c.nested.load(SeqCst)).sum();
    // Handler runs a real signal delivered: every run of a hard handler is
    // dispatched by a trap (the signal handler), by splx replaying what
    // the IPL deferred, or by the idle loop polling; the kernel counts the
    // last two (over every vector, the clock's too). So the stress
    // handlers' runs minus all replays and idle dispatches is a lower
    // bound on the stress runs that entered through a signal.
    let all_runs = total_runs(&st);
    let replayed = stats.total(|c| c.splx_replays);
    let polled = stats.total(|c| c.idle_dispatch);
    let by_signal = all_runs.saturating_sub(replayed + polled);
    eprintln!(
        "{spl_impl:?} stack={intr_stack}: {runs} handler runs (at least {by_signal} by a signal; {replayed} splx replays, {polled} idle dispatches), {} thread sections, max depth {max_depth}, {nested} nested, traps {}, coalesced {}",
        st.thread_sections.load(SeqCst),
        stats.total(|c| c.traps),
        stats.total(|c| c.posts_coalesced),
    );
    for i in 0..3 {
        assert_eq!(
            st.handled[i].load(SeqCst),
            st.posted[i].load(SeqCst),
            "events lost at {}",
            LEVELS[i]
        );
    }
    assert!(
        handled_while_spinning,
        "events were only handled after the CPUs stopped spinning"
    );
    assert!(runs >= target, "only {runs} handler runs");
    assert!(
        by_signal >= signal_min,
        "only {by_signal} handler runs were delivered by a real signal (at least {signal_min} expected): the rest were splx replays ({replayed}) or idle dispatches ({polled})"
    );
    assert_eq!(
        st.handler_violations.load(SeqCst),
        0,
        "a handler ran at or below a level it interrupted"
    );
    assert_eq!(
        st.thread_violations.load(SeqCst),
        0,
        "a handler ran while thread code blocked its level"
    );
    assert!(max_depth >= 2, "interrupts never nested");
    assert!(nested > 0);
    assert_eq!(kicks_failed, 0);
    assert!(stats.total(|c| c.traps) > 0, "no real signal was taken");
}

/// Handler runs each variant must see delivered by a real signal (not
/// replayed by splx, not polled by the idle loop). Measured on the 2-core
/// CI-sized VM, 3 runs of each variant with other builds loading it (load
/// average 12-18): the lowest were 2 543 (lazy, interrupt stack), 4 914
/// (lazy, no stack), 9 334 (mask, interrupt stack) and 22 733 (mask, no
/// stack); lazy spl defers most posts to splx replays. 1 000 is well
/// under all of them: a machine whose signals stopped delivering
/// (everything replayed or polled) fails it.
const SIGNAL_MIN: u64 = 1_000;

#[test]
fn stress_lazy_intrstack() {
    stress(SplImpl::Lazy, true, 200_000, SIGNAL_MIN);
}

#[test]
fn stress_lazy_nostack() {
    stress(SplImpl::Lazy, false, 40_000, SIGNAL_MIN);
}

#[test]
fn stress_mask_intrstack() {
    stress(SplImpl::Mask, true, 40_000, SIGNAL_MIN);
}

#[test]
fn stress_mask_nostack() {
    stress(SplImpl::Mask, false, 40_000, SIGNAL_MIN);
}
