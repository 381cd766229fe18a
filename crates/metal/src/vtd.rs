//! Intel VT-d as kern's `Iommu`: root and context tables, second-level
//! page tables; invalidation (queued, or register-based: [`inval`]) and
//! fault recording with its interrupt ([`fault`]).
//!
//! [`init`] (boot CPU, before the other CPUs start) finds the remapping
//! unit in the ACPI DMAR table, maps its registers uncached, builds one
//! domain for the PCI functions it is given (every virtio-blk disk): a
//! root entry for each of their buses, a context entry for each
//! device/function, all pointing at the same 3-level (or 4-level, as the
//! unit's SAGAW allows) second-level table, whose leaf tables are all
//! preallocated (static, zeroed) for [`SPAN`] bytes of IOVA space; then it
//! sets the root table pointer, sets up queued invalidation if the unit
//! has it (ECAP.QI), invalidates the context cache and the IOTLB
//! (global), points the fault event at the boot CPU and enables
//! translation.
//!
//! # One shared domain
//! Every disk is in domain 1, with one set of page tables. kern's bus_dma
//! has one IOVA space per kernel (`kern::bus_dma::Domain`: one arena, one
//! `Iommu`), and `Iommu::enter` is not told which device a mapping is
//! for: an sd unit's tag allocates from the same window as every other
//! unit's, and `permanent`/`shadow` share one pool (a ccd's buffer,
//! allocated by its first component, is loaded by all of them). One
//! domain per function would need a device in the `Iommu` interface and a
//! window per device in kern, and `permanent` buffers mapped in each. The
//! cost of sharing: a disk can reach what another disk's DVMA mappings
//! expose (as every device of the Linux machine shares its DVMA window),
//! though never memory nothing maps. Each driver's queue memory has its
//! own IOVA above the window ([`Vtd::map_driver`]). A fault record names
//! its requester (the function's source id), and [`Vtd::faulted_in`]
//! matches it with the disk's commands only.
//!
//! kern's bus_dma gets the first [`WINDOW`] bytes ([`Iommu::size`]); the
//! driver maps its own queue memory above them ([`Vtd::map_driver`]).
//! `enter` and `remove` write leaf entries (atomic stores: no allocation)
//! and then invalidate the IOTLB for the range (page-selective where the
//! unit allows). `remove` always does; `enter` when it replaced a present
//! entry (`slots` reusing a slot for another buffer) or when the unit is
//! in caching mode (CAP.CM: it may cache not-present entries), which
//! QEMU's unit is (`caching-mode=on`): there strict mode pays one
//! invalidation per load as well as one per unload. An invalidation is a
//! descriptor and a wait descriptor on the invalidation queue, the CPU
//! polling the wait's status write ([`inval`]), serialised with
//! interrupts disabled, so an interrupt handler that unloads a map cannot
//! deadlock with thread code of its CPU.
//!
//! A device access to an IOVA that is not mapped (or not with the right
//! it needs) is blocked by the unit and recorded in its fault recording
//! registers with the requester's source id; the fault event interrupt
//! collects the records ([`fault::FaultLog::interrupt`]) and
//! [`Vtd::faulted_in`] lets the driver fail the command whose IOVA
//! faulted.
//!
//! # Contexts
//! `init`, `map_driver`: boot CPU, at boot. `enter`, `remove`,
//! `faulted_in`: any context. The fault event's kern interrupt handler
//! (IPL_HIGH): `fault.interrupt` (see [`fault`]).

pub mod fault;
pub mod inval;

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

use kern::iommu::{DmaAccess, IOPAGE, Iommu, IommuError, Iova};
use kern::vm::Paddr;

use crate::pci::Function;

/// IOVA bytes given to kern's bus_dma.
pub const WINDOW: u64 = 64 << 20;
/// IOVA bytes the page tables cover: the window, then the driver's own.
pub const SPAN: u64 = 128 << 20;
const LEAVES: usize = (SPAN >> 21) as usize;

const VER: usize = 0x00;
const CAP: usize = 0x08;
const ECAP: usize = 0x10;
const GCMD: usize = 0x18;
const GSTS: usize = 0x1c;
const RTADDR: usize = 0x20;

const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const GCMD_QIE: u32 = 1 << 26;
/// GCMD bits that stay set (GCMD is written whole; GSTS reports them):
/// TE, QIE, IRE, CFI.
const GCMD_KEEP: u32 = GCMD_TE | GCMD_QIE | (1 << 25) | (1 << 23);

/// The domain id of every disk's context entry.
const DOMAIN: u16 = 1;

/// A 4 KiB table of 512 entries.
#[repr(C, align(4096))]
struct Table([AtomicU64; 512]);

impl Table {
    const fn new() -> Self {
        Table([const { AtomicU64::new(0) }; 512])
    }
}

/// PCI buses whose functions can be behind the unit (a context table
/// each).
const BUSES: usize = 4;

/// The unit and its tables.
pub struct Vtd {
    regs: AtomicUsize,
    root: Table,
    context: [Table; BUSES],
    /// Upper levels: `upper[0]` the top (L4 or L3), `upper[1]` the L3
    /// under an L4, `upper[2]` the L2.
    upper: [Table; 3],
    leaves: [Table; LEAVES],
    /// CAP.CM: the unit may cache not-present entries.
    caching: AtomicU64,
    /// Invalidation (queued or register-based) and its counters.
    pub inv: inval::Invalidator,
    /// Fault records and the fault event.
    pub fault: fault::FaultLog,
}

/// The one unit.
pub static VTD: Vtd = Vtd {
    regs: AtomicUsize::new(0),
    root: Table::new(),
    context: [const { Table::new() }; BUSES],
    upper: [Table::new(), Table::new(), Table::new()],
    leaves: [const { Table::new() }; LEAVES],
    caching: AtomicU64::new(0),
    inv: inval::Invalidator::new(),
    fault: fault::FaultLog::new(),
};

impl core::fmt::Debug for Vtd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Vtd(regs {:#x})", self.regs.load(Relaxed))
    }
}

fn pa_of<T>(t: &T) -> u64 {
    // The kernel image and its statics are identity-mapped.
    t as *const T as u64
}

impl Vtd {
    fn r32(&self, off: usize) -> u32 {
        // SAFETY: a register of the unit, mapped uncached by `init`.
        unsafe { core::ptr::read_volatile((self.regs.load(Relaxed) + off) as *const u32) }
    }
    fn w32(&self, off: usize, v: u32) {
        // SAFETY: as `r32`.
        unsafe { core::ptr::write_volatile((self.regs.load(Relaxed) + off) as *mut u32, v) }
    }
    fn r64(&self, off: usize) -> u64 {
        // SAFETY: as `r32`.
        unsafe { core::ptr::read_volatile((self.regs.load(Relaxed) + off) as *const u64) }
    }
    fn w64(&self, off: usize, v: u64) {
        // SAFETY: as `r32`.
        unsafe { core::ptr::write_volatile((self.regs.load(Relaxed) + off) as *mut u64, v) }
    }

    /// Is translation on?
    pub fn enabled(&self) -> bool {
        self.regs.load(Relaxed) != 0
    }

    /// Is the unit in caching mode (CAP.CM: maps are invalidated too)?
    pub fn caching_mode(&self) -> bool {
        self.caching.load(Relaxed) != 0
    }

    /// Write GCMD: the persistent bits GSTS reports, plus `set`, minus
    /// `clear`; wait until GSTS says so. Boot, or with no other command
    /// in flight.
    fn gcmd(&self, set: u32, clear: u32) {
        let keep = self.r32(GSTS) & GCMD_KEEP;
        self.w32(GCMD, (keep | set) & !clear);
        let want = set & !GCMD_SRTP;
        while self.r32(GSTS) & (want | clear) != want
            || (set & GCMD_SRTP != 0 && self.r32(GSTS) & GCMD_SRTP == 0)
        {
            core::hint::spin_loop();
        }
    }

    fn leaf(&self, iova: u64) -> Option<&AtomicU64> {
        let page = (iova / IOPAGE as u64) as usize;
        self.leaves.get(page / 512).map(|t| &t.0[page % 512])
    }

    /// Write the leaf entries of `[iova, iova + len)` (`rights` 0: clear
    /// them), then invalidate the range for `cause`: always, except for a
    /// map that only filled not-present entries on a unit not in caching
    /// mode (nothing of the range can be cached then).
    fn set(&self, iova: u64, pa: u64, len: usize, rights: u64, cause: inval::Cause) -> bool {
        let mut replaced = false;
        for i in 0..len.div_ceil(IOPAGE) {
            let a = iova + (i * IOPAGE) as u64;
            let Some(e) = self.leaf(a) else {
                return false;
            };
            let new = if rights == 0 {
                0
            } else {
                (pa + (i * IOPAGE) as u64) | rights
            };
            replaced |= e.swap(new, Relaxed) & 3 != 0;
        }
        if cause != inval::Cause::Map || replaced || self.caching.load(Relaxed) != 0 {
            self.inv.iotlb(self, iova, len, cause);
        }
        true
    }

    /// Map the driver's own memory (identity-mapped kernel RAM at `pa`,
    /// `len` bytes) at IOVA `iova` (at or above [`WINDOW`]), read-write.
    /// Boot, after `init`.
    pub fn map_driver(&self, iova: u64, pa: u64, len: usize) -> bool {
        iova >= WINDOW
            && iova + len as u64 <= SPAN
            && self.set(iova, pa, len, 3, inval::Cause::Other)
    }

    /// Did the device with source id `sid` fault inside `[iova, iova +
    /// len)`? Claims (forgets) the matching fault records the fault
    /// interrupt collected (or collects a pending one itself:
    /// [`fault::FaultLog::faulted_in`]); two disks never claim the same
    /// one. Any context.
    pub fn faulted_in(&self, sid: u16, iova: u64, len: usize) -> bool {
        self.fault.faulted_in(self, sid, iova, len)
    }
}

/// Bring up the unit at `regs` for the functions `fs` (the only devices
/// it lets do DMA), all in one domain (see the module docs). Boot CPU,
/// before the others start, before the devices start.
pub fn init(regs: usize, fs: &[Function]) -> Result<(), &'static str> {
    let mut buses = [None::<u8>; BUSES];
    for f in fs {
        if !buses.contains(&Some(f.bus)) {
            let Some(free) = buses.iter_mut().find(|b| b.is_none()) else {
                return Err("the disks are on more PCI buses than the tables cover");
            };
            *free = Some(f.bus);
        }
    }
    crate::boot::map_uncached(regs, 4096);
    let v = &VTD;
    v.regs.store(regs, Relaxed);
    let cap = v.r64(CAP);
    let ecap = v.r64(ECAP);
    let sagaw = (cap >> 8) & 0x1f;
    let four = if sagaw & 2 != 0 {
        false
    } else if sagaw & 4 != 0 {
        true
    } else {
        v.regs.store(0, Relaxed);
        return Err("the unit supports neither 3- nor 4-level tables");
    };
    v.caching.store((cap >> 7) & 1, Relaxed);
    // Upper levels: top -> (L3 ->) L2 -> the leaves.
    let l2 = &v.upper[2];
    for (i, leaf) in v.leaves.iter().enumerate() {
        l2.0[i].store(pa_of(leaf) | 3, Relaxed);
    }
    let top = if four {
        v.upper[1].0[0].store(pa_of(l2) | 3, Relaxed);
        v.upper[0].0[0].store(pa_of(&v.upper[1]) | 3, Relaxed);
        &v.upper[0]
    } else {
        v.upper[0].0[0].store(pa_of(l2) | 3, Relaxed);
        &v.upper[0]
    };
    // A context entry per function (16 bytes at devfn, in its bus's
    // table): P, TT = 0 (second-level only), the shared table; AW,
    // domain 1.
    for f in fs {
        let b = buses
            .iter()
            .position(|&b| b == Some(f.bus))
            .unwrap_or_default();
        let ctx = &v.context[b];
        let devfn = usize::from(f.dev) << 3 | usize::from(f.func);
        ctx.0[2 * devfn + 1].store(if four { 2 } else { 1 } | (u64::from(DOMAIN) << 8), Relaxed);
        ctx.0[2 * devfn].store(pa_of(top) | 1, Relaxed);
        v.root.0[2 * usize::from(f.bus)].store(pa_of(ctx) | 1, Relaxed);
    }
    core::sync::atomic::fence(SeqCst);
    v.w64(RTADDR, pa_of(&v.root));
    v.gcmd(GCMD_SRTP, 0);
    // Queued invalidation if the unit has it; then the caches (global).
    v.inv.init(v, cap, ecap, DOMAIN);
    v.inv.context_global(v);
    v.inv.iotlb(v, 0, 0, inval::Cause::Other);
    v.fault.init(v, crate::lapic::id(), crate::intr::VTD_FAULT);
    v.gcmd(GCMD_TE, 0);
    kprintln!(
        "vt-d: unit at {regs:#x} version {:#x}, {}-level tables, caching mode {}, {} invalidation, fault event to APIC {} vector {:#x}, one domain translating for {} function(s): {:x?}",
        v.r32(VER),
        if four { 4 } else { 3 },
        (cap >> 7) & 1,
        if v.inv.is_queued() {
            "queued"
        } else {
            "register-based"
        },
        crate::lapic::id(),
        crate::intr::VTD_FAULT,
        fs.len(),
        fs.iter().map(|f| f.sid()).collect::<alloc::vec::Vec<_>>()
    );
    Ok(())
}

impl Iommu for Vtd {
    fn size(&self) -> u64 {
        WINDOW
    }

    fn enter(
        &self,
        iova: Iova,
        pa: Paddr,
        len: usize,
        access: DmaAccess,
    ) -> Result<(), IommuError> {
        IommuError::check(iova, len, WINDOW)?;
        let rights = match access {
            DmaAccess::Read => 1,
            // Write-only second-level entries are not portable (R=0 W=1);
            // bus_dma's own FromDevice loads ask for ReadWrite anyway.
            DmaAccess::Write => 3,
            DmaAccess::ReadWrite => 3,
        };
        let phys = crate::iommu::SOFT_IOMMU.base() as u64 + pa.get();
        if self.set(iova.get(), phys, len, rights, inval::Cause::Map) {
            Ok(())
        } else {
            Err(IommuError::OutOfRange { iova, len })
        }
    }

    fn remove(&self, iova: Iova, len: usize) {
        let _ = self.set(iova.get(), 0, len, 0, inval::Cause::Unmap);
    }
}
