//! `dvma`: a kernel I/O stack that runs as a Linux process, built to answer
//! the 1995 port-sparc mail on DVMA with measurements. See README.md.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::process::ExitCode;

use dvma::{bench, metal, race, serve, soak};

/// Command line.
#[derive(Parser)]
#[command(
    name = "dvma",
    version,
    about = "DVMA modes and I/O completion mechanisms of the 1995 port-sparc mail, built side by side and measured"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the machine and export every disk over NBD (the main job).
    Serve(serve::ServeArgs),
    /// Reproduce the ccd/vnd malloc race of the mail under every completion
    /// mode and protection.
    Race(race::RaceArgs),
    /// Benchmarks.
    Bench(bench::BenchArgs),
    /// Verified random I/O against `dvma serve` in every mode pair, with a watchdog.
    Soak(soak::SoakArgs),
    /// Boot the kernel core as an x86-64 kernel under QEMU and run a
    /// program on it (crates/metal).
    Metal(metal::MetalArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve(a) => serve::main(a).map_err(|e| e.to_string()),
        Cmd::Race(a) => race::main(a),
        Cmd::Bench(a) => bench::main(a),
        Cmd::Soak(a) => soak::main(a),
        Cmd::Metal(a) => metal::main(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dvma: {e}");
            ExitCode::from(2)
        }
    }
}
