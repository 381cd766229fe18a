//! Device interrupts as real-time signals.
//!
//! One signal per hardware IPL: `SIGRTMIN+2` for bio up to `SIGRTMIN+7` for
//! high. A device that must interrupt a CPU sends that CPU's host thread
//! the signal of the source's level with `tgkill` (see `kern::pending` for
//! when it must). The handler is installed per boot:
//!
//! * `lazy` spl: `SA_NODEFER` and an empty `sa_mask`: every interrupt
//!   signal may nest; the kernel's dispatch loop defers what the IPL blocks.
//! * `mask` spl: `sa_mask` blocks the signals of every level up to the
//!   handler's own, as an interrupt controller would; `spl` changes the
//!   thread's signal mask.
//! * interrupt stack on: `SA_ONSTACK`, with a per-CPU `sigaltstack`.
//!
//! One more signal, `SIGRTMIN+8`, is the statclock's ([`statclock_sig`],
//! `crate::statclock`): no spl blocks it, its handler only counts a sample
//! (it runs no interrupt, softint or AST), and every interrupt signal is
//! blocked while it runs, so no interrupt nests inside it.
//!
//! # Interrupt context
//! `dvma_sig_body` and `dvma_statclock` run in signal handlers. They
//! allocate nothing, take no lock that thread code may hold (only kernel
//! spin mutexes at or above the handler's IPL, see `kern::intr`), print
//! nothing, and save and restore errno. A panic in them aborts the process
//! (they are `extern "C"`).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use kern::intr::TrapFrame;
use kern::ipl::Ipl;

use crate::arch;
use crate::sys;

/// `SA_RESTORER` (not exported by the libc crate for glibc).
const SA_RESTORER: i32 = 0x0400_0000;

/// First interrupt signal (bio) relative to `SIGRTMIN`.
const SIG_OFFSET: i32 = 2;

/// The signal of hardware level `level`.
pub fn sig_of(level: Ipl) -> i32 {
    libc::SIGRTMIN() + SIG_OFFSET + level.hard_index().unwrap_or(0) as i32
}

/// The hardware level of signal `sig`, if it is one of ours.
pub fn level_of(sig: i32) -> Option<Ipl> {
    let i = sig - libc::SIGRTMIN() - SIG_OFFSET;
    if (0..6).contains(&i) {
        Some(Ipl::HARD[i as usize])
    } else {
        None
    }
}

/// Kernel sigset of the hardware levels at or below `level`.
pub fn hard_set(level: Ipl) -> u64 {
    Ipl::HARD
        .iter()
        .filter(|h| **h <= level)
        .map(|h| sys::sigbit(sig_of(*h)))
        .fold(0, |a, b| a | b)
}

/// The statclock's signal (`SIGRTMIN+8`): the profiling timer of each vCPU
/// ([`crate::statclock`]). Not an interrupt signal: no spl level blocks
/// it, as an NMI.
pub fn statclock_sig() -> i32 {
    libc::SIGRTMIN() + SIG_OFFSET + 6
}

/// Kernel sigset of every interrupt signal.
pub fn all_set() -> u64 {
    hard_set(Ipl::High)
}

/// Install the interrupt handlers for this boot.
pub fn install(mask_mode: bool, on_stack: bool) -> std::io::Result<()> {
    for h in Ipl::HARD {
        let mut flags = (libc::SA_SIGINFO | libc::SA_RESTART | SA_RESTORER) as u64;
        if on_stack {
            flags |= libc::SA_ONSTACK as u64;
        }
        let mask = if mask_mode {
            hard_set(h)
        } else {
            flags |= libc::SA_NODEFER as u64;
            0
        };
        let act = sys::KernelSigaction {
            handler: arch::sigentry_addr(),
            flags,
            restorer: arch::sigreturn_addr(),
            mask,
        };
        let r = sys::rt_sigaction(sig_of(h), &act);
        if r < 0 {
            return Err(std::io::Error::from_raw_os_error(-r as i32));
        }
    }
    STATCLOCK_ON_STACK.store(on_stack, Relaxed);
    install_statclock(statclock_sig())
}

/// The interrupt stack setting of this boot, for the statclock's handlers.
static STATCLOCK_ON_STACK: AtomicBool = AtomicBool::new(false);

/// Install the statclock's handler for `sig`: on the interrupt stack if
/// interrupts are, with every interrupt signal, the statclock's and SIGIO
/// blocked while it runs, so that nothing of the kernel's runs nested
/// inside it and it never nests.
fn install_statclock(sig: i32) -> std::io::Result<()> {
    let mut flags = (libc::SA_SIGINFO | libc::SA_RESTART | SA_RESTORER) as u64;
    if STATCLOCK_ON_STACK.load(Relaxed) {
        flags |= libc::SA_ONSTACK as u64;
    }
    let act = sys::KernelSigaction {
        handler: dvma_statclock as *const () as usize,
        flags,
        restorer: arch::sigreturn_addr(),
        mask: all_set() | sys::sigbit(statclock_sig()) | sys::sigbit(libc::SIGIO),
    };
    let r = sys::rt_sigaction(sig, &act);
    if r < 0 {
        return Err(std::io::Error::from_raw_os_error(-r as i32));
    }
    Ok(())
}

/// The statclock's handler for `SIGIO` too: the host sends it instead of a
/// perf sample's real-time signal when it cannot queue that one (its
/// default action would end the process). Host context.
pub(crate) fn install_sigio_statclock() -> std::io::Result<()> {
    install_statclock(libc::SIGIO)
}

/// The saved context of an interrupted CPU.
struct LinuxFrame {
    uc: *mut libc::ucontext_t,
    sig: i32,
}

impl LinuxFrame {
    fn greg(&self, r: i32) -> u64 {
        // SAFETY: `uc` is the ucontext the kernel passed to this handler;
        // it is valid and exclusively ours until the handler returns.
        unsafe { (*self.uc).uc_mcontext.gregs[r as usize] as u64 }
    }
}

impl TrapFrame for LinuxFrame {
    fn signal_level(&self) -> Ipl {
        level_of(self.sig).unwrap_or(Ipl::High)
    }

    fn sp(&self) -> usize {
        self.greg(libc::REG_RSP) as usize
    }

    fn interrupted_trap(&self) -> bool {
        arch::in_trap() > 1 || arch::in_stubs(self.greg(libc::REG_RIP) as usize)
    }

    fn push_upcall(&mut self) {
        let rip = self.greg(libc::REG_RIP);
        arch::set_ast_ret(rip);
        // SAFETY: as in `greg`; the kernel restores this context at
        // sigreturn, so the thread resumes in the trampoline.
        unsafe {
            (*self.uc).uc_mcontext.gregs[libc::REG_RIP as usize] = arch::trampoline() as i64;
        }
    }
}

/// The body of the interrupt entry (called by `dvma_sigentry`).
pub(crate) extern "C" fn dvma_sig_body(
    sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    // SAFETY: `__errno_location` returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    let mut frame = LinuxFrame {
        uc: uc as *mut libc::ucontext_t,
        sig,
    };
    if kern::intr::trap(&mut frame) {
        // Handlers ran in the idle loop's sleep window: this CPU may be
        // between its look at the state word and `epoll_wait` (`Md::idle_wait`),
        // and what they queued changes no word it looks at. One raw write of
        // its eventfd makes that wait return at once.
        if let (Some(k), Some(cpu)) = (kern::kernel::try_kernel(), kern::cpu::curcpu_opt()) {
            k.md().kick(cpu.index(), kern::md::Kick::Wake);
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The AST upcall, called by the trampoline on the interrupted thread's
/// stack (thread context: it may sleep).
pub(crate) extern "C" fn dvma_ast_upcall() {
    // SAFETY: this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    kern::ast::upcall();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The statclock's handler: one sample of the part the interrupted code
/// was in (`kern::statclock::statclock`). Not a kernel interrupt: it runs
/// no interrupt, soft interrupt or AST and pushes no frame; it allocates
/// nothing and saves and restores errno. Code of the machine's own that no
/// marker covers is named here: the interrupt entry and exit stubs are the
/// interrupt entry, the AST trampolines are dispatch.
extern "C" fn dvma_statclock(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    uc: *mut libc::c_void,
) {
    // SAFETY: `__errno_location` returns this thread's errno slot.
    let errno = unsafe { *libc::__errno_location() };
    let uc = uc as *const libc::ucontext_t;
    // SAFETY: `uc` is the ucontext the kernel passed to this handler; it
    // is valid until the handler returns.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as usize;
    let at = if arch::in_entry_stubs(rip) {
        Some(kern::statclock::Part::IntrEntry)
    } else if arch::in_stubs(rip) {
        Some(kern::statclock::Part::Dispatch)
    } else {
        None
    };
    kern::statclock::statclock(at);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}
