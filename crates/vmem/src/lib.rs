//! A vmem(9)-style resource range allocator, used for IOVA (DVMA) space.
//!
//! # Synopsis
//!
//! ```
//! use vmem::{AllocPolicy, Constraints, Vmem};
//!
//! // 1 GiB of IOVA space at 0x8000_0000, 4 KiB pages, room for 4096 boundary tags.
//! let mut vm = Vmem::new(0x8000_0000, 1 << 30, 4096, 4096)?;
//!
//! let a = vm.alloc(3 * 4096, AllocPolicy::InstantFit)?;
//! // 64 KiB, 64 KiB-aligned, must not cross a 1 MiB boundary, below 2 GiB + 16 MiB.
//! let b = vm.xalloc(
//!     64 << 10,
//!     Constraints { align: 64 << 10, nocross: 1 << 20, max_addr: 0x80ff_ffff, ..Constraints::NONE },
//!     AllocPolicy::BestFit,
//! )?;
//! assert_eq!(b % (64 << 10), 0);
//!
//! vm.free(a, 3 * 4096)?;
//! vm.free(b, 64 << 10)?;
//! assert_eq!(vm.stats().in_use_bytes, 0);
//! # Ok::<(), vmem::VmemError>(())
//! ```
//!
//! # Description
//!
//! A [`Vmem`] arena manages an integer address space made of one or more
//! *spans* (added with [`Vmem::new`] and [`Vmem::add`]) and hands out
//! quantum-aligned, quantum-multiple ranges of it. It is the range allocator
//! of Bonwick & Adams, "Magazines and Vmem" (USENIX 2001), in the shape
//! NetBSD's vmem(9) gives it, minus the quantum caches and the importing of
//! spans from a parent arena (the kernel puts per-CPU magazines in front of
//! this crate itself).
//!
//! ## Boundary tags
//!
//! Every span and every segment of a span is described by a *boundary tag*
//! `{start, size, kind}` with `kind` one of *span*, *free* or *allocated*.
//! All tags are linked, doubly, in one *segment list* in address order; a
//! span tag precedes the segments that tile it exactly. Free segments are
//! coalesced eagerly: no two free segments are ever adjacent in the list.
//! Segments never cross spans, even when two spans are adjacent in address
//! space (as in vmem(9)): after everything is freed each span is again one
//! free segment.
//!
//! Each free segment is also on one of 64 *free lists*: list `k` holds the
//! free segments of `2^k ..= 2^(k+1) - 1` quanta. A 64-bit bitmap records
//! which lists are non-empty. Each allocated segment is instead on a chain
//! of a fixed-size hash table keyed by its start address (multiplicative
//! hash of the quantum number; as many buckets as tags, rounded up to a
//! power of two, so the load factor is at most one).
//!
//! ## No allocation after construction
//!
//! All boundary tags live in one table whose capacity, `max_tags`, is fixed
//! by [`Vmem::new`]; the hash table is allocated there too. Every list is
//! linked by `u32` indices into that table and unused tags sit on a pool
//! list. After `new` returns, no method allocates or frees heap memory, so
//! the arena may be used where `malloc` may not (interrupt and softint
//! context, with interrupts blocked). When an operation would need more tags
//! than the pool holds it fails with [`VmemError::OutOfTags`] and changes
//! nothing; it never panics. Freeing never needs a tag, so [`Vmem::free`]
//! cannot fail for lack of tags.
//!
//! ## Tag accounting
//!
//! A span costs one span tag plus its segments. Within a span free segments
//! alternate with allocated runs, so a span with `a` live allocations holds
//! at most `a + 1` free segments. With `S` spans and `A` live allocations at
//! most `2 * (S + A)` tags are in use ([`Vmem::tags_needed`]), and the bound
//! is reached (allocations carved from the middle of free segments, e.g. by
//! alignment). An allocation takes 0, 1 or 2 tags (exact fit, carved from
//! one end, carved from the middle); [`Vmem::add`] takes 2. Consequently an
//! arena built with `max_tags >= Vmem::tags_needed(S, A)` never fails for
//! lack of tags while at most `A` allocations are live and at most `S` spans
//! have been added. Short of tags, the allocator prefers a placement at either
//! end of a free segment (1 tag) or an exact fit (0 tags) over failing.
//!
//! ## Allocation policies
//!
//! * [`AllocPolicy::InstantFit`] takes the first free segment on the
//!   smallest free list whose every member is large enough (list
//!   `ceil(log2(quanta))`), found with one bit-scan of the bitmap: O(1).
//!   With [`Constraints`] only the head of each such list is tried (at most
//!   64). If that finds nothing, it falls back to the best-fit search below,
//!   so instant fit never fails while a fitting range exists; it only
//!   differs from best fit in placement and in being O(1) in the common
//!   case.
//! * [`AllocPolicy::BestFit`] scans the free lists from
//!   `floor(log2(quanta))` upward and takes the smallest free segment that
//!   can hold the request (under the constraints, and with the tags
//!   available); the first list that holds any fitting segment holds the
//!   smallest one, so the scan stops there. Ties go to free-list order (lists
//!   are LIFO: most recently freed or split first). A segment of exactly the requested size ends the
//!   scan at once.
//!
//! In both cases the range is carved from the lowest feasible address in
//! the chosen segment, the remainder(s) staying free.
//!
//! ## Constraints (`xalloc`)
//!
//! [`Vmem::xalloc`] takes vmem_xalloc(9)'s constraints: the returned address
//! `addr` satisfies `addr % align == phase`; `[addr, addr + size)` does not
//! cross a multiple of `nocross` (if non-zero); and `min_addr <= addr`,
//! `addr + size - 1 <= max_addr` (both bounds inclusive, as in NetBSD).
//!
//! ## Complexity
//!
//! With `F` free segments, `F_k` of them on one free list, `S` spans, `N`
//! segments:
//!
//! | operation                                   | time                                  |
//! |---------------------------------------------|---------------------------------------|
//! | [`Vmem::alloc`] / `xalloc`, instant fit     | O(1) unconstrained; O(64) constrained; O(F) fallback when nothing on the guaranteed lists fits |
//! | [`Vmem::alloc`] / `xalloc`, best fit        | O(F_k) for the first list with a fit; O(F) worst case |
//! | [`Vmem::free`]                              | O(1) expected (hash lookup, coalesce with two neighbours) |
//! | [`Vmem::add`]                               | O(S)                                  |
//! | [`Vmem::stats`]                             | O(F_k) of the highest non-empty list (largest free segment) |
//! | [`Vmem::allocated_size`]                    | O(1) expected                         |
//! | [`Vmem::contains`]                          | O(S)                                  |
//! | [`Vmem::is_allocated`], [`Vmem::segments`]  | O(N)                                  |
//!
//! `F` is at most `max_tags / 2`, which bounds the worst-case latency.
//!
//! ## Locking
//!
//! The arena has no locks and is not interrupt-safe by itself: every method
//! takes `&mut self` and the caller provides mutual exclusion. The kernel
//! wraps it in a spin mutex at IPL_VM (so that it may be called from
//! interrupt and softint context) and keeps per-CPU magazines in front of it.
//!
//! ## Limits
//!
//! Addresses are `u64`. A span must end at or below `u64::MAX` (its last
//! byte is at most `u64::MAX - 1`), so `base + size` never overflows. The
//! quantum is a power of two; span bases and sizes are multiples of it, and
//! request sizes are rounded up to it. `max_tags` is at most
//! [`Vmem::MAX_TAGS`].

#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;

#[cfg(test)]
mod tests;

/// Null tag index.
const NIL: u32 = u32::MAX;
/// Number of power-of-two free lists (sizes in quanta are `1 ..= 2^64 - 1`).
const NLISTS: usize = 64;
/// Fibonacci hashing multiplier (2^64 / golden ratio).
const HASH_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// How [`Vmem::alloc`] and [`Vmem::xalloc`] choose a free segment.
///
/// Both policies succeed whenever some free range satisfies the request
/// (and enough tags are left); see the [crate documentation](crate) for the
/// search each one performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllocPolicy {
    /// vmem(9) `VM_INSTANTFIT`: first segment of the smallest free list
    /// whose members all fit. O(1) in the common case.
    InstantFit,
    /// vmem(9) `VM_BESTFIT`: the smallest free segment that fits.
    BestFit,
}

/// Placement constraints for [`Vmem::xalloc`], as in NetBSD's vmem_xalloc(9).
///
/// Build one with struct update syntax from [`Constraints::NONE`] (which is
/// also the [`Default`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Constraints {
    /// Alignment of the returned address: a power of two, at least the
    /// quantum. `0` means the quantum.
    pub align: u64,
    /// Offset from the alignment: `addr % align == phase`. A multiple of
    /// the quantum, smaller than `align`.
    pub phase: u64,
    /// If non-zero, a power of two: the range must not cross a multiple of
    /// it, i.e. `addr / nocross == (addr + size - 1) / nocross`. Must be at
    /// least the (rounded) size.
    pub nocross: u64,
    /// Lowest acceptable address (inclusive).
    pub min_addr: u64,
    /// Highest acceptable address of the range's last byte (inclusive):
    /// `addr + size - 1 <= max_addr`.
    pub max_addr: u64,
}

impl Constraints {
    /// No constraint beyond quantum alignment.
    pub const NONE: Constraints = Constraints {
        align: 0,
        phase: 0,
        nocross: 0,
        min_addr: 0,
        max_addr: u64::MAX,
    };
}

impl Default for Constraints {
    fn default() -> Self {
        Self::NONE
    }
}

/// Errors returned by [`Vmem`]. Every failing call leaves the arena unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VmemError {
    /// The quantum given to [`Vmem::new`] is zero or not a power of two.
    InvalidQuantum {
        /// The quantum given.
        quantum: u64,
    },
    /// `max_tags` exceeds [`Vmem::MAX_TAGS`].
    TooManyTags {
        /// The number of tags asked for.
        requested: usize,
        /// The largest number allowed.
        limit: usize,
    },
    /// The tag or hash table could not be allocated in [`Vmem::new`].
    TableAllocFailed {
        /// The number of tags asked for.
        tags: usize,
    },
    /// A size of zero was given where a non-empty range is required.
    ZeroSize,
    /// Rounding the size up to the quantum overflows `u64`.
    SizeOverflow {
        /// The size given.
        size: u64,
    },
    /// A span's base or size is not a multiple of the quantum.
    MisalignedSpan {
        /// Base of the span.
        base: u64,
        /// Size of the span.
        size: u64,
        /// The arena's quantum.
        quantum: u64,
    },
    /// `base + size` of a span overflows `u64`.
    SpanOverflow {
        /// Base of the span.
        base: u64,
        /// Size of the span.
        size: u64,
    },
    /// A span overlaps a span already in the arena.
    SpanOverlap {
        /// Base of the new span.
        base: u64,
        /// Size of the new span.
        size: u64,
        /// Base of the existing span it overlaps.
        existing_base: u64,
        /// Size of the existing span it overlaps.
        existing_size: u64,
    },
    /// `align` is not a power of two at least the quantum.
    InvalidAlign {
        /// The alignment given.
        align: u64,
        /// The arena's quantum.
        quantum: u64,
    },
    /// `phase` is not a multiple of the quantum smaller than the alignment.
    InvalidPhase {
        /// The phase given.
        phase: u64,
        /// The effective alignment.
        align: u64,
    },
    /// `nocross` is not zero or a power of two at least the rounded size.
    InvalidNocross {
        /// The boundary given.
        nocross: u64,
        /// The rounded request size.
        size: u64,
    },
    /// `min_addr > max_addr`.
    EmptyAddressRange {
        /// Lowest acceptable address.
        min_addr: u64,
        /// Highest acceptable address.
        max_addr: u64,
    },
    /// No free range satisfies the request.
    NoSpace {
        /// The rounded request size.
        size: u64,
    },
    /// A free range satisfies the request, but carving it needs more
    /// boundary tags than are left (see [`Vmem::tags_needed`]).
    OutOfTags {
        /// Tags the cheapest fitting placement (or the span) needs.
        needed: usize,
        /// Tags left in the pool.
        available: usize,
        /// The arena's tag capacity.
        capacity: usize,
    },
    /// [`Vmem::free`] of an address that does not start a live allocation.
    NotAllocated {
        /// The address given.
        addr: u64,
    },
    /// [`Vmem::free`] with a size (after rounding) different from the one
    /// allocated at that address.
    SizeMismatch {
        /// The address given.
        addr: u64,
        /// The size given (before rounding).
        size: u64,
        /// The size of the allocation at `addr`.
        allocated: u64,
    },
}

impl fmt::Display for VmemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VmemError::InvalidQuantum { quantum } => {
                write!(f, "quantum {quantum:#x} is not a non-zero power of two")
            }
            VmemError::TooManyTags { requested, limit } => {
                write!(
                    f,
                    "{requested} boundary tags requested, at most {limit} supported"
                )
            }
            VmemError::TableAllocFailed { tags } => {
                write!(f, "cannot allocate a table of {tags} boundary tags")
            }
            VmemError::ZeroSize => f.write_str("zero-sized range"),
            VmemError::SizeOverflow { size } => {
                write!(f, "size {size:#x} overflows when rounded up to the quantum")
            }
            VmemError::MisalignedSpan {
                base,
                size,
                quantum,
            } => write!(
                f,
                "span [{base:#x}, +{size:#x}) is not aligned to the quantum {quantum:#x}"
            ),
            VmemError::SpanOverflow { base, size } => {
                write!(
                    f,
                    "span [{base:#x}, +{size:#x}) overflows the address space"
                )
            }
            VmemError::SpanOverlap {
                base,
                size,
                existing_base,
                existing_size,
            } => write!(
                f,
                "span [{base:#x}, +{size:#x}) overlaps span [{existing_base:#x}, +{existing_size:#x})"
            ),
            VmemError::InvalidAlign { align, quantum } => write!(
                f,
                "alignment {align:#x} is not a power of two at least the quantum {quantum:#x}"
            ),
            VmemError::InvalidPhase { phase, align } => write!(
                f,
                "phase {phase:#x} is not a quantum multiple below the alignment {align:#x}"
            ),
            VmemError::InvalidNocross { nocross, size } => write!(
                f,
                "nocross {nocross:#x} is not a power of two at least the size {size:#x}"
            ),
            VmemError::EmptyAddressRange { min_addr, max_addr } => {
                write!(f, "empty address range [{min_addr:#x}, {max_addr:#x}]")
            }
            VmemError::NoSpace { size } => write!(f, "no free range of {size:#x} bytes fits"),
            VmemError::OutOfTags {
                needed,
                available,
                capacity,
            } => write!(
                f,
                "out of boundary tags: {needed} needed, {available} of {capacity} left"
            ),
            VmemError::NotAllocated { addr } => {
                write!(f, "{addr:#x} is not the start of an allocated range")
            }
            VmemError::SizeMismatch {
                addr,
                size,
                allocated,
            } => write!(
                f,
                "free of {addr:#x} with size {size:#x}, but {allocated:#x} bytes were allocated there"
            ),
        }
    }
}

impl core::error::Error for VmemError {}

/// Snapshot of an arena's accounting, from [`Vmem::stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stats {
    /// Number of spans.
    pub spans: usize,
    /// Total bytes in all spans.
    pub span_bytes: u64,
    /// Bytes in allocated segments.
    pub in_use_bytes: u64,
    /// Bytes in free segments (`span_bytes - in_use_bytes`).
    pub free_bytes: u64,
    /// Number of allocated segments (live allocations).
    pub allocated_segments: usize,
    /// Number of free segments.
    pub free_segments: usize,
    /// Size of the largest free segment (0 if none): the largest request
    /// that can succeed without constraints.
    pub largest_free: u64,
    /// Boundary tags in use (span tags included).
    pub tags_in_use: usize,
    /// Tag capacity, the `max_tags` given to [`Vmem::new`].
    pub tag_capacity: usize,
}

/// What a [`Segment`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    /// A whole span; the free and allocated segments that follow tile it.
    Span,
    /// A free segment.
    Free,
    /// An allocated segment.
    Allocated,
}

/// One boundary tag as seen from outside, from [`Vmem::segments`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Segment {
    /// First address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Span, free or allocated.
    pub kind: SegmentKind,
}

/// A consistency violation found by [`Vmem::check_invariants`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// Which invariant is broken.
    pub what: &'static str,
    /// Index of the tag where it was noticed (`u32::MAX` if none).
    pub tag: u32,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vmem corrupt at tag {}: {}", self.tag, self.what)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unused,
    Span,
    Free,
    Alloc,
}

/// A boundary tag. `link_*` are the free-list links of a free segment, the
/// hash chain (`link_next` only) of an allocated one, the span chain
/// (`link_next`) of a span tag and the pool chain (`link_next`) of an unused
/// tag.
#[derive(Clone, Copy, Debug)]
struct Tag {
    start: u64,
    size: u64,
    kind: Kind,
    seg_prev: u32,
    seg_next: u32,
    link_prev: u32,
    link_next: u32,
}

impl Tag {
    const UNUSED: Tag = Tag {
        start: 0,
        size: 0,
        kind: Kind::Unused,
        seg_prev: NIL,
        seg_next: NIL,
        link_prev: NIL,
        link_next: NIL,
    };

    fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Validated constraints.
#[derive(Clone, Copy, Debug)]
struct Fit {
    size: u64,
    align_mask: u64,
    phase: u64,
    nocross: u64,
    min_addr: u64,
    max_addr: u64,
}

impl Fit {
    /// Whether `[s, s + size)` crosses a `nocross` boundary. `None` if the
    /// range does not fit in `u64`.
    fn crosses(&self, s: u64) -> Option<bool> {
        let last = s.checked_add(self.size - 1)?;
        Some(self.nocross != 0 && (s ^ last) & !(self.nocross - 1) != 0)
    }

    /// Lowest address in the free segment `[a, e)` where the request fits.
    fn lowest(&self, a: u64, e: u64) -> Option<u64> {
        let lo = a.max(self.min_addr);
        // Exclusive upper bound; `max_addr < e <= u64::MAX` makes `+ 1` safe.
        let hi = if self.max_addr < e {
            self.max_addr + 1
        } else {
            e
        };
        if lo >= hi || hi - lo < self.size {
            return None;
        }
        let mut s = lo.checked_add(self.phase.wrapping_sub(lo) & self.align_mask)?;
        if self.crosses(s)? {
            // Next nocross boundary, then the next aligned address. If that
            // crosses too, every candidate does (same offset in every block).
            let b = (s | (self.nocross - 1)).checked_add(1)?;
            s = b.checked_add(self.phase.wrapping_sub(b) & self.align_mask)?;
            if self.crosses(s)? {
                return None;
            }
        }
        (s.checked_add(self.size)? <= hi).then_some(s)
    }

    /// Whether `[s, s + size)` is a valid placement inside `[a, e)`.
    fn allows(&self, s: u64, a: u64, e: u64) -> bool {
        s >= a
            && s >= self.min_addr
            && s.checked_add(self.size).is_some_and(|end| end <= e)
            && s + self.size - 1 <= self.max_addr
            && s.wrapping_sub(self.phase) & self.align_mask == 0
            && self.crosses(s) == Some(false)
    }
}

/// Outcome of trying one free segment.
enum Try {
    Fits(u64),
    TagLimited(usize),
    No,
}

/// A vmem(9)-style range allocator over `u64` addresses.
///
/// See the [crate documentation](crate) for the structure, the complexity
/// of each operation and the no-allocation guarantee.
pub struct Vmem {
    quantum: u64,
    qshift: u32,
    tags: Vec<Tag>,
    /// Head of the pool of unused tags.
    pool: u32,
    tags_in_use: usize,
    seg_head: u32,
    seg_tail: u32,
    /// First span tag (span chain in address order).
    span_head: u32,
    free_heads: [u32; NLISTS],
    /// Bit `k` set iff free list `k` is non-empty.
    free_map: u64,
    buckets: Vec<u32>,
    hash_bits: u32,
    spans: usize,
    span_bytes: u64,
    in_use_bytes: u64,
    allocated_segments: usize,
    free_segments: usize,
}

impl fmt::Debug for Vmem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vmem")
            .field("quantum", &self.quantum)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Vmem {
    /// Largest `max_tags` accepted by [`Vmem::new`] (tags are `u32` indices).
    pub const MAX_TAGS: usize = (u32::MAX - 1) as usize;

    /// Tags needed so that no operation fails for lack of tags while at
    /// most `spans` spans exist and at most `allocations` allocations are
    /// live: `2 * (spans + allocations)`.
    pub const fn tags_needed(spans: usize, allocations: usize) -> usize {
        2 * (spans + allocations)
    }

    /// Creates an arena with quantum `quantum` and a table of `max_tags`
    /// boundary tags, and adds the span `[base, base + size)` unless `size`
    /// is zero (then `base` is ignored and the arena starts empty).
    ///
    /// This is the only method that allocates heap memory: 40 bytes per tag
    /// for the tag table plus 4 bytes per hash bucket (`max_tags` rounded up
    /// to a power of two).
    ///
    /// # Errors
    ///
    /// [`VmemError::InvalidQuantum`], [`VmemError::TooManyTags`],
    /// [`VmemError::TableAllocFailed`], or any error of [`Vmem::add`].
    pub fn new(base: u64, size: u64, quantum: u64, max_tags: usize) -> Result<Self, VmemError> {
        if !quantum.is_power_of_two() {
            return Err(VmemError::InvalidQuantum { quantum });
        }
        if max_tags > Self::MAX_TAGS {
            return Err(VmemError::TooManyTags {
                requested: max_tags,
                limit: Self::MAX_TAGS,
            });
        }
        let oom = VmemError::TableAllocFailed { tags: max_tags };
        let nbuckets = max_tags.max(1).checked_next_power_of_two().ok_or(oom)?;
        let mut tags = Vec::new();
        tags.try_reserve_exact(max_tags).map_err(|_| oom)?;
        tags.extend((0..max_tags).map(|i| Tag {
            link_next: if i + 1 < max_tags {
                (i + 1) as u32
            } else {
                NIL
            },
            ..Tag::UNUSED
        }));
        let mut buckets = Vec::new();
        buckets.try_reserve_exact(nbuckets).map_err(|_| oom)?;
        buckets.resize(nbuckets, NIL);
        let mut vm = Vmem {
            quantum,
            qshift: quantum.trailing_zeros(),
            tags,
            pool: if max_tags == 0 { NIL } else { 0 },
            tags_in_use: 0,
            seg_head: NIL,
            seg_tail: NIL,
            span_head: NIL,
            free_heads: [NIL; NLISTS],
            free_map: 0,
            buckets,
            hash_bits: nbuckets.trailing_zeros(),
            spans: 0,
            span_bytes: 0,
            in_use_bytes: 0,
            allocated_segments: 0,
            free_segments: 0,
        };
        if size != 0 {
            vm.add(base, size)?;
        }
        Ok(vm)
    }

    /// The quantum: every address and size handed out is a multiple of it.
    pub fn quantum(&self) -> u64 {
        self.quantum
    }

    /// Adds the span `[base, base + size)`. Takes two tags (span + free
    /// segment). O(number of spans).
    ///
    /// # Errors
    ///
    /// [`VmemError::ZeroSize`], [`VmemError::MisalignedSpan`],
    /// [`VmemError::SpanOverflow`], [`VmemError::SpanOverlap`],
    /// [`VmemError::OutOfTags`].
    pub fn add(&mut self, base: u64, size: u64) -> Result<(), VmemError> {
        if size == 0 {
            return Err(VmemError::ZeroSize);
        }
        if (base | size) & (self.quantum - 1) != 0 {
            return Err(VmemError::MisalignedSpan {
                base,
                size,
                quantum: self.quantum,
            });
        }
        let end = base
            .checked_add(size)
            .ok_or(VmemError::SpanOverflow { base, size })?;
        // Find the last span starting below `base` and the first after it.
        let mut prev = NIL;
        let mut next = self.span_head;
        while next != NIL && self.tags[next as usize].start < base {
            prev = next;
            next = self.tags[next as usize].link_next;
        }
        for t in [prev, next] {
            if t == NIL {
                continue;
            }
            let s = &self.tags[t as usize];
            if s.start < end && base < s.end() {
                return Err(VmemError::SpanOverlap {
                    base,
                    size,
                    existing_base: s.start,
                    existing_size: s.size,
                });
            }
        }
        self.reserve_tags(2)?;
        let span = self.tag_get();
        let seg = self.tag_get();
        self.tags[span as usize] = Tag {
            start: base,
            size,
            kind: Kind::Span,
            link_next: next,
            ..Tag::UNUSED
        };
        if prev == NIL {
            self.span_head = span;
        } else {
            self.tags[prev as usize].link_next = span;
        }
        self.tags[seg as usize] = Tag {
            start: base,
            size,
            kind: Kind::Free,
            ..Tag::UNUSED
        };
        // In the segment list the new span goes right before the next span.
        self.seg_insert_before(span, next);
        self.seg_insert_before(seg, next);
        self.freelist_insert(seg);
        self.spans += 1;
        self.span_bytes += size;
        self.free_segments += 1;
        Ok(())
    }

    /// Allocates `size` bytes (rounded up to the quantum), quantum-aligned.
    ///
    /// # Errors
    ///
    /// [`VmemError::ZeroSize`], [`VmemError::SizeOverflow`],
    /// [`VmemError::NoSpace`] if no free segment is large enough,
    /// [`VmemError::OutOfTags`] if one is but carving it needs more tags
    /// than are left.
    pub fn alloc(&mut self, size: u64, policy: AllocPolicy) -> Result<u64, VmemError> {
        self.xalloc(size, Constraints::NONE, policy)
    }

    /// Allocates `size` bytes (rounded up to the quantum) under the
    /// constraints `c` (vmem_xalloc(9)).
    ///
    /// # Errors
    ///
    /// Those of [`Vmem::alloc`], and [`VmemError::InvalidAlign`],
    /// [`VmemError::InvalidPhase`], [`VmemError::InvalidNocross`],
    /// [`VmemError::EmptyAddressRange`] for malformed constraints.
    pub fn xalloc(
        &mut self,
        size: u64,
        c: Constraints,
        policy: AllocPolicy,
    ) -> Result<u64, VmemError> {
        let size = self.round(size)?;
        let fit = self.validate(size, &c)?;
        if size > self.span_bytes - self.in_use_bytes {
            return Err(VmemError::NoSpace { size });
        }
        let avail = self.tags_free();
        let quanta = size >> self.qshift;
        let floor = floor_log2(quanta);
        let mut min_need = usize::MAX;

        if policy == AllocPolicy::InstantFit {
            // Lists whose every member holds `quanta` quanta.
            let first = if quanta.is_power_of_two() {
                floor
            } else {
                floor + 1
            };
            let mut map = if first < NLISTS as u32 {
                self.free_map & (!0u64 << first)
            } else {
                0
            };
            while map != 0 {
                let k = map.trailing_zeros() as usize;
                map &= map - 1;
                let t = self.free_heads[k];
                match self.try_segment(t, &fit, avail) {
                    Try::Fits(s) => return Ok(self.carve(t, s, size)),
                    Try::TagLimited(n) => min_need = min_need.min(n),
                    Try::No => {}
                }
            }
        }

        // Best fit (also instant fit's fallback). List `floor` may hold
        // segments smaller than the request, the ones above never do; the
        // first list holding any fitting segment holds the smallest one.
        let mut map = self.free_map & (!0u64 << floor);
        while map != 0 {
            let k = map.trailing_zeros() as usize;
            map &= map - 1;
            let mut best: Option<(u32, u64)> = None;
            let mut t = self.free_heads[k];
            while t != NIL {
                let tag = self.tags[t as usize];
                if tag.size >= size
                    && best.is_none_or(|(b, _)| tag.size < self.tags[b as usize].size)
                {
                    match self.try_segment(t, &fit, avail) {
                        Try::Fits(s) => {
                            best = Some((t, s));
                            if tag.size == size {
                                break; // Exact fit: nothing smaller exists.
                            }
                        }
                        Try::TagLimited(n) => min_need = min_need.min(n),
                        Try::No => {}
                    }
                }
                t = tag.link_next;
            }
            if let Some((t, s)) = best {
                return Ok(self.carve(t, s, size));
            }
        }

        if min_need != usize::MAX {
            Err(VmemError::OutOfTags {
                needed: min_need,
                available: avail,
                capacity: self.tags.len(),
            })
        } else {
            Err(VmemError::NoSpace { size })
        }
    }

    /// Frees the allocation of `size` bytes (rounded up to the quantum) at
    /// `addr`, coalescing it with free neighbours in the same span. Never
    /// needs a tag; O(1) expected.
    ///
    /// # Errors
    ///
    /// [`VmemError::NotAllocated`] if `addr` does not start a live
    /// allocation, [`VmemError::SizeMismatch`] if it does but with another
    /// size. The arena is unchanged then.
    pub fn free(&mut self, addr: u64, size: u64) -> Result<(), VmemError> {
        let t = self
            .hash_find(addr)
            .ok_or(VmemError::NotAllocated { addr })?;
        let allocated = self.tags[t as usize].size;
        if self.round(size).ok() != Some(allocated) {
            return Err(VmemError::SizeMismatch {
                addr,
                size,
                allocated,
            });
        }
        self.hash_remove(t);
        self.tags[t as usize].kind = Kind::Free;
        self.in_use_bytes -= allocated;
        self.allocated_segments -= 1;
        self.free_segments += 1;
        let prev = self.tags[t as usize].seg_prev;
        if self.tags[prev as usize].kind == Kind::Free {
            // `prev` is never NIL: a span tag precedes every segment.
            let p = self.tags[prev as usize];
            self.freelist_remove(prev);
            self.seg_unlink(prev);
            self.tag_put(prev);
            let tag = &mut self.tags[t as usize];
            tag.start = p.start;
            tag.size += p.size;
            self.free_segments -= 1;
        }
        let next = self.tags[t as usize].seg_next;
        if next != NIL && self.tags[next as usize].kind == Kind::Free {
            let n = self.tags[next as usize];
            self.freelist_remove(next);
            self.seg_unlink(next);
            self.tag_put(next);
            self.tags[t as usize].size += n.size;
            self.free_segments -= 1;
        }
        self.freelist_insert(t);
        Ok(())
    }

    /// Accounting snapshot. O(length of the highest non-empty free list).
    pub fn stats(&self) -> Stats {
        let mut largest_free = 0;
        if self.free_map != 0 {
            let k = 63 - self.free_map.leading_zeros() as usize;
            let mut t = self.free_heads[k];
            while t != NIL {
                largest_free = largest_free.max(self.tags[t as usize].size);
                t = self.tags[t as usize].link_next;
            }
        }
        Stats {
            spans: self.spans,
            span_bytes: self.span_bytes,
            in_use_bytes: self.in_use_bytes,
            free_bytes: self.span_bytes - self.in_use_bytes,
            allocated_segments: self.allocated_segments,
            free_segments: self.free_segments,
            largest_free,
            tags_in_use: self.tags_in_use,
            tag_capacity: self.tags.len(),
        }
    }

    /// Whether `addr` lies in a span of the arena. O(number of spans).
    pub fn contains(&self, addr: u64) -> bool {
        let mut t = self.span_head;
        while t != NIL {
            let s = &self.tags[t as usize];
            if s.start > addr {
                return false;
            }
            if addr < s.end() {
                return true;
            }
            t = s.link_next;
        }
        false
    }

    /// The size of the live allocation starting at `addr`, if any.
    /// O(1) expected.
    pub fn allocated_size(&self, addr: u64) -> Option<u64> {
        self.hash_find(addr).map(|t| self.tags[t as usize].size)
    }

    /// Whether `addr` lies in an allocated segment. O(number of segments).
    pub fn is_allocated(&self, addr: u64) -> bool {
        self.segments()
            .any(|s| s.kind == SegmentKind::Allocated && s.start <= addr && addr - s.start < s.size)
    }

    /// All boundary tags in address order: each span followed by the free
    /// and allocated segments tiling it. O(number of segments) to exhaust;
    /// does not allocate.
    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        let mut t = self.seg_head;
        core::iter::from_fn(move || {
            if t == NIL {
                return None;
            }
            let tag = &self.tags[t as usize];
            t = tag.seg_next;
            let kind = match tag.kind {
                Kind::Span => SegmentKind::Span,
                Kind::Free => SegmentKind::Free,
                _ => SegmentKind::Allocated,
            };
            Some(Segment {
                start: tag.start,
                size: tag.size,
                kind,
            })
        })
    }

    /// Checks every structural invariant: the segment list is in address
    /// order, each span is tiled exactly by its segments, no two free
    /// segments are adjacent, free lists hold exactly the free segments in
    /// the right size class, the bitmap matches the lists, the hash holds
    /// exactly the allocated segments in their buckets, the pool holds the
    /// remaining tags, and the counters match. O(tags). For tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), Corruption> {
        let cap = self.tags.len();
        let bad = |what, tag| Err(Corruption { what, tag });
        let qmask = self.quantum - 1;

        // Segment list.
        let (mut n, mut spans, mut span_bytes, mut in_use, mut allocs, mut frees) =
            (0usize, 0usize, 0u64, 0u64, 0usize, 0usize);
        let mut prev = NIL;
        let mut t = self.seg_head;
        let mut span_cur = NIL; // current span's tag
        let mut cursor = 0u64; // next address expected in the current span
        let mut prev_kind = Kind::Unused;
        while t != NIL {
            n += 1;
            if n > cap {
                return bad("segment list cycle", t);
            }
            let tag = self.tags[t as usize];
            if tag.seg_prev != prev {
                return bad("segment list back link", t);
            }
            if tag.size == 0 || (tag.start | tag.size) & qmask != 0 {
                return bad("empty or misaligned tag", t);
            }
            if tag.start.checked_add(tag.size).is_none() {
                return bad("tag overflows", t);
            }
            match tag.kind {
                Kind::Span => {
                    if span_cur != NIL && cursor != self.tags[span_cur as usize].end() {
                        return bad("span not tiled by its segments", span_cur);
                    }
                    if span_cur != NIL && tag.start < cursor {
                        return bad("spans out of order or overlapping", t);
                    }
                    spans += 1;
                    span_bytes += tag.size;
                    span_cur = t;
                    cursor = tag.start;
                }
                Kind::Free | Kind::Alloc => {
                    if span_cur == NIL {
                        return bad("segment before any span", t);
                    }
                    if tag.start != cursor || tag.end() > self.tags[span_cur as usize].end() {
                        return bad("segment not contiguous within its span", t);
                    }
                    cursor = tag.end();
                    if tag.kind == Kind::Free {
                        if prev_kind == Kind::Free {
                            return bad("adjacent free segments not coalesced", t);
                        }
                        frees += 1;
                    } else {
                        in_use += tag.size;
                        allocs += 1;
                    }
                }
                Kind::Unused => return bad("unused tag on segment list", t),
            }
            prev_kind = tag.kind;
            prev = t;
            t = tag.seg_next;
        }
        if prev != self.seg_tail {
            return bad("segment list tail", prev);
        }
        if span_cur != NIL && cursor != self.tags[span_cur as usize].end() {
            return bad("span not tiled by its segments", span_cur);
        }
        if n != self.tags_in_use {
            return bad("tags_in_use counter", NIL);
        }
        if (spans, span_bytes, in_use, allocs, frees)
            != (
                self.spans,
                self.span_bytes,
                self.in_use_bytes,
                self.allocated_segments,
                self.free_segments,
            )
        {
            return bad("accounting counters", NIL);
        }

        // Span chain.
        let (mut t, mut k, mut last_end) = (self.span_head, 0usize, 0u64);
        while t != NIL {
            k += 1;
            let tag = &self.tags[t as usize];
            if k > spans || tag.kind != Kind::Span || (k > 1 && tag.start < last_end) {
                return bad("span chain", t);
            }
            last_end = tag.end();
            t = tag.link_next;
        }
        if k != spans {
            return bad("span chain length", NIL);
        }

        // Free lists.
        let mut listed = 0usize;
        for (k, &head) in self.free_heads.iter().enumerate() {
            if (head != NIL) != (self.free_map >> k & 1 == 1) {
                return bad("free bitmap", head);
            }
            let (mut prev, mut t) = (NIL, head);
            while t != NIL {
                listed += 1;
                if listed > frees {
                    return bad("free lists hold too many tags", t);
                }
                let tag = &self.tags[t as usize];
                if tag.kind != Kind::Free || tag.link_prev != prev {
                    return bad("free list member", t);
                }
                if floor_log2(tag.size >> self.qshift) as usize != k {
                    return bad("free segment on the wrong list", t);
                }
                prev = t;
                t = tag.link_next;
            }
        }
        if listed != frees {
            return bad("free segment missing from free lists", NIL);
        }

        // Hash.
        let mut hashed = 0usize;
        for (b, &head) in self.buckets.iter().enumerate() {
            let mut t = head;
            while t != NIL {
                hashed += 1;
                if hashed > allocs {
                    return bad("hash holds too many tags", t);
                }
                let tag = &self.tags[t as usize];
                if tag.kind != Kind::Alloc || self.bucket(tag.start) != b {
                    return bad("hash member", t);
                }
                t = tag.link_next;
            }
        }
        if hashed != allocs {
            return bad("allocated segment missing from hash", NIL);
        }

        // Pool.
        let (mut t, mut pooled) = (self.pool, 0usize);
        while t != NIL {
            pooled += 1;
            if pooled > cap - n || self.tags[t as usize].kind != Kind::Unused {
                return bad("tag pool", t);
            }
            t = self.tags[t as usize].link_next;
        }
        if pooled + n != cap {
            return bad("tags leaked", NIL);
        }
        Ok(())
    }

    // ----- internals -----

    fn tags_free(&self) -> usize {
        self.tags.len() - self.tags_in_use
    }

    fn round(&self, size: u64) -> Result<u64, VmemError> {
        if size == 0 {
            return Err(VmemError::ZeroSize);
        }
        let mask = self.quantum - 1;
        size.checked_add(mask)
            .map(|s| s & !mask)
            .ok_or(VmemError::SizeOverflow { size })
    }

    fn validate(&self, size: u64, c: &Constraints) -> Result<Fit, VmemError> {
        let align = if c.align == 0 { self.quantum } else { c.align };
        if !align.is_power_of_two() || align < self.quantum {
            return Err(VmemError::InvalidAlign {
                align,
                quantum: self.quantum,
            });
        }
        if c.phase >= align || c.phase & (self.quantum - 1) != 0 {
            return Err(VmemError::InvalidPhase {
                phase: c.phase,
                align,
            });
        }
        if c.nocross != 0 && (!c.nocross.is_power_of_two() || c.nocross < size) {
            return Err(VmemError::InvalidNocross {
                nocross: c.nocross,
                size,
            });
        }
        if c.min_addr > c.max_addr {
            return Err(VmemError::EmptyAddressRange {
                min_addr: c.min_addr,
                max_addr: c.max_addr,
            });
        }
        Ok(Fit {
            size,
            align_mask: align - 1,
            phase: c.phase,
            nocross: c.nocross,
            min_addr: c.min_addr,
            max_addr: c.max_addr,
        })
    }

    fn reserve_tags(&self, needed: usize) -> Result<(), VmemError> {
        let available = self.tags_free();
        if available < needed {
            return Err(VmemError::OutOfTags {
                needed,
                available,
                capacity: self.tags.len(),
            });
        }
        Ok(())
    }

    /// Where in free segment `t` the request goes, given `avail` spare tags:
    /// the lowest feasible address if the tags allow it, else a placement
    /// flush with either end of the segment (1 tag) or an exact fit (0).
    fn try_segment(&self, t: u32, fit: &Fit, avail: usize) -> Try {
        let tag = &self.tags[t as usize];
        let (a, e) = (tag.start, tag.end());
        if tag.size < fit.size {
            return Try::No;
        }
        let Some(s) = fit.lowest(a, e) else {
            return Try::No;
        };
        let need = usize::from(s > a) + usize::from(s + fit.size < e);
        if need <= avail {
            return Try::Fits(s);
        }
        // `s` has a gap on both sides or `avail == 0`; the only cheaper
        // placement left is flush with the end (`s == a` would be lowest).
        let top = e - fit.size;
        if top != s && fit.allows(top, a, e) {
            let need_top = usize::from(top > a);
            if need_top <= avail {
                return Try::Fits(top);
            }
            return Try::TagLimited(need.min(need_top));
        }
        Try::TagLimited(need)
    }

    /// Allocates `[s, s + size)` from free segment `t`; the caller checked
    /// that enough tags are left.
    fn carve(&mut self, t: u32, s: u64, size: u64) -> u64 {
        let Tag {
            start,
            size: seg_size,
            ..
        } = self.tags[t as usize];
        let end = start + seg_size;
        self.freelist_remove(t);
        self.free_segments -= 1;
        if s > start {
            let lead = self.tag_get();
            self.tags[lead as usize] = Tag {
                start,
                size: s - start,
                kind: Kind::Free,
                ..Tag::UNUSED
            };
            self.seg_insert_before(lead, t);
            self.freelist_insert(lead);
            self.free_segments += 1;
        }
        if s + size < end {
            let trail = self.tag_get();
            self.tags[trail as usize] = Tag {
                start: s + size,
                size: end - (s + size),
                kind: Kind::Free,
                ..Tag::UNUSED
            };
            let after = self.tags[t as usize].seg_next;
            self.seg_insert_before(trail, after);
            self.freelist_insert(trail);
            self.free_segments += 1;
        }
        let tag = &mut self.tags[t as usize];
        tag.start = s;
        tag.size = size;
        tag.kind = Kind::Alloc;
        self.hash_insert(t);
        self.in_use_bytes += size;
        self.allocated_segments += 1;
        s
    }

    fn tag_get(&mut self) -> u32 {
        let t = self.pool;
        debug_assert_ne!(t, NIL, "caller reserves tags");
        self.pool = self.tags[t as usize].link_next;
        self.tags[t as usize] = Tag::UNUSED;
        self.tags_in_use += 1;
        t
    }

    fn tag_put(&mut self, t: u32) {
        self.tags[t as usize] = Tag {
            link_next: self.pool,
            ..Tag::UNUSED
        };
        self.pool = t;
        self.tags_in_use -= 1;
    }

    /// Links `t` into the segment list before `at` (at the tail if NIL).
    fn seg_insert_before(&mut self, t: u32, at: u32) {
        let prev = if at == NIL {
            self.seg_tail
        } else {
            self.tags[at as usize].seg_prev
        };
        self.tags[t as usize].seg_prev = prev;
        self.tags[t as usize].seg_next = at;
        if prev == NIL {
            self.seg_head = t;
        } else {
            self.tags[prev as usize].seg_next = t;
        }
        if at == NIL {
            self.seg_tail = t;
        } else {
            self.tags[at as usize].seg_prev = t;
        }
    }

    fn seg_unlink(&mut self, t: u32) {
        let Tag {
            seg_prev, seg_next, ..
        } = self.tags[t as usize];
        if seg_prev == NIL {
            self.seg_head = seg_next;
        } else {
            self.tags[seg_prev as usize].seg_next = seg_next;
        }
        if seg_next == NIL {
            self.seg_tail = seg_prev;
        } else {
            self.tags[seg_next as usize].seg_prev = seg_prev;
        }
    }

    fn freelist_insert(&mut self, t: u32) {
        let k = floor_log2(self.tags[t as usize].size >> self.qshift) as usize;
        let head = self.free_heads[k];
        self.tags[t as usize].link_prev = NIL;
        self.tags[t as usize].link_next = head;
        if head != NIL {
            self.tags[head as usize].link_prev = t;
        }
        self.free_heads[k] = t;
        self.free_map |= 1 << k;
    }

    fn freelist_remove(&mut self, t: u32) {
        let Tag {
            size,
            link_prev,
            link_next,
            ..
        } = self.tags[t as usize];
        let k = floor_log2(size >> self.qshift) as usize;
        if link_prev == NIL {
            self.free_heads[k] = link_next;
            if link_next == NIL {
                self.free_map &= !(1 << k);
            }
        } else {
            self.tags[link_prev as usize].link_next = link_next;
        }
        if link_next != NIL {
            self.tags[link_next as usize].link_prev = link_prev;
        }
    }

    fn bucket(&self, addr: u64) -> usize {
        if self.hash_bits == 0 {
            0
        } else {
            ((addr >> self.qshift).wrapping_mul(HASH_MUL) >> (64 - self.hash_bits)) as usize
        }
    }

    fn hash_insert(&mut self, t: u32) {
        let b = self.bucket(self.tags[t as usize].start);
        self.tags[t as usize].link_next = self.buckets[b];
        self.buckets[b] = t;
    }

    fn hash_find(&self, addr: u64) -> Option<u32> {
        let mut t = self.buckets[self.bucket(addr)];
        while t != NIL {
            let tag = &self.tags[t as usize];
            if tag.start == addr {
                return Some(t);
            }
            t = tag.link_next;
        }
        None
    }

    fn hash_remove(&mut self, t: u32) {
        let b = self.bucket(self.tags[t as usize].start);
        let next = self.tags[t as usize].link_next;
        if self.buckets[b] == t {
            self.buckets[b] = next;
            return;
        }
        let mut p = self.buckets[b];
        while p != NIL {
            if self.tags[p as usize].link_next == t {
                self.tags[p as usize].link_next = next;
                return;
            }
            p = self.tags[p as usize].link_next;
        }
        debug_assert!(false, "allocated tag missing from its hash chain");
    }
}

/// `floor(log2(x))` for `x >= 1`.
fn floor_log2(x: u64) -> u32 {
    63 - x.leading_zeros()
}
