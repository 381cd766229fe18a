//! The way in: the PVH entry, long mode, the boot page tables and GDT.
//!
//! QEMU's `-kernel` loads this ELF at 1 MiB and, finding the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note (type 18, owner "Xen"), enters
//! `pvh_start32` in 32-bit protected mode with paging off and `ebx`
//! pointing at the `hvm_start_info` (the PVH boot ABI). The entry:
//!
//! 1. fills the boot page tables: the first 4 GiB identity-mapped with
//!    2 MiB pages, the top GiB (MMIO: the LAPIC at `0xfee0_0000`)
//!    uncached; [`map_uncached`] later makes more of it uncached (PCI's
//!    ECAM window and BARs, which QEMU's q35 puts below 3 GiB too);
//! 2. enables PAE, SSE (`CR4.OSFXSR`, `CR4.OSXMMEXCPT`; `CR0.MP` set,
//!    `CR0.EM` and `CR0.TS` clear: the host target's code uses SSE2),
//!    long mode (`EFER.LME`, `EFER.NXE`) and paging, loads the GDT and
//!    far-returns into 64-bit code;
//! 3. zeroes `.bss`, sets the boot stack and calls
//!    [`crate::metal_main`] with the start-info address.
//!
//! The kernel is built for the baseline x86-64 of the host target (SSE2,
//! no AVX), so `FXSAVE` covers every register its code may touch; XSAVE is
//! not enabled.
//!
//! The GDT has a 64-bit code segment (0x08), a data segment (0x10) and a
//! TSS descriptor (16 bytes) per CPU, which [`crate::trap`] fills in
//! before that CPU loads its task register.

use core::sync::atomic::AtomicU64;

/// Bytes of the boot stack (CPU 0's idle context runs on it for good).
pub const BOOT_STACK: usize = 256 * 1024;

/// Entries of the GDT: null, code64, data, then a TSS descriptor (two
/// slots) per CPU.
pub const GDT_ENTRIES: usize = 3 + 2 * crate::acpi::MAXCPU;

/// The GDT. [`crate::trap`] writes CPU i's TSS descriptor (slots 3 + 2i
/// and 4 + 2i) once, on CPU i, before its `ltr`.
#[unsafe(no_mangle)]
pub static DVMA_GDT: [AtomicU64; GDT_ENTRIES] = {
    let mut g = [const { AtomicU64::new(0) }; GDT_ENTRIES];
    g[1] = AtomicU64::new(0x00af_9a00_0000_ffff);
    g[2] = AtomicU64::new(0x00cf_9200_0000_ffff);
    g
};

/// The selector of CPU `i`'s TSS descriptor in [`DVMA_GDT`].
pub const fn tss_selector(i: usize) -> u16 {
    ((3 + 2 * i) * 8) as u16
}

core::arch::global_asm!(
    // ---- the PVH note ------------------------------------------------------
    ".pushsection .note.Xen, \"a\", @note",
    ".p2align 2",
    ".long 4",  // namesz
    ".long 4",  // descsz
    ".long 18", // XEN_ELFNOTE_PHYS32_ENTRY
    ".asciz \"Xen\"",
    ".long pvh_start32",
    ".popsection",
    // ---- page tables (in .data: zero in the file, so no .bss clearing
    //      can wipe them once they are live) --------------------------------
    ".pushsection .data.pagetables, \"aw\", @progbits",
    ".p2align 12",
    ".globl dvma_boot_pml4",
    "dvma_boot_pml4: .zero 4096",
    "dvma_boot_pdpt: .zero 4096",
    ".globl dvma_boot_pd",
    "dvma_boot_pd: .zero 4096 * 4",
    ".p2align 3",
    "dvma_gdt_ptr:",
    ".word {gdt_limit}",
    ".quad DVMA_GDT",
    ".popsection",
    // ---- the boot stack ------------------------------------------------
    ".pushsection .bss.dvma_boot_stack, \"aw\", @nobits",
    ".p2align 12",
    "dvma_boot_stack: .zero {stack}",
    ".globl dvma_boot_stack_top",
    "dvma_boot_stack_top:",
    ".popsection",
    // ---- 32-bit entry ----------------------------------------------------
    ".pushsection .text.boot, \"ax\"",
    ".code32",
    ".globl pvh_start32",
    "pvh_start32:",
    "cli",
    "cld",
    "mov esi, ebx", // start_info, kept in esi until Rust gets it
    // PD entries: 2048 x 2 MiB, present | writable | large; >= 3 GiB uncached.
    "xor ecx, ecx",
    "2:",
    "mov eax, ecx",
    "shl eax, 21",
    "or eax, 0x83",
    "cmp ecx, 1536",
    "jb 3f",
    "or eax, 0x18", // PWT | PCD
    "3:",
    "mov dword ptr [dvma_boot_pd + ecx * 8], eax",
    "mov dword ptr [dvma_boot_pd + ecx * 8 + 4], 0",
    "inc ecx",
    "cmp ecx, 2048",
    "jne 2b",
    // PDPT entries 0..4 -> the four PDs.
    "xor ecx, ecx",
    "4:",
    "mov eax, ecx",
    "shl eax, 12",
    "add eax, offset dvma_boot_pd",
    "or eax, 0x3",
    "mov dword ptr [dvma_boot_pdpt + ecx * 8], eax",
    "mov dword ptr [dvma_boot_pdpt + ecx * 8 + 4], 0",
    "inc ecx",
    "cmp ecx, 4",
    "jne 4b",
    "mov eax, offset dvma_boot_pdpt",
    "or eax, 0x3",
    "mov dword ptr [dvma_boot_pml4], eax",
    "mov dword ptr [dvma_boot_pml4 + 4], 0",
    // CR4: PAE | OSFXSR | OSXMMEXCPT.
    "mov eax, cr4",
    "or eax, (1 << 5) | (1 << 9) | (1 << 10)",
    "mov cr4, eax",
    "mov eax, offset dvma_boot_pml4",
    "mov cr3, eax",
    // EFER: LME | NXE.
    "mov ecx, 0xc0000080",
    "rdmsr",
    "or eax, (1 << 8) | (1 << 11)",
    "wrmsr",
    // CR0: PG | WP | MP | PE, EM and TS clear.
    "mov eax, cr0",
    "and eax, ~((1 << 2) | (1 << 3))",
    "or eax, (1 << 31) | (1 << 16) | (1 << 1) | 1",
    "mov cr0, eax",
    "lgdt [dvma_gdt_ptr]",
    "push 0x08",
    "mov eax, offset dvma_long64",
    "push eax",
    "retf",
    // ---- 64-bit ------------------------------------------------------------
    ".code64",
    "dvma_long64:",
    "mov eax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    // Zero .bss (the boot stack is in it: nothing is on it yet).
    "mov edx, esi",
    "lea rdi, [rip + __bss_start]",
    "lea rcx, [rip + __bss_end]",
    "sub rcx, rdi",
    "xor eax, eax",
    "rep stosb",
    "lea rsp, [rip + dvma_boot_stack_top]",
    "xor ebp, ebp",
    "mov edi, edx",
    "call {main}",
    "6:",
    "hlt",
    "jmp 6b",
    ".popsection",
    stack = const BOOT_STACK,
    gdt_limit = const GDT_ENTRIES * 8 - 1,
    main = sym crate::metal_main,
);

unsafe extern "C" {
    /// The four page directories of the identity map: entry `i` maps
    /// `[i << 21, (i + 1) << 21)`.
    static dvma_boot_pd: [AtomicU64; 2048];
}

/// PCD | PWT: a 2 MiB page of the identity map that is not cached (no MTRR
/// or PAT programming: PAT entry 3 is UC at reset, which is what PCD | PWT
/// selects).
const UNCACHED: u64 = 0x18;

/// Make the identity map of `[addr, addr + len)` (below 4 GiB) uncached,
/// whole 2 MiB pages at a time: for memory-mapped device registers (PCI
/// configuration space, BARs). Boot CPU, before the other CPUs start
/// (their TLBs hold no entry for these pages then; this CPU's are flushed
/// by reloading `CR3`).
pub fn map_uncached(addr: usize, len: usize) {
    assert!(
        addr + len <= 1 << 32,
        "{addr:#x}+{len:#x}: above the identity map"
    );
    let (first, last) = (addr >> 21, (addr + len - 1) >> 21);
    for pde in &boot_pd()[first..=last] {
        pde.fetch_or(UNCACHED, core::sync::atomic::Ordering::Relaxed);
    }
    // SAFETY: reloading CR3 with its own value flushes this CPU's
    // non-global TLB entries and changes nothing else.
    unsafe {
        core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack, preserves_flags));
    }
}

fn boot_pd() -> &'static [AtomicU64; 2048] {
    // SAFETY: the page directories are static data of this image, written
    // at boot by the entry code and afterwards only atomically
    // (`map_uncached`).
    unsafe { &*core::ptr::addr_of!(dvma_boot_pd) }
}
