//! `dvma race --json`: every row matches the mechanism's prediction, every
//! row injected at least once, and the prediction table is the documented
//! one. Runs the real binary, under both spl implementations, with a short
//! interrupt storm.

mod common;

use std::process::Command;

use serde_json::Value;

fn race(args: &[&str]) -> (bool, Vec<Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dvma"))
        .arg("race")
        .arg("--json")
        .args(args)
        .output()
        .expect("run dvma race");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "dvma race --json printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.success(),
        rows,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(args: &[&str]) -> String {
    let (ok, rows, stderr) = race(args);
    common::race::check_rows(&rows);
    assert!(ok, "dvma race exited non-zero although every row matched");
    stderr
}

/// The statclock's signal at a high rate (every 20 µs of wall time, on
/// every vCPU) changes no row's outcome: it is not an interrupt, runs
/// nothing of the kernel's and is taken even where interrupts are blocked.
/// Under both spl implementations, with and without the interrupt stack.
#[test]
fn race_rows_do_not_change_under_the_statclock() {
    for args in [
        &[
            "--storm",
            "0.05",
            "--iterations",
            "100",
            "--statclock-us",
            "20",
        ][..],
        &[
            "--spl",
            "mask",
            "--intr-stack",
            "off",
            "--iterations",
            "100",
            "--statclock-us",
            "20",
        ][..],
    ] {
        let err = check(args);
        let n: u64 = err
            .lines()
            .find_map(|l| l.strip_prefix("statclock: "))
            .and_then(|l| l.strip_suffix(" samples"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{args:?}: no statclock line in:\n{err}"));
        assert!(n > 100, "{args:?}: only {n} statclock samples");
    }
}

#[test]
fn race_lazy_with_storm() {
    check(&["--storm", "0.1", "--iterations", "100"]);
}

#[test]
fn race_mask_without_interrupt_stack() {
    check(&[
        "--spl",
        "mask",
        "--intr-stack",
        "off",
        "--iterations",
        "100",
    ]);
}

#[test]
fn race_rejects_bad_input() {
    let out = Command::new(env!("CARGO_BIN_EXE_dvma"))
        .args(["race", "--completion", "telepathy"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("telepathy") && err.contains("intr, softint, thread, ast"),
        "{err}"
    );
}
