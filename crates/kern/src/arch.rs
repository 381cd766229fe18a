//! x86-64 code that every x86-64 machine shares (NetBSD's `sys/arch/x86`):
//! `cpu_switchto` and the first frame of a new kernel thread.
//!
//! Both machines that run kern on x86-64, the Linux process (`machine`)
//! and the bare-metal kernel (`metal`), switch kernel threads the same way:
//! the System V ABI's callee-saved registers on the old stack, the stack
//! pointer into the old thread, the new one's stack pointer loaded, its
//! registers popped. What differs between them (how an interrupt enters,
//! the AST trampoline, where stacks come from) stays in each machine.
//!
//! | symbol | what it is |
//! |---|---|
//! | `dvma_md_switch` | [`crate::md::cpu_switchto`]: push rbp, rbx, r12-r15; store rsp into `*from`; load `to`; pop; `ret` |
//! | `dvma_thread_start` | where a new thread's first switch returns: calls `entry(arg)` from r13/r12 on a clean, 16-byte aligned frame, the outermost of the unwind chain |
//! | [`thread_frame`] | builds the frame that the first switch to a new stack pops (an `Md::thread_init`) |
//!
//! The MXCSR and x87 control words are callee-saved too, but kernel
//! threads never change them, so the switch leaves them alone.
//!
//! # Contexts
//! `dvma_md_switch` runs in thread context at IPL_SCHED or above, on the
//! CPU that owns both contexts ([`crate::md::cpu_switchto`]'s obligations).
//! [`thread_frame`] writes only the stack it is given; any context.
//!
//! Not built for kern's own unit tests, loom or Miri: their fake machine
//! switches host threads instead (`md::test_md`).

#[cfg(not(any(test, loom, miri)))]
core::arch::global_asm!(
    ".pushsection .text.dvma_switch, \"ax\"",
    // ---- cpu_switchto: dvma_md_switch(from: *mut usize, to: usize) -------
    ".p2align 4",
    ".globl dvma_md_switch",
    "dvma_md_switch:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov rsp, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // A new thread's first switch lands here (`thread_frame`): the entry is
    // in r13, its argument in r12. It is the outermost frame.
    ".p2align 4",
    ".globl dvma_thread_start",
    "dvma_thread_start:",
    ".cfi_startproc",
    ".cfi_undefined rip",
    "mov rdi, r12",
    "and rsp, -16",
    "xor ebp, ebp",
    "call r13",
    "ud2",
    ".cfi_endproc",
    ".popsection",
);

#[cfg(not(any(test, loom, miri)))]
unsafe extern "C" {
    fn dvma_thread_start();
}

/// Build the first frame of a kernel thread below `top` (an
/// `Md::thread_init`): the first `cpu_switchto` to the returned stack
/// pointer pops zeroed callee-saved registers (r12 = `arg`, r13 =
/// `entry`) and returns into `dvma_thread_start`, which calls
/// `entry(arg)`.
///
/// # Safety
/// 1. `top` is the 16-byte aligned top of a writable stack of at least 64
///    bytes that nothing else uses.
#[cfg(not(any(test, loom, miri)))]
pub unsafe fn thread_frame(top: usize, entry: extern "C" fn(usize) -> !, arg: usize) -> usize {
    let frame: [usize; 8] = [
        0,                                       // r15
        0,                                       // r14
        entry as usize,                          // r13
        arg,                                     // r12
        0,                                       // rbx
        0,                                       // rbp
        dvma_thread_start as *const () as usize, // return address
        0,                                       // end of the frame chain
    ];
    let sp = top - frame.len() * 8;
    // SAFETY: by obligation 1, [sp, top) is ours to write.
    unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), sp as *mut usize, frame.len()) };
    sp
}
