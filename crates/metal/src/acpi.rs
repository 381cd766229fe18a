//! ACPI, as far as SMP needs it: the MADT's list of local APICs.
//!
//! The PVH start info gives the RSDP's address; the RSDP gives the XSDT
//! (revision 2 and up) or the RSDT, whose entries point at the tables; the
//! MADT ("APIC") lists one processor-local-APIC entry per CPU.
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

/// The APIC ids of the enabled processors in the MADT, in its order (the
/// boot CPU first on QEMU), at most [`MAXCPU`]; `None` without ACPI.
pub fn cpu_apic_ids(rsdp: usize) -> Option<([u32; MAXCPU], usize)> {
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
    let mut madt = None;
    let mut p = root + 36;
    while p + entry <= root + len {
        let t = if entry == 8 {
            read::<u64>(p) as usize
        } else {
            read::<u32>(p) as usize
        };
        if sig(t) == *b"APIC" {
            madt = Some(t);
            break;
        }
        p += entry;
    }
    let madt = madt?;
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
