// Tokens cannot be made outside the kernel.
fn main() {
    let _ctx = kern::ThreadCtx { _not_send_sync: std::marker::PhantomData };
}
