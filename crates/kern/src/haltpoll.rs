//! Adaptive idle polling: how long an idle CPU polls for work before it
//! sleeps, learned from how long its idle periods last (Linux KVM's halt
//! polling, `halt_poll_ns`).
//!
//! Polling buys latency with CPU time: a CPU that spins catches the next
//! request without a wake-up (on Linux a host context switch), but every
//! microsecond it spins is a microsecond taken from the devices and the
//! clients that share the host's cores. It pays only when work comes
//! within the window. So the window follows the idle periods seen:
//! - work came within the window: keep it;
//! - the period was longer than the window but within the most allowed
//!   (`max`): a longer window would have caught it; go back to `max` at
//!   once (KVM doubles from 10 µs; here a missed period costs a host
//!   wake-up, about a loopback round trip, so a queue-depth-1 client lost
//!   12% of its throughput while the window grew back step by step after a
//!   single late request);
//! - [`SHRINK_AFTER`] periods in a row were longer than `max`: polling
//!   only burnt CPU; halve it, and again for every further long period
//!   (below [`SHRINK_FLOOR_NS`] it drops to 0: sleep at once). One late
//!   request among short ones changes nothing: halving at the first one
//!   cost the next, ordinary, period a sleep.
//!
//! A client at queue depth 1 over loopback comes back within one round
//! trip, so its CPU keeps polling; a CPU that waits hundreds of
//! microseconds between events (the other vCPU of a streaming workload)
//! stops polling after a few periods.
//!
//! # Contexts
//! Pure arithmetic; the idle loop of each CPU keeps its own window.

/// A shrinking window below this drops to 0.
pub const SHRINK_FLOOR_NS: u64 = 10_000;

/// Long periods in a row before the window shrinks.
pub const SHRINK_AFTER: u32 = 4;

/// A CPU's polling state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HaltPoll {
    /// How long the next idle period is polled, ns.
    pub window_ns: u64,
    /// Idle periods in a row longer than the most allowed.
    pub long_streak: u32,
}

impl HaltPoll {
    /// The state of a CPU that has not idled yet: poll for all of `max`.
    pub const fn new(max: u64) -> HaltPoll {
        HaltPoll {
            window_ns: max,
            long_streak: 0,
        }
    }

    /// The state after an idle period of `idle_ns`, polled with this
    /// state's window; `max` is the most allowed.
    pub fn after(self, max: u64, idle_ns: u64) -> HaltPoll {
        if max == 0 {
            return HaltPoll::new(0);
        }
        let cur = self.window_ns.min(max);
        if idle_ns <= max {
            return HaltPoll {
                window_ns: if idle_ns <= cur { cur } else { max },
                long_streak: 0,
            };
        }
        let long_streak = self.long_streak.saturating_add(1);
        let window_ns = if long_streak < SHRINK_AFTER {
            cur
        } else if cur / 2 < SHRINK_FLOOR_NS {
            0
        } else {
            cur / 2
        };
        HaltPoll {
            window_ns,
            long_streak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    const MAX: u64 = 50_000;

    fn run(start: HaltPoll, periods: &[u64]) -> Vec<u64> {
        let mut h = start;
        periods
            .iter()
            .map(|&p| {
                h = h.after(MAX, p);
                h.window_ns
            })
            .collect()
    }

    #[test]
    fn a_caught_period_keeps_the_window() {
        let h = HaltPoll {
            window_ns: 20_000,
            long_streak: 2,
        };
        assert_eq!(
            h.after(MAX, 15_000),
            HaltPoll {
                window_ns: 20_000,
                long_streak: 0
            }
        );
        assert_eq!(HaltPoll::new(MAX).after(MAX, 1).window_ns, MAX);
    }

    #[test]
    fn a_period_max_would_have_caught_restores_max() {
        let h = HaltPoll {
            window_ns: 0,
            long_streak: 9,
        };
        assert_eq!(h.after(MAX, 15_000), HaltPoll::new(MAX));
        let h = HaltPoll {
            window_ns: 25_000,
            long_streak: 0,
        };
        assert_eq!(h.after(MAX, 30_000).window_ns, MAX);
    }

    #[test]
    fn one_late_period_among_short_ones_changes_nothing() {
        let w = run(
            HaltPoll::new(MAX),
            &[30_000, 30_000, 200_000, 30_000, 900_000, 30_000],
        );
        assert!(w.iter().all(|&w| w == MAX), "{w:?}");
    }

    #[test]
    fn long_periods_in_a_row_shrink_it_to_nothing_and_a_short_one_restores_it() {
        let w = run(HaltPoll::new(MAX), &[1 << 20; 7]);
        assert_eq!(w, [MAX, MAX, MAX, 25_000, 12_500, 0, 0]);
        let mut h = HaltPoll::new(MAX);
        for _ in 0..7 {
            h = h.after(MAX, 1 << 20);
        }
        assert_eq!(h.after(MAX, 30_000), HaltPoll::new(MAX));
    }

    #[test]
    fn max_zero_never_polls() {
        for (cur, idle) in [(0, 0), (MAX, 1), (0, 1_000_000)] {
            let h = HaltPoll {
                window_ns: cur,
                long_streak: 0,
            };
            assert_eq!(h.after(0, idle).window_ns, 0);
        }
    }

    #[test]
    fn the_window_never_exceeds_max() {
        for cur in [0, 5_000, 10_000, 49_999, 50_000, 80_000] {
            for streak in [0, 3, 4, 100] {
                for idle in [0, 1, 9_999, 10_000, 30_000, 50_000, 50_001, 1 << 40] {
                    let h = HaltPoll {
                        window_ns: cur,
                        long_streak: streak,
                    };
                    assert!(h.after(MAX, idle).window_ns <= MAX, "{cur} {streak} {idle}");
                }
            }
        }
    }
}
