//! VT-d fault recording and the fault-event interrupt.
//!
//! A device access the unit blocks (an IOVA not mapped, or not with the
//! right the access needs) is recorded in a fault recording register
//! (FRCD: the page address, the source, the reason; F set) and, when no
//! fault was pending before (FSTS.PPF clear), the unit sends its fault
//! event: an MSI with the message in FEADDR/FEDATA, unless FECTL.IM
//! masks it. [`FaultLog::init`] points that message at the boot CPU's
//! local APIC with [`crate::intr::VTD_FAULT`] (vector 0xe0: priority class
//! 14, above every class CR8 holds under the `mask` spl) and unmasks it.
//!
//! The event is a kern interrupt like the disk's: [`establish`] gives it
//! a handler at IPL_HIGH (`vtd0 fault`), and the vector's trap
//! ([`trap`]) marks it pending on the CPU, whose trap dispatch runs it
//! unless the interrupted code is at IPL_HIGH (then `splx` does). The
//! handler calls [`FaultLog::interrupt`]: it counts the interrupt,
//! collects every record with F set (counts it, remembers its page
//! address and source id, clears F, which is write-1-to-clear) and clears
//! the overflow bit. The disk driver, when it reaps a command, asks
//! [`FaultLog::faulted_in`] whether a remembered fault of its function
//! (the record's source id) lies inside the command's IOVA range, and
//! claims (forgets) it if so: that fails the command, and only that one.
//! QEMU records the fault while the device maps the request, before it
//! completes it, so the interrupt has normally run by the time the
//! completion is reaped; when it has not (it goes to the boot CPU, which
//! may have interrupts off, while the completion is reaped on another),
//! the reaper collects the pending record itself (counted apart:
//! [`FaultLog::by_intr`] is what the interrupt collected).
//!
//! # Contexts
//! [`FaultLog::interrupt`]: the kern handler of the fault event
//! (interrupt context, IPL_HIGH, interrupts off; before [`establish`],
//! the vector's trap itself). It allocates nothing, prints nothing and
//! takes no lock: the records are collected under a flag it only *tries*
//! to take (if another CPU holds it, that CPU is collecting them). [`FaultLog::faulted_in`]: any
//! context; it may take the flag, with interrupts disabled (so the
//! handler never finds its own CPU's thread code holding it), spinning
//! only for another CPU's collection. [`FaultLog::init`]: boot.
//! [`establish`]: boot CPU, after kern has booted, before interrupts are
//! enabled. [`trap`]: the vector's trap.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

use kern::iommu::IOPAGE;
use kern::ipl::Ipl;

use super::{VTD, Vtd};
use crate::x86;

/// The kern interrupt the fault vector raises (its pending bit), or
/// `u64::MAX` before [`establish`].
static KERN_BIT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Give the fault event its kern interrupt handler (IPL_HIGH). Boot CPU,
/// after kern has booted, before interrupts are enabled.
pub fn establish() -> Result<(), kern::intr::IntrError> {
    let h = kern::intr::intr_establish(Ipl::High, "vtd0 fault", |_| VTD.fault.interrupt(&VTD))?;
    KERN_BIT.store(u64::from(h.bit()), Relaxed);
    Ok(())
}

/// The fault vector's trap: mark the kern interrupt pending on this CPU
/// (the trap's dispatch runs it), or, before [`establish`], collect the
/// records here. Interrupts off.
pub fn trap() {
    let bit = KERN_BIT.load(Relaxed);
    match (
        kern::kernel::try_kernel(),
        crate::md::PerCpu::current_index(),
    ) {
        (Some(k), Some(me)) if bit < 64 => k.cpu(me).line().set_local(1 << bit),
        _ => VTD.fault.interrupt(&VTD),
    }
}

const FSTS: usize = 0x34;
const FECTL: usize = 0x38;
const FEDATA: usize = 0x3c;
const FEADDR: usize = 0x40;
const FEUADDR: usize = 0x44;
const CAP: usize = 0x08;

/// FSTS: primary fault overflow (write-1-to-clear).
const FSTS_PFO: u32 = 1;
/// FSTS: primary pending fault (some record has F set).
const FSTS_PPF: u32 = 1 << 1;
/// FSTS: invalidation queue error (write-1-to-clear).
const FSTS_IQE: u32 = 1 << 4;

/// Remembered fault pages.
const RECENT: usize = 16;

/// The unit's fault records as the driver sees them.
#[derive(Debug)]
pub struct FaultLog {
    /// Held while the records are collected.
    collecting: AtomicBool,
    /// The fault event is programmed (FECTL unmasked).
    armed: AtomicBool,
    /// Fault-event interrupts taken.
    pub intrs: AtomicU64,
    /// Fault records collected (by anyone).
    pub records: AtomicU64,
    /// Of them, collected by the interrupt handler.
    pub by_intr: AtomicU64,
    /// Records whose page could not be remembered (the table was full)
    /// or faults the unit could not record (FSTS.PFO).
    pub lost: AtomicU64,
    /// Invalidation queue errors the event reported.
    pub queue_errors: AtomicU64,
    /// Faults not yet claimed by a command: the requester's source id in
    /// bits 48..64, the page address, bit 0 set (0: free).
    recent: [AtomicU64; RECENT],
}

impl Default for FaultLog {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultLog {
    /// Nothing recorded, the event not programmed.
    pub const fn new() -> Self {
        Self {
            collecting: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            intrs: AtomicU64::new(0),
            records: AtomicU64::new(0),
            by_intr: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            queue_errors: AtomicU64::new(0),
            recent: [const { AtomicU64::new(0) }; RECENT],
        }
    }

    /// Send the fault event to the local APIC `apic` with `vector`
    /// (fixed delivery, edge) and unmask it. Boot, before translation is
    /// enabled.
    pub(super) fn init(&self, v: &Vtd, apic: u32, vector: u8) {
        v.w32(FEDATA, u32::from(vector));
        v.w32(FEADDR, 0xfee0_0000 | (apic << 12));
        v.w32(FEUADDR, 0);
        v.w32(FECTL, 0);
        self.armed.store(true, Relaxed);
    }

    /// Is the fault event programmed?
    pub fn armed(&self) -> bool {
        self.armed.load(Relaxed)
    }

    /// The fault event's handler: collect the records. Interrupt context,
    /// interrupts off; allocates nothing, prints nothing, takes no lock
    /// (module docs).
    pub fn interrupt(&self, v: &Vtd) {
        self.intrs.fetch_add(1, Relaxed);
        if !v.enabled() {
            return;
        }
        if self
            .collecting
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_ok()
        {
            let n = self.collect(v);
            self.by_intr.fetch_add(n, Relaxed);
            self.collecting.store(false, Release);
        }
    }

    /// Count, remember and clear every record with F set; clear the
    /// overflow and queue-error bits. Under `collecting`. Returns the
    /// records collected.
    fn collect(&self, v: &Vtd) -> u64 {
        let cap = v.r64(CAP);
        let fro = ((cap >> 24) & 0x3ff) as usize * 16;
        let nfr = ((cap >> 40) & 0xff) as usize + 1;
        let mut n = 0;
        for i in 0..nfr {
            let hi = v.r64(fro + 16 * i + 8);
            if hi & (1 << 63) == 0 {
                continue;
            }
            n += 1;
            let page = v.r64(fro + 16 * i) & !(IOPAGE as u64 - 1) & ((1 << 48) - 1);
            // The source id: bits 64..80 of the record.
            let rec = (hi & 0xffff) << 48 | page | 1;
            if !self
                .recent
                .iter()
                .any(|e| e.compare_exchange(0, rec, Relaxed, Relaxed).is_ok())
            {
                self.lost.fetch_add(1, Relaxed);
            }
            // F is write-1-to-clear.
            v.w64(fro + 16 * i + 8, 1 << 63);
        }
        let fs = v.r32(FSTS);
        if fs & FSTS_PFO != 0 {
            self.lost.fetch_add(1, Relaxed);
        }
        if fs & FSTS_IQE != 0 {
            self.queue_errors.fetch_add(1, Relaxed);
        }
        // PFO and IQE are write-1-to-clear (PPF follows the records).
        v.w32(FSTS, fs & FSTS_PFO);
        self.records.fetch_add(n, Relaxed);
        n
    }

    /// Claim a remembered fault of source id `sid` inside `[iova, iova +
    /// len)`.
    fn claim(&self, sid: u16, iova: u64, len: usize) -> bool {
        let range = (iova & !(IOPAGE as u64 - 1))..iova + len as u64;
        let mut hit = false;
        for e in &self.recent {
            let x = e.load(Relaxed);
            if x != 0
                && (x >> 48) as u16 == sid
                && range.contains(&(x & ((1 << 48) - 1) & !1))
                && e.compare_exchange(x, 0, Relaxed, Relaxed).is_ok()
            {
                hit = true;
            }
        }
        hit
    }

    /// Did the device with source id `sid` fault inside `[iova, iova +
    /// len)`? Claims (forgets) the matching faults (a compare-and-swap:
    /// two disks never claim the same one). If none is remembered but the
    /// unit has one pending that the interrupt has not collected yet,
    /// collects it here first. Any context (module docs).
    pub fn faulted_in(&self, v: &Vtd, sid: u16, iova: u64, len: usize) -> bool {
        if !v.enabled() {
            return false;
        }
        if self.claim(sid, iova, len) {
            return true;
        }
        if v.r32(FSTS) & FSTS_PPF == 0 {
            return false;
        }
        x86::without_interrupts(|| {
            while self
                .collecting
                .compare_exchange_weak(false, true, Acquire, Relaxed)
                .is_err()
            {
                core::hint::spin_loop();
            }
            self.collect(v);
            self.collecting.store(false, Release);
        });
        self.claim(sid, iova, len)
    }
}
