//! `dvma bench`: measurements. Without a subcommand, the benchmark matrix
//! against the peer NBD servers ([`matrix`]); `micro` and `dvma` measure
//! the kernel's mechanisms in-process.

use std::process::ExitCode;

pub mod dvma;
pub mod matrix;
pub mod micro;

/// Arguments of `dvma bench`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: Option<What>,
    #[command(flatten)]
    matrix: matrix::MatrixArgs,
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
        Some(What::Micro(m)) => micro::main(m),
        Some(What::Dvma(d)) => dvma::main(d),
        None => matrix::main(a.matrix),
    }
}
