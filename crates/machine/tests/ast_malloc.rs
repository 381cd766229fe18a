//! ASTs never land inside the host allocator (`kern::malloc`).
//!
//! A kernel thread does nothing but allocate and free (so a signal most
//! likely lands inside glibc's malloc or free), while a device thread
//! interrupts it as fast as it can and each interrupt pushes an AST. The
//! AST handler is a probe: the kernel counts handlers entered while their
//! thread was inside the allocator (`ast_in_malloc`).
//!
//! With the protection (the default: the allocator is a `no_ast` region)
//! that count must be zero while thousands of ASTs are delivered, at the
//! allocator's exit or at a pushed frame outside it. With the protection
//! off (`KernelConfig::malloc_no_ast = false`) the same run must see ASTs
//! inside malloc: the test can fail. (The probe handler itself neither
//! allocates nor sleeps, so the unprotected run shows the hazard without
//! deadlocking on glibc's arena lock.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::{Duration, Instant};

use kern::Ipl;
use kern::ast::{ast_establish, ast_push};
use kern::intr::{intr_establish, intr_post};
use machine::{Machine, MachineConfig};

struct Outcome {
    pushed: u64,
    safepoint: u64,
    handlers: u64,
    in_malloc: u64,
    intr_mallocs: u64,
    allocs: u64,
}

fn run(protect: bool) -> Outcome {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = 1;
    cfg.kernel.malloc_no_ast = protect;
    let m = Machine::boot(cfg).unwrap();
    let ast = ast_establish("probe", |_| {}).unwrap();
    let vec = intr_establish(Ipl::Bio, "ast-dev", move |ctx| ast_push(ctx, &ast)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    // The storm: a real signal per post whenever the CPU runs thread code.
    let dev = std::thread::spawn(move || {
        while !s2.load(Relaxed) {
            intr_post(0, vec);
            std::thread::sleep(Duration::from_micros(5));
        }
    });
    let allocs = m
        .run(0, "malloc-loop", |_| {
            let mut live: Vec<Vec<u64>> = (0..64).map(|_| Vec::new()).collect();
            let mut n = 0u64;
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let end = Instant::now() + Duration::from_millis(400);
            while Instant::now() < end {
                for _ in 0..256 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 1 + (x % 300) as usize;
                    // Free one, allocate one: the thread lives in malloc/free.
                    live[(x >> 40) as usize % 64] = Vec::with_capacity(len);
                    n += 1;
                }
            }
            n
        })
        .unwrap();
    stop.store(true, SeqCst);
    dev.join().unwrap();
    let s = m.shutdown().unwrap();
    Outcome {
        pushed: s.total(|c| c.ast_pushed),
        safepoint: s.total(|c| c.ast_safepoint),
        handlers: s.total(|c| c.ast_handlers),
        in_malloc: s.total(|c| c.ast_in_malloc),
        intr_mallocs: s.total(|c| c.intr_mallocs),
        allocs,
    }
}

fn report(what: &str, o: &Outcome) {
    eprintln!(
        "{what}: {} allocations, {} AST handler runs ({} pushed frames, {} at safe points), \
         {} inside malloc, {} mallocs in interrupt context",
        o.allocs, o.handlers, o.pushed, o.safepoint, o.in_malloc, o.intr_mallocs
    );
}

#[test]
fn asts_never_land_in_malloc() {
    let o = run(true);
    report("protected", &o);
    assert!(o.handlers > 200, "only {} AST handler runs", o.handlers);
    assert_eq!(
        o.in_malloc, 0,
        "an AST handler ran inside the host allocator"
    );
    assert_eq!(o.intr_mallocs, 0, "an interrupt handler allocated");
}

#[test]
fn without_the_protection_asts_land_in_malloc() {
    let o = run(false);
    report("unprotected", &o);
    assert!(o.handlers > 200, "only {} AST handler runs", o.handlers);
    assert!(
        o.in_malloc > 0,
        "no AST landed inside malloc: the test would not notice a missing protection"
    );
}

/// The other count the allocator keeps: an interrupt handler that
/// allocates is seen (so the block tests' "no allocation in interrupt
/// context" checks, which assert this count is zero, can fail).
#[test]
fn an_allocating_interrupt_handler_is_counted() {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = 1;
    let m = Machine::boot(cfg).unwrap();
    let vec = intr_establish(Ipl::Bio, "allocating-dev", |_| {
        // What an interrupt handler must never do.
        drop(std::hint::black_box(Box::new([0u8; 64])));
    })
    .unwrap();
    let posted = m
        .run(0, "poster", move |_| {
            for _ in 0..10 {
                intr_post(0, vec);
                std::thread::sleep(Duration::from_millis(1));
            }
            10u64
        })
        .unwrap();
    let s = m.shutdown().unwrap();
    let n = s.total(|c| c.intr_mallocs);
    eprintln!("{posted} interrupts posted, {n} allocator calls in interrupt context");
    assert!(n >= 2, "an allocating handler went unnoticed ({n})");
}
