//! `dvma bench`: measurements.

use std::process::ExitCode;

mod micro;

/// Arguments of `dvma bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Micro-benchmarks of the kernel's mechanisms (spl, switches,
    /// softints, interrupts, ASTs), measured in one run, with ratios.
    Micro(micro::MicroArgs),
}

pub fn main(a: BenchArgs) -> Result<ExitCode, String> {
    match a.what {
        What::Micro(m) => micro::main(m),
    }
}
