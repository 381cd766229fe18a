// ast_push is for interrupt handlers: thread code has no IntrCtx/SoftCtx.
use kern::ast::{ast_establish, ast_push};
use kern::sched::kthread_create;

fn main() {
    let h = ast_establish("a", |_| {}).unwrap();
    let _ = kthread_create(None, "t", move |ctx| {
        ast_push(ctx, &h);
    });
}
