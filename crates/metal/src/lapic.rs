//! The local APIC (xAPIC, memory-mapped at `IA32_APIC_BASE`, normally
//! `0xfee0_0000`, which `boot.rs` maps uncached): end of interrupt, the
//! timer, inter-processor interrupts, and the task-priority register that
//! `CR8` aliases.
//!
//! xAPIC rather than x2APIC: QEMU's TCG emulates only the xAPIC in the
//! version Debian ships, and the tests must run without KVM too.
//!
//! # Contexts
//! [`eoi`], [`send_ipi`] and [`irr_pending`] are called from traps and
//! thread code alike; an IPI to another CPU writes two registers, so it
//! does so with interrupts disabled (a handler's own IPI in between would
//! change the destination). The rest is boot code of the CPU itself.

use crate::x86;

const ID: usize = 0x20;
const SVR: usize = 0xf0;
const EOI: usize = 0xb0;
const TPR: usize = 0x80;
const IRR: usize = 0x200;
const ICR_LO: usize = 0x300;
const ICR_HI: usize = 0x310;
const LVT_TIMER: usize = 0x320;
const LVT_LINT0: usize = 0x350;
const LVT_LINT1: usize = 0x360;
const LVT_ERROR: usize = 0x370;
const TIMER_INIT: usize = 0x380;
const TIMER_CUR: usize = 0x390;
const TIMER_DIV: usize = 0x3e0;

const MASKED: u32 = 1 << 16;
const PERIODIC: u32 = 1 << 17;
const IA32_APIC_BASE: u32 = 0x1b;
/// The architectural default base; [`init`] checks the MSR says so.
const BASE: usize = 0xfee0_0000;

fn reg(off: usize) -> *mut u32 {
    (BASE + off) as *mut u32
}

fn read(off: usize) -> u32 {
    // SAFETY: `off` is one of the register offsets above, inside the APIC
    // page that `boot.rs` maps (uncached); a read has no side effect.
    unsafe { core::ptr::read_volatile(reg(off)) }
}

fn write(off: usize, v: u32) {
    // SAFETY: as in `read`; every write below programs the register the
    // caller means (documented at each call).
    unsafe { core::ptr::write_volatile(reg(off), v) }
}

/// Enable this CPU's APIC: software enable with spurious vector
/// `spurious`, task priority 0, LINT0/LINT1 and the error LVT masked (the
/// 8259s are masked and no NMI source is used). Each CPU, at boot,
/// interrupts disabled.
pub fn init(spurious: u8) {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU.
    let base = unsafe { x86::rdmsr(IA32_APIC_BASE) };
    assert_eq!(
        base as usize & !0xfff,
        BASE,
        "the local APIC is not at {BASE:#x}"
    );
    if base & (1 << 11) == 0 {
        // SAFETY: sets the global-enable bit, keeping the base.
        unsafe { x86::wrmsr(IA32_APIC_BASE, base | (1 << 11)) };
    }
    write(LVT_LINT0, MASKED);
    write(LVT_LINT1, MASKED);
    write(LVT_ERROR, MASKED);
    write(LVT_TIMER, MASKED);
    write(TPR, 0);
    write(SVR, 0x100 | u32::from(spurious));
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    read(ID) >> 24
}

/// End of interrupt (the in-service vector of highest priority).
#[inline]
pub fn eoi() {
    write(EOI, 0);
}

/// Is `vector` requested (in the IRR: raised, not yet accepted)?
#[inline]
pub fn irr_pending(vector: u8) -> bool {
    let v = usize::from(vector);
    read(IRR + 0x10 * (v / 32)) & (1 << (v % 32)) != 0
}

/// Where an IPI goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The sending CPU (the "self" shorthand).
    SelfCpu,
    /// The CPU with this APIC id.
    Apic(u32),
}

/// The ICR's low word's address (for a test that sends a self-IPI from
/// inside an assembly block).
pub const ICR_LO_ADDR: usize = BASE + ICR_LO;

/// The ICR command of a fixed self-IPI with `vector`.
pub const fn self_ipi_command(vector: u8) -> u32 {
    (1 << 14) | (1 << 18) | vector as u32
}

/// Send a fixed, edge-triggered IPI with `vector`.
pub fn send_ipi(dest: Dest, vector: u8) {
    const ASSERT: u32 = 1 << 14;
    const SELF: u32 = 1 << 18;
    const PENDING: u32 = 1 << 12;
    x86::without_interrupts(|| {
        while read(ICR_LO) & PENDING != 0 {
            core::hint::spin_loop();
        }
        match dest {
            Dest::SelfCpu => write(ICR_LO, ASSERT | SELF | u32::from(vector)),
            Dest::Apic(id) => {
                write(ICR_HI, id << 24);
                write(ICR_LO, ASSERT | u32::from(vector));
            }
        }
    })
}

/// Send INIT (assert) to the CPU with APIC id `id`.
pub fn send_init(id: u32) {
    x86::without_interrupts(|| {
        write(ICR_HI, id << 24);
        write(ICR_LO, (1 << 14) | (0b101 << 8));
    })
}

/// Send a startup IPI to the CPU with APIC id `id`: it starts in real
/// mode at `page << 12`.
pub fn send_sipi(id: u32, page: u8) {
    x86::without_interrupts(|| {
        write(ICR_HI, id << 24);
        write(ICR_LO, (1 << 14) | (0b110 << 8) | u32::from(page));
    })
}

/// Timer divide configuration: divide by 16.
const DIV16: u32 = 0b0011;

/// Start the timer counting down from its maximum, masked (for
/// calibration).
pub fn timer_start_oneshot_masked() {
    write(TIMER_DIV, DIV16);
    write(LVT_TIMER, MASKED);
    write(TIMER_INIT, u32::MAX);
}

/// The timer's current count.
pub fn timer_current() -> u32 {
    read(TIMER_CUR)
}

/// Make the timer interrupt with `vector` every `count` ticks of its
/// divided clock (divide by 16).
pub fn timer_periodic(vector: u8, count: u32) {
    write(TIMER_DIV, DIV16);
    write(LVT_TIMER, PERIODIC | u32::from(vector));
    write(TIMER_INIT, count.max(1));
}
