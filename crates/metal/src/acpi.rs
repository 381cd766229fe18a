//! ACPI, as far as SMP and PCI need it: the MADT's list of local APICs
//! and the MCFG's PCI Express configuration window (ECAM).
//!
//! The PVH start info gives the RSDP's address; the RSDP gives the XSDT
//! (revision 2 and up) or the RSDT, whose entries point at the tables; the
//! MADT ("APIC") lists one processor-local-APIC entry per CPU; the MCFG
//! one ECAM window per PCI segment group.
//!
//! # Contexts
//! Boot CPU, at boot, before the heap exists (the tables are read where
//! the firmware left them, identity-mapped; nothing is allocated).

/// The most CPUs this kernel starts.
pub const MAXCPU: usize = 8;

fn read<T: Copy>(addr: usize) -> T {
    // SAFETY: every caller passes an address inside an ACPI structure the
    // firmware wrote below 4 GiB (identity-mapped, never written by us),
    // found by following the RSDP's pointers and each table's length.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn sig(addr: usize) -> [u8; 4] {
    read(addr)
}

/// The address of the ACPI table with signature `want`, if the RSDP's
/// root table lists one.
fn find_table(rsdp: usize, want: [u8; 4]) -> Option<usize> {
    if rsdp == 0 || read::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return None;
    }
    let rev: u8 = read(rsdp + 15);
    let (root, entry) = if rev >= 2 {
        (read::<u64>(rsdp + 24) as usize, 8)
    } else {
        (read::<u32>(rsdp + 16) as usize, 4)
    };
    let len = read::<u32>(root + 4) as usize;
    let mut p = root + 36;
    while p + entry <= root + len {
        let t = if entry == 8 {
            read::<u64>(p) as usize
        } else {
            read::<u32>(p) as usize
        };
        if sig(t) == want {
            return Some(t);
        }
        p += entry;
    }
    None
}

/// An ECAM window of the MCFG: PCI segment group 0's configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecam {
    /// Physical address of the window: bus `b`'s configuration space is at
    /// `base + (b << 20)` (the MCFG's base names bus 0's, decoded or not).
    pub base: usize,
    /// First bus decoded.
    pub bus_start: u8,
    /// Last bus decoded.
    pub bus_end: u8,
}

/// Segment group 0's ECAM window from the MCFG (`None` without one).
pub fn ecam(rsdp: usize) -> Option<Ecam> {
    let mcfg = find_table(rsdp, *b"MCFG")?;
    let len = read::<u32>(mcfg + 4) as usize;
    // 36-byte header, 8 reserved bytes, then 16-byte allocations.
    let mut p = mcfg + 44;
    while p + 16 <= mcfg + len {
        let base: u64 = read(p);
        let seg: u16 = read(p + 8);
        if seg == 0 {
            return Some(Ecam {
                base: base as usize,
                bus_start: read(p + 10),
                bus_end: read(p + 11),
            });
        }
        p += 16;
    }
    None
}

/// The register base of the first VT-d remapping unit (DRHD) of the DMAR
/// table, with its flags (bit 0: INCLUDE_PCI_ALL), if there is one.
pub fn dmar_unit(rsdp: usize) -> Option<(usize, u8)> {
    let dmar = find_table(rsdp, *b"DMAR")?;
    let len = read::<u32>(dmar + 4) as usize;
    // 36-byte header, host address width, flags, 10 reserved bytes.
    let mut p = dmar + 48;
    while p + 4 <= dmar + len {
        let ty: u16 = read(p);
        let l: u16 = read(p + 2);
        if l < 4 {
            break;
        }
        if ty == 0 {
            return Some((read::<u64>(p + 8) as usize, read(p + 4)));
        }
        p += usize::from(l);
    }
    None
}

/// The APIC ids of the enabled processors in the MADT, in its order (the
/// boot CPU first on QEMU), at most [`MAXCPU`]; `None` without ACPI.
pub fn cpu_apic_ids(rsdp: usize) -> Option<([u32; MAXCPU], usize)> {
    let madt = find_table(rsdp, *b"APIC")?;
    let len = read::<u32>(madt + 4) as usize;
    let mut ids = [0u32; MAXCPU];
    let mut n = 0;
    let mut p = madt + 44;
    while p + 2 <= madt + len {
        let ty: u8 = read(p);
        let l: u8 = read(p + 1);
        if l < 2 {
            break;
        }
        if ty == 0 && n < MAXCPU {
            let id: u8 = read(p + 3);
            let flags: u32 = read(p + 4);
            if flags & 1 != 0 {
                ids[n] = u32::from(id);
                n += 1;
            }
        }
        p += usize::from(l);
    }
    Some((ids, n))
}
