//! `selftest`: kern's core mechanisms on metal, one check each, printed as
//! one JSON object (`json: {...}`) with a field per check and `"ok"`.
//!
//! * `intr_at_post`: an interrupt posted to this CPU from thread code at
//!   IPL none runs before `intr_post` returns (the self-IPI lands right
//!   there, as the race needs);
//! * `spl_defer_replay`: posted at IPL_BIO it does not run, and runs at
//!   the `splx` (a replay under `lazy`; under `mask` CR8 holds the IPI in
//!   the APIC until the `splx` lowers it);
//! * `softint`: a softbio softint scheduled by a hard handler runs on that
//!   interrupt's way out;
//! * `threads`: a second kernel thread sleeps, is woken, runs, is joined
//!   (switches both ways);
//! * `callout`: a callout 20 ms ahead fires from the LAPIC timer's
//!   hardclock (softclock), not before its time;
//! * `ast`: a hard handler's `ast_push` runs the AST on the interrupted
//!   thread through a pushed frame (the trampoline), with the thread's
//!   registers intact;
//! * `intr_stack`: the handler ran on the CPU's interrupt stack with
//!   `--intr-stack on`, on the interrupted thread's stack with `off`;
//! * `other_cpu` (with two CPUs or more): a thread created for CPU 1 (an
//!   IPI wakes that CPU's `hlt`) runs there and posts the interrupt to
//!   CPU 0 (an IPI to another CPU), whose handler runs on CPU 0.
//!
//! # Contexts
//! [`run`] is thread context (the program's kernel thread on CPU 0).

use alloc::string::String;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use kern::ThreadCtx;
use kern::ast::{ast_establish, ast_push};
use kern::callout::{callout_establish, callout_schedule};
use kern::intr::{intr_establish, intr_post};
use kern::ipl::Ipl;
use kern::sched::{kthread_create, tsleep, wakeup, wchan};
use kern::softint::{softint_establish, softint_schedule};
use kern::spl;

static HARD_RUNS: AtomicU64 = AtomicU64::new(0);
static SOFT_RUNS: AtomicU64 = AtomicU64::new(0);
static AST_RUNS: AtomicU64 = AtomicU64::new(0);
static MODE: AtomicU32 = AtomicU32::new(0);
static CALLOUT_AT: AtomicU64 = AtomicU64::new(0);
static CHAN: AtomicU32 = AtomicU32::new(0);
static WOKEN: AtomicBool = AtomicBool::new(false);
/// The CPU of the handler's last run.
static HANDLER_CPU: AtomicU64 = AtomicU64::new(u64::MAX);
/// The CPU the other-CPU thread ran on.
static OTHER_RAN_ON: AtomicU64 = AtomicU64::new(u64::MAX);
/// The stack pointer of the handler's last run.
static HANDLER_SP: AtomicU64 = AtomicU64::new(0);

fn rsp() -> u64 {
    let sp: u64;
    // SAFETY: reads the stack pointer.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    sp
}

const MODE_COUNT: u32 = 0;
const MODE_SOFTINT: u32 = 1;
const MODE_AST: u32 = 2;

/// Run the checks; returns the guest status (0: all passed).
pub fn run(ctx: &ThreadCtx, json: bool) -> u8 {
    let k = kern::kernel();
    let cpu = k.cpu(0);
    let mut out = String::new();
    let mut all = true;
    let mut check = |name: &str, ok: bool, detail: &str| {
        all &= ok;
        if !json {
            kprintln!(
                "selftest: {name:<18} {} {detail}",
                if ok { "ok  " } else { "FAIL" }
            );
        }
        let _ = write!(out, "\"{name}\":{ok},");
    };

    let soft = softint_establish(Ipl::SoftBio, "selftest soft", |_| {
        SOFT_RUNS.fetch_add(1, Relaxed);
    })
    .expect("softint");
    let ast = ast_establish("selftest ast", |_| {
        AST_RUNS.fetch_add(1, Relaxed);
    })
    .expect("ast");
    let h = intr_establish(Ipl::Bio, "selftest0", move |ictx| {
        HARD_RUNS.fetch_add(1, Relaxed);
        HANDLER_SP.store(rsp(), Relaxed);
        HANDLER_CPU.store(kern::cpu::curcpu().index() as u64, Relaxed);
        match MODE.load(Relaxed) {
            MODE_SOFTINT => softint_schedule(&soft),
            MODE_AST => ast_push(ictx, &ast),
            _ => {}
        }
    })
    .expect("intr");

    // An interrupt at IPL none lands at the post.
    let traps0 = cpu.stats.traps.get();
    let my_sp = rsp();
    intr_post(0, h);
    let ran = HARD_RUNS.load(Relaxed);
    check(
        "intr_at_post",
        ran == 1 && cpu.stats.traps.get() > traps0,
        &alloc::format!("handler runs {ran}"),
    );
    // ... on the stack the interrupt-stack mode says.
    let hsp = HANDLER_SP.load(Relaxed);
    let on_ist = crate::trap::on_intr_stack(hsp as usize);
    let on_mine = hsp < my_sp && my_sp - hsp < 64 * 1024;
    check(
        "intr_stack",
        if crate::trap::intr_stack_on() {
            on_ist
        } else {
            on_mine
        },
        &alloc::format!(
            "handler sp {hsp:#x} ({}), thread sp {my_sp:#x}",
            if on_ist {
                "interrupt stack"
            } else if on_mine {
                "the interrupted thread's stack"
            } else {
                "elsewhere"
            }
        ),
    );

    // Deferred by splbio, run at splx.
    let replays0 = cpu.stats.splx_replays.get();
    let s = spl::splbio();
    intr_post(0, h);
    let during = HARD_RUNS.load(Relaxed);
    drop(s);
    let after = HARD_RUNS.load(Relaxed);
    check(
        "spl_defer_replay",
        during == 1 && after == 2,
        &alloc::format!(
            "runs at splbio {during}, after splx {after}, replays {}",
            cpu.stats.splx_replays.get() - replays0
        ),
    );

    // A softint scheduled by the handler runs on its way out.
    MODE.store(MODE_SOFTINT, Relaxed);
    intr_post(0, h);
    MODE.store(MODE_COUNT, Relaxed);
    let sr = SOFT_RUNS.load(Relaxed);
    check("softint", sr == 1, &alloc::format!("softint runs {sr}"));

    // A second thread: sleep, wakeup, join.
    let t = kthread_create(Some(0), "selftest sleeper", |ctx| {
        while !WOKEN.load(Relaxed) {
            if tsleep(ctx, wchan(&CHAN)).is_err() {
                return;
            }
        }
        CHAN.store(2, Relaxed);
    })
    .expect("kthread");
    let sw0 = cpu.stats.switches.get();
    kern::sched::yield_now(ctx); // it runs and sleeps
    WOKEN.store(true, Relaxed);
    let n = wakeup(wchan(&CHAN));
    let joined = t.join(ctx).is_ok();
    let sw = cpu.stats.switches.get() - sw0;
    check(
        "threads",
        n == 1 && joined && CHAN.load(Relaxed) == 2 && sw >= 4,
        &alloc::format!("woken {n}, joined {joined}, switches {sw}"),
    );

    // A callout from the LAPIC timer's hardclock.
    let co = callout_establish(|_| {
        CALLOUT_AT.store(kern::kernel().md().nanotime(), Relaxed);
        wakeup(wchan(&CALLOUT_AT));
    })
    .expect("callout");
    let t0 = k.md().nanotime();
    let ticks0 = crate::intr::TICKS.load(Relaxed);
    callout_schedule(co, 20_000_000);
    while CALLOUT_AT.load(Relaxed) == 0 {
        let s = spl::splsoftclock();
        if CALLOUT_AT.load(Relaxed) == 0 && tsleep(ctx, wchan(&CALLOUT_AT)).is_err() {
            break;
        }
        drop(s);
    }
    let at = CALLOUT_AT.load(Relaxed);
    let ticks = crate::intr::TICKS.load(Relaxed) - ticks0;
    let late = at.saturating_sub(t0);
    check(
        "callout",
        at >= t0 + 20_000_000 && ticks >= 1,
        &alloc::format!("fired after {} us, {ticks} timer ticks", late / 1000),
    );

    // An AST pushed onto this thread by a hard handler.
    MODE.store(MODE_AST, Relaxed);
    let pushed0 = cpu.stats.ast_pushed.get();
    let (a, b, c, d) = regs_across_ast(h);
    MODE.store(MODE_COUNT, Relaxed);
    let pushed = cpu.stats.ast_pushed.get() - pushed0;
    let ar = AST_RUNS.load(Relaxed);
    check(
        "ast",
        ar == 1 && pushed == 1 && (a, b, c, d) == (0x1111, 0x2222, 0x3333, 0x4444),
        &alloc::format!(
            "AST runs {ar}, frames pushed {pushed}, registers {a:#x} {b:#x} {c:#x} {d:#x}"
        ),
    );

    if k.ncpu() >= 2 {
        let runs0 = HARD_RUNS.load(Relaxed);
        HANDLER_CPU.store(u64::MAX, Relaxed);
        let t = kthread_create(Some(1), "selftest cpu1", move |_| {
            OTHER_RAN_ON.store(kern::cpu::curcpu().index() as u64, Relaxed);
            intr_post(0, h);
        })
        .expect("kthread on cpu1");
        let joined = t.join(ctx).is_ok();
        let t0 = k.md().nanotime();
        while HARD_RUNS.load(Relaxed) == runs0 && k.md().nanotime() < t0 + 100_000_000 {
            kern::sched::yield_now(ctx);
        }
        let on = OTHER_RAN_ON.load(Relaxed);
        let hc = HANDLER_CPU.load(Relaxed);
        check(
            "other_cpu",
            joined && on == 1 && HARD_RUNS.load(Relaxed) == runs0 + 1 && hc == 0,
            &alloc::format!("thread ran on cpu{on}, its interrupt's handler on cpu{hc}"),
        );
    }
    let _ = write!(out, "\"cpus\":{},", k.ncpu());
    if json {
        kprintln!("json: {{{}\"ok\":{all}}}", out);
    } else {
        kprintln!(
            "selftest: {} ({} traps, {} timer ticks, {} unexpected vectors)",
            if all { "all passed" } else { "FAILED" },
            cpu.stats.traps.get(),
            crate::intr::TICKS.load(Relaxed),
            crate::intr::UNEXPECTED.load(Relaxed)
        );
    }
    if all { 0 } else { crate::EXIT_FAIL }
}

/// Make `h` pending and interrupt this CPU from inside an assembly loop
/// that holds values in caller-saved registers (r8, r10, r11, xmm1): the
/// trap pushes the AST frame right there, and the trampoline must give
/// them back. Returns them as the loop ends.
#[inline(never)]
fn regs_across_ast(h: kern::intr::IntrHandle) -> (u64, u64, u64, u64) {
    kern::kernel().cpu(0).line().set_local(1 << h.bit());
    let (a, b, c, d): (u64, u64, u64, u64);
    // SAFETY: register arithmetic, one write of the local APIC's ICR (a
    // self-IPI with the handler's vector, as `lapic::send_ipi` does), and
    // a bounded spin; interrupts stay enabled, the stack is untouched
    // (the trampoline steps over the red zone).
    unsafe {
        core::arch::asm!(
            "mov r8, 0x1111",
            "mov r10, 0x2222",
            "mov r11, 0x3333",
            "mov rax, 0x4444",
            "movq xmm1, rax",
            "xor eax, eax",
            "mov dword ptr [{icr}], {cmd:e}",
            "mov ecx, 100000",
            "2:",
            "pause",
            "dec ecx",
            "jnz 2b",
            "movq rax, xmm1",
            icr = in(reg) crate::lapic::ICR_LO_ADDR,
            cmd = in(reg) crate::lapic::self_ipi_command(crate::intr::vector_of(Ipl::Bio).unwrap_or(0x40)),
            out("r8") a, out("r10") b, out("r11") c, out("rax") d, out("ecx") _, out("xmm1") _,
        );
    }
    (a, b, c, d)
}
