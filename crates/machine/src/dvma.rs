//! Physical memory and the IOMMU of the Linux machine.
//!
//! * **RAM** is a memfd. The kernel sees all of it through its *direct map*,
//!   one `MAP_SHARED` mapping of the whole memfd.
//! * **The IOMMU is the host MMU.** The *DVMA window* is a reserved range
//!   of the process's address space (`PROT_NONE`, `MAP_NORESERVE`). Entering
//!   a translation maps memfd pages at `window + iova` (`MAP_FIXED |
//!   MAP_SHARED`, read-only when the device only reads); removing it
//!   overlays `PROT_NONE` again, so the range stays reserved and nothing
//!   else can land there. Flushing is whatever the host makes it cost:
//!   every change is an `mmap`, with the TLB shootdowns it implies when
//!   other threads (other CPUs, devices) run in the address space.
//! * **Devices reach memory only through the window**, and only with
//!   system calls that fail cleanly on an unmapped or read-only page
//!   (`pread`/`pwrite` on a file, `process_vm_readv`/`writev` on ourselves):
//!   an access outside the current mappings is an `EFAULT` or a short
//!   count, which [`Window`] turns into a [`DmaFault`], counts, and the
//!   device turns into an error on that one I/O. Nothing else is touched and
//!   the process lives.
//!
//! `enter` and `remove` are raw system calls: they may run in interrupt
//! context (a completion that unloads a map), allocate nothing and take no
//! lock.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kern::iommu::{DmaAccess, Iommu, IommuError, Iova};
use kern::vm::Paddr;

use crate::sys;

/// The page size.
pub const PAGE: usize = 4096;

/// The machine's RAM: a memfd and the kernel's direct map of it.
pub struct Ram {
    fd: RawFd,
    size: u64,
    dmap: usize,
}

impl Ram {
    /// RAM of `size` bytes (rounded to pages).
    pub fn new(size: u64) -> std::io::Result<Self> {
        let size = size.div_ceil(PAGE as u64) * PAGE as u64;
        // SAFETY: a static C string name; the flags are valid.
        let fd = unsafe { libc::memfd_create(c"dvma-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: our fresh memfd.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let dmap = sys::mmap(
            0,
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if dmap < 0 {
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
            return Err(std::io::Error::from_raw_os_error(-dmap as i32));
        }
        // Real RAM exists before it is used: allocate every page now, so
        // that a device's first DMA into a page does not find it missing
        // (io_uring would then hand the read to a worker thread) and the
        // first I/Os of a boot cost what the others do. Best effort: an
        // old kernel without MADV_POPULATE_WRITE just faults them later.
        // SAFETY: our fresh mapping of `size` bytes.
        unsafe {
            libc::madvise(
                dmap as *mut libc::c_void,
                size as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        Ok(Self {
            fd,
            size,
            dmap: dmap as usize,
        })
    }

    /// (direct map address, size).
    pub fn direct_map(&self) -> (usize, u64) {
        (self.dmap, self.size)
    }

    /// Release the mapping and the memfd.
    ///
    /// # Safety
    /// 1. Nothing uses the direct map any more (the kernel is torn down).
    pub unsafe fn release(&self) {
        // SAFETY: by the contract; our own mapping and fd.
        unsafe {
            libc::munmap(self.dmap as *mut libc::c_void, self.size as usize);
            libc::close(self.fd);
        }
    }
}

/// Why a device's DMA failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaFault {
    /// The IOVA range is (partly) not mapped, or not with the needed rights.
    Unmapped {
        /// Where the access started.
        iova: Iova,
        /// How long it was.
        len: usize,
    },
    /// The backing file failed (an I/O error of the device's medium).
    Io {
        /// The host errno.
        errno: i32,
    },
}

impl std::fmt::Display for DmaFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DmaFault::Unmapped { iova, len } => write!(f, "DMA fault at IOVA {iova:#x}+{len:#x}"),
            DmaFault::Io { errno } => write!(f, "device I/O error (errno {errno})"),
        }
    }
}

/// Counters of the window.
#[derive(Debug, Default)]
pub struct WindowStats {
    /// Translations entered (mmap calls).
    pub enters: AtomicU64,
    /// Translations removed.
    pub removes: AtomicU64,
    /// Device accesses that faulted.
    pub faults: AtomicU64,
    /// Device accesses.
    pub accesses: AtomicU64,
}

/// The DVMA window: the IOMMU.
pub struct Window {
    base: usize,
    size: u64,
    fd: RawFd,
    ram: u64,
    pid: i32,
    /// Counters.
    pub stats: WindowStats,
}

impl Window {
    /// Reserve a window of `size` bytes onto `ram`.
    pub fn new(ram: &Ram, size: u64) -> std::io::Result<Self> {
        let size = size.div_ceil(PAGE as u64) * PAGE as u64;
        let base = sys::mmap(
            0,
            size as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if base < 0 {
            return Err(std::io::Error::from_raw_os_error(-base as i32));
        }
        // The last page: the live device's (see `live_device`).
        let last = base as usize + size as usize - PAGE;
        let r = sys::mmap(
            last,
            PAGE,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_FIXED,
            ram.fd,
            0,
        );
        if r < 0 {
            return Err(std::io::Error::from_raw_os_error(-r as i32));
        }
        Ok(Self {
            base: base as usize,
            size,
            fd: ram.fd,
            ram: ram.size,
            pid: sys::getpid(),
            stats: WindowStats::default(),
        })
    }

    /// The window's base address (devices add the IOVA).
    pub fn base(&self) -> usize {
        self.base
    }

    /// Start a thread that behaves like a live device on another core: it
    /// touches a page of the window every `period` (a page the machine maps
    /// for it, at the top of the window, outside the kernel's IOVA space),
    /// so that every change of a mapping costs the TLB shootdown it would
    /// cost with devices running. Stopped when the returned guard drops.
    pub fn live_device(&'static self, host_cpu: usize, period: std::time::Duration) -> LiveDevice {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let page = self.base + self.size as usize - PAGE;
        let touches = std::sync::Arc::new(AtomicU64::new(0));
        let t2 = touches.clone();
        let h = std::thread::spawn(move || {
            crate::host::pin_current_thread(host_cpu);
            while !s2.load(Relaxed) {
                // SAFETY: the last page of the window is mapped read-only at
                // `Window::new` and never removed (`remove` and `enter` are
                // refused above `Iommu::size`, which excludes it).
                unsafe { core::ptr::read_volatile(page as *const u8) };
                t2.fetch_add(1, Relaxed);
                let t0 = std::time::Instant::now();
                while t0.elapsed() < period {
                    std::hint::spin_loop();
                }
            }
        });
        LiveDevice {
            stop,
            touches,
            thread: Some(h),
        }
    }

    /// Release the reservation.
    ///
    /// # Safety
    /// 1. No device and no kernel uses the window any more.
    pub unsafe fn release(&self) {
        // SAFETY: by the contract; our own reservation.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }

    fn check(&self, iova: Iova, len: usize) -> Result<usize, DmaFault> {
        match iova.get().checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(self.base + iova.get() as usize),
            _ => Err(DmaFault::Unmapped { iova, len }),
        }
    }

    fn fault(&self, f: DmaFault) -> DmaFault {
        if let DmaFault::Unmapped { .. } = f {
            self.stats.faults.fetch_add(1, Relaxed);
        }
        f
    }

    /// Device reads memory: copy `buf.len()` bytes at `iova` into `buf`.
    pub fn dma_read(&self, iova: Iova, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.stats.accesses.fetch_add(1, Relaxed);
        let addr = self.check(iova, buf.len()).map_err(|f| self.fault(f))?;
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` is our buffer; the kernel checks `remote` and fails
        // with EFAULT (or a short count) rather than faulting us.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if n != buf.len() as isize {
            return Err(self.fault(DmaFault::Unmapped {
                iova,
                len: buf.len(),
            }));
        }
        Ok(())
    }

    /// Device writes memory: copy `data` to `iova`.
    pub fn dma_write(&self, iova: Iova, data: &[u8]) -> Result<(), DmaFault> {
        self.stats.accesses.fetch_add(1, Relaxed);
        let addr = self.check(iova, data.len()).map_err(|f| self.fault(f))?;
        let local = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: as in `dma_read`; a read-only or unmapped page is EFAULT.
        let n = unsafe { libc::process_vm_writev(self.pid, &local, 1, &remote, 1, 0) };
        if n != data.len() as isize {
            return Err(self.fault(DmaFault::Unmapped {
                iova,
                len: data.len(),
            }));
        }
        Ok(())
    }

    /// Device moves `len` bytes from file `fd` at `off` into memory at
    /// `iova` (a disk read).
    pub fn pread(&self, fd: RawFd, off: u64, iova: Iova, len: usize) -> Result<(), DmaFault> {
        self.stats.accesses.fetch_add(1, Relaxed);
        let addr = self.check(iova, len).map_err(|f| self.fault(f))?;
        let mut done = 0usize;
        while done < len {
            // SAFETY: the host checks the window address: EFAULT if the
            // page is not mapped writable, never a signal.
            let n = unsafe {
                libc::pread(
                    fd,
                    (addr + done) as *mut libc::c_void,
                    len - done,
                    (off + done as u64) as libc::off_t,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            let errno = if n == 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            };
            if n == 0 {
                // Past the end of the file: the rest reads as zeroes.
                let zeros = vec![0u8; len - done];
                return self.dma_write(iova + done, &zeros);
            }
            if errno == libc::EINTR {
                continue;
            }
            if errno == libc::EFAULT {
                return Err(self.fault(DmaFault::Unmapped { iova, len }));
            }
            return Err(DmaFault::Io { errno });
        }
        Ok(())
    }

    /// Device moves `len` bytes from memory at `iova` to file `fd` at `off`
    /// (a disk write).
    pub fn pwrite(&self, fd: RawFd, off: u64, iova: Iova, len: usize) -> Result<(), DmaFault> {
        self.stats.accesses.fetch_add(1, Relaxed);
        let addr = self.check(iova, len).map_err(|f| self.fault(f))?;
        let mut done = 0usize;
        while done < len {
            // SAFETY: as in `pread`; an unmapped source page is EFAULT.
            let n = unsafe {
                libc::pwrite(
                    fd,
                    (addr + done) as *const libc::c_void,
                    len - done,
                    (off + done as u64) as libc::off_t,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if errno == libc::EINTR {
                continue;
            }
            if errno == libc::EFAULT || n == 0 {
                return Err(self.fault(DmaFault::Unmapped { iova, len }));
            }
            return Err(DmaFault::Io { errno });
        }
        Ok(())
    }
}

/// A running [`Window::live_device`].
pub struct LiveDevice {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    touches: std::sync::Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LiveDevice {
    /// Touches so far.
    pub fn touches(&self) -> u64 {
        self.touches.load(Relaxed)
    }
}

impl Drop for LiveDevice {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl Iommu for Window {
    fn size(&self) -> u64 {
        // The last page belongs to `live_device`.
        self.size - PAGE as u64
    }

    fn enter(
        &self,
        iova: Iova,
        pa: Paddr,
        len: usize,
        access: DmaAccess,
    ) -> Result<(), IommuError> {
        IommuError::check(iova, len, Iommu::size(self))?;
        if pa.get() + len as u64 > self.ram {
            return Err(IommuError::OutOfRange { iova, len });
        }
        let prot = match access {
            DmaAccess::Read => libc::PROT_READ,
            DmaAccess::Write | DmaAccess::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let addr = self.base + iova.get() as usize;
        let r = sys::mmap(
            addr,
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
            self.fd,
            pa.get(),
        );
        if r < 0 {
            return Err(IommuError::Host { errno: -r as i32 });
        }
        debug_assert_eq!(r as usize, addr);
        self.stats.enters.fetch_add(1, Relaxed);
        Ok(())
    }

    fn remove(&self, iova: Iova, len: usize) {
        if iova
            .get()
            .checked_add(len as u64)
            .is_none_or(|e| e > Iommu::size(self))
        {
            return;
        }
        let r = sys::mmap(
            self.base + iova.get() as usize,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        );
        debug_assert!(r >= 0, "overlaying the window failed: {r}");
        self.stats.removes.fetch_add(1, Relaxed);
    }
}
