//! The combiner: one pass at a time over some state, and no request lost.
//!
//! Several CPUs may want to work on the same state at once: a connection's
//! receive side is advanced by the CPU whose NIC reported data, by the CPU
//! that completed its last request, by the one that sent its last reply.
//! None of them may wait for another (a vCPU that spins on a lock held by
//! a preempted host thread stalls its whole CPU), and none may skip the
//! work: an edge-triggered event that nobody acts on is lost for good.
//!
//! [`Combiner::run`] does the one thing: `pass` runs over the state now, or
//! the caller that holds it runs it again on the way out. It guarantees
//! that **a pass begins after every call to `run` began**, and that passes
//! never overlap. Whatever a caller did before calling `run` (an event
//! flag it set, a count it dropped) is therefore seen by some later pass.
//! The pass that runs for another caller is the holder's own `pass`, so
//! all callers of one combiner must pass the same work (or work that
//! covers each other's).
//!
//! # Why it loses nothing
//! One atomic word holds the whole state: `IDLE`, `HELD` (a pass runs) or
//! `AGAIN` (a pass runs, and another was asked for). Every transition is
//! a read-modify-write of that word, so they are totally ordered and each
//! reads the latest value: a caller either moves `IDLE` to `HELD` and
//! runs the pass itself, or moves `HELD` (or `AGAIN`) to `AGAIN`; the
//! holder, after a pass, moves `HELD` to `IDLE` and leaves, or finds
//! `AGAIN`, moves it back to `HELD` and passes again. Callers' transitions
//! release and the holder's acquire, and RMWs extend release sequences,
//! so a pass that follows a caller's `AGAIN` sees everything that caller
//! (and every earlier one) wrote before calling. The loom models at the
//! bottom check this with two and three callers.
//!
//! # Contexts
//! Any context, any thread: `run` never blocks or allocates (its
//! compare-and-swap loop retries only when another caller moved the word),
//! so it is safe in interrupt handlers as far as `pass` is. A `run` on the
//! same combiner from inside `pass` only asks for one more pass.

#[cfg(not(loom))]
use core::sync::atomic::AtomicU8;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
#[cfg(loom)]
use loom::sync::atomic::AtomicU8;

#[cfg(not(loom))]
use core::cell::UnsafeCell;
#[cfg(loom)]
use loom::cell::UnsafeCell;

/// State worked on by one pass at a time; see the module docs.
pub struct Combiner<T> {
    word: AtomicU8,
    state: UnsafeCell<T>,
}

/// Nobody holds the state.
const IDLE: u8 = 0;
/// A pass runs.
const HELD: u8 = 1;
/// A pass runs, and one more was asked for.
const AGAIN: u8 = 2;

// SAFETY: the state is only reached through `run`, by one caller at a time
// (the one that moved the word from IDLE), so sharing the combiner shares no `&T` between threads; the
// state moves between threads, hence `T: Send`.
unsafe impl<T: Send> Sync for Combiner<T> {}

impl<T> Combiner<T> {
    /// A combiner over `state`.
    #[cfg(not(loom))]
    pub const fn new(state: T) -> Self {
        Combiner {
            word: AtomicU8::new(IDLE),
            state: UnsafeCell::new(state),
        }
    }

    /// A combiner over `state` (loom: not `const`).
    #[cfg(loom)]
    pub fn new(state: T) -> Self {
        Combiner {
            word: AtomicU8::new(IDLE),
            state: UnsafeCell::new(state),
        }
    }

    /// Run `pass` over the state, here or by the current holder: returns
    /// `true` if at least one pass ran here, `false` if the holder will
    /// make it. Either way a pass begins after this call began.
    pub fn run(&self, mut pass: impl FnMut(&mut T)) -> bool {
        let mut w = self.word.load(Relaxed);
        loop {
            let next = if w == IDLE { HELD } else { AGAIN };
            match self.word.compare_exchange_weak(w, next, AcqRel, Relaxed) {
                Ok(IDLE) => break,
                // The holder finds AGAIN when it tries to leave.
                Ok(_) => return false,
                Err(now) => w = now,
            }
        }
        loop {
            self.with(&mut pass);
            match self.word.compare_exchange(HELD, IDLE, Release, Acquire) {
                Ok(_) => return true,
                Err(_) => {
                    // AGAIN: only the holder lowers it, so this swap
                    // cannot fail; acquire, to see what the askers wrote.
                    let was = self.word.swap(HELD, Acquire);
                    debug_assert_eq!(was, AGAIN);
                }
            }
        }
    }

    #[cfg(not(loom))]
    fn with(&self, pass: &mut impl FnMut(&mut T)) {
        // SAFETY: the word is HELD or AGAIN by us (taken in `run`), so no other
        // reference to the state exists until we lower it.
        pass(unsafe { &mut *self.state.get() })
    }

    #[cfg(loom)]
    fn with(&self, pass: &mut impl FnMut(&mut T)) {
        // SAFETY: as above; loom checks the claim.
        self.state.with_mut(|p| pass(unsafe { &mut *p }))
    }

    /// The state, through an exclusive reference (no pass can be running).
    pub fn get_mut(&mut self) -> &mut T {
        #[cfg(not(loom))]
        return self.state.get_mut();
        #[cfg(loom)]
        // SAFETY: `&mut self` excludes every pass.
        self.state.with_mut(|p| unsafe { &mut *p })
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for Combiner<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Combiner")
            .field("word", &self.word.load(Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn a_lone_caller_runs_one_pass() {
        let c = Combiner::new(0u32);
        assert!(c.run(|n| *n += 1));
        assert!(c.run(|n| *n += 1));
        let mut c = c;
        assert_eq!(*c.get_mut(), 2);
    }

    #[test]
    fn a_call_from_inside_a_pass_is_made_by_the_holder() {
        let c = Combiner::new(0u32);
        let mut nested = None;
        assert!(c.run(|n| {
            *n += 1;
            if *n == 1 {
                // Found held: the holder (this very call) passes again.
                nested = Some(c.run(|_| unreachable!("passes never overlap")));
            }
        }));
        assert_eq!(nested, Some(false));
        let mut c = c;
        assert_eq!(*c.get_mut(), 2);
    }

    /// Threads record events, then ask for a pass that reads them all. At
    /// the end the last pass must have seen every event (none lost), and
    /// passes never overlap (the state is a plain integer updated with a
    /// read and a write that a concurrent pass would tear).
    #[test]
    fn every_event_is_seen_by_a_later_pass() {
        #[cfg(miri)]
        const N: usize = 50;
        #[cfg(not(miri))]
        const N: usize = 20_000;
        let events = Arc::new(AtomicUsize::new(0));
        let c = Arc::new(Combiner::new((0usize, 0usize)));
        let ts: Vec<_> = (0..3)
            .map(|_| {
                let (events, c) = (events.clone(), c.clone());
                std::thread::spawn(move || {
                    for _ in 0..N {
                        events.fetch_add(1, SeqCst);
                        c.run(|(seen, passes)| {
                            *seen = events.load(SeqCst);
                            let p = *passes;
                            core::hint::spin_loop();
                            *passes = p + 1;
                        });
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        let mut c = Arc::into_inner(c).unwrap();
        let (seen, passes) = *c.get_mut();
        assert_eq!(seen, 3 * N, "a pass must follow the last event");
        assert!(passes <= 3 * N && passes > 0);
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    //! `RUSTFLAGS="--cfg loom" cargo test -p kern --lib loom`
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicUsize;
    use loom::thread;

    fn model(callers: usize, preemption_bound: Option<usize>) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = preemption_bound;
        b.check(move || {
            let events = Arc::new(AtomicUsize::new(0));
            let c = Arc::new(Combiner::new(std::vec::Vec::<(usize, usize)>::new()));
            let ts: std::vec::Vec<_> = (0..callers)
                .map(|i| {
                    let (events, c) = (events.clone(), c.clone());
                    thread::spawn(move || {
                        // The event: plain data published before `run`.
                        events.fetch_add(1, Relaxed);
                        c.run(|seen| seen.push((i, events.load(Relaxed))));
                    })
                })
                .collect();
            for t in ts {
                t.join().unwrap();
            }
            let seen = c.state.with(|p| {
                // SAFETY: every caller has joined.
                unsafe { (*p).clone() }
            });
            assert_eq!(
                seen.last().map(|s| s.1),
                Some(callers),
                "an event was left without a pass: {seen:?}"
            );
        });
    }

    /// Two callers: whatever the interleaving, a pass sees both events.
    #[test]
    fn loom_two_callers_lose_nothing() {
        model(2, None);
    }

    /// Three callers (a longer bound: loom explores fewer preemptions).
    #[test]
    fn loom_three_callers_lose_nothing() {
        model(3, Some(3));
    }
}
