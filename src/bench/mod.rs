//! `dvma bench`: measurements. Without a subcommand, the benchmark matrix
//! against the peer NBD servers ([`matrix`]); `micro` and `dvma` measure
//! the kernel's mechanisms in-process; `kernel` ranks the DVMA and
//! completion modes by the kernel's CPU time per I/O ([`kernel`]).

use std::process::ExitCode;

pub mod dvma;
pub mod kernel;
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
    /// Every DVMA mode x completion mode, measured inside the kernel: a
    /// closed-loop load generator on sd over a zero-latency disk; CPU ns
    /// per I/O ranked with ties, split by part (statclock); writes
    /// kernel.md, kernel.json and plots.
    Kernel(Box<kernel::KernelArgs>),
}

pub fn main(a: BenchArgs) -> Result<ExitCode, String> {
    match a.what {
        Some(What::Micro(m)) => micro::main(m),
        Some(What::Dvma(d)) => dvma::main(d),
        Some(What::Kernel(k)) => kernel::main(*k),
        None => matrix::main(a.matrix),
    }
}
