//! `Ccd::map` against a reference model: with interleaving and with
//! concatenation every logical sector maps to exactly one (component,
//! sector), and the chunks of a request cover it exactly once, in order,
//! without crossing a component or a stripe unit.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;
use proptest::prelude::*;

use crate::bio::{BlockDev, BufBox, DEV_BSIZE};
use crate::completion::Completion;
use crate::dev::ccd::{CbufAlloc, Ccd, CcdConfig, Chunk};
use crate::fake::{Machine, keep};

/// A component that only has a size (map never starts I/O).
struct Comp(u64);

impl BlockDev for Comp {
    fn name(&self) -> &'static str {
        "comp"
    }
    fn sectors(&self) -> u64 {
        self.0
    }
    fn read_only(&self) -> bool {
        false
    }
    fn max_transfer(&self) -> usize {
        64 * 1024
    }
    fn strategy(&self, _bp: BufBox) {
        unreachable!("map starts no I/O")
    }
    fn describe(&self) -> String {
        String::from("comp")
    }
}

fn ccd(sizes: &[u64], interleave: u64) -> &'static Ccd {
    let components = sizes
        .iter()
        .map(|&s| keep(Comp(s)) as &'static dyn BlockDev)
        .collect();
    let c = Ccd::attach(CcdConfig {
        name: "ccd0",
        components,
        interleave,
        completion: Completion::Intr,
        cpu: 0,
        cbufs: CbufAlloc::Pool,
        pool_size: 4,
        read_only: false,
    })
    .expect("attach");
    crate::bio::bdev_attach(c).expect("bdev_attach");
    c
}

/// The reference: where logical sector `b` lives.
fn model(sizes: &[u64], ileave: u64, b: u64) -> (usize, u64) {
    if ileave == 0 {
        let mut start = 0;
        for (i, &s) in sizes.iter().enumerate() {
            if b < start + s {
                return (i, b - start);
            }
            start += s;
        }
        panic!("sector {b} past the end");
    }
    let n = sizes.len() as u64;
    let stripe = b / ileave;
    ((stripe % n) as usize, stripe / n * ileave + b % ileave)
}

fn chunks(c: &Ccd, blkno: u64, nsect: u64) -> Vec<Chunk> {
    let mut v = Vec::new();
    c.map(blkno, nsect, |ch| v.push(ch));
    v
}

/// Check one request's chunks against the model; returns nothing, panics
/// with the first difference.
fn check(c: &Ccd, sizes: &[u64], ileave: u64, blkno: u64, nsect: u64) {
    let mut at = 0u64;
    for ch in chunks(c, blkno, nsect) {
        assert!(ch.nsect > 0, "empty chunk {ch:?}");
        assert_eq!(
            ch.offset,
            at as usize * DEV_BSIZE,
            "chunks in order, no gap or overlap"
        );
        assert!(
            ch.blkno + ch.nsect <= sizes[ch.comp],
            "{ch:?} past its component"
        );
        if ileave != 0 {
            assert!(
                ch.blkno % ileave + ch.nsect <= ileave,
                "{ch:?} crosses a stripe unit"
            );
        }
        for j in 0..ch.nsect {
            assert_eq!(
                (ch.comp, ch.blkno + j),
                model(sizes, ileave, blkno + at + j),
                "sector {} of {ch:?}",
                blkno + at + j
            );
        }
        at += ch.nsect;
    }
    assert_eq!(at, nsect, "the chunks cover the request");
}

/// Every logical sector of the whole device maps to a distinct place.
fn check_bijective(c: &Ccd, sizes: &[u64]) {
    let mut seen = BTreeSet::new();
    let mut n = 0;
    c.map(0, c.sectors(), |ch| {
        for j in 0..ch.nsect {
            assert!(
                seen.insert((ch.comp, ch.blkno + j)),
                "{ch:?} maps a sector twice"
            );
        }
        n += ch.nsect;
        assert!(ch.blkno + ch.nsect <= sizes[ch.comp]);
    });
    assert_eq!(n, c.sectors());
}

#[test]
fn concatenation_examples() {
    let _m = Machine::boot();
    let sizes = [10, 3, 7];
    let c = ccd(&sizes, 0);
    assert_eq!(c.sectors(), 20);
    let v = chunks(c, 8, 6);
    let got: Vec<(usize, u64, u64, usize)> = v
        .iter()
        .map(|c| (c.comp, c.blkno, c.nsect, c.offset))
        .collect();
    assert_eq!(got, [(0, 8, 2, 0), (1, 0, 3, 1024), (2, 0, 1, 2560)]);
    check_bijective(c, &sizes);
}

#[test]
fn interleave_examples() {
    let _m = Machine::boot();
    // Two components, interleave 4: the smaller one's whole stripes (2).
    let sizes = [9, 12];
    let c = ccd(&sizes, 4);
    assert_eq!(c.sectors(), 16);
    let got: Vec<(usize, u64, u64, usize)> = chunks(c, 2, 9)
        .iter()
        .map(|c| (c.comp, c.blkno, c.nsect, c.offset))
        .collect();
    // 2..4 on comp 0, 4..8 on comp 1, 8..11 on comp 0 (its second stripe).
    assert_eq!(got, [(0, 2, 2, 0), (1, 0, 4, 1024), (0, 4, 3, 3072)]);
    check_bijective(c, &sizes);
}

#[test]
fn map_matches_the_model() {
    proptest!(super::cases(64), |(
        sizes in proptest::collection::vec(1u64..40, 1..5),
        ileave in prop_oneof![Just(0u64), 1u64..9],
        req in (any::<u64>(), any::<u64>()),
    )| {
        // Components too small for one stripe do not attach.
        prop_assume!(ileave == 0 || sizes.iter().min().copied().unwrap_or(0) >= ileave);
        let _m = Machine::boot();
        let c = ccd(&sizes, ileave);
        let min = sizes.iter().min().copied().unwrap_or(0);
        let total: u64 = match min.checked_div(ileave) {
            None => sizes.iter().sum(),
            Some(stripes) => stripes * ileave * sizes.len() as u64,
        };
        prop_assert_eq!(c.sectors(), total);
        let blkno = req.0 % total;
        let nsect = 1 + req.1 % (total - blkno);
        check(c, &sizes, ileave, blkno, nsect);
        check_bijective(c, &sizes);
    });
}
