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
//! The items live in a [`SlotTable`]: a `PoolItem` owns its slot, so even
//! a corrupt free list (an index on it twice) or an index rebuilt twice
//! cannot give two owners one item; `get_nowait` skips (and counts) a
//! listed index whose item is not free, and `from_raw` refuses an index
//! that is not out.
//!
//! [`Pool::audit`] checks the free list (no duplicates, indices in range,
//! count consistent) and reports corruption instead of crashing.

use alloc::vec::Vec;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::cpu::curcpu_opt;
use crate::ctx::ThreadCtx;
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::once::FnHook;
use crate::sched::{Interrupted, sleep_interlocked, wakeup_one, wchan};
use crate::slot::{SlotRef, SlotTable};

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
    items: SlotTable<T>,
    inject: FnHook,
    /// Counters.
    pub stats: PoolStats,
}

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
            items: SlotTable::new(n, &mut init),
            inject: FnHook::new(),
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
        self.inject.set(hook);
    }

    /// Take an item if there is one. Any context.
    pub fn get_nowait(&self) -> Option<PoolItem<'_, T>> {
        let cpu = curcpu_opt();
        let mut g = self.inner.lock();
        if let Some(c) = cpu {
            c.in_alloc.inc();
        }
        if let Some(f) = self.inject.get() {
            f();
        }
        let mut slot = None;
        while let Some(idx) = g.free.pop() {
            slot = self.items.claim(idx);
            if slot.is_some() {
                break;
            }
            // Listed but not free: a corrupt free list. Drop the entry.
            self.stats.corruptions.fetch_add(1, Relaxed);
        }
        if let Some(c) = cpu {
            c.in_alloc.dec();
        }
        drop(g);
        match slot {
            Some(slot) => {
                self.stats.gets.fetch_add(1, Relaxed);
                Some(PoolItem {
                    pool: self,
                    slot: Some(slot),
                })
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

    /// Rebuild an item from [`PoolItem::into_raw`]; `None` if `idx` is not
    /// an item of this pool given up with `into_raw` (and not rebuilt
    /// since).
    pub fn from_raw(&self, idx: u32) -> Option<PoolItem<'_, T>> {
        self.items.reclaim(idx).map(|slot| PoolItem {
            pool: self,
            slot: Some(slot),
        })
    }

    /// The index of the item `p` points to, if it is one of this pool's.
    /// An address computation; nothing is dereferenced.
    pub fn index_of(&self, p: *const T) -> Option<u32> {
        self.items.index_of(p)
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
    /// Always `Some` but in `drop` and `into_raw`.
    slot: Option<SlotRef<'p, T>>,
}

impl<T> PoolItem<'_, T> {
    fn slot(&self) -> &SlotRef<'_, T> {
        self.slot.as_ref().expect("pool: an item without its slot")
    }

    /// Give up the handle, keeping the item out of the pool: rebuild it
    /// with [`Pool::from_raw`].
    pub fn into_raw(mut self) -> u32 {
        match self.slot.take() {
            Some(s) => s.lend(),
            None => unreachable!("pool: an item without its slot"),
        }
    }

    /// Its index in the pool.
    pub fn index(&self) -> u32 {
        self.slot().id()
    }
}

impl<T> Deref for PoolItem<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.slot()
    }
}

impl<T> DerefMut for PoolItem<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.slot.as_mut().expect("pool: an item without its slot")
    }
}

impl<T> Drop for PoolItem<'_, T> {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            // Free the slot before listing it, so a `get` that finds the
            // index on the list can claim it.
            let idx = s.id();
            drop(s);
            self.pool.put(idx);
        }
    }
}
