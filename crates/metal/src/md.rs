//! The machine-dependent layer on metal: `kern::md::Md` and the two
//! link-time hooks.
//!
//! | kern asks for | metal gives |
//! |---|---|
//! | CPUs | the boot CPU and the MADT's others (`smp.rs`), each with its [`PerCpu`] |
//! | `dvma_md_curcpu` | a `%gs`-relative load: `IA32_GS_BASE` points at the CPU's [`PerCpu`], whose first word is its `kern::cpu::Cpu` |
//! | `dvma_md_switch` | `cpu_switchto` from `kern::arch`, shared with the Linux machine: push the callee-saved registers, swap `rsp`, pop, `ret` |
//! | `kick(cpu, Interrupt(l))` | an IPI with `l`'s vector (`intr.rs`); to itself with the "self" shorthand, and then, if the CPU takes interrupts at that class, a wait until the APIC has delivered it, so the interrupt lands right there as a signal to oneself does on Linux |
//! | `kick(cpu, Wake)` | an IPI with the wake vector, which ends the target's `hlt` |
//! | `nanotime` | the TSC, calibrated against the PIT (`clock.rs`) |
//! | `hw_mask(l)` (`mask` spl) | `mov cr8`: the task priority holds every vector of class at or below `l`'s |
//! | `idle_wait` | with interrupts disabled, look at the word; if it still says sleep, `sti; hlt` (the `sti` shadow makes the pair atomic: a wake-up IPI that arrives after the look ends the `hlt`) |
//! | `physmem` | 32 MiB of the identity-mapped RAM, carved from the heap at boot |
//! | `iommu` | with `--iommu vtd`, [`crate::vtd::Vtd`] (Intel VT-d: the device's accesses are translated and checked by the unit); otherwise [`crate::iommu::SoftIommu`], a translation table the disk driver consults (no protection from the device, which sees physical addresses) |
//! | `host_wake` | nothing: there are no host threads on metal to wake |
//! | stacks | 4 KiB pages in a region of their own above an unmapped guard page (`stacks.rs`): an overflow faults at once and is reported |
//! | `run_thread` | calls the body: a panic stops the machine (`panic = "abort"`, the panic handler exits QEMU with status 2) |
//!
//! # Contexts
//! `kick`, `nanotime` and `hw_mask` are called from traps too: they take
//! no lock and allocate nothing. The stacks' functions allocate, from
//! thread context only.

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering::Relaxed};

use kern::cpu::Cpu;
use kern::iommu::Iommu;
use kern::ipl::Ipl;
use kern::md::{Kick, Md, StackMem};

use crate::intr::{WAKE, cr8_of, vector_of};
use crate::lapic::{self, Dest};
use crate::x86;

/// What `%gs` points at on a CPU. The first word is read by
/// `dvma_md_curcpu`.
#[repr(C)]
#[derive(Debug)]
pub struct PerCpu {
    /// The kern CPU this is (null until kern has booted).
    pub cpu: AtomicPtr<Cpu>,
    /// The CPU's index.
    pub index: usize,
    /// Its local APIC id.
    pub apic_id: AtomicU64,
    /// When its current `hlt` began (`clock::nanotime`), or 0 when it is
    /// not halted.
    halt_start: AtomicU64,
    /// ns it has spent halted in `idle_wait` since boot: from the `hlt` to
    /// the entry of the trap that ended it (the trap's own time is not
    /// halted time). The bench's busy time is wall time minus this.
    pub halted_ns: AtomicU64,
}

/// The per-CPU areas.
pub static PERCPU: [PerCpu; crate::acpi::MAXCPU] = {
    let mut a = [const {
        PerCpu {
            cpu: AtomicPtr::new(core::ptr::null_mut()),
            index: 0,
            apic_id: AtomicU64::new(0),
            halt_start: AtomicU64::new(0),
            halted_ns: AtomicU64::new(0),
        }
    }; crate::acpi::MAXCPU];
    let mut i = 0;
    while i < crate::acpi::MAXCPU {
        a[i].index = i;
        i += 1;
    }
    a
};

const IA32_GS_BASE: u32 = 0xc000_0101;

/// Point `%gs` at CPU `i`'s [`PerCpu`]. That CPU, at boot, before anything
/// calls `curcpu` (the allocator does).
pub fn percpu_init(i: usize) {
    PERCPU[i].apic_id.store(u64::from(lapic::id()), Relaxed);
    // SAFETY: IA32_GS_BASE exists in long mode; the area is a static that
    // lives forever, and nothing else uses `%gs`.
    unsafe { x86::wrmsr(IA32_GS_BASE, &PERCPU[i] as *const PerCpu as u64) };
}

/// End this CPU's halted period, if it is in one: called at every trap's
/// entry (the interrupt that ends a `hlt` is taken before the `hlt`
/// returns) and after the `hlt`. Interrupts disabled, or the CPU's own
/// thread code (`swap` makes the two agree).
pub fn end_halt() {
    let Some(i) = PerCpu::current_index() else {
        return;
    };
    let p = &PERCPU[i];
    if p.halt_start.load(Relaxed) == 0 {
        return;
    }
    let s = p.halt_start.swap(0, Relaxed);
    if s != 0 {
        p.halted_ns
            .fetch_add(crate::clock::nanotime().saturating_sub(s), Relaxed);
    }
}

/// ns CPU `cpu` has spent halted since boot ([`PerCpu::halted_ns`]).
pub fn halted_ns(cpu: usize) -> u64 {
    PERCPU[cpu].halted_ns.load(Relaxed)
}

/// The kernel's `curcpu()` hook.
#[unsafe(no_mangle)]
pub fn dvma_md_curcpu() -> *const Cpu {
    let p: *const Cpu;
    // SAFETY: `%gs` points at this CPU's `PerCpu` from `percpu_init` on,
    // which runs before any Rust code that can reach kern.
    unsafe {
        core::arch::asm!("mov {}, qword ptr gs:[0]", out(reg) p,
            options(nostack, readonly, preserves_flags));
    }
    p
}

core::arch::global_asm!(
    ".pushsection .text.dvma_md, \"ax\"",
    // ---- the AST trampoline (intr.rs: the push) ----------------------------
    ".p2align 4",
    ".globl dvma_metal_ast_tramp",
    "dvma_metal_ast_tramp:",
    "pushfq",
    "push rax", "push rcx", "push rdx", "push rbx", "push rbp", "push rsi", "push rdi",
    "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "mov rbp, rsp",
    "sub rsp, 512",
    "and rsp, -16",
    "fxsave64 [rsp]",
    "cld",
    "call {upcall}",
    "fxrstor64 [rsp]",
    "mov rsp, rbp",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
    "pop rdi", "pop rsi", "pop rbp", "pop rbx", "pop rdx", "pop rcx", "pop rax",
    "popfq",
    "ret 128",
    ".globl dvma_metal_ast_tramp_end",
    "dvma_metal_ast_tramp_end:",
    ".popsection",
    upcall = sym ast_upcall,
);

unsafe extern "C" {
    fn dvma_metal_ast_tramp();
    fn dvma_metal_ast_tramp_end();
}

/// The AST upcall, called by the trampoline on the interrupted thread's
/// stack (thread context).
extern "C" fn ast_upcall() {
    kern::ast::upcall();
}

/// The trampoline's address (what a pushed frame returns into).
pub fn trampoline() -> usize {
    dvma_metal_ast_tramp as *const () as usize
}

/// Is `pc` inside the trampoline?
pub fn in_trampoline(pc: usize) -> bool {
    (dvma_metal_ast_tramp as *const () as usize..dvma_metal_ast_tramp_end as *const () as usize)
        .contains(&pc)
}

/// Self-IPIs that the APIC had not delivered after the wait (`kick`).
pub static SELF_IPI_LATE: AtomicU64 = AtomicU64::new(0);

/// The metal machine of one boot.
#[derive(Debug)]
pub struct MetalMd {
    /// The RAM given to kern as physical memory: (address, bytes).
    pub physmem: (usize, u64),
}

impl MetalMd {
    fn send(&self, cpu: usize, vector: u8) {
        let me = PerCpu::current_index();
        if me == Some(cpu) {
            lapic::send_ipi(Dest::SelfCpu, vector);
            // Taken at the next instruction boundary if this CPU takes
            // interrupts of that class now; wait for the APIC to deliver
            // it, bounded, so that it lands here and not a few
            // instructions later (TCG delivers at the end of a block).
            if x86::interrupts_enabled() && u64::from(vector >> 4) > x86::read_cr8() {
                let mut n = 0;
                while lapic::irr_pending(vector) {
                    n += 1;
                    if n > 100_000 {
                        SELF_IPI_LATE.fetch_add(1, Relaxed);
                        break;
                    }
                    core::hint::spin_loop();
                }
            }
        } else {
            let id = PERCPU[cpu].apic_id.load(Relaxed) as u32;
            lapic::send_ipi(Dest::Apic(id), vector);
        }
    }
}

impl PerCpu {
    /// The calling CPU's index, once kern runs on it.
    pub fn current_index() -> Option<usize> {
        let p = dvma_md_curcpu();
        // SAFETY: a non-null pointer is the kern CPU this CPU was given,
        // which lives as long as the kernel.
        unsafe { p.as_ref() }.map(|c| c.index())
    }
}

impl Md for MetalMd {
    fn kick(&self, cpu: usize, how: Kick) {
        match how {
            Kick::Interrupt(level) => {
                if let Some(v) = vector_of(level) {
                    self.send(cpu, v);
                }
            }
            Kick::Wake => self.send(cpu, WAKE),
        }
    }

    fn nanotime(&self) -> u64 {
        crate::clock::nanotime()
    }

    fn hw_mask(&self, level: Ipl) {
        x86::write_cr8(cr8_of(level));
    }

    fn idle_wait(&self, cpu: usize, word: &core::sync::atomic::AtomicU32, expect: u32) {
        // SAFETY: `cli` defers interrupts; `sti; hlt` re-enables them and
        // halts, with the `sti` shadow delaying any pending interrupt until
        // the `hlt` has begun, so a wake-up that arrived after the look
        // ends the `hlt` instead of being lost.
        unsafe {
            core::arch::asm!("cli", options(nomem, nostack));
            if word.load(Relaxed) == expect {
                // Halted from here to the trap that ends it (`end_halt`).
                PERCPU[cpu]
                    .halt_start
                    .store(crate::clock::nanotime().max(1), Relaxed);
                core::arch::asm!("sti", "hlt", options(nomem, nostack));
                end_halt();
            } else {
                core::arch::asm!("sti", options(nomem, nostack));
            }
        }
    }

    fn physmem(&self) -> (usize, u64) {
        self.physmem
    }

    fn iommu(&self) -> &'static dyn Iommu {
        if crate::vtd::VTD.enabled() {
            &crate::vtd::VTD
        } else {
            &crate::iommu::SOFT_IOMMU
        }
    }

    fn host_wake(&self, _word: &core::sync::atomic::AtomicU32) {}

    fn stack_alloc(&self, size: usize) -> Option<StackMem> {
        let (limit, base) = crate::stacks::alloc(size)?;
        Some(StackMem { limit, base })
    }

    fn thread_init(&self, stack: StackMem, entry: extern "C" fn(usize) -> !, arg: usize) -> usize {
        // SAFETY: `stack` came from `stack_alloc` (its top pages are
        // mapped) and belongs to the thread being created.
        unsafe { kern::arch::thread_frame(stack.base & !15, entry, arg) }
    }

    fn run_thread(&self, body: &mut dyn FnMut()) {
        body();
    }

    unsafe fn stack_free(&self, mem: StackMem) {
        // SAFETY: by the trait's contract `mem` came from `stack_alloc`
        // (so from `stacks::alloc`), is freed once, and nothing runs on it.
        unsafe { crate::stacks::free(mem.limit, mem.base) };
    }
}
