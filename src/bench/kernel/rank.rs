//! Spreads over repetitions, and a ranking that does not rank what the
//! noise cannot separate.
//!
//! A figure measured `n` times is a [`Spread`]: its median and its range.
//! [`rank`] orders items by a figure with ties: an item's rank is one more
//! than the number of items that are *strictly* better, that is, whose
//! whole range lies on the better side of its whole range. Items whose
//! ranges overlap are not ranked against each other: they are reported as
//! ties. The rank is consistent: if A is strictly better than B, every
//! item strictly better than A is strictly better than B too, so A's rank
//! is below B's.

use serde::Serialize;

/// A figure over repetitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// Repetitions.
    pub n: usize,
}

impl Spread {
    /// The spread of `v` (NaNs ignored; all zeros for none).
    pub fn of(v: &[f64]) -> Spread {
        let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }

    /// Do the ranges of `self` and `o` overlap (touching counts)?
    pub fn overlaps(&self, o: &Spread) -> bool {
        self.min <= o.max && o.min <= self.max
    }

    /// The range relative to the median: (max - min) / median (0 when the
    /// median is 0).
    pub fn rel(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }
}

/// Which way is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// Smaller is better (ns per I/O).
    Lower,
    /// Larger is better (I/Os per second).
    Higher,
}

/// An item's place.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Place {
    /// Index of the item in the input.
    pub index: usize,
    /// 1 + the number of items strictly better.
    pub rank: usize,
    /// Indexes of the items whose ranges overlap this one's.
    pub tied_with: Vec<usize>,
}

/// Is `a` strictly better than `b` (the whole range)?
pub fn strictly_better(a: &Spread, b: &Spread, better: Better) -> bool {
    match better {
        Better::Lower => a.max < b.min,
        Better::Higher => a.min > b.max,
    }
}

/// Rank `items` by their spreads, with ties (see the module docs). The
/// places come sorted by rank, then by median (best first), then by input
/// order.
pub fn rank(items: &[Spread], better: Better) -> Vec<Place> {
    let mut places: Vec<Place> = items
        .iter()
        .enumerate()
        .map(|(i, s)| Place {
            index: i,
            rank: 1 + items
                .iter()
                .filter(|o| strictly_better(o, s, better))
                .count(),
            tied_with: items
                .iter()
                .enumerate()
                .filter(|&(j, o)| j != i && o.overlaps(s))
                .map(|(j, _)| j)
                .collect(),
        })
        .collect();
    places.sort_by(|a, b| {
        let (ma, mb) = (items[a.index].median, items[b.index].median);
        let by_median = match better {
            Better::Lower => ma.total_cmp(&mb),
            Better::Higher => mb.total_cmp(&ma),
        };
        a.rank
            .cmp(&b.rank)
            .then(by_median)
            .then(a.index.cmp(&b.index))
    });
    places
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(min: f64, median: f64, max: f64) -> Spread {
        Spread {
            median,
            min,
            max,
            n: 3,
        }
    }

    #[test]
    fn spread_of_odd_and_even_counts() {
        let a = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((a.min, a.median, a.max, a.n), (1.0, 2.0, 3.0, 3));
        let b = Spread::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!((b.min, b.median, b.max), (1.0, 2.5, 4.0));
        assert_eq!(Spread::of(&[]).n, 0);
        assert_eq!(Spread::of(&[f64::NAN, 5.0]).median, 5.0);
        assert!((s(90.0, 100.0, 110.0).rel() - 0.2).abs() < 1e-12);
    }

    /// Separated ranges are ranked; overlapping ones share a rank.
    #[test]
    fn overlapping_ranges_tie() {
        let items = [
            s(10.0, 11.0, 12.0), // 0
            s(30.0, 31.0, 32.0), // 2
            s(11.5, 13.0, 14.0), // 1: overlaps 0
        ];
        let p = rank(&items, Better::Lower);
        let order: Vec<(usize, usize)> = p.iter().map(|p| (p.index, p.rank)).collect();
        assert_eq!(order, vec![(0, 1), (2, 1), (1, 3)]);
        assert_eq!(p[0].tied_with, vec![2]);
        assert_eq!(p[1].tied_with, vec![0]);
        assert!(p[2].tied_with.is_empty());
    }

    /// Overlap is not transitive: A ties B, B ties C, A beats C.
    #[test]
    fn a_chain_of_ties() {
        let items = [s(1.0, 1.5, 2.0), s(1.8, 2.4, 3.0), s(2.5, 3.0, 4.0)];
        let p = rank(&items, Better::Lower);
        let r: Vec<usize> = (0..3)
            .map(|i| p.iter().find(|x| x.index == i).unwrap().rank)
            .collect();
        assert_eq!(r, vec![1, 1, 2]);
    }

    /// Higher is better ranks the other way; equal ranges tie.
    #[test]
    fn higher_is_better() {
        let items = [s(1.0, 2.0, 3.0), s(5.0, 6.0, 7.0), s(5.0, 6.0, 7.0)];
        let p = rank(&items, Better::Higher);
        assert_eq!(p[0].rank, 1);
        assert_eq!(p[1].rank, 1);
        assert_eq!(p[2].index, 0);
        assert_eq!(p[2].rank, 3);
        assert_eq!(p[0].tied_with.len(), 1);
    }

    /// The ranking is consistent with strict dominance, on random ranges.
    #[test]
    fn ranks_respect_dominance() {
        let mut x = 12345u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 1000) as f64
        };
        for _ in 0..200 {
            let items: Vec<Spread> = (0..8)
                .map(|_| {
                    let a = next();
                    let b = a + next() / 10.0;
                    s(a, (a + b) / 2.0, b)
                })
                .collect();
            let p = rank(&items, Better::Lower);
            let rank_of = |i: usize| p.iter().find(|x| x.index == i).unwrap().rank;
            for i in 0..8 {
                for j in 0..8 {
                    if strictly_better(&items[i], &items[j], Better::Lower) {
                        assert!(rank_of(i) < rank_of(j));
                    }
                    if items[i].overlaps(&items[j]) && i != j {
                        assert!(
                            p.iter()
                                .find(|x| x.index == i)
                                .unwrap()
                                .tied_with
                                .contains(&j)
                        );
                    }
                }
            }
            // Sorted by rank.
            assert!(p.windows(2).all(|w| w[0].rank <= w[1].rank));
        }
    }
}
