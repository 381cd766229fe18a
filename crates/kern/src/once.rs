//! A set-once cell that is `Sync` (asterinas' `spin::Once`, Tock's
//! `OptionalCell` made shareable), and a fixed-size registry of them.
//!
//! These two are how the kernel keeps per-boot state: the [`Kernel`]
//! owns a `Once` or a [`Registry`] for each thing set up after boot (the
//! buffer pool, the DMA tags, the callouts, the busdma and softclock
//! softints), so a teardown drops them all with the kernel and the next
//! boot starts empty, with no module static to clear by hand. This is the
//! one audited module for it: the `unsafe` of these cells is here and
//! nowhere else.
//!
//! [`Kernel`]: crate::kernel::Kernel
//!
//! An object that is shared (leaked to `'static`, captured by handlers)
//! before all of its fields are known, such as a driver whose softint
//! handle is only known once the softint is established with a closure that
//! refers back to the driver, keeps those fields in a [`Once`]: set once,
//! read lock-free ever after. Writing them through a `*mut` made from a
//! shared reference instead is undefined behaviour (Miri rejects it).
//!
//! [`FnHook`] is the one cell here that may change: an optional `fn()`
//! (the fault-injection hooks of `kmem` and the pools), replaced by whoever
//! sets it and called from inside an allocator, with no lock.
//!
//! # Contexts
//! [`Once::set`]: any context; it never blocks (a second, concurrent or
//! later, `set` fails and hands the value back). [`Once::get`]: any
//! context, including interrupt context; one acquire load. [`FnHook`]: any
//! context, one atomic access.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{
    AtomicPtr, AtomicU8, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};

const EMPTY: u8 = 0;
const BUSY: u8 = 1;
const READY: u8 = 2;

/// A value set at most once, then read by anyone (see the module docs).
pub struct Once<T> {
    state: AtomicU8,
    val: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once, by the one `set` that moved the state
// EMPTY -> BUSY, before the Release store of READY; readers hand out `&T`
// only after an Acquire load of READY. So `&Once<T>` shares `&T` between
// threads (needs `T: Sync`) and `set` moves a `T` in from any thread (needs
// `T: Send`).
unsafe impl<T: Send + Sync> Sync for Once<T> {}

impl<T> Default for Once<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Once<T> {
    /// An empty cell.
    pub const fn new() -> Self {
        Self {
            state: AtomicU8::new(EMPTY),
            val: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Set the value; `Err(v)` if it was set (or is being set) already.
    pub fn set(&self, v: T) -> Result<(), T> {
        if self
            .state
            .compare_exchange(EMPTY, BUSY, Acquire, Relaxed)
            .is_err()
        {
            return Err(v);
        }
        // SAFETY: the CAS above made us the only writer (state BUSY), and no
        // reader looks at the value before READY.
        unsafe { (*self.val.get()).write(v) };
        self.state.store(READY, Release);
        Ok(())
    }

    /// The value, if it has been set.
    #[inline]
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Acquire) == READY {
            // SAFETY: READY is stored (Release) only after the value was
            // written, and the value is never written again nor dropped
            // while `self` is borrowed.
            Some(unsafe { (*self.val.get()).assume_init_ref() })
        } else {
            None
        }
    }
}

impl<T> Drop for Once<T> {
    fn drop(&mut self) {
        if *self.state.get_mut() == READY {
            // SAFETY: READY means initialised; `&mut self` means no reader.
            unsafe { self.val.get_mut().assume_init_drop() };
        }
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for Once<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.get() {
            Some(v) => f.debug_tuple("Once").field(v).finish(),
            None => f.write_str("Once(<unset>)"),
        }
    }
}

/// An optional `fn()` that may be replaced at any time and is read
/// lock-free: a fault-injection hook (see the module docs).
pub struct FnHook(AtomicPtr<()>);

impl Default for FnHook {
    fn default() -> Self {
        Self::new()
    }
}

impl FnHook {
    /// No hook.
    pub const fn new() -> Self {
        Self(AtomicPtr::new(core::ptr::null_mut()))
    }

    /// Install `f`, or remove the hook with `None`.
    pub fn set(&self, f: Option<fn()>) {
        self.0
            .store(f.map_or(core::ptr::null_mut(), |f| f as *mut ()), Release);
    }

    /// The hook, if one is installed.
    #[inline]
    pub fn get(&self) -> Option<fn()> {
        let p = self.0.load(Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: the only non-null values stored are `fn()` pointers cast
        // to `*mut ()` by `set`; casting one back gives the same function.
        Some(unsafe { core::mem::transmute::<*mut (), fn()>(p) })
    }
}

impl core::fmt::Debug for FnHook {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("FnHook")
            .field(&self.0.load(Relaxed))
            .finish()
    }
}

/// A fixed-size, append-only table of values registered once each and
/// then read lock-free by anyone: the per-boot tables of the kernel
/// (every DMA tag, every callout). Registration never blocks and never
/// allocates; a full table refuses.
///
/// # Contexts
/// [`Registry::register`], [`Registry::get`], [`Registry::iter`]: any.
pub struct Registry<T, const N: usize> {
    slots: [Once<T>; N],
    next: AtomicUsize,
}

impl<T, const N: usize> Default for Registry<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> Registry<T, N> {
    /// An empty table.
    pub const fn new() -> Self {
        Self {
            slots: [const { Once::new() }; N],
            next: AtomicUsize::new(0),
        }
    }

    /// Add `v`; its index, or `Err(v)` if the table is full.
    pub fn register(&self, v: T) -> Result<usize, T> {
        let Ok(i) = self
            .next
            .fetch_update(AcqRel, Acquire, |n| (n < N).then_some(n + 1))
        else {
            return Err(v);
        };
        // Slot `i` was claimed by us alone, so this first set succeeds.
        self.slots[i].set(v).map(|()| i)
    }

    /// Entry `i`, if it is registered.
    pub fn get(&self, i: usize) -> Option<&T> {
        self.slots.get(i)?.get()
    }

    /// Every registered entry, in registration order (an entry being
    /// registered concurrently may or may not be seen).
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        let n = self.next.load(Acquire).min(N);
        self.slots[..n].iter().filter_map(Once::get)
    }

    /// Its capacity.
    pub const fn capacity(&self) -> usize {
        N
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::Once;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::vec::Vec;

    #[test]
    fn set_once_then_read() {
        let c = Once::new();
        assert!(c.get().is_none());
        assert_eq!(c.set(5u32), Ok(()));
        assert_eq!(c.set(6), Err(6));
        assert_eq!(c.get(), Some(&5));
    }

    #[test]
    fn drops_its_value_once() {
        struct D(Arc<AtomicUsize>);
        impl Drop for D {
            fn drop(&mut self) {
                self.0.fetch_add(1, SeqCst);
            }
        }
        let n = Arc::new(AtomicUsize::new(0));
        {
            let c = Once::new();
            assert!(c.set(D(n.clone())).is_ok());
            let refused = c.set(D(n.clone()));
            assert!(refused.is_err());
            drop(refused);
            assert_eq!(
                n.load(SeqCst),
                1,
                "the refused value is dropped by the caller"
            );
        }
        assert_eq!(n.load(SeqCst), 2, "the cell drops its value");
        drop(Once::<D>::new()); // an empty cell drops nothing
        assert_eq!(n.load(SeqCst), 2);
    }

    /// The pattern `Completer::attach` needs: a `'static` object shared with
    /// a closure before its handle field is set.
    #[test]
    fn shared_before_set() {
        struct Obj {
            handle: Once<u32>,
        }
        static OBJ: Obj = Obj {
            handle: Once::new(),
        };
        let o: &'static Obj = &OBJ;
        let reader = move || o.handle.get().copied();
        assert_eq!(reader(), None);
        o.handle.set(7).unwrap();
        assert_eq!(reader(), Some(7));
    }

    #[test]
    fn fn_hook_replaced_and_called() {
        use super::FnHook;
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        fn bump() {
            CALLS.fetch_add(1, SeqCst);
        }
        let h = FnHook::new();
        assert!(h.get().is_none());
        h.set(Some(bump));
        h.get().expect("installed")();
        h.set(None);
        assert!(h.get().is_none());
        assert_eq!(CALLS.load(SeqCst), 1);
    }

    #[test]
    fn racing_setters_one_wins() {
        for _ in 0..50 {
            let c = Arc::new(Once::new());
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let c = c.clone();
                    std::thread::spawn(move || c.set(i).is_ok())
                })
                .collect();
            let wins = hs
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|won| *won)
                .count();
            assert_eq!(wins, 1, "exactly one setter wins");
            let v = *c.get().unwrap();
            assert!(v < 4);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod registry_tests {
    use super::Registry;
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn registers_in_order_until_full() {
        let r: Registry<u32, 3> = Registry::new();
        assert_eq!(r.iter().count(), 0);
        assert_eq!(r.register(10), Ok(0));
        assert_eq!(r.register(11), Ok(1));
        assert_eq!(r.register(12), Ok(2));
        assert_eq!(r.register(13), Err(13), "a full table refuses");
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [10, 11, 12]);
        assert_eq!(r.get(1), Some(&11));
        assert_eq!(r.get(3), None);
    }

    #[test]
    fn concurrent_registrations_get_distinct_slots() {
        let r: Arc<Registry<usize, 64>> = Arc::new(Registry::new());
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    (0..20).filter(|i| r.register(t * 100 + i).is_ok()).count()
                })
            })
            .collect();
        let ok: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(ok, 64, "exactly the capacity is accepted");
        let mut all: Vec<usize> = r.iter().copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 64);
    }
}
