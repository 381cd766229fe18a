//! Address newtypes: the one definition behind [`crate::vm::Paddr`] and
//! [`crate::iommu::Iova`].
//!
//! A physical address and an I/O virtual address are both 64-bit numbers,
//! and `Iommu::enter(iova, pa, ...)` takes one of each: as bare `u64`s they
//! swap silently. Each is its own `#[repr(transparent)]` type (as vm-memory's
//! `GuestAddress`, asterinas' `Paddr`/`Daddr`), with only the arithmetic the
//! kernel uses: an offset added (`+ u64`, `+ usize`, [`checked_add`]), the
//! distance between two addresses of the same kind (`a - b`, a `u64`), and
//! page alignment. Sizes and counts stay plain integers. Nothing here checks
//! anything at run time that a `u64` would not: the data path is unchanged.
//!
//! [`checked_add`]: crate::vm::Paddr::checked_add

/// Define an address type `$name` over `u64`.
macro_rules! address_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The address as a number (for the host, an arena, a counter).
            #[inline(always)]
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + off`, or `None` on overflow.
            #[inline(always)]
            pub const fn checked_add(self, off: u64) -> Option<Self> {
                match self.0.checked_add(off) {
                    Some(a) => Some(Self(a)),
                    None => None,
                }
            }

            /// Rounded down to a multiple of `align` (a power of two).
            #[inline(always)]
            pub const fn align_down(self, align: u64) -> Self {
                debug_assert!(align.is_power_of_two());
                Self(self.0 & !(align - 1))
            }

            /// Is it a multiple of `align` (a power of two)?
            #[inline(always)]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
        }

        impl core::ops::Add<u64> for $name {
            type Output = Self;
            #[inline(always)]
            fn add(self, off: u64) -> Self {
                Self(self.0 + off)
            }
        }

        impl core::ops::Add<usize> for $name {
            type Output = Self;
            #[inline(always)]
            fn add(self, off: usize) -> Self {
                Self(self.0 + off as u64)
            }
        }

        /// The distance from `rhs` up to `self`, in bytes.
        impl core::ops::Sub for $name {
            type Output = u64;
            #[inline(always)]
            fn sub(self, rhs: Self) -> u64 {
                self.0 - rhs.0
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl core::fmt::LowerHex for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}
