//! Host memory for the machine: stacks with guard pages.

/// Page size.
pub const PAGE: usize = 4096;

/// Map a stack of at least `size` usable bytes with a guard page below
/// it; returns (lowest address including the guard, total length).
pub fn map_stack(size: usize) -> Option<(usize, usize)> {
    let usable = size.div_ceil(PAGE) * PAGE;
    let len = usable + PAGE;
    // SAFETY: a fresh anonymous private mapping; we own it.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: the first page of our own mapping becomes the guard.
    if unsafe { libc::mprotect(p, PAGE, libc::PROT_NONE) } != 0 {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p, len) };
        return None;
    }
    Some((p as usize, len))
}

/// Unmap memory from [`map_stack`].
///
/// # Safety
/// 1. `addr`/`len` are exactly a mapping returned by `map_stack`.
/// 2. Nothing uses it any more.
pub unsafe fn unmap(addr: usize, len: usize) {
    // SAFETY: by the contract.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}
