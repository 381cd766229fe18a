//! Context rules enforced by the types: these programs must not compile.
//! (`TRYBUILD=overwrite cargo test -p kern --test compile_fail` refreshes the
//! expected messages after a compiler upgrade.)

#[test]
fn context_rules() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
