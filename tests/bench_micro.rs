//! `dvma bench micro --json` prints every figure the issue names, measured
//! (positive and finite), in one run.

use std::process::Command;

#[test]
fn micro_json_has_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_dvma"))
        .args(["bench", "micro", "--json", "--reps", "1"])
        .output()
        .expect("run dvma bench micro");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    for path in [
        "/spl_pair_ns/lazy",
        "/spl_pair_ns/mask",
        "/switch_ns/kthread",
        "/switch_ns/os_thread",
        "/softint_dispatch_ns",
        "/intr_ns/intrstack",
        "/intr_ns/nostack",
        "/ast_ns/plain",
        "/ast_ns/with_ast",
    ] {
        let x = v.pointer(path).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
        assert!(x.is_finite() && x > 0.0, "{path} = {x}");
    }
    // Ratios that hold on any machine, whatever its speed.
    let f = |p: &str| v.pointer(p).unwrap().as_f64().unwrap();
    assert!(
        f("/spl_pair_ns/mask") > f("/spl_pair_ns/lazy"),
        "a syscall pair is not cheaper than two stores"
    );
    assert!(f("/switch_ns/os_thread") > f("/switch_ns/kthread"));
    assert!(f("/ast_ns/with_ast") > f("/ast_ns/plain") * 0.8);
    // DVMA: every mode at both sizes; writing no PTE beats writing two.
    for size in ["4k", "64k"] {
        for mode in ["strict", "lazy", "slots", "permanent", "shadow"] {
            let x = f(&format!("/dvma_ns/{size}/{mode}"));
            assert!(x.is_finite() && x > 0.0, "dvma_ns/{size}/{mode} = {x}");
        }
        assert!(f(&format!("/dvma_ns/{size}/permanent")) < f(&format!("/dvma_ns/{size}/strict")));
    }
}
