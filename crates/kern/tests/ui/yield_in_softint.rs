// A soft interrupt handler gets a SoftCtx; yielding needs a ThreadCtx.
use kern::sched::yield_now;
use kern::softint::softint_establish;
use kern::Ipl;

fn main() {
    let _ = softint_establish(Ipl::SoftBio, "bad", |ctx| {
        yield_now(ctx);
    });
}
