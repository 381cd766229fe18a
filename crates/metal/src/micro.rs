//! `bench micro`: the kernel's mechanisms timed on metal, as `dvma bench
//! micro` times them in the Linux process, in the boot's configuration
//! (its `--spl` and `--intr-stack`): an spl pair, a kernel-thread switch,
//! an interrupt (a self-IPI posted from thread code, its trap, the handler,
//! `iretq`), the same with an AST pushed onto the interrupted thread, and
//! the delay from a handler's return to the softint it scheduled. Each
//! figure is the median of `--iterations`-many repetitions (default 5),
//! nanoseconds from the TSC.
//!
//! The output names the hypervisor (CPUID leaf 0x4000_0000: `KVMKVMKVM`,
//! `TCGTCGTCGTCG`): figures under TCG are of QEMU's emulator, not of
//! hardware, and say nothing about what the mechanisms cost.
//!
//! # Contexts
//! [`run`] is thread context (the program's kernel thread on CPU 0).

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use kern::ThreadCtx;
use kern::ast::{ast_establish, ast_push};
use kern::intr::{intr_establish, intr_post};
use kern::ipl::Ipl;
use kern::sched::{kthread_create, yield_now};
use kern::softint::{softint_establish, softint_schedule};
use kern::spl;

use crate::clock::nanotime;

static INTR_RUNS: AtomicU64 = AtomicU64::new(0);
static PUSH: AtomicBool = AtomicBool::new(false);
static SOFT: AtomicBool = AtomicBool::new(false);
static HANDLER_END: AtomicU64 = AtomicU64::new(0);
static SOFT_SUM: AtomicU64 = AtomicU64::new(0);
static SOFT_N: AtomicU64 = AtomicU64::new(0);
static READY: AtomicU64 = AtomicU64::new(0);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The hypervisor's CPUID signature, or "none".
pub fn hypervisor() -> String {
    let l1 = core::arch::x86_64::__cpuid(1);
    if l1.ecx & (1 << 31) == 0 {
        return "none".into();
    }
    let h = core::arch::x86_64::__cpuid(0x4000_0000);
    let mut b = Vec::new();
    for r in [h.ebx, h.ecx, h.edx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    b.retain(|c| c.is_ascii_graphic());
    String::from_utf8(b).unwrap_or_default()
}

/// Time everything; returns the guest status.
pub fn run(ctx: &ThreadCtx, json: bool, reps: u32) -> u8 {
    let reps = reps.clamp(1, 100) as usize;
    let k = kern::kernel();
    let st = &k.cpu(0).stats;
    let soft = softint_establish(Ipl::SoftBio, "micro soft", |_| {
        let t = nanotime();
        SOFT_SUM.fetch_add(t.saturating_sub(HANDLER_END.load(Relaxed)), Relaxed);
        SOFT_N.fetch_add(1, Relaxed);
    })
    .expect("softint");
    let ast = ast_establish("micro ast", |_| {}).expect("ast");
    let h = intr_establish(Ipl::Bio, "micro0", move |ictx| {
        INTR_RUNS.fetch_add(1, Relaxed);
        if PUSH.load(Relaxed) {
            ast_push(ictx, &ast);
        }
        if SOFT.load(Relaxed) {
            softint_schedule(&soft);
            HANDLER_END.store(nanotime(), Relaxed);
        }
    })
    .expect("intr");

    // spl pair.
    let n = 200_000u64;
    let spl_ns = median(
        (0..reps)
            .map(|_| {
                let t0 = nanotime();
                for _ in 0..n {
                    let s = spl::splbio();
                    drop(s);
                }
                (nanotime() - t0) as f64 / n as f64
            })
            .collect(),
    );

    // Kernel-thread switch: two threads yielding to each other.
    let n = 50_000u64;
    let switch_ns = median(
        (0..reps)
            .map(|_| {
                READY.store(0, Relaxed);
                let span = alloc::sync::Arc::new([AtomicU64::new(u64::MAX), AtomicU64::new(0)]);
                let sw0 = st.switches.get();
                let ts: Vec<_> = (0..2)
                    .map(|_| {
                        let s = span.clone();
                        kthread_create(Some(0), "micro yielder", move |ctx| {
                            READY.fetch_add(1, Relaxed);
                            while READY.load(Relaxed) < 2 {
                                yield_now(ctx);
                            }
                            s[0].fetch_min(nanotime(), Relaxed);
                            for _ in 0..n {
                                yield_now(ctx);
                            }
                            s[1].fetch_max(nanotime(), Relaxed);
                        })
                        .expect("kthread")
                    })
                    .collect();
                for t in &ts {
                    let _ = t.join(ctx);
                }
                let sw = st.switches.get() - sw0;
                let dt = span[1].load(Relaxed).saturating_sub(span[0].load(Relaxed));
                dt as f64 / sw.max(1) as f64
            })
            .collect(),
    );

    // Interrupts, plain and with an AST pushed.
    let n = 20_000u64;
    let time_posts = |push: bool| {
        PUSH.store(push, Relaxed);
        let (i0, p0) = (INTR_RUNS.load(Relaxed), st.ast_pushed.get());
        let v = (0..reps)
            .map(|_| {
                let t0 = nanotime();
                for _ in 0..n {
                    intr_post(0, h);
                }
                (nanotime() - t0) as f64 / n as f64
            })
            .collect();
        PUSH.store(false, Relaxed);
        (
            median(v),
            INTR_RUNS.load(Relaxed) - i0,
            st.ast_pushed.get() - p0,
        )
    };
    let (intr_ns, intr_runs, _) = time_posts(false);
    let (ast_ns, ast_runs, ast_pushed) = time_posts(true);

    // Softint dispatch after a handler's return.
    SOFT.store(true, Relaxed);
    let softint_ns = median(
        (0..reps)
            .map(|_| {
                SOFT_SUM.store(0, Relaxed);
                SOFT_N.store(0, Relaxed);
                for _ in 0..n {
                    intr_post(0, h);
                }
                SOFT_SUM.load(Relaxed) as f64 / SOFT_N.load(Relaxed).max(1) as f64
            })
            .collect(),
    );
    SOFT.store(false, Relaxed);

    let posted = n * reps as u64;
    let ok = intr_runs == posted && ast_runs == posted && ast_pushed * 2 >= posted;
    let hv = hypervisor();
    let spl_name = k.config().spl.name();
    let stack = if crate::trap::intr_stack_on() {
        "on"
    } else {
        "off"
    };
    if json {
        kprintln!(
            "json: {{\"hypervisor\":\"{hv}\",\"spl\":\"{spl_name}\",\"intr_stack\":\"{stack}\",\
             \"reps\":{reps},\"spl_pair_ns\":{spl_ns:.2},\"switch_ns\":{switch_ns:.2},\
             \"intr_ns\":{intr_ns:.1},\"ast_ns\":{ast_ns:.1},\"softint_dispatch_ns\":{softint_ns:.1},\
             \"posted\":{posted},\"intr_runs\":{intr_runs},\"ast_runs\":{ast_runs},\
             \"ast_pushed\":{ast_pushed},\"ok\":{ok}}}"
        );
    } else {
        kprintln!(
            "micro: hypervisor {hv}, spl {spl_name}, interrupt stack {stack}, median of {reps}"
        );
        kprintln!("micro: spl pair           {spl_ns:>10.2} ns");
        kprintln!("micro: kthread switch     {switch_ns:>10.2} ns");
        kprintln!(
            "micro: interrupt (self)   {intr_ns:>10.1} ns ({intr_runs} handler runs of {posted})"
        );
        kprintln!("micro: interrupt + AST    {ast_ns:>10.1} ns ({ast_pushed} frames pushed)");
        kprintln!("micro: softint dispatch   {softint_ns:>10.1} ns");
        if hv.starts_with("TCG") {
            kprintln!("micro: under TCG these are figures of QEMU's emulator, not of hardware");
        }
    }
    if ok { 0 } else { crate::EXIT_FAIL }
}
