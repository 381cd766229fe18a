// An interrupt handler gets an IntrCtx; tsleep needs a ThreadCtx.
use kern::intr::intr_establish;
use kern::sched::tsleep;
use kern::Ipl;

fn main() {
    let _ = intr_establish(Ipl::Bio, "bad", |ctx| {
        let _ = tsleep(ctx, 0);
    });
}
