//! The four ways to complete an I/O "when there is not necessarily a
//! context backing the I/O" (the 1995 mail), as a mode a driver instance
//! is configured with.

use core::fmt;

/// Where a driver finishes an I/O after its device interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Completion {
    /// Everything in the interrupt handler, under the rules of interrupt
    /// context ("you *have* to handle it at interrupt time").
    Intr,
    /// The handler acknowledges and schedules a soft interrupt at softbio
    /// ("scheduling a soft interrupt to occur RSN").
    Softint,
    /// The handler wakes the driver's own kernel thread, which may sleep
    /// ("have each driver occupy one thread").
    Thread,
    /// The handler pushes the completion onto the interrupted kernel thread
    /// at a safe point (the "kernel signal").
    Ast,
}

impl Completion {
    /// Every mode, in the mail's order.
    pub const ALL: [Completion; 4] = [
        Completion::Intr,
        Completion::Softint,
        Completion::Thread,
        Completion::Ast,
    ];

    /// Its name on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Completion::Intr => "intr",
            Completion::Softint => "softint",
            Completion::Thread => "thread",
            Completion::Ast => "ast",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
