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
    // The AST figures are of what they say: in the timed loops every posted
    // interrupt ran its handler; the plain variant ran the bench's AST
    // never, the other once per interrupt, each time from a pushed frame.
    let n = |p: &str| {
        let p = format!("/ast_ns/counts/{p}");
        v.pointer(&p)
            .and_then(|x| x.as_u64())
            .unwrap_or_else(|| panic!("{p} missing: {}", v["ast_ns"]))
    };
    for variant in ["plain", "with_ast"] {
        let posted = n(&format!("{variant}/posted"));
        assert!(posted > 0, "{variant}: nothing posted");
        assert_eq!(
            n(&format!("{variant}/interrupts")),
            posted,
            "{variant}: interrupts posted and handler runs differ"
        );
    }
    // `ast_pushed` counts every AST frame of the CPU: the clock's
    // round-robin preemption may add one now and then (one in 100,000
    // was seen), never hundreds.
    let others = |variant: &str, own: u64| {
        let pushed = n(&format!("{variant}/ast_pushed"));
        assert!(
            pushed >= own && pushed - own <= n(&format!("{variant}/posted")) / 1000,
            "{variant}: {pushed} AST frames pushed for {own} of the bench's own"
        );
    };
    assert_eq!(n("plain/ast_handlers"), 0, "the plain variant ran ASTs");
    others("plain", 0);
    assert_eq!(
        n("with_ast/ast_handlers"),
        n("with_ast/interrupts"),
        "not one run of the bench's AST per interrupt"
    );
    others("with_ast", n("with_ast/interrupts"));
    // DVMA: every mode at both sizes; writing no PTE beats writing two.
    for size in ["4k", "64k"] {
        for mode in ["strict", "lazy", "slots", "permanent", "shadow"] {
            let x = f(&format!("/dvma_ns/{size}/{mode}"));
            assert!(x.is_finite() && x > 0.0, "dvma_ns/{size}/{mode} = {x}");
        }
        assert!(f(&format!("/dvma_ns/{size}/permanent")) < f(&format!("/dvma_ns/{size}/strict")));
    }
}
