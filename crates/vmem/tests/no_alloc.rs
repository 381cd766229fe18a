//! The no-allocation guarantee: after `Vmem::new`, no operation touches the
//! heap. A counting global allocator records every allocation made by this
//! thread while armed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vmem::{AllocPolicy, Constraints, Vmem, VmemError};

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

fn note() {
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: forwards every call unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the bookkeeping touches only const-initialised
// thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note();
        // SAFETY: `ptr` came from `System.alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap operations made by `f` on this thread.
fn heap_ops<R>(f: impl FnOnce() -> R) -> (usize, R) {
    COUNT.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (COUNT.with(Cell::get), r)
}

#[test]
fn counter_sees_allocations() {
    let (n, b) = heap_ops(|| std::hint::black_box(Box::new(7u64)));
    assert_eq!(*b, 7);
    assert!(n >= 1);
}

#[test]
fn no_heap_use_after_new() {
    const Q: u64 = 4096;
    let mut vm = Vmem::new(0x8000_0000, 1 << 30, Q, 4096).unwrap();
    let mut live = [(0u64, 0u64); 512];
    let (n, outcome) = heap_ops(|| -> Result<usize, VmemError> {
        let mut count = 0;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        vm.add(0x1_0000_0000, 1 << 20)?;
        for round in 0..20 {
            for slot in live.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if slot.1 != 0 && !seed.is_multiple_of(3) {
                    vm.free(slot.0, slot.1)?;
                    *slot = (0, 0);
                } else if slot.1 == 0 {
                    let size = (seed % 16 + 1) * Q;
                    let policy = if round % 2 == 0 {
                        AllocPolicy::InstantFit
                    } else {
                        AllocPolicy::BestFit
                    };
                    let c = Constraints {
                        align: Q << (seed % 5),
                        nocross: 1 << 20,
                        max_addr: 0xffff_ffff,
                        ..Constraints::NONE
                    };
                    let addr = if seed.is_multiple_of(4) {
                        vm.xalloc(size, c, policy)?
                    } else {
                        vm.alloc(size, policy)?
                    };
                    *slot = (addr, size);
                    count += 1;
                }
            }
            // Queries and failing calls must not allocate either.
            assert!(vm.contains(0x8000_0000));
            assert!(vm.stats().in_use_bytes > 0);
            assert!(vm.segments().count() > 2);
            let (a, size) = *live.iter().find(|s| s.1 != 0).unwrap();
            assert!(vm.is_allocated(a + size - 1) && vm.allocated_size(a) == Some(size));
            assert!(vm.alloc(1 << 40, AllocPolicy::BestFit).is_err());
            assert!(vm.free(1, Q).is_err());
            assert!(vm.add(0x8000_0000, Q).is_err());
            vm.check_invariants().unwrap();
        }
        for slot in live.iter().filter(|s| s.1 != 0) {
            assert_eq!(vm.allocated_size(slot.0), Some(slot.1));
            vm.free(slot.0, slot.1)?;
        }
        Ok(count)
    });
    let count = outcome.unwrap();
    assert!(count > 1000, "only {count} allocations");
    assert_eq!(n, 0, "{n} heap operations after Vmem::new");
    assert_eq!(vm.stats().in_use_bytes, 0);
}
