//! The PVH boot ABI's start info (`hvm_start_info`, version 1): where the
//! kernel command line and the memory map are.
//!
//! # Contexts
//! Boot CPU, at boot, before the heap exists: it reads low memory that the
//! loader filled and nothing else writes.

/// The start info's magic number.
const MAGIC: u32 = 0x336e_c578;

/// A view of the start info.
#[derive(Debug)]
pub struct StartInfo {
    addr: usize,
}

/// A memory-map entry type: usable RAM.
const E820_RAM: u32 = 1;

impl StartInfo {
    /// The start info at physical (= virtual: identity map) `addr`.
    pub fn read(addr: usize) -> Self {
        let s = Self { addr };
        assert_eq!(s.u32(0), MAGIC, "no PVH start info at {addr:#x}");
        s
    }

    fn u32(&self, off: usize) -> u32 {
        // SAFETY: the loader wrote the start info at `addr` (the PVH ABI),
        // inside the identity map; `off` is within its fixed layout.
        unsafe { core::ptr::read_unaligned((self.addr + off) as *const u32) }
    }

    fn u64(&self, off: usize) -> u64 {
        // SAFETY: as in `u32`.
        unsafe { core::ptr::read_unaligned((self.addr + off) as *const u64) }
    }

    /// The ACPI RSDP's address (0 if none).
    pub fn rsdp(&self) -> usize {
        self.u64(32) as usize
    }

    /// Where the loader's own structures lie (start info, command line,
    /// memory map): `(address, bytes)`.
    pub fn low_structures(&self) -> [(usize, usize); 3] {
        let cmd = self.u64(24) as usize;
        [
            (self.addr, 56),
            (cmd, self.cmdline().len() + 1),
            (self.u64(40) as usize, self.u32(48) as usize * 24),
        ]
    }

    /// The command line (`-append`), or "" if none or not UTF-8.
    pub fn cmdline(&self) -> &'static str {
        let p = self.u64(24) as usize;
        if p == 0 {
            return "";
        }
        let mut n = 0;
        // SAFETY: a NUL-terminated string the loader wrote in low memory,
        // which stays untouched for the kernel's life (nothing allocates
        // below 1 MiB).
        let bytes = unsafe {
            while *((p + n) as *const u8) != 0 && n < 4096 {
                n += 1;
            }
            core::slice::from_raw_parts(p as *const u8, n)
        };
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// The RAM region that holds the kernel (it starts at or below 1 MiB):
    /// `(start, end)`.
    pub fn ram_above_1m(&self) -> (usize, usize) {
        assert!(self.u32(4) >= 1, "PVH start info version 0: no memory map");
        let map = self.u64(40) as usize;
        let n = self.u32(48) as usize;
        for i in 0..n {
            let e = map + i * 24;
            // SAFETY: entry `i` of the loader's memory map (24 bytes each).
            let (a, len, ty) = unsafe {
                (
                    core::ptr::read_unaligned(e as *const u64) as usize,
                    core::ptr::read_unaligned((e + 8) as *const u64) as usize,
                    core::ptr::read_unaligned((e + 16) as *const u32),
                )
            };
            if ty == E820_RAM && a <= 1 << 20 && a + len > 1 << 20 {
                // Only what the boot page tables map (4 GiB).
                return (a, (a + len).min(4 << 30));
            }
        }
        panic!("the PVH memory map has no RAM at 1 MiB");
    }
}
