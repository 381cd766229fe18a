//! Time: the TSC as `nanotime`, and the LAPIC timer's rate, both
//! calibrated once at boot against the 8254 PIT's channel 2 (its gate and
//! output are readable through port 0x61, so no interrupt is needed).
//!
//! # Contexts
//! [`calibrate`]: the boot CPU, once, before kern boots. [`nanotime`]:
//! any context (a multiplication of the TSC; no lock).

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::{lapic, x86};

/// The PIT's input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// Calibration window, PIT ticks (20 ms).
const PIT_COUNT: u64 = PIT_HZ / 50;

static T0: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick, 32.32 fixed point.
static MULT: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static LAPIC_HZ: AtomicU64 = AtomicU64::new(0);

/// Measure the TSC's and the LAPIC timer's (divided by 16) rates over
/// 20 ms of PIT channel 2. Boot CPU, interrupts disabled.
pub fn calibrate() {
    // SAFETY: port 0x61 bit 0 is channel 2's gate, bit 1 the speaker
    // (kept off); 0x43/0x42 program channel 2 (mode 0, one shot, binary),
    // which nothing else uses.
    unsafe {
        let p = x86::inb(0x61);
        x86::outb(0x61, (p & !0x02) | 0x01);
        x86::outb(0x43, 0b1011_0000);
        x86::outb(0x42, PIT_COUNT as u8);
        x86::outb(0x42, (PIT_COUNT >> 8) as u8);
    }
    lapic::timer_start_oneshot_masked();
    let (t0, l0) = (x86::rdtsc(), lapic::timer_current());
    // SAFETY: reading port 0x61 (bit 5: channel 2's output, high at the
    // terminal count).
    while unsafe { x86::inb(0x61) } & 0x20 == 0 {
        core::hint::spin_loop();
    }
    let (t1, l1) = (x86::rdtsc(), lapic::timer_current());
    let tsc_hz = (t1 - t0) * PIT_HZ / PIT_COUNT;
    let lapic_hz = u64::from(l0 - l1) * PIT_HZ / PIT_COUNT;
    TSC_HZ.store(tsc_hz, Relaxed);
    LAPIC_HZ.store(lapic_hz, Relaxed);
    MULT.store(
        ((1_000_000_000u128 << 32) / u128::from(tsc_hz.max(1))) as u64,
        Relaxed,
    );
    T0.store(t1, Relaxed);
}

/// Nanoseconds since calibration.
#[inline]
pub fn nanotime() -> u64 {
    let d = x86::rdtsc().wrapping_sub(T0.load(Relaxed));
    ((u128::from(d) * u128::from(MULT.load(Relaxed))) >> 32) as u64
}

/// The TSC's rate, Hz.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Relaxed)
}

/// The LAPIC timer's rate after its divide-by-16, Hz.
pub fn lapic_hz() -> u64 {
    LAPIC_HZ.load(Relaxed)
}
