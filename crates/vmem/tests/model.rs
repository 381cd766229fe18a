//! Property tests: random sequences of `alloc`, `xalloc`, `free`, bad frees
//! and `add` against a reference model that keeps one flag per quantum of a
//! small window of address space and finds placements by brute force.
//!
//! After every operation the arena must equal the model exactly: the same
//! spans, allocated segments and maximally coalesced free runs, in address
//! order ([`Vmem::segments`]); [`Vmem::stats`] must match; and
//! `check_invariants` must pass. Every outcome is predicted:
//!
//! * argument errors (`InvalidNocross`, `EmptyAddressRange`, `SpanOverlap`);
//! * `NoSpace` exactly when no free run inside one span holds a placement
//!   that respects size, align, phase, nocross, min and max;
//! * `OutOfTags` exactly when placements exist but each needs more tags
//!   than are left (0 for an exact fit, 1 when flush with an end of the
//!   free run, 2 otherwise), with the minimum need reported;
//! * success otherwise, for both policies (instant fit never fails where a
//!   fit exists); the address must be a valid placement; for best fit it
//!   must be the lowest affordable placement in a smallest run that has
//!   one; the tags taken must equal that placement's need.
//!
//! At the end everything is freed, in random order, and the arena must be
//! back to exactly one free segment per span.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmem::{AllocPolicy, Constraints, Segment, SegmentKind, Stats, Vmem, VmemError};

/// Quanta in the model's window.
const W: u64 = 128;

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        quanta: u64,
        best: bool,
    },
    Xalloc {
        quanta: u64,
        align_k: u32,
        phase_sel: u64,
        nocross_k: Option<u32>,
        min_sel: Option<u64>,
        max_sel: Option<u64>,
        best: bool,
    },
    Free {
        pick: usize,
    },
    BadFree {
        pick: usize,
        how: u8,
    },
    Add {
        lo: u64,
        len: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..=24, any::<bool>()).prop_map(|(quanta, best)| Op::Alloc { quanta, best }),
        4 => (
            1u64..=16,
            0u32..=5,
            any::<u64>(),
            prop::option::of(0u32..=7),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
            any::<bool>(),
        )
            .prop_map(|(quanta, align_k, phase_sel, nocross_k, min_sel, max_sel, best)| {
                Op::Xalloc { quanta, align_k, phase_sel, nocross_k, min_sel, max_sel, best }
            }),
        5 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 0u8..3).prop_map(|(pick, how)| Op::BadFree { pick, how }),
        1 => (0..W, 1u64..=32).prop_map(|(lo, len)| Op::Add { lo, len }),
    ]
}

/// The reference model, in quanta relative to `origin`.
struct Model {
    origin: u64,
    q: u64,
    cap: usize,
    /// Spans `[lo, hi)`, sorted.
    spans: Vec<(u64, u64)>,
    /// Live allocations: start -> length.
    live: BTreeMap<u64, u64>,
    used: Vec<bool>,
}

impl Model {
    fn addr(&self, i: u64) -> u64 {
        self.origin + i * self.q
    }

    fn index(&self, addr: u64) -> u64 {
        (addr - self.origin) / self.q
    }

    /// Expected boundary tags, in address order.
    fn segments(&self) -> Vec<Segment> {
        let mut out = Vec::new();
        for &(lo, hi) in &self.spans {
            out.push(self.seg(lo, hi, SegmentKind::Span));
            let mut i = lo;
            while i < hi {
                if let Some(&len) = self.live.get(&i) {
                    out.push(self.seg(i, i + len, SegmentKind::Allocated));
                    i += len;
                } else {
                    let mut j = i;
                    while j < hi && !self.used[j as usize] {
                        j += 1;
                    }
                    assert!(j > i, "model: owned quantum {i} is not a live start");
                    out.push(self.seg(i, j, SegmentKind::Free));
                    i = j;
                }
            }
        }
        out
    }

    fn seg(&self, lo: u64, hi: u64, kind: SegmentKind) -> Segment {
        Segment {
            start: self.addr(lo),
            size: (hi - lo) * self.q,
            kind,
        }
    }

    fn free_runs(&self) -> Vec<(u64, u64)> {
        self.segments()
            .iter()
            .filter(|s| s.kind == SegmentKind::Free)
            .map(|s| (self.index(s.start), self.index(s.start) + s.size / self.q))
            .collect()
    }

    fn stats(&self) -> Stats {
        let segs = self.segments();
        let free: Vec<u64> = segs
            .iter()
            .filter(|s| s.kind == SegmentKind::Free)
            .map(|s| s.size)
            .collect();
        let span_bytes = self.spans.iter().map(|(l, h)| (h - l) * self.q).sum();
        let in_use = self.live.values().sum::<u64>() * self.q;
        Stats {
            spans: self.spans.len(),
            span_bytes,
            in_use_bytes: in_use,
            free_bytes: span_bytes - in_use,
            allocated_segments: self.live.len(),
            free_segments: free.len(),
            largest_free: free.iter().copied().max().unwrap_or(0),
            tags_in_use: segs.len(),
            tag_capacity: self.cap,
        }
    }

    fn tags_free(&self) -> usize {
        self.cap - self.segments().len()
    }

    fn fits(&self, s: u64, n: u64, c: &Constraints) -> bool {
        let addr = self.addr(s) as u128;
        let size = (n * self.q) as u128;
        let align = if c.align == 0 { self.q } else { c.align } as u128;
        let last = addr + size - 1;
        addr % align == c.phase as u128
            && (c.nocross == 0 || addr / c.nocross as u128 == last / c.nocross as u128)
            && addr >= c.min_addr as u128
            && last <= c.max_addr as u128
    }

    /// Every placement of `n` quanta: (run, start, tags needed).
    fn placements(&self, n: u64, c: &Constraints) -> Vec<((u64, u64), u64, usize)> {
        let mut out = Vec::new();
        for (a, e) in self.free_runs() {
            if e - a < n {
                continue;
            }
            for s in a..=e - n {
                if self.fits(s, n, c) {
                    let need = usize::from(s > a) + usize::from(s + n < e);
                    out.push(((a, e), s, need));
                }
            }
        }
        out
    }

    fn mark(&mut self, s: u64, n: u64, used: bool) {
        for i in s..s + n {
            assert_ne!(self.used[i as usize], used);
            self.used[i as usize] = used;
        }
    }
}

fn check(vm: &Vmem, m: &Model) {
    if let Err(e) = vm.check_invariants() {
        panic!("{e}");
    }
    let got: Vec<Segment> = vm.segments().collect();
    assert_eq!(got, m.segments());
    assert_eq!(vm.stats(), m.stats());
}

/// Runs `xalloc` and checks its outcome against the model's prediction.
fn do_alloc(vm: &mut Vmem, m: &mut Model, n: u64, c: Constraints, policy: AllocPolicy) {
    let size = n * m.q;
    let tags_before = vm.stats().tags_in_use;
    let got = vm.xalloc(size, c, policy);
    if c.nocross != 0 && c.nocross < size {
        assert_eq!(
            got,
            Err(VmemError::InvalidNocross {
                nocross: c.nocross,
                size
            })
        );
        return;
    }
    if c.min_addr > c.max_addr {
        assert_eq!(
            got,
            Err(VmemError::EmptyAddressRange {
                min_addr: c.min_addr,
                max_addr: c.max_addr
            })
        );
        return;
    }
    let all = m.placements(n, &c);
    let avail = m.tags_free();
    let Some(min_need) = all.iter().map(|p| p.2).min() else {
        assert_eq!(got, Err(VmemError::NoSpace { size }), "model has no fit");
        return;
    };
    if min_need > avail {
        assert_eq!(
            got,
            Err(VmemError::OutOfTags {
                needed: min_need,
                available: avail,
                capacity: m.cap
            })
        );
        return;
    }
    let addr = match got {
        Ok(a) => a,
        Err(e) => panic!("{policy:?} of {n} quanta under {c:?} failed ({e}) but the model fits"),
    };
    let affordable: Vec<_> = all.into_iter().filter(|p| p.2 <= avail).collect();
    let s = m.index(addr);
    assert_eq!(m.addr(s), addr, "result not quantum-aligned in the window");
    let &(_, _, need) = affordable
        .iter()
        .find(|p| p.1 == s)
        .unwrap_or_else(|| panic!("{addr:#x} is not an affordable placement"));
    if policy == AllocPolicy::BestFit {
        let smallest = affordable.iter().map(|p| p.0.1 - p.0.0).min().unwrap();
        let mut best: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        for &(run, start, _) in affordable.iter().filter(|p| p.0.1 - p.0.0 == smallest) {
            best.entry(run).or_insert(start); // placements come lowest first
        }
        assert!(
            best.values().any(|&b| b == s),
            "best fit chose {s}, expected one of {best:?}"
        );
    }
    assert_eq!(vm.stats().tags_in_use - tags_before, need);
    assert_eq!(vm.allocated_size(addr), Some(size));
    m.mark(s, n, true);
    m.live.insert(s, n);
}

fn do_free(vm: &mut Vmem, m: &mut Model, pick: usize) {
    let (&s, &n) = m.live.iter().nth(pick % m.live.len()).unwrap();
    let tags_before = vm.stats().tags_in_use;
    assert_eq!(vm.free(m.addr(s), n * m.q), Ok(()));
    // Coalescing frees one tag per free neighbour.
    let neighbours = [s.wrapping_sub(1), s + n]
        .iter()
        .filter(|&&i| {
            i < W
                && !m.used[i as usize]
                && m.spans
                    .iter()
                    .any(|&(lo, hi)| lo <= s && s < hi && lo <= i && i < hi)
        })
        .count();
    assert_eq!(tags_before - vm.stats().tags_in_use, neighbours);
    m.mark(s, n, false);
    m.live.remove(&s);
    assert!(!vm.is_allocated(m.addr(s)));
}

fn do_bad_free(vm: &mut Vmem, m: &Model, pick: usize, how: u8) {
    let live: Vec<(u64, u64)> = m.live.iter().map(|(&s, &n)| (s, n)).collect();
    match how {
        0 if !live.is_empty() => {
            let (s, n) = live[pick % live.len()];
            let (addr, allocated) = (m.addr(s), n * m.q);
            let size = if pick.is_multiple_of(2) || n == 1 {
                allocated + m.q
            } else {
                allocated - m.q
            };
            assert_eq!(
                vm.free(addr, size),
                Err(VmemError::SizeMismatch {
                    addr,
                    size,
                    allocated
                })
            );
        }
        1 if m.q > 1 => {
            let addr = m.addr(pick as u64 % W) + 1;
            assert_eq!(vm.free(addr, m.q), Err(VmemError::NotAllocated { addr }));
        }
        _ => {
            let i = pick as u64 % W;
            let addr = m.addr(i);
            match m.live.get(&i) {
                Some(&n) => assert_eq!(
                    vm.free(addr, 2 * n * m.q),
                    Err(VmemError::SizeMismatch {
                        addr,
                        size: 2 * n * m.q,
                        allocated: n * m.q
                    })
                ),
                None => assert_eq!(vm.free(addr, m.q), Err(VmemError::NotAllocated { addr })),
            }
        }
    }
}

fn do_add(vm: &mut Vmem, m: &mut Model, lo: u64, len: u64) {
    let hi = (lo + len).min(W);
    let (base, size) = (m.addr(lo), (hi - lo) * m.q);
    let got = vm.add(base, size);
    let overlapping: Vec<_> = m
        .spans
        .iter()
        .filter(|&&(l, h)| l < hi && lo < h)
        .map(|&(l, h)| (m.addr(l), (h - l) * m.q))
        .collect();
    if !overlapping.is_empty() {
        match got {
            Err(VmemError::SpanOverlap {
                base: b,
                size: s,
                existing_base,
                existing_size,
            }) => {
                assert_eq!((b, s), (base, size));
                assert!(overlapping.contains(&(existing_base, existing_size)));
            }
            other => panic!("add over {overlapping:?}: {other:?}"),
        }
    } else if m.tags_free() < 2 {
        assert_eq!(
            got,
            Err(VmemError::OutOfTags {
                needed: 2,
                available: m.tags_free(),
                capacity: m.cap
            })
        );
    } else {
        assert_eq!(got, Ok(()));
        m.spans.push((lo, hi));
        m.spans.sort();
    }
}

fn run(qshift: u32, origin_sel: u8, span0: (u64, u64), cap: usize, ops: Vec<Op>, drain: u64) {
    let q = 1u64 << qshift;
    let origin = match origin_sel {
        0 => 0,
        1 => (1 << 32) - 5 * q,
        // The top of the address space: the window ends at 2^64 - q.
        _ => 0u64.wrapping_sub((W + 1) * q),
    };
    let (lo, len) = span0;
    let hi = (lo + len).min(W);
    let mut m = Model {
        origin,
        q,
        cap,
        spans: if hi > lo { vec![(lo, hi)] } else { vec![] },
        live: BTreeMap::new(),
        used: vec![false; W as usize],
    };
    let mut vm = match Vmem::new(m.addr(lo), (hi - lo) * q, q, cap) {
        Ok(vm) => vm,
        Err(e) => {
            assert!(hi > lo && cap < 2);
            assert_eq!(
                e,
                VmemError::OutOfTags {
                    needed: 2,
                    available: cap,
                    capacity: cap
                }
            );
            return;
        }
    };
    check(&vm, &m);
    let policy = |best| {
        if best {
            AllocPolicy::BestFit
        } else {
            AllocPolicy::InstantFit
        }
    };
    for op in ops {
        match op {
            Op::Alloc { quanta, best } => {
                do_alloc(&mut vm, &mut m, quanta, Constraints::NONE, policy(best))
            }
            Op::Xalloc {
                quanta,
                align_k,
                phase_sel,
                nocross_k,
                min_sel,
                max_sel,
                best,
            } => {
                let span = W * q;
                let c = Constraints {
                    align: q << align_k,
                    phase: (phase_sel % (1 << align_k)) * q,
                    nocross: nocross_k.map_or(0, |k| q << k),
                    min_addr: min_sel.map_or(0, |x| origin + x % span),
                    max_addr: max_sel.map_or(u64::MAX, |x| origin + x % span),
                };
                do_alloc(&mut vm, &mut m, quanta, c, policy(best));
            }
            Op::Free { pick } if !m.live.is_empty() => do_free(&mut vm, &mut m, pick),
            Op::Free { pick } => do_bad_free(&mut vm, &m, pick, 2),
            Op::BadFree { pick, how } => do_bad_free(&mut vm, &m, pick, how),
            Op::Add { lo, len } => do_add(&mut vm, &mut m, lo, len),
        }
        check(&vm, &m);
    }
    // Free everything in a pseudo-random order: back to the bare spans.
    let mut x = drain | 1;
    while !m.live.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        do_free(&mut vm, &mut m, x as usize);
        check(&vm, &m);
    }
    let bare: Vec<Segment> = m
        .spans
        .iter()
        .flat_map(|&(l, h)| {
            let (start, size) = (m.addr(l), (h - l) * q);
            [SegmentKind::Span, SegmentKind::Free].map(|kind| Segment { start, size, kind })
        })
        .collect();
    assert_eq!(vm.segments().collect::<Vec<_>>(), bare);
    let span_bytes = m.spans.iter().map(|(l, h)| (h - l) * q).sum();
    assert_eq!(
        vm.stats(),
        Stats {
            spans: m.spans.len(),
            span_bytes,
            in_use_bytes: 0,
            free_bytes: span_bytes,
            allocated_segments: 0,
            free_segments: m.spans.len(),
            largest_free: m.spans.iter().map(|(l, h)| (h - l) * q).max().unwrap_or(0),
            tags_in_use: 2 * m.spans.len(),
            tag_capacity: cap,
        }
    );
}

fn qshift() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(3), Just(12)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Tags sized by `Vmem::tags_needed` for the window's worst case: no
    /// operation may fail for lack of tags.
    #[test]
    fn model_with_enough_tags(
        qshift in qshift(),
        origin_sel in 0u8..3,
        span0 in (0..W, 0..=W),
        ops in prop::collection::vec(op(), 1..100),
        drain in any::<u64>(),
    ) {
        // At most W spans and W allocations fit in W quanta.
        let cap = Vmem::tags_needed(W as usize, W as usize);
        run(qshift, origin_sel, span0, cap, ops, drain);
    }

    /// A handful of tags: `OutOfTags` happens, exactly when predicted, and
    /// leaves the arena consistent and unchanged.
    #[test]
    fn model_with_scarce_tags(
        qshift in qshift(),
        origin_sel in 0u8..3,
        span0 in (0..W, 0..=W),
        cap in 0usize..=14,
        ops in prop::collection::vec(op(), 1..100),
        drain in any::<u64>(),
    ) {
        run(qshift, origin_sel, span0, cap, ops, drain);
    }
}

#[test]
fn enough_tags_never_run_out() {
    // The bound of `tags_needed` is also sufficient for the worst pattern:
    // W single-quantum allocations alternate with free quanta (2 tags each).
    let mut vm = Vmem::new(0, 2 * W + 1, 1, Vmem::tags_needed(1, W as usize)).unwrap();
    let c = Constraints {
        align: 2,
        phase: 1,
        ..Constraints::NONE
    };
    for i in 0..W {
        assert_eq!(vm.xalloc(1, c, AllocPolicy::BestFit), Ok(2 * i + 1));
    }
    let st = vm.stats();
    assert_eq!(st.tags_in_use, st.tag_capacity);
    vm.check_invariants().unwrap();
}
