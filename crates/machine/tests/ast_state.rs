//! ASTs keep the interrupted thread's state.
//!
//! A kernel thread runs an assembly loop that holds known values in every
//! general register (and, separately, in every vector register) and checks
//! them on each iteration, at IPL none. A device interrupts it as fast as it
//! can; the interrupt handler pushes an AST whose handler clobbers all
//! caller-saved general registers and all vector registers. With the full
//! trampoline no mismatch may ever be seen; with the deliberately partial
//! one (no r10/r11, FXSAVE only) mismatches must be seen: the test can fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::Duration;

use kern::Ipl;
use kern::ast::{ast_establish, ast_push};
use kern::intr::{intr_establish, intr_post};
use machine::{AstSave, Machine, MachineConfig};

// ---- the loops -------------------------------------------------------------

#[unsafe(no_mangle)]
static mut GPR_EXPECT: [u64; 15] = [
    0x1111_1111_1111_1111,
    0x2222_2222_2222_2222,
    0x3333_3333_3333_3333,
    0x4444_4444_4444_4444,
    0x5555_5555_5555_5555,
    0x6666_6666_6666_6666,
    0x7777_7777_7777_7777,
    0x8888_8888_8888_8888,
    0x9999_9999_9999_9999,
    0xaaaa_aaaa_aaaa_aaaa,
    0xbbbb_bbbb_bbbb_bbbb,
    0xcccc_cccc_cccc_cccc,
    0xdddd_dddd_dddd_dddd,
    0xeeee_eeee_eeee_eeee,
    0x0f0f_0f0f_0f0f_0f0f,
];
#[unsafe(no_mangle)]
static mut GPR_ITERS: u64 = 0;
#[unsafe(no_mangle)]
static mut GPR_BAD: u64 = 0;

core::arch::global_asm!(
    ".globl dvma_test_gpr_loop",
    "dvma_test_gpr_loop:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "3:",
    "mov rax, [rip + GPR_EXPECT + 0]",
    "mov rbx, [rip + GPR_EXPECT + 8]",
    "mov rcx, [rip + GPR_EXPECT + 16]",
    "mov rdx, [rip + GPR_EXPECT + 24]",
    "mov rsi, [rip + GPR_EXPECT + 32]",
    "mov rdi, [rip + GPR_EXPECT + 40]",
    "mov rbp, [rip + GPR_EXPECT + 48]",
    "mov r8,  [rip + GPR_EXPECT + 56]",
    "mov r9,  [rip + GPR_EXPECT + 64]",
    "mov r10, [rip + GPR_EXPECT + 72]",
    "mov r11, [rip + GPR_EXPECT + 80]",
    "mov r12, [rip + GPR_EXPECT + 88]",
    "mov r13, [rip + GPR_EXPECT + 96]",
    "mov r14, [rip + GPR_EXPECT + 104]",
    "mov r15, [rip + GPR_EXPECT + 112]",
    "2:",
    "cmp rax, [rip + GPR_EXPECT + 0]",
    "jne 4f",
    "cmp rbx, [rip + GPR_EXPECT + 8]",
    "jne 4f",
    "cmp rcx, [rip + GPR_EXPECT + 16]",
    "jne 4f",
    "cmp rdx, [rip + GPR_EXPECT + 24]",
    "jne 4f",
    "cmp rsi, [rip + GPR_EXPECT + 32]",
    "jne 4f",
    "cmp rdi, [rip + GPR_EXPECT + 40]",
    "jne 4f",
    "cmp rbp, [rip + GPR_EXPECT + 48]",
    "jne 4f",
    "cmp r8,  [rip + GPR_EXPECT + 56]",
    "jne 4f",
    "cmp r9,  [rip + GPR_EXPECT + 64]",
    "jne 4f",
    "cmp r10, [rip + GPR_EXPECT + 72]",
    "jne 4f",
    "cmp r11, [rip + GPR_EXPECT + 80]",
    "jne 4f",
    "cmp r12, [rip + GPR_EXPECT + 88]",
    "jne 4f",
    "cmp r13, [rip + GPR_EXPECT + 96]",
    "jne 4f",
    "cmp r14, [rip + GPR_EXPECT + 104]",
    "jne 4f",
    "cmp r15, [rip + GPR_EXPECT + 112]",
    "jne 4f",
    // carry flag survives too: set it, and check it after a no-op
    "stc",
    "lea rax, [rax]",
    "jnc 4f",
    "dec qword ptr [rip + GPR_ITERS]",
    "jnz 2b",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    "4:",
    "inc qword ptr [rip + GPR_BAD]",
    "dec qword ptr [rip + GPR_ITERS]",
    "jnz 3b",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
);

unsafe extern "C" {
    fn dvma_test_gpr_loop();
}

/// Hold 16 ymm registers (or 32 zmm registers) and check them `iters`
/// times against `pat`; returns the number of mismatching checks.
///
/// The loop's own pointers and counters live in r12-r15, which both
/// trampolines preserve: the partial one loses r10/r11 on purpose, and a
/// pointer the register allocator happened to put there would make the
/// partial run crash instead of counting vector mismatches.
fn vec_loop(pat: &[u8], scratch: &mut [u8], iters: u64, zmm: bool) -> u64 {
    let bad: u64;
    if zmm {
        assert!(pat.len() >= 32 * 64 && scratch.len() >= 32 * 64);
        // SAFETY: reads `pat`, writes `scratch`, both large enough; every
        // clobbered register is declared.
        unsafe {
            core::arch::asm!(
                "xor r15, r15",
                "3:",
                ".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
                "vmovdqu64 zmm\\i, [r12 + \\i*64]",
                ".endr",
                "2:",
                ".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
                "vmovdqu64 [r13 + \\i*64], zmm\\i",
                ".endr",
                "mov rcx, 2048",
                "mov rsi, r12",
                "mov rdi, r13",
                "repe cmpsb",
                "jne 4f",
                "dec r14",
                "jnz 2b",
                "jmp 5f",
                "4:",
                "inc r15",
                "dec r14",
                "jnz 3b",
                "5:",
                "vzeroupper",
                in("r12") pat.as_ptr(),
                in("r13") scratch.as_mut_ptr(),
                inout("r14") iters => _,
                out("r15") bad,
                out("rcx") _, out("rsi") _, out("rdi") _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
                out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            );
        }
    } else {
        assert!(pat.len() >= 16 * 32 && scratch.len() >= 16 * 32);
        // SAFETY: as above.
        unsafe {
            core::arch::asm!(
                "xor r15, r15",
                "3:",
                ".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
                "vmovdqu ymm\\i, [r12 + \\i*32]",
                ".endr",
                "2:",
                ".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
                "vmovdqu [r13 + \\i*32], ymm\\i",
                ".endr",
                "mov rcx, 512",
                "mov rsi, r12",
                "mov rdi, r13",
                "repe cmpsb",
                "jne 4f",
                "dec r14",
                "jnz 2b",
                "jmp 5f",
                "4:",
                "inc r15",
                "dec r14",
                "jnz 3b",
                "5:",
                "vzeroupper",
                in("r12") pat.as_ptr(),
                in("r13") scratch.as_mut_ptr(),
                inout("r14") iters => _,
                out("r15") bad,
                out("rcx") _, out("rsi") _, out("rdi") _,
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            );
        }
    }
    bad
}

/// What an AST handler may do to caller-saved state: everything.
fn clobber(zmm: bool) {
    // SAFETY: only registers declared clobbered are written.
    unsafe {
        core::arch::asm!(
            "mov rax, -1", "mov rcx, -1", "mov rdx, -1", "mov rsi, -1", "mov rdi, -1",
            "mov r8, -1", "mov r9, -1", "mov r10, -1", "mov r11, -1",
            "vpcmpeqb ymm0, ymm0, ymm0",
            ".irp i,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
            "vmovdqa ymm\\i, ymm0",
            ".endr",
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
        if zmm {
            core::arch::asm!(
                "vpternlogd zmm16, zmm16, zmm16, 0xff",
                ".irp i,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
                "vmovdqa64 zmm\\i, zmm16",
                ".endr",
                out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
                out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            );
        }
    }
}

struct Outcome {
    gpr_bad: u64,
    vec_bad: u64,
    pushed: u64,
    zmm: bool,
}

fn run(save: AstSave, intr_stack: bool) -> Outcome {
    let mut cfg = MachineConfig::default();
    cfg.kernel.ncpu = 1;
    cfg.ast_save = save;
    cfg.intr_stack = intr_stack;
    let m = Machine::boot(cfg).unwrap();
    let zmm = m.xsave().avx512;
    let ast = ast_establish("clobber", move |_| clobber(zmm)).unwrap();
    let vec = intr_establish(Ipl::Bio, "ast-dev", move |ctx| ast_push(ctx, &ast)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let dev = std::thread::spawn(move || {
        while !s2.load(Relaxed) {
            intr_post(0, vec);
            std::thread::sleep(Duration::from_micros(20));
        }
    });
    let gpr_bad = m
        .run(0, "gpr-loop", |_| {
            // SAFETY: the statics are used by this one thread only.
            unsafe {
                GPR_ITERS = 20_000_000;
                GPR_BAD = 0;
                dvma_test_gpr_loop();
                GPR_BAD
            }
        })
        .unwrap();
    let vec_bad = m
        .run(0, "vec-loop", move |_| {
            let n = if zmm { 32 * 64 } else { 16 * 32 };
            let pat: Vec<u8> = (0..n).map(|i| (i * 7 + 13) as u8 | 1).collect();
            let mut scratch = vec![0u8; n];
            vec_loop(&pat, &mut scratch, 300_000, zmm)
        })
        .unwrap();
    stop.store(true, SeqCst);
    dev.join().unwrap();
    let s = m.shutdown().unwrap();
    Outcome {
        gpr_bad,
        vec_bad,
        pushed: s.total(|c| c.ast_pushed),
        zmm,
    }
}

#[test]
fn full_trampoline_preserves_everything() {
    for stack in [true, false] {
        let o = run(AstSave::Full, stack);
        eprintln!(
            "full, intr stack {stack}: {} frames pushed, {} gpr / {} vector mismatches (zmm {})",
            o.pushed, o.gpr_bad, o.vec_bad, o.zmm
        );
        assert!(o.pushed > 200, "only {} AST frames pushed", o.pushed);
        assert_eq!(o.gpr_bad, 0);
        assert_eq!(o.vec_bad, 0);
    }
}

#[test]
fn partial_trampoline_is_caught() {
    let o = run(AstSave::Partial, true);
    eprintln!(
        "partial: {} frames pushed, {} gpr / {} vector mismatches",
        o.pushed, o.gpr_bad, o.vec_bad
    );
    assert!(o.pushed > 200);
    assert!(o.gpr_bad > 0, "losing r10/r11 went unnoticed");
    assert!(
        o.vec_bad > 0,
        "losing the upper vector halves went unnoticed"
    );
}
