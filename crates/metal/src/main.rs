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
//! | `intr` | vectors per IPL, the kern trap entry, the AST frame push |
//! | `lapic` | the local APIC: EOI, timer, IPIs |
//! | `clock` | TSC and LAPIC timer calibrated against the PIT |
//! | `md` | `kern::md::Md` for metal, `curcpu`, the AST trampoline (`cpu_switchto` is `kern::arch`'s) |
//! | `heap` | the global allocator |
//! | `pvh` | the PVH start info (command line, memory map) |
//! | `stacks` | kernel-thread stacks with unmapped guard pages |
//! | `acpi` | the MADT's CPUs, the MCFG's PCI configuration window |
//! | `pci` | PCI configuration space (ECAM), capabilities, BARs mapped uncached |
//! | `virtio` | virtio-blk (modern virtio-pci, MSI-X) as kern's `DiskController` |
//! | `iommu` | `SoftIommu`: the IOVA translation table bus_dma needs without an IOMMU (no protection) |
//! | `vtd` | Intel VT-d as kern's `Iommu` (`--iommu vtd`): root/context tables, second-level page tables; `vtd::inval`: queued (or register-based) invalidation; `vtd::fault`: fault records and the fault-event interrupt |
//! | `disk` | the `disk` program: sd over every virtio-blk disk (and ccd over them), written, read back, verified |
//! | `kbench` | the `bench kernel` program: kern's load generator over sd on virtio-blk, every DVMA x completion pair |
//! | `smp` | INIT-SIPI-SIPI, the real-mode trampoline, the APs' entry |
//! | `selftest` | the `selftest` program |
//! | `race` | the `race` program (kern's `RaceKit`) |
//! | `micro` | the `bench micro` program |
//! | `dvmabench` | the `bench dvma` program: bus_dma load+sync+unload per DVMA mode, IOTLB invalidations and their cost |
//! | `x86` | privileged instructions |
//!
//! # Programs
//! The kernel command line names a program and its flags:
//! `hello`, `fault`, `selftest`, `race`, `bench micro`, `bench dvma`, `bench kernel`, `disk`, `overflow` (a kernel thread
//! that runs off its stack: the guard page must stop it), with the flags `--json`,
//! `--spl lazy|mask`, `--intr-stack on|off`, `--iterations N` (race: injections per row;
//! bench micro, bench dvma: repetitions; disk: writes per run), (race) `--storm-ms N` and (disk)
//! `--dvma LIST` and `--completion LIST` (comma lists of mode names, or `all`) and
//! `--iommu none|vtd` (disk, bench kernel, bench dvma), (disk) `--ccd` and (bench kernel)
//! `--ms N`. Programs other
//! than `hello` and `fault` run as a kernel thread on CPU 0 of a booted
//! kern with every CPU the MADT lists (QEMU's `-smp`, at most 8); the boot
//! stack becomes CPU 0's idle context (`kern::sched::cpu_run`), and each
//! other CPU runs `cpu_run` on its own boot stack (`smp.rs`).
//!
//! # Guest exit status
//! 0: the program passed; 1: it ran and failed; 2: a panic; 3: a CPU
//! exception ([`trap::EXIT_EXCEPTION`]); 4: an unknown program.
#![no_std]
#![no_main]
#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

extern crate alloc;

pub mod acpi;
pub mod boot;
#[macro_use]
pub mod console;
pub mod clock;
pub mod disk;
pub mod dvmabench;
pub mod heap;
pub mod intr;
pub mod iommu;
pub mod kbench;
pub mod lapic;
pub mod md;
pub mod mem;
pub mod micro;
pub mod pci;
pub mod pvh;
pub mod race;
pub mod selftest;
pub mod smp;
pub mod stacks;
pub mod trap;
pub mod virtio;
pub mod vtd;
pub mod x86;

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU8, Ordering::Relaxed};

use kern::kernel::{KernelConfig, SplImpl};

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
    // The first SSE instruction, on purpose, before anything else runs: a
    // hypervisor that cannot run SSE in its guests (this machine's nested
    // KVM reports an emulation failure) stops here, where the host runner
    // recognises it and falls back to TCG.
    // SAFETY: clears a vector register the compiler is told about.
    unsafe { core::arch::asm!("xorps xmm0, xmm0", out("xmm0") _, options(nomem, nostack)) };
    trap::init(0);
    intr::pic_disable();
    lapic::init(intr::SPURIOUS);
    md::percpu_init(0);
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
    let mut prog = words.next().unwrap_or("hello");
    if prog == "bench" {
        prog = match words.next() {
            Some("micro") => "bench micro",
            Some("kernel") => "bench kernel",
            Some("dvma") => "bench dvma",
            other => usage(&alloc::format!("bench {other:?}")),
        };
    }
    let mut opts = Opts {
        json: false,
        iterations: None,
        storm_ms: 0,
        dvma: 1,
        completion: 0xf,
        vtd: false,
        dvma_set: false,
        ccd: false,
        ms: None,
    };
    let mut spl = SplImpl::Lazy;
    while let Some(w) = words.next() {
        match w {
            "--json" => opts.json = true,
            "--iterations" => match words.next().and_then(|n| n.parse().ok()) {
                Some(n) => opts.iterations = Some(n),
                None => usage("--iterations wants a number"),
            },
            "--storm-ms" => match words.next().and_then(|n| n.parse().ok()) {
                Some(n) => opts.storm_ms = n,
                None => usage("--storm-ms wants a number"),
            },
            "--dvma" => {
                match words
                    .next()
                    .and_then(|w| disk::parse_set(w, &kern::bus_dma::DvmaMode::ALL, |m| m.name()))
                {
                    Some(set) => {
                        opts.dvma = set;
                        opts.dvma_set = true;
                    }
                    None => usage("--dvma wants all or a comma list of DVMA modes"),
                }
            }
            "--completion" => {
                match words.next().and_then(|w| {
                    disk::parse_set(w, &kern::completion::Completion::ALL, |c| c.name())
                }) {
                    Some(set) => opts.completion = set,
                    None => usage("--completion wants all or a comma list of completion modes"),
                }
            }
            "--ccd" => opts.ccd = true,
            "--ms" => match words.next().and_then(|n| n.parse().ok()) {
                Some(n) => opts.ms = Some(n),
                None => usage("--ms wants a number"),
            },
            "--iommu" => match words.next() {
                Some("vtd") => opts.vtd = true,
                Some("none") => opts.vtd = false,
                other => usage(&alloc::format!("--iommu {other:?}")),
            },
            "--spl" => match words.next() {
                Some("lazy") => spl = SplImpl::Lazy,
                Some("mask") => spl = SplImpl::Mask,
                other => usage(&alloc::format!("--spl {other:?}")),
            },
            "--intr-stack" => match words.next() {
                Some("on") => trap::set_intr_stack(true),
                Some("off") => trap::set_intr_stack(false),
                other => usage(&alloc::format!("--intr-stack {other:?}")),
            },
            other => usage(other),
        }
    }
    let body: Program = match prog {
        "hello" => {
            kprintln!("hello from metal");
            console::exit(0)
        }
        "fault" => {
            // The unmapped page right above the 4 GiB identity map: the
            // page-fault handler must report it and stop the machine.
            let p = 0x1_0000_0000usize as *const u64;
            // SAFETY: not safe at all, on purpose: it faults, and the fault
            // handler never returns here.
            let v = unsafe { core::ptr::read_volatile(p) };
            kprintln!("metal: read {v:#x} from an unmapped page?");
            console::exit(EXIT_FAIL)
        }
        "selftest" => |ctx, o| selftest::run(ctx, o.json),
        "race" => |ctx, o| race::run(ctx, o.json, o.iterations.unwrap_or(200), o.storm_ms),
        "bench micro" => |ctx, o| micro::run(ctx, o.json, o.iterations.unwrap_or(5)),
        "bench dvma" => |ctx, o| dvmabench::run(ctx, o.json, o.iterations.unwrap_or(3)),
        "disk" => |ctx, o| {
            disk::run(
                ctx,
                disk::DiskOpts {
                    json: o.json,
                    ops: o.iterations.unwrap_or(32),
                    dvma: o.dvma,
                    completion: o.completion,
                    ccd: o.ccd,
                },
            )
        },
        "bench kernel" => |ctx, o| {
            kbench::run(
                ctx,
                kbench::BenchOpts {
                    json: o.json,
                    // All 20 pairs unless --dvma says otherwise (the `disk`
                    // program's default is strict only).
                    dvma: if o.dvma_set {
                        o.dvma
                    } else {
                        (1 << kern::bus_dma::DvmaMode::ALL.len()) - 1
                    },
                    completion: o.completion,
                    ms: o.ms.unwrap_or(kbench::DEFAULT_MS),
                },
            )
        },
        "overflow" => |_, _| {
            // Run off the end of this thread's stack: the guard page must
            // stop it at once (a page fault reported as a kernel stack
            // overflow, status 3), not let it scribble below.
            kprintln!("overflow: recursing until the guard page");
            recurse(0) as u8
        },
        other => usage(other),
    };
    let pvh_low = info.low_structures();
    assert!(
        pvh_low
            .iter()
            .all(|&(a, l)| a + l <= smp::TRAMP || a >= smp::TRAMP + 4096),
        "the PVH structures {pvh_low:x?} overlap the AP trampoline at {:#x}",
        smp::TRAMP
    );
    run_kernel(prog, body, opts, spl, info.rsdp())
}

/// Recurse with a 1 KiB frame until `n` reaches `u64::MAX`, which the
/// stack does not survive (the `overflow` program).
#[inline(never)]
fn recurse(n: u64) -> u64 {
    let buf = core::hint::black_box([n; 128]);
    if core::hint::black_box(n) == u64::MAX {
        return buf[1];
    }
    recurse(n + 1) + buf[0]
}

fn usage(what: &str) -> ! {
    kprintln!(
        "metal: unknown program or flag {what:?} (programs: hello, fault, selftest, race, overflow, bench micro, bench dvma, bench kernel, disk; flags: --json, --spl lazy|mask, --intr-stack on|off, --iterations N, --storm-ms N, --dvma LIST, --completion LIST, --iommu none|vtd, --ccd, --ms N)"
    );
    console::exit(EXIT_USAGE)
}

/// Bytes of RAM given to kern as its physical memory.
const PHYSMEM: usize = 32 << 20;

/// The program's result, set by its thread before it shuts kern down.
static RESULT: AtomicU8 = AtomicU8::new(EXIT_FAIL);

/// A program's flags.
#[derive(Clone, Copy, Debug)]
struct Opts {
    json: bool,
    iterations: Option<u32>,
    storm_ms: u64,
    /// `disk`, `bench kernel`: the DVMA modes (bit set over `DvmaMode::ALL`).
    dvma: u8,
    /// `--dvma` was given.
    dvma_set: bool,
    /// `disk`: the completion modes (bit set over `Completion::ALL`).
    completion: u8,
    /// `disk`, `bench kernel`, `bench dvma`: put the disks behind VT-d (`--iommu vtd`).
    vtd: bool,
    /// `disk`: also stripe a ccd over the disks (`--ccd`).
    ccd: bool,
    /// `bench kernel`: the measured window, ms (`--ms`).
    ms: Option<u64>,
}

/// A program: its kernel thread's body; returns the guest status.
type Program = fn(&kern::ThreadCtx, Opts) -> u8;

/// Boot kern on this CPU, run `body` as a kernel thread, idle until kern
/// shuts down, exit with the body's status.
fn run_kernel(name: &'static str, body: Program, opts: Opts, spl: SplImpl, rsdp: usize) -> ! {
    clock::calibrate();
    if name == "disk" || name == "bench kernel" || (name == "bench dvma" && opts.vtd) {
        // PCI before the other CPUs start: it maps registers uncached.
        // (`bench dvma` behind VT-d: the disk is the unit's device.)
        match acpi::ecam(rsdp) {
            Some(e) => {
                pci::init(e);
                let mut fs = [pci::Function {
                    bus: 0,
                    dev: 0,
                    func: 0,
                }; intr::MAX_DISKS];
                let n = virtio::VirtioBlk::find_all(&mut fs);
                let fs = &fs[..n];
                let mut vtd = false;
                if opts.vtd && n > 0 {
                    match acpi::dmar_unit(rsdp) {
                        Some((regs, _)) => match vtd::init(regs, fs) {
                            Ok(()) => vtd = true,
                            Err(e) => kprintln!("metal: vt-d: {e}"),
                        },
                        None => kprintln!("metal: --iommu vtd but no ACPI DMAR"),
                    }
                }
                if n == 0 {
                    kprintln!("metal: no virtio-blk-pci (1af4:1042)");
                }
                for (i, &f) in fs.iter().enumerate() {
                    match virtio::VirtioBlk::probe(f, vtd, i) {
                        Ok(d) => disk::add_disk(d),
                        Err(e) => kprintln!("metal: virtio-blk{i}: {e}"),
                    }
                }
            }
            None => kprintln!("metal: no ACPI MCFG: no PCI"),
        }
    }
    let ncpu = match acpi::cpu_apic_ids(rsdp) {
        Some((ids, n)) if n > 1 => {
            stacks::set_reuse(false);
            smp::start_aps(&ids[..n])
        }
        _ => 1,
    };
    kprintln!(
        "metal: {ncpu} CPU(s), TSC {} MHz, LAPIC timer {} kHz (/16), spl {}, interrupt stack {}",
        clock::tsc_hz() / 1_000_000,
        clock::lapic_hz() / 1000,
        spl.name(),
        if trap::intr_stack_on() { "on" } else { "off" }
    );
    let layout = core::alloc::Layout::from_size_align(PHYSMEM, 2 << 20).expect("layout");
    // SAFETY: a non-zero-sized layout; the block is never freed (it is
    // the machine's RAM for the kernel's life).
    let ram = unsafe { alloc::alloc::alloc_zeroed(layout) };
    assert!(!ram.is_null(), "no room for physical memory");
    iommu::SOFT_IOMMU.set_base(ram as usize);
    let md: &'static md::MetalMd = Box::leak(Box::new(md::MetalMd {
        physmem: (ram as usize, PHYSMEM as u64),
    }));
    let k = match kern::kernel::boot(
        md,
        KernelConfig {
            ncpu,
            spl,
            ..KernelConfig::default()
        },
    ) {
        Ok(k) => k,
        Err(e) => panic!("kern boot: {e}"),
    };
    if vtd::VTD.enabled()
        && let Err(e) = vtd::fault::establish()
    {
        panic!("vt-d fault interrupt: {e}");
    }
    if let Err(e) = kern::sched::kthread_create(Some(0), name, move |ctx| {
        let code = body(ctx, opts);
        RESULT.store(code, Relaxed);
        kern::kernel::shutdown();
    }) {
        panic!("creating the program's thread: {e}");
    }
    md::PERCPU[0]
        .cpu
        .store(k.cpu(0) as *const kern::cpu::Cpu as *mut _, Relaxed);
    intr::timer_period(intr::TICK_NS);
    smp::release();
    x86::sti();
    kern::sched::cpu_run();
    // Every CPU leaves `cpu_run` once kern has shut down; wait for the
    // others (bounded) so that the exit status reports a whole shutdown.
    let t = clock::nanotime() + 5_000_000_000;
    while smp::DONE.load(Relaxed) + 1 < ncpu && clock::nanotime() < t {
        core::hint::spin_loop();
    }
    if smp::DONE.load(Relaxed) + 1 < ncpu {
        kprintln!(
            "metal: {} of {} other CPUs left cpu_run",
            smp::DONE.load(Relaxed),
            ncpu - 1
        );
        console::exit(EXIT_FAIL);
    }
    let code = RESULT.load(Relaxed);
    kprintln!(
        "metal: kern shut down; program {name} exit {code} ({} traps, {} timer ticks, {} late self-IPIs)",
        k.cpu(0).stats.traps.get(),
        intr::TICKS.load(Relaxed),
        md::SELF_IPI_LATE.load(Relaxed)
    );
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

/// The unwinder's resume entry, which landing pads in the prebuilt
/// `alloc` refer to. Nothing unwinds here (`panic = "abort"`), so no
/// landing pad runs; if one ever did, stop the machine.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    console::print_fatal(format_args!("\nmetal: _Unwind_Resume called\n"));
    console::exit(EXIT_PANIC)
}
