//! `dvma metal`: the kern core booted as an x86-64 kernel under QEMU
//! (`crates/metal`). Each test runs the real `dvma` binary, which builds
//! the kernel, boots it (KVM if usable, else TCG) and exits with the
//! guest's status. Bounded: every guest is killed after `--timeout`.
//!
//! QEMU comes from `PATH`, `$DVMA_QEMU`, or the private install of
//! `crates/metal/qemu-install.sh` (which `.ci/run` runs); a machine where
//! none can be had skips these tests (`common::skip`: a failure unless
//! `DVMA_ALLOW_SKIP=1`, and never allowed under CI).

mod common;

use std::process::{Command, Output};
use std::sync::Mutex;

/// One guest at a time: they share the kernel build and the machine's
/// two cores.
static ONE: Mutex<()> = Mutex::new(());

fn metal(args: &[&str]) -> Option<Output> {
    let _g = ONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(why) = dvma::metal::find_qemu() {
        common::skip::skip(&why);
        return None;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dvma"))
        .arg("metal")
        .args(args)
        .args(["--timeout", "120"])
        .output()
        .expect("run dvma metal");
    Some(out)
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn boots_prints_and_exits_zero() {
    let Some(o) = metal(&["hello"]) else { return };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("metal: dvma kernel"), "{}", text(&o));
    assert!(out.contains("hello from metal"), "{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn page_fault_is_reported_and_fails() {
    let Some(o) = metal(&["fault"]) else { return };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("exception 14 (page fault)") && out.contains("fault address 0x100000000"),
        "{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

fn selftest(spl: &str) {
    let Some(o) = metal(&["selftest", "--json", "--spl", spl]) else {
        return;
    };
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("selftest printed no JSON ({e}): {}", text(&o)));
    for check in [
        "intr_at_post",
        "spl_defer_replay",
        "softint",
        "threads",
        "callout",
        "ast",
        "ok",
    ] {
        assert_eq!(v[check], true, "{check}: {}", text(&o));
    }
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn kern_selftest_lazy_spl() {
    selftest("lazy");
}

#[test]
fn kern_selftest_mask_spl_is_cr8() {
    selftest("mask");
}
