//! Skipped checks are never silent.
//!
//! A test that cannot run its check here (a tool not installed, a
//! filesystem that refuses `O_DIRECT`) calls [`skip`]. By default that
//! **fails** the test, saying what is missing, so plain `cargo test` shows
//! it in the list of failures. `DVMA_ALLOW_SKIP=1` turns it into a skip:
//! the test passes, and a `SKIPPED <test>: <why>` line is written straight
//! to the test process's stderr (not through `eprintln!`, which the test
//! harness captures), so it shows in `cargo test`'s output. Under
//! `CI=true` nothing may be skipped (CI installs everything), whatever
//! `DVMA_ALLOW_SKIP` says.
//!
//! Shared by the root tests (`tests/common`) and, by `#[path]`, by the
//! crates' tests that can skip.

use std::io::Write;

/// The variable that lets a check be skipped.
pub const ALLOW_SKIP: &str = "DVMA_ALLOW_SKIP";

/// The check the calling test is about cannot run here, because `why`.
/// Panics (the test fails) unless skipping is allowed (see the module
/// docs); if it returns, the caller must return without checking.
#[track_caller]
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} cannot run: {why}; CI=true, where nothing may be skipped");
    }
    if !std::env::var(ALLOW_SKIP).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {why} (set {ALLOW_SKIP}=1 to skip it instead)");
    }
    // Straight to fd 2: the harness captures only `print!`/`eprint!`.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {test}: {why} ({ALLOW_SKIP}=1)"
    );
}
