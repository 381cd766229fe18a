//! The bus_dma deferred-load FIFO: loads that find no DVMA space wait in
//! their tag's FIFO and are completed, in order, by the `busdma` soft
//! interrupt as space frees; later loads never overtake them; each
//! callback runs exactly once. A `slots` tag with two slots is the
//! smallest DVMA space there is.

use alloc::vec::Vec;
use core::cell::RefCell;

use crate::bus_dma::{
    DmaDir, DmaError, DmaMap, DmaTag, DvmaMode, LoadError, TagConfig, Wait, dmamap_create,
    dmamap_load, dmamap_load_deferred, dmamap_unload, tag_create,
};
use crate::ctx::SoftCtx;
use crate::fake::{IommuOp, Machine};
use crate::ipl::Ipl;
use crate::vm::IoBuf;

std::thread_local! {
    /// (arg, map, loaded?) of every callback, in the order they ran.
    static DONE: RefCell<Vec<(usize, DmaMap, bool)>> = const { RefCell::new(Vec::new()) };
}

fn done(ctx: &SoftCtx, map: DmaMap, r: Result<(), LoadError>, arg: usize) {
    assert_eq!(ctx.level(), Ipl::SoftBio, "the busdma softint");
    DONE.with(|d| d.borrow_mut().push((arg, map, r.is_ok())));
}

fn done_args() -> Vec<(usize, bool)> {
    DONE.with(|d| d.borrow().iter().map(|(a, _, ok)| (*a, *ok)).collect())
}

/// Take the map of callback `arg` back.
fn done_map(arg: usize) -> DmaMap {
    DONE.with(|d| {
        let mut d = d.borrow_mut();
        let i = d.iter().position(|(a, _, _)| *a == arg).expect("ran");
        let (_, m, _) = d.swap_remove(i);
        // Keep the order of the others' records meaningless: callers
        // only look up by arg after this.
        m
    })
}

fn slots_tag(name: &'static str, slots: usize, fifo_depth: usize) -> &'static DmaTag {
    tag_create(
        name,
        TagConfig {
            maxsize: 4096,
            slots,
            fifo_depth,
            ..TagConfig::new(DvmaMode::Slots)
        },
    )
    .expect("tag")
}

fn loaded(tag: &'static DmaTag) -> DmaMap {
    let mut m = dmamap_create(tag, 4096).expect("map");
    dmamap_load(
        &mut m,
        IoBuf::alloc(4096).expect("buf"),
        DmaDir::ToDevice,
        Wait::NoWait,
    )
    .expect("load");
    m
}

#[allow(clippy::result_large_err)] // as `dmamap_load_deferred`
fn defer(tag: &'static DmaTag, arg: usize) -> Result<Option<DmaMap>, (DmaMap, LoadError)> {
    let m = dmamap_create(tag, 4096).expect("map");
    dmamap_load_deferred(
        m,
        IoBuf::alloc(4096).expect("buf"),
        DmaDir::FromDevice,
        done,
        arg,
    )
}

#[test]
fn deferred_loads_are_served_in_order_as_space_frees() {
    let _m = Machine::boot();
    DONE.with(|d| d.borrow_mut().clear());
    let tag = slots_tag("fifo0", 2, 3);
    let mut a = loaded(tag);
    let mut b = loaded(tag);
    // With space, a deferred load is a load.
    for arg in 0..3 {
        assert!(matches!(defer(tag, arg), Ok(None)), "queued");
    }
    assert_eq!(tag.fifo_len(), 3);
    assert_eq!(
        tag.stats
            .deferred
            .load(core::sync::atomic::Ordering::Relaxed),
        3
    );
    // The FIFO holds fifo_depth loads.
    match defer(tag, 99) {
        Err((_, e)) => assert_eq!(e.error, DmaError::FifoFull),
        _ => panic!("a fourth deferred load fits a FIFO of 3"),
    }
    assert!(done_args().is_empty());

    // A slot frees while the softint is held off: a new load does not
    // overtake the FIFO, although a slot is free.
    {
        let _s = crate::spl::splsoftbio();
        assert!(dmamap_unload(&mut a).is_some());
        let mut f = dmamap_create(tag, 4096).expect("map");
        let e = dmamap_load(
            &mut f,
            IoBuf::alloc(4096).expect("buf"),
            DmaDir::ToDevice,
            Wait::NoWait,
        )
        .expect_err("overtook the FIFO");
        assert!(matches!(e.error, DmaError::NoSpace { .. }));
        assert!(done_args().is_empty(), "the softint waits for splx");
    }
    // splx ran the busdma softint: the head of the FIFO got the slot.
    assert_eq!(done_args(), [(0, true)]);
    assert_eq!(tag.fifo_len(), 2);

    // Each free serves the next one, in order.
    assert!(dmamap_unload(&mut b).is_some());
    assert_eq!(done_args(), [(0, true), (1, true)]);
    let mut m0 = done_map(0);
    assert!(m0.is_loaded() && m0.segs()[0].len == 4096);
    assert!(dmamap_unload(&mut m0).is_some());
    assert_eq!(tag.fifo_len(), 0);
    let mut args: Vec<usize> = done_args().into_iter().map(|(a, _)| a).collect();
    args.sort();
    assert_eq!(args, [1, 2], "each callback once");

    // The FIFO is empty: plain loads go again once there is space.
    let mut m1 = done_map(1);
    assert!(dmamap_unload(&mut m1).is_some());
    let _c = loaded(tag);
    let mut m2 = done_map(2);
    assert!(dmamap_unload(&mut m2).is_some());
}

/// The device can reach exactly what the tag mapped: a slot's PTEs are
/// written once per new buffer, with the direction's rights, and stay
/// after the unload (the mode's documented exposure).
#[test]
fn slots_leave_the_last_buffer_reachable() {
    let m = Machine::boot();
    let tag = slots_tag("fifo1", 1, 1);
    m.iommu().clear_log();
    let mut a = loaded(tag);
    let iova = a.segs()[0].iova;
    let log = m.iommu().log();
    assert!(
        matches!(log[..], [IommuOp::Enter(i, _, 4096, crate::iommu::DmaAccess::Read)] if i == iova),
        "{log:?}"
    );
    let buf = dmamap_unload(&mut a).expect("buf");
    // Unloaded, still mapped: the slot's PTE hangs around.
    let (pa, _) = m.iommu().lookup(iova).expect("still mapped");
    assert_eq!(pa, buf.pa());
    assert_eq!(m.iommu().log().len(), 1, "no remove");
    // The same buffer again, same direction: no PTE written.
    dmamap_load(&mut a, buf, DmaDir::ToDevice, Wait::NoWait).expect("load");
    assert_eq!(m.iommu().log().len(), 1);
    assert_eq!(dmamap_unload(&mut a).map(|b| b.len()), Some(4096));
}

/// `slots`: a buffer finds the free slot that still maps it, whatever the
/// order in which buffers and slots came back, and a buffer without one
/// takes the slot freed longest ago. (With a stack of free slots, `a`
/// below took `b`'s slot, `b` took `a`'s, and both loads wrote PTEs.)
#[test]
fn slots_give_a_buffer_the_slot_that_still_maps_it() {
    let m = Machine::boot();
    let tag = slots_tag("fifo3", 3, 1);
    let (mut ma, mut mb) = (loaded(tag), loaded(tag));
    let (ia, ib) = (ma.segs()[0].iova, mb.segs()[0].iova);
    assert_ne!(ia, ib);
    let a = dmamap_unload(&mut ma).expect("a");
    let b = dmamap_unload(&mut mb).expect("b");
    m.iommu().clear_log();
    // Loaded again in the order they were freed: a first, although b's
    // slot was freed last.
    dmamap_load(&mut ma, a, DmaDir::ToDevice, Wait::NoWait).expect("load a");
    dmamap_load(&mut mb, b, DmaDir::ToDevice, Wait::NoWait).expect("load b");
    assert_eq!(ma.segs()[0].iova, ia, "a in the slot that maps it");
    assert_eq!(mb.segs()[0].iova, ib, "b in the slot that maps it");
    assert!(
        m.iommu().log().is_empty(),
        "no PTE written: {:?}",
        m.iommu().log()
    );
    // A new buffer takes the third slot, never used (freed longest ago),
    // and leaves a's and b's mappings alone.
    let c = IoBuf::alloc(4096).expect("buf");
    let mut mc = dmamap_create(tag, 4096).expect("map");
    dmamap_load(&mut mc, c, DmaDir::ToDevice, Wait::NoWait).expect("load c");
    let ic = mc.segs()[0].iova;
    assert!(ic != ia && ic != ib, "c took a slot that maps a or b");
    for mut map in [ma, mb, mc] {
        dmamap_unload(&mut map).expect("unload");
    }
}

/// `strict`: nothing stays reachable after an unload.
#[test]
fn strict_removes_what_it_entered() {
    let m = Machine::boot();
    let tag = tag_create("strict0", TagConfig::new(DvmaMode::Strict)).expect("tag");
    m.iommu().clear_log();
    let mut a = dmamap_create(tag, 3 * 4096).expect("map");
    dmamap_load(
        &mut a,
        IoBuf::alloc(3 * 4096).expect("buf"),
        DmaDir::FromDevice,
        Wait::NoWait,
    )
    .expect("load");
    let iova = a.segs()[0].iova;
    assert_eq!(m.iommu().mapped_pages(), 3);
    assert_eq!(
        m.iommu().lookup(iova).map(|(_, acc)| acc),
        Some(crate::iommu::DmaAccess::ReadWrite)
    );
    let _buf = dmamap_unload(&mut a).expect("buf");
    assert_eq!(m.iommu().mapped_pages(), 0);
    assert!(m.iommu().lookup(iova).is_none());
    let log = m.iommu().log();
    assert!(
        matches!(log[..], [IommuOp::Enter(i, _, l, _), IommuOp::Remove(j, k)] if i == j && l == k && l == 3 * 4096),
        "{log:?}"
    );
}

/// Runs of the `busdma` softint so far.
fn busdma_runs(m: &Machine) -> u64 {
    let mut n = 0;
    m.kernel().softints.for_each(|name, runs| {
        if name == "busdma" {
            n = runs;
        }
    });
    n
}

/// No lost wake-up: a load deferred into an empty FIFO is retried by the
/// softint once it is queued. (An unload between its failed load and its
/// enqueue saw an empty FIFO and scheduled nothing; without the retry it
/// waited for the next unload, which may never come.)
#[test]
fn a_load_deferred_into_an_empty_fifo_is_retried_once_queued() {
    let m = Machine::boot();
    DONE.with(|d| d.borrow_mut().clear());
    let tag = slots_tag("fifo2", 1, 4);
    let mut a = loaded(tag);
    let before = busdma_runs(&m);
    assert!(matches!(defer(tag, 7), Ok(None)));
    assert_eq!(busdma_runs(&m), before + 1, "retried after the enqueue");
    assert_eq!(tag.fifo_len(), 1, "still no space: back in the FIFO");
    // Behind a non-empty FIFO no retry is needed: unloads see the FIFO.
    assert!(matches!(defer(tag, 8), Ok(None)));
    assert_eq!(busdma_runs(&m), before + 1);
    assert!(dmamap_unload(&mut a).is_some());
    assert_eq!(done_args(), [(7, true)]);
    let mut m7 = done_map(7);
    assert!(dmamap_unload(&mut m7).is_some());
    assert_eq!(done_args(), [(8, true)]);
    let mut m8 = done_map(8);
    assert!(dmamap_unload(&mut m8).is_some());
}
