//! Unit tests of each operation and error.

use super::*;
use alloc::format;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

const Q: u64 = 4096;
const BASE: u64 = 0x1000_0000;

use AllocPolicy::{BestFit, InstantFit};

fn arena(quanta: u64, tags: usize) -> Vmem {
    let vm = Vmem::new(BASE, quanta * Q, Q, tags).unwrap();
    vm.check_invariants().unwrap();
    vm
}

fn segs(vm: &Vmem) -> Vec<(u64, u64, SegmentKind)> {
    vm.segments().map(|s| (s.start, s.size, s.kind)).collect()
}

fn ok(vm: &Vmem) {
    if let Err(e) = vm.check_invariants() {
        panic!("{e}\n{:#?}", segs(vm));
    }
}

/// Allocates the listed quanta counts back to back from the start of a
/// fresh span, then frees the ones marked `true`, leaving holes.
fn holes(pattern: &[(u64, bool)], tags: usize) -> (Vmem, Vec<u64>) {
    let total: u64 = pattern.iter().map(|p| p.0).sum();
    let mut vm = arena(total, tags);
    let addrs: Vec<u64> = pattern
        .iter()
        .map(|&(q, _)| vm.alloc(q * Q, BestFit).unwrap())
        .collect();
    for (i, &(q, free)) in pattern.iter().enumerate() {
        if free {
            vm.free(addrs[i], q * Q).unwrap();
        }
    }
    ok(&vm);
    (vm, addrs)
}

#[test]
fn new_validates_arguments() {
    assert_eq!(
        Vmem::new(0, Q, 0, 8).unwrap_err(),
        VmemError::InvalidQuantum { quantum: 0 }
    );
    assert_eq!(
        Vmem::new(0, Q, 3 * 1024, 8).unwrap_err(),
        VmemError::InvalidQuantum { quantum: 3 * 1024 }
    );
    assert_eq!(
        Vmem::new(0, Q, Q, Vmem::MAX_TAGS + 1).unwrap_err(),
        VmemError::TooManyTags {
            requested: Vmem::MAX_TAGS + 1,
            limit: Vmem::MAX_TAGS
        }
    );
    // The initial span needs two tags.
    assert_eq!(
        Vmem::new(0, Q, Q, 1).unwrap_err(),
        VmemError::OutOfTags {
            needed: 2,
            available: 1,
            capacity: 1
        }
    );
    assert_eq!(
        Vmem::new(1, Q, Q, 8).unwrap_err(),
        VmemError::MisalignedSpan {
            base: 1,
            size: Q,
            quantum: Q
        }
    );
}

#[test]
fn empty_arena() {
    let mut vm = Vmem::new(12345, 0, 1, 0).unwrap();
    ok(&vm);
    assert_eq!(vm.alloc(1, BestFit), Err(VmemError::NoSpace { size: 1 }));
    assert_eq!(vm.alloc(1, InstantFit), Err(VmemError::NoSpace { size: 1 }));
    let st = vm.stats();
    assert_eq!((st.spans, st.span_bytes, st.largest_free), (0, 0, 0));
    assert_eq!((st.tags_in_use, st.tag_capacity), (0, 0));
    assert!(!vm.contains(12345));
    // No tags at all: adding a span fails cleanly.
    assert_eq!(
        vm.add(0, 16),
        Err(VmemError::OutOfTags {
            needed: 2,
            available: 0,
            capacity: 0
        })
    );
    ok(&vm);
}

#[test]
fn initial_stats() {
    let vm = arena(16, 8);
    assert_eq!(
        vm.stats(),
        Stats {
            spans: 1,
            span_bytes: 16 * Q,
            in_use_bytes: 0,
            free_bytes: 16 * Q,
            allocated_segments: 0,
            free_segments: 1,
            largest_free: 16 * Q,
            tags_in_use: 2,
            tag_capacity: 8,
        }
    );
    assert_eq!(
        segs(&vm),
        vec![
            (BASE, 16 * Q, SegmentKind::Span),
            (BASE, 16 * Q, SegmentKind::Free)
        ]
    );
    assert_eq!(vm.quantum(), Q);
}

#[test]
fn alloc_rounds_to_quantum_and_frees() {
    let mut vm = arena(16, 8);
    let a = vm.alloc(1, BestFit).unwrap();
    assert_eq!(a, BASE);
    assert_eq!(vm.allocated_size(a), Some(Q));
    let b = vm.alloc(Q + 1, InstantFit).unwrap();
    assert_eq!(b, BASE + Q);
    assert_eq!(vm.allocated_size(b), Some(2 * Q));
    ok(&vm);
    let st = vm.stats();
    assert_eq!(st.in_use_bytes, 3 * Q);
    assert_eq!(st.free_bytes, 13 * Q);
    assert_eq!(st.allocated_segments, 2);
    assert_eq!(st.largest_free, 13 * Q);
    // Rounded sizes free the allocation.
    vm.free(a, 100).unwrap();
    vm.free(b, 2 * Q).unwrap();
    ok(&vm);
    assert_eq!(vm.stats(), arena(16, 8).stats());
}

#[test]
fn alloc_size_errors() {
    let mut vm = arena(16, 8);
    assert_eq!(vm.alloc(0, BestFit), Err(VmemError::ZeroSize));
    assert_eq!(
        vm.alloc(u64::MAX, InstantFit),
        Err(VmemError::SizeOverflow { size: u64::MAX })
    );
    assert_eq!(
        vm.alloc(17 * Q, BestFit),
        Err(VmemError::NoSpace { size: 17 * Q })
    );
    assert_eq!(vm.stats(), arena(16, 8).stats());
}

#[test]
fn exhaust_and_refill() {
    for policy in [InstantFit, BestFit] {
        let mut vm = arena(8, 32);
        let addrs: Vec<u64> = (0..8).map(|_| vm.alloc(Q, policy).unwrap()).collect();
        ok(&vm);
        assert_eq!(vm.alloc(Q, policy), Err(VmemError::NoSpace { size: Q }));
        let mut sorted = addrs.clone();
        sorted.sort();
        assert_eq!(sorted, (0..8).map(|i| BASE + i * Q).collect::<Vec<_>>());
        assert_eq!(vm.stats().largest_free, 0);
        for a in addrs.iter().rev() {
            vm.free(*a, Q).unwrap();
            ok(&vm);
        }
        assert_eq!(segs(&vm), segs(&arena(8, 32)));
    }
}

#[test]
fn free_errors_change_nothing() {
    let mut vm = arena(16, 8);
    let a = vm.alloc(2 * Q, BestFit).unwrap();
    let before = segs(&vm);
    let stats = vm.stats();
    assert_eq!(
        vm.free(a + Q, Q),
        Err(VmemError::NotAllocated { addr: a + Q })
    );
    assert_eq!(
        vm.free(BASE + 8 * Q, Q),
        Err(VmemError::NotAllocated { addr: BASE + 8 * Q })
    );
    assert_eq!(
        vm.free(a, Q),
        Err(VmemError::SizeMismatch {
            addr: a,
            size: Q,
            allocated: 2 * Q
        })
    );
    assert_eq!(
        vm.free(a, 0),
        Err(VmemError::SizeMismatch {
            addr: a,
            size: 0,
            allocated: 2 * Q
        })
    );
    assert_eq!(
        vm.free(a, u64::MAX),
        Err(VmemError::SizeMismatch {
            addr: a,
            size: u64::MAX,
            allocated: 2 * Q
        })
    );
    assert_eq!(segs(&vm), before);
    assert_eq!(vm.stats(), stats);
    ok(&vm);
    vm.free(a, 2 * Q).unwrap();
    // Double free.
    assert_eq!(vm.free(a, 2 * Q), Err(VmemError::NotAllocated { addr: a }));
    ok(&vm);
}

#[test]
fn coalesces_with_both_neighbours() {
    use SegmentKind::*;
    let mut vm = arena(16, 16);
    let a = vm.alloc(Q, BestFit).unwrap();
    let b = vm.alloc(Q, BestFit).unwrap();
    let c = vm.alloc(Q, BestFit).unwrap();
    vm.free(b, Q).unwrap();
    ok(&vm);
    assert_eq!(
        segs(&vm),
        vec![
            (BASE, 16 * Q, Span),
            (a, Q, Allocated),
            (b, Q, Free),
            (c, Q, Allocated),
            (c + Q, 13 * Q, Free),
        ]
    );
    vm.free(a, Q).unwrap(); // merges with the next (b)
    ok(&vm);
    assert_eq!(
        segs(&vm),
        vec![
            (BASE, 16 * Q, Span),
            (a, 2 * Q, Free),
            (c, Q, Allocated),
            (c + Q, 13 * Q, Free),
        ]
    );
    assert_eq!(vm.stats().tags_in_use, 4);
    vm.free(c, Q).unwrap(); // merges with both
    ok(&vm);
    assert_eq!(segs(&vm), vec![(BASE, 16 * Q, Span), (BASE, 16 * Q, Free)]);
    assert_eq!(vm.stats().tags_in_use, 2);
}

#[test]
fn spans_do_not_coalesce() {
    use SegmentKind::*;
    let mut vm = arena(4, 16);
    // Adjacent span after, and one before with a gap.
    vm.add(BASE + 4 * Q, 4 * Q).unwrap();
    vm.add(BASE - 8 * Q, 2 * Q).unwrap();
    ok(&vm);
    assert_eq!(vm.stats().spans, 3);
    assert_eq!(vm.stats().largest_free, 4 * Q);
    // 8 contiguous free quanta exist, but across two spans.
    assert_eq!(
        vm.alloc(5 * Q, BestFit),
        Err(VmemError::NoSpace { size: 5 * Q })
    );
    let a = vm.alloc(4 * Q, BestFit).unwrap();
    let b = vm.alloc(4 * Q, InstantFit).unwrap();
    let c = vm.alloc(2 * Q, InstantFit).unwrap();
    assert_eq!(c, BASE - 8 * Q);
    ok(&vm);
    for (x, n) in [(a, 4), (b, 4), (c, 2)] {
        vm.free(x, n * Q).unwrap();
    }
    ok(&vm);
    assert_eq!(
        segs(&vm),
        vec![
            (BASE - 8 * Q, 2 * Q, Span),
            (BASE - 8 * Q, 2 * Q, Free),
            (BASE, 4 * Q, Span),
            (BASE, 4 * Q, Free),
            (BASE + 4 * Q, 4 * Q, Span),
            (BASE + 4 * Q, 4 * Q, Free),
        ]
    );
}

#[test]
fn add_errors() {
    let mut vm = arena(4, 16);
    vm.add(BASE + 8 * Q, 4 * Q).unwrap();
    let before = segs(&vm);
    assert_eq!(vm.add(0, 0), Err(VmemError::ZeroSize));
    assert_eq!(
        vm.add(Q / 2, Q),
        Err(VmemError::MisalignedSpan {
            base: Q / 2,
            size: Q,
            quantum: Q
        })
    );
    assert_eq!(
        vm.add(0, Q + 1),
        Err(VmemError::MisalignedSpan {
            base: 0,
            size: Q + 1,
            quantum: Q
        })
    );
    let top = u64::MAX - Q + 1;
    assert_eq!(
        vm.add(top, Q),
        Err(VmemError::SpanOverflow { base: top, size: Q })
    );
    // Overlaps the span before it, the one after it, and one it contains.
    for (base, size, existing) in [
        (BASE + 3 * Q, 2 * Q, BASE),
        (BASE + 6 * Q, 3 * Q, BASE + 8 * Q),
        (BASE - Q, 20 * Q, BASE),
        (BASE + 9 * Q, Q, BASE + 8 * Q),
    ] {
        match vm.add(base, size) {
            Err(VmemError::SpanOverlap {
                base: b,
                size: s,
                existing_base,
                existing_size: _,
            }) => assert_eq!((b, s, existing_base), (base, size, existing)),
            other => panic!("add({base:#x}, {size:#x}) = {other:?}"),
        }
    }
    assert_eq!(segs(&vm), before);
    ok(&vm);
    // Fills the gap exactly.
    vm.add(BASE + 4 * Q, 4 * Q).unwrap();
    ok(&vm);
    assert_eq!(vm.stats().span_bytes, 12 * Q);
}

#[test]
fn queries() {
    let mut vm = arena(8, 16);
    let a = vm.alloc(2 * Q, BestFit).unwrap();
    assert!(vm.contains(BASE) && vm.contains(BASE + 8 * Q - 1));
    assert!(!vm.contains(BASE - 1) && !vm.contains(BASE + 8 * Q));
    assert!(vm.is_allocated(a) && vm.is_allocated(a + 2 * Q - 1));
    assert!(!vm.is_allocated(a + 2 * Q) && !vm.is_allocated(BASE - 1));
    assert_eq!(vm.allocated_size(a), Some(2 * Q));
    assert_eq!(vm.allocated_size(a + Q), None);
    assert!(format!("{vm:?}").contains("in_use_bytes: 8192"));
}

#[test]
fn instant_fit_takes_a_guaranteed_list_best_fit_the_smallest() {
    // Holes of 3 and 8 quanta; 3 is on list 1, 8 on list 3.
    let pattern = [(3, true), (1, false), (8, true), (1, false)];
    let (mut vm, addrs) = holes(&pattern, 32);
    // Instant fit for 3 quanta only looks at lists >= ceil(log2 3) = 2.
    assert_eq!(vm.alloc(3 * Q, InstantFit), Ok(addrs[2]));
    vm.free(addrs[2], 3 * Q).unwrap();
    ok(&vm);
    assert_eq!(vm.alloc(3 * Q, BestFit), Ok(addrs[0]));
    ok(&vm);
}

#[test]
fn instant_fit_falls_back_to_the_lower_list() {
    // Only holes of 3 quanta (list 1, below ceil(log2 3) = 2).
    let pattern = [(3, true), (1, false), (3, true), (1, false)];
    let (mut vm, addrs) = holes(&pattern, 32);
    let a = vm.alloc(3 * Q, InstantFit).unwrap();
    assert!(a == addrs[0] || a == addrs[2]);
    ok(&vm);
    assert_eq!(
        vm.alloc(4 * Q, InstantFit),
        Err(VmemError::NoSpace { size: 4 * Q })
    );
}

#[test]
fn best_fit_is_smallest_within_a_list() {
    // Holes of 7, 5 and 6 quanta, all on list 2.
    let pattern = [
        (7, true),
        (1, false),
        (5, true),
        (1, false),
        (6, true),
        (1, false),
    ];
    let (mut vm, addrs) = holes(&pattern, 32);
    assert_eq!(vm.alloc(5 * Q, BestFit), Ok(addrs[2]));
    assert_eq!(vm.alloc(5 * Q, BestFit), Ok(addrs[4]));
    assert_eq!(vm.alloc(5 * Q, BestFit), Ok(addrs[0]));
    assert_eq!(vm.stats().free_segments, 2);
    ok(&vm);
}

#[test]
fn xalloc_alignment_and_phase() {
    for policy in [InstantFit, BestFit] {
        let mut vm = arena(64, 32);
        vm.alloc(Q, policy).unwrap(); // BASE is 64K-aligned; misalign the rest.
        let c = Constraints {
            align: 16 * Q,
            ..Constraints::NONE
        };
        let a = vm.xalloc(Q, c, policy).unwrap();
        assert_eq!(a, BASE + 16 * Q);
        let c = Constraints {
            align: 16 * Q,
            phase: 3 * Q,
            ..Constraints::NONE
        };
        let b = vm.xalloc(2 * Q, c, policy).unwrap();
        assert_eq!(b % (16 * Q), 3 * Q);
        assert_eq!(b, BASE + 3 * Q);
        ok(&vm);
    }
}

#[test]
fn xalloc_nocross() {
    let mut vm = arena(64, 32);
    vm.alloc(6 * Q, BestFit).unwrap();
    let c = Constraints {
        nocross: 8 * Q,
        ..Constraints::NONE
    };
    // [6, 10) would cross 8; the first range that does not is [8, 12).
    assert_eq!(vm.xalloc(4 * Q, c, BestFit), Ok(BASE + 8 * Q));
    // Now [6, 8) is free: 2 quanta fit without crossing.
    assert_eq!(vm.xalloc(2 * Q, c, InstantFit), Ok(BASE + 6 * Q));
    // Alignment above nocross with a phase that always crosses.
    let c = Constraints {
        align: 16 * Q,
        phase: 6 * Q,
        nocross: 8 * Q,
        ..Constraints::NONE
    };
    assert_eq!(
        vm.xalloc(4 * Q, c, BestFit),
        Err(VmemError::NoSpace { size: 4 * Q })
    );
    // Phase and nocross combined: addr % 4Q == Q and no crossing of 8Q.
    let c = Constraints {
        align: 4 * Q,
        phase: Q,
        nocross: 8 * Q,
        ..Constraints::NONE
    };
    let a = vm.xalloc(3 * Q, c, BestFit).unwrap();
    assert_eq!(a, BASE + 13 * Q);
    ok(&vm);
}

#[test]
fn xalloc_address_range_is_inclusive() {
    let mut vm = arena(64, 32);
    let c = Constraints {
        min_addr: BASE + 10 * Q,
        max_addr: BASE + 14 * Q - 1,
        ..Constraints::NONE
    };
    assert_eq!(vm.xalloc(4 * Q, c, BestFit), Ok(BASE + 10 * Q));
    assert_eq!(
        vm.xalloc(Q, c, InstantFit),
        Err(VmemError::NoSpace { size: Q })
    );
    // Unaligned bounds: the lowest quantum-aligned address at or above.
    let c = Constraints {
        min_addr: BASE + 20 * Q + 1,
        max_addr: BASE + 23 * Q - 2,
        ..Constraints::NONE
    };
    assert_eq!(vm.xalloc(Q, c, InstantFit), Ok(BASE + 21 * Q));
    assert_eq!(
        vm.xalloc(Q, c, InstantFit),
        Err(VmemError::NoSpace { size: Q })
    );
    // A range entirely below the arena.
    let c = Constraints {
        max_addr: BASE - 1,
        ..Constraints::NONE
    };
    assert_eq!(
        vm.xalloc(Q, c, BestFit),
        Err(VmemError::NoSpace { size: Q })
    );
    ok(&vm);
}

#[test]
fn xalloc_argument_errors() {
    let mut vm = arena(64, 32);
    let before = segs(&vm);
    let cases = [
        (
            Q,
            Constraints {
                align: 3 * Q,
                ..Constraints::NONE
            },
            VmemError::InvalidAlign {
                align: 3 * Q,
                quantum: Q,
            },
        ),
        (
            Q,
            Constraints {
                align: Q / 2,
                ..Constraints::NONE
            },
            VmemError::InvalidAlign {
                align: Q / 2,
                quantum: Q,
            },
        ),
        (
            Q,
            Constraints {
                phase: Q,
                ..Constraints::NONE
            },
            VmemError::InvalidPhase { phase: Q, align: Q },
        ),
        (
            Q,
            Constraints {
                align: 4 * Q,
                phase: 1,
                ..Constraints::NONE
            },
            VmemError::InvalidPhase {
                phase: 1,
                align: 4 * Q,
            },
        ),
        (
            3 * Q,
            Constraints {
                nocross: 2 * Q,
                ..Constraints::NONE
            },
            VmemError::InvalidNocross {
                nocross: 2 * Q,
                size: 3 * Q,
            },
        ),
        (
            Q,
            Constraints {
                nocross: 3 * Q,
                ..Constraints::NONE
            },
            VmemError::InvalidNocross {
                nocross: 3 * Q,
                size: Q,
            },
        ),
        (
            Q,
            Constraints {
                min_addr: 2,
                max_addr: 1,
                ..Constraints::NONE
            },
            VmemError::EmptyAddressRange {
                min_addr: 2,
                max_addr: 1,
            },
        ),
    ];
    for (size, c, e) in cases {
        assert_eq!(vm.xalloc(size, c, BestFit), Err(e));
        assert_eq!(vm.xalloc(size, c, InstantFit), Err(e));
    }
    assert_eq!(
        vm.xalloc(0, Constraints::default(), BestFit),
        Err(VmemError::ZeroSize)
    );
    assert_eq!(segs(&vm), before);
    ok(&vm);
}

#[test]
fn top_of_address_space() {
    // The highest span allowed ends at u64::MAX (exclusive), which is not
    // quantum-aligned, so with Q = 4096 it ends at 2^64 - Q.
    let base = 0u64.wrapping_sub(17 * Q);
    let mut vm = Vmem::new(base, 16 * Q, Q, 64).unwrap();
    let c = Constraints {
        align: 1 << 63,
        ..Constraints::NONE
    };
    assert_eq!(
        vm.xalloc(Q, c, BestFit),
        Err(VmemError::NoSpace { size: Q })
    );
    let c = Constraints {
        min_addr: u64::MAX - 3 * Q,
        ..Constraints::NONE
    };
    assert_eq!(vm.xalloc(2 * Q, c, BestFit), Ok(base + 14 * Q));
    let c = Constraints {
        align: 8 * Q,
        nocross: 8 * Q,
        ..Constraints::NONE
    };
    assert_eq!(vm.xalloc(8 * Q, c, InstantFit), Ok(base + Q));
    let all: Vec<u64> = core::iter::from_fn(|| vm.alloc(Q, InstantFit).ok()).collect();
    assert_eq!(all.len(), 6);
    assert_eq!(vm.stats().free_bytes, 0);
    ok(&vm);
    // Quantum 1 and a span ending right at u64::MAX.
    let mut vm = Vmem::new(u64::MAX - 8, 8, 1, 16).unwrap();
    assert_eq!(vm.alloc(8, BestFit), Ok(u64::MAX - 8));
    vm.free(u64::MAX - 8, 8).unwrap();
    let c = Constraints {
        align: 1 << 63,
        phase: (1 << 63) - 2,
        ..Constraints::NONE
    };
    assert_eq!(vm.xalloc(1, c, BestFit), Ok(u64::MAX - 1));
    assert_eq!(
        vm.xalloc(2, c, BestFit),
        Err(VmemError::NoSpace { size: 2 })
    );
    ok(&vm);
}

#[test]
fn tag_accounting_is_tight() {
    // Carve A allocations from the middle of free segments: each takes two
    // tags, reaching the 2 * (spans + allocations) bound exactly.
    const A: usize = 8;
    let cap = Vmem::tags_needed(1, A);
    assert_eq!(cap, 18);
    let mut vm = Vmem::new(BASE, 64 * Q, Q, cap).unwrap();
    let c = Constraints {
        align: 8 * Q,
        phase: 2 * Q,
        ..Constraints::NONE
    };
    for i in 0..A as u64 {
        assert_eq!(vm.xalloc(Q, c, BestFit), Ok(BASE + i * 8 * Q + 2 * Q));
    }
    ok(&vm);
    let st = vm.stats();
    assert_eq!(st.tags_in_use, cap);
    assert_eq!((st.allocated_segments, st.free_segments), (A, A + 1));
    // No tags left: only an exact fit could succeed; there is none.
    assert_eq!(
        vm.alloc(Q, BestFit),
        Err(VmemError::OutOfTags {
            needed: 1,
            available: 0,
            capacity: cap
        })
    );
    assert_eq!(
        vm.add(0, Q),
        Err(VmemError::OutOfTags {
            needed: 2,
            available: 0,
            capacity: cap
        })
    );
    ok(&vm);
    // Frees never need tags.
    vm.free(BASE + 2 * Q, Q).unwrap();
    ok(&vm);
    assert_eq!(vm.stats().tags_in_use, cap - 2);
}

#[test]
fn short_of_tags_prefers_cheap_placements() {
    // Holes: [0, 2) and [3, 16).
    let pattern = [(2, true), (1, false), (13, true)];
    let (mut vm, _) = holes(&pattern, 5);
    assert_eq!(vm.stats().tags_in_use, 4);
    // One tag left. Aligned to 4 with phase 1, the lowest place in [3, 16)
    // is 5, which would leave gaps on both sides (2 tags); 13, flush with
    // the end, needs one.
    let c = Constraints {
        align: 4 * Q,
        phase: Q,
        ..Constraints::NONE
    };
    for policy in [BestFit, InstantFit] {
        let a = vm.xalloc(3 * Q, c, policy).unwrap();
        assert_eq!(a, BASE + 13 * Q);
        ok(&vm);
        vm.free(a, 3 * Q).unwrap();
    }
    // A placement that needs two tags and has no cheaper alternative.
    let c = Constraints {
        align: 4 * Q,
        phase: Q,
        ..Constraints::NONE
    };
    assert_eq!(
        vm.xalloc(2 * Q, c, BestFit),
        Err(VmemError::OutOfTags {
            needed: 2,
            available: 1,
            capacity: 5
        })
    );
    // Exact fit takes no tag: fill the [0, 2) hole, then the last tag goes
    // to a carve from the start of [3, 16).
    assert_eq!(vm.alloc(2 * Q, BestFit), Ok(BASE));
    assert_eq!(vm.stats().tags_in_use, 4);
    assert_eq!(vm.alloc(Q, BestFit), Ok(BASE + 3 * Q));
    assert_eq!(vm.stats().tags_in_use, 5);
    ok(&vm);
}

#[test]
fn hash_chains_survive_collisions() {
    let mut vm = arena(64, 128);
    // Force every allocation into one bucket (the hash is empty).
    vm.hash_bits = 0;
    let addrs: Vec<u64> = (0..20).map(|_| vm.alloc(Q, InstantFit).unwrap()).collect();
    ok(&vm);
    // Remove from the middle, the head and the tail of the chain.
    for i in [
        10, 19, 0, 5, 11, 1, 18, 2, 3, 4, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17,
    ] {
        assert_eq!(vm.allocated_size(addrs[i]), Some(Q));
        vm.free(addrs[i], Q).unwrap();
        assert_eq!(vm.allocated_size(addrs[i]), None);
        ok(&vm);
    }
    assert_eq!(vm.stats().in_use_bytes, 0);
}

#[test]
fn checker_detects_corruption() {
    let (vm, addrs) = holes(&[(2, false), (2, true), (2, false), (10, true)], 32);
    let corrupt = |f: &dyn Fn(&mut Vmem)| {
        let mut bad = Vmem::new(BASE, 16 * Q, Q, 32).unwrap();
        for &(a, n) in &[(addrs[0], 2), (addrs[2], 2)] {
            assert_eq!(
                bad.xalloc(
                    n * Q,
                    Constraints {
                        min_addr: a,
                        ..Constraints::NONE
                    },
                    BestFit
                ),
                Ok(a)
            );
        }
        assert_eq!(segs(&bad), segs(&vm));
        bad.check_invariants().unwrap();
        f(&mut bad);
        bad.check_invariants().unwrap_err()
    };
    let first = |v: &Vmem| v.hash_find(addrs[0]).unwrap() as usize;
    let e = corrupt(&|v| {
        let t = first(v);
        v.tags[t].kind = Kind::Free;
    });
    assert!(e.what.contains("free"), "{e}");
    let e = corrupt(&|v| v.in_use_bytes += Q);
    assert_eq!(e.what, "accounting counters");
    let e = corrupt(&|v| v.free_map |= 1 << 40);
    assert_eq!(e.what, "free bitmap");
    let e = corrupt(&|v| {
        let t = first(v);
        v.tags[t].size = Q;
    });
    assert!(e.what.contains("contiguous"), "{e}");
    let e = corrupt(&|v| {
        // Mark the middle allocation free and list it without coalescing.
        let m = v.hash_find(addrs[2]).unwrap();
        v.hash_remove(m);
        v.tags[m as usize].kind = Kind::Free;
        v.freelist_insert(m);
        v.allocated_segments -= 1;
        v.free_segments += 1;
        v.in_use_bytes -= 2 * Q;
    });
    assert_eq!(e.what, "adjacent free segments not coalesced");
    let e = corrupt(&|v| v.pool = NIL);
    assert_eq!(e.what, "tags leaked");
}

#[test]
fn errors_display_their_fields() {
    let cases = [
        (VmemError::InvalidQuantum { quantum: 3 }, "0x3"),
        (
            VmemError::OutOfTags {
                needed: 2,
                available: 1,
                capacity: 9,
            },
            "2 needed, 1 of 9 left",
        ),
        (
            VmemError::SizeMismatch {
                addr: 0x1000,
                size: 0x2000,
                allocated: 0x3000,
            },
            "free of 0x1000 with size 0x2000, but 0x3000",
        ),
        (
            VmemError::SpanOverlap {
                base: 0x10,
                size: 0x20,
                existing_base: 0x18,
                existing_size: 0x8,
            },
            "[0x10, +0x20) overlaps span [0x18, +0x8)",
        ),
        (VmemError::NotAllocated { addr: 0xabc }, "0xabc"),
        (VmemError::NoSpace { size: 0x5000 }, "0x5000"),
    ];
    for (e, want) in cases {
        let s = e.to_string();
        assert!(s.contains(want), "{s:?} lacks {want:?}");
    }
}
