//! Spin mutexes bound to an IPL (NetBSD `mutex_init(..., MUTEX_SPIN, ipl)`).
//!
//! [`SpinMutex::lock`] first raises the CPU to the mutex's IPL, then spins.
//! So an interrupt handler at or below that IPL can take the same mutex:
//! on the holder's CPU it cannot run until the mutex is released (it stays
//! pending), and on other CPUs it only spins while the holder finishes.
//!
//! The IPL is restored when the CPU's *last* spin mutex is released, to the
//! level from before the first one was taken (`ci_mtx_oldspl`), so guards
//! may be dropped in any order. Holding a spin mutex is not an AST safe
//! point, and sleeping while holding one panics ([`crate::ctx::might_sleep`]).
//! Taking a spin mutex the same CPU already holds panics instead of
//! deadlocking silently (it means the mutex's IPL is below an interrupt that
//! takes it).
//!
//! # Contexts
//! Any context. On a host thread that is not a CPU it is a plain spin lock.

use core::cell::UnsafeCell;
use core::marker::PhantomData;

/// Spins on a held lock before asking the machine to yield the host CPU
/// (a few to tens of microseconds of `pause`, depending on the CPU).
const SPINS_BEFORE_YIELD: u32 = 256;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{
    AtomicBool, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
    compiler_fence,
};

use crate::cpu::{Cpu, curcpu_opt};
use crate::ipl::Ipl;

/// A spin mutex at an IPL.
pub struct SpinMutex<T> {
    ipl: Ipl,
    locked: AtomicBool,
    /// CPU index + 1 of the holder, 0 if free or held by a host thread.
    owner: AtomicUsize,
    data: UnsafeCell<T>,
}

// SAFETY: the mutex serialises all access to `data` (see `lock`), so sharing
// it across threads is sound whenever `T` may be sent between them. (It is
// `Send` without help: moving it moves a `T`.)
unsafe impl<T: Send> Sync for SpinMutex<T> {}

/// A held [`SpinMutex`].
pub struct SpinGuard<'a, T> {
    m: &'a SpinMutex<T>,
    cpu: Option<&'static Cpu>,
    _not_send: PhantomData<*const ()>,
}

impl<T> SpinMutex<T> {
    /// A mutex at `ipl` protecting `data`.
    pub const fn new(ipl: Ipl, data: T) -> Self {
        Self {
            ipl,
            locked: AtomicBool::new(false),
            owner: AtomicUsize::new(0),
            data: UnsafeCell::new(data),
        }
    }

    /// Its IPL.
    pub fn ipl(&self) -> Ipl {
        self.ipl
    }

    /// Raise to the mutex's IPL and acquire it.
    #[inline]
    pub fn lock(&self) -> SpinGuard<'_, T> {
        let cpu = curcpu_opt();
        if let Some(c) = cpu {
            enter(c, self.ipl);
            if self.locked.load(Relaxed) && self.owner.load(Relaxed) == c.index() + 1 {
                recursive(self.ipl);
            }
        }
        while self
            .locked
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            let mut spins = 0u32;
            while self.locked.load(Relaxed) {
                core::hint::spin_loop();
                spins += 1;
                if spins >= SPINS_BEFORE_YIELD {
                    // The holder's host thread may have been preempted: a
                    // virtual CPU is a host thread, and spinning out its
                    // time slice helps nobody (see `Md::spin_yield`).
                    spins = 0;
                    if let Some(k) = crate::kernel::try_kernel() {
                        k.md().spin_yield();
                    }
                }
            }
        }
        self.owner
            .store(cpu.map(|c| c.index() + 1).unwrap_or(0), Relaxed);
        SpinGuard {
            m: self,
            cpu,
            _not_send: PhantomData,
        }
    }

    /// Acquire it if it is free.
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        let cpu = curcpu_opt();
        if let Some(c) = cpu {
            enter(c, self.ipl);
        }
        if self
            .locked
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_ok()
        {
            self.owner
                .store(cpu.map(|c| c.index() + 1).unwrap_or(0), Relaxed);
            Some(SpinGuard {
                m: self,
                cpu,
                _not_send: PhantomData,
            })
        } else {
            if let Some(c) = cpu {
                exit(c);
            }
            None
        }
    }

    /// Mutable access without locking: the caller has `&mut self`.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

#[inline]
fn enter(c: &Cpu, ipl: Ipl) {
    let s = crate::spl::splraise_cpu(c, ipl as u8);
    if c.mtx_count.inc_was_zero() {
        c.mtx_oldspl.store(s, Relaxed);
    }
    compiler_fence(core::sync::atomic::Ordering::SeqCst);
}

#[inline]
fn exit(c: &Cpu) {
    compiler_fence(core::sync::atomic::Ordering::SeqCst);
    // Read the level to return to *before* the count drops: from the moment
    // it is zero, an interrupt handler that takes a spin mutex of its own
    // records its own (raised) level in `mtx_oldspl`, and a load after the
    // decrement would "restore" that level and leave the CPU raised for
    // good (the `ast` livelock of issue 10: the softint daemon spun at
    // IPL_NET, where no AST is ever delivered). NetBSD's `mutex_spin_exit`
    // reads `ci_mtx_oldspl` first for the same reason.
    let s = c.mtx_oldspl.load(Relaxed);
    compiler_fence(core::sync::atomic::Ordering::SeqCst);
    if c.mtx_count.dec_is_zero() {
        crate::spl::splx_cpu(c, s);
    }
}

#[cold]
#[inline(never)]
fn recursive(ipl: Ipl) -> ! {
    panic!(
        "spin mutex at {ipl} taken again by the CPU holding it: an interrupt above {ipl} takes it"
    )
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.m.data.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock, and `&mut self` makes this the
        // only reference through it.
        unsafe { &mut *self.m.data.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.m.owner.store(0, Relaxed);
        self.m.locked.store(false, Release);
        if let Some(c) = self.cpu {
            exit(c);
        }
    }
}
