//! `intr_post_inline`: a CPU that posts to itself from thread code takes
//! the interrupt at once (or at the `splx` that lowers its IPL), with no
//! signal; `intr_post` from the same place still signals.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use kern::intr::{intr_establish, intr_post, intr_post_inline};
use kern::ipl::Ipl;

use common::boot;

#[test]
fn a_self_post_inline_runs_at_once_or_at_splx_without_a_signal() {
    let m = boot(2);
    let runs = Arc::new(AtomicU32::new(0));
    let r2 = Arc::clone(&runs);
    let v = intr_establish(Ipl::Bio, "inline-test", move |_| {
        r2.fetch_add(1, SeqCst);
    })
    .unwrap();
    let r3 = Arc::clone(&runs);
    let (now, at_raised, after_splx, signalled) = m
        .run(0, "poster", move |_ctx| {
            let c = kern::cpu::curcpu();
            let k0 = c.stats.kicks_intr.load(SeqCst);
            // IPL none: the handler has run when the post returns.
            intr_post_inline(0, v);
            let now = r3.load(SeqCst);
            // Raised to IPL_BIO: it waits for the splx.
            let s = kern::spl::raise(Ipl::Bio);
            intr_post_inline(0, v);
            let at_raised = r3.load(SeqCst);
            kern::spl::splx(s);
            let after_splx = r3.load(SeqCst);
            let signalled = c.stats.kicks_intr.load(SeqCst) - k0;
            (now, at_raised, after_splx, signalled)
        })
        .unwrap();
    assert_eq!((now, at_raised, after_splx), (1, 1, 2));
    assert_eq!(signalled, 0, "an inline self-post sent a signal");
    let st = m.stats();
    assert_eq!(st.cpus[0].posts_self, 2);

    // intr_post from the same place interrupts with a signal.
    let kicks = m
        .run(0, "poster", move |_ctx| {
            let c = kern::cpu::curcpu();
            let k0 = c.stats.kicks_intr.load(SeqCst);
            intr_post(0, v);
            c.stats.kicks_intr.load(SeqCst) - k0
        })
        .unwrap();
    assert_eq!(kicks, 1);
    common::wait_until("the signalled handler", || runs.load(SeqCst) == 3);

    // From another CPU's thread, inline is an ordinary post (cpu1 -> cpu0).
    let before = m.stats().cpus[0].posts_self;
    m.run(1, "remote", move |_ctx| intr_post_inline(0, v))
        .unwrap();
    common::wait_until("the remote post", || runs.load(SeqCst) == 4);
    assert_eq!(m.stats().cpus[0].posts_self, before);
    m.shutdown().unwrap();
}
