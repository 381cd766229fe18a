//! bio's buffer queue (`BufQueue`, intrusive: linked through the bufs):
//! FCFS order, disksort's one-way elevator, `put_front`, and that a queue
//! gives back every buf it holds.

use alloc::vec::Vec;
use proptest::prelude::*;

use crate::bio::{BufBox, BufQueue, BufqStrategy, DEV_BSIZE, bio_init, bufpool, getbuf};
use crate::fake::Machine;

/// A buf at `blkno` of `nsect` sectors, tagged `id` (in `resid`, which the
/// queue never looks at).
fn buf(blkno: u64, nsect: usize, id: usize) -> BufBox {
    let mut b = getbuf().expect("a buf");
    b.blkno = blkno;
    b.bcount = nsect * DEV_BSIZE;
    b.resid = id;
    b
}

fn boot() -> Machine {
    let m = Machine::boot();
    bio_init(64);
    m
}

fn ids(q: &mut BufQueue) -> Vec<usize> {
    q.drain().iter().map(|b| b.resid).collect()
}

#[test]
fn fcfs_keeps_arrival_order() {
    let _m = boot();
    let mut q = BufQueue::new(BufqStrategy::Fcfs);
    for (i, blk) in [50u64, 10, 30, 10, 0].into_iter().enumerate() {
        q.put(buf(blk, 1, i));
    }
    assert_eq!(q.len(), 5);
    assert_eq!(ids(&mut q), [0, 1, 2, 3, 4]);
    assert!(q.is_empty() && q.get().is_none());
}

/// Equal block numbers leave in arrival order (disksort is stable).
#[test]
fn disksort_equal_blocks_are_fifo() {
    let _m = boot();
    let mut q = BufQueue::new(BufqStrategy::Disksort);
    q.put(buf(20, 1, 0));
    q.put(buf(7, 1, 1));
    q.put(buf(20, 4, 2));
    q.put(buf(7, 2, 3));
    q.put(buf(20, 1, 4));
    assert_eq!(ids(&mut q), [1, 3, 0, 2, 4]);
}

/// One-way elevator: the head is at the last buf taken; what comes before
/// it waits for the next sweep, which starts at the lowest block again.
#[test]
fn disksort_one_way_elevator_wraps() {
    let _m = boot();
    let mut q = BufQueue::new(BufqStrategy::Disksort);
    q.put(buf(100, 8, 0));
    assert_eq!(q.get().map(|b| b.resid), Some(0)); // head now at 100
    for (i, blk) in [10u64, 200, 50, 150, 100, 99].into_iter().enumerate() {
        q.put(buf(blk, 1, i + 1));
    }
    // This sweep: 100, 150, 200; the next: 10, 50, 99.
    let order: Vec<u64> = q.drain().iter().map(|b| b.blkno).collect();
    assert_eq!(order, [100, 150, 200, 10, 50, 99]);
}

/// The elevator never goes backwards within a sweep, also when queued bufs
/// start inside the range of the one just taken (the head was once the
/// block after it, and this came out as 15, 12, 20).
#[test]
fn disksort_never_reverses_within_a_sweep() {
    let _m = boot();
    let mut q = BufQueue::new(BufqStrategy::Disksort);
    q.put(buf(10, 4, 0));
    q.put(buf(12, 1, 1));
    q.put(buf(20, 1, 2));
    assert_eq!(q.get().map(|b| b.blkno), Some(10));
    q.put(buf(15, 1, 3));
    let order: Vec<u64> = q.drain().iter().map(|b| b.blkno).collect();
    assert_eq!(order, [12, 15, 20]);
}

/// A buf put back at the front is taken next, whatever the order says.
#[test]
fn put_front_is_taken_next() {
    let _m = boot();
    for s in [BufqStrategy::Fcfs, BufqStrategy::Disksort] {
        let mut q = BufQueue::new(s);
        q.put(buf(5, 1, 0));
        q.put(buf(9, 1, 1));
        let b = q.get().expect("a buf");
        q.put_front(buf(900, 1, 2));
        q.put_front(b);
        assert_eq!(ids(&mut q), [0, 2, 1], "{s:?}");
    }
}

/// Dropping a queue (or draining it) gives every buf back to the pool.
#[test]
fn a_queue_gives_back_every_buf() {
    let _m = boot();
    let cap = bufpool().capacity();
    {
        let mut q = BufQueue::new(BufqStrategy::Disksort);
        for i in 0..10 {
            q.put(buf((i * 37 % 11) as u64, 1, i));
        }
        assert_eq!(bufpool().available(), cap - 10);
        let _ = q.get();
        assert_eq!(bufpool().available(), cap - 9);
    }
    assert_eq!(bufpool().available(), cap);
}

#[derive(Clone, Debug)]
enum Op {
    Put(u64, usize),
    Get,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..64, 1usize..4).prop_map(|(b, n)| Op::Put(b, n)),
        2 => Just(Op::Get),
    ]
}

/// disksort against a reference model: every `get` returns the queued buf
/// with the least (behind the head?, block, arrival), the head being the
/// first block of the last buf taken.
#[test]
fn disksort_matches_the_elevator_model() {
    let _m = boot();
    proptest!(super::cases(64), |(ops in proptest::collection::vec(op(), 1..40))| {
        let mut q = BufQueue::new(BufqStrategy::Disksort);
        // (blkno, nsect, arrival)
        let mut model: Vec<(u64, usize, usize)> = Vec::new();
        let mut pos = 0u64;
        for (seq, o) in ops.into_iter().enumerate() {
            match o {
                Op::Put(b, n) => {
                    q.put(buf(b, n, seq));
                    model.push((b, n, seq));
                }
                Op::Get => {
                    let want = model
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, m)| (m.0 < pos, m.0, m.2))
                        .map(|(i, _)| i);
                    let got = q.get();
                    match want {
                        None => prop_assert!(got.is_none()),
                        Some(i) => {
                            let (b, n, s) = model.remove(i);
                            let got = got.expect("a buf");
                            prop_assert_eq!((got.blkno, got.resid), (b, s));
                            pos = b;
                            let _ = n;
                        }
                    }
                }
            }
            prop_assert_eq!(q.len(), model.len());
        }
        // What is left comes out in model order too.
        model.sort_by_key(|&(b, _, s)| (b < pos, b, s));
        let rest: Vec<usize> = q.drain().iter().map(|b| b.resid).collect();
        let want: Vec<usize> = model.iter().map(|m| m.2).collect();
        prop_assert_eq!(rest, want);
    });
}
