//! Interrupts.
//!
//! The legacy 8259 PICs are remapped out of the exception vectors and
//! masked: every interrupt source of this kernel is the local APIC.
//!
//! # Contexts
//! [`interrupt`] runs in a trap (interrupts disabled, on IST1).

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::trap::Regs;
use crate::x86;

/// Vectors of the (masked) 8259s, should one fire anyway: 0x20-0x2f.
pub const PIC_BASE: u8 = 0x20;

/// Interrupts that arrived with no source attached to their vector.
pub static UNEXPECTED: AtomicU64 = AtomicU64::new(0);

/// Remap both 8259s to [`PIC_BASE`] and mask every line. Boot CPU, once,
/// interrupts disabled.
pub fn pic_disable() {
    // SAFETY: the standard ICW1-ICW4 initialisation of the two PICs at
    // ports 0x20/0x21 and 0xa0/0xa1, then OCW1 masking every line; nothing
    // else in the kernel drives them.
    unsafe {
        x86::outb(0x20, 0x11);
        x86::outb(0xa0, 0x11);
        x86::outb(0x21, PIC_BASE);
        x86::outb(0xa1, PIC_BASE + 8);
        x86::outb(0x21, 4);
        x86::outb(0xa1, 2);
        x86::outb(0x21, 1);
        x86::outb(0xa1, 1);
        x86::outb(0x21, 0xff);
        x86::outb(0xa1, 0xff);
    }
}

/// A trap on vector 32..=255.
pub fn interrupt(_r: &mut Regs) {
    UNEXPECTED.fetch_add(1, Relaxed);
}
