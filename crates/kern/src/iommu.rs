//! The IOMMU and its address space (DVMA / IOVA).
//!
//! [`Iommu`] is what the machine provides: enter and remove translations
//! from I/O virtual addresses to physical memory, with the device's access
//! rights. On the Linux machine it is the host MMU: a reserved range of the
//! process's address space (the *DVMA window*) where physical pages (of the
//! memfd that is the machine's RAM) are really mapped and unmapped, and
//! devices reach memory only through that window.
//!
//! [`IovaArena`] allocates IOVA ranges: a vmem(9) arena (no allocation
//! after construction) behind an IPL_VM spin mutex, with per-CPU magazines
//! in front for the common sizes (Linux's iova rcache): an allocation or a
//! free of a cached size is a few stores on the owning CPU, at splvm.
//! Ranges are naturally aligned to their (power-of-two) size class.
//!
//! # Contexts
//! Any context on a CPU (it runs at IPL_VM). Host threads may use the
//! global arena only (no magazines).

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use vmem::{AllocPolicy, Constraints, Vmem};

use crate::cpu::curcpu_opt;
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::spl;
use crate::vm::Paddr;

/// The page size of the IOMMU.
pub const IOPAGE: usize = 4096;

address_type! {
    /// An I/O virtual address: where a device reaches memory through the
    /// IOMMU. Not a [`Paddr`]: passing one where the other is expected does
    /// not compile.
    ///
    /// ```compile_fail,E0308
    /// use kern::{iommu::Iova, vm::Paddr};
    /// fn device(_: Iova) {}
    /// device(Paddr(0x1000)); // a physical address is not an I/O address
    /// ```
    Iova
}

/// What a device may do through a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaAccess {
    /// The device reads memory (a write to the disk).
    Read,
    /// The device writes memory (a read from the disk).
    Write,
    /// Both.
    ReadWrite,
}

/// IOMMU errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IommuError {
    /// The range is outside the IOMMU's address space.
    OutOfRange {
        /// IOVA.
        iova: Iova,
        /// Length.
        len: usize,
    },
    /// The host refused the mapping.
    Host {
        /// The host's error number.
        errno: i32,
    },
}

impl core::error::Error for IommuError {}

impl core::fmt::Display for IommuError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IommuError::OutOfRange { iova, len } => {
                write!(
                    f,
                    "iommu: [{iova:#x}, +{len:#x}) is outside the DVMA window"
                )
            }
            IommuError::Host { errno } => {
                write!(f, "iommu: the host refused the mapping (errno {errno})")
            }
        }
    }
}

impl IommuError {
    /// `Ok` if `[iova, iova + len)` lies inside an IOVA space of `size`
    /// bytes, else `OutOfRange` (an end past `u64::MAX` is out of range,
    /// not wrapped). For [`Iommu::enter`] implementations. Any context.
    pub fn check(iova: Iova, len: usize, size: u64) -> Result<(), IommuError> {
        match iova.get().checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(IommuError::OutOfRange { iova, len }),
        }
    }
}

/// An IOMMU (provided by the machine).
///
/// `enter` and `remove` may be called from any kernel context (interrupt
/// handlers included: completion modes unload maps there), so they must not
/// allocate or take locks thread code may hold.
pub trait Iommu: Sync {
    /// Size of the I/O virtual address space.
    fn size(&self) -> u64;
    /// Translate `[iova, iova + len)` to physical `[pa, pa + len)`, with
    /// `access` rights, replacing whatever was there. Page aligned.
    fn enter(&self, iova: Iova, pa: Paddr, len: usize, access: DmaAccess)
    -> Result<(), IommuError>;
    /// Remove the translations of `[iova, iova + len)`: device accesses
    /// fault from now on (the range stays reserved). Includes whatever
    /// invalidation the hardware needs.
    fn remove(&self, iova: Iova, len: usize);
}

/// Size classes cached per CPU: 1, 2, 4, ... 256 pages (4 KiB .. 1 MiB).
const NCLASSES: usize = 9;
/// Ranges per magazine.
const MAGSIZE: usize = 32;

/// Its words are atomics used as plain per-CPU words (relaxed loads and
/// stores, plain moves): only the owning CPU touches them, at IPL_VM, so
/// they need no read-modify-write, and sharing them needs no `unsafe`.
struct Magazine {
    n: AtomicUsize,
    items: [AtomicU64; MAGSIZE],
}

/// One CPU's magazines. Touched only by that CPU, at IPL_VM.
struct CpuMags {
    mags: [Magazine; NCLASSES],
}

/// Counters of an IOVA arena.
#[derive(Debug, Default)]
pub struct IovaStats {
    /// Allocations served by a magazine.
    pub mag_hits: AtomicU64,
    /// Allocations that went to the global arena.
    pub global_allocs: AtomicU64,
    /// Failed allocations.
    pub failures: AtomicU64,
}

/// The IOVA allocator.
pub struct IovaArena {
    global: SpinMutex<Vmem>,
    cpus: Box<[CpuMags]>,
    base: Iova,
    size: u64,
    /// Counters.
    pub stats: IovaStats,
}

/// Errors of the IOVA arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IovaError {
    /// No free range of that size.
    NoSpace {
        /// Bytes asked for.
        len: usize,
    },
}

impl core::fmt::Display for IovaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IovaError::NoSpace { len } => write!(f, "no free DVMA range of {len} bytes"),
        }
    }
}

fn class_of(pages: usize) -> Option<usize> {
    let c = pages.next_power_of_two().trailing_zeros() as usize;
    (c < NCLASSES).then_some(c)
}

impl IovaArena {
    /// An arena over `[base, base + size)` for `ncpu` CPUs.
    pub fn new(base: Iova, size: u64, ncpu: usize) -> Self {
        let pages = (size / IOPAGE as u64) as usize;
        let tags = (pages / 4).clamp(1024, 1 << 20);
        let v = Vmem::new(base.get(), size, IOPAGE as u64, tags).expect("IOVA arena parameters");
        Self {
            global: SpinMutex::new(Ipl::Vm, v),
            cpus: (0..ncpu)
                .map(|_| CpuMags {
                    mags: [const {
                        Magazine {
                            n: AtomicUsize::new(0),
                            items: [const { AtomicU64::new(0) }; MAGSIZE],
                        }
                    }; NCLASSES],
                })
                .collect(),
            base,
            size,
            stats: IovaStats::default(),
        }
    }

    /// The bytes a request of `len` occupies (its size class, or pages).
    pub fn rounded(len: usize) -> usize {
        let pages = len.div_ceil(IOPAGE).max(1);
        match class_of(pages) {
            Some(c) => (1 << c) * IOPAGE,
            None => pages * IOPAGE,
        }
    }

    /// Allocate a range for `len` bytes (rounded as [`IovaArena::rounded`]).
    /// Any context.
    pub fn alloc(&self, len: usize) -> Result<Iova, IovaError> {
        let pages = len.div_ceil(IOPAGE).max(1);
        if let (Some(c), Some(cpu)) = (class_of(pages), curcpu_opt()) {
            let s = spl::splvm();
            let m = &self.cpus[cpu.index()].mags[c];
            let n = m.n.load(Relaxed);
            if n > 0 {
                m.n.store(n - 1, Relaxed);
                let iova = Iova(m.items[n - 1].load(Relaxed));
                drop(s);
                self.stats.mag_hits.fetch_add(1, Relaxed);
                return Ok(iova);
            }
            drop(s);
        }
        self.alloc_global(len)
    }

    fn alloc_global(&self, len: usize) -> Result<Iova, IovaError> {
        let sz = Self::rounded(len) as u64;
        let align = if sz.is_power_of_two() {
            sz
        } else {
            IOPAGE as u64
        };
        let c = Constraints {
            align,
            ..Constraints::NONE
        };
        let r = self.global.lock().xalloc(sz, c, AllocPolicy::InstantFit);
        match r {
            Ok(a) => {
                self.stats.global_allocs.fetch_add(1, Relaxed);
                Ok(Iova(a))
            }
            Err(_) => {
                self.stats.failures.fetch_add(1, Relaxed);
                Err(IovaError::NoSpace { len })
            }
        }
    }

    /// Free a range from [`IovaArena::alloc`] of `len` bytes. Any context.
    pub fn free(&self, iova: Iova, len: usize) {
        let pages = len.div_ceil(IOPAGE).max(1);
        if let (Some(c), Some(cpu)) = (class_of(pages), curcpu_opt()) {
            let s = spl::splvm();
            let m = &self.cpus[cpu.index()].mags[c];
            let n = m.n.load(Relaxed);
            if n < MAGSIZE {
                m.items[n].store(iova.get(), Relaxed);
                m.n.store(n + 1, Relaxed);
                return drop(s);
            }
            // Full: give half of it back to the arena, then keep this one.
            let mut g = self.global.lock();
            let sz = Self::rounded(len) as u64;
            for i in MAGSIZE / 2..MAGSIZE {
                let _ = g.free(m.items[i].load(Relaxed), sz);
            }
            drop(g);
            m.items[MAGSIZE / 2].store(iova.get(), Relaxed);
            m.n.store(MAGSIZE / 2 + 1, Relaxed);
            return drop(s);
        }
        let _ = self
            .global
            .lock()
            .free(iova.get(), Self::rounded(len) as u64);
    }

    /// Bytes of IOVA space not allocated in the arena (ranges cached in
    /// magazines count as allocated).
    pub fn free_bytes(&self) -> u64 {
        self.global.lock().stats().free_bytes
    }

    /// The arena's range.
    pub fn range(&self) -> (Iova, u64) {
        (self.base, self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The range check every `enter` uses: the end may equal the size, not
    /// pass it, and an end past `u64::MAX` is refused, not wrapped.
    #[test]
    fn range_check_refuses_past_the_end_and_wrapping() {
        let size = 64 << 20;
        assert_eq!(IommuError::check(Iova(size - 4096), 4096, size), Ok(()));
        assert_eq!(IommuError::check(Iova(0), 0, size), Ok(()));
        assert_eq!(
            IommuError::check(Iova(size - 4096), 4097, size),
            Err(IommuError::OutOfRange {
                iova: Iova(size - 4096),
                len: 4097
            })
        );
        let top = Iova(u64::MAX - 4095);
        assert_eq!(
            IommuError::check(top, 8192, size),
            Err(IommuError::OutOfRange {
                iova: top,
                len: 8192
            })
        );
    }

    proptest! {
        /// Random allocations and frees on the arena (the global path: unit
        /// tests run on no CPU): live ranges never overlap, stay inside the
        /// arena, are aligned to their size class, and freeing everything
        /// gives every byte back.
        #[test]
        fn iova_ranges_never_overlap_and_all_come_back(ops in proptest::collection::vec((any::<bool>(), 1usize..300_000, any::<u8>()), 1..200)) {
            let base = 1u64 << 20;
            let size = 64u64 << 20;
            let a = IovaArena::new(Iova(base), size, 1);
            let free0 = a.free_bytes();
            let mut live: BTreeMap<u64, usize> = BTreeMap::new();
            for (alloc, len, pick) in ops {
                if alloc || live.is_empty() {
                    match a.alloc(len) {
                        Ok(Iova(iova)) => {
                            let r = IovaArena::rounded(len);
                            prop_assert!(iova >= base && iova + r as u64 <= base + size);
                            if r.is_power_of_two() {
                                prop_assert_eq!(iova % r as u64, 0, "not size-aligned");
                            }
                            if let Some((&s, &l)) = live.range(..iova + r as u64).next_back() {
                                prop_assert!(s + IovaArena::rounded(l) as u64 <= iova || s >= iova + r as u64, "overlap");
                            }
                            prop_assert!(live.range(iova..iova + r as u64).next().is_none(), "overlap");
                            live.insert(iova, len);
                        }
                        Err(IovaError::NoSpace { .. }) => {}
                    }
                } else {
                    let k = *live.keys().nth(pick as usize % live.len()).unwrap();
                    let l = live.remove(&k).unwrap();
                    a.free(Iova(k), l);
                }
            }
            for (k, l) in live {
                a.free(Iova(k), l);
            }
            prop_assert_eq!(a.free_bytes(), free0);
        }
    }
}
