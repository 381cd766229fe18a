//! The intrusive lock-free inbox of `pending` (threads made runnable from
//! other CPUs, linked through their link words): nothing lost, nothing
//! duplicated, newest first. (bio's intrusive `BufQueue` is in `bufq.rs`.)

use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;

use crate::pending::{Inbox, LinkWord, NIL};

fn walk(head: u32, links: &[LinkWord]) -> Vec<u32> {
    let mut v = Vec::new();
    let mut cur = head;
    while cur != NIL {
        v.push(cur);
        cur = links[cur as usize].load(Relaxed);
    }
    v
}

#[test]
fn inbox_is_newest_first_and_empties_at_once() {
    let links: Vec<LinkWord> = (0..5).map(|_| LinkWord::new(NIL)).collect();
    let q = Inbox::new();
    assert!(q.is_empty());
    for id in [3u32, 0, 4] {
        q.push(id, &links[id as usize]);
    }
    assert!(!q.is_empty());
    assert_eq!(walk(q.take_all(), &links), [4, 0, 3]);
    assert!(q.is_empty());
    assert_eq!(q.take_all(), NIL);
    q.push(1, &links[1]);
    assert_eq!(walk(q.take_all(), &links), [1]);
}

/// Pushers on several threads while the owner takes batches: every id
/// arrives exactly once, and each pusher's ids in its order.
#[test]
fn inbox_concurrent_pushes_arrive_once() {
    const THREADS: u32 = 3;
    const EACH: u32 = if cfg!(miri) { 8 } else { 2000 };
    let links: Vec<LinkWord> = (0..THREADS * EACH).map(|_| LinkWord::new(NIL)).collect();
    let q = Inbox::new();
    let mut got: Vec<u32> = Vec::new();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (q, links) = (&q, &links);
            s.spawn(move || {
                for i in 0..EACH {
                    let id = t * EACH + i;
                    q.push(id, &links[id as usize]);
                }
            });
        }
        while (got.len() as u32) < THREADS * EACH {
            let mut batch = walk(q.take_all(), &links);
            batch.reverse(); // oldest first
            got.extend(batch);
            std::thread::yield_now();
        }
    });
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len() as u32, THREADS * EACH, "lost or duplicated");
    for t in 0..THREADS {
        let mine: Vec<u32> = got.iter().copied().filter(|id| id / EACH == t).collect();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "thread {t} out of order"
        );
    }
}
