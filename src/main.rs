//! dvma: see README.md.
fn main() {}
