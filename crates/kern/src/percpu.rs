//! Per-CPU words: changed only by their own CPU, read by anyone.
//!
//! A [`CpuLocal`] is written by one CPU only: its thread code and its own
//! interrupt handlers, which run on the same host thread. Such a word needs
//! no bus lock: an interrupt (a signal) is taken between two instructions,
//! so a single read-modify-write instruction is atomic with respect to
//! everything that can touch the word. On x86_64 `inc`/`dec`/`add` without
//! the `lock` prefix is exactly that (Linux's `this_cpu_inc`); elsewhere the
//! portable fallback is an ordinary atomic RMW. Other CPUs read it with a
//! plain load; an aligned 64-bit load never tears.
//!
//! Used for the hot per-CPU counters: interrupt depth, spin mutexes held,
//! `no_ast` regions, and statistics. A locked RMW costs many times a plain
//! one, and a kernel-thread switch used to execute six of them.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A per-CPU counter (see the module docs). Only its own CPU may change it.
#[repr(transparent)]
#[derive(Debug, Default)]
pub struct CpuLocal(AtomicU64);

impl CpuLocal {
    /// Zero.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// The value (any thread).
    #[inline(always)]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    /// Set the value. Owning CPU only.
    #[inline(always)]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed)
    }

    /// Add `n`; returns nothing (the old value would need a second access).
    /// Owning CPU only.
    #[inline(always)]
    pub fn add(&self, n: u64) {
        #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
        // SAFETY: a non-locked `add` to the word, which lives as long as
        // `self`; single instruction, so atomic w.r.t. this CPU's signals.
        unsafe {
            core::arch::asm!("add qword ptr [{p}], {n}", p = in(reg) self.0.as_ptr(), n = in(reg) n,
                options(nostack));
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
        self.0.fetch_add(n, Relaxed);
    }

    /// Add one. Owning CPU only.
    #[inline(always)]
    pub fn inc(&self) {
        #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
        // SAFETY: as in `add`.
        unsafe {
            core::arch::asm!("inc qword ptr [{p}]", p = in(reg) self.0.as_ptr(), options(nostack));
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
        self.0.fetch_add(1, Relaxed);
    }

    /// Subtract one. Owning CPU only.
    #[inline(always)]
    pub fn dec(&self) {
        #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
        // SAFETY: as in `add`.
        unsafe {
            core::arch::asm!("dec qword ptr [{p}]", p = in(reg) self.0.as_ptr(), options(nostack));
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
        self.0.fetch_sub(1, Relaxed);
    }

    /// Increment, returning whether the value was zero before. Owning CPU
    /// only. (Read then increment: an interrupt between the two leaves the
    /// word as it found it, since handlers' changes are balanced.)
    #[inline(always)]
    pub fn inc_was_zero(&self) -> bool {
        let z = self.get() == 0;
        self.inc();
        z
    }

    /// Decrement, returning whether it is zero now. Owning CPU only.
    #[inline(always)]
    pub fn dec_is_zero(&self) -> bool {
        self.dec();
        self.get() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let c = CpuLocal::new();
        assert!(c.inc_was_zero());
        c.add(5);
        assert_eq!(c.get(), 6);
        c.dec();
        assert!(!c.dec_is_zero());
        c.set(1);
        assert!(c.dec_is_zero());
    }
}

/// A counter any CPU may bump cheaply: one [`CpuLocal`] per CPU (no shared
/// cache line, no bus lock), summed when read. Host threads, which are no
/// CPU, use a shared atomic.
#[derive(Debug)]
pub struct PerCpuCounter {
    cpus: [CpuLocal; crate::cpu::MAXCPU],
    host: AtomicU64,
}

impl Default for PerCpuCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl PerCpuCounter {
    /// Zero.
    pub const fn new() -> Self {
        Self {
            cpus: [const { CpuLocal::new() }; crate::cpu::MAXCPU],
            host: AtomicU64::new(0),
        }
    }

    /// Add one (any context).
    #[inline(always)]
    pub fn inc(&self) {
        match crate::cpu::curcpu_opt() {
            Some(c) => self.cpus[c.index()].inc(),
            None => {
                self.host.fetch_add(1, Relaxed);
            }
        }
    }

    /// The total (approximate while others count).
    pub fn get(&self) -> u64 {
        self.cpus.iter().map(CpuLocal::get).sum::<u64>() + self.host.load(Relaxed)
    }
}
