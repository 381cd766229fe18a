//! Kernel-core behaviour on a real machine: sleep and wakeup across CPUs,
//! IPL pools, soft-interrupt budgets, AST safe points, spin mutexes under
//! interrupts, might_sleep, thread churn.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

use kern::ast::{ast_establish, ast_push, no_ast};
use kern::intr::{intr_establish, intr_post};
use kern::lock::SpinMutex;
use kern::pool::Pool;
use kern::sched::{
    kthread_create, sleep_interlocked, tsleep, wakeup, wakeup_one_local, wchan, yield_now,
};
use kern::softint::{softint_establish, softint_schedule};
use kern::{Ipl, spl};
use machine::{MachineError, SplImpl};

mod common;
use common::{boot, boot_with};

/// Two threads on different CPUs hand a token back and forth 20 000 times
/// through sleep_interlocked/wakeup: every handoff needs a cross-CPU wakeup,
/// and a lost one would hang (the test's deadline catches it).
#[test]
fn sleep_and_wakeup_across_cpus() {
    for spl_impl in [SplImpl::Lazy, SplImpl::Mask] {
        let m = boot_with(2, |c| c.kernel.spl = spl_impl);
        const ROUNDS: u32 = 20_000;
        let turn = Arc::new(SpinMutex::new(Ipl::Sched, 0u32));
        let mut ts = Vec::new();
        for me in 0..2u32 {
            let turn = turn.clone();
            ts.push(
                m.spawn(Some(me as usize), "pingpong", move |ctx| {
                    for round in 0..ROUNDS {
                        let want = 2 * round + me;
                        loop {
                            let g = turn.lock();
                            if *g == want {
                                break;
                            }
                            sleep_interlocked(ctx, wchan(&*turn), g).unwrap();
                        }
                        *turn.lock() += 1;
                        wakeup(wchan(&*turn));
                    }
                })
                .unwrap(),
            );
        }
        let t0 = Instant::now();
        for t in &ts {
            while !t.is_done() {
                assert!(t0.elapsed() < Duration::from_secs(60), "lost wakeup: hung");
                std::thread::sleep(Duration::from_millis(5));
                m.check().unwrap();
            }
        }
        assert_eq!(*turn.lock(), 2 * ROUNDS);
        let s = m.shutdown().unwrap();
        assert!(s.total(|c| c.switches) >= ROUNDS as u64);
    }
}

/// `wakeup_one_local` wakes a sleeper of the caller's CPU even when one of
/// another CPU slept later (the sleep queue is LIFO: plain `wakeup_one`
/// would take that one), and falls back to another CPU's sleeper.
#[test]
fn wakeup_one_local_prefers_the_callers_cpu() {
    let m = boot(2);
    /// Threads asleep, and which CPUs woke, in order.
    type State = (u32, Vec<usize>);
    let st = Arc::new(SpinMutex::new(Ipl::Sched, State::default()));
    let sleeper = |cpu: usize| {
        let st = st.clone();
        m.spawn(Some(cpu), "sleeper", move |ctx| {
            let mut g = st.lock();
            g.0 += 1;
            sleep_interlocked(ctx, wchan(&*st), g).unwrap();
            st.lock().1.push(cpu);
        })
        .unwrap()
    };
    let wait_for = |f: &dyn Fn(&State) -> bool| {
        let t0 = Instant::now();
        while !f(&st.lock()) {
            assert!(t0.elapsed() < Duration::from_secs(30), "hung");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let a = sleeper(0);
    wait_for(&|s| s.0 == 1);
    let b = sleeper(1); // slept last: first in line for plain wakeup_one
    wait_for(&|s| s.0 == 2);
    let waker = |cpu: usize| {
        let st = st.clone();
        m.run(cpu, "waker", move |_| wakeup_one_local(wchan(&*st)))
            .unwrap()
    };
    assert!(waker(0));
    wait_for(&|s| !s.1.is_empty());
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(st.lock().1, vec![0], "the CPU 0 sleeper, and only it");
    // No sleeper on CPU 0 now: the one on CPU 1 is taken.
    assert!(waker(0));
    wait_for(&|s| s.1.len() == 2);
    assert_eq!(st.lock().1, vec![0, 1]);
    assert!(!waker(1), "nobody left to wake");
    for t in [a, b] {
        while !t.is_done() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    m.shutdown().unwrap();
}

/// A thread waiting for a pool item (WAITOK) sleeps until another CPU
/// returns one.
#[test]
fn pool_waitok_sleeps_until_an_item_is_returned() {
    let m = boot(2);
    let pool: &'static Pool<u64> = Box::leak(Box::new(Pool::new("one", Ipl::Bio, 1, |i| i as u64)));
    let held = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (h2, r2) = (held.clone(), release.clone());
    let holder = m
        .spawn(Some(0), "holder", move |ctx| {
            let it = pool.get_nowait().expect("the only item");
            h2.store(true, SeqCst);
            while !r2.load(SeqCst) {
                yield_now(ctx);
            }
            drop(it);
        })
        .unwrap();
    while !held.load(SeqCst) {
        std::thread::yield_now();
    }
    let got = Arc::new(AtomicBool::new(false));
    let g2 = got.clone();
    let waiter = m
        .spawn(Some(1), "waiter", move |ctx| {
            assert!(
                pool.get_nowait().is_none(),
                "NOWAIT on an empty pool returns None"
            );
            let it = pool.get_wait(ctx).unwrap();
            assert_eq!(*it, 0);
            g2.store(true, SeqCst);
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !got.load(SeqCst),
        "WAITOK returned before an item came back"
    );
    assert!(
        pool.stats.waits.load(SeqCst) >= 1,
        "the waiter did not sleep"
    );
    release.store(true, SeqCst);
    m.wait(&holder).unwrap();
    m.wait(&waiter).unwrap();
    assert!(got.load(SeqCst));
    m.shutdown().unwrap();
}

/// An interrupt handler takes items with NOWAIT from a pool that thread
/// code keeps draining: it gets None when empty and never blocks.
#[test]
fn pool_nowait_from_interrupts_never_blocks() {
    let m = boot(1);
    let pool: &'static Pool<[u8; 64]> =
        Box::leak(Box::new(Pool::new("bufs", Ipl::Bio, 8, |_| [0; 64])));
    let got = Arc::new(AtomicU64::new(0));
    let empty = Arc::new(AtomicU64::new(0));
    let (g2, e2) = (got.clone(), empty.clone());
    let v = intr_establish(Ipl::Bio, "pool-user", move |_| {
        for _ in 0..4 {
            match pool.get_nowait() {
                Some(it) => {
                    g2.fetch_add(1, SeqCst);
                    drop(it);
                }
                None => {
                    e2.fetch_add(1, SeqCst);
                }
            }
        }
    })
    .unwrap();
    let r = m
        .run(0, "hog", move |_| {
            let mut held = Vec::new();
            for round in 0..2000 {
                // Hold everything half of the time, nothing the other half.
                if round % 2 == 0 {
                    while let Some(it) = pool.get_nowait() {
                        held.push(it);
                    }
                } else {
                    held.clear();
                }
                intr_post(0, v);
            }
            held.len()
        })
        .unwrap();
    assert!(r <= 8);
    let s = m.shutdown().unwrap();
    assert!(got.load(SeqCst) > 0, "the handler never got an item");
    assert!(
        empty.load(SeqCst) > 0,
        "the handler never found the pool empty"
    );
    assert!(s.total(|c| c.traps) > 0);
    pool.audit().unwrap();
    assert_eq!(pool.available(), 8, "items lost");
}

/// A softint that reschedules itself runs out of its pass budget; the rest
/// runs in the softint daemon, and every scheduling is honoured.
#[test]
fn softint_budget_defers_to_the_daemon() {
    let m = boot_with(1, |c| {
        c.kernel.softint_max_restarts = 10;
    });
    const RUNS: u64 = 500;
    let runs = Arc::new(AtomicU64::new(0));
    let r2 = runs.clone();
    let h = Arc::new(std::sync::OnceLock::new());
    let h2 = h.clone();
    let si = softint_establish(Ipl::SoftNet, "self-resched", move |ctx| {
        assert!(spl::current() >= Ipl::SoftNet);
        assert_eq!(ctx.level(), Ipl::SoftNet);
        if r2.fetch_add(1, SeqCst) + 1 < RUNS {
            softint_schedule(h2.get().unwrap());
        }
    })
    .unwrap();
    h.set(si).unwrap();
    let v = intr_establish(Ipl::Net, "kick", move |_| softint_schedule(&si)).unwrap();
    m.run(0, "kicker", move |ctx| {
        intr_post(0, v);
        let t0 = Instant::now();
        while runs.load(SeqCst) < RUNS && t0.elapsed() < Duration::from_secs(20) {
            yield_now(ctx);
        }
    })
    .unwrap();
    let s = m.shutdown().unwrap();
    assert!(
        s.total(|c| c.softint_overruns) > 0,
        "no pass ran out of budget"
    );
    assert!(s.total(|c| c.softints_daemon) > 0, "the daemon ran nothing");
    assert_eq!(
        s.softints
            .iter()
            .find(|(n, _)| *n == "self-resched")
            .unwrap()
            .1,
        RUNS
    );
}

/// An AST never runs inside a no-AST region or under a spin mutex: it is
/// deferred and delivered at the region's end. Without the region it does
/// run inside it (so the check can fail).
#[test]
fn asts_wait_for_safe_points() {
    for protect in [true, false] {
        let m = boot(1);
        let inside = Arc::new(AtomicBool::new(false));
        let ran_inside = Arc::new(AtomicU64::new(0));
        let ran = Arc::new(AtomicU64::new(0));
        let (i2, ri2, r2) = (inside.clone(), ran_inside.clone(), ran.clone());
        let ast = ast_establish("probe", move |_| {
            r2.fetch_add(1, SeqCst);
            if i2.load(SeqCst) {
                ri2.fetch_add(1, SeqCst);
            }
        })
        .unwrap();
        let v = intr_establish(Ipl::Bio, "ast-dev", move |ctx| ast_push(ctx, &ast)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let dev = std::thread::spawn(move || {
            while !s2.load(SeqCst) {
                intr_post(0, v);
                std::thread::sleep(Duration::from_micros(30));
            }
        });
        let lock: &'static SpinMutex<u64> = Box::leak(Box::new(SpinMutex::new(Ipl::None, 0)));
        let i3 = inside.clone();
        m.run(0, "regions", move |_| {
            for round in 0..400 {
                // Alternate: a no-AST region, a spin mutex (at IPL none, so
                // only the safe-point rule keeps the AST out), or nothing.
                let t0 = Instant::now();
                let _g1 = (protect && round % 2 == 0).then(no_ast);
                let _g2 = (protect && round % 2 == 1).then(|| lock.lock());
                i3.store(true, SeqCst);
                while t0.elapsed() < Duration::from_micros(200) {
                    std::hint::spin_loop();
                }
                i3.store(false, SeqCst);
            }
        })
        .unwrap();
        stop.store(true, SeqCst);
        dev.join().unwrap();
        let s = m.shutdown().unwrap();
        eprintln!(
            "protect={protect}: {} ASTs ran, {} inside, pushed {}, deferred {}, at safe points {}",
            ran.load(SeqCst),
            ran_inside.load(SeqCst),
            s.total(|c| c.ast_pushed),
            s.total(|c| c.ast_deferred),
            s.total(|c| c.ast_safepoint)
        );
        assert!(ran.load(SeqCst) > 100);
        if protect {
            assert_eq!(
                ran_inside.load(SeqCst),
                0,
                "an AST ran outside a safe point"
            );
            assert!(s.total(|c| c.ast_deferred) > 0);
            assert!(s.total(|c| c.ast_safepoint) > 0);
        } else {
            assert!(
                ran_inside.load(SeqCst) > 0,
                "unprotected regions were never interrupted"
            );
        }
    }
}

/// AST handlers run as the interrupted thread, with a ThreadCtx: they may
/// sleep, and the interrupted thread resumes correctly afterwards.
#[test]
fn ast_handlers_may_sleep() {
    let m = boot(2);
    let slept = Arc::new(AtomicU64::new(0));
    let s2 = slept.clone();
    static CHAN: AtomicU32 = AtomicU32::new(0);
    let ast = ast_establish("sleeper", move |ctx| {
        let t0 = Instant::now();
        // Sleep until the waker on the other CPU wakes us (it does so often).
        tsleep(ctx, wchan(&CHAN)).unwrap();
        s2.fetch_add(1, SeqCst);
        assert!(t0.elapsed() < Duration::from_secs(10));
    })
    .unwrap();
    let v = intr_establish(Ipl::Bio, "ast-dev", move |ctx| ast_push(ctx, &ast)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st2 = stop.clone();
    let waker = m
        .spawn(Some(1), "waker", move |ctx| {
            while !st2.load(SeqCst) {
                wakeup(wchan(&CHAN));
                yield_now(ctx);
            }
            wakeup(wchan(&CHAN));
        })
        .unwrap();
    let sum = m
        .run(0, "worker", move |_| {
            let mut x = 0u64;
            for i in 0..2_000_000u64 {
                x = x.wrapping_add(i * i);
                if i % 10_000 == 0 {
                    intr_post(0, v);
                }
            }
            x
        })
        .unwrap();
    stop.store(true, SeqCst);
    m.wait(&waker).unwrap();
    let expect = (0..2_000_000u64).fold(0u64, |x, i| x.wrapping_add(i * i));
    assert_eq!(sum, expect, "the interrupted computation went wrong");
    assert!(
        slept.load(SeqCst) > 10,
        "only {} AST handlers slept",
        slept.load(SeqCst)
    );
    m.shutdown().unwrap();
}

/// Threads on both CPUs and interrupt handlers on both CPUs increment one
/// counter under an IPL_BIO spin mutex: no update is lost. The same without
/// the mutex (a plain read-modify-write) loses updates.
#[test]
fn spin_mutex_excludes_threads_and_interrupts() {
    for protect in [true, false] {
        let m = boot(2);
        let lock: &'static SpinMutex<u64> = Box::leak(Box::new(SpinMutex::new(Ipl::Bio, 0)));
        let raw: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let bump = move || {
            if protect {
                let mut g = lock.lock();
                let v = *g;
                std::hint::spin_loop();
                *g = v + 1;
            } else {
                let v = raw.load(Relaxed);
                for _ in 0..20 {
                    std::hint::spin_loop();
                }
                raw.store(v + 1, Relaxed);
            }
        };
        let handled = Arc::new(AtomicU64::new(0));
        let h2 = handled.clone();
        let v = intr_establish(Ipl::Bio, "bump", move |_| {
            bump();
            h2.fetch_add(1, SeqCst);
        })
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let dev = std::thread::spawn(move || {
            let mut n = 0;
            while !s2.load(SeqCst) {
                intr_post(n % 2, v);
                n += 1;
                std::thread::sleep(Duration::from_micros(5));
            }
        });
        const PER_THREAD: u64 = 200_000;
        let ts: Vec<_> = (0..2)
            .map(|cpu| {
                m.spawn(Some(cpu), "bumper", move |_| {
                    for _ in 0..PER_THREAD {
                        bump();
                    }
                })
                .unwrap()
            })
            .collect();
        for t in &ts {
            m.wait(t).unwrap();
        }
        stop.store(true, SeqCst);
        dev.join().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        m.shutdown().unwrap();
        let expect = 2 * PER_THREAD + handled.load(SeqCst);
        let got = if protect {
            *lock.lock()
        } else {
            raw.load(SeqCst)
        };
        eprintln!("protect={protect}: {got} of {expect}");
        if protect {
            assert_eq!(got, expect, "updates lost under the spin mutex");
        } else {
            assert!(
                got < expect,
                "the unprotected counter lost nothing: the test cannot fail"
            );
        }
    }
}

/// Sleeping while holding a spin mutex is caught at run time and reported
/// as a failure of the machine, with the reason.
#[test]
fn might_sleep_catches_a_sleep_under_a_spin_mutex() {
    let m = boot(1);
    let lock: &'static SpinMutex<()> = Box::leak(Box::new(SpinMutex::new(Ipl::Bio, ())));
    let r = m.run(0, "bad", move |ctx| {
        let _g = lock.lock();
        kern::ctx::might_sleep();
        let _ = tsleep(ctx, 1);
    });
    match r {
        Err(MachineError::CpuPanicked { message, .. }) => {
            assert!(message.contains("spin mutex"), "{message}");
        }
        other => panic!("expected a caught panic, got {other:?}"),
    }
    assert!(m.shutdown().is_err());
}

/// Threads come and go by the thousand; stacks are reused; join works.
#[test]
fn thread_churn_and_join() {
    let m = boot(2);
    let done = Arc::new(AtomicU64::new(0));
    let d2 = done.clone();
    m.run(0, "parent", move |ctx| {
        for batch in 0..20 {
            let ts: Vec<_> = (0..100)
                .map(|i| {
                    let d = d2.clone();
                    kthread_create(None, "child", move |ctx| {
                        if i % 3 == 0 {
                            yield_now(ctx);
                        }
                        d.fetch_add(1, SeqCst);
                    })
                    .unwrap()
                })
                .collect();
            for t in &ts {
                t.join(ctx).unwrap();
                assert!(t.is_done());
            }
            assert_eq!(d2.load(SeqCst), (batch + 1) * 100);
        }
    })
    .unwrap();
    assert_eq!(done.load(SeqCst), 2000);
    m.shutdown().unwrap();
}
