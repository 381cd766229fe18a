//! The serial console (COM1, 16550 at I/O port 0x3f8) and the way out
//! (QEMU's `isa-debug-exit` device at port 0xf4).
//!
//! # Contexts
//! Thread and boot code print with [`kprint!`](crate::kprint) and
//! [`kprintln!`](crate::kprintln); interrupt
//! handlers print nothing (kern's rule), except the fatal exception path,
//! which prints and stops the machine. Printing takes the console lock
//! with interrupts disabled, so no handler can find it held by the code
//! it interrupted on the same CPU.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Release};

use crate::x86;

const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Program COM1: 115200 baud, 8N1, FIFOs on, no interrupts. Boot CPU,
/// before anything prints.
pub fn init() {
    // SAFETY: the standard 16550 programming sequence on COM1, which only
    // this module touches.
    unsafe {
        x86::outb(COM1 + 1, 0x00); // no interrupts
        x86::outb(COM1 + 3, 0x80); // DLAB
        x86::outb(COM1, 0x01); // divisor 1: 115200
        x86::outb(COM1 + 1, 0x00);
        x86::outb(COM1 + 3, 0x03); // 8N1
        x86::outb(COM1 + 2, 0xc7); // FIFOs on, cleared
        x86::outb(COM1 + 4, 0x03); // DTR | RTS
    }
}

fn putb(b: u8) {
    // SAFETY: polls the line-status register and writes the data register
    // of COM1 (see `init`).
    unsafe {
        while x86::inb(COM1 + 5) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        x86::outb(COM1, b);
    }
}

struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                putb(b'\r');
            }
            putb(b);
        }
        Ok(())
    }
}

/// Print formatted text (what [`kprint!`](crate::kprint) expands to).
pub fn print(args: fmt::Arguments<'_>) {
    x86::without_interrupts(|| {
        while LOCK
            .compare_exchange_weak(false, true, Acquire, core::sync::atomic::Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        let _ = Serial.write_fmt(args);
        LOCK.store(false, Release);
    })
}

/// Print without taking the lock: the fatal path (an exception, a panic),
/// which may have interrupted a holder and stops the machine afterwards.
pub fn print_fatal(args: fmt::Arguments<'_>) {
    let _ = Serial.write_fmt(args);
}

/// Print to the serial console.
#[macro_export]
macro_rules! kprint {
    ($($a:tt)*) => { $crate::console::print(format_args!($($a)*)) };
}

/// Print a line to the serial console.
#[macro_export]
macro_rules! kprintln {
    () => { $crate::console::print(format_args!("\n")) };
    ($($a:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($a)*))) };
}

/// Leave QEMU with guest status `code` (QEMU exits with `code * 2 + 1`;
/// the host runner undoes that). Never returns.
pub fn exit(code: u8) -> ! {
    // SAFETY: the isa-debug-exit device stops the virtual machine; without
    // it (a misconfigured QEMU) the write is ignored and we halt.
    unsafe { x86::outl(DEBUG_EXIT, u32::from(code)) };
    x86::halt_forever()
}
