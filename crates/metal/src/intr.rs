//! Interrupts: vectors, the kern trap entry, the AST frame push.
//!
//! Every source is the local APIC; the legacy 8259s are remapped to
//! 0x20-0x2f and masked. A vector per hardware IPL, chosen so that its
//! priority class (`vector >> 4`) orders like the IPLs, so that the
//! task-priority register (`CR8`) is the hardware IPL of the `mask` spl:
//!
//! | IPL | vector | CR8 while at that IPL (`mask` spl) |
//! |---|---|---|
//! | (wake an idle CPU) | 0x30 | |
//! | bio (and the virtio-blk disks' MSI-X, 0x41 + disk index) | 0x40 | 4 |
//! | net | 0x50 | 5 |
//! | tty | 0x60 | 6 |
//! | vm | 0x70 | 7 |
//! | sched (and the LAPIC timer, 0x81) | 0x80 | 8 |
//! | high | 0x90 | 9 |
//! | (the VT-d fault event, [`VTD_FAULT`]; its kern handler is at high) | 0xe0 | never held |
//!
//! A kick at level L is an IPI with L's vector: CR8 at L or above holds it
//! in the APIC until the level drops (`mask`); with the `lazy` spl CR8 stays
//! 0 and kern's dispatch defers what the IPL word blocks, as on Linux.
//!
//! [`interrupt`] is the trap for vectors 32-255 (`trap.rs`): EOI first (the
//! pending word, not the APIC's in-service register, says what runs), the
//! timer marks kern's clock vector pending on CPU 0 once every
//! [`TICK_NS`] (hardclock) and ticks the storm device if one is attached
//! ([`set_storm`]), then
//! [`kern::intr::trap`] runs what is pending above the interrupted IPL,
//! softints, and decides on the AST push; `CR8` is put back as it was on
//! the way in, as `sigreturn` restores the signal mask on Linux.
//!
//! # Differences from the Linux machine
//! Traps do not nest: interrupts stay disabled for the whole trap (one IST
//! stack per CPU, which a nested trap would overwrite). A higher-level
//! source posted while a lower handler runs is taken by the same trap's
//! dispatch loop when the handler returns (it re-reads the pending word),
//! not by preempting it. Thread code runs with interrupts enabled, and
//! `splx` replays run there, so interrupts do land on top of replayed
//! handlers as on Linux.
//!
//! # The AST push
//! [`MetalFrame::push_upcall`] edits the `iretq` frame on the IST stack:
//! it stores the interrupted `rip` below the interrupted stack's red zone
//! (`rsp - 128 - 8`), moves the saved `rsp` there and sets the saved `rip`
//! to the trampoline. After `iretq` the thread runs the trampoline on its
//! own stack: it saves the flags, the fifteen general registers and the
//! FXSAVE state, calls [`kern::ast::upcall`] (thread context: it may
//! sleep), restores everything and returns with `ret 128`, which pops the
//! interrupted `rip` and steps back over the red zone, leaving `rsp` as it
//! was. A trap that lands inside the trampoline says so
//! (`interrupted_trap`), and kern pushes nothing there.
//!
//! # Contexts
//! [`interrupt`] runs in a trap: interrupts disabled, on IST1. Like every
//! kern interrupt handler it allocates nothing, prints nothing and takes no
//! lock that thread code may hold.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kern::intr::TrapFrame;
use kern::ipl::Ipl;

use crate::trap::Regs;
use crate::{lapic, x86};

/// Vectors of the (masked) 8259s, should one fire anyway: 0x20-0x2f.
pub const PIC_BASE: u8 = 0x20;
/// The IPI that wakes an idle CPU (ends its `hlt`).
pub const WAKE: u8 = 0x30;
/// The LAPIC timer (the clock; IPL_SCHED's class).
pub const TIMER: u8 = 0x81;
/// Disk 0's MSI-X vector (IPL_BIO's class; `virtio.rs`); disk `i` has
/// `DISK + i`.
pub const DISK: u8 = 0x41;
/// Disks with a vector of their own (0x41..=0x48, all in IPL_BIO's class).
pub const MAX_DISKS: usize = 8;

/// The VT-d unit's fault event (`vtd/fault.rs`): class 14, above every
/// class CR8 holds; its trap marks the fault's kern interrupt (IPL_HIGH)
/// pending on the CPU it lands on, as the disk's does.
pub const VTD_FAULT: u8 = 0xe0;

/// The kern interrupt each disk's vector raises: its bit in the pending
/// word, or `u64::MAX` for none.
static DISK_BIT: [AtomicU64; MAX_DISKS] = [const { AtomicU64::new(u64::MAX) }; MAX_DISKS];

/// From now on a trap of disk `disk`'s vector (`DISK + disk`) marks `h`
/// pending on the CPU it lands on (the disk driver points the device's
/// MSI-X message at the CPU kern chose). Any context.
pub fn route_disk(disk: usize, h: kern::intr::IntrHandle) {
    DISK_BIT[disk].store(u64::from(h.bit()), Relaxed);
}
/// The APIC's spurious vector.
pub const SPURIOUS: u8 = 0xff;

/// Interrupts that arrived with no source attached to their vector.
pub static UNEXPECTED: AtomicU64 = AtomicU64::new(0);
/// LAPIC timer interrupts taken.
pub static TICKS: AtomicU64 = AtomicU64::new(0);

/// The clock tick (hardclock's period).
pub const TICK_NS: u64 = 10_000_000;
/// When the next hardclock is due (`clock::nanotime`).
static NEXT_CLOCK: AtomicU64 = AtomicU64::new(0);

/// A device the timer ticks on every interrupt (the race's storm), or
/// null.
static STORM: core::sync::atomic::AtomicPtr<kern::race::RaceKit> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Program the LAPIC timer to interrupt every `period_ns` (hardclock
/// stays at [`TICK_NS`]). Thread or boot context of CPU 0.
pub fn timer_period(period_ns: u64) {
    let count = crate::clock::lapic_hz() * period_ns / 1_000_000_000;
    lapic::timer_periodic(TIMER, count.clamp(1, u64::from(u32::MAX)) as u32);
}

/// Attach (`Some`) or detach (`None`) the storm device: every timer
/// interrupt calls its `device_tick` (complete a request, post the
/// interrupt), as the storm's host thread does on Linux. Thread context of
/// CPU 0.
///
/// # Safety
/// 1. An attached kit stays alive until it is detached again (the timer
///    interrupts CPU 0 only, and its trap cannot be running while this
///    thread, on CPU 0, detaches it).
pub unsafe fn set_storm(kit: Option<&kern::race::RaceKit>) {
    let p = kit.map_or(core::ptr::null_mut(), |k| {
        k as *const kern::race::RaceKit as *mut _
    });
    STORM.store(p, Relaxed);
}

/// The vector of hardware IPL `level` (`None` for a soft level).
pub fn vector_of(level: Ipl) -> Option<u8> {
    level.hard_index().map(|i| 0x40 + 0x10 * i as u8)
}

/// The hardware IPL whose class `vector` is in (`Ipl::None` below bio).
pub fn level_of(vector: u8) -> Ipl {
    let class = vector >> 4;
    if class < 4 {
        return Ipl::None;
    }
    Ipl::HARD
        .get(usize::from(class - 4))
        .copied()
        .unwrap_or(Ipl::High)
}

/// The CR8 value that holds every interrupt at or below `level` (`mask`
/// spl): its vector's class, or 0 below bio.
pub fn cr8_of(level: Ipl) -> u64 {
    vector_of(level).map_or(0, |v| u64::from(v >> 4))
}

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

/// The interrupted context, as kern's trap sees it.
struct MetalFrame<'a> {
    r: &'a mut Regs,
    level: Ipl,
}

impl TrapFrame for MetalFrame<'_> {
    fn signal_level(&self) -> Ipl {
        self.level
    }

    fn sp(&self) -> usize {
        self.r.rsp as usize
    }

    fn interrupted_trap(&self) -> bool {
        // Traps do not nest (interrupts are off in them), so the only code
        // of ours a trap can land in is the trampoline.
        crate::md::in_trampoline(self.r.rip as usize)
    }

    fn push_upcall(&mut self) {
        let sp = self.r.rsp as usize - 128 - 8;
        // SAFETY: kern pushes only onto a kernel thread's stack with at
        // least `kern::ast::AST_STACK_RESERVE` bytes left below `rsp`
        // (`frame_push_ok`), so `sp` is inside that stack, below the red
        // zone, and nothing live is there: with the interrupt stack off the
        // trap's own frame starts below a 16-byte slot kept free for this
        // (`trap.rs`).
        unsafe { (sp as *mut u64).write(self.r.rip) };
        self.r.rsp = sp as u64;
        self.r.rip = crate::md::trampoline() as u64;
    }
}

/// A trap on vector 32..=255.
pub fn interrupt(r: &mut Regs) {
    // The CPU's halted time ends where its wake-up trap begins.
    crate::md::end_halt();
    let v = r.vector as u8;
    if v == SPURIOUS {
        return; // no EOI for the spurious vector
    }
    if (PIC_BASE..PIC_BASE + 16).contains(&v) {
        // A masked 8259's spurious IRQ 7 or 15: not the APIC's to EOI.
        UNEXPECTED.fetch_add(1, Relaxed);
        return;
    }
    lapic::eoi();
    if v == VTD_FAULT {
        crate::vtd::fault::trap();
    } else if v == TIMER {
        TICKS.fetch_add(1, Relaxed);
        let now = crate::clock::nanotime();
        if let Some(k) = kern::kernel::try_kernel()
            && now >= NEXT_CLOCK.load(Relaxed)
        {
            NEXT_CLOCK.store(now + TICK_NS, Relaxed);
            // The clock device of CPU 0 posts on its own CPU, in its own
            // trap: set the bit and let this trap's dispatch run it.
            k.cpu(0).line().set_local(1 << k.clock_vector().bit());
        }
        // SAFETY: a non-null pointer is a kit that `set_storm`'s caller
        // keeps alive until it detaches it (its contract).
        if let Some(kit) = unsafe { STORM.load(Relaxed).as_ref() } {
            kit.device_tick();
        }
    } else if (DISK..DISK + MAX_DISKS as u8).contains(&v) {
        let bit = DISK_BIT[usize::from(v - DISK)].load(Relaxed);
        match (
            kern::kernel::try_kernel(),
            crate::md::PerCpu::current_index(),
        ) {
            (Some(k), Some(me)) if bit < 64 => k.cpu(me).line().set_local(1 << bit),
            _ => {
                UNEXPECTED.fetch_add(1, Relaxed);
            }
        }
    } else if v != WAKE && vector_of(level_of(v)) != Some(v) {
        UNEXPECTED.fetch_add(1, Relaxed);
    }
    let cr8 = x86::read_cr8();
    // What it returns (handlers ran in the idle loop's sleep window) needs
    // nothing here: `idle_wait` looks at the word with interrupts disabled
    // and sleeps with `sti; hlt`, and the handlers left the word at POLL.
    kern::intr::trap(&mut MetalFrame {
        level: level_of(v),
        r,
    });
    x86::write_cr8(cr8);
}
