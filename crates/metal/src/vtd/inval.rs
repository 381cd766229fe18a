//! VT-d invalidation: queued (QI) when the unit has it, register-based
//! otherwise.
//!
//! The unit caches context entries and translations; after a change to
//! either, software invalidates the cache before it relies on the change.
//! [`Invalidator`] does it one of two ways:
//!
//! * **Queued invalidation** (ECAP.QI; QEMU's intel-iommu has it): a ring
//!   of 256 128-bit descriptors in a page of kernel RAM
//!   (`IQA_REG`, queue size 0), the unit's head (`IQH_REG`) and our tail
//!   (`IQT_REG`), enabled with GCMD.QIE. An invalidation is one or two
//!   descriptors (context-cache, IOTLB) followed by an invalidation-wait
//!   descriptor with a status write: the unit stores a sequence number
//!   into a word of ours when it has done everything before it, and the
//!   CPU polls that word. Linux's `qi_submit_sync` does the same.
//! * **Register-based** (the fallback without ECAP.QI, and what
//!   [`Invalidator::set_queued`] switches to for comparison): `CCMD_REG`,
//!   or `IVA_REG` then `IOTLB_REG`, polling the command's own bit until
//!   the unit clears it. The spec forbids these while QI is on.
//!
//! IOTLB invalidations are page-selective (an aligned block of 2^AM pages
//! covering the range) when CAP.PSI is set and AM fits CAP.MAMV,
//! domain-selective otherwise. With CAP.DRD/DWD the unit is asked to
//! drain the device's pending reads and writes too.
//!
//! Every invalidation is counted by cause ([`Cause`]: a map that
//! replaced a not-present entry, which only a unit in caching mode
//! needs; an unmap; the driver's own mapping; boot) and by granularity,
//! and the TSC cycles from the first register write to the completion
//! are summed per flavour ([`InvalStats`]), for `bench dvma`.
//!
//! # Contexts
//! [`Invalidator::iotlb`] and [`Invalidator::context_global`]: any
//! context, interrupt handlers included (a map unloaded in a completion
//! handler). One submission at a time, serialised by a spin flag that is
//! only ever held with interrupts disabled, from the first descriptor
//! written to the status word seen: an interrupt handler on the CPU that
//! holds it cannot run until it is released (traps do not nest and the
//! holder runs with IF clear), so a handler never spins on its own CPU's
//! holder; on another CPU it spins for at most one submission. This is
//! the rule kern's spin mutexes follow (the flag is a mutex at IPL_HIGH).
//! Nothing here allocates or prints. [`Invalidator::init`] and
//! [`Invalidator::set_queued`]: thread or boot context, with no other
//! invalidation in flight (boot, or the bench's thread with no device
//! running).

use core::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering::*, fence,
};

use super::{GCMD_QIE, Vtd, pa_of};
use crate::x86;

const CCMD: usize = 0x28;
const FSTS: usize = 0x34;
const IQH: usize = 0x80;
const IQT: usize = 0x88;
const IQA: usize = 0x90;

/// FSTS: invalidation queue error.
const FSTS_IQE: u32 = 1 << 4;

/// Descriptors in the queue (one 4 KiB page of 16-byte descriptors).
const QLEN: usize = 256;

/// Why an IOTLB invalidation was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// `enter` replaced a not-present entry (only with CAP.CM).
    Map,
    /// `remove` cleared entries.
    Unmap,
    /// The driver mapped its own memory, or boot.
    Other,
}

/// Counters (see the module docs).
#[derive(Debug)]
pub struct InvalStats {
    /// IOTLB invalidations caused by maps (caching mode).
    pub iotlb_map: AtomicU64,
    /// IOTLB invalidations caused by unmaps.
    pub iotlb_unmap: AtomicU64,
    /// Other IOTLB invalidations (driver memory, boot).
    pub iotlb_other: AtomicU64,
    /// Context-cache invalidations.
    pub context: AtomicU64,
    /// IOTLB invalidations by granularity: page-selective.
    pub page: AtomicU64,
    /// Domain-selective.
    pub domain: AtomicU64,
    /// Global.
    pub global: AtomicU64,
    /// Submissions through the queue (each ends with a wait descriptor).
    pub queued: AtomicU64,
    /// TSC cycles spent in queued submissions.
    pub queued_cycles: AtomicU64,
    /// Register-based invalidations.
    pub register: AtomicU64,
    /// TSC cycles spent in them.
    pub register_cycles: AtomicU64,
}

impl InvalStats {
    const fn new() -> Self {
        Self {
            iotlb_map: AtomicU64::new(0),
            iotlb_unmap: AtomicU64::new(0),
            iotlb_other: AtomicU64::new(0),
            context: AtomicU64::new(0),
            page: AtomicU64::new(0),
            domain: AtomicU64::new(0),
            global: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queued_cycles: AtomicU64::new(0),
            register: AtomicU64::new(0),
            register_cycles: AtomicU64::new(0),
        }
    }

    /// IOTLB invalidations of every cause.
    pub fn iotlb(&self) -> u64 {
        self.iotlb_map.load(Relaxed)
            + self.iotlb_unmap.load(Relaxed)
            + self.iotlb_other.load(Relaxed)
    }
}

/// The queue page: 256 descriptors of two words.
#[repr(C, align(4096))]
struct Queue([AtomicU64; 2 * QLEN]);

/// The invalidation machinery of one unit.
pub struct Invalidator {
    queue: Queue,
    /// The word the unit's wait descriptors write.
    status: AtomicU32,
    /// Serialises submissions; held only with interrupts disabled.
    busy: AtomicBool,
    /// The unit has QI (ECAP.QI).
    has_qi: AtomicBool,
    /// QI is enabled: every invalidation goes through the queue.
    queued: AtomicBool,
    /// The next descriptor index (under `busy`).
    tail: AtomicUsize,
    /// The last wait descriptor's sequence number (under `busy`).
    seq: AtomicU32,
    /// Offset of IVA_REG (IOTLB_REG at +8), from ECAP.IRO.
    iva: AtomicUsize,
    /// CAP.PSI, and CAP.MAMV.
    psi: AtomicBool,
    mamv: AtomicU8,
    /// CAP.DRD | CAP.DWD: ask for draining.
    drain: AtomicBool,
    /// The domain id invalidations name.
    did: AtomicU16,
    /// Counters.
    pub stats: InvalStats,
}

impl core::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Invalidator({})",
            if self.queued.load(Relaxed) {
                "queued"
            } else {
                "register"
            }
        )
    }
}

impl Default for Invalidator {
    fn default() -> Self {
        Self::new()
    }
}

impl Invalidator {
    /// An idle invalidator (nothing set up).
    pub const fn new() -> Self {
        Self {
            queue: Queue([const { AtomicU64::new(0) }; 2 * QLEN]),
            status: AtomicU32::new(0),
            busy: AtomicBool::new(false),
            has_qi: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            tail: AtomicUsize::new(0),
            seq: AtomicU32::new(0),
            iva: AtomicUsize::new(0),
            psi: AtomicBool::new(false),
            mamv: AtomicU8::new(0),
            drain: AtomicBool::new(false),
            did: AtomicU16::new(0),
            stats: InvalStats::new(),
        }
    }

    /// Read the unit's capabilities and, if it has QI, set the queue up
    /// and enable it. Invalidations name domain `did`. Boot, before the
    /// first invalidation, translation still off.
    pub(super) fn init(&self, v: &Vtd, cap: u64, ecap: u64, did: u16) {
        self.iva.store(((ecap >> 8) & 0x3ff) as usize * 16, Relaxed);
        self.psi.store(cap & (1 << 39) != 0, Relaxed);
        self.mamv.store(((cap >> 48) & 0x3f) as u8, Relaxed);
        self.drain.store(cap & (3 << 54) == 3 << 54, Relaxed);
        self.did.store(did, Relaxed);
        if ecap & 2 != 0 {
            self.has_qi.store(true, Relaxed);
            // The queue's page, 256 entries (QS = 0), 128-bit descriptors.
            v.w64(IQA, pa_of(&self.queue));
            let _ = self.set_queued(v, true);
        }
    }

    /// Does the unit have queued invalidation?
    pub fn has_queued(&self) -> bool {
        self.has_qi.load(Relaxed)
    }

    /// Is queued invalidation on?
    pub fn is_queued(&self) -> bool {
        self.queued.load(Relaxed)
    }

    /// Switch queued invalidation on or off (register-based then);
    /// `false` if the unit has no QI. With no invalidation in flight
    /// (boot, or a thread that owns the unit: see the module docs).
    pub fn set_queued(&self, v: &Vtd, on: bool) -> bool {
        if !self.has_queued() {
            return !on;
        }
        self.with_busy(|| {
            if on {
                // The unit starts at head 0 (reset, or disabled before);
                // so do we.
                v.w64(IQT, 0);
                self.tail.store(0, Relaxed);
                v.gcmd(GCMD_QIE, 0);
            } else {
                // Allowed: the queue is empty and its last descriptor was
                // a wait (every submission ends with one).
                v.gcmd(0, GCMD_QIE);
                v.w64(IQT, 0);
                self.tail.store(0, Relaxed);
            }
            self.queued.store(on, Relaxed);
        });
        true
    }

    /// Run `f` holding the submission flag, interrupts disabled.
    fn with_busy<R>(&self, f: impl FnOnce() -> R) -> R {
        x86::without_interrupts(|| {
            while self
                .busy
                .compare_exchange_weak(false, true, Acquire, Relaxed)
                .is_err()
            {
                core::hint::spin_loop();
            }
            // The page-table entries written before, before any command.
            fence(SeqCst);
            let r = f();
            self.busy.store(false, Release);
            r
        })
    }

    /// Queue `descs` and a wait descriptor, and poll until the unit has
    /// written the wait's status. Under `busy`.
    fn submit(&self, v: &Vtd, descs: &[[u64; 2]]) {
        let seq = self.seq.load(Relaxed).wrapping_add(1);
        self.seq.store(seq, Relaxed);
        // Type 5, SW (status write), FN (fence); the status data above.
        let wait = [
            5 | (1 << 5) | (1 << 6) | (u64::from(seq) << 32),
            pa_of(&self.status),
        ];
        let mut t = self.tail.load(Relaxed);
        for d in descs.iter().chain(core::iter::once(&wait)) {
            self.queue.0[2 * t].store(d[0], Relaxed);
            self.queue.0[2 * t + 1].store(d[1], Relaxed);
            t = (t + 1) % QLEN;
        }
        self.tail.store(t, Relaxed);
        // The page-table entries, the descriptors, before the tail.
        fence(SeqCst);
        v.w64(IQT, (t as u64) << 4);
        while self.status.load(Acquire) != seq {
            if v.r32(FSTS) & FSTS_IQE != 0 {
                // A descriptor the unit refused: a bug here, and the
                // invalidation did not happen. Stop rather than run on
                // with stale translations.
                panic!(
                    "vt-d: invalidation queue error at head {:#x} (descriptor {:#x?})",
                    v.r64(IQH),
                    descs
                );
            }
            core::hint::spin_loop();
        }
    }

    /// Invalidate the context cache (global). Any context.
    pub fn context_global(&self, v: &Vtd) {
        self.with_busy(|| {
            let t0 = x86::rdtsc();
            if self.is_queued() {
                // Type 1, granularity 1 (global).
                self.submit(v, &[[1 | (1 << 4), 0]]);
                self.account(true, t0);
            } else {
                v.w64(CCMD, (1 << 63) | (1 << 61));
                while v.r64(CCMD) & (1 << 63) != 0 {
                    core::hint::spin_loop();
                }
                self.account(false, t0);
            }
        });
        self.stats.context.fetch_add(1, Relaxed);
    }

    /// Invalidate the IOTLB for `[iova, iova + len)` of the domain
    /// (`len` 0: all of it, global). Any context.
    pub fn iotlb(&self, v: &Vtd, iova: u64, len: usize, cause: Cause) {
        let did = u64::from(self.did.load(Relaxed));
        // Granularity 1 global, 2 domain, 3 page (address, AM).
        let (g, addr, am) = if len == 0 {
            (1u64, 0, 0)
        } else {
            match psi_block(iova, len) {
                Some((a, m)) if self.psi.load(Relaxed) && m <= self.mamv.load(Relaxed) => (3, a, m),
                _ => (2, 0, 0),
            }
        };
        let drain = self.drain.load(Relaxed);
        self.with_busy(|| {
            let t0 = x86::rdtsc();
            if self.is_queued() {
                // Type 2; DR (bit 7), DW (bit 6); DID in 31:16.
                let lo = 2 | (g << 4) | (if drain { 3 << 6 } else { 0 }) | (did << 16);
                self.submit(v, &[[lo, addr | u64::from(am)]]);
                self.account(true, t0);
            } else {
                let r = self.iva.load(Relaxed);
                if g == 3 {
                    v.w64(r, addr | u64::from(am));
                }
                // IVT, IIRG, DR (49), DW (48), DID in 47:32.
                let cmd = (1 << 63) | (g << 60) | (if drain { 3 << 48 } else { 0 }) | (did << 32);
                v.w64(r + 8, cmd);
                while v.r64(r + 8) & (1 << 63) != 0 {
                    core::hint::spin_loop();
                }
                self.account(false, t0);
            }
        });
        let s = &self.stats;
        match g {
            3 => &s.page,
            2 => &s.domain,
            _ => &s.global,
        }
        .fetch_add(1, Relaxed);
        match cause {
            Cause::Map => &s.iotlb_map,
            Cause::Unmap => &s.iotlb_unmap,
            Cause::Other => &s.iotlb_other,
        }
        .fetch_add(1, Relaxed);
    }

    fn account(&self, queued: bool, t0: u64) {
        let dt = x86::rdtsc().wrapping_sub(t0);
        if queued {
            self.stats.queued.fetch_add(1, Relaxed);
            self.stats.queued_cycles.fetch_add(dt, Relaxed);
        } else {
            self.stats.register.fetch_add(1, Relaxed);
            self.stats.register_cycles.fetch_add(dt, Relaxed);
        }
    }
}

/// The naturally aligned block of 2^AM pages that covers `[iova, iova +
/// len)`: its address and AM (`None` for an empty range).
fn psi_block(iova: u64, len: usize) -> Option<(u64, u8)> {
    if len == 0 {
        return None;
    }
    let (first, last) = (iova >> 12, (iova + len as u64 - 1) >> 12);
    let mut am = 0u8;
    while first >> am != last >> am {
        am += 1;
    }
    Some(((first >> am) << am << 12, am))
}
