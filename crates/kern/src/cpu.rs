//! CPUs: per-CPU state and the layout of the pending word.
//!
//! A [`Cpu`] is owned by one virtual CPU (a host thread, in the `machine`
//! crate). Most fields are touched only by that CPU, from thread code and
//! from its own interrupt handlers, and are atomics so that a signal handler
//! interrupting the owner sees a coherent value; the pending line and the
//! run queue are shared with other CPUs and devices.
//!
//! # The pending word
//! One 64-bit word per CPU holds every pending source, ordered so that a
//! higher bit never has a lower priority than a lower bit:
//!
//! | bits | source |
//! |---|---|
//! | 0 | an AST is pending (runs only at IPL none, in thread context) |
//! | 1-4 | soft interrupts: softclock, softbio, softnet, softserial |
//! | 8-23 | hardware vectors at bio |
//! | 24-31 | net |
//! | 32-39 | tty |
//! | 40-47 | vm |
//! | 48-55 | sched |
//! | 56-63 | high |
//!
//! So "what may run at IPL *l*" is the constant mask [`unmasked`]`(l)`, and
//! "what runs first" is the highest set bit.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize};

use crate::ipl::Ipl;
use crate::pending::{Inbox, PendingLine, SoftQueue};
use crate::percpu::CpuLocal;
use crate::sched::RunQueue;

/// The most CPUs a kernel may have.
pub const MAXCPU: usize = 64;
/// The AST bit of the pending word.
pub const AST_BIT: u64 = 1;
/// First bit of the soft levels.
pub const SOFT_BIT0: u32 = 1;

/// The first bit and the number of vector bits of a hardware level.
pub const fn hard_bits(level: Ipl) -> (u32, u32) {
    match level {
        Ipl::Bio => (8, 16),
        Ipl::Net => (24, 8),
        Ipl::Tty => (32, 8),
        Ipl::Vm => (40, 8),
        Ipl::Sched => (48, 8),
        Ipl::High => (56, 8),
        _ => (0, 0),
    }
}

/// The pending-word bit of a soft level.
pub const fn soft_bit(level: Ipl) -> u64 {
    match level.soft_index() {
        Some(i) => 1 << (SOFT_BIT0 + i as u32),
        None => 0,
    }
}

/// The level of a pending-word bit (`None` for the AST bit and unused bits).
pub const fn bit_level(bit: u32) -> Ipl {
    match bit {
        1 => Ipl::SoftClock,
        2 => Ipl::SoftBio,
        3 => Ipl::SoftNet,
        4 => Ipl::SoftSerial,
        8..=23 => Ipl::Bio,
        24..=31 => Ipl::Net,
        32..=39 => Ipl::Tty,
        40..=47 => Ipl::Vm,
        48..=55 => Ipl::Sched,
        56..=63 => Ipl::High,
        _ => Ipl::None,
    }
}

const fn compute_unmasked() -> [u64; 16] {
    let mut t = [0u64; 16];
    let mut l = 0;
    while l < Ipl::COUNT {
        let mut m = 0u64;
        let mut b = 0u32;
        while b < 64 {
            let lvl = bit_level(b) as usize;
            let runs = if b == 0 {
                l == 0 // the AST bit: only at IPL none
            } else {
                lvl != 0 && lvl > l
            };
            if runs {
                m |= 1 << b;
            }
            b += 1;
        }
        t[l] = m;
        l += 1;
    }
    t
}

/// Indexed by IPL; 16 entries so that `level & 15` needs no bounds check
/// (levels above `high` never occur; their entries are zero).
static UNMASKED: [u64; 16] = compute_unmasked();

/// The pending-word bits that may run while the CPU is at `level`.
#[inline(always)]
pub fn unmasked(level: u8) -> u64 {
    UNMASKED[(level & 15) as usize]
}

/// Per-CPU counters, readable from any thread at any time.
#[derive(Debug)]
pub struct CpuStats {
    /// Interrupt signals (traps) taken.
    pub traps: CpuLocal,
    /// Traps that interrupted an allocator (kmem or a pool) mid-operation.
    pub traps_in_alloc: CpuLocal,
    /// Traps that found nothing they could run.
    pub traps_idle: CpuLocal,
    /// Hardware handler invocations, per pending-word bit.
    pub intr: [CpuLocal; 64],
    /// Interrupts replayed by `splx` after being deferred by the IPL.
    pub splx_replays: CpuLocal,
    /// Interrupts dispatched by the idle loop without a signal.
    pub idle_dispatch: CpuLocal,
    /// Posts that found their bit already pending.
    pub posts_coalesced: AtomicU64,
    /// Posts that required a signal.
    pub kicks_intr: AtomicU64,
    /// Posts by thread code of the target CPU itself: taken at once (or
    /// at the `splx` that lowers the IPL), without a signal.
    pub posts_self: AtomicU64,
    /// Posts or wakeups that woke the CPU from idle sleep.
    pub kicks_wake: AtomicU64,
    /// Soft-interrupt handler invocations.
    pub softints: CpuLocal,
    /// Soft-interrupt passes that exhausted their budget.
    pub softint_overruns: CpuLocal,
    /// Soft-interrupt handler invocations by the softint daemon.
    pub softints_daemon: CpuLocal,
    /// Kernel thread switches.
    pub switches: CpuLocal,
    /// ASTs delivered by a frame pushed at interrupt return.
    pub ast_pushed: CpuLocal,
    /// Interrupt returns that left an AST pending (not a safe point).
    pub ast_deferred: CpuLocal,
    /// ASTs delivered at a later safe point (splx, lock release, yield).
    pub ast_safepoint: CpuLocal,
    /// AST handler invocations.
    pub ast_handlers: CpuLocal,
    /// AST handlers entered while their thread was inside the host
    /// allocator (`kern::malloc`): the hazard; 0 unless the protection is
    /// off.
    pub ast_in_malloc: CpuLocal,
    /// Host allocator calls in interrupt context (handlers must not
    /// allocate): 0 in a correct kernel.
    pub intr_mallocs: CpuLocal,
    /// Idle sleeps.
    pub idle_sleeps: CpuLocal,
    /// Idle periods (each ends when there is work).
    pub idle_periods: CpuLocal,
    /// statclock samples, by [`crate::statclock::Part`] id.
    pub parts: [CpuLocal; crate::statclock::Part::COUNT],
}

impl Default for CpuStats {
    fn default() -> Self {
        Self {
            traps: CpuLocal::new(),
            traps_in_alloc: CpuLocal::new(),
            traps_idle: CpuLocal::new(),
            intr: [const { CpuLocal::new() }; 64],
            splx_replays: CpuLocal::new(),
            idle_dispatch: CpuLocal::new(),
            posts_coalesced: AtomicU64::new(0),
            kicks_intr: AtomicU64::new(0),
            posts_self: AtomicU64::new(0),
            kicks_wake: AtomicU64::new(0),
            softints: CpuLocal::new(),
            softint_overruns: CpuLocal::new(),
            softints_daemon: CpuLocal::new(),
            switches: CpuLocal::new(),
            ast_pushed: CpuLocal::new(),
            ast_deferred: CpuLocal::new(),
            ast_safepoint: CpuLocal::new(),
            ast_handlers: CpuLocal::new(),
            ast_in_malloc: CpuLocal::new(),
            intr_mallocs: CpuLocal::new(),
            idle_sleeps: CpuLocal::new(),
            idle_periods: CpuLocal::new(),
            parts: [const { CpuLocal::new() }; crate::statclock::Part::COUNT],
        }
    }
}

/// Per-CPU state.
#[repr(align(64))]
pub struct Cpu {
    pub(crate) index: usize,
    pub(crate) line: PendingLine,
    pub(crate) mask_mode: bool,
    /// The part of the kernel this CPU is running now
    /// ([`crate::statclock::Part`] id): stored by the markers, read by the
    /// statclock sampler. Owner CPU only.
    pub(crate) part: AtomicU8,
    /// `mask` spl: the hardware level the host signal mask blocks now.
    pub(crate) hw_blocked: AtomicU8,
    /// An AST upcall frame was pushed and has not been entered yet.
    pub(crate) ast_armed: AtomicBool,
    /// Hard and soft interrupt nesting depth.
    pub(crate) depth: CpuLocal,
    /// Spin mutexes held (NetBSD `ci_mtx_count`).
    pub(crate) mtx_count: CpuLocal,
    /// The IPL to return to when the last spin mutex is released.
    pub(crate) mtx_oldspl: AtomicU8,
    /// Nonzero inside a region that is not an AST safe point (the allocator
    /// under the `safepoint` protection).
    pub(crate) no_ast: CpuLocal,
    /// Nonzero while this CPU is inside an allocator (kmem, a pool): traps
    /// that land then are counted in [`CpuStats::traps_in_alloc`].
    pub(crate) in_alloc: CpuLocal,
    /// Nonzero while this CPU is inside the host allocator (`kern::malloc`).
    pub(crate) in_malloc: CpuLocal,
    /// The host allocator is a `no_ast` region
    /// ([`crate::KernelConfig::malloc_no_ast`]).
    pub(crate) malloc_no_ast: bool,
    /// Set while kernel-thread code runs (not the scheduler, the idle loop or
    /// the coroutine switch).
    pub(crate) in_kthread: AtomicBool,
    /// Set while the CPU runs soft-interrupt handlers from the daemon.
    pub(crate) in_softint_thread: AtomicBool,
    /// The tid of the kernel thread running here (`sched::NIL`: none).
    pub(crate) curthread: AtomicU32,
    /// The idle context's saved stack pointer (the CPU's host stack).
    pub(crate) idle_sp: AtomicUsize,
    /// A thread that exited and waits to be reaped off its own stack.
    /// (Its tid, `sched::NIL` for none.)
    pub(crate) dead: AtomicU32,
    /// Scheduled soft interrupts, bit = handle id.
    pub(crate) soft_pending: SoftQueue,
    /// Soft interrupts left over by a pass that ran out of budget.
    pub(crate) soft_deferred: SoftQueue,
    /// Pending ASTs, bit = handle id.
    pub(crate) ast_pending: AtomicU64,
    /// Run queue: this CPU only, under splsched.
    pub(crate) runq: RunQueue,
    /// Threads made runnable by other CPUs (or above IPL_SCHED): a
    /// lock-free stack that the scheduler moves into `runq`.
    pub(crate) inbox: Inbox,
    /// The idle loop's current polling window, ns ([`crate::haltpoll`]).
    pub(crate) halt_poll_ns: CpuLocal,
    /// Its run of long idle periods ([`crate::haltpoll::HaltPoll`]).
    pub(crate) halt_poll_streak: CpuLocal,
    /// Threads placed on this CPU and not yet exited.
    pub(crate) nthreads: AtomicU32,
    /// The softint daemon's wait channel word.
    pub(crate) softintd_wchan: AtomicU32,
    /// Counters.
    pub stats: CpuStats,
}

impl Cpu {
    pub(crate) fn new(index: usize, mask_mode: bool, malloc_no_ast: bool) -> Self {
        Self {
            index,
            halt_poll_ns: CpuLocal::new(),
            halt_poll_streak: CpuLocal::new(),
            line: PendingLine::new(),
            mask_mode,
            part: AtomicU8::new(0),
            hw_blocked: AtomicU8::new(0),
            ast_armed: AtomicBool::new(false),
            depth: CpuLocal::new(),
            mtx_count: CpuLocal::new(),
            mtx_oldspl: AtomicU8::new(0),
            no_ast: CpuLocal::new(),
            in_alloc: CpuLocal::new(),
            in_malloc: CpuLocal::new(),
            malloc_no_ast,
            in_kthread: AtomicBool::new(false),
            in_softint_thread: AtomicBool::new(false),
            curthread: AtomicU32::new(crate::sched::NIL),
            idle_sp: AtomicUsize::new(0),
            dead: AtomicU32::new(crate::sched::NIL),
            soft_pending: SoftQueue::new(),
            soft_deferred: SoftQueue::new(),
            ast_pending: AtomicU64::new(0),
            runq: RunQueue::new(),
            inbox: Inbox::new(),
            nthreads: AtomicU32::new(0),
            softintd_wchan: AtomicU32::new(0),
            stats: CpuStats::default(),
        }
    }

    /// This CPU's number.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The current IPL.
    pub fn ipl(&self) -> Ipl {
        Ipl::from_u8(self.line.ipl()).unwrap_or(Ipl::High)
    }

    /// The pending line (state word, pending bits).
    pub fn line(&self) -> &PendingLine {
        &self.line
    }

    /// Interrupt nesting depth.
    pub fn intr_depth(&self) -> u32 {
        self.depth.get() as u32
    }
}

/// The current CPU, if the caller runs on one.
#[inline(always)]
pub fn curcpu_opt() -> Option<&'static Cpu> {
    let p = crate::md::curcpu_ptr();
    // SAFETY: the machine returns null or a pointer to a `Cpu` of the booted
    // kernel, which outlives every CPU thread (md.rs, `dvma_md_curcpu`).
    unsafe { p.as_ref() }
}

/// The current CPU. Panics on a host thread that is not a CPU.
#[inline(always)]
pub fn curcpu() -> &'static Cpu {
    match curcpu_opt() {
        Some(c) => c,
        None => not_on_a_cpu(),
    }
}

#[cold]
#[inline(never)]
fn not_on_a_cpu() -> ! {
    panic!("kern: called from a host thread that is not a CPU")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmasked_table_matches_the_lattice() {
        // At none everything runs, including the AST.
        assert_eq!(unmasked(Ipl::None as u8) & AST_BIT, AST_BIT);
        // Above none the AST never runs.
        for l in &Ipl::ALL[1..] {
            assert_eq!(unmasked(*l as u8) & AST_BIT, 0, "{l}");
        }
        for b in 1..64u32 {
            let lvl = bit_level(b);
            if lvl == Ipl::None {
                continue;
            }
            for cur in Ipl::ALL {
                let runs = unmasked(cur as u8) & (1 << b) != 0;
                assert_eq!(runs, lvl > cur, "bit {b} ({lvl}) at {cur}");
            }
        }
        assert_eq!(unmasked(Ipl::High as u8), 0);
    }

    #[test]
    fn higher_bit_never_lower_priority() {
        let mut last = Ipl::None;
        for b in 1..64 {
            let l = bit_level(b);
            if l == Ipl::None {
                continue;
            }
            assert!(l >= last, "bit {b}");
            last = l;
        }
        for h in Ipl::HARD {
            let (first, n) = hard_bits(h);
            for b in first..first + n {
                assert_eq!(bit_level(b), h);
            }
        }
        for s in Ipl::SOFT {
            assert_eq!(bit_level(soft_bit(s).trailing_zeros()), s);
        }
    }
}
