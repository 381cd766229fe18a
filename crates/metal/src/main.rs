//! # metal: the dvma kernel core on x86-64
//!
//! The same `kern` crate that runs as a Linux process (`crates/machine`),
//! booted as a kernel under QEMU (KVM, or TCG without it): `qemu-system-x86_64
//! -machine q35 -kernel dvma-metal -append PROGRAM`. The host side is
//! `dvma metal PROGRAM` (`src/metal.rs` of the main crate), which builds
//! this, starts QEMU, streams the serial console and exits with the
//! guest's status.
//!
//! | module | what |
//! |---|---|
//! | `boot` | PVH entry, page tables, long mode, GDT |
//! | `console` | COM1 output, the isa-debug-exit way out |
//! | `trap` | IDT, TSS, IST stacks, entry stubs, fatal exceptions |
//! | `heap` | the global allocator |
//! | `x86` | privileged instructions |
//!
//! # Guest exit status
//! 0: the program passed; 1: it ran and failed; 2: a panic; 3: a CPU
//! exception ([`trap::EXIT_EXCEPTION`]); 4: an unknown program.
#![no_std]
#![no_main]
#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

extern crate alloc;

pub mod boot;
#[macro_use]
pub mod console;
pub mod heap;
pub mod intr;
pub mod pvh;
pub mod trap;
pub mod x86;

/// The kernel heap, wrapped so that kern's AST protection of the allocator
/// holds here as on Linux (`kern::malloc`).
#[global_allocator]
static ALLOC: kern::malloc::KernAlloc<heap::Global> = kern::malloc::KernAlloc::new(heap::Global);

/// Guest status of a program that ran and failed.
pub const EXIT_FAIL: u8 = 1;
/// Guest status of a panic.
pub const EXIT_PANIC: u8 = 2;
/// Guest status of an unknown program name.
pub const EXIT_USAGE: u8 = 4;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::print_fatal(format_args!("\nmetal: panic: {info}\n"));
    console::exit(EXIT_PANIC)
}

/// The first Rust code: called by `boot.rs` on the boot stack, interrupts
/// disabled, with the physical address of the PVH start info.
pub extern "C" fn metal_main(start_info: u32) -> ! {
    console::init();
    trap::init();
    intr::pic_disable();
    let info = pvh::StartInfo::read(start_info as usize);
    let ram = info.ram_above_1m();
    let kernel_end = core::ptr::addr_of!(__kernel_end) as usize;
    let heap_start = kernel_end.next_multiple_of(2 << 20);
    let heap_end = ram.1;
    // SAFETY: [heap_start, heap_end) is RAM (the PVH memory map says so)
    // above the kernel image, identity-mapped by `boot.rs` (first 4 GiB),
    // and nothing else uses it.
    unsafe { heap::init(&heap::HEAP, heap_start, heap_end - heap_start) };
    kprintln!(
        "metal: dvma kernel, {} MiB RAM, heap {:#x}..{:#x}, cmdline {:?}",
        (ram.1 - ram.0) >> 20,
        heap_start,
        heap_end,
        info.cmdline()
    );
    let cmd = info.cmdline();
    let mut words = cmd.split_whitespace();
    let prog = words.next().unwrap_or("hello");
    let code = match prog {
        "hello" => {
            kprintln!("hello from metal");
            0
        }
        "fault" => {
            // The unmapped page right above the 4 GiB identity map: the
            // page-fault handler must report it and stop the machine.
            let p = 0x1_0000_0000usize as *const u64;
            // SAFETY: not safe at all, on purpose: it faults, and the fault
            // handler never returns here.
            let v = unsafe { core::ptr::read_volatile(p) };
            kprintln!("metal: read {v:#x} from an unmapped page?");
            EXIT_FAIL
        }
        other => {
            kprintln!("metal: unknown program {other:?} (hello, fault)");
            EXIT_USAGE
        }
    };
    console::exit(code)
}

unsafe extern "C" {
    static __kernel_end: u8;
}

/// The unwinder's personality routine, which the prebuilt `alloc` of the
/// host target refers to (it was built with unwinding). This kernel is
/// built with `panic = "abort"`: nothing unwinds, so nothing calls it.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
