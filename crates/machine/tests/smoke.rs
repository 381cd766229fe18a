//! Boot, run a thread on each CPU, shut down.

use machine::{Machine, MachineConfig};

fn cfg(ncpu: usize) -> MachineConfig {
    let mut c = MachineConfig::default();
    c.kernel.ncpu = ncpu;
    c
}

#[test]
fn boot_run_shutdown() {
    let m = Machine::boot(cfg(2)).unwrap();
    let r = m.run(0, "t", |_ctx| 40 + 2).unwrap();
    assert_eq!(r, 42);
    let r = m.run(1, "t", |ctx| ctx.cpu()).unwrap();
    assert_eq!(r, 1);
    let s = m.shutdown().unwrap();
    assert!(s.total(|c| c.switches) >= 2);
}
