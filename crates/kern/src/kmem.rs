//! kmem: a kernel malloc as on the 1995 i386 port, and the race of the mail.
//!
//! > Chris changed them to malloc() and free() struct buf's, but the free()
//! > is done at interrupt time when the I/O request is completed. The i386
//! > port didn't block bio interrupts while malloc() or free() were
//! > running, so there was a semi-obvious race condition.
//!
//! A power-of-two bucket allocator (4.4BSD `kmembuckets`) over a fixed
//! arena. Free chunks sit on per-CPU, per-size free lists, and `alloc`
//! unlinks the head with a plain load and a plain store: **it does not
//! block interrupts by itself.** A `free` from an interrupt handler that
//! lands between the two, on the same list, is lost and the list's count
//! no longer matches it. The per-CPU lists make it safe against other CPUs
//! (each CPU touches only its own lists), not against its own interrupts.
//!
//! What protects it is chosen with [`Kmem::set_protection`]:
//!
//! * [`KmemProtect::None`]: nothing (the 1995 i386).
//! * [`KmemProtect::Spl`]: raise to an IPL around every operation. With
//!   `Ipl::Vm`, this is the 1995 fix: `splimp()` made to block bio.
//! * [`KmemProtect::SafePoint`]: mark the allocator as not an AST safe
//!   point. Protects against ASTs only, not against interrupt handlers.
//!
//! # Corruption is detected, not crashed on
//! Every chunk carries a header (`magic`, `next`). `alloc` validates the
//! chunk it pops (inside the arena, aligned, free magic) and `free`
//! validates the chunk it takes back (allocated magic: double and wild
//! frees are caught). [`Kmem::audit`] walks the current CPU's lists with a
//! bound, validating every link before following it, and compares each
//! list with its count. A bad list is truncated at the last good chunk and
//! its count repaired, the event is counted and recorded, and the caller is
//! told; nothing is dereferenced outside the arena.
//!
//! The arena is an array of 16-byte words of atomics, and a chunk header is
//! the word at the chunk's start, reached by index: a corrupt link cannot
//! make the allocator touch anything but the arena (an out-of-arena index
//! would panic, and is never tried: links are validated first), and an
//! interrupt handler touching a header on the same CPU is not a data race.
//! Callers write their data through the pointer `alloc` returns, which is
//! derived from the arena (whose bytes are all interior-mutable).
//!
//! # Contexts
//! Any context on a CPU; never sleeps. `alloc` returns `None` when the
//! arena is exhausted (there is no waiting allocation).

use alloc::boxed::Box;
use core::ptr::NonNull;
use core::sync::atomic::{
    AtomicU8, AtomicU32, AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};

use crate::cpu::{Cpu, curcpu};
use crate::ipl::Ipl;

/// Chunk header size: `magic`, `next`.
pub const HDR: usize = 16;
/// Smallest chunk (header included).
pub const MIN_CHUNK: usize = 32;
/// Number of size classes: 32 .. 4096 bytes.
pub const NBUCKETS: usize = 8;
/// Largest allocation.
pub const MAX_ALLOC: usize = (MIN_CHUNK << (NBUCKETS - 1)) - HDR;
const PAGE: usize = 4096;
const MAGIC_FREE: u64 = 0xF7EE_F7EE_F7EE_F7EE;
const MAGIC_ALLOC: u64 = 0xA110_CA7E_A110_CA7E;

/// What protects the allocator against its own CPU's interrupts and ASTs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmemProtect {
    /// Nothing.
    None,
    /// Raise to this IPL around every operation.
    Spl(Ipl),
    /// Not an AST safe point.
    SafePoint,
}

/// A detected corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmemCorruption {
    /// A free list holds a different number of chunks than its count.
    CountMismatch {
        /// CPU of the list.
        cpu: usize,
        /// Chunk size of the list.
        size: usize,
        /// Chunks found on the list.
        listed: usize,
        /// The list's count.
        counted: usize,
    },
    /// A free list links to something that is not a free chunk.
    BadLink {
        /// CPU of the list.
        cpu: usize,
        /// Chunk size of the list.
        size: usize,
        /// The bad address.
        addr: usize,
    },
    /// `free` of a chunk that is already free.
    DoubleFree {
        /// The chunk.
        addr: usize,
    },
    /// `free` of an address that is not an allocated chunk.
    WildFree {
        /// The address.
        addr: usize,
    },
}

impl core::fmt::Display for KmemCorruption {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            KmemCorruption::CountMismatch {
                cpu,
                size,
                listed,
                counted,
            } => write!(
                f,
                "kmem: cpu{cpu} {size}-byte free list holds {listed} chunks, its count says {counted}"
            ),
            KmemCorruption::BadLink { cpu, size, addr } => {
                write!(
                    f,
                    "kmem: cpu{cpu} {size}-byte free list links to {addr:#x}, not a free chunk"
                )
            }
            KmemCorruption::DoubleFree { addr } => write!(f, "kmem: double free of {addr:#x}"),
            KmemCorruption::WildFree { addr } => {
                write!(f, "kmem: free of {addr:#x}, not an allocated chunk")
            }
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct KmemStats {
    /// Successful allocations.
    pub allocs: AtomicU64,
    /// Frees.
    pub frees: AtomicU64,
    /// Allocations that failed (arena exhausted or too large).
    pub failures: AtomicU64,
    /// Corruptions detected.
    pub corruptions: AtomicU64,
    /// Pages carved from the arena.
    pub pages: AtomicU64,
}

struct Bucket {
    head: AtomicUsize,
    nfree: AtomicUsize,
}

#[repr(align(64))]
struct KmemCpu {
    buckets: [Bucket; NBUCKETS],
}

/// A chunk header (`magic`, `next`), or 16 bytes of a chunk's data.
#[repr(C, align(16))]
struct Word {
    magic: AtomicU64,
    next: AtomicUsize,
}

/// A page of the arena.
#[repr(C, align(4096))]
struct Page([Word; PAGE / HDR]);

impl Page {
    fn new() -> Self {
        Page(
            [const {
                Word {
                    magic: AtomicU64::new(0),
                    next: AtomicUsize::new(0),
                }
            }; PAGE / HDR],
        )
    }
}

/// The kernel malloc.
pub struct Kmem {
    arena: Box<[Page]>,
    /// The arena's address (chunks are named by address, as in 1995).
    base: usize,
    len: usize,
    next_page: AtomicUsize,
    cpus: Box<[KmemCpu]>,
    protect: AtomicU8,
    protect_ipl: AtomicU8,
    inject: crate::once::FnHook,
    last: AtomicU64,
    /// Counters.
    pub stats: KmemStats,
    /// The last corruption, for reports (written only with `last` bumped).
    last_kind: crate::lock::SpinMutex<Option<KmemCorruption>>,
    busy: Box<[AtomicU32]>,
}

fn chunk_size(bucket: usize) -> usize {
    MIN_CHUNK << bucket
}

fn bucket_of(size: usize) -> Option<usize> {
    let need = size.checked_add(HDR)?.max(MIN_CHUNK);
    let b =
        need.next_power_of_two().trailing_zeros() as usize - MIN_CHUNK.trailing_zeros() as usize;
    (b < NBUCKETS).then_some(b)
}

struct Protected<'a> {
    cpu: &'a Cpu,
    spl: Option<u8>,
    no_ast: bool,
}

impl Kmem {
    /// An allocator over a fresh arena of `bytes` (rounded to pages), with
    /// free lists for `ncpu` CPUs. Thread or host context.
    pub fn new(bytes: usize, ncpu: usize) -> Self {
        let len = bytes.div_ceil(PAGE).max(1) * PAGE;
        let arena: Box<[Page]> = (0..len / PAGE).map(|_| Page::new()).collect();
        Self {
            base: arena.as_ptr() as usize,
            arena,
            len,
            next_page: AtomicUsize::new(0),
            cpus: (0..ncpu)
                .map(|_| KmemCpu {
                    buckets: [const {
                        Bucket {
                            head: AtomicUsize::new(0),
                            nfree: AtomicUsize::new(0),
                        }
                    }; NBUCKETS],
                })
                .collect(),
            protect: AtomicU8::new(0),
            protect_ipl: AtomicU8::new(0),
            inject: crate::once::FnHook::new(),
            last: AtomicU64::new(0),
            stats: KmemStats::default(),
            last_kind: crate::lock::SpinMutex::new(Ipl::High, None),
            busy: (0..ncpu).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Choose the protection. Call it while no CPU is inside the allocator.
    pub fn set_protection(&self, p: KmemProtect) {
        let (code, ipl) = match p {
            KmemProtect::None => (0, 0),
            KmemProtect::Spl(l) => (1, l as u8),
            KmemProtect::SafePoint => (2, 0),
        };
        self.protect_ipl.store(ipl, Relaxed);
        self.protect.store(code, Release);
    }

    /// The protection in force.
    pub fn protection(&self) -> KmemProtect {
        match self.protect.load(Acquire) {
            1 => {
                KmemProtect::Spl(Ipl::from_u8(self.protect_ipl.load(Relaxed)).unwrap_or(Ipl::High))
            }
            2 => KmemProtect::SafePoint,
            _ => KmemProtect::None,
        }
    }

    /// Install (or remove) the fault-injection hook: called inside `alloc`
    /// between reading a free list's head and writing it back, which is
    /// where an interrupt does the damage. `dvma race` raises a real
    /// interrupt from it.
    pub fn set_inject(&self, hook: Option<fn()>) {
        self.inject.set(hook);
    }

    /// Is the calling CPU inside the allocator right now?
    pub fn busy(&self, cpu: usize) -> bool {
        self.busy[cpu].load(Relaxed) != 0
    }

    /// The last corruption detected, if any.
    pub fn last_corruption(&self) -> Option<KmemCorruption> {
        *self.last_kind.lock()
    }

    fn enter<'a>(&self, cpu: &'a Cpu) -> Protected<'a> {
        let mut p = Protected {
            cpu,
            spl: None,
            no_ast: false,
        };
        match self.protect.load(Acquire) {
            1 => {
                p.spl = Some(crate::spl::splraise_cpu(
                    cpu,
                    self.protect_ipl.load(Relaxed),
                ));
            }
            2 => {
                cpu.no_ast.inc();
                p.no_ast = true;
            }
            _ => {}
        }
        self.busy[cpu.index()].fetch_add(1, Relaxed);
        cpu.in_alloc.inc();
        p
    }

    fn exit(&self, p: Protected<'_>) {
        p.cpu.in_alloc.dec();
        self.busy[p.cpu.index()].fetch_sub(1, Relaxed);
        if let Some(s) = p.spl {
            crate::spl::splx_cpu(p.cpu, s);
        }
        if p.no_ast && p.cpu.no_ast.dec_is_zero() {
            crate::ast::safepoint(p.cpu);
        }
    }

    // Chunk header access. The header words are atomics so that an
    // interrupt handler touching them on the same CPU is not a data race;
    // the *sequence* of accesses is what is unprotected, on purpose.
    // Callers pass addresses validated by `is_chunk`.
    fn header(&self, chunk: usize) -> &Word {
        let off = chunk - self.base;
        &self.arena[off / PAGE].0[off % PAGE / HDR]
    }

    fn magic(&self, chunk: usize) -> &AtomicU64 {
        &self.header(chunk).magic
    }

    fn next(&self, chunk: usize) -> &AtomicUsize {
        &self.header(chunk).next
    }

    /// Start over on an empty arena, as a new allocator would (same size,
    /// same CPUs, protection kept): every chunk is free again, the counters
    /// are zero. Chunks handed out before must not be used afterwards (a
    /// later free of one is reported as wild or double, never followed).
    /// Call it while no CPU is inside the allocator. Thread context.
    pub fn reset(&self) {
        for w in self.arena.iter().flat_map(|p| p.0.iter()) {
            w.magic.store(0, Relaxed);
            w.next.store(0, Relaxed);
        }
        for bk in self.cpus.iter().flat_map(|c| c.buckets.iter()) {
            bk.head.store(0, Relaxed);
            bk.nfree.store(0, Relaxed);
        }
        self.next_page.store(0, Relaxed);
        for s in [
            &self.stats.allocs,
            &self.stats.frees,
            &self.stats.failures,
            &self.stats.corruptions,
            &self.stats.pages,
            &self.last,
        ] {
            s.store(0, Relaxed);
        }
        *self.last_kind.lock() = None;
        // Publish the reset before the next operation on any CPU.
        core::sync::atomic::fence(Release);
    }

    fn is_chunk(&self, addr: usize, size: usize) -> bool {
        addr >= self.base
            && addr + size <= self.base + self.len
            && (addr - self.base).is_multiple_of(size)
    }

    fn report(&self, c: KmemCorruption) {
        self.stats.corruptions.fetch_add(1, Relaxed);
        self.last.fetch_add(1, Relaxed);
        if let Some(mut g) = self.last_kind.try_lock() {
            *g = Some(c);
        }
    }

    /// Carve a fresh page into chunks of bucket `b` onto `bk`.
    fn refill(&self, bk: &Bucket, b: usize) -> bool {
        let off = self.next_page.fetch_add(PAGE, Relaxed);
        if off + PAGE > self.len {
            return false;
        }
        self.stats.pages.fetch_add(1, Relaxed);
        let sz = chunk_size(b);
        let page = self.base + off;
        let mut n = 0;
        let mut c = page;
        while c + sz <= page + PAGE {
            self.magic(c).store(MAGIC_FREE, Relaxed);
            self.next(c).store(bk.head.load(Relaxed), Relaxed);
            bk.head.store(c, Relaxed);
            n += 1;
            c += sz;
        }
        bk.nfree.store(bk.nfree.load(Relaxed) + n, Relaxed);
        true
    }

    /// Allocate `size` bytes. Any context on a CPU; `None` if the arena is
    /// exhausted or `size` exceeds [`MAX_ALLOC`].
    pub fn alloc(&self, size: usize) -> Option<NonNull<u8>> {
        let Some(b) = bucket_of(size) else {
            self.stats.failures.fetch_add(1, Relaxed);
            return None;
        };
        let cpu = curcpu();
        let p = self.enter(cpu);
        let bk = &self.cpus[cpu.index()].buckets[b];
        let sz = chunk_size(b);
        let mut head = bk.head.load(Relaxed);
        if head == 0 && self.refill(bk, b) {
            head = bk.head.load(Relaxed);
        }
        if head == 0 {
            self.exit(p);
            self.stats.failures.fetch_add(1, Relaxed);
            return None;
        }
        if !self.is_chunk(head, sz) || self.magic(head).load(Relaxed) != MAGIC_FREE {
            // Drop the list rather than follow it.
            bk.head.store(0, Relaxed);
            bk.nfree.store(0, Relaxed);
            self.exit(p);
            self.report(KmemCorruption::BadLink {
                cpu: cpu.index(),
                size: sz,
                addr: head,
            });
            return self.alloc(size);
        }
        // ---- the window of the 1995 race -------------------------------
        if let Some(f) = self.inject.get() {
            f();
        }
        let nx = self.next(head).load(Relaxed);
        bk.head.store(nx, Relaxed);
        bk.nfree
            .store(bk.nfree.load(Relaxed).wrapping_sub(1), Relaxed);
        // -----------------------------------------------------------------
        self.magic(head).store(MAGIC_ALLOC, Relaxed);
        self.exit(p);
        self.stats.allocs.fetch_add(1, Relaxed);
        // A pointer derived from the arena, so its users may write through
        // it (the arena's bytes are all atomics: interior-mutable).
        NonNull::new(
            self.arena
                .as_ptr()
                .cast::<u8>()
                .cast_mut()
                .wrapping_add(head + HDR - self.base),
        )
    }

    /// Free `ptr`, allocated with `size`. Any context on a CPU. A double or
    /// wild free is reported and ignored.
    pub fn free(&self, ptr: NonNull<u8>, size: usize) {
        let addr = ptr.as_ptr() as usize;
        let Some(b) = bucket_of(size) else {
            self.report(KmemCorruption::WildFree { addr });
            return;
        };
        let sz = chunk_size(b);
        let chunk = addr.wrapping_sub(HDR);
        if !self.is_chunk(chunk, sz) {
            self.report(KmemCorruption::WildFree { addr });
            return;
        }
        let cpu = curcpu();
        let p = self.enter(cpu);
        match self.magic(chunk).load(Relaxed) {
            MAGIC_ALLOC => {
                let bk = &self.cpus[cpu.index()].buckets[b];
                self.magic(chunk).store(MAGIC_FREE, Relaxed);
                self.next(chunk).store(bk.head.load(Relaxed), Relaxed);
                bk.head.store(chunk, Relaxed);
                bk.nfree.store(bk.nfree.load(Relaxed) + 1, Relaxed);
                self.exit(p);
                self.stats.frees.fetch_add(1, Relaxed);
            }
            MAGIC_FREE => {
                self.exit(p);
                self.report(KmemCorruption::DoubleFree { addr: chunk });
            }
            _ => {
                self.exit(p);
                self.report(KmemCorruption::WildFree { addr });
            }
        }
    }

    /// Check the current CPU's free lists (at splhigh), repair what is
    /// broken, and return the first corruption found.
    pub fn audit(&self) -> Result<(), KmemCorruption> {
        let _s = crate::spl::splhigh();
        let cpu = curcpu();
        let mut first = None;
        for (b, bk) in self.cpus[cpu.index()].buckets.iter().enumerate() {
            let sz = chunk_size(b);
            let counted = bk.nfree.load(Relaxed);
            let bound = counted + 64;
            let mut listed = 0;
            let mut last_good = 0usize;
            let mut cur = bk.head.load(Relaxed);
            let mut bad = None;
            while cur != 0 {
                if listed > bound
                    || !self.is_chunk(cur, sz)
                    || self.magic(cur).load(Relaxed) != MAGIC_FREE
                {
                    bad = Some(cur);
                    break;
                }
                listed += 1;
                last_good = cur;
                cur = self.next(cur).load(Relaxed);
            }
            let found = if let Some(addr) = bad {
                if last_good == 0 {
                    bk.head.store(0, Relaxed);
                } else {
                    self.next(last_good).store(0, Relaxed);
                }
                Some(KmemCorruption::BadLink {
                    cpu: cpu.index(),
                    size: sz,
                    addr,
                })
            } else if listed != counted {
                Some(KmemCorruption::CountMismatch {
                    cpu: cpu.index(),
                    size: sz,
                    listed,
                    counted,
                })
            } else {
                None
            };
            if let Some(c) = found {
                bk.nfree.store(listed, Relaxed);
                self.report(c);
                first.get_or_insert(c);
            }
        }
        match first {
            Some(c) => Err(c),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes() {
        assert_eq!(bucket_of(1), Some(0));
        assert_eq!(bucket_of(16), Some(0));
        assert_eq!(bucket_of(17), Some(1));
        assert_eq!(bucket_of(MAX_ALLOC), Some(NBUCKETS - 1));
        assert_eq!(bucket_of(MAX_ALLOC + 1), None);
        assert_eq!(chunk_size(NBUCKETS - 1), 4096);
    }
}
