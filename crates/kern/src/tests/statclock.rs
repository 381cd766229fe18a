//! statclock: the part word's nesting, what the sampler counts where, and
//! the split's arithmetic.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::fake::Machine;
use crate::intr::{intr_establish, intr_post};
use crate::ipl::Ipl;
use crate::spl;
use crate::statclock::{Part, current, enter, samples, split, statclock};

/// The samples counted since `before`, by part.
fn since(before: &[u64; Part::COUNT]) -> [u64; Part::COUNT] {
    let now = samples(0);
    core::array::from_fn(|i| now[i] - before[i])
}

fn only(part: Part, n: u64) -> [u64; Part::COUNT] {
    let mut v = [0; Part::COUNT];
    v[part as usize] = n;
    v
}

/// Guards nest and restore in LIFO order; each tick counts one sample for
/// the innermost part, or for the part the machine names.
#[test]
fn parts_nest_and_the_sampler_counts_the_innermost() {
    let _m = Machine::boot();
    assert_eq!(current(), Part::Other, "a fresh CPU is in no part");
    let s0 = samples(0);
    {
        let _d = enter(Part::Driver);
        assert_eq!(current(), Part::Driver);
        statclock(None);
        {
            let _b = enter(Part::BusDma);
            assert_eq!(current(), Part::BusDma);
            statclock(None);
            statclock(None);
            {
                let _s = enter(Part::Spl);
                statclock(None);
            }
            assert_eq!(current(), Part::BusDma);
        }
        assert_eq!(
            current(),
            Part::Driver,
            "the inner guard restored the outer part"
        );
        // The machine knows it interrupted its own entry stub.
        statclock(Some(Part::IntrEntry));
    }
    assert_eq!(current(), Part::Other);
    let d = since(&s0);
    let mut want = [0; Part::COUNT];
    want[Part::Driver as usize] = 1;
    want[Part::BusDma as usize] = 2;
    want[Part::Spl as usize] = 1;
    want[Part::IntrEntry as usize] = 1;
    assert_eq!(d, want);
    // spl restores the part it found, in both directions.
    {
        let _t = enter(Part::Thread);
        let s = spl::splbio();
        assert_eq!(current(), Part::Thread);
        drop(s);
        assert_eq!(current(), Part::Thread);
    }
}

/// A tick inside a hardware handler counts for the interrupt entry (the
/// dispatch loop's part; the handler marks nothing), whether the interrupt
/// came by trap or was replayed by `splx`; afterwards the interrupted part
/// is back.
#[test]
fn a_tick_in_a_handler_counts_for_the_interrupt_and_splx_restores_the_part() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let m = Machine::boot();
    let v = intr_establish(Ipl::Bio, "tick", |_| {
        RUNS.fetch_add(1, Relaxed);
        statclock(None);
    })
    .expect("vector");
    RUNS.store(0, Relaxed);
    let _t = enter(Part::Thread);
    let s0 = samples(0);
    intr_post(0, v);
    m.deliver();
    assert_eq!(RUNS.load(Relaxed), 1);
    assert_eq!(since(&s0), only(Part::IntrEntry, 1));
    assert_eq!(current(), Part::Thread);
    // Deferred by splbio, replayed by splx: still the interrupt's part.
    let s = spl::splbio();
    intr_post(0, v);
    m.deliver();
    assert_eq!(RUNS.load(Relaxed), 1, "blocked by the IPL");
    drop(s);
    assert_eq!(RUNS.load(Relaxed), 2, "replayed at splx");
    assert_eq!(since(&s0), only(Part::IntrEntry, 2));
    assert_eq!(current(), Part::Thread);
    statclock(None);
    assert_eq!(since(&s0)[Part::Thread as usize], 1);
}

/// No CPU, no part: guards and ticks on a host thread do nothing.
#[test]
fn nothing_happens_off_a_cpu() {
    let g = enter(Part::Driver);
    assert_eq!(current(), Part::Other);
    statclock(None); // no CPU to count it on (another test's kernel may be up)
    drop(g);
    assert_eq!(current(), Part::Other);
}

/// The split gives each part its share of the total, and nothing without
/// samples.
#[test]
fn the_split_is_the_share_of_samples_times_the_total() {
    let mut c = [0u64; Part::COUNT];
    assert_eq!(split(500.0, &c), [0.0; Part::COUNT]);
    c[Part::Spl as usize] = 1;
    c[Part::BusDma as usize] = 3;
    c[Part::Idle as usize] = 4;
    let s = split(800.0, &c);
    assert_eq!(s[Part::Spl as usize], 100.0);
    assert_eq!(s[Part::BusDma as usize], 300.0);
    assert_eq!(s[Part::Idle as usize], 400.0);
    assert_eq!(s[Part::Driver as usize], 0.0);
    assert_eq!(s.iter().sum::<f64>(), 800.0);
    for (i, p) in Part::ALL.iter().enumerate() {
        assert_eq!(*p as usize, i);
        assert_eq!(Part::from_u8(i as u8), *p);
    }
    assert_eq!(Part::from_u8(200), Part::Other);
}
