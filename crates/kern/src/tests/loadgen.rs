//! The load generator end to end on sd over the fake disk, with kernel
//! threads (natively only: see `fake::threads`): a pattern written,
//! rewritten at random, read back and checked, in every completion mode
//! and with either issuer;
//! the I/O count is exact and every buf comes back.

use crate::bio::{BufOp, BufqStrategy, bio_init};
use crate::bus_dma::{DvmaMode, TagConfig};
use crate::completion::Completion;
use crate::dev::sd::{Sd, SdConfig};
use crate::fake::{FakeDisk, Machine, keep};
use crate::loadgen::{Issuer, LoadGen, Pattern, Workload};

const SPAN: u64 = 128 * 1024;

fn verify_round(completion: Completion, mode: DvmaMode, issuer: Issuer) {
    let m = Machine::boot();
    bio_init(16);
    let disk = keep(FakeDisk::new(SPAN / 512, 4, 64 * 1024));
    let sd: &'static Sd = Sd::attach(
        SdConfig {
            name: "sd0",
            parent: "fakedisk0",
            dma: TagConfig {
                maxsize: 64 * 1024,
                pool_bytes: 256 * 1024,
                slots: 8,
                ..TagConfig::new(mode)
            },
            completion,
            cpu: 0,
            bufq: BufqStrategy::Disksort,
            read_only: false,
        },
        disk,
    )
    .expect("attach");
    m.devices_act_when_idle(disk);
    let r = m.run(move |ctx| {
        let mut lg = LoadGen::new(ctx, sd, 4096, 4).expect("loadgen");
        let seed = 0x5eed;
        let pre = lg.prefill(ctx, SPAN, seed).expect("prefill");
        assert_eq!((pre.ios, pre.errors), (SPAN / 4096, 0));
        let mut wl = Workload {
            op: BufOp::Write,
            pattern: Pattern::Random,
            span: SPAN,
            ios: 40,
            duration_ns: 0,
            verify: true,
            seed,
            issuer,
        };
        let w = lg.run(ctx, &wl).expect("randwrite");
        assert_eq!((w.ios, w.errors, w.bytes), (40, 0, 40 * 4096));
        wl.op = BufOp::Read;
        let r = lg.run(ctx, &wl).expect("randread");
        assert_eq!((r.ios, r.errors, r.mismatches), (40, 0, 0));
        wl.pattern = Pattern::Sequential;
        wl.ios = SPAN / 4096;
        let r = lg.run(ctx, &wl).expect("seqread");
        assert_eq!((r.ios, r.errors, r.mismatches), (SPAN / 4096, 0, 0));
        // Another seed's pattern is not there: every read mismatches.
        wl.seed = seed + 1;
        wl.ios = 8;
        let r = lg.run(ctx, &wl).expect("wrong seed");
        assert_eq!((r.ios, r.mismatches), (8, 8));
    });
    assert_eq!(r, Ok(()));
    assert_eq!(sd.inflight(), 0);
}

#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn verify_round_intr_strict() {
    verify_round(Completion::Intr, DvmaMode::Strict, Issuer::Thread);
    verify_round(Completion::Intr, DvmaMode::Strict, Issuer::Completion);
}

#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn verify_round_thread_permanent() {
    verify_round(Completion::Thread, DvmaMode::Permanent, Issuer::Thread);
    verify_round(Completion::Thread, DvmaMode::Permanent, Issuer::Completion);
}

#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn verify_round_ast_slots() {
    verify_round(Completion::Ast, DvmaMode::Slots, Issuer::Thread);
    verify_round(Completion::Ast, DvmaMode::Slots, Issuer::Completion);
}

#[test]
#[cfg_attr(miri, ignore = "kernel threads are host threads (fake::threads)")]
fn verify_round_softint_shadow() {
    verify_round(Completion::Softint, DvmaMode::Shadow, Issuer::Thread);
    verify_round(Completion::Softint, DvmaMode::Shadow, Issuer::Completion);
}
