//! Raw system calls used from signal handlers and hot paths.
//!
//! Every function here is async-signal-safe: a single system call, no
//! allocation, no lock. None of them touches errno: they return the raw
//! kernel result (negative errno on failure).

use core::sync::atomic::AtomicU32;

/// `syscall(2)` with up to six arguments, returning the raw result.
#[inline(always)]
fn raw6(n: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the x86_64 Linux system-call convention: number in rax,
    // arguments in rdi, rsi, rdx, r10, r8, r9; rcx and r11 are clobbered.
    // Callers pass arguments valid for the call they make.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    raw6(libc::SYS_gettid, [0; 6]) as i32
}

/// The process id.
pub fn getpid() -> i32 {
    raw6(libc::SYS_getpid, [0; 6]) as i32
}

/// `sched_yield()`.
pub fn sched_yield() {
    raw6(libc::SYS_sched_yield, [0; 6]);
}

/// `mmap(addr, len, prot, flags, fd, off)`: the address, or a negative errno.
/// The caller passes a range inside a mapping it owns (with `MAP_FIXED`) or
/// a null hint.
pub fn mmap(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, off: u64) -> isize {
    raw6(
        libc::SYS_mmap,
        [
            addr,
            len,
            prot as usize,
            flags as usize,
            fd as usize,
            off as usize,
        ],
    )
}

/// `tgkill(pid, tid, sig)`.
pub fn tgkill(pid: i32, tid: i32, sig: i32) -> isize {
    raw6(
        libc::SYS_tgkill,
        [pid as usize, tid as usize, sig as usize, 0, 0, 0],
    )
}

/// `rt_sigprocmask(SIG_SETMASK, set, NULL)` for the calling thread.
pub fn sigsetmask(set: u64) -> isize {
    raw6(
        libc::SYS_rt_sigprocmask,
        [
            libc::SIG_SETMASK as usize,
            &set as *const u64 as usize,
            0,
            8,
            0,
            0,
        ],
    )
}

/// The kernel's `struct sigaction` on x86_64.
#[repr(C)]
pub struct KernelSigaction {
    /// `sa_handler` / `sa_sigaction`.
    pub handler: usize,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: usize,
    /// `sa_mask`.
    pub mask: u64,
}

/// `rt_sigaction(sig, act, NULL)`.
pub fn rt_sigaction(sig: i32, act: &KernelSigaction) -> isize {
    raw6(
        libc::SYS_rt_sigaction,
        [
            sig as usize,
            act as *const KernelSigaction as usize,
            0,
            8,
            0,
            0,
        ],
    )
}

/// `futex(word, FUTEX_WAIT_PRIVATE, expect, NULL)`.
pub fn futex_wait(word: &AtomicU32, expect: u32) -> isize {
    raw6(
        libc::SYS_futex,
        [
            word.as_ptr() as usize,
            (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as usize,
            expect as usize,
            0,
            0,
            0,
        ],
    )
}

/// `futex(word, FUTEX_WAIT_PRIVATE, expect, timeout)`.
pub fn futex_wait_timeout(word: &AtomicU32, expect: u32, ns: u64) -> isize {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    raw6(
        libc::SYS_futex,
        [
            word.as_ptr() as usize,
            (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as usize,
            expect as usize,
            &ts as *const libc::timespec as usize,
            0,
            0,
        ],
    )
}

/// `futex(word, FUTEX_WAKE_PRIVATE, n)`.
pub fn futex_wake(word: &AtomicU32, n: i32) -> isize {
    raw6(
        libc::SYS_futex,
        [
            word.as_ptr() as usize,
            (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as usize,
            n as usize,
            0,
            0,
            0,
        ],
    )
}

/// The bit of signal `sig` in a kernel sigset.
pub const fn sigbit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// `io_uring_enter(fd, to_submit, min_complete, flags, NULL, 0)`: submit
/// (and, with `IORING_ENTER_GETEVENTS`, wait for) io_uring requests.
/// Returns the raw result (SQEs consumed, or a negative errno).
pub fn io_uring_enter(fd: i32, to_submit: u32, min_complete: u32, flags: u32) -> isize {
    raw6(
        libc::SYS_io_uring_enter,
        [
            fd as usize,
            to_submit as usize,
            min_complete as usize,
            flags as usize,
            0,
            0,
        ],
    )
}

/// `write(fd, buf, len)`: bytes written, or a negative errno. The caller
/// passes `len` readable bytes at `buf`.
pub fn write(fd: i32, buf: *const u8, len: usize) -> isize {
    raw6(libc::SYS_write, [fd as usize, buf as usize, len, 0, 0, 0])
}

/// `pwrite(fd, buf, len, off)`: bytes written, or a negative errno. The
/// caller passes an address range the kernel may read (or the call fails
/// with `-EFAULT`, which is how an unmapped DVMA page shows).
pub fn pwrite(fd: i32, buf: usize, len: usize, off: u64) -> isize {
    raw6(
        libc::SYS_pwrite64,
        [fd as usize, buf, len, off as usize, 0, 0],
    )
}
