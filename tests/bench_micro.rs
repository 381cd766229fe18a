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
    // interrupt ran its handler; the plain variant pushed no AST frame and
    // ran no AST, the other pushed one frame per interrupt, and each frame
    // ran the AST handler once.
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
    assert_eq!(
        n("plain/ast_pushed"),
        0,
        "the plain variant pushed AST frames"
    );
    assert_eq!(n("plain/ast_handlers"), 0, "the plain variant ran ASTs");
    assert_eq!(
        n("with_ast/ast_pushed"),
        n("with_ast/interrupts"),
        "not one AST frame per interrupt"
    );
    assert_eq!(
        n("with_ast/ast_handlers"),
        n("with_ast/ast_pushed"),
        "pushed AST frames and AST handler runs differ"
    );
    // DVMA: every mode at both sizes; writing no PTE beats writing two.
    for size in ["4k", "64k"] {
        for mode in ["strict", "lazy", "slots", "permanent", "shadow"] {
            let x = f(&format!("/dvma_ns/{size}/{mode}"));
            assert!(x.is_finite() && x > 0.0, "dvma_ns/{size}/{mode} = {x}");
        }
        assert!(f(&format!("/dvma_ns/{size}/permanent")) < f(&format!("/dvma_ns/{size}/strict")));
    }
}
