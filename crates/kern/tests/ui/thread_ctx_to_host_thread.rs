// A ThreadCtx cannot leave its kernel thread.
use kern::sched::kthread_create;

fn main() {
    let _ = kthread_create(None, "t", |ctx| {
        let c: &kern::ThreadCtx = ctx;
        std::thread::scope(|s| {
            s.spawn(move || {
                let _ = c.cpu();
            });
        });
    });
}
