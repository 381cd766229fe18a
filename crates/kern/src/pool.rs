//! Pools bound to an IPL (NetBSD `pool_cache_init(..., ipl, ...)`).
//!
//! A [`Pool`] holds a fixed number of preconstructed objects. Every
//! operation raises the CPU to the pool's IPL (through its spin mutex), so
//! a pool created at `Ipl::Bio` may be used from thread code and from disk
//! interrupt handlers alike: this is the principled fix of the 1995 race,
//! where the allocator itself knows the highest level it is used from,
//! instead of every caller remembering an `spl`.
//!
//! * [`Pool::get_nowait`]: any context; `None` when empty.
//! * [`Pool::get_wait`]: thread context (it takes a [`ThreadCtx`]); sleeps
//!   until an item is returned.
//! * Dropping a [`PoolItem`] returns it and wakes one waiter.
//!
//! Items can be passed through lock-free queues as raw indices
//! ([`PoolItem::into_raw`], [`Pool::from_raw`]).
//!
//! [`Pool::audit`] checks the free list (no duplicates, indices in range,
//! count consistent) and reports corruption instead of crashing.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};

use crate::cpu::curcpu_opt;
use crate::ctx::ThreadCtx;
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::sched::{Interrupted, sleep_interlocked, wakeup_one, wchan};

/// Pool counters.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Successful gets.
    pub gets: AtomicU64,
    /// Puts.
    pub puts: AtomicU64,
    /// `get_nowait` calls that found the pool empty.
    pub empty: AtomicU64,
    /// Sleeps in `get_wait`.
    pub waits: AtomicU64,
    /// Corruptions found by `audit`.
    pub corruptions: AtomicU64,
}

struct Inner {
    free: Vec<u32>,
    waiters: u32,
}

/// A pool of `T` at an IPL.
pub struct Pool<T> {
    name: &'static str,
    inner: SpinMutex<Inner>,
    items: Box<[UnsafeCell<T>]>,
    inject: AtomicUsize,
    /// Counters.
    pub stats: PoolStats,
}

// SAFETY: an item's cell is reachable only through the one `PoolItem` that
// holds its index (an index is either on the free list or held by exactly
// one PoolItem), so `&Pool` hands out no aliasing `&mut T`.
unsafe impl<T: Send> Sync for Pool<T> {}
// SAFETY: moving the pool moves the items.
unsafe impl<T: Send> Send for Pool<T> {}

/// A pool audit failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolCorruption {
    /// An index appears twice on the free list.
    Duplicate {
        /// The index.
        index: u32,
    },
    /// An index is out of range.
    OutOfRange {
        /// The index.
        index: u32,
    },
}

impl<T> Pool<T> {
    /// A pool named `name` at `ipl` with `n` items built by `init`.
    /// Thread or host context (it allocates).
    pub fn new(name: &'static str, ipl: Ipl, n: usize, mut init: impl FnMut(usize) -> T) -> Self {
        assert!(n <= u32::MAX as usize);
        Self {
            name,
            inner: SpinMutex::new(
                ipl,
                Inner {
                    free: (0..n as u32).rev().collect(),
                    waiters: 0,
                },
            ),
            items: (0..n).map(|i| UnsafeCell::new(init(i))).collect(),
            inject: AtomicUsize::new(0),
            stats: PoolStats::default(),
        }
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its IPL.
    pub fn ipl(&self) -> Ipl {
        self.inner.ipl()
    }

    /// Its size.
    pub fn capacity(&self) -> usize {
        self.items.len()
    }

    /// Items on the free list now.
    pub fn available(&self) -> usize {
        self.inner.lock().free.len()
    }

    /// The fault-injection hook, called inside `get` with the pool's IPL
    /// raised (see `kmem::Kmem::set_inject`).
    pub fn set_inject(&self, hook: Option<fn()>) {
        self.inject
            .store(hook.map(|f| f as usize).unwrap_or(0), Release);
    }

    /// Take an item if there is one. Any context.
    pub fn get_nowait(&self) -> Option<PoolItem<'_, T>> {
        let cpu = curcpu_opt();
        let mut g = self.inner.lock();
        if let Some(c) = cpu {
            c.in_alloc.inc();
        }
        let hook = self.inject.load(Acquire);
        if hook != 0 {
            // SAFETY: stored from a `fn()` by `set_inject`.
            let f: fn() = unsafe { core::mem::transmute::<usize, fn()>(hook) };
            f();
        }
        let idx = g.free.pop();
        if let Some(c) = cpu {
            c.in_alloc.dec();
        }
        drop(g);
        match idx {
            Some(idx) => {
                self.stats.gets.fetch_add(1, Relaxed);
                Some(PoolItem { pool: self, idx })
            }
            None => {
                self.stats.empty.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Take an item, sleeping until one is returned. Thread context.
    /// `Err` only when the kernel shuts down.
    pub fn get_wait(&self, ctx: &ThreadCtx) -> Result<PoolItem<'_, T>, Interrupted> {
        loop {
            if let Some(it) = self.get_nowait() {
                return Ok(it);
            }
            let mut g = self.inner.lock();
            if !g.free.is_empty() {
                continue;
            }
            g.waiters += 1;
            self.stats.waits.fetch_add(1, Relaxed);
            let r = sleep_interlocked(ctx, wchan(self), g);
            self.inner.lock().waiters -= 1;
            r?;
        }
    }

    fn put(&self, idx: u32) {
        let mut g = self.inner.lock();
        g.free.push(idx);
        let wake = g.waiters > 0;
        drop(g);
        self.stats.puts.fetch_add(1, Relaxed);
        if wake {
            wakeup_one(wchan(self));
        }
    }

    /// Rebuild an item from [`PoolItem::into_raw`].
    ///
    /// # Safety
    /// 1. `idx` came from `into_raw` on an item of this pool.
    /// 2. It is rebuilt once.
    pub unsafe fn from_raw(&self, idx: u32) -> PoolItem<'_, T> {
        PoolItem { pool: self, idx }
    }

    /// Check the free list; repair and report.
    pub fn audit(&self) -> Result<(), PoolCorruption> {
        let mut g = self.inner.lock();
        let mut seen = alloc::vec![false; self.items.len()];
        let mut bad = None;
        g.free.retain(|&i| {
            if i as usize >= seen.len() {
                bad.get_or_insert(PoolCorruption::OutOfRange { index: i });
                false
            } else if seen[i as usize] {
                bad.get_or_insert(PoolCorruption::Duplicate { index: i });
                false
            } else {
                seen[i as usize] = true;
                true
            }
        });
        drop(g);
        match bad {
            Some(c) => {
                self.stats.corruptions.fetch_add(1, Relaxed);
                Err(c)
            }
            None => Ok(()),
        }
    }
}

/// An item taken from a [`Pool`]; returned when dropped.
pub struct PoolItem<'p, T> {
    pool: &'p Pool<T>,
    idx: u32,
}

impl<T> PoolItem<'_, T> {
    /// Give up the handle, keeping the item out of the pool: rebuild it
    /// with [`Pool::from_raw`].
    pub fn into_raw(self) -> u32 {
        let i = self.idx;
        core::mem::forget(self);
        i
    }

    /// Its index in the pool.
    pub fn index(&self) -> u32 {
        self.idx
    }
}

impl<T> Deref for PoolItem<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this item owns `idx` (see `unsafe impl Sync for Pool`).
        unsafe { &*self.pool.items[self.idx as usize].get() }
    }
}

impl<T> DerefMut for PoolItem<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and `&mut self` is unique.
        unsafe { &mut *self.pool.items[self.idx as usize].get() }
    }
}

impl<T> Drop for PoolItem<'_, T> {
    fn drop(&mut self) {
        self.pool.put(self.idx);
    }
}
