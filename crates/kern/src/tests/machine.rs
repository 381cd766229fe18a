//! The fake machine itself: boot, interrupts, the clock.

use crate::fake::Machine;

/// Boot and tear down; the test thread is CPU 0 only while booted.
#[test]
fn boots_and_tears_down() {
    {
        let m = Machine::boot();
        assert!(crate::cpu::curcpu_opt().is_some());
        assert_eq!(m.cpu().index(), 0);
        assert_eq!(crate::spl::current(), crate::ipl::Ipl::None);
    }
    assert!(crate::cpu::curcpu_opt().is_none());
    assert!(crate::kernel::try_kernel().is_none());
}
