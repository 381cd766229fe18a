//! Interrupt priority levels: the lattice.
//!
//! BSD style, lowest to highest:
//!
//! ```text
//! none < softclock < softbio < softnet < softserial < bio < net < tty < vm < sched < high
//! ```
//!
//! An interrupt source has a level; it is *blocked* while the CPU runs at
//! that level or above, and it *preempts* code running below it. The four
//! soft levels belong to soft interrupts ([`crate::softint`]), which
//! therefore never run while a hardware interrupt handler is active on the
//! CPU; the six hard levels belong to device interrupts ([`crate::intr`]).
//!
//! `vm` is the level of memory allocators that are called from interrupt
//! handlers: in 1995 it was spelled `splimp` and did not block `bio` on the
//! i386, which is the race of the mail (see [`crate::race`]). `sched` is the
//! level of the scheduler's own locks (run queues, sleep queues): nothing
//! that wakes a thread may run while they are held.

use core::fmt;

/// An interrupt priority level.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
pub enum Ipl {
    /// Thread level: nothing blocked.
    None = 0,
    /// Soft interrupts of the clock (callouts).
    SoftClock = 1,
    /// Soft interrupts of block I/O completion.
    SoftBio = 2,
    /// Soft interrupts of the network stack.
    SoftNet = 3,
    /// Soft interrupts of serial lines.
    SoftSerial = 4,
    /// Block devices (disk controllers).
    Bio = 5,
    /// Network interfaces.
    Net = 6,
    /// Terminals.
    Tty = 7,
    /// Memory allocators usable from interrupt handlers (`splimp` of old).
    Vm = 8,
    /// The scheduler: run queues and sleep queues.
    Sched = 9,
    /// Everything blocked.
    High = 10,
}

impl Ipl {
    /// Number of levels.
    pub const COUNT: usize = 11;
    /// Every level, lowest first.
    pub const ALL: [Ipl; Ipl::COUNT] = [
        Ipl::None,
        Ipl::SoftClock,
        Ipl::SoftBio,
        Ipl::SoftNet,
        Ipl::SoftSerial,
        Ipl::Bio,
        Ipl::Net,
        Ipl::Tty,
        Ipl::Vm,
        Ipl::Sched,
        Ipl::High,
    ];
    /// The soft levels, lowest first.
    pub const SOFT: [Ipl; 4] = [Ipl::SoftClock, Ipl::SoftBio, Ipl::SoftNet, Ipl::SoftSerial];
    /// The hard levels, lowest first.
    pub const HARD: [Ipl; 6] = [Ipl::Bio, Ipl::Net, Ipl::Tty, Ipl::Vm, Ipl::Sched, Ipl::High];

    /// The level with this number, if any.
    pub const fn from_u8(v: u8) -> Option<Ipl> {
        if (v as usize) < Ipl::COUNT {
            Some(Ipl::ALL[v as usize])
        } else {
            None
        }
    }

    /// Is this one of the four soft-interrupt levels?
    pub const fn is_soft(self) -> bool {
        matches!(
            self,
            Ipl::SoftClock | Ipl::SoftBio | Ipl::SoftNet | Ipl::SoftSerial
        )
    }

    /// Is this a hardware-interrupt level (`bio` and above)?
    pub const fn is_hard(self) -> bool {
        (self as u8) >= (Ipl::Bio as u8)
    }

    /// Index among the soft levels (softclock = 0).
    pub const fn soft_index(self) -> Option<usize> {
        if self.is_soft() {
            Some(self as usize - Ipl::SoftClock as usize)
        } else {
            None
        }
    }

    /// Index among the hard levels (bio = 0).
    pub const fn hard_index(self) -> Option<usize> {
        if self.is_hard() {
            Some(self as usize - Ipl::Bio as usize)
        } else {
            None
        }
    }

    /// The BSD name of the level.
    pub const fn name(self) -> &'static str {
        match self {
            Ipl::None => "none",
            Ipl::SoftClock => "softclock",
            Ipl::SoftBio => "softbio",
            Ipl::SoftNet => "softnet",
            Ipl::SoftSerial => "softserial",
            Ipl::Bio => "bio",
            Ipl::Net => "net",
            Ipl::Tty => "tty",
            Ipl::Vm => "vm",
            Ipl::Sched => "sched",
            Ipl::High => "high",
        }
    }

    /// Parse a BSD level name (`"bio"`, `"softnet"`, ...).
    pub fn from_name(s: &str) -> Option<Ipl> {
        Ipl::ALL.iter().copied().find(|l| l.name() == s)
    }

    /// Does running at `self` block an interrupt of level `source`?
    pub const fn blocks(self, source: Ipl) -> bool {
        (source as u8) <= (self as u8)
    }
}

impl fmt::Display for Ipl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lattice_is_totally_ordered_and_named() {
        for w in Ipl::ALL.windows(2) {
            assert!(w[0] < w[1]);
        }
        for l in Ipl::ALL {
            assert_eq!(Ipl::from_u8(l as u8), Some(l));
            assert_eq!(Ipl::from_name(l.name()), Some(l));
        }
        assert_eq!(Ipl::from_u8(11), None);
        assert_eq!(Ipl::from_name("imp"), None);
    }

    #[test]
    fn soft_below_hard_and_blocking() {
        for s in Ipl::SOFT {
            for h in Ipl::HARD {
                assert!(s < h);
                assert!(h.blocks(s));
                assert!(!s.blocks(h));
            }
        }
        assert!(Ipl::Vm.blocks(Ipl::Bio), "splvm (splimp) blocks bio");
        assert!(!Ipl::Bio.blocks(Ipl::Net));
        assert!(Ipl::Bio.blocks(Ipl::Bio));
        assert!(!Ipl::None.blocks(Ipl::SoftClock));
        assert_eq!(Ipl::SoftBio.soft_index(), Some(1));
        assert_eq!(Ipl::Net.hard_index(), Some(1));
        assert_eq!(Ipl::None.soft_index(), None);
    }
}
