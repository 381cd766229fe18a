//! An in-kernel load generator: closed-loop block I/O straight into a
//! [`BlockDev`], no network and no client.
//!
//! A [`LoadGen`] owns `depth` bufs, each with a data buffer from the
//! device (`BlockDev::alloc_buf_wait`, so `permanent` and `shadow` get
//! pool memory). [`LoadGen::run`] keeps all of them in flight until the
//! workload's I/O count or deadline is reached: a closed loop at a
//! constant queue depth. Reads or writes, random or sequential, of one
//! size, over the first `span` bytes of the device. Who issues the next
//! I/O ([`Issuer`]):
//! * `Thread` (the default): the thread in `run` issues every buf it
//!   holds in one batch at IPL_BIO, then sleeps; each completion's
//!   `iodone` callback (B_CALL) hands its buf back and wakes it. Every I/O
//!   pays for its completion mode's way back to a thread, as a kernel
//!   thread serving requests (blksrv) does.
//! * `Completion`: the callback issues the buf's next I/O itself, in the
//!   completion's context.
//!
//! With `verify`, every write carries a pattern that is a function of the
//! seed and the device offset only ([`fill`]), and every read checks it
//! ([`check`]): run a sequential write pass over the span first
//! ([`LoadGen::prefill`]), and any later read, random or not, must find
//! the pattern again.
//!
//! # Who calls what, from which context
//!
//! | call | context | |
//! |---|---|---|
//! | [`LoadGen::new`], `Drop` | thread | allocates (bufs, data buffers), may sleep for them |
//! | [`LoadGen::run`], [`LoadGen::prefill`] | thread | issues at IPL_BIO, sleeps until bufs come back; returns when every I/O it started is counted |
//! | the `iodone` callbacks (private) | the device's completion context: hard interrupt, soft interrupt, the driver's thread or an AST | allocate nothing; take only the run's parking mutex and `LOOP_LOCK` (spin mutexes at IPL_BIO), to hand a buf back |
//! | [`fill`], [`check`], [`Rng`] | any | pure functions |
//!
//! The callback reuses the buf and its data as they are (it never drops
//! an `IoBuf`, which would free memory in interrupt context). Whoever
//! holds `LOOP_LOCK` has raised the CPU to IPL_BIO, so a hard or soft
//! interrupt of the same CPU cannot take it while thread code holds it.
//!
//! The run's shared state lives in the `LoadGen` (a heap box) while `run`
//! is in progress. A callback that hands a buf back touches that state for
//! the last time when it counts the buf in `left`, under `LOOP_LOCK`;
//! `run` returns only after it has seen, under the same lock, every buf
//! (`Completion`) or every I/O it issued (`Thread`) counted: so no
//! callback can reach the state after `run` returns.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

use crate::bio::{BlockDev, BufBox, BufOp, DEV_BSIZE, IoDone, getbuf_wait};
use crate::ctx::ThreadCtx;
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::sched::sleep_interlocked;
use crate::statclock::{self, Part};

/// What a workload does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random aligned offsets in the span.
    Random,
    /// Consecutive offsets, wrapping at the end of the span.
    Sequential,
}

/// One workload: what [`LoadGen::run`] issues.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// `Read` or `Write`.
    pub op: BufOp,
    /// Random or sequential.
    pub pattern: Pattern,
    /// Bytes of the device used, from offset 0 (rounded down to the I/O
    /// size; at most the device's size).
    pub span: u64,
    /// Stop after this many I/Os have been issued (0: no limit).
    pub ios: u64,
    /// Stop issuing this many ns after the start (0: no limit). One of
    /// `ios` and `duration_ns` must be set.
    pub duration_ns: u64,
    /// Writes carry the pattern of [`fill`]; reads [`check`] it.
    pub verify: bool,
    /// The pattern's and the random offsets' seed.
    pub seed: u64,
    /// Who issues each next I/O.
    pub issuer: Issuer,
}

/// Who issues the next I/O when one completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Issuer {
    /// The thread in [`LoadGen::run`]: a completion hands its buf back and
    /// wakes it; it issues every buf it holds in one batch (at IPL_BIO, so
    /// none completes before the batch is out), then sleeps until some
    /// come back. A kernel thread serving requests (blksrv) works so: each
    /// I/O pays for its completion mode's way back to a thread.
    #[default]
    Thread,
    /// The buf's `iodone` callback, in the completion's own context: with
    /// a device that completes at once, the whole loop runs inside one
    /// completion context (one interrupt, softint, AST or driver-thread
    /// run), so the completion mode's own cost is amortised to nothing.
    Completion,
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadResult {
    /// I/Os completed (with or without an error).
    pub ios: u64,
    /// Bytes transferred by the I/Os that succeeded.
    pub bytes: u64,
    /// I/Os that completed with an error.
    pub errors: u64,
    /// Reads whose data did not match the pattern (verify only).
    pub mismatches: u64,
    /// ns from the first issue to the last completion.
    pub elapsed_ns: u64,
}

/// Why a load generator could not be set up or run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The I/O size is zero, not a multiple of DEV_BSIZE, or larger than
    /// the device's largest transfer.
    BadSize {
        /// The size asked for.
        size: usize,
    },
    /// The queue depth is zero.
    BadDepth,
    /// The span holds no whole I/O.
    SpanTooSmall {
        /// The span, bytes.
        span: u64,
    },
    /// Neither an I/O count nor a duration: the loop would never stop.
    Unbounded,
    /// A write workload on a read-only device.
    ReadOnly,
    /// The kernel is shutting down.
    Shutdown,
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LoadError::BadSize { size } => write!(
                f,
                "loadgen: I/O size {size} is not a positive multiple of {DEV_BSIZE} within the device's largest transfer"
            ),
            LoadError::BadDepth => f.write_str("loadgen: queue depth 0"),
            LoadError::SpanTooSmall { span } => {
                write!(f, "loadgen: a span of {span} bytes holds no whole I/O")
            }
            LoadError::Unbounded => {
                f.write_str("loadgen: a workload needs an I/O count or a duration")
            }
            LoadError::ReadOnly => f.write_str("loadgen: writes to a read-only device"),
            LoadError::Shutdown => f.write_str("loadgen: the kernel is shutting down"),
        }
    }
}

impl core::error::Error for LoadError {}

/// A small fast generator (SplitMix64): any context, no state but a word.
#[derive(Clone, Copy, Debug)]
pub struct Rng(u64);

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function.
pub const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator from `seed`.
    pub const fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// A number below `n` (`n > 0`; Lemire's multiply-shift, without the
    /// rejection step: the bias is below 2^-32 for the spans used here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// The 8-byte word of the verify pattern at device byte offset `off`
/// (a multiple of 8).
pub const fn pattern_word(seed: u64, off: u64) -> u64 {
    mix(seed ^ off.wrapping_mul(GAMMA))
}

/// Fill `buf` with the pattern of device bytes `[off, off + buf.len())`.
/// `off` and the length are multiples of 8. Any context.
pub fn fill(buf: &mut [u8], seed: u64, off: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(seed, off + 8 * i as u64).to_le_bytes());
    }
}

/// Does `buf` hold the pattern of device bytes `[off, off + buf.len())`?
/// Any context.
pub fn check(buf: &[u8], seed: u64, off: u64) -> bool {
    buf.chunks_exact(8).enumerate().all(|(i, w)| {
        u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
            == pattern_word(seed, off + 8 * i as u64)
    })
}

/// The I/O index `n` (0, 1, 2, ...) of a workload as a byte offset in a
/// span of `slots` I/Os of `size` bytes: consecutive for sequential, from
/// the generator for random.
pub fn offset_of(pattern: Pattern, n: u64, rng: &mut Rng, slots: u64, size: usize) -> u64 {
    let slot = match pattern {
        Pattern::Sequential => n % slots,
        Pattern::Random => rng.below(slots),
    };
    slot * size as u64
}

/// Taken by a buf that leaves the loop and by `run` to see them all back.
static LOOP_LOCK: SpinMutex<()> = SpinMutex::new(Ipl::Bio, ());

/// The state of a run, shared by its bufs' callbacks.
struct Shared {
    dev: &'static dyn BlockDev,
    wl: Workload,
    size: usize,
    slots: u64,
    start_ns: u64,
    deadline_ns: u64,
    /// I/Os issued (the next I/O's index).
    issued: AtomicU64,
    ios: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
    /// Bufs that have left the loop (raised under `LOOP_LOCK`).
    left: AtomicU64,
    last_done_ns: AtomicU64,
    stop: AtomicBool,
}

fn now() -> u64 {
    crate::kernel::kernel().md().nanotime()
}

impl Shared {
    /// Prepare `bp` for the next I/O; `false` if the loop ends here (the
    /// I/O count or the deadline is reached). Random offsets come from a
    /// generator seeded with the seed and the I/O's index, so the shared
    /// state is one counter.
    fn next(&self, bp: &mut BufBox) -> bool {
        if self.stop.load(Relaxed) {
            return false;
        }
        let n = self.issued.fetch_add(1, Relaxed);
        if (self.wl.ios != 0 && n >= self.wl.ios)
            || (self.wl.duration_ns != 0 && now() >= self.deadline_ns)
        {
            self.stop.store(true, Relaxed);
            return false;
        }
        let mut rng = Rng::new(self.wl.seed ^ n.wrapping_mul(GAMMA));
        let off = offset_of(self.wl.pattern, n, &mut rng, self.slots, self.size);
        bp.op = self.wl.op;
        bp.fua = false;
        bp.blkno = off / DEV_BSIZE as u64;
        bp.bcount = self.size;
        bp.error = None;
        bp.resid = 0;
        if self.wl.verify && self.wl.op == BufOp::Write {
            let seed = self.wl.seed;
            if let Some(d) = bp.data.as_mut() {
                fill(&mut d.as_mut_slice()[..self.size], seed, off);
            }
        }
        true
    }

    /// Count a completed buf.
    fn account(&self, bp: &BufBox) {
        self.ios.fetch_add(1, Relaxed);
        if bp.error.is_some() {
            self.errors.fetch_add(1, Relaxed);
            return;
        }
        self.bytes.fetch_add(bp.bcount as u64, Relaxed);
        if self.wl.verify && bp.op == BufOp::Read {
            let ok = bp
                .data
                .as_ref()
                .is_some_and(|d| check(&d.as_slice()[..bp.bcount], self.wl.seed, bp.offset()));
            if !ok {
                self.mismatches.fetch_add(1, Relaxed);
            }
        }
    }

    /// The buf leaves the loop: park it and say so. The increment of
    /// `left` under `LOOP_LOCK` is the last touch of `self` by this buf.
    fn leave(&self, bp: BufBox, parked: &SpinMutex<Vec<BufBox>>) {
        // Capacity for every buf was reserved at `LoadGen::new`: no
        // allocation.
        parked.lock().push(bp);
        let g = LOOP_LOCK.lock();
        self.last_done_ns.fetch_max(now(), Relaxed);
        self.left.fetch_add(1, Release);
        drop(g);
        crate::sched::wakeup(crate::sched::wchan(&LOOP_LOCK));
    }
}

/// A run's state and where bufs that left the loop are parked.
struct Run {
    shared: Shared,
    parked: SpinMutex<Vec<BufBox>>,
}

/// The `iodone` of every buf of a run: count it, issue its next I/O or
/// let it leave the loop. Completion context (see the module docs).
fn iodone(bp: BufBox, arg: usize) {
    // SAFETY: `arg` is the address of the `Run` boxed in the `LoadGen`
    // whose `run` is in progress: `run` does not return (and so the box is
    // neither moved nor freed) until every buf has left the loop, and a
    // buf leaves it in `leave`, after which nothing here touches `run`.
    let run = unsafe { &*(arg as *const Run) };
    // The load generator's own code (the next I/O's driver work marks
    // its own part).
    let _part = statclock::enter(Part::Thread);
    run.shared.account(&bp);
    run.issue(bp);
}

/// The `iodone` of a thread-issued run: count the buf and hand it back
/// to the thread. Completion context.
fn iodone_back(bp: BufBox, arg: usize) {
    // SAFETY: as in `iodone`: `run` waits until every I/O it issued has
    // been counted in `left` (the last touch of the run by its callback).
    let run = unsafe { &*(arg as *const Run) };
    let _part = statclock::enter(Part::Thread);
    run.shared.account(&bp);
    run.shared.leave(bp, &run.parked);
}

impl Run {
    /// Start `bp`'s next I/O, or let it leave the loop.
    fn issue(&self, mut bp: BufBox) {
        if self.shared.next(&mut bp) {
            bp.iodone = Some(IoDone::Call(iodone, self as *const Run as usize));
            self.shared.dev.strategy(bp);
        } else {
            self.shared.leave(bp, &self.parked);
        }
    }
}

/// A closed-loop load generator on one block device. See the module docs.
pub struct LoadGen {
    dev: &'static dyn BlockDev,
    size: usize,
    depth: usize,
    run: Box<Run>,
}

impl LoadGen {
    /// `depth` bufs with `size`-byte buffers of `dev`. Thread context:
    /// sleeps until bufs and buffers are available.
    pub fn new(
        ctx: &ThreadCtx,
        dev: &'static dyn BlockDev,
        size: usize,
        depth: usize,
    ) -> Result<LoadGen, LoadError> {
        if size == 0 || !size.is_multiple_of(DEV_BSIZE) || size > dev.max_transfer() {
            return Err(LoadError::BadSize { size });
        }
        if depth == 0 {
            return Err(LoadError::BadDepth);
        }
        let mut bufs = Vec::with_capacity(depth);
        for _ in 0..depth {
            let mut bp = getbuf_wait(ctx).map_err(|_| LoadError::Shutdown)?;
            let data = dev
                .alloc_buf_wait(ctx, size)
                .map_err(|_| LoadError::Shutdown)?;
            bp.data = Some(data);
            bufs.push(bp);
        }
        let wl = Workload {
            op: BufOp::Read,
            pattern: Pattern::Random,
            span: 0,
            ios: 0,
            duration_ns: 0,
            verify: false,
            seed: 0,
            issuer: Issuer::Thread,
        };
        Ok(LoadGen {
            dev,
            size,
            depth,
            run: Box::new(Run {
                shared: Shared::new(dev, wl, size, 1),
                parked: SpinMutex::new(Ipl::Bio, bufs),
            }),
        })
    }

    /// Its queue depth.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Its I/O size, bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Run `wl` to its end: start every buf, let the completions keep the
    /// loop going, sleep until every buf is back. Thread context.
    pub fn run(&mut self, ctx: &ThreadCtx, wl: &Workload) -> Result<LoadResult, LoadError> {
        if wl.ios == 0 && wl.duration_ns == 0 {
            return Err(LoadError::Unbounded);
        }
        if wl.op == BufOp::Write && self.dev.read_only() {
            return Err(LoadError::ReadOnly);
        }
        let dev_bytes = self.dev.sectors() * DEV_BSIZE as u64;
        let slots = wl.span.min(dev_bytes) / self.size as u64;
        if slots == 0 {
            return Err(LoadError::SpanTooSmall { span: wl.span });
        }
        let bufs = core::mem::take(&mut *self.run.parked.lock());
        // Keep the capacity for the bufs coming back (no allocation in
        // the callbacks).
        self.run.parked.lock().reserve_exact(self.depth);
        self.run.shared = Shared::new(self.dev, *wl, self.size, slots);
        match wl.issuer {
            Issuer::Completion => self.loop_in_completions(ctx, bufs),
            Issuer::Thread => self.loop_in_thread(ctx, bufs),
        }
        let s = &self.run.shared;
        Ok(LoadResult {
            ios: s.ios.load(Relaxed),
            bytes: s.bytes.load(Relaxed),
            errors: s.errors.load(Relaxed),
            mismatches: s.mismatches.load(Relaxed),
            elapsed_ns: s.last_done_ns.load(Relaxed).saturating_sub(s.start_ns),
        })
    }

    /// [`Issuer::Completion`]: start every buf; completions keep them going.
    fn loop_in_completions(&mut self, ctx: &ThreadCtx, mut bufs: Vec<BufBox>) {
        let depth = bufs.len() as u64;
        {
            // Start every buf before any completion runs on this CPU (an
            // instant device would otherwise run the whole loop inside the
            // first `strategy`, at a depth of one).
            let _s = crate::spl::splbio();
            for bp in bufs.drain(..) {
                self.run.issue(bp);
            }
        }
        self.wait_left(ctx, depth);
    }

    /// Sleep until `left` reaches `n`. Returns `left`.
    fn wait_left(&self, ctx: &ThreadCtx, n: u64) -> u64 {
        self.wait_for(ctx, |left| left >= n)
    }

    fn wait_for(&self, ctx: &ThreadCtx, done: impl Fn(u64) -> bool) -> u64 {
        loop {
            let g = LOOP_LOCK.lock();
            let left = self.run.shared.left.load(Acquire);
            if done(left) {
                return left;
            }
            if sleep_interlocked(ctx, crate::sched::wchan(&LOOP_LOCK), g).is_err() {
                // Shutdown: the devices finish or fail what they hold, so
                // the bufs still come back; keep waiting for them.
                crate::sched::yield_now(ctx);
            }
        }
    }

    /// [`Issuer::Thread`]: issue what we hold, sleep until some come back,
    /// again; at the end wait until every I/O issued has been counted.
    fn loop_in_thread(&mut self, ctx: &ThreadCtx, mut mine: Vec<BufBox>) {
        let depth = mine.len();
        let mut back: Vec<BufBox> = Vec::with_capacity(depth);
        let arg = &*self.run as *const Run as usize;
        let mut issued = 0u64;
        let mut seen = 0u64;
        loop {
            if !self.run.shared.stop.load(Relaxed) {
                let _s = crate::spl::splbio();
                while let Some(mut bp) = mine.pop() {
                    if !self.run.shared.next(&mut bp) {
                        mine.push(bp);
                        break;
                    }
                    bp.iodone = Some(IoDone::Call(iodone_back, arg));
                    issued += 1;
                    self.dev.strategy(bp);
                }
            }
            // Completions may run here (the IPL is back down).
            seen = self.wait_for(ctx, |left| left == issued || left > seen);
            core::mem::swap(&mut *self.run.parked.lock(), &mut back);
            mine.append(&mut back);
            if self.run.shared.stop.load(Relaxed) && seen == issued {
                break;
            }
        }
        debug_assert_eq!(mine.len(), depth);
        *self.run.parked.lock() = mine;
    }

    /// Write the verify pattern of `seed` over the first `span` bytes,
    /// sequentially (the pass before a verifying read workload). Thread
    /// context.
    pub fn prefill(
        &mut self,
        ctx: &ThreadCtx,
        span: u64,
        seed: u64,
    ) -> Result<LoadResult, LoadError> {
        let slots = span.min(self.dev.sectors() * DEV_BSIZE as u64) / self.size as u64;
        self.run(
            ctx,
            &Workload {
                op: BufOp::Write,
                pattern: Pattern::Sequential,
                span,
                ios: slots,
                duration_ns: 0,
                verify: true,
                seed,
                issuer: Issuer::Thread,
            },
        )
    }
}

impl Shared {
    fn new(dev: &'static dyn BlockDev, wl: Workload, size: usize, slots: u64) -> Self {
        let start_ns = now();
        Shared {
            dev,
            wl,
            size,
            slots,
            start_ns,
            deadline_ns: start_ns.saturating_add(wl.duration_ns),
            issued: AtomicU64::new(0),
            ios: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            left: AtomicU64::new(0),
            last_done_ns: AtomicU64::new(start_ns),
            stop: AtomicBool::new(false),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The pattern is a function of the seed and the offset only: what is
    /// filled at an offset checks at that offset, and not at another or
    /// with another seed.
    #[test]
    fn the_pattern_checks_where_it_was_written() {
        let mut b = alloc::vec![0u8; 4096];
        fill(&mut b, 7, 8192);
        assert!(check(&b, 7, 8192));
        assert!(!check(&b, 7, 4096));
        assert!(!check(&b, 8, 8192));
        // Two halves filled separately are the whole.
        let mut h = alloc::vec![0u8; 4096];
        fill(&mut h[..2048], 7, 8192);
        fill(&mut h[2048..], 7, 8192 + 2048);
        assert_eq!(b, h);
        b[100] ^= 1;
        assert!(!check(&b, 7, 8192));
    }

    /// Offsets are aligned, inside the span; sequential ones wrap; random
    /// ones cover the span.
    #[test]
    fn offsets_stay_in_the_span() {
        let mut rng = Rng::new(1);
        let mut seen = [false; 16];
        for n in 0..2000 {
            let o = offset_of(Pattern::Random, n, &mut rng, 16, 4096);
            assert_eq!(o % 4096, 0);
            assert!(o < 16 * 4096);
            seen[(o / 4096) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "random offsets cover the span");
        for n in 0..40 {
            let o = offset_of(Pattern::Sequential, n, &mut rng, 16, 4096);
            assert_eq!(o, (n % 16) * 4096);
        }
    }

    #[test]
    fn below_is_below() {
        let mut r = Rng::new(42);
        for n in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(r.below(n) < n);
            }
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        use alloc::string::ToString;
        assert!(LoadError::BadSize { size: 100 }.to_string().contains("100"));
        assert!(LoadError::Unbounded.to_string().contains("duration"));
    }
}
