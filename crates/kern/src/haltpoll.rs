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
//!   (`max`): a longer window would have caught it; double it (at least
//!   [`GROW_START_NS`]), up to `max`;
//! - the period was longer than `max`: polling only burnt CPU; halve it
//!   (below [`GROW_START_NS`] it drops to 0: sleep at once).
//!
//! A client at queue depth 1 over loopback comes back within one round
//! trip, so its CPU keeps polling; a CPU that waits hundreds of
//! microseconds between events (the other vCPU of a streaming workload)
//! stops polling after a few periods.
//!
//! # Contexts
//! Pure arithmetic; the idle loop of each CPU keeps its own window.

/// The smallest window a growing one starts from.
pub const GROW_START_NS: u64 = 10_000;

/// The window after an idle period of `idle_ns`, given the window `cur`
/// that period was polled with and the most allowed, `max`.
pub fn next_window(cur: u64, max: u64, idle_ns: u64) -> u64 {
    if max == 0 {
        0
    } else if idle_ns <= cur {
        cur.min(max)
    } else if idle_ns <= max {
        (cur.saturating_mul(2)).max(GROW_START_NS).min(max)
    } else {
        let half = cur / 2;
        if half < GROW_START_NS { 0 } else { half }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const MAX: u64 = 50_000;

    #[test]
    fn a_caught_period_keeps_the_window() {
        assert_eq!(next_window(20_000, MAX, 15_000), 20_000);
        assert_eq!(next_window(MAX, MAX, 1), MAX);
    }

    #[test]
    fn a_period_just_missed_grows_it_up_to_max() {
        assert_eq!(next_window(0, MAX, 15_000), GROW_START_NS);
        assert_eq!(next_window(GROW_START_NS, MAX, 15_000), 20_000);
        assert_eq!(next_window(40_000, MAX, 45_000), MAX);
    }

    #[test]
    fn long_periods_shrink_it_to_nothing() {
        let mut w = MAX;
        let mut seen = vec![w];
        while w > 0 {
            w = next_window(w, MAX, 10 * MAX);
            seen.push(w);
        }
        assert_eq!(seen, vec![MAX, 25_000, 12_500, 0]);
        // And it comes back once periods are short again.
        assert_eq!(next_window(0, MAX, 30_000), GROW_START_NS);
    }

    #[test]
    fn max_zero_never_polls() {
        for (cur, idle) in [(0, 0), (MAX, 1), (0, 1_000_000)] {
            assert_eq!(next_window(cur, 0, idle), 0);
        }
    }

    #[test]
    fn the_window_never_exceeds_max() {
        for cur in [0, 5_000, 10_000, 49_999, 50_000, 80_000] {
            for idle in [0, 1, 9_999, 10_000, 30_000, 50_000, 50_001, 1 << 40] {
                assert!(next_window(cur, MAX, idle) <= MAX, "{cur} {idle}");
            }
        }
    }
}
