//! The IDT, the TSS with its interrupt stacks, and the entry stubs.
//!
//! Every vector enters through an interrupt gate (interrupts disabled) on
//! an IST stack, never on the interrupted stack: the host target's code
//! keeps live data in the 128-byte red zone below `rsp`, which a frame
//! pushed there would clobber. Exceptions (vectors 0-31) use IST2 and are
//! fatal: the handler prints the vector, error code, `rip`, `rsp` (and
//! `cr2` for a page fault) and stops QEMU with status
//! [`EXIT_EXCEPTION`]. Interrupts (32-255) use IST1, the CPU's interrupt
//! stack, and go to [`crate::intr::interrupt`].
//!
//! With the interrupt stack off ([`set_intr_stack`]), an interrupt still
//! enters on IST1 (a gate without IST would push its frame into the red
//! zone), but the stub moves the frame at once onto the interrupted stack,
//! below its red zone and a 16-byte slot kept for an AST's return address,
//! and runs the whole trap there: the "no separate interrupt stack" of the
//! mail, as `--intr-stack off` is on Linux. Exceptions stay on IST2.
//!
//! Interrupts stay disabled for the whole of a trap (the gate clears IF and
//! nothing sets it before `iretq`), so traps never nest: a second IST1
//! frame can never overwrite the first. What this costs against the Linux
//! machine, where handlers nest by level, is said in `intr.rs`.
//!
//! The common stub saves the fifteen general registers into a [`Regs`]
//! frame on the IST stack, below it the FXSAVE area (the kernel's code uses
//! SSE, see `boot.rs`), calls the Rust handler with the frame, restores
//! and `iretq`s. The handler may edit the frame (`rip`, `rsp`): that is how
//! an AST upcall is pushed.

use core::cell::UnsafeCell;

use crate::acpi::MAXCPU;
use crate::boot::{DVMA_GDT, GDT_ENTRIES, tss_selector};
use crate::console::print_fatal;

/// Guest exit status of a fatal exception.
pub const EXIT_EXCEPTION: u8 = 3;

/// Bytes of each CPU's interrupt stack (IST1).
pub const INTR_STACK: usize = 128 * 1024;
/// Bytes of each CPU's exception stack (IST2).
pub const EXC_STACK: usize = 32 * 1024;

/// The interrupted context as the stubs saved it (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct Regs {
    /// General registers, in the order the stub leaves them.
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    /// The vector.
    pub vector: u64,
    /// The error code (0 where the CPU pushes none).
    pub error: u64,
    /// The interrupted instruction (the `iretq` frame from here on).
    pub rip: u64,
    /// Code segment.
    pub cs: u64,
    /// Flags.
    pub rflags: u64,
    /// The interrupted stack pointer.
    pub rsp: u64,
    /// Stack segment.
    pub ss: u64,
}

core::arch::global_asm!(
    ".pushsection .text.dvma_trap, \"ax\"",
    // Exceptions: vectors that push an error code get none from us.
    ".p2align 4",
    ".globl dvma_exc_stubs",
    "dvma_exc_stubs:",
    ".set vec, 0",
    ".rept 32",
    ".p2align 4",
    ".if !(vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30)",
    "pushq $0",
    ".endif",
    "pushq $vec",
    "jmp dvma_trap_common",
    ".set vec, vec + 1",
    ".endr",
    // Interrupts 32..255.
    ".p2align 4",
    ".globl dvma_intr_stubs",
    "dvma_intr_stubs:",
    ".set vec, 32",
    ".rept 224",
    ".p2align 4",
    "pushq $0",
    "pushq $vec",
    "jmp dvma_trap_common",
    ".set vec, vec + 1",
    ".endr",
    ".p2align 4",
    ".globl dvma_trap_common",
    "dvma_trap_common:",
    // Interrupts with the interrupt stack off: move the frame (vector,
    // error, rip, cs, rflags, rsp, ss) onto the interrupted stack, below
    // its red zone and a 16-byte slot kept free for an AST's return
    // address (`intr.rs`), and run the trap there.
    "cmpq $32, (%rsp)",
    "jb 2f",
    "cmpb $0, DVMA_INTR_STACK_OFF(%rip)",
    "je 2f",
    "pushq %rax",
    "pushq %rcx",
    "movq 56(%rsp), %rax", // the interrupted rsp (16 + 40)
    "subq $144, %rax",
    "andq $-16, %rax",
    "subq $56, %rax",
    "movq 16(%rsp), %rcx", "movq %rcx, 0(%rax)",
    "movq 24(%rsp), %rcx", "movq %rcx, 8(%rax)",
    "movq 32(%rsp), %rcx", "movq %rcx, 16(%rax)",
    "movq 40(%rsp), %rcx", "movq %rcx, 24(%rax)",
    "movq 48(%rsp), %rcx", "movq %rcx, 32(%rax)",
    "movq 56(%rsp), %rcx", "movq %rcx, 40(%rax)",
    "movq 64(%rsp), %rcx", "movq %rcx, 48(%rax)",
    "popq %rcx",
    "xchgq %rax, (%rsp)",
    "movq (%rsp), %rsp",
    "2:",
    "pushq %rax", "pushq %rcx", "pushq %rdx", "pushq %rbx", "pushq %rbp", "pushq %rsi", "pushq %rdi",
    "pushq %r8", "pushq %r9", "pushq %r10", "pushq %r11", "pushq %r12", "pushq %r13", "pushq %r14", "pushq %r15",
    "movq %rsp, %rbp",
    "subq $512, %rsp",
    "andq $-16, %rsp",
    "fxsave64 (%rsp)",
    "movq %rbp, %rdi",
    "cld",
    "call {handler}",
    "fxrstor64 (%rsp)",
    "movq %rbp, %rsp",
    "popq %r15", "popq %r14", "popq %r13", "popq %r12", "popq %r11", "popq %r10", "popq %r9", "popq %r8",
    "popq %rdi", "popq %rsi", "popq %rbp", "popq %rbx", "popq %rdx", "popq %rcx", "popq %rax",
    "addq $16, %rsp",
    "iretq",
    ".globl dvma_trap_common_end",
    "dvma_trap_common_end:",
    ".popsection",
    handler = sym dvma_trap,
    options(att_syntax),
);

unsafe extern "C" {
    fn dvma_exc_stubs();
    fn dvma_intr_stubs();
}

/// The Rust side of every vector.
extern "C" fn dvma_trap(r: &mut Regs) {
    if r.vector < 32 {
        exception(r)
    } else {
        crate::intr::interrupt(r)
    }
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 floating point",
    "alignment check",
    "machine check",
    "SIMD floating point",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// A CPU exception: report it and stop the machine.
fn exception(r: &Regs) -> ! {
    let v = r.vector as usize;
    print_fatal(format_args!(
        "\nmetal: exception {v} ({}) error {:#x} at rip {:#x} rsp {:#x}",
        NAMES[v & 31],
        r.error,
        r.rip,
        r.rsp
    ));
    if v == 14 && crate::stacks::in_region(crate::x86::read_cr2() as usize) {
        print_fatal(format_args!(
            " kernel stack overflow: guard page hit at {:#x} (thread {})",
            crate::x86::read_cr2(),
            kern::sched::current_name().unwrap_or("?")
        ));
    } else if v == 14 {
        print_fatal(format_args!(
            " fault address {:#x} ({} {})",
            crate::x86::read_cr2(),
            if r.error & 2 != 0 { "write" } else { "read" },
            if r.error & 1 != 0 {
                "protection"
            } else {
                "not present"
            }
        ));
    }
    print_fatal(format_args!("\n"));
    crate::console::exit(EXIT_EXCEPTION)
}

// ---- tables ------------------------------------------------------------

/// A table written once by the boot CPU before it is loaded, then only
/// read by the hardware.
#[repr(C, align(16))]
struct BootTable<T>(UnsafeCell<T>);

// SAFETY: written only by `init` on the boot CPU before any other CPU or
// interrupt can read it (see `init`).
unsafe impl<T> Sync for BootTable<T> {}

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

static IDT: BootTable<[[u64; 2]; 256]> = BootTable(UnsafeCell::new([[0; 2]; 256]));
/// The TSSs, one per CPU: 104 bytes; IST1 at byte 36, IST2 at 44, I/O map
/// base at 102.
static TSS: [BootTable<[u32; 26]>; MAXCPU] =
    [const { BootTable(UnsafeCell::new([0; 26])) }; MAXCPU];
static INTR_STACKS: [BootTable<Stack<INTR_STACK>>; MAXCPU] =
    [const { BootTable(UnsafeCell::new(Stack([0; INTR_STACK]))) }; MAXCPU];
static EXC_STACKS: [BootTable<Stack<EXC_STACK>>; MAXCPU] =
    [const { BootTable(UnsafeCell::new(Stack([0; EXC_STACK]))) }; MAXCPU];

fn gate(handler: usize, ist: u8) -> [u64; 2] {
    let h = handler as u64;
    let lo = (h & 0xffff)
        | (0x08 << 16)
        | (u64::from(ist) << 32)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | ((h >> 16) & 0xffff) << 48;
    [lo, h >> 32]
}

/// Interrupts run on the interrupted stack instead of IST1 (read by the
/// entry stub).
#[unsafe(no_mangle)]
static DVMA_INTR_STACK_OFF: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// Take interrupts on the CPU's interrupt stack (`true`, the default) or
/// on whatever stack was running. Boot, before interrupts are enabled.
pub fn set_intr_stack(on: bool) {
    DVMA_INTR_STACK_OFF.store(!on, core::sync::atomic::Ordering::Relaxed);
}

/// Is interrupt-stack mode on?
pub fn intr_stack_on() -> bool {
    !DVMA_INTR_STACK_OFF.load(core::sync::atomic::Ordering::Relaxed)
}

/// Is `sp` on some CPU's interrupt stack?
pub fn on_intr_stack(sp: usize) -> bool {
    INTR_STACKS.iter().any(|s| {
        let lo = s.0.get() as usize;
        (lo..lo + INTR_STACK).contains(&sp)
    })
}

/// Fill (CPU 0: also the shared IDT) and load the IDT, CPU `i`'s TSS and
/// its descriptor. CPU `i`, once, with interrupts disabled, before
/// anything can trap on it; CPU 0 first.
pub fn init(i: usize) {
    let ist1 = (INTR_STACKS[i].0.get() as usize + INTR_STACK) as u64;
    let ist2 = (EXC_STACKS[i].0.get() as usize + EXC_STACK) as u64;
    // SAFETY: CPU i, interrupts off: its TSS is not loaded yet, and the
    // IDT is written only by CPU 0 before any other CPU starts: these are
    // the only references.
    unsafe {
        let tss = &mut *TSS[i].0.get();
        tss[9] = ist1 as u32;
        tss[10] = (ist1 >> 32) as u32;
        tss[11] = ist2 as u32;
        tss[12] = (ist2 >> 32) as u32;
        tss[25] = 104 << 16; // I/O map base beyond the limit: no I/O bitmap
        if i == 0 {
            let idt = &mut *IDT.0.get();
            for (v, e) in idt.iter_mut().enumerate() {
                *e = if v < 32 {
                    gate(dvma_exc_stubs as *const () as usize + v * 16, 2)
                } else {
                    gate(dvma_intr_stubs as *const () as usize + (v - 32) * 16, 1)
                };
            }
        }
    }
    let base = TSS[i].0.get() as u64;
    let limit = 103u64;
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, 64-bit TSS (available)
        | (((base >> 24) & 0xff) << 56);
    DVMA_GDT[3 + 2 * i].store(lo, core::sync::atomic::Ordering::Relaxed);
    DVMA_GDT[4 + 2 * i].store(base >> 32, core::sync::atomic::Ordering::Relaxed);
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let gdt = Ptr {
        limit: (GDT_ENTRIES * 8 - 1) as u16,
        base: DVMA_GDT.as_ptr() as u64,
    };
    let idt = Ptr {
        limit: (256 * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the GDT keeps the boot code and data selectors at the same
    // slots, the TSS descriptor is valid (written above) and the IDT's
    // gates point at the stubs with IST stacks that exist.
    unsafe {
        core::arch::asm!(
            "lgdt [{gdt}]",
            "lidt [{idt}]",
            "ltr {sel:x}",
            gdt = in(reg) &gdt,
            idt = in(reg) &idt,
            sel = in(reg) tss_selector(i),
            options(nostack, readonly)
        );
    }
}
