//! Slot tables: a fixed array of `T` whose slots are owned one at a time.
//!
//! A driver's command slots (sd's DMA map and buf, vnd's buf) and a pool's
//! items live in a [`SlotTable`]. Each slot is, at any moment, in one of
//! three states, kept in an atomic byte per slot:
//!
//! | state | who owns the slot | how it gets there |
//! |---|---|---|
//! | free | nobody | [`SlotTable::new`]; dropping its [`SlotRef`] |
//! | held | the one live [`SlotRef`] | [`SlotTable::claim`] (from free), [`SlotTable::reclaim`] (from away) |
//! | away | whoever holds its id (a device, a queue) | [`SlotRef::lend`] |
//!
//! Only a [`SlotRef`] reaches a slot's value, and the state moves to *held*
//! by a compare-and-swap, so two owners of one slot cannot exist: an id
//! that comes back twice (a device completing a command twice, a
//! duplicate on a free list) makes the second `reclaim` or `claim` fail
//! instead of aliasing the slot. Which ids are free is the caller's
//! business (a free list under its own lock, usually); the table only
//! refuses a wrong one.
//!
//! This is the one audited module for it: the `unsafe` of slot ownership
//! is here and nowhere else (the drivers in `dev` forbid `unsafe`).
//!
//! # Contexts
//! Every operation: any context, interrupt handlers included. None
//! allocates, blocks or takes a lock (one atomic operation each).

use alloc::boxed::Box;
use core::cell::UnsafeCell;
use core::sync::atomic::{
    AtomicU8,
    Ordering::{Acquire, Relaxed, Release},
};

const FREE: u8 = 0;
const HELD: u8 = 1;
const AWAY: u8 = 2;

struct Slot<T> {
    state: AtomicU8,
    val: UnsafeCell<T>,
}

/// A fixed table of `T`, each slot owned by at most one [`SlotRef`] at a
/// time (see the module docs).
pub struct SlotTable<T> {
    slots: Box<[Slot<T>]>,
}

// SAFETY: a slot's value is reached only through a `SlotRef`, and a
// `SlotRef` exists only for a slot whose state it moved to HELD with an
// Acquire compare-and-swap (`claim`, `reclaim`); the state leaves HELD only
// by a Release store made by that `SlotRef` (its drop, `lend`). So at most
// one context has `&T`/`&mut T` to a slot at any time, and its accesses
// happen after those of the previous owner: sharing the table between
// threads needs only `T: Send`.
unsafe impl<T: Send> Sync for SlotTable<T> {}

impl<T> SlotTable<T> {
    /// A table of `n` free slots, built by `init` (at most `u32::MAX`).
    /// Thread or host context: it allocates.
    pub fn new(n: usize, mut init: impl FnMut(usize) -> T) -> Self {
        assert!(n <= u32::MAX as usize, "slot table of {n} slots");
        Self {
            slots: (0..n)
                .map(|i| Slot {
                    state: AtomicU8::new(FREE),
                    val: UnsafeCell::new(init(i)),
                })
                .collect(),
        }
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Has it no slots?
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn take(&self, id: u32, from: u8) -> Option<SlotRef<'_, T>> {
        let s = self.slots.get(id as usize)?;
        s.state
            .compare_exchange(from, HELD, Acquire, Relaxed)
            .ok()
            .map(|_| SlotRef { table: self, id })
    }

    /// Own free slot `id`; `None` if it is out of range or not free.
    pub fn claim(&self, id: u32) -> Option<SlotRef<'_, T>> {
        self.take(id, FREE)
    }

    /// Own again slot `id`, lent out by [`SlotRef::lend`]; `None` if it is
    /// out of range or not away (already reclaimed, or never lent).
    pub fn reclaim(&self, id: u32) -> Option<SlotRef<'_, T>> {
        self.take(id, AWAY)
    }

    /// The index of the slot whose value `p` points to, if it points to
    /// one (an address computation; nothing is dereferenced).
    pub fn index_of(&self, p: *const T) -> Option<u32> {
        let first = self.slots.first()?.val.get() as usize;
        let stride = core::mem::size_of::<Slot<T>>();
        let off = (p as usize).checked_sub(first)?;
        if stride == 0 || !off.is_multiple_of(stride) || off / stride >= self.slots.len() {
            return None;
        }
        Some((off / stride) as u32)
    }
}

/// The owner of one slot of a [`SlotTable`]: dereferences to its value.
/// Dropping it frees the slot; [`SlotRef::lend`] gives ownership to the
/// holder of the id instead.
pub struct SlotRef<'a, T> {
    table: &'a SlotTable<T>,
    id: u32,
}

impl<T> SlotRef<'_, T> {
    /// The slot's index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Give up the slot to whoever will hold `id` (a device's command, a
    /// lock-free queue): it stays away until [`SlotTable::reclaim`].
    pub fn lend(self) -> u32 {
        let id = self.id;
        self.table.slots[id as usize].state.store(AWAY, Release);
        core::mem::forget(self);
        id
    }

    fn slot(&self) -> &Slot<T> {
        &self.table.slots[self.id as usize]
    }
}

impl<T> core::ops::Deref for SlotRef<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this SlotRef holds the slot (state HELD, set by its own
        // compare-and-swap), so no other reference to the value exists
        // (see `unsafe impl Sync for SlotTable`).
        unsafe { &*self.slot().val.get() }
    }
}

impl<T> core::ops::DerefMut for SlotRef<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this access unique.
        unsafe { &mut *self.slot().val.get() }
    }
}

impl<T> Drop for SlotRef<'_, T> {
    fn drop(&mut self) {
        self.slot().state.store(FREE, Release);
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for SlotRef<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SlotRef")
            .field("id", &self.id)
            .field("val", &**self)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::SlotTable;
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn one_owner_per_slot() {
        let t = SlotTable::new(2, |i| i * 10);
        let mut a = t.claim(0).expect("free");
        assert!(t.claim(0).is_none(), "held: a second claim fails");
        assert!(t.reclaim(0).is_none(), "held, not away");
        *a += 1;
        let id = a.lend();
        assert!(t.claim(id).is_none(), "away, not free");
        let a = t.reclaim(id).expect("away");
        assert_eq!(*a, 1);
        assert!(t.reclaim(id).is_none(), "reclaimed once");
        drop(a);
        assert_eq!(*t.claim(0).unwrap(), 1, "free again");
        assert!(
            t.claim(2).is_none() && t.reclaim(7).is_none(),
            "out of range"
        );
    }

    #[test]
    fn index_of_finds_slots() {
        let t = SlotTable::new(3, |i| i as u64);
        for i in 0..3 {
            let s = t.claim(i).unwrap();
            let p: *const u64 = &*s;
            assert_eq!(t.index_of(p), Some(i));
        }
        let x = 5u64;
        assert_eq!(t.index_of(&x), None);
    }

    /// Racing reclaims of one lent id: exactly one wins each round.
    #[test]
    fn racing_reclaims_one_wins() {
        let t = Arc::new(SlotTable::new(1, |_| 0u64));
        for round in 1..=50u64 {
            let id = t.claim(0).unwrap().lend();
            let hs: Vec<_> = (0..3)
                .map(|_| {
                    let t = t.clone();
                    std::thread::spawn(move || t.reclaim(id).map(|mut s| *s += 1).is_some())
                })
                .collect();
            let wins = hs.into_iter().map(|h| h.join().unwrap());
            assert_eq!(wins.filter(|w| *w).count(), 1);
            assert_eq!(*t.claim(0).unwrap(), round, "freed by the winner");
        }
    }
}
