//! `dvma bench`: measurements.

use std::process::ExitCode;

pub mod dvma;
pub mod micro;

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
    /// DVMA modes: load+sync+unload per 4 KiB and 64 KiB I/O, on one CPU
    /// and on both, with a live device on the window; DVMA space held.
    Dvma(dvma::DvmaArgs),
}

pub fn main(a: BenchArgs) -> Result<ExitCode, String> {
    match a.what {
        What::Micro(m) => micro::main(m),
        What::Dvma(d) => dvma::main(d),
    }
}
