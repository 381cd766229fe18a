//! PCI through the PCI Express configuration window (ECAM), found in the
//! ACPI MCFG.
//!
//! [`init`] maps the window uncached ([`crate::boot::map_uncached`]) and
//! [`find`] and [`find_all`] scan segment 0's buses for a vendor/device
//! pair. A [`Function`]
//! reads and writes its configuration space, walks its capability list,
//! and sizes and maps its memory BARs (uncached, as firmware assigned them:
//! SeaBIOS, which runs before the PVH entry, has placed them below 4 GiB on
//! q35, which is all the identity map covers; a BAR it left elsewhere is an
//! error here, not a reassignment).
//!
//! # Contexts
//! Boot CPU at boot, before the other CPUs start (the uncached mappings
//! change page tables that the other CPUs then share). Configuration
//! accesses afterwards (a [`Function`]'s reads and writes) from thread
//! context of any CPU.

use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::acpi::Ecam;

/// The ECAM window in use (0: none yet).
static ECAM_BASE: AtomicUsize = AtomicUsize::new(0);
/// Its last bus.
static ECAM_BUS_END: AtomicUsize = AtomicUsize::new(0);

/// Use `ecam` as the configuration window: map it uncached. Boot CPU,
/// before the others start.
pub fn init(ecam: Ecam) {
    let buses = usize::from(ecam.bus_end) + 1;
    crate::boot::map_uncached(ecam.base, buses << 20);
    ECAM_BUS_END.store(usize::from(ecam.bus_end), Relaxed);
    ECAM_BASE.store(ecam.base, Relaxed);
}

/// A PCI function: bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Bus.
    pub bus: u8,
    /// Device.
    pub dev: u8,
    /// Function.
    pub func: u8,
}

impl Function {
    /// Its requester id (source id) on the bus: bus, device, function.
    pub fn sid(&self) -> u16 {
        u16::from(self.bus) << 8 | u16::from(self.dev) << 3 | u16::from(self.func)
    }
}

/// The first function with this vendor and device id, scanning every bus
/// of the window (after [`init`]).
pub fn find(vendor: u16, device: u16) -> Option<Function> {
    let mut one = [Function {
        bus: 0,
        dev: 0,
        func: 0,
    }];
    (find_all(vendor, device, &mut one) > 0).then_some(one[0])
}

/// Every function with this vendor and device id, in bus/device/function
/// order, into `out` (as many as fit); how many were stored.
pub fn find_all(vendor: u16, device: u16, out: &mut [Function]) -> usize {
    if ECAM_BASE.load(Relaxed) == 0 {
        return 0;
    }
    let mut n = 0;
    for bus in 0..=ECAM_BUS_END.load(Relaxed) as u8 {
        for dev in 0..32 {
            for func in 0..8 {
                let f = Function { bus, dev, func };
                let id = f.read32(0);
                if id == u32::MAX {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                if id == u32::from(vendor) | (u32::from(device) << 16) && n < out.len() {
                    out[n] = f;
                    n += 1;
                }
            }
        }
    }
    n
}

/// Configuration-space command register bits.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Bus mastering: the function may start DMA.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Legacy INTx disabled.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

impl Function {
    fn addr(&self, off: u16) -> usize {
        ECAM_BASE.load(Relaxed)
            + (usize::from(self.bus) << 20)
            + (usize::from(self.dev) << 15)
            + (usize::from(self.func) << 12)
            + usize::from(off & 0xffc)
    }

    /// Read the dword at `off` (aligned down to 4).
    pub fn read32(&self, off: u16) -> u32 {
        // SAFETY: inside the ECAM window that `init` mapped uncached (the
        // function's 4 KiB of configuration space); a configuration read
        // has no side effects.
        unsafe { core::ptr::read_volatile(self.addr(off) as *const u32) }
    }

    /// Write the dword at `off` (aligned down to 4).
    pub fn write32(&self, off: u16, v: u32) {
        // SAFETY: as for `read32`; what the write does to the function is
        // the caller's business (it owns the function).
        unsafe { core::ptr::write_volatile(self.addr(off) as *mut u32, v) }
    }

    /// Read the 16 bits at `off` (aligned down to 2).
    pub fn read16(&self, off: u16) -> u16 {
        (self.read32(off) >> ((off & 2) * 8)) as u16
    }

    /// Write the 16 bits at `off` (aligned down to 2), keeping the other
    /// half of the dword.
    pub fn write16(&self, off: u16, v: u16) {
        let sh = (off & 2) * 8;
        let d = self.read32(off) & !(0xffff << sh);
        self.write32(off, d | (u32::from(v) << sh));
    }

    /// Set bits of the command register.
    pub fn enable(&self, bits: u16) {
        let c = self.read16(4);
        self.write16(4, c | bits);
    }

    /// The offsets of the capabilities with id `id`, in list order (at
    /// most 8).
    pub fn capabilities(&self, id: u8) -> ([u16; 8], usize) {
        let mut out = [0u16; 8];
        let mut n = 0;
        if self.read16(6) & (1 << 4) == 0 {
            return (out, 0);
        }
        let mut p = (self.read32(0x34) & 0xfc) as u16;
        let mut hops = 0;
        while p != 0 && hops < 48 {
            let h = self.read32(p);
            if h as u8 == id && n < out.len() {
                out[n] = p;
                n += 1;
            }
            p = ((h >> 8) & 0xfc) as u16;
            hops += 1;
        }
        (out, n)
    }

    /// The physical address and size of memory BAR `i` (a 64-bit BAR
    /// spans `i` and `i + 1`), mapped uncached; `None` for an I/O or
    /// unassigned BAR. Boot CPU, before the others start.
    pub fn map_bar(&self, i: u8) -> Option<(usize, usize)> {
        let off = 0x10 + 4 * u16::from(i);
        let lo = self.read32(off);
        if lo & 1 != 0 {
            return None;
        }
        let is64 = (lo >> 1) & 3 == 2;
        let hi = if is64 { self.read32(off + 4) } else { 0 };
        let addr = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        // Size it: all ones in, the mask out, with decoding off meanwhile.
        let cmd = self.read16(4);
        self.write16(4, cmd & !CMD_MEMORY);
        self.write32(off, u32::MAX);
        let mask_lo = self.read32(off) & !0xf;
        self.write32(off, lo);
        let mask_hi = if is64 {
            self.write32(off + 4, u32::MAX);
            let m = self.read32(off + 4);
            self.write32(off + 4, hi);
            m
        } else {
            u32::MAX
        };
        self.write16(4, cmd);
        let mask = (u64::from(mask_hi) << 32) | u64::from(mask_lo);
        let size = (!mask).wrapping_add(1);
        if addr == 0 || size == 0 {
            return None;
        }
        assert!(
            addr + size <= 1 << 32,
            "PCI {self:?} BAR{i} at {addr:#x}+{size:#x}: above the 4 GiB identity map"
        );
        crate::boot::map_uncached(addr as usize, size as usize);
        Some((addr as usize, size as usize))
    }
}
