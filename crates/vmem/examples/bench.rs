//! Rough cost of an alloc + free pair, in ns, on a fragmented IOVA arena.
//!
//! `cargo run --release -p vmem --example bench`
//!
//! The arena is 1 GiB of 4 KiB pages. Before timing, 20 000 allocations of
//! 1..=16 pages are made and every other one freed, leaving ~10 000 holes
//! of assorted sizes. Two loops are timed per size and policy: a single
//! alloc immediately freed (the magazine-miss path), and batches of 64
//! allocs then 64 frees (a scatter/gather list).

use std::hint::black_box;
use std::time::Instant;

use vmem::{AllocPolicy, Constraints, Vmem};

const Q: u64 = 4096;
const ITERS: u32 = 200_000;

fn fragmented() -> Vmem {
    let mut vm = Vmem::new(0x8000_0000, 1 << 30, Q, 1 << 16).expect("arena");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut live = Vec::new();
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = (seed % 16 + 1) * Q;
        live.push((vm.alloc(size, AllocPolicy::BestFit).expect("prefill"), size));
    }
    for &(a, s) in live.iter().step_by(2) {
        vm.free(a, s).expect("free");
    }
    vm
}

fn time(label: &str, mut f: impl FnMut()) {
    // Warm up, then take the best of 5 runs.
    f();
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64 / f64::from(ITERS)
        })
        .fold(f64::INFINITY, f64::min);
    println!("{label:<44} {best:7.1} ns per alloc+free");
}

fn main() {
    let st = fragmented().stats();
    println!(
        "arena: {} MiB in use in {} allocations, {} free segments, {} tags of {}",
        st.in_use_bytes >> 20,
        st.allocated_segments,
        st.free_segments,
        st.tags_in_use,
        st.tag_capacity
    );
    for size in [4 << 10, 64 << 10] {
        for policy in [AllocPolicy::InstantFit, AllocPolicy::BestFit] {
            let mut vm = fragmented();
            time(&format!("{} KiB {policy:?}, single", size >> 10), || {
                for _ in 0..ITERS {
                    let a = vm.alloc(black_box(size), policy).expect("alloc");
                    vm.free(black_box(a), size).expect("free");
                }
            });
            let mut vm = fragmented();
            let mut batch = [0u64; 64];
            time(
                &format!("{} KiB {policy:?}, batches of 64", size >> 10),
                || {
                    for _ in 0..ITERS / 64 {
                        for slot in batch.iter_mut() {
                            *slot = vm.alloc(black_box(size), policy).expect("alloc");
                        }
                        for &a in batch.iter() {
                            vm.free(black_box(a), size).expect("free");
                        }
                    }
                },
            );
        }
        let mut vm = fragmented();
        let c = Constraints {
            align: size,
            nocross: 1 << 20,
            ..Constraints::NONE
        };
        time(
            &format!("{} KiB xalloc align+nocross InstantFit", size >> 10),
            || {
                for _ in 0..ITERS {
                    let a = vm.xalloc(black_box(size), c, AllocPolicy::InstantFit);
                    vm.free(black_box(a.expect("xalloc")), size).expect("free");
                }
            },
        );
    }
}
