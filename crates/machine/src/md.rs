//! The machine-dependent layer for a Linux process: `kern::md::Md`.
//!
//! * `curcpu()` is a thread-local pointer set on each vCPU thread.
//! * Kicking a CPU is `tgkill` of its host thread with the signal of the
//!   level (an inter-processor interrupt), or a write of its `hlt`'s
//!   eventfd when it idles (`crate::hlt`).
//! * An idle CPU sleeps in `epoll_wait` on its `hlt` set, which also holds
//!   the event queues of the devices attached to it.
//! * Time is the TSC, calibrated at boot against `CLOCK_MONOTONIC`.
//! * `mask` spl is `rt_sigprocmask` of the interrupt signals.
//! * Kernel-thread stacks are `mmap`ed with a guard page below.

use core::cell::Cell;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering::Relaxed};

use kern::cpu::Cpu;
use kern::ipl::Ipl;
use kern::md::{Kick, Md, StackMem};

use crate::signals;
use crate::sys;

thread_local! {
    static CURCPU: Cell<*const Cpu> = const { Cell::new(core::ptr::null()) };
}

/// The kernel's `curcpu()` hook.
#[unsafe(no_mangle)]
pub fn dvma_md_curcpu() -> *const Cpu {
    CURCPU.with(|c| c.get())
}

/// Make the calling host thread CPU `cpu` (or no CPU).
pub(crate) fn set_curcpu(cpu: *const Cpu) {
    CURCPU.with(|c| c.set(cpu));
}

/// The TSC clock.
#[derive(Clone, Copy, Debug)]
pub struct Tsc {
    t0: u64,
    /// Nanoseconds per tick, 32.32 fixed point.
    mult: u64,
}

impl Tsc {
    /// Calibrate over about 20 ms.
    pub fn calibrate() -> Self {
        fn mono() -> u64 {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid out-pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        }
        let (n0, c0) = (mono(), rdtsc());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (n1, c1) = (mono(), rdtsc());
        let mult = (((n1 - n0) as u128) << 32) / ((c1 - c0).max(1) as u128);
        Self {
            t0: c0,
            mult: mult as u64,
        }
    }

    /// Nanoseconds since calibration.
    #[inline]
    pub fn now(&self) -> u64 {
        ((rdtsc().wrapping_sub(self.t0) as u128 * self.mult as u128) >> 32) as u64
    }
}

/// Read the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged on Linux x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The Linux MD layer of one boot.
pub(crate) struct LinuxMd {
    pub(crate) ram: crate::dvma::Ram,
    pub(crate) window: crate::dvma::Window,
    pub(crate) pid: i32,
    pub(crate) tids: Box<[AtomicI32]>,
    pub(crate) clock: Tsc,
    /// Signal mask of a vCPU thread at each IPL (mask spl).
    pub(crate) masks: [u64; Ipl::COUNT],
    pub(crate) kicks_failed: AtomicU32,
    /// Each CPU's wait.
    pub(crate) hlt: Box<[crate::hlt::Hlt]>,
}

impl LinuxMd {
    pub(crate) fn new(
        ncpu: usize,
        base_mask: u64,
        ram: crate::dvma::Ram,
        window: crate::dvma::Window,
        hlt: Box<[crate::hlt::Hlt]>,
    ) -> Self {
        let mut masks = [base_mask; Ipl::COUNT];
        for l in Ipl::ALL {
            if l.is_hard() {
                masks[l as usize] |= signals::hard_set(l);
            }
        }
        Self {
            ram,
            window,
            pid: sys::getpid(),
            tids: (0..ncpu).map(|_| AtomicI32::new(0)).collect(),
            clock: Tsc::calibrate(),
            masks,
            kicks_failed: AtomicU32::new(0),
            hlt,
        }
    }
}

impl Md for LinuxMd {
    fn kick(&self, cpu: usize, how: Kick) {
        match how {
            Kick::Interrupt(level) => {
                let tid = self.tids[cpu].load(Relaxed);
                if tid == 0 || sys::tgkill(self.pid, tid, signals::sig_of(level)) < 0 {
                    self.kicks_failed.fetch_add(1, Relaxed);
                }
            }
            Kick::Wake => self.hlt[cpu].wake(),
        }
    }

    fn nanotime(&self) -> u64 {
        self.clock.now()
    }

    fn spin_yield(&self) {
        // A raw system call: async-signal-safe, and errno is not touched.
        sys::sched_yield();
    }

    fn hw_mask(&self, level: Ipl) {
        sys::sigsetmask(self.masks[level as usize]);
    }

    fn idle_wait(&self, cpu: usize, word: &AtomicU32, expect: u32) {
        // A waker changes the word before it writes the eventfd, and the
        // eventfd stays readable until this CPU reads it: no lost wake-up.
        // An interrupt taken between the look and `epoll_wait` whose
        // handlers may have queued a thread here writes the eventfd too
        // (`signals::dvma_sig_body`, on `kern::intr::trap`'s word).
        if word.load(Relaxed) == expect {
            self.hlt[cpu].wait();
        }
    }

    fn idle_poll(&self, cpu: usize) {
        self.hlt[cpu].poll(cpu, self.clock.now());
    }

    fn physmem(&self) -> (usize, u64) {
        self.ram.direct_map()
    }

    fn iommu(&self) -> &'static dyn kern::iommu::Iommu {
        // SAFETY: every `LinuxMd` is leaked at boot (`Box::leak`), so `self`
        // lives for the rest of the process; only its mappings are released,
        // after the kernel is torn down.
        let me: &'static LinuxMd = unsafe { &*(self as *const LinuxMd) };
        &me.window
    }

    fn host_wake(&self, word: &AtomicU32) {
        sys::futex_wake(word, i32::MAX);
    }

    fn stack_alloc(&self, size: usize) -> Option<StackMem> {
        let m = crate::mem::map_stack(size)?;
        Some(StackMem {
            limit: m.0,
            base: m.0 + m.1,
        })
    }

    fn thread_init(&self, stack: StackMem, entry: extern "C" fn(usize) -> !, arg: usize) -> usize {
        // SAFETY: `stack` came from `stack_alloc` (a fresh mapping, base
        // 16-byte aligned) and belongs to the thread being created.
        unsafe { kern::arch::thread_frame(stack.base & !15, entry, arg) }
    }

    fn run_thread(&self, body: &mut dyn FnMut()) {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            let msg = crate::panic_message(&*e);
            let cpu = kern::cpu::curcpu_opt().map(|c| c.index()).unwrap_or(0);
            let name = kern::sched::current_name().unwrap_or("?");
            crate::record_panic(cpu, format!("kernel thread {name}: {msg}"));
        }
    }

    unsafe fn stack_free(&self, mem: StackMem) {
        // SAFETY: by the trait's contract, `mem` came from `stack_alloc`
        // (a `map_stack` mapping) and nothing runs on it.
        unsafe { crate::mem::unmap(mem.limit, mem.base - mem.limit) };
    }
}
