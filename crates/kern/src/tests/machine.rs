//! The fake machine itself: boot, interrupts, the clock.

use crate::fake::Machine;

/// Boot and tear down; the test thread is CPU 0 only while booted.
#[test]
fn boots_and_tears_down() {
    // Held past the teardown: another test's boot would make a kernel again.
    let _turn = {
        let mut m = Machine::boot();
        assert!(crate::cpu::curcpu_opt().is_some());
        assert_eq!(m.cpu().index(), 0);
        assert_eq!(crate::spl::current(), crate::ipl::Ipl::None);
        m.take_turn()
    };
    assert!(crate::cpu::curcpu_opt().is_none());
    assert!(crate::kernel::try_kernel().is_none());
}

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};

use crate::callout::{callout_establish, callout_schedule};
use crate::intr::{intr_establish, intr_post};
use crate::ipl::Ipl;
use crate::softint::{softint_establish, softint_schedule};
use crate::spl;

/// A device interrupt runs only when delivered, at its level; one the IPL
/// blocks stays pending through the trap and runs at the `splx`; posts
/// before delivery coalesce.
#[test]
fn interrupts_are_delivered_and_deferred_by_the_ipl() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static AT: AtomicU8 = AtomicU8::new(0);
    let m = Machine::boot();
    let v = intr_establish(Ipl::Bio, "test", |ctx| {
        RUNS.fetch_add(1, Relaxed);
        AT.store(spl::current() as u8, Relaxed);
        assert_eq!(ctx.level(), Ipl::Bio);
    })
    .expect("vector");
    RUNS.store(0, Relaxed);

    let kicks = m.kicks();
    intr_post(0, v);
    assert_eq!(m.kicks(), kicks + 1, "the CPU was interrupted");
    assert_eq!(RUNS.load(Relaxed), 0, "not before delivery");
    assert!(m.signals_pending());
    assert_eq!(m.deliver(), 1);
    assert_eq!(RUNS.load(Relaxed), 1);
    assert_eq!(AT.load(Relaxed), Ipl::Bio as u8, "ran at its level");
    assert_eq!(spl::current(), Ipl::None);

    // Coalesced: two posts, one run.
    intr_post(0, v);
    intr_post(0, v);
    m.deliver();
    assert_eq!(RUNS.load(Relaxed), 2);
    assert_eq!(m.cpu().stats.posts_coalesced.load(Relaxed), 1);

    // Blocked by splbio: the trap leaves it pending, splx runs it.
    let s = spl::splbio();
    intr_post(0, v);
    m.deliver();
    assert_eq!(RUNS.load(Relaxed), 2, "blocked at splbio");
    assert_eq!(m.cpu().stats.traps_idle.get(), 1);
    drop(s);
    assert_eq!(RUNS.load(Relaxed), 3, "replayed by splx");
    assert_eq!(m.cpu().stats.splx_replays.get(), 1);
    // A level above the IPL is not blocked.
    let s = spl::splsoftbio();
    intr_post(0, v);
    m.deliver();
    assert_eq!(RUNS.load(Relaxed), 4);
    drop(s);
}

/// A signal sent while the CPU ran threads lands after its idle loop
/// decided to sleep: the trap runs the handler, leaves the loop polling
/// (the handler may have queued a thread here, which posts nothing), and
/// tells the machine, whose wait may already be on its way into a system
/// call. On thread code it says nothing.
#[test]
fn a_trap_in_the_idle_sleep_window_is_reported() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let m = Machine::boot();
    let v = intr_establish(Ipl::Bio, "test", |_| {
        RUNS.fetch_add(1, Relaxed);
    })
    .expect("vector");
    RUNS.store(0, Relaxed);
    let line = m.cpu().line();

    intr_post(0, v); // RUNNING: the poster sends a signal
    line.idle_poll();
    assert!(line.idle_try_sleep());
    assert!(m.trap(Ipl::Bio), "ran handlers in the sleep window");
    assert_eq!(RUNS.load(Relaxed), 1);
    assert_eq!(line.state(), crate::pending::POLL);

    line.idle_end();
    intr_post(0, v);
    assert!(!m.trap(Ipl::Bio), "thread code was interrupted");
    assert_eq!(RUNS.load(Relaxed), 2);
    assert_eq!(line.state(), crate::pending::RUNNING);
}

/// A softint runs at once from thread code below its level, at the `splx`
/// from a level that blocks it, and on the return of the interrupt that
/// scheduled it (after the handler, at its own level).
#[test]
fn softints_run_below_their_level() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static HARD_DONE: AtomicUsize = AtomicUsize::new(0);
    let m = Machine::boot();
    let h = softint_establish(Ipl::SoftBio, "test", |ctx| {
        assert_eq!(ctx.level(), Ipl::SoftBio);
        assert_eq!(spl::current(), Ipl::SoftBio);
        RUNS.fetch_add(1, Relaxed);
    })
    .expect("softint");
    RUNS.store(0, Relaxed);
    softint_schedule(&h);
    assert_eq!(RUNS.load(Relaxed), 1, "at once from IPL none");
    let s = spl::splsoftbio();
    softint_schedule(&h);
    softint_schedule(&h);
    assert_eq!(RUNS.load(Relaxed), 1, "blocked");
    drop(s);
    assert_eq!(RUNS.load(Relaxed), 2, "once, at splx");

    let v = intr_establish(Ipl::Bio, "test", move |_| {
        softint_schedule(&h);
        assert_eq!(RUNS.load(Relaxed), 2, "not inside the handler");
        HARD_DONE.fetch_add(1, Relaxed);
    })
    .expect("vector");
    intr_post(0, v);
    m.deliver();
    assert_eq!(HARD_DONE.load(Relaxed), 1);
    assert_eq!(RUNS.load(Relaxed), 3, "on the interrupt's return");
}

/// Callouts run once, from softclock, at the first tick at or after their
/// deadline on the fake clock; rescheduling an armed one keeps the earlier
/// deadline.
#[test]
fn callouts_follow_the_fake_clock() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let m = Machine::boot();
    RUNS.store(0, Relaxed);
    let c = callout_establish(|ctx| {
        assert_eq!(ctx.level(), Ipl::SoftClock);
        RUNS.fetch_add(1, Relaxed);
    })
    .expect("callout");
    callout_schedule(c, 5_000_000);
    callout_schedule(c, 50_000_000); // keeps 5 ms
    m.tick(1_000_000);
    assert_eq!(RUNS.load(Relaxed), 0);
    m.tick(3_999_999);
    assert_eq!(RUNS.load(Relaxed), 0, "4.999999 ms");
    m.tick(1);
    assert_eq!(RUNS.load(Relaxed), 1, "5 ms");
    m.tick(100_000_000);
    assert_eq!(RUNS.load(Relaxed), 1, "once");
    assert_eq!(m.now(), 105_000_000);
}
