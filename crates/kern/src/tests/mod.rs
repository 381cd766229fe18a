//! Unit tests of `kern` on the fake machine ([`crate::fake`]): the block
//! layer's queues, ccd's mapping, the bus_dma FIFO and the sd driver end to
//! end on a fake disk controller; the drivers' attach errors.

mod attach;
mod bufq;
mod busdma_fifo;
mod ccd_map;
mod loadgen;
mod machine;
mod queues;
mod sd;
mod statclock;

use proptest::test_runner::Config;

/// `n` proptest cases, or fewer when `PROPTEST_CASES` asks for fewer (the
/// Miri run asks for 4).
pub(crate) fn cases(n: u32) -> Config {
    let d = Config::default();
    Config {
        cases: n.min(d.cases),
        ..d
    }
}
mod threads;
