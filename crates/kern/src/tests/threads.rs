//! Kernel threads on the fake machine (natively only: see
//! `fake::threads`): sleeping waits for DVMA space, `biowait`, and sd's
//! `thread` and `ast` completion modes end to end.

use alloc::sync::Arc;
use alloc::vec::Vec;
use std::sync::Mutex;

use crate::bio::{BufOp, BufqStrategy, DEV_BSIZE, bio_init, getbuf_wait, submit_wait};
use crate::bus_dma::{
    DmaDir, DvmaMode, TagConfig, Wait, dmamap_create, dmamap_load, dmamap_unload, tag_create,
};
use crate::completion::Completion;
use crate::dev::sd::{Sd, SdConfig};
use crate::fake::{FakeDisk, Machine, keep};
use crate::sched::{kthread_create, tsleep, yield_now};
use crate::vm::IoBuf;

/// A thread asleep on a channel nobody wakes is reported, not hung.
#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn a_lost_wakeup_is_reported() {
    let m = Machine::boot();
    let r = m.run(|ctx| {
        let chan = 0x1234;
        let _ = tsleep(ctx, chan);
    });
    assert!(r.is_err());
}

/// Loads that sleep for DVMA space (`Wait::Ok`) are each woken when space
/// frees and each get it: none is lost.
#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn sleeping_loads_get_the_space_as_it_frees() {
    let m = Machine::boot();
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let r = m.run(move |ctx| {
        let tag = tag_create(
            "wait0",
            TagConfig {
                maxsize: 4096,
                slots: 1,
                ..TagConfig::new(DvmaMode::Slots)
            },
        )
        .expect("tag");
        let mut a = dmamap_create(tag, 4096).expect("map");
        dmamap_load(
            &mut a,
            IoBuf::alloc(4096).expect("buf"),
            DmaDir::ToDevice,
            Wait::Ok(ctx),
        )
        .expect("load");
        let mut waiters = Vec::new();
        for id in 0..3usize {
            let o = o.clone();
            waiters.push(
                kthread_create(Some(0), "waiter", move |ctx| {
                    let mut m = dmamap_create(tag, 4096).expect("map");
                    let buf = IoBuf::alloc(4096).expect("buf");
                    dmamap_load(&mut m, buf, DmaDir::ToDevice, Wait::Ok(ctx)).expect("load");
                    o.lock().unwrap().push(id);
                    yield_now(ctx);
                    drop(dmamap_unload(&mut m));
                })
                .expect("waiter"),
            );
            // Let it run and go to sleep for the slot.
            yield_now(ctx);
        }
        assert!(o.lock().unwrap().is_empty(), "all asleep");
        assert_eq!(
            tag.stats.waits.load(core::sync::atomic::Ordering::Relaxed),
            3
        );
        drop(dmamap_unload(&mut a));
        for w in waiters {
            w.join(ctx).expect("join");
        }
    });
    assert_eq!(r, Ok(()));
    let mut got = order.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, [0, 1, 2], "every waiter served once");
}

/// Sleeping loads served in the order they went to sleep. Every free wakes
/// every sleeper (`wakeup` of the tag), so the order is the sleep queue's:
/// when it was LIFO the newest sleeper ran first and took the space, and
/// three waiters were served 2, 0, 1 (under a steady stream of new waiters
/// the oldest could starve). Sleep queues are FIFO now.
#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn sleeping_loads_are_served_in_arrival_order() {
    let m = Machine::boot();
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let r = m.run(move |ctx| {
        let tag = tag_create(
            "wait1",
            TagConfig {
                maxsize: 4096,
                slots: 1,
                ..TagConfig::new(DvmaMode::Slots)
            },
        )
        .expect("tag");
        let mut a = dmamap_create(tag, 4096).expect("map");
        dmamap_load(
            &mut a,
            IoBuf::alloc(4096).expect("buf"),
            DmaDir::ToDevice,
            Wait::Ok(ctx),
        )
        .expect("load");
        let mut waiters = Vec::new();
        for id in 0..3usize {
            let o = o.clone();
            waiters.push(
                kthread_create(Some(0), "waiter", move |ctx| {
                    let mut m = dmamap_create(tag, 4096).expect("map");
                    let buf = IoBuf::alloc(4096).expect("buf");
                    dmamap_load(&mut m, buf, DmaDir::ToDevice, Wait::Ok(ctx)).expect("load");
                    o.lock().unwrap().push(id);
                    yield_now(ctx);
                    drop(dmamap_unload(&mut m));
                })
                .expect("waiter"),
            );
            yield_now(ctx);
        }
        drop(dmamap_unload(&mut a));
        for w in waiters {
            w.join(ctx).expect("join");
        }
    });
    assert_eq!(r, Ok(()));
    assert_eq!(*order.lock().unwrap(), [0, 1, 2]);
}

fn sd_thread_rig(m: &Machine, completion: Completion) -> &'static Sd {
    bio_init(16);
    let disk = keep(FakeDisk::new(256, 4, 64 * 1024));
    let sd = Sd::attach(
        SdConfig {
            name: "sd0",
            parent: "fakedisk0",
            dma: TagConfig {
                maxsize: 64 * 1024,
                ..TagConfig::new(DvmaMode::Strict)
            },
            completion,
            cpu: 0,
            bufq: BufqStrategy::Disksort,
            read_only: false,
        },
        disk,
    )
    .expect("attach");
    crate::bio::bdev_attach(sd).expect("bdev_attach");
    m.devices_act_when_idle(disk);
    sd
}

/// `biowait` on sd in the completion modes that need kernel threads: a
/// write, then a read back, each waited for.
fn biowait_round_trip(completion: Completion) {
    let m = Machine::boot();
    let sd = sd_thread_rig(&m, completion);
    let r = m.run(move |ctx| {
        let bytes: Vec<u8> = (0..4 * DEV_BSIZE).map(|i| (i % 251) as u8).collect();
        let mut b = getbuf_wait(ctx).expect("buf");
        b.op = BufOp::Write;
        b.blkno = 32;
        b.bcount = bytes.len();
        let mut d = crate::bio::BlockDev::alloc_buf(sd, bytes.len()).expect("data");
        d.as_mut_slice().copy_from_slice(&bytes);
        b.data = Some(d);
        let b = submit_wait(ctx, sd, b);
        assert_eq!((b.error, b.resid), (None, 0));
        drop(b);
        let mut b = getbuf_wait(ctx).expect("buf");
        b.op = BufOp::Read;
        b.blkno = 32;
        b.bcount = bytes.len();
        b.data = Some(crate::bio::BlockDev::alloc_buf(sd, bytes.len()).expect("data"));
        let b = submit_wait(ctx, sd, b);
        assert_eq!(b.error, None);
        assert_eq!(b.data.as_ref().expect("data").as_slice(), &bytes[..]);
    });
    assert_eq!(r, Ok(()));
    assert_eq!(sd.inflight(), 0);
}

#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn biowait_round_trip_thread_mode() {
    biowait_round_trip(Completion::Thread);
}

#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn biowait_round_trip_ast_mode() {
    biowait_round_trip(Completion::Ast);
}

#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn biowait_round_trip_intr_mode() {
    biowait_round_trip(Completion::Intr);
}
