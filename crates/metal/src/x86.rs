//! Privileged x86-64 instructions, each behind a small function.
//!
//! Everything here runs at CPL 0 (the whole kernel does). Port and MSR
//! accesses are `unsafe fn`s: what they do depends on the device or
//! register, so the caller states why it is right. The rest (flags, CR8,
//! the TSC, `cli`/`sti` around a closure) cannot break memory safety by
//! itself and is safe.
//!
//! # Contexts
//! Any: thread code, interrupt handlers, the boot path.

use core::arch::asm;

/// Write `v` to I/O port `port`.
///
/// # Safety
/// 1. Writing `v` to `port` is what the caller means to do to that device
///    and touches no memory the program relies on (no DMA is set up here).
#[inline(always)]
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Write `v` to the 32-bit I/O port `port`.
///
/// # Safety
/// 1. As for [`outb`].
#[inline(always)]
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Read I/O port `port`.
///
/// # Safety
/// 1. Reading `port` has no side effect the caller does not intend.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Read MSR `msr`.
///
/// # Safety
/// 1. `msr` exists on this CPU (else #GP).
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Write MSR `msr`.
///
/// # Safety
/// 1. `msr` exists on this CPU and `v` is a value the caller means: MSRs
///    change how the CPU addresses memory (the GS base, EFER, ...).
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
            options(nostack, preserves_flags))
    }
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter; CR4.TSD is clear, and it is CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// RFLAGS.
#[inline(always)]
pub fn rflags() -> u64 {
    let f: u64;
    // SAFETY: pushes and pops on the current stack, reads a register.
    unsafe { asm!("pushfq", "pop {}", out(reg) f, options(nomem, preserves_flags)) }
    f
}

/// Are interrupts enabled (RFLAGS.IF)?
#[inline(always)]
pub fn interrupts_enabled() -> bool {
    rflags() & (1 << 9) != 0
}

/// Run `f` with interrupts disabled, then restore RFLAGS.IF as it was.
#[inline(always)]
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    let on = interrupts_enabled();
    // SAFETY: `cli` only defers interrupts; it is undone below.
    unsafe { asm!("cli", options(nomem, nostack)) }
    let r = f();
    if on {
        // SAFETY: interrupts were enabled when we came in.
        unsafe { asm!("sti", options(nomem, nostack)) }
    }
    r
}

/// Enable interrupts.
#[inline(always)]
pub fn sti() {
    // SAFETY: the IDT is loaded before the first caller runs (boot order in
    // `metal_main`): an interrupt has somewhere to go.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// CR8, the task-priority register: interrupts of priority class
/// (vector >> 4) at or below it are held.
#[inline(always)]
pub fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: reads a control register.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Set CR8 (see [`read_cr8`]). Raising or lowering the task priority only
/// delays or releases interrupts, whose handlers are all installed.
#[inline(always)]
pub fn write_cr8(v: u64) {
    // SAFETY: as above; `v` is truncated by the CPU to 4 bits (a class),
    // higher bits must be zero: masked here.
    unsafe { asm!("mov cr8, {}", in(reg) v & 0xf, options(nomem, nostack, preserves_flags)) }
}

/// CR2, the address of the last page fault.
#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reads a control register.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Stop this CPU for good (interrupts off, `hlt` forever).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops the CPU; nothing resumes it but NMI/reset.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
