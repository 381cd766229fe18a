//! The block layer: `struct buf`, buffer queues, `biodone`, `biowait`, and
//! the block device switch.
//!
//! | call | context | |
//! |---|---|---|
//! | [`getbuf_wait`], [`getbuf`] | thread / any | a [`Buf`] from the IPL_BIO buffer pool |
//! | [`BlockDev::strategy`] | any | start an I/O; the device owns the buf until `biodone` |
//! | [`biodone`] | any (completion context) | give the buf back: to its `iodone` callback, or to `biowait` |
//! | [`biowait`], [`submit_wait`] | thread | sleep until the buf is done, and take it back |
//!
//! Ownership is in the types: a [`BufBox`] owns a buf, `strategy` takes it
//! by value, `biodone` consumes it. A caller that will `biowait` keeps only a
//! [`BufWait`] ticket; a caller with an `iodone` callback gets the buf back
//! in the callback, in whatever context the device completed it (interrupt,
//! soft interrupt or thread, per the driver's completion mode), under the
//! rules of that context.
//!
//! Bufs come from an allocator: the IPL_BIO pool by default, or `kmem` (the
//! 1995 configuration of ccd's component bufs, for `dvma race`-style
//! experiments).

use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering::*};

use crate::ctx::ThreadCtx;
use crate::ipl::Ipl;
use crate::lock::SpinMutex;
use crate::once::Once;
use crate::pool::Pool;
use crate::sched::{Interrupted, sleep_interlocked, wakeup};
use crate::statclock::{self, Part};
use crate::vm::{IoBuf, LentIoBuf};

/// The block layer's sector size (DEV_BSIZE).
pub const DEV_BSIZE: usize = 512;

/// What a buf asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BufOp {
    /// Device to memory.
    #[default]
    Read,
    /// Memory to device.
    Write,
    /// Make completed writes durable.
    Flush,
}

/// Errors the block layer reports on a buf (errno semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BioError {
    /// EIO: the device failed (a media error or a DMA fault).
    Io,
    /// EINVAL: misaligned, or past the end.
    Inval,
    /// ENOSPC: a write past the end.
    NoSpc,
    /// EPERM / EROFS: a write to a read-only device.
    Perm,
    /// ESHUTDOWN: the system is going down.
    Shutdown,
}

impl BioError {
    /// Every error, in declaration order (`e as usize` indexes it).
    const ALL: [BioError; 5] = [
        BioError::Io,
        BioError::Inval,
        BioError::NoSpc,
        BioError::Perm,
        BioError::Shutdown,
    ];

    /// What a device's media error `errno` (a host errno) means to the
    /// block layer: no space left (`ENOSPC`, `EDQUOT`: a backing file on a
    /// full filesystem) is `NoSpc`, everything else `Io`.
    pub const fn from_media(errno: i32) -> BioError {
        match errno {
            28 | 122 => BioError::NoSpc,
            _ => BioError::Io,
        }
    }

    /// The errno value.
    pub const fn errno(self) -> i32 {
        match self {
            BioError::Io => 5,
            BioError::Inval => 22,
            BioError::NoSpc => 28,
            BioError::Perm => 1,
            BioError::Shutdown => 108,
        }
    }
}

impl core::error::Error for BioError {}

impl core::fmt::Display for BioError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            BioError::Io => "I/O error",
            BioError::Inval => "invalid argument",
            BioError::NoSpc => "no space left on device",
            BioError::Perm => "operation not permitted (read-only)",
            BioError::Shutdown => "shut down",
        })
    }
}

/// What `biodone` does with a buf instead of waking `biowait` (B_CALL).
pub enum IoDone {
    /// Call a function with the buf and an argument, in the completion
    /// context of the device.
    Call(fn(BufBox, usize), usize),
    /// The buf is a stacking driver's component buf: hand it to the driver.
    Child(ChildLink),
}

impl core::fmt::Debug for IoDone {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IoDone::Call(_, arg) => write!(f, "Call({arg})"),
            IoDone::Child(l) => write!(f, "Child({}, comp {})", l.driver.name(), l.comp),
        }
    }
}

/// A stacking driver: a block device whose I/Os are carried out by
/// component bufs on other devices (ccd).
pub trait StackedDev: BlockDev {
    /// Component buf `child` is done; `link` is what the driver put in it.
    /// Runs in the component's completion context.
    fn child_done(&self, child: BufBox, link: ChildLink);
}

/// The typed back-pointers of a component buf: NetBSD's `struct ccdbuf`
/// (`cb_obp`, `cb_sc`, `cb_comp`) without the casts.
pub struct ChildLink {
    /// The parent buf (`cb_obp`).
    pub parent: ParentRef,
    /// The driver that issued the component buf (`cb_sc`).
    pub driver: &'static dyn StackedDev,
    /// The component it went to (`cb_comp`).
    pub comp: usize,
}

/// A parent buf split into component bufs, parked while they are in
/// flight: made by [`BufBox::park`], which fixes the number of children;
/// hands out one [`ParentRef`] per child.
pub struct Parked {
    /// The parent, shared with every `ParentRef` it hands out.
    parent: ParentRef,
    unissued: u32,
}

/// One child's share of a parked parent. Not `Clone`: each is released
/// once, and the last release gives the parent back.
pub struct ParentRef(NonNull<Buf>);

// SAFETY: a ParentRef only touches the parent's atomics (`children`,
// `child_error`, `lent`'s count) until the last one takes the whole buf
// back, which is then owned by that one thread; Buf itself is Send. (A
// Parked is Send through the ParentRef it holds: it only hands out more.)
unsafe impl Send for ParentRef {}

impl Parked {
    /// The next child's share of the parent; `None` once every child the
    /// parent was parked for has one.
    pub fn child(&mut self) -> Option<ParentRef> {
        self.unissued = self.unissued.checked_sub(1)?;
        Some(ParentRef(self.parent.0))
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        // Shares not handed out would keep the parent parked for ever: a
        // leak, never a double owner. Callers hand out all of them.
        debug_assert_eq!(self.unissued, 0, "bio: a parked parent lost children");
    }
}

impl ParentRef {
    /// This child is done, with `error` and its `data`: give the data back
    /// to the parent if it is a view of the parent's lent data (anything
    /// else is dropped), and record the first error. The last child gets
    /// the parent back, with its error set from the children's and its data
    /// returned (if a view never came back, the data is leaked, not freed
    /// under it, and the parent fails with EIO).
    pub fn release(self, error: Option<BioError>, data: Option<IoBuf>) -> Option<BufBox> {
        // SAFETY: the parent is live while any share is outstanding (ours
        // is), and shares touch only its atomics and `lent`, which nothing
        // changes while the parent is parked.
        let p = unsafe { self.0.as_ref() };
        if let (Some(l), Some(v)) = (&p.lent, data) {
            let _ = l.give_back(v);
        }
        if let Some(e) = error {
            let _ = p
                .child_error
                .compare_exchange(0, e as u8 + 1, AcqRel, Relaxed);
        }
        if p.children.fetch_sub(1, AcqRel) != 1 {
            return None;
        }
        // SAFETY: the last share: every other child has released, so
        // ownership of the parent (given up in `park`) comes back to us.
        let mut bp = unsafe { BufBox::from_raw(self.0) };
        let e = bp.child_error.load(Acquire);
        bp.error = (e != 0).then(|| BioError::ALL[(e - 1) as usize]);
        if let Some(l) = bp.lent.take() {
            match l.into_inner() {
                Ok(d) => bp.data = Some(d),
                Err(l) => {
                    drop(l); // leaks the memory: a view is still out
                    bp.error.get_or_insert(BioError::Io);
                }
            }
        }
        Some(bp)
    }
}

/// `struct buf`.
pub struct Buf {
    /// Operation.
    pub op: BufOp,
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
    /// First sector (DEV_BSIZE units, device relative).
    pub blkno: u64,
    /// Bytes.
    pub bcount: usize,
    /// The data (`bcount` bytes of it are transferred).
    pub data: Option<IoBuf>,
    /// The outcome.
    pub error: Option<BioError>,
    /// Bytes not transferred.
    pub resid: usize,
    /// Called by `biodone` instead of waking `biowait` (B_CALL).
    pub iodone: Option<IoDone>,
    /// Stacking drivers: the data, while lent out as views to the
    /// children ([`BufBox::lend_data`]).
    lent: Option<LentIoBuf>,
    /// Stacking drivers (ccd), while parked: children still in flight.
    children: AtomicU32,
    /// Stacking drivers, while parked: the first error of the children
    /// (`BioError as u8 + 1`; 0 for none).
    child_error: AtomicU8,
    state: AtomicU8,
    /// Buffer-queue link: the queue owns the next buf through this one.
    qnext: Option<BufBox>,
    alloc: &'static dyn BufAlloc,
}

const BUSY: u8 = 1;
const DONE: u8 = 2;

impl Buf {
    fn new(alloc: &'static dyn BufAlloc) -> Self {
        Self {
            op: BufOp::Read,
            fua: false,
            blkno: 0,
            bcount: 0,
            data: None,
            error: None,
            resid: 0,
            iodone: None,
            lent: None,
            children: AtomicU32::new(0),
            child_error: AtomicU8::new(0),
            state: AtomicU8::new(0),
            qnext: None,
            alloc,
        }
    }

    /// Reset for reuse, keeping the allocator.
    pub fn reset(&mut self) {
        let a = self.alloc;
        *self = Buf::new(a);
    }

    /// The device byte offset.
    pub fn offset(&self) -> u64 {
        self.blkno * DEV_BSIZE as u64
    }
}

impl core::fmt::Debug for Buf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Buf({:?} blk {} +{} fua {} err {:?})",
            self.op, self.blkno, self.bcount, self.fua, self.error
        )
    }
}

/// Where bufs come from.
pub trait BufAlloc: Sync {
    /// A fresh buf, or `None` if exhausted. Any context.
    fn alloc(&'static self) -> Option<NonNull<Buf>>;
    /// Take back a buf from `alloc` (its contents are already dropped).
    ///
    /// # Safety
    /// 1. `b` came from this allocator's `alloc` and is returned once.
    unsafe fn free(&self, b: NonNull<Buf>);
}

/// An owned buf.
pub struct BufBox {
    ptr: NonNull<Buf>,
}

// SAFETY: a BufBox is the unique owner of its Buf, and a Buf is Send (its
// fields are); moving the box to another thread moves that ownership.
unsafe impl Send for BufBox {}

impl BufBox {
    /// A buf from `a`, or `None` if exhausted. Any context.
    pub fn new_in(a: &'static dyn BufAlloc) -> Option<BufBox> {
        a.alloc().map(|ptr| BufBox { ptr })
    }

    /// Give up ownership (the buf is then reachable only through the raw
    /// pointer: a parked parent, a `biowait` ticket). Private to the block
    /// layer, as is `from_raw`: nothing outside it passes bufs by address.
    fn into_raw(self) -> NonNull<Buf> {
        let p = self.ptr;
        core::mem::forget(self);
        p
    }

    /// Take ownership back.
    ///
    /// # Safety
    /// 1. `p` came from [`BufBox::into_raw`] and is rebuilt once.
    unsafe fn from_raw(p: NonNull<Buf>) -> BufBox {
        BufBox { ptr: p }
    }

    /// Lend this buf's data out as views for component bufs (stacking
    /// drivers): the returned [`LentIoBuf`] makes them
    /// ([`LentIoBuf::view`]); the data is the buf's again when every child
    /// has given its view back through [`ParentRef::release`]. `None` if the
    /// buf has no data (or lent it already).
    pub fn lend_data(&mut self) -> Option<&mut LentIoBuf> {
        if self.lent.is_some() {
            return None;
        }
        let lent = self.data.take()?.lend();
        Some(self.lent.insert(lent))
    }

    /// Park this buf as the parent of `children` component bufs: each gets
    /// a [`ParentRef`] from the [`Parked`], and the last to
    /// [`ParentRef::release`] gets the buf back (with `error` set from the
    /// children's first error). `children` must be at least 1.
    pub fn park(self, children: u32) -> Parked {
        assert!(children > 0, "bio: a parent with no children");
        self.children.store(children, Release);
        self.child_error.store(0, Release);
        Parked {
            parent: ParentRef(self.into_raw()),
            unissued: children,
        }
    }
}

impl core::ops::Deref for BufBox {
    type Target = Buf;
    fn deref(&self) -> &Buf {
        // SAFETY: a BufBox uniquely owns a live Buf.
        unsafe { self.ptr.as_ref() }
    }
}

impl core::ops::DerefMut for BufBox {
    fn deref_mut(&mut self) -> &mut Buf {
        // SAFETY: as above, and `&mut self` is unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl Drop for BufBox {
    fn drop(&mut self) {
        let alloc = self.alloc;
        // SAFETY: we own the Buf: drop its contents (its data), then hand
        // the memory back to the allocator it came from, once.
        unsafe {
            core::ptr::drop_in_place(self.ptr.as_ptr());
            alloc.free(self.ptr);
        }
    }
}

impl core::fmt::Debug for BufBox {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        (**self).fmt(f)
    }
}

/// The IPL_BIO buffer pool.
pub struct BufPool {
    slots: Pool<core::mem::MaybeUninit<Buf>>,
}

impl BufPool {
    /// A pool of `n` bufs. Thread or host context.
    pub fn new(name: &'static str, n: usize) -> Self {
        let slots = Pool::new(name, Ipl::Bio, n, |_| core::mem::MaybeUninit::uninit());
        Self { slots }
    }

    /// Free bufs now.
    pub fn available(&self) -> usize {
        self.slots.available()
    }

    /// Its capacity.
    pub fn capacity(&self) -> usize {
        self.slots.capacity()
    }
}

impl BufAlloc for BufPool {
    fn alloc(&'static self) -> Option<NonNull<Buf>> {
        let mut it = self.slots.get_nowait()?;
        let p = it.write(Buf::new(self)) as *mut Buf;
        it.into_raw();
        NonNull::new(p)
    }

    unsafe fn free(&self, b: NonNull<Buf>) {
        // `b` came from `alloc` (contract), which gave its item up with
        // `into_raw`: find the item from the address and take it back.
        let item = self
            .slots
            .index_of(b.as_ptr().cast())
            .and_then(|i| self.slots.from_raw(i));
        debug_assert!(item.is_some(), "bio: a buf freed to the wrong pool");
        drop(item);
    }
}

/// Bufs from `kmem`: the 1995 configuration, where freeing one at
/// interrupt time races with thread code in the allocator.
pub struct KmemBufs;

impl BufAlloc for KmemBufs {
    fn alloc(&'static self) -> Option<NonNull<Buf>> {
        let k = crate::kernel::kernel();
        let p = k.kmem.alloc(core::mem::size_of::<Buf>())?;
        let b = p.as_ptr() as *mut Buf;
        debug_assert!(b.is_aligned());
        // SAFETY: kmem returned at least size_of::<Buf>() bytes, 16-byte
        // aligned, which we own.
        unsafe { b.write(Buf::new(self)) };
        NonNull::new(b)
    }

    unsafe fn free(&self, b: NonNull<Buf>) {
        crate::kernel::kernel()
            .kmem
            .free(b.cast(), core::mem::size_of::<Buf>());
    }
}

/// The kmem buf allocator.
pub static KMEM_BUFS: KmemBufs = KmemBufs;

const MAXDEV: usize = 32;

/// The block layer's per-boot state, owned by the kernel: the system
/// buffer pool and the block device switch.
pub(crate) struct BioState {
    bufs: Once<BufPool>,
    devsw: SpinMutex<[Option<&'static dyn BlockDev>; MAXDEV]>,
}

impl BioState {
    pub(crate) const fn new() -> Self {
        Self {
            bufs: Once::new(),
            devsw: SpinMutex::new(Ipl::Vm, [None; MAXDEV]),
        }
    }
}

/// The system buffer pool.
pub fn bufpool() -> &'static BufPool {
    match crate::kernel::kernel().bio.bufs.get() {
        Some(b) => b,
        None => panic!("bio: buffer pool not initialised (bio_init at attach)"),
    }
}

/// Create the system buffer pool (`n` bufs), once per boot; later calls do
/// nothing. Thread or host context, before the first block device attaches.
pub fn bio_init(n: usize) {
    let bufs = &crate::kernel::kernel().bio.bufs;
    if bufs.get().is_none() {
        let _ = bufs.set(BufPool::new("bufpl", n));
    }
}

/// A buf from the system pool, or `None`. Any context.
pub fn getbuf() -> Option<BufBox> {
    BufBox::new_in(bufpool())
}

/// A buf from the system pool, sleeping until one is free. Thread context.
pub fn getbuf_wait(ctx: &ThreadCtx) -> Result<BufBox, Interrupted> {
    loop {
        if let Some(b) = getbuf() {
            return Ok(b);
        }
        bufpool().slots.get_wait(ctx).map(drop)?;
    }
}

/// The ticket of a buf whose completion a thread will wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufWait(NonNull<Buf>);

// SAFETY: a ticket is an address; redeeming it is governed by `biowait`.
unsafe impl Send for BufWait {}

/// Locks of the biodone/biowait handshake, hashed by buf address.
static BIOLOCKS: [SpinMutex<()>; 16] = [const { SpinMutex::new(Ipl::Bio, ()) }; 16];

fn biolock(p: NonNull<Buf>) -> &'static SpinMutex<()> {
    &BIOLOCKS[(p.as_ptr() as usize >> 6) % BIOLOCKS.len()]
}

/// Prepare `bp` for a `biowait` and return the ticket. Call before
/// `strategy`.
pub fn bio_prepare(bp: &mut BufBox) -> BufWait {
    bp.iodone = None;
    bp.state.store(BUSY, Release);
    BufWait(bp.ptr)
}

/// The I/O of `bp` is done: give it to its `iodone` callback, or wake the
/// thread waiting in `biowait`. Any context.
pub fn biodone(mut bp: BufBox) {
    let _part = statclock::enter(Part::Driver);
    match bp.iodone.take() {
        Some(IoDone::Call(f, arg)) => return f(bp, arg),
        Some(IoDone::Child(link)) => return link.driver.child_done(bp, link),
        None => {}
    }
    // Publish DONE while we still own the buf, under the lock `biowait`
    // tests it under: the waiter cannot take the buf back before we have
    // given it up (below, still holding the lock).
    let g = biolock(bp.ptr).lock();
    bp.state.store(DONE, Release);
    let p = bp.into_raw();
    drop(g);
    wakeup(p.as_ptr() as usize);
}

/// Sleep until the buf of ticket `w` is done and take it back. Thread
/// context. Each ticket must be redeemed exactly once.
pub fn biowait(ctx: &ThreadCtx, w: BufWait) -> BufBox {
    let p = w.0;
    loop {
        let g = biolock(p).lock();
        // SAFETY: the buf lives until its ticket is redeemed (here): the
        // driver hands it back through `biodone`, never frees it.
        if unsafe { p.as_ref() }.state.load(Acquire) == DONE {
            drop(g);
            // SAFETY: DONE means `biodone` gave up ownership for us.
            return unsafe { BufBox::from_raw(p) };
        }
        if sleep_interlocked(ctx, p.as_ptr() as usize, g).is_err() {
            // Shutdown: keep waiting; the device finishes or fails every
            // command it accepted, so the buf comes back.
            crate::sched::yield_now(ctx);
        }
    }
}

/// Start `bp` on `dev` and wait for it. Thread context.
pub fn submit_wait(ctx: &ThreadCtx, dev: &dyn BlockDev, mut bp: BufBox) -> BufBox {
    let w = bio_prepare(&mut bp);
    dev.strategy(bp);
    biowait(ctx, w)
}

/// Validate a buf against a device: the common checks of every strategy
/// routine (a length of whole sectors, at most the device's transfer size,
/// within its sectors, not a write to a read-only device). Errors are finished with `biodone` and
/// `None` is returned; otherwise the buf comes back.
pub fn bounds_check(dev: &dyn BlockDev, mut bp: BufBox) -> Option<BufBox> {
    let sectors = dev.sectors();
    let err = match bp.op {
        BufOp::Flush => None,
        op => {
            let n = (bp.bcount / DEV_BSIZE) as u64;
            if bp.bcount == 0
                || !bp.bcount.is_multiple_of(DEV_BSIZE)
                || bp.bcount > dev.max_transfer()
            {
                Some(BioError::Inval)
            } else if op == BufOp::Write && dev.read_only() {
                Some(BioError::Perm)
            } else if bp.data.as_ref().is_none_or(|d| d.len() < bp.bcount) {
                Some(BioError::Inval)
            } else if bp.blkno.checked_add(n).is_none_or(|e| e > sectors) {
                Some(if op == BufOp::Write {
                    BioError::NoSpc
                } else {
                    BioError::Inval
                })
            } else {
                None
            }
        }
    };
    match err {
        Some(e) => {
            bp.error = Some(e);
            bp.resid = bp.bcount;
            biodone(bp);
            None
        }
        None => Some(bp),
    }
}

/// How a buffer queue orders its bufs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufqStrategy {
    /// First come, first served.
    Fcfs,
    /// One-way elevator by block number (disksort).
    Disksort,
}

/// A buffer queue (bufq(9)), linked through the bufs (no allocation).
/// Not synchronised: the driver keeps it under its own spin mutex.
///
/// The links are owning (`Buf::qnext` holds the next [`BufBox`]), so the
/// queue is two singly linked lists of owned bufs and needs no `unsafe`:
/// `out`, taken from the front, and, for first-come-first-served, `inq`,
/// where `put` pushes (newest first) and which `get` reverses onto `out`
/// when `out` runs dry (each buf is moved once: O(1) amortised, the same
/// link writes as a tail pointer). disksort keeps everything on `out`, in
/// elevator order.
pub struct BufQueue {
    strategy: BufqStrategy,
    /// Taken from the front; disksort: every buf, in elevator order.
    out: Option<BufBox>,
    /// Fcfs: put since `out` was last refilled, newest first.
    inq: Option<BufBox>,
    len: usize,
    /// Elevator position: the first block of the last buf taken. (Not the
    /// block after it: bufs queued in this sweep that start inside the
    /// taken one's range would then be behind the head while still queued
    /// ahead of it, and a later insert would sort in front of them, so
    /// the elevator went backwards.)
    pos: u64,
}

impl BufQueue {
    /// An empty queue.
    pub const fn new(strategy: BufqStrategy) -> Self {
        Self {
            strategy,
            out: None,
            inq: None,
            len: 0,
            pos: 0,
        }
    }

    /// Bufs queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue `bp`.
    pub fn put(&mut self, mut bp: BufBox) {
        match self.strategy {
            BufqStrategy::Fcfs => {
                bp.qnext = self.inq.take();
                self.inq = Some(bp);
            }
            BufqStrategy::Disksort => self.sorted_insert(bp),
        }
        self.len += 1;
    }

    /// Put `bp` back at the head (it could not be started).
    pub fn put_front(&mut self, mut bp: BufBox) {
        bp.qnext = self.out.take();
        self.out = Some(bp);
        self.len += 1;
    }

    /// Take the next buf.
    pub fn get(&mut self) -> Option<BufBox> {
        if self.out.is_none() {
            // Refill from `inq`, reversing it into arrival order.
            while let Some(mut b) = self.inq.take() {
                self.inq = b.qnext.take();
                b.qnext = self.out.take();
                self.out = Some(b);
            }
        }
        let mut bp = self.out.take()?;
        self.out = bp.qnext.take();
        self.len -= 1;
        self.pos = bp.blkno;
        Some(bp)
    }

    /// Take every buf (for failing them all).
    pub fn drain(&mut self) -> Vec<BufBox> {
        let mut v = Vec::with_capacity(self.len);
        while let Some(b) = self.get() {
            v.push(b);
        }
        v
    }

    /// disksort: bufs at or after the elevator position, ascending, then
    /// the ones before it, ascending (the next sweep).
    fn sorted_insert(&mut self, mut bp: BufBox) {
        let pos = self.pos;
        // (sweep, block): this sweep first.
        let key = |b: &Buf| (b.blkno < pos, b.blkno);
        let k = key(&bp);
        let mut cur = &mut self.out;
        while cur.as_ref().is_some_and(|b| key(b) <= k) {
            cur = &mut cur.as_mut().expect("tested above").qnext;
        }
        bp.qnext = cur.take();
        *cur = Some(bp);
    }
}

impl Drop for BufQueue {
    fn drop(&mut self) {
        // One at a time: dropping a chain would recurse through the links.
        while let Some(b) = self.get() {
            drop(b);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod queue_tests {
    //! Bufs from a `BufPool` (a slot table) through `BufQueue`s: the order
    //! of each discipline, and every buf back in its pool (Miri checks the
    //! pointers).
    use super::{BufBox, BufPool, BufQueue, BufqStrategy, DEV_BSIZE};
    use std::sync::OnceLock;
    use std::vec::Vec;

    fn buf(pool: &'static OnceLock<BufPool>, blkno: u64) -> BufBox {
        let p = pool.get_or_init(|| BufPool::new("testbufs", 8));
        let mut b = BufBox::new_in(p).expect("a free buf");
        b.blkno = blkno;
        b.bcount = DEV_BSIZE;
        b
    }

    fn take_all(q: &mut BufQueue) -> Vec<u64> {
        core::iter::from_fn(|| q.get().map(|b| b.blkno)).collect()
    }

    #[test]
    fn fcfs_in_order_put_front_first() {
        static POOL: OnceLock<BufPool> = OnceLock::new();
        let mut q = BufQueue::new(BufqStrategy::Fcfs);
        for b in [5, 1, 9] {
            q.put(buf(&POOL, b));
        }
        let first = q.get().unwrap();
        assert_eq!(first.blkno, 5);
        q.put(buf(&POOL, 3));
        q.put_front(first);
        assert_eq!(q.len(), 4);
        assert_eq!(take_all(&mut q), [5, 1, 9, 3]);
        assert!(q.is_empty());
        assert_eq!(POOL.get().unwrap().available(), 8, "every buf is back");
    }

    #[test]
    fn disksort_sweeps_up_then_wraps() {
        static POOL: OnceLock<BufPool> = OnceLock::new();
        let mut q = BufQueue::new(BufqStrategy::Disksort);
        for b in [30, 10, 20] {
            q.put(buf(&POOL, b));
        }
        assert_eq!(q.get().unwrap().blkno, 10); // the elevator is at 11
        for b in [5, 15, 12] {
            q.put(buf(&POOL, b));
        }
        assert_eq!(take_all(&mut q), [12, 15, 20, 30, 5]);
    }

    #[test]
    fn dropping_a_queue_frees_its_bufs() {
        static POOL: OnceLock<BufPool> = OnceLock::new();
        let mut q = BufQueue::new(BufqStrategy::Fcfs);
        for b in 0..8 {
            q.put(buf(&POOL, b));
        }
        let p = POOL.get().unwrap();
        assert_eq!(p.available(), 0);
        drop(q);
        assert_eq!(p.available(), 8);
        assert_eq!(q_drain_len(p), 8);
    }

    fn q_drain_len(p: &'static BufPool) -> usize {
        let mut q = BufQueue::new(BufqStrategy::Fcfs);
        while let Some(b) = BufBox::new_in(p) {
            q.put(b);
        }
        q.drain().len()
    }
}

/// A block device (the block device switch entry).
pub trait BlockDev: Sync {
    /// Its name (`sd0`, `ccd0`, `vnd0`).
    fn name(&self) -> &'static str;
    /// Size in DEV_BSIZE sectors.
    fn sectors(&self) -> u64;
    /// Is it read-only?
    fn read_only(&self) -> bool;
    /// Largest transfer of one buf, bytes.
    fn max_transfer(&self) -> usize;
    /// Open it; a write open of a read-only device fails with `Perm`.
    fn open(&self, write: bool) -> Result<(), BioError> {
        if write && self.read_only() {
            Err(BioError::Perm)
        } else {
            Ok(())
        }
    }
    /// Start an I/O. The device owns `bp` until it `biodone`s it. Any
    /// context; never sleeps.
    fn strategy(&self, bp: BufBox);
    /// A data buffer this device can transfer (its DMA tag's memory). Any
    /// context.
    fn alloc_buf(&self, len: usize) -> Option<IoBuf> {
        IoBuf::alloc(len)
    }
    /// The same, sleeping until memory is available. Thread context.
    fn alloc_buf_wait(&self, ctx: &ThreadCtx, len: usize) -> Result<IoBuf, Interrupted> {
        IoBuf::alloc_wait(ctx, len)
    }
    /// One line in the style of autoconf.
    fn describe(&self) -> alloc::string::String;
}

/// Register an attached block device. Thread or host context.
pub fn bdev_attach(dev: &'static dyn BlockDev) -> Result<(), BioError> {
    let mut t = crate::kernel::kernel().bio.devsw.lock();
    if t.iter().flatten().any(|d| d.name() == dev.name()) {
        return Err(BioError::Inval);
    }
    match t.iter_mut().find(|s| s.is_none()) {
        Some(s) => {
            *s = Some(dev);
            Ok(())
        }
        None => Err(BioError::NoSpc),
    }
}

/// A block device by name.
/// (None when no kernel is booted.)
pub fn bdev_lookup(name: &str) -> Option<&'static dyn BlockDev> {
    crate::kernel::try_kernel()?
        .bio
        .devsw
        .lock()
        .iter()
        .flatten()
        .find(|d| d.name() == name)
        .copied()
}

/// Every attached block device, in attach order (none when no kernel is
/// booted).
pub fn bdevs() -> Vec<&'static dyn BlockDev> {
    match crate::kernel::try_kernel() {
        Some(k) => k.bio.devsw.lock().iter().flatten().copied().collect(),
        None => Vec::new(),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{BioError, Buf, BufAlloc, BufBox};
    use core::ptr::NonNull;
    use std::boxed::Box;

    /// Bufs from the host heap (no kernel needed).
    struct HeapBufs;
    impl BufAlloc for HeapBufs {
        fn alloc(&'static self) -> Option<NonNull<Buf>> {
            NonNull::new(Box::into_raw(Box::new(Buf::new(self))))
        }
        unsafe fn free(&self, b: NonNull<Buf>) {
            // SAFETY: from `alloc` (contract); the contents are dropped, so
            // only the memory is freed.
            drop(unsafe { Box::from_raw(b.as_ptr().cast::<core::mem::MaybeUninit<Buf>>()) });
        }
    }
    static HEAP: HeapBufs = HeapBufs;

    /// A parked parent comes back once, to the last child, with the first
    /// child error; shares beyond the count are refused.
    #[test]
    fn parked_parent_returns_to_the_last_child() {
        let mut bp = BufBox::new_in(&HEAP).unwrap();
        bp.bcount = 4096;
        let mut parked = bp.park(3);
        let (a, b, c) = (
            parked.child().unwrap(),
            parked.child().unwrap(),
            parked.child().unwrap(),
        );
        assert!(parked.child().is_none(), "no more shares than children");
        drop(parked);
        assert!(a.release(None, None).is_none());
        assert!(b.release(Some(BioError::NoSpc), None).is_none());
        let back = c.release(Some(BioError::Io), None).expect("the last child");
        assert_eq!(back.error, Some(BioError::NoSpc), "the first error wins");
        assert_eq!(back.bcount, 4096);

        let mut parked = BufBox::new_in(&HEAP).unwrap().park(1);
        let back = parked.child().unwrap().release(None, None).unwrap();
        assert_eq!(back.error, None);
    }
}
