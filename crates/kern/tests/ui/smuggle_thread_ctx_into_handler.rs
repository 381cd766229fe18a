// A thread's context cannot be captured by an interrupt handler, which
// outlives it and runs elsewhere: ThreadCtx is neither 'static nor Sync.
use kern::intr::intr_establish;
use kern::sched::{kthread_create, tsleep};
use kern::Ipl;

fn main() {
    let _ = kthread_create(None, "t", |ctx| {
        let _ = intr_establish(Ipl::Bio, "bad", move |_| {
            let _ = tsleep(ctx, 0);
        });
    });
}
