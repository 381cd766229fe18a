//! x86_64: the interrupt entry and exit stubs and the AST trampoline.
//!
//! # The interrupt entry
//! Signals are installed with `rt_sigaction` directly, with our own
//! handler stub (`dvma_sigentry`) and restorer (`dvma_sigreturn`), so that
//! every instruction of an interrupt's way in and out is either inside the
//! Rust body, which runs with the per-thread `dvma_in_trap` counter
//! raised, or inside these stubs, whose addresses we know. A signal that
//! lands anywhere in a trap can thus tell it did (`interrupted_trap`), and
//! never pushes an AST frame onto another trap's context.
//!
//! # The AST trampoline: the pushed frame
//! To make the interrupted thread call the AST upcall before it resumes,
//! the signal handler stores the interrupted `rip` in the per-thread slot
//! `dvma_ast_ret` and sets the saved `rip` to the trampoline. After
//! `sigreturn` the thread runs the trampoline on its own stack, which:
//!
//! 1. steps over the 128-byte red zone (`lea`, which leaves the flags alone),
//! 2. pushes the saved `rip` (from the thread-local slot: no register is
//!    needed, and the signal frame, which may lie just below the red zone
//!    when there is no interrupt stack, is dead by now),
//! 3. pushes the flags and all fifteen general registers,
//! 4. saves the full extended state with `XSAVEC` (size from CPUID leaf 0xD,
//!    requested-feature mask = XCR0) into a 64-byte aligned area whose
//!    header it zeroes first,
//! 5. calls the upcall with a 16-byte aligned stack and DF clear,
//! 6. restores everything in reverse, and returns with `ret 128`, which
//!    pops the saved `rip` and steps back over the red zone in one
//!    instruction, so `rsp` is exactly what it was.
//!
//! A second, deliberately incomplete trampoline (`Partial`: no r10/r11,
//! `FXSAVE` only, so no upper halves of the vector registers) exists so
//! that the register-preservation tests can be shown to fail.
//!
//! # Safety of the per-thread slots
//! `dvma_in_trap` and `dvma_ast_ret` are local-exec TLS variables of the
//! executable, read and written only by the owning thread and its signal
//! handlers. Between a push (which writes the slot) and the trampoline's
//! first push (which reads it), no other write can happen on that thread:
//! the kernel refuses to push while `ast_armed` is set or while the
//! interrupted `rip` is in the trampoline.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};

/// Which trampoline pushes AST frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AstSave {
    /// Every general register, the flags, and the full XSAVE state.
    Full,
    /// Test aid: misses r10, r11 and the upper halves of vector registers.
    Partial,
}

/// Size of the XSAVE area (bytes), set at boot from CPUID.
#[unsafe(no_mangle)]
static DVMA_XSAVE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// XCR0, low half: the requested-feature bitmap for XSAVEC/XRSTOR.
#[unsafe(no_mangle)]
static DVMA_XCR0_LO: AtomicU32 = AtomicU32::new(0);
/// XCR0, high half.
#[unsafe(no_mangle)]
static DVMA_XCR0_HI: AtomicU32 = AtomicU32::new(0);

core::arch::global_asm!(
    // Per-thread slots (local-exec TLS, zero-initialised).
    ".section .tbss,\"awT\",@nobits",
    ".p2align 3",
    ".globl dvma_in_trap",
    "dvma_in_trap: .zero 8",
    ".globl dvma_ast_ret",
    "dvma_ast_ret: .zero 8",
    ".text",
    // ---- interrupt entry -------------------------------------------------
    ".p2align 4",
    ".globl dvma_sigentry",
    "dvma_sigentry:",
    "inc dword ptr fs:[dvma_in_trap@tpoff]",
    "sub rsp, 8",
    "call {body}",
    "add rsp, 8",
    "dec dword ptr fs:[dvma_in_trap@tpoff]",
    "ret",
    ".globl dvma_sigentry_end",
    "dvma_sigentry_end:",
    ".p2align 4",
    ".globl dvma_sigreturn",
    "dvma_sigreturn:",
    "mov eax, 15",
    "syscall",
    "ud2",
    ".globl dvma_sigreturn_end",
    "dvma_sigreturn_end:",
    // ---- the AST trampoline, full state ----------------------------------
    ".p2align 4",
    ".globl dvma_ast_tramp_full",
    "dvma_ast_tramp_full:",
    "lea rsp, [rsp - 128]",
    "push qword ptr fs:[dvma_ast_ret@tpoff]",
    "pushfq",
    "push rax", "push rcx", "push rdx", "push rbx", "push rbp", "push rsi", "push rdi",
    "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "mov rbp, rsp",
    "mov rax, qword ptr [rip + {xsize}]",
    "sub rsp, rax",
    "and rsp, -64",
    "xor eax, eax",
    "mov qword ptr [rsp + 512], rax",
    "mov qword ptr [rsp + 520], rax",
    "mov qword ptr [rsp + 528], rax",
    "mov qword ptr [rsp + 536], rax",
    "mov qword ptr [rsp + 544], rax",
    "mov qword ptr [rsp + 552], rax",
    "mov qword ptr [rsp + 560], rax",
    "mov qword ptr [rsp + 568], rax",
    "mov eax, dword ptr [rip + {xlo}]",
    "mov edx, dword ptr [rip + {xhi}]",
    "xsavec64 [rsp]",
    "cld",
    "call {upcall}",
    "mov eax, dword ptr [rip + {xlo}]",
    "mov edx, dword ptr [rip + {xhi}]",
    "xrstor64 [rsp]",
    "mov rsp, rbp",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
    "pop rdi", "pop rsi", "pop rbp", "pop rbx", "pop rdx", "pop rcx", "pop rax",
    "popfq",
    "ret 128",
    ".globl dvma_ast_tramp_full_end",
    "dvma_ast_tramp_full_end:",
    // ---- the same with standard-form XSAVE (no XSAVEC) -------------------
    ".p2align 4",
    ".globl dvma_ast_tramp_xsave",
    "dvma_ast_tramp_xsave:",
    "lea rsp, [rsp - 128]",
    "push qword ptr fs:[dvma_ast_ret@tpoff]",
    "pushfq",
    "push rax", "push rcx", "push rdx", "push rbx", "push rbp", "push rsi", "push rdi",
    "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "mov rbp, rsp",
    "mov rax, qword ptr [rip + {xsize}]",
    "sub rsp, rax",
    "and rsp, -64",
    "xor eax, eax",
    "mov qword ptr [rsp + 512], rax",
    "mov qword ptr [rsp + 520], rax",
    "mov qword ptr [rsp + 528], rax",
    "mov qword ptr [rsp + 536], rax",
    "mov qword ptr [rsp + 544], rax",
    "mov qword ptr [rsp + 552], rax",
    "mov qword ptr [rsp + 560], rax",
    "mov qword ptr [rsp + 568], rax",
    "mov eax, dword ptr [rip + {xlo}]",
    "mov edx, dword ptr [rip + {xhi}]",
    "xsave64 [rsp]",
    "cld",
    "call {upcall}",
    "mov eax, dword ptr [rip + {xlo}]",
    "mov edx, dword ptr [rip + {xhi}]",
    "xrstor64 [rsp]",
    "mov rsp, rbp",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
    "pop rdi", "pop rsi", "pop rbp", "pop rbx", "pop rdx", "pop rcx", "pop rax",
    "popfq",
    "ret 128",
    ".globl dvma_ast_tramp_xsave_end",
    "dvma_ast_tramp_xsave_end:",
    // ---- deliberately incomplete: no r10/r11, FXSAVE only ----------------
    ".p2align 4",
    ".globl dvma_ast_tramp_partial",
    "dvma_ast_tramp_partial:",
    "lea rsp, [rsp - 128]",
    "push qword ptr fs:[dvma_ast_ret@tpoff]",
    "pushfq",
    "push rax", "push rcx", "push rdx", "push rbx", "push rbp", "push rsi", "push rdi",
    "push r8", "push r9", "push r12", "push r13", "push r14", "push r15",
    "mov rbp, rsp",
    "sub rsp, 512",
    "and rsp, -64",
    "fxsave64 [rsp]",
    "cld",
    "call {upcall}",
    "fxrstor64 [rsp]",
    "mov rsp, rbp",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop r9", "pop r8",
    "pop rdi", "pop rsi", "pop rbp", "pop rbx", "pop rdx", "pop rcx", "pop rax",
    "popfq",
    "ret 128",
    ".globl dvma_ast_tramp_partial_end",
    "dvma_ast_tramp_partial_end:",
    body = sym crate::signals::dvma_sig_body,
    upcall = sym crate::signals::dvma_ast_upcall,
    xsize = sym DVMA_XSAVE_SIZE,
    xlo = sym DVMA_XCR0_LO,
    xhi = sym DVMA_XCR0_HI,
);

unsafe extern "C" {
    fn dvma_sigentry();
    fn dvma_sigentry_end();
    fn dvma_sigreturn();
    fn dvma_sigreturn_end();
    fn dvma_ast_tramp_full();
    fn dvma_ast_tramp_full_end();
    fn dvma_ast_tramp_xsave();
    fn dvma_ast_tramp_xsave_end();
    fn dvma_ast_tramp_partial();
    fn dvma_ast_tramp_partial_end();
}

/// Address of the signal entry stub.
pub fn sigentry_addr() -> usize {
    dvma_sigentry as *const () as usize
}

/// Address of the restorer stub.
pub fn sigreturn_addr() -> usize {
    dvma_sigreturn as *const () as usize
}

/// The trampoline in use (set at boot).
static TRAMPOLINE: AtomicUsize = AtomicUsize::new(0);

/// Is `pc` inside the entry/exit stubs or any trampoline?
pub fn in_stubs(pc: usize) -> bool {
    let ranges = [
        (
            dvma_sigentry as *const () as usize,
            dvma_sigentry_end as *const () as usize,
        ),
        (
            dvma_sigreturn as *const () as usize,
            dvma_sigreturn_end as *const () as usize,
        ),
        (
            dvma_ast_tramp_full as *const () as usize,
            dvma_ast_tramp_full_end as *const () as usize,
        ),
        (
            dvma_ast_tramp_xsave as *const () as usize,
            dvma_ast_tramp_xsave_end as *const () as usize,
        ),
        (
            dvma_ast_tramp_partial as *const () as usize,
            dvma_ast_tramp_partial_end as *const () as usize,
        ),
    ];
    ranges.iter().any(|&(a, b)| pc >= a && pc < b)
}

/// Is `pc` inside the interrupt entry or exit stub (`dvma_sigentry`,
/// `dvma_sigreturn`)? Async-signal-safe.
pub fn in_entry_stubs(pc: usize) -> bool {
    let ranges = [
        (
            dvma_sigentry as *const () as usize,
            dvma_sigentry_end as *const () as usize,
        ),
        (
            dvma_sigreturn as *const () as usize,
            dvma_sigreturn_end as *const () as usize,
        ),
    ];
    ranges.iter().any(|&(a, b)| pc >= a && pc < b)
}

/// The trampoline chosen at boot.
pub fn trampoline() -> usize {
    TRAMPOLINE.load(Relaxed)
}

/// The nesting count of traps on this thread (async-signal-safe).
#[inline(always)]
pub fn in_trap() -> u32 {
    let v: u32;
    // SAFETY: reads the calling thread's own TLS slot defined above.
    unsafe {
        core::arch::asm!("mov {0:e}, dword ptr fs:[dvma_in_trap@tpoff]", out(reg) v,
            options(nostack, readonly, preserves_flags));
    }
    v
}

/// Store the interrupted `rip` for the trampoline (async-signal-safe).
#[inline(always)]
pub fn set_ast_ret(rip: u64) {
    // SAFETY: writes the calling thread's own TLS slot defined above.
    unsafe {
        core::arch::asm!("mov qword ptr fs:[dvma_ast_ret@tpoff], {0}", in(reg) rip,
            options(nostack, preserves_flags));
    }
}

fn cpuid(leaf: u32, sub: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, sub)
}

/// The extended-state facts the trampoline needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XsaveInfo {
    /// XCR0.
    pub xcr0: u64,
    /// XSAVEC available.
    pub xsavec: bool,
    /// Area size for the chosen instruction.
    pub size: usize,
    /// AVX-512 enabled in XCR0.
    pub avx512: bool,
    /// AVX enabled in XCR0.
    pub avx: bool,
}

/// Read CPUID and XCR0.
pub fn xsave_info() -> XsaveInfo {
    let l1 = cpuid(1, 0);
    let has_xsave = l1.ecx & (1 << 26) != 0 && l1.ecx & (1 << 27) != 0; // XSAVE, OSXSAVE
    assert!(has_xsave, "dvma needs XSAVE (CPUID.1:ECX.XSAVE/OSXSAVE)");
    // SAFETY: OSXSAVE is set, so XGETBV(0) is permitted.
    let xcr0 = unsafe { core::arch::x86_64::_xgetbv(0) };
    let d1 = cpuid(0xD, 1);
    let xsavec = d1.eax & (1 << 1) != 0;
    let size = if xsavec {
        // Compacted size of the XCR0 components: sum them up (leaf 0xD,1
        // EBX also counts supervisor state, which we do not save).
        let mut off = 576usize;
        for i in 2..63u32 {
            if xcr0 & (1 << i) != 0 {
                let c = cpuid(0xD, i);
                if c.ecx & (1 << 1) != 0 {
                    off = off.next_multiple_of(64);
                }
                off += c.eax as usize;
            }
        }
        off
    } else {
        cpuid(0xD, 0).ebx as usize
    };
    XsaveInfo {
        xcr0,
        xsavec,
        size: size.next_multiple_of(64),
        avx512: xcr0 & 0xe0 == 0xe0,
        avx: xcr0 & 0x4 != 0,
    }
}

/// Set up the trampoline: extended-state size and mask, and the variant.
pub fn init_trampoline(save: AstSave) -> XsaveInfo {
    let x = xsave_info();
    DVMA_XSAVE_SIZE.store(x.size + 64, Relaxed);
    DVMA_XCR0_LO.store(x.xcr0 as u32, Relaxed);
    DVMA_XCR0_HI.store((x.xcr0 >> 32) as u32, Relaxed);
    let t = match (save, x.xsavec) {
        (AstSave::Partial, _) => dvma_ast_tramp_partial as *const () as usize,
        (AstSave::Full, true) => dvma_ast_tramp_full as *const () as usize,
        (AstSave::Full, false) => dvma_ast_tramp_xsave as *const () as usize,
    };
    TRAMPOLINE.store(t, Relaxed);
    x
}
