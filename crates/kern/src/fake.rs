//! A fake single-CPU machine for `kern`'s own unit tests (hubris's
//! `arch/fake.rs`): small, deterministic, and runnable under Miri.
//!
//! [`Machine::boot`] boots a real [`Kernel`](crate::Kernel) on a fake
//! [`Md`]: one CPU, which *is* the test's host thread (the
//! `dvma_md_curcpu` of the test build returns it on that thread only), so
//! `spl`, spin mutexes, softints, callouts and interrupt dispatch run the
//! kernel's own code. What the fake machine provides instead of Linux:
//!
//! * **no signals**: [`Md::kick`] only records that the CPU was interrupted
//!   at a level; the test delivers the interrupt with [`Machine::deliver`],
//!   which enters [`crate::intr::trap`] as the signal handler would. An
//!   interrupt the IPL blocks stays pending and `splx` replays it, as in
//!   the `lazy` spl.
//! * **a fake clock**: [`Md::nanotime`] is a counter the test moves
//!   ([`Machine::advance`]); [`Machine::tick`] is one clock interrupt
//!   (callouts).
//! * **a fake IOMMU** ([`FakeIommu`]): a page table in a `BTreeMap` that
//!   logs every `enter` and `remove`, so a test can assert what a device
//!   could reach, and translates a device's accesses with their rights.
//! * **RAM**: one zeroed, page-aligned host allocation as the direct map.
//! * **a fake disk controller** ([`FakeDisk`]): a `Vec<u8>` behind the
//!   [`DiskController`] interface, which DMAs through the fake IOMMU and
//!   completes commands only when the test says so, in the order it
//!   chooses, so tests can interleave submissions and completions.
//! * **kernel threads, natively** ([`threads`]): each context is a host
//!   thread and `cpu_switchto` passes a baton, so exactly one runs at a
//!   time. [`Machine::run`] runs a test body in a kernel thread with the
//!   test's thread as the idle loop, where the fake disks complete their
//!   commands and the clock ticks. Not under Miri (module docs there);
//!   the other tests run the test thread as host context of CPU 0, and
//!   the threads they create (the softint daemon at boot) never run.
//!
//! One kernel exists at a time per process, so a [`Machine`] holds a
//! process-wide lock: tests that boot one run one after the other. Dropping
//! it shuts the kernel down and tears it down. Drivers leak their per-boot
//! objects by design (a tag, a unit, its completer live as long as the
//! boot); before the teardown the machine tells Miri that those reachable
//! from the kernel's tag registry and block device switch are such
//! intentional leaks ([`keep`]), so Miri's leak check still catches
//! anything else.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::cell::Cell;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Mutex, MutexGuard};

use crate::cpu::Cpu;
use crate::dev::{DiskCmd, DiskController, DiskDone, DiskGeometry, DiskOp, DiskStatus};
use crate::intr::{IntrHandle, TrapFrame};
use crate::iommu::{DmaAccess, IOPAGE, Iommu, IommuError, Iova};
use crate::ipl::Ipl;
use crate::kernel::{Kernel, KernelConfig, SplImpl};
use crate::md::{Kick, Md, StackMem};
use crate::vm::Paddr;

std::thread_local! {
    /// The CPU this host thread is (CPU 0 on the booting test's thread).
    static CURCPU: Cell<*const Cpu> = const { Cell::new(core::ptr::null()) };
}

/// The current CPU of the test build's `dvma_md_curcpu`: CPU 0 on the
/// thread of a booted [`Machine`], null on every other host thread.
pub(crate) fn curcpu() -> *const Cpu {
    CURCPU.try_with(|c| c.get()).unwrap_or(core::ptr::null())
}

/// Bytes of fake RAM.
pub(crate) const RAM_BYTES: usize = 1 << 20;
/// Bytes of I/O virtual address space.
pub(crate) const IOVA_BYTES: u64 = 4 << 20;

// ---- the machine -----------------------------------------------------------

/// The fake machine's MD state (one per process; reset at every boot).
struct FakeMd {
    /// Nanoseconds since boot.
    now: AtomicU64,
    /// Hardware levels at which the CPU was "interrupted" (kicked) and not
    /// yet delivered: bit = `Ipl as u8`.
    signals: AtomicU64,
    /// Kicks of either kind (interrupts and wake-ups).
    kicks: AtomicU64,
    /// The direct map: (kernel address, size).
    ram: AtomicUsize,
    /// Stacks handed out (never run on: nothing switches to them).
    stacks: AtomicUsize,
}

static MD: FakeMd = FakeMd {
    now: AtomicU64::new(0),
    signals: AtomicU64::new(0),
    kicks: AtomicU64::new(0),
    ram: AtomicUsize::new(0),
    stacks: AtomicUsize::new(0),
};

impl Md for FakeMd {
    fn kick(&self, cpu: usize, how: Kick) {
        assert_eq!(cpu, 0, "fake machine: one CPU");
        self.kicks.fetch_add(1, Relaxed);
        if let Kick::Interrupt(l) = how {
            self.signals.fetch_or(1 << l as u8, AcqRel);
        }
    }
    fn nanotime(&self) -> u64 {
        self.now.load(Acquire)
    }
    fn hw_mask(&self, _level: Ipl) {
        panic!("fake machine: only the lazy spl")
    }
    fn idle_wait(&self, _cpu: usize, _word: &core::sync::atomic::AtomicU32, _expect: u32) {
        // A spurious wake-up: the idle loop polls again (`threads`).
    }
    fn physmem(&self) -> (usize, u64) {
        (self.ram.load(Acquire), RAM_BYTES as u64)
    }
    fn iommu(&self) -> &'static dyn Iommu {
        &IOMMU
    }
    fn host_wake(&self, _word: &core::sync::atomic::AtomicU32) {}
    fn stack_alloc(&self, size: usize) -> Option<StackMem> {
        // Addresses only: no thread ever runs on a fake stack.
        let n = self.stacks.fetch_add(1, Relaxed) + 1;
        let base = n * (size + IOPAGE) * 2;
        Some(StackMem {
            limit: base - size - IOPAGE,
            base,
        })
    }
    fn thread_init(&self, _stack: StackMem, entry: extern "C" fn(usize) -> !, arg: usize) -> usize {
        threads::init(entry, arg)
    }
    fn run_thread(&self, body: &mut dyn FnMut()) {
        // A failed assertion in a kernel thread must not unwind into
        // `thread_start` (an `extern "C"` frame): keep it for `run`.
        let r = std::panic::catch_unwind(core::panic::AssertUnwindSafe(body));
        if let Err(p) = r {
            threads::failed(p);
        }
    }
    fn idle_poll(&self, _cpu: usize) {
        threads::idle_poll();
    }
    unsafe fn stack_free(&self, _mem: StackMem) {}
}

/// The interrupted context of a fake trap: thread code of the test (host
/// context of CPU 0), never another trap.
struct FakeFrame {
    level: Ipl,
}

impl TrapFrame for FakeFrame {
    fn signal_level(&self) -> Ipl {
        self.level
    }
    fn sp(&self) -> usize {
        0
    }
    fn interrupted_trap(&self) -> bool {
        false
    }
    fn push_upcall(&mut self) {
        panic!("fake machine: no AST upcall (no kernel thread runs)")
    }
}

/// One kernel per process: the tests that boot one take turns.
static BOOTED: Mutex<()> = Mutex::new(());

/// A booted fake machine (module docs). Dropping it tears the kernel down.
pub(crate) struct Machine {
    k: &'static Kernel,
    ram: *mut u8,
    /// This test's turn with the machine (`None` once [`Machine::take_turn`]
    /// has taken it).
    turn: Option<MutexGuard<'static, ()>>,
}

fn ram_layout() -> core::alloc::Layout {
    core::alloc::Layout::from_size_align(RAM_BYTES, IOPAGE).expect("fake RAM layout")
}

impl Machine {
    /// Boot the fake machine's kernel with a small configuration.
    pub(crate) fn boot() -> Machine {
        Self::boot_with(KernelConfig {
            ncpu: 1,
            spl: SplImpl::Lazy,
            max_threads: 16,
            stack_size: 16 * 1024,
            kmem_bytes: 64 * 1024,
            ..KernelConfig::default()
        })
    }

    /// Boot with `cfg` (one CPU, lazy spl).
    pub(crate) fn boot_with(cfg: KernelConfig) -> Machine {
        assert!(cfg.ncpu == 1 && cfg.spl == SplImpl::Lazy);
        let turn = BOOTED.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a non-zero size.
        let ram = unsafe { std::alloc::alloc_zeroed(ram_layout()) };
        assert!(!ram.is_null());
        MD.now.store(0, Release);
        MD.signals.store(0, Release);
        MD.kicks.store(0, Release);
        MD.ram.store(ram.expose_provenance(), Release);
        IOMMU.reset();
        threads::reset();
        let k = crate::kernel::boot(&MD, cfg).expect("fake machine: boot");
        CURCPU.with(|c| c.set(k.cpu(0)));
        Machine {
            k,
            ram,
            turn: Some(turn),
        }
    }

    /// Take this test's turn out of the machine, to hold it past the
    /// machine's drop: no other test boots until the guard is dropped (to
    /// look at what the teardown left). Let the machine go out of scope
    /// rather than `drop(m)`: passed by value, its kernel reference would
    /// be protected while the teardown frees the kernel (Miri).
    pub(crate) fn take_turn(&mut self) -> MutexGuard<'static, ()> {
        self.turn.take().expect("the turn")
    }

    /// The kernel.
    pub(crate) fn kernel(&self) -> &'static Kernel {
        self.k
    }

    /// The CPU (the test thread).
    pub(crate) fn cpu(&self) -> &'static Cpu {
        self.k.cpu(0)
    }

    /// The fake clock, ns.
    pub(crate) fn now(&self) -> u64 {
        MD.now.load(Acquire)
    }

    /// Move the clock forward.
    pub(crate) fn advance(&self, ns: u64) {
        MD.now.fetch_add(ns, AcqRel);
    }

    /// One clock tick: advance the clock by `ns`, post the clock interrupt
    /// and deliver it (hardclock, then softclock runs the due callouts).
    pub(crate) fn tick(&self, ns: u64) {
        self.advance(ns);
        crate::intr::intr_post(0, self.k.clock_vector());
        self.deliver();
    }

    /// Interrupts the CPU was kicked for and has not taken.
    pub(crate) fn signals_pending(&self) -> bool {
        MD.signals.load(Acquire) != 0
    }

    /// Kicks so far (interrupts and wake-ups).
    pub(crate) fn kicks(&self) -> u64 {
        MD.kicks.load(Acquire)
    }

    /// Take every interrupt the CPU was kicked for, highest level first,
    /// through `trap`, as the machine's signal handler would. Returns the
    /// number of traps. What the IPL blocks stays pending for `splx`.
    pub(crate) fn deliver(&self) -> usize {
        let mut n = 0;
        loop {
            let sig = MD.signals.swap(0, AcqRel);
            if sig == 0 {
                return n;
            }
            let mut s = sig;
            while s != 0 {
                let l = 63 - s.leading_zeros();
                s &= !(1 << l);
                let level = Ipl::from_u8(l as u8).expect("a level");
                crate::intr::trap(&mut FakeFrame { level });
                n += 1;
            }
        }
    }

    /// One trap at `level`, now, whether or not the CPU was kicked for
    /// it; what [`crate::intr::trap`] returns.
    pub(crate) fn trap(&self, level: Ipl) -> bool {
        MD.signals.fetch_and(!(1 << level as u8), AcqRel);
        crate::intr::trap(&mut FakeFrame { level })
    }

    /// The fake IOMMU.
    pub(crate) fn iommu(&self) -> &'static FakeIommu {
        &IOMMU
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Objects drivers leak for the boot, reachable from here (module
        // docs), are not Miri leaks.
        for t in crate::bus_dma::tags() {
            keep_ref(t);
        }
        for d in crate::bio::bdevs() {
            keep_ref(d as *const dyn crate::bio::BlockDev as *const u8);
        }
        crate::kernel::shutdown();
        CURCPU.with(|c| c.set(core::ptr::null()));
        // SAFETY: the CPU never ran `cpu_run` (nothing to wait for), the
        // fake devices post only when a test completes a command, and no
        // reference from `kernel()` outlives the machine.
        unsafe { crate::kernel::teardown() };
        MD.ram.store(0, Release);
        // SAFETY: allocated in `boot_with` with this layout; the kernel,
        // which held the only other pointers into it, is gone.
        unsafe { std::alloc::dealloc(self.ram, ram_layout()) };
    }
}

/// Tell Miri that the allocation of `p` is leaked on purpose (it lives for
/// the rest of the process, reachable or not). Nothing outside Miri.
pub(crate) fn keep_ref<T: ?Sized>(p: *const T) {
    #[cfg(miri)]
    {
        unsafe extern "Rust" {
            fn miri_static_root(ptr: *const u8);
        }
        // SAFETY: Miri's hook, given the start of a live allocation.
        unsafe { miri_static_root(p as *const u8) };
    }
    #[cfg(not(miri))]
    let _ = p;
}

/// Leak `v` for the rest of the process (a device a driver keeps for the
/// boot), as an intentional leak ([`keep_ref`]).
pub(crate) fn keep<T>(v: T) -> &'static T {
    let r: &'static T = Box::leak(Box::new(v));
    keep_ref(r);
    r
}

/// The bytes of RAM at physical address `pa` (the device side of DMA).
fn ram_ptr(pa: u64, len: usize) -> *mut u8 {
    assert!(
        pa + len as u64 <= RAM_BYTES as u64,
        "fake RAM: {pa:#x}+{len:#x}"
    );
    core::ptr::with_exposed_provenance_mut::<u8>(MD.ram.load(Acquire) + pa as usize)
}

// ---- the IOMMU ----------------------------------------------------------

/// What the fake IOMMU was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IommuOp {
    /// `enter(iova, pa, len, access)`.
    Enter(Iova, Paddr, usize, DmaAccess),
    /// `remove(iova, len)`.
    Remove(Iova, usize),
}

/// A page table from IOVA pages to physical pages with access rights, and
/// the log of every change.
pub(crate) struct FakeIommu {
    st: Mutex<IommuState>,
}

struct IommuState {
    ptes: BTreeMap<u64, (u64, DmaAccess)>,
    log: Vec<IommuOp>,
}

static IOMMU: FakeIommu = FakeIommu {
    st: Mutex::new(IommuState {
        ptes: BTreeMap::new(),
        log: Vec::new(),
    }),
};

impl FakeIommu {
    fn lock(&self) -> MutexGuard<'_, IommuState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reset(&self) {
        let mut s = self.lock();
        s.ptes.clear();
        s.log = Vec::new();
    }

    /// Every enter and remove since boot, in order.
    pub(crate) fn log(&self) -> Vec<IommuOp> {
        self.lock().log.clone()
    }

    /// Forget the log (keep the page table).
    pub(crate) fn clear_log(&self) {
        self.lock().log.clear();
    }

    /// Is IOVA page `iova` mapped now (with which rights)?
    pub(crate) fn lookup(&self, iova: Iova) -> Option<(Paddr, DmaAccess)> {
        let s = self.lock();
        let page = iova.get() / IOPAGE as u64;
        s.ptes
            .get(&page)
            .map(|&(pa, a)| (Paddr(pa * IOPAGE as u64 + iova.get() % IOPAGE as u64), a))
    }

    /// IOVA pages mapped now.
    pub(crate) fn mapped_pages(&self) -> usize {
        self.lock().ptes.len()
    }

    /// Translate a device access of `len` bytes at `iova` into physical
    /// pieces, or `None` if a page is unmapped or lacks the right (`write`:
    /// the device writes memory).
    pub(crate) fn translate(
        &self,
        iova: Iova,
        len: usize,
        write: bool,
    ) -> Option<Vec<(u64, usize)>> {
        let s = self.lock();
        let mut out = Vec::new();
        let (mut a, end) = (iova.get(), iova.get() + len as u64);
        while a < end {
            let page = a / IOPAGE as u64;
            let off = a % IOPAGE as u64;
            let n = (IOPAGE as u64 - off).min(end - a);
            let &(pa, acc) = s.ptes.get(&page)?;
            let ok = match acc {
                DmaAccess::ReadWrite => true,
                DmaAccess::Read => !write,
                DmaAccess::Write => write,
            };
            if !ok {
                return None;
            }
            out.push((pa * IOPAGE as u64 + off, n as usize));
            a += n;
        }
        Some(out)
    }
}

impl Iommu for FakeIommu {
    fn size(&self) -> u64 {
        IOVA_BYTES
    }

    fn enter(
        &self,
        iova: Iova,
        pa: Paddr,
        len: usize,
        access: DmaAccess,
    ) -> Result<(), IommuError> {
        assert!(iova.get().is_multiple_of(IOPAGE as u64) && pa.get().is_multiple_of(IOPAGE as u64));
        IommuError::check(iova, len, IOVA_BYTES)?;
        if pa.get() + len as u64 > RAM_BYTES as u64 {
            return Err(IommuError::OutOfRange { iova, len });
        }
        let mut s = self.lock();
        for i in 0..len.div_ceil(IOPAGE) as u64 {
            s.ptes.insert(
                iova.get() / IOPAGE as u64 + i,
                (pa.get() / IOPAGE as u64 + i, access),
            );
        }
        s.log.push(IommuOp::Enter(iova, pa, len, access));
        Ok(())
    }

    fn remove(&self, iova: Iova, len: usize) {
        let mut s = self.lock();
        for i in 0..len.div_ceil(IOPAGE) as u64 {
            s.ptes.remove(&(iova.get() / IOPAGE as u64 + i));
        }
        s.log.push(IommuOp::Remove(iova, len));
    }
}

// ---- the disk controller -------------------------------------------------

/// A DMA disk controller over a `Vec<u8>` (module docs). Commands wait on
/// the device side until the test completes them.
pub(crate) struct FakeDisk {
    geom: DiskGeometry,
    st: Mutex<DiskState>,
}

struct DiskState {
    media: Vec<u8>,
    /// Submitted, doorbell not rung yet.
    sq: VecDeque<DiskCmd>,
    /// Seen by the device (doorbell rung), not completed.
    active: VecDeque<DiskCmd>,
    cq: VecDeque<DiskDone>,
    intr: Option<(usize, IntrHandle)>,
    /// Every command the device started, in order.
    started: Vec<DiskCmd>,
    /// Added to the IOVA of the next command's DMA (a stray descriptor).
    skew: u64,
    doorbells: usize,
}

impl FakeDisk {
    /// A disk of `sectors` 512-byte sectors, queue depth `depth`, transfers
    /// up to `max_transfer` bytes.
    pub(crate) fn new(sectors: u64, depth: u16, max_transfer: usize) -> FakeDisk {
        FakeDisk {
            geom: DiskGeometry {
                sectors,
                sector_size: crate::bio::DEV_BSIZE as u32,
                max_transfer,
                queue_depth: depth,
            },
            st: Mutex::new(DiskState {
                media: alloc::vec![0; sectors as usize * crate::bio::DEV_BSIZE],
                sq: VecDeque::new(),
                active: VecDeque::new(),
                cq: VecDeque::new(),
                intr: None,
                started: Vec::new(),
                skew: 0,
                doorbells: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commands the device has seen and not completed, oldest first.
    pub(crate) fn active(&self) -> Vec<DiskCmd> {
        self.lock().active.iter().copied().collect()
    }

    /// Every command the device has seen, in order.
    pub(crate) fn started(&self) -> Vec<DiskCmd> {
        self.lock().started.clone()
    }

    /// Doorbells rung.
    pub(crate) fn doorbells(&self) -> usize {
        self.lock().doorbells
    }

    /// The media (a copy).
    pub(crate) fn media(&self, off: usize, len: usize) -> Vec<u8> {
        self.lock().media[off..off + len].to_vec()
    }

    /// Write the media directly.
    pub(crate) fn set_media(&self, off: usize, bytes: &[u8]) {
        self.lock().media[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// The next command the device runs DMAs `skew` bytes past its IOVA
    /// (a corrupted descriptor): a DMA fault unless that is mapped too.
    pub(crate) fn skew_next(&self, skew: u64) {
        self.lock().skew = skew;
    }

    /// Run the `i`th active command (its DMA through the IOMMU), queue its
    /// completion and post the interrupt. Does not deliver it.
    pub(crate) fn complete(&self, i: usize) -> DiskDone {
        let mut st = self.lock();
        let cmd = st
            .active
            .remove(i)
            .expect("fake disk: no such active command");
        let skew = core::mem::take(&mut st.skew);
        let status = Self::run(&mut st.media, cmd, skew);
        let done = DiskDone { id: cmd.id, status };
        st.cq.push_back(done);
        let intr = st.intr;
        drop(st);
        if let Some((cpu, v)) = intr {
            crate::intr::intr_post(cpu, v);
        }
        done
    }

    /// Complete every active command, oldest first.
    pub(crate) fn complete_all(&self) -> Vec<DiskDone> {
        let mut v = Vec::new();
        while !self.lock().active.is_empty() {
            v.push(self.complete(0));
        }
        v
    }

    fn run(media: &mut [u8], cmd: DiskCmd, skew: u64) -> DiskStatus {
        let bs = crate::bio::DEV_BSIZE;
        let (off, len) = (cmd.lba as usize * bs, cmd.nsect as usize * bs);
        match cmd.op {
            DiskOp::Flush => return DiskStatus::Ok,
            _ if off + len > media.len() => return DiskStatus::Invalid,
            _ => {}
        }
        let write_mem = cmd.op == DiskOp::Read;
        let Some(pieces) = IOMMU.translate(cmd.iova + skew, len, write_mem) else {
            return DiskStatus::DmaFault;
        };
        let mut at = off;
        for (pa, n) in pieces {
            let p = ram_ptr(pa, n);
            // SAFETY: `p` is `n` bytes of fake RAM, which the driver has
            // handed to the device (a loaded map: the kernel holds no
            // reference into it meanwhile); `media` is ours.
            unsafe {
                if write_mem {
                    core::ptr::copy_nonoverlapping(media[at..at + n].as_ptr(), p, n);
                } else {
                    core::ptr::copy_nonoverlapping(p, media[at..at + n].as_mut_ptr(), n);
                }
            }
            at += n;
        }
        DiskStatus::Ok
    }
}

impl DiskController for FakeDisk {
    fn geometry(&self) -> DiskGeometry {
        self.geom
    }
    fn submit(&self, cmd: DiskCmd) -> bool {
        let mut st = self.lock();
        if st.sq.len() + st.active.len() >= self.geom.queue_depth as usize {
            return false;
        }
        st.sq.push_back(cmd);
        true
    }
    fn doorbell(&self) {
        let mut st = self.lock();
        st.doorbells += 1;
        while let Some(c) = st.sq.pop_front() {
            st.started.push(c);
            st.active.push_back(c);
        }
    }
    fn reap(&self) -> Option<DiskDone> {
        self.lock().cq.pop_front()
    }
    fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        self.lock().intr = Some((cpu, vector));
    }
}

// ---- kernel threads ------------------------------------------------------

/// Kernel threads on the fake machine: each context (a kernel thread, or
/// the idle context, which is the test's own thread) is a host thread, and
/// exactly one of them runs at a time: `cpu_switchto` passes a baton.
/// [`Machine::run`] runs a test body in a kernel thread, with the test's
/// thread as the CPU's idle loop; while the CPU idles, the fake disks given
/// to [`Machine::devices_act_when_idle`] complete their commands and the
/// fake clock ticks. Every thread asleep with nothing left to complete or
/// tick for ten fake seconds is a deadlock (a lost wake-up): the kernel is
/// shut down and `run` reports it.
///
/// Not under Miri: a thread that exits switches away for good and leaves
/// its host thread parked until the process ends, which Miri reports; and
/// its frames that never return (`sched::thread_exit` and `switch`) hold
/// reference arguments to the `Kernel`, its `Cpu` and its `Thread`, which
/// Miri's borrow models protect for as long as the call lasts, so
/// `kernel::teardown` freeing the kernel after a thread has exited is
/// reported as undefined behaviour (the abandoned-stack pattern of every
/// kernel that reaps exited threads' stacks; raw pointers on that path
/// would avoid it).
pub(crate) mod threads {
    use super::*;
    use core::sync::atomic::AtomicBool;
    use std::sync::Condvar;

    type Entry = extern "C" fn(usize) -> !;

    struct Baton {
        running: usize,
        /// Contexts made by `thread_init` and not started yet.
        fresh: BTreeMap<usize, (Entry, usize)>,
    }

    static BATON: Mutex<Baton> = Mutex::new(Baton {
        running: 0,
        fresh: BTreeMap::new(),
    });
    static CV: Condvar = Condvar::new();
    /// Context ids, never reused (a parked host thread keeps its id).
    static NEXT: AtomicUsize = AtomicUsize::new(1);

    std::thread_local! {
        static ME: Cell<usize> = const { Cell::new(0) };
    }

    fn baton() -> MutexGuard<'static, Baton> {
        BATON.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_for(mut g: MutexGuard<'static, Baton>, me: usize) {
        while g.running != me {
            g = CV.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(super) fn init(entry: Entry, arg: usize) -> usize {
        let id = NEXT.fetch_add(1, Relaxed);
        baton().fresh.insert(id, (entry, arg));
        id
    }

    /// The test build's `dvma_md_switch`.
    pub(crate) fn switch(from: *mut usize, to: usize) {
        let me = match ME.with(|m| m.get()) {
            0 => {
                let id = NEXT.fetch_add(1, Relaxed);
                ME.with(|m| m.set(id));
                id
            }
            id => id,
        };
        // SAFETY: `from` is the saved-context word of the running context
        // (md.rs, `dvma_md_switch`), which only the running context touches.
        unsafe { *from = me };
        let cpu = super::curcpu() as usize;
        let mut g = baton();
        g.running = to;
        if let Some((entry, arg)) = g.fresh.remove(&to) {
            std::thread::Builder::new()
                .name(alloc::format!("kthread{to}"))
                .spawn(move || {
                    CURCPU.with(|c| c.set(cpu as *const Cpu));
                    ME.with(|m| m.set(to));
                    wait_for(baton(), to);
                    entry(arg)
                })
                .expect("fake machine: a host thread for a kernel thread");
        }
        CV.notify_all();
        wait_for(g, me);
    }

    /// The disks that complete commands while the CPU idles.
    pub(super) static DEVICES: Mutex<Vec<&'static FakeDisk>> = Mutex::new(Vec::new());
    pub(super) static PANIC: Mutex<Option<Box<dyn core::any::Any + Send>>> = Mutex::new(None);
    pub(super) static DEADLOCK: AtomicBool = AtomicBool::new(false);
    /// Idle polls since the last switch, and the switch count then.
    static IDLE: Mutex<(u64, u64)> = Mutex::new((0, 0));

    pub(super) fn reset() {
        DEVICES.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = None;
        DEADLOCK.store(false, Release);
        *IDLE.lock().unwrap_or_else(|e| e.into_inner()) = (0, 0);
    }

    pub(super) fn failed(p: Box<dyn core::any::Any + Send>) {
        PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(p);
        crate::kernel::shutdown();
    }

    /// The idle loop's poll: devices act, else time passes, else (after
    /// ten fake seconds without a switch) a deadlock.
    pub(super) fn idle_poll() {
        let Some(k) = crate::kernel::try_kernel() else {
            return;
        };
        // Posted while threads ran (the signal a real CPU would have
        // taken): the idle loop dispatches what is pending itself.
        MD.signals.store(0, Release);
        let devs = DEVICES.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut acted = false;
        for d in devs {
            acted |= !d.complete_all().is_empty();
        }
        let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        let switches = k.cpu(0).stats.switches.get();
        if acted || idle.1 != switches {
            *idle = (0, switches);
            return;
        }
        if k.is_shutting_down() {
            return;
        }
        idle.0 += 1;
        drop(idle);
        MD.now.fetch_add(1_000_000, AcqRel);
        crate::intr::intr_post(0, k.clock_vector());
        if IDLE.lock().unwrap_or_else(|e| e.into_inner()).0 > 10_000 {
            DEADLOCK.store(true, Release);
            crate::kernel::shutdown();
        }
    }
}

impl Machine {
    /// While the CPU idles in [`Machine::run`], `disk` completes every
    /// command it has (and interrupts).
    pub(crate) fn devices_act_when_idle(&self, disk: &'static FakeDisk) {
        threads::DEVICES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(disk);
    }

    /// Run `body` in a kernel thread on CPU 0, the test's thread being the
    /// CPU's idle loop, until every kernel thread has exited; then the
    /// kernel is shut down (one `run` per boot). A panic in any kernel
    /// thread is raised here; `Err` if every thread fell asleep for good.
    pub(crate) fn run(
        &self,
        body: impl FnOnce(&crate::ctx::ThreadCtx) + Send + 'static,
    ) -> Result<(), &'static str> {
        crate::sched::kthread_create(Some(0), "test", move |ctx| {
            body(ctx);
            crate::kernel::shutdown();
        })
        .expect("the test thread");
        crate::sched::cpu_run();
        if let Some(p) = threads::PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            std::panic::resume_unwind(p);
        }
        if threads::DEADLOCK.load(Acquire) {
            return Err("every kernel thread asleep for ten fake seconds");
        }
        Ok(())
    }
}
