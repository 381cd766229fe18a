//! Starting the other CPUs: INIT-SIPI-SIPI, a real-mode trampoline, and
//! each application processor's way into kern.
//!
//! The trampoline (below) is copied to [`TRAMP`], a page of low RAM that
//! the PVH loader leaves alone (its start info, command line and memory
//! map lie below 0x3000; `main.rs` checks). A startup IPI starts the AP
//! there in real mode (CS = `TRAMP >> 4`); it loads the trampoline's own
//! GDT (null, code64 0x08, data 0x10, code32 0x18: the first three as in
//! the kernel's GDT), enters protected mode, enables PAE and SSE, points
//! CR3 at the boot page tables, enables long mode and paging, and calls
//! the entry in the trampoline's data words with the CPU's index and
//! stack. The boot CPU starts one AP at a time and waits for it to say it
//! is alive, so one set of data words serves all.
//!
//! An AP ([`ap_main`]) loads the kernel's GDT, its TSS and the IDT, enables
//! its local APIC (no timer: the clock is CPU 0's), points `%gs` at its
//! [`crate::md::PerCpu`], says it is alive, and waits for kern to boot;
//! then it becomes that CPU: its `curcpu`, interrupts on, `cpu_run`.
//!
//! # Contexts
//! [`start_aps`]: the boot CPU, at boot, interrupts disabled, before kern
//! boots. [`ap_main`]: each AP, once.

use core::sync::atomic::{
    AtomicBool, AtomicU32, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};

use crate::{clock, intr, lapic, x86};

/// Where the trampoline runs (physical = virtual).
pub const TRAMP: usize = 0x8000;
/// Bytes of each AP's boot stack (its idle context).
const AP_STACK: usize = 256 * 1024;

/// APs that have started.
static ALIVE: AtomicU32 = AtomicU32::new(0);
/// Set once kern is booted: the APs may join.
static GO: AtomicBool = AtomicBool::new(false);
/// APs that have left `cpu_run` (after kern's shutdown).
pub static DONE: AtomicUsize = AtomicUsize::new(0);

core::arch::global_asm!(
    ".pushsection .rodata.dvma_tramp, \"a\"",
    ".p2align 12",
    ".globl dvma_tramp_start",
    "dvma_tramp_start:",
    ".code16",
    "cli",
    "cld",
    "xorw %ax, %ax",
    "movw %ax, %ds",
    "lgdtl {tramp} + (dvma_tramp_gdtptr - dvma_tramp_start)",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x18, ${tramp} + (dvma_tramp_32 - dvma_tramp_start)",
    ".code32",
    "dvma_tramp_32:",
    "movw $0x10, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movl %cr4, %eax",
    "orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax",
    "movl %eax, %cr4",
    "movl $dvma_boot_pml4, %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx",
    "rdmsr",
    "orl $((1 << 8) | (1 << 11)), %eax",
    "wrmsr",
    "movl %cr0, %eax",
    "andl $~((1 << 2) | (1 << 3)), %eax",
    "orl $((1 << 31) | (1 << 16) | (1 << 1) | 1), %eax",
    "movl %eax, %cr0",
    "ljmpl $0x08, ${tramp} + (dvma_tramp_64 - dvma_tramp_start)",
    ".code64",
    "dvma_tramp_64:",
    "movw $0x10, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movq {tramp} + (dvma_tramp_stack - dvma_tramp_start), %rsp",
    "movq {tramp} + (dvma_tramp_cpu - dvma_tramp_start), %rdi",
    "movq {tramp} + (dvma_tramp_entry - dvma_tramp_start), %rax",
    "xorl %ebp, %ebp",
    "callq *%rax",
    "ud2",
    ".p2align 3",
    "dvma_tramp_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff",
    ".quad 0x00cf92000000ffff",
    ".quad 0x00cf9a000000ffff",
    "dvma_tramp_gdtptr:",
    ".word 4 * 8 - 1",
    ".long {tramp} + (dvma_tramp_gdt - dvma_tramp_start)",
    ".p2align 3",
    ".globl dvma_tramp_stack",
    "dvma_tramp_stack: .quad 0",
    ".globl dvma_tramp_cpu",
    "dvma_tramp_cpu: .quad 0",
    ".globl dvma_tramp_entry",
    "dvma_tramp_entry: .quad 0",
    ".globl dvma_tramp_end",
    "dvma_tramp_end:",
    ".popsection",
    tramp = const TRAMP,
    options(att_syntax),
);

unsafe extern "C" {
    static dvma_tramp_start: u8;
    static dvma_tramp_stack: u8;
    static dvma_tramp_cpu: u8;
    static dvma_tramp_entry: u8;
    static dvma_tramp_end: u8;
}

fn tramp_addr(sym: *const u8) -> usize {
    TRAMP + (sym as usize - (&raw const dvma_tramp_start) as usize)
}

fn delay_us(us: u64) {
    let t = clock::nanotime() + us * 1000;
    while clock::nanotime() < t {
        core::hint::spin_loop();
    }
}

/// Start the CPUs with APIC ids `ids` (the boot CPU's own id skipped) as
/// CPUs 1, 2, ...; returns how many CPUs run now (the boot CPU included).
/// Each AP then waits in [`ap_main`] for [`release`].
pub fn start_aps(ids: &[u32]) -> usize {
    let me = lapic::id();
    let start = (&raw const dvma_tramp_start) as usize;
    let len = (&raw const dvma_tramp_end) as usize - start;
    // SAFETY: [TRAMP, TRAMP + len) is low RAM nothing else uses (`main.rs`
    // checks the PVH structures lie elsewhere), identity-mapped; the
    // source is the trampoline's image in .rodata.
    unsafe { core::ptr::copy_nonoverlapping(start as *const u8, TRAMP as *mut u8, len) };
    let mut n = 1;
    for &id in ids.iter().filter(|&&id| id != me) {
        if n >= crate::acpi::MAXCPU {
            break;
        }
        let layout = core::alloc::Layout::from_size_align(AP_STACK, 4096).expect("layout");
        // SAFETY: a non-zero-sized layout; the stack is never freed (the
        // AP's idle context runs on it for the kernel's life).
        let stack = unsafe { alloc::alloc::alloc(layout) } as usize;
        assert!(stack != 0, "no memory for an AP stack");
        // SAFETY: the trampoline's data words in its copy at TRAMP, read
        // by the AP only after the IPIs below.
        unsafe {
            (tramp_addr(&raw const dvma_tramp_stack) as *mut u64)
                .write_volatile((stack + AP_STACK) as u64);
            (tramp_addr(&raw const dvma_tramp_cpu) as *mut u64).write_volatile(n as u64);
            (tramp_addr(&raw const dvma_tramp_entry) as *mut u64)
                .write_volatile(ap_main as *const () as u64);
        }
        let before = ALIVE.load(Acquire);
        lapic::send_init(id);
        delay_us(10_000);
        for _ in 0..2 {
            lapic::send_sipi(id, (TRAMP >> 12) as u8);
            delay_us(200);
        }
        let t = clock::nanotime() + 200_000_000;
        while ALIVE.load(Acquire) == before && clock::nanotime() < t {
            core::hint::spin_loop();
        }
        if ALIVE.load(Acquire) == before {
            kprintln!("metal: the CPU with APIC id {id} did not start");
            break;
        }
        n += 1;
    }
    n
}

/// Let the APs join kern (it has booted with them counted).
pub fn release() {
    GO.store(true, Release);
}

/// An application processor's first Rust code (from the trampoline),
/// interrupts disabled, on its own stack.
extern "C" fn ap_main(cpu: usize) -> ! {
    crate::trap::init(cpu);
    lapic::init(intr::SPURIOUS);
    crate::md::percpu_init(cpu);
    ALIVE.fetch_add(1, Release);
    while !GO.load(Acquire) {
        core::hint::spin_loop();
    }
    let k = kern::kernel();
    crate::md::PERCPU[cpu]
        .cpu
        .store(k.cpu(cpu) as *const kern::cpu::Cpu as *mut _, Relaxed);
    x86::sti();
    kern::sched::cpu_run();
    DONE.fetch_add(1, Release);
    x86::halt_forever()
}
