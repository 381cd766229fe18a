// A waiting pool allocation needs a ThreadCtx; an interrupt handler has none.
use kern::intr::intr_establish;
use kern::pool::Pool;
use kern::Ipl;

fn main() {
    let pool: &'static Pool<u32> = Box::leak(Box::new(Pool::new("p", Ipl::Bio, 4, |_| 0)));
    let _ = intr_establish(Ipl::Bio, "bad", move |ctx| {
        let _item = pool.get_wait(ctx);
    });
}
