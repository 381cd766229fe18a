//! The rows of `dvma race --json` and `dvma metal race --json`: which ones
//! the mail's mechanisms predict to corrupt, and the checks every row must
//! pass. One table for both machines, so that "the same rows with the same
//! outcomes" means the same thing on both.

use serde_json::Value;

/// Whether the row (protection `p`, completion `c`) must corrupt the
/// allocator: `thread` never does (a non-preemptive kernel), `none` always
/// does otherwise, `splimp` and `pool` never, and `safepoint` protects
/// against ASTs only.
pub fn predicted_corrupt(p: &str, c: &str) -> bool {
    match (p, c) {
        (_, "thread") => false,
        ("none", _) => true,
        ("splimp" | "pool", _) => false,
        ("safepoint", "ast") => false,
        ("safepoint", _) => true,
        _ => panic!("unknown row {c}/{p}"),
    }
}

/// Checks the 16 rows: each row's expectation is the prediction, it had
/// injections, it corrupted exactly where predicted (at least 50 times
/// there: the deterministic injections alone corrupt once each), and it
/// says `ok`.
pub fn check_rows(rows: &[Value]) {
    assert_eq!(rows.len(), 16, "4 completion modes x 4 protections");
    for r in rows {
        let c = r["completion"].as_str().unwrap();
        let p = r["protection"].as_str().unwrap();
        let inj = r["injections"].as_u64().unwrap();
        let cor = r["corruptions"].as_u64().unwrap();
        let exp = r["expected_corrupt"].as_bool().unwrap();
        assert_eq!(exp, predicted_corrupt(p, c), "{c}/{p}: expectation");
        assert!(inj > 0, "{c}/{p}: no injection");
        assert_eq!(
            cor > 0,
            exp,
            "{c}/{p}: {cor} corruptions, expected_corrupt={exp}: {r}"
        );
        if exp {
            assert!(cor >= 50, "{c}/{p}: only {cor} corruptions");
        }
        assert_eq!(r["ok"], true, "{c}/{p}: {r}");
    }
}
