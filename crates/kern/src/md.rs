//! The machine-dependent interface.
//!
//! The kernel core asks the machine for exactly these things; the `machine`
//! crate provides them for a Linux process, and a port to real hardware
//! would provide them with IPIs, interrupt controllers and `hlt`.
//!
//! * [`Md`]: a trait object registered at [`crate::kernel::boot`]: kicking a
//!   CPU (an inter-processor interrupt, or waking it from idle), time,
//!   masking hardware interrupts for the `mask` spl implementation, idling,
//!   and kernel-thread stacks.
//! * `dvma_md_curcpu`: the current CPU. It is on every `spl` call, so it is
//!   a link-time hook (like `#[global_allocator]`), not a trait method, and
//!   with LTO it inlines into a single thread-pointer-relative load, as
//!   `curcpu()` is a `%gs`-relative load in a real kernel.
//! * `dvma_md_switch`: `cpu_switchto`, the context switch between two
//!   kernel stacks, also a link-time hook because it is on every switch.
//!   On x86-64, [`crate::arch`] provides it for every machine, with the
//!   first frame of a new thread ([`crate::arch::thread_frame`]).
//!
//! # Contexts
//! [`Md::kick`], [`Md::nanotime`] and [`Md::hw_mask`] are called from
//! interrupt context and must be async-signal-safe: no allocation, no locks,
//! errno preserved. The others are called from thread or host context only.

use crate::cpu::Cpu;
use crate::ipl::Ipl;
use core::sync::atomic::AtomicU32;

/// How to make a CPU notice that something is pending for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    /// The CPU is running code that will not look: interrupt it (a signal,
    /// an IPI) at this hardware level.
    Interrupt(Ipl),
    /// The CPU sleeps in its idle loop: wake it.
    Wake,
}

/// A kernel-thread stack handed out by the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackMem {
    /// Lowest address, including the guard page(s).
    pub limit: usize,
    /// Highest address (the stack grows down from here); 16-byte aligned.
    pub base: usize,
}

/// What the kernel core needs from the machine.
pub trait Md: Sync {
    /// Make CPU `cpu` notice pending work. Called from any context,
    /// including interrupt handlers and host threads (devices).
    fn kick(&self, cpu: usize, how: Kick);
    /// Monotonic nanoseconds. Async-signal-safe.
    fn nanotime(&self) -> u64;
    /// A spin-wait for a lock has gone on for long: the holder may be a
    /// CPU whose host thread was preempted (lock-holder preemption, which
    /// paravirtualised spinlocks address). Give the host CPU away for a
    /// moment. Any context; async-signal-safe. Default: nothing.
    fn spin_yield(&self) {}
    /// `mask` spl: block on the calling CPU every hardware interrupt level at
    /// or below `level` and unblock the others. Async-signal-safe.
    fn hw_mask(&self, level: Ipl);
    /// Idle the calling CPU until `word` no longer holds `expect` (or
    /// spuriously). It must not sleep through an interrupt taken after its
    /// look at `word` whose handlers queued work (see what
    /// [`crate::intr::trap`] returns). Host context of the CPU's own thread
    /// only.
    fn idle_wait(&self, cpu: usize, word: &AtomicU32, expect: u32);
    /// The idle CPU `cpu` looks at the host devices that deliver their
    /// events to its wait (a NIC's receive queue, say) and posts their
    /// interrupts on itself: a poll, not a sleep. Called by the idle loop
    /// while it polls and after every [`Md::idle_wait`]. Host context of the
    /// CPU's own thread only. Default: no such devices.
    fn idle_poll(&self, _cpu: usize) {}
    /// The machine's RAM: the address of its direct map and its size.
    fn physmem(&self) -> (usize, u64);
    /// The machine's IOMMU.
    fn iommu(&self) -> &'static dyn crate::iommu::Iommu;
    /// Wake host threads waiting (futex) on `word`: a kernel thread exited
    /// (see `KThread::exit_word`). Thread or host context.
    fn host_wake(&self, word: &AtomicU32);
    /// Allocate a kernel-thread stack of at least `size` usable bytes with a
    /// guard page below it.
    fn stack_alloc(&self, size: usize) -> Option<StackMem>;
    /// Prepare a fresh stack so that the first [`cpu_switchto`] to the
    /// returned stack pointer calls `entry(arg)` on it, with a clean call
    /// frame (16-byte aligned, end of the unwind chain). `entry` never
    /// returns.
    fn thread_init(&self, stack: StackMem, entry: extern "C" fn(usize) -> !, arg: usize) -> usize;
    /// Run a kernel thread's body, catching a panic if the host can: on a
    /// panic, record it (the machine reports it and fails) and return, so
    /// that the thread exits cleanly instead of tearing down its CPU.
    fn run_thread(&self, body: &mut dyn FnMut());
    /// Free a stack returned by [`Md::stack_alloc`].
    ///
    /// # Safety
    /// 1. `mem` came from `stack_alloc` on this machine and is freed once.
    /// 2. Nothing runs on it any more.
    unsafe fn stack_free(&self, mem: StackMem);
}

unsafe extern "Rust" {
    /// The current CPU, or null on a host thread that is not a CPU.
    ///
    /// Provided by the machine (`#[unsafe(no_mangle)]`). It must be
    /// async-signal-safe and return, on a CPU's thread, a pointer to that
    /// CPU's [`Cpu`] inside the booted kernel.
    safe fn dvma_md_curcpu() -> *const Cpu;
}

unsafe extern "C" {
    /// `cpu_switchto`: save the callee-saved registers and the stack pointer
    /// of the running context into `*from`, load `to` (a value saved by an
    /// earlier switch, or made by [`Md::thread_init`]) and continue there.
    /// Returns when some later switch loads what was saved in `*from`.
    ///
    /// On x86-64 it is [`crate::arch`]'s assembly (C calling convention).
    ///
    /// # Safety
    /// 1. `from` is valid for writes and stays so until the saved context is
    ///    resumed or abandoned.
    /// 2. `to` is a context saved by a switch and not resumed since, or a
    ///    fresh one from `thread_init`, on a stack that is still mapped.
    /// 3. The caller runs at IPL_SCHED or above, on the CPU that will own
    ///    both contexts.
    fn dvma_md_switch(from: *mut usize, to: usize);
}

/// The current CPU, if the caller runs on one.
#[inline(always)]
pub fn curcpu_ptr() -> *const Cpu {
    dvma_md_curcpu()
}

/// `cpu_switchto` (see `dvma_md_switch`).
///
/// # Safety
/// The obligations of `dvma_md_switch`.
#[inline(always)]
pub unsafe fn cpu_switchto(from: *mut usize, to: usize) {
    // SAFETY: forwarded to the caller.
    unsafe { dvma_md_switch(from, to) }
}

/// Kernel unit tests run on host threads that are not CPUs, except the
/// thread of a booted fake machine (`crate::fake`), which is its CPU 0.
#[cfg(test)]
mod test_md {
    use super::Cpu;
    #[unsafe(no_mangle)]
    fn dvma_md_curcpu() -> *const Cpu {
        #[cfg(not(loom))]
        return crate::fake::curcpu();
        #[cfg(loom)]
        core::ptr::null()
    }
    #[unsafe(no_mangle)]
    extern "C" fn dvma_md_switch(from: *mut usize, to: usize) {
        #[cfg(not(loom))]
        crate::fake::threads::switch(from, to);
        #[cfg(loom)]
        {
            let _ = (from, to);
            panic!("no context switches in the loom build")
        }
    }
}
