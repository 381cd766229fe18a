//! Intel VT-d as kern's `Iommu`: root and context tables, second-level
//! page tables, register-based invalidation, fault recording.
//!
//! [`init`] (boot CPU, before the other CPUs start) finds the remapping
//! unit in the ACPI DMAR table, maps its registers uncached, builds one
//! domain for the PCI functions it is given (every virtio-blk disk): a
//! root entry for each of their buses, a context entry for each
//! device/function, all pointing at the same 3-level (or 4-level, as the
//! unit's SAGAW allows) second-level table, whose leaf tables are all
//! preallocated (static, zeroed) for [`SPAN`] bytes of IOVA space; then it
//! sets the root table pointer, invalidates the context cache and the
//! IOTLB (global), and enables translation.
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
//! and then invalidate the IOTLB; QEMU's unit runs with `caching-mode=on`,
//! so entries made present are invalidated too. The invalidation is
//! register-based (one command at a time), serialised by a spin flag taken
//! with interrupts disabled, so an interrupt handler that unloads a map
//! cannot deadlock with thread code of its CPU.
//!
//! A device access to an IOVA that is not mapped (or not with the right
//! it needs) is blocked by the unit and recorded in its fault recording
//! registers; [`Vtd::take_faults`] counts and clears them.
//!
//! # Contexts
//! `init`, `map_driver`: boot CPU, at boot. `enter`, `remove`,
//! `take_faults`: any context.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};

use kern::iommu::{DmaAccess, IOPAGE, Iommu, IommuError, Iova};
use kern::vm::Paddr;

use crate::pci::Function;
use crate::x86;

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
const CCMD: usize = 0x28;
const FSTS: usize = 0x34;

const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;

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
    /// The offset of the IOTLB registers (IVA; IOTLB at +8).
    iotlb: AtomicUsize,
    inval: AtomicBool,
    /// Someone is collecting fault records (`take_faults`).
    collecting: AtomicBool,
    /// IOTLB invalidations done.
    pub invalidations: AtomicU64,
    /// Faults recorded by the unit (counted by `take_faults`).
    pub faults: AtomicU64,
    /// Recent faults not yet claimed by a command: the requester's source
    /// id in bits 48..64, the page address, bit 0 set (0: free).
    recent: [AtomicU64; 16],
}

/// The one unit.
pub static VTD: Vtd = Vtd {
    regs: AtomicUsize::new(0),
    root: Table::new(),
    context: [const { Table::new() }; BUSES],
    upper: [Table::new(), Table::new(), Table::new()],
    leaves: [const { Table::new() }; LEAVES],
    iotlb: AtomicUsize::new(0),
    inval: AtomicBool::new(false),
    collecting: AtomicBool::new(false),
    invalidations: AtomicU64::new(0),
    faults: AtomicU64::new(0),
    recent: [const { AtomicU64::new(0) }; 16],
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

    /// Invalidate the whole IOTLB (register-based, global), waiting for
    /// the unit. Any context.
    fn flush(&self) {
        x86::without_interrupts(|| {
            while self
                .inval
                .compare_exchange_weak(false, true, Acquire, Relaxed)
                .is_err()
            {
                core::hint::spin_loop();
            }
            // The leaf entries before the command.
            core::sync::atomic::fence(SeqCst);
            let r = self.iotlb.load(Relaxed) + 8;
            // IVT | IIRG = global | drain reads and writes.
            self.w64(r, (1 << 63) | (1 << 60) | (1 << 49) | (1 << 48));
            while self.r64(r) & (1 << 63) != 0 {
                core::hint::spin_loop();
            }
            self.invalidations.fetch_add(1, Relaxed);
            self.inval.store(false, Release);
        });
    }

    fn leaf(&self, iova: u64) -> Option<&AtomicU64> {
        let page = (iova / IOPAGE as u64) as usize;
        self.leaves.get(page / 512).map(|t| &t.0[page % 512])
    }

    fn set(&self, iova: u64, pa: u64, len: usize, rights: u64) -> bool {
        for i in 0..len.div_ceil(IOPAGE) {
            let a = iova + (i * IOPAGE) as u64;
            match self.leaf(a) {
                Some(e) => e.store(
                    if rights == 0 {
                        0
                    } else {
                        (pa + (i * IOPAGE) as u64) | rights
                    },
                    Relaxed,
                ),
                None => return false,
            }
        }
        self.flush();
        true
    }

    /// Map the driver's own memory (identity-mapped kernel RAM at `pa`,
    /// `len` bytes) at IOVA `iova` (at or above [`WINDOW`]), read-write.
    /// Boot, after `init`.
    pub fn map_driver(&self, iova: u64, pa: u64, len: usize) -> bool {
        iova >= WINDOW && iova + len as u64 <= SPAN && self.set(iova, pa, len, 3)
    }

    /// Did the device with source id `sid` fault inside `[iova, iova +
    /// len)`? Collects the unit's new fault records first, and claims
    /// (forgets) the matching ones. Any context; one caller per device at
    /// a time (its ring lock); the records are claimed with a
    /// compare-and-swap, so two disks never claim the same one.
    pub fn faulted_in(&self, sid: u16, iova: u64, len: usize) -> bool {
        if !self.enabled() {
            return false;
        }
        self.take_faults();
        let first = iova & !(IOPAGE as u64 - 1);
        let mut hit = false;
        for e in &self.recent {
            let v = e.load(Relaxed);
            let page = v & ((1 << 48) - 1) & !1;
            if v != 0
                && (v >> 48) as u16 == sid
                && (first..iova + len as u64).contains(&page)
                && e.compare_exchange(v, 0, Relaxed, Relaxed).is_ok()
            {
                hit = true;
            }
        }
        hit
    }

    /// Count and clear the faults the unit has recorded (keeping their
    /// page addresses for [`Vtd::faulted_in`]); their number. Any context.
    /// One collector at a time: a caller that finds another collecting
    /// returns 0 at once (it never spins, so it cannot deadlock against
    /// an interrupted collector of its own CPU).
    pub fn take_faults(&self) -> u64 {
        if !self.enabled()
            || self
                .collecting
                .compare_exchange(false, true, Acquire, Relaxed)
                .is_err()
        {
            return 0;
        }
        let n = self.collect();
        self.collecting.store(false, Release);
        n
    }

    fn collect(&self) -> u64 {
        let cap = self.r64(CAP);
        let fro = ((cap >> 24) & 0x3ff) as usize * 16;
        let nfr = ((cap >> 40) & 0xff) as usize + 1;
        let mut n = 0;
        for i in 0..nfr {
            let hi = self.r64(fro + 16 * i + 8);
            if hi & (1 << 63) != 0 {
                n += 1;
                let page = self.r64(fro + 16 * i) & !(IOPAGE as u64 - 1) & ((1 << 48) - 1);
                // The source id: bits 64..80 of the record.
                let v = (hi & 0xffff) << 48 | page | 1;
                // Kept in the first free slot (lost if all 16 are taken:
                // counted, not matched).
                let _ = self
                    .recent
                    .iter()
                    .any(|e| e.compare_exchange(0, v, Relaxed, Relaxed).is_ok());
                // F is write-1-to-clear.
                self.w64(fro + 16 * i + 8, 1 << 63);
            }
        }
        // Primary fault overflow, pending fault: write-1-to-clear.
        let fs = self.r32(FSTS);
        self.w32(FSTS, fs & 3);
        self.faults.fetch_add(n, Relaxed);
        n
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
    v.iotlb.store(((ecap >> 8) & 0x3ff) as usize * 16, Relaxed);
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
        ctx.0[2 * devfn + 1].store(if four { 2 } else { 1 } | (1 << 8), Relaxed);
        ctx.0[2 * devfn].store(pa_of(top) | 1, Relaxed);
        v.root.0[2 * usize::from(f.bus)].store(pa_of(ctx) | 1, Relaxed);
    }
    core::sync::atomic::fence(SeqCst);
    v.w64(RTADDR, pa_of(&v.root));
    v.w32(GCMD, GCMD_SRTP);
    while v.r32(GSTS) & GCMD_SRTP == 0 {
        core::hint::spin_loop();
    }
    // Context cache: global invalidation.
    v.w64(CCMD, (1 << 63) | (1 << 61));
    while v.r64(CCMD) & (1 << 63) != 0 {
        core::hint::spin_loop();
    }
    v.flush();
    v.w32(GCMD, GCMD_TE);
    while v.r32(GSTS) & GCMD_TE == 0 {
        core::hint::spin_loop();
    }
    kprintln!(
        "vt-d: unit at {regs:#x} version {:#x}, {}-level tables, caching mode {}, one domain translating for {} function(s): {:x?}",
        v.r32(VER),
        if four { 4 } else { 3 },
        (cap >> 7) & 1,
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
        if iova.get() + len as u64 > WINDOW {
            return Err(IommuError::OutOfRange { iova, len });
        }
        let rights = match access {
            DmaAccess::Read => 1,
            // Write-only second-level entries are not portable (R=0 W=1);
            // bus_dma's own FromDevice loads ask for ReadWrite anyway.
            DmaAccess::Write => 3,
            DmaAccess::ReadWrite => 3,
        };
        let phys = crate::iommu::SOFT_IOMMU.base() as u64 + pa.get();
        if self.set(iova.get(), phys, len, rights) {
            Ok(())
        } else {
            Err(IommuError::OutOfRange { iova, len })
        }
    }

    fn remove(&self, iova: Iova, len: usize) {
        let _ = self.set(iova.get(), 0, len, 0);
    }
}
