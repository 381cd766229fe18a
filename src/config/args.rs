//! The command line: the flags of every command that boots a machine, and
//! the overrides they ask for.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use kern::Completion;
use kern::bus_dma::DvmaMode;
use machine::SplImpl;

use super::{MAX_CPUS, MachineSpec, Result, SPL_ALL};

/// Values given on the command line; each one replaces the key in the file
/// for every instance it applies to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// `dvma` of every disk.
    pub dvma: Option<DvmaMode>,
    /// `completion` of every disk, ccd and vnd.
    pub completion: Option<Completion>,
    /// `machine.spl`.
    pub spl: Option<SplImpl>,
    /// `machine.intr_stack`.
    pub intr_stack: Option<bool>,
    /// `machine.cpus`.
    pub cpus: Option<usize>,
    /// `machine.data_dir` (relative: to the current directory).
    pub data_dir: Option<PathBuf>,
}

/// The flags of every command that boots a machine (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct BootArgs {
    /// Machine description (TOML). Without it: one 256 MiB disk sd0.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// DVMA mode of every disk.
    #[arg(long, value_name = "MODE", value_parser = dvma_parser())]
    pub dvma: Option<DvmaMode>,
    /// Completion mode of every driver (disks, ccds, vnds).
    #[arg(long, value_name = "MODE", value_parser = completion_parser())]
    pub completion: Option<Completion>,
    /// spl implementation.
    #[arg(long, value_name = "IMPL", value_parser = spl_parser())]
    pub spl: Option<SplImpl>,
    /// Take interrupts on a per-CPU interrupt stack.
    #[arg(long, value_name = "on|off", value_parser = switch_parser())]
    pub intr_stack: Option<bool>,
    /// Number of CPUs (1 to 64).
    #[arg(long, value_name = "N", value_parser = parse_cpus)]
    pub cpus: Option<usize>,
    /// Directory of the backing files.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

fn dvma_parser() -> impl TypedValueParser<Value = DvmaMode> {
    PossibleValuesParser::new(DvmaMode::ALL.map(DvmaMode::name))
        .try_map(|s| DvmaMode::from_name(&s).ok_or("unknown DVMA mode"))
}

fn completion_parser() -> impl TypedValueParser<Value = Completion> {
    PossibleValuesParser::new(Completion::ALL.map(Completion::name))
        .try_map(|s| Completion::from_name(&s).ok_or("unknown completion mode"))
}

fn spl_parser() -> impl TypedValueParser<Value = SplImpl> {
    PossibleValuesParser::new(SPL_ALL.map(SplImpl::name))
        .try_map(|s| spl_from_name(&s).ok_or("unknown spl implementation"))
}

fn switch_parser() -> impl TypedValueParser<Value = bool> {
    PossibleValuesParser::new(["on", "off"]).map(|s| s == "on")
}

fn parse_cpus(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_CPUS).contains(&n) => Ok(n),
        _ => Err(format!("expected a number of CPUs from 1 to {MAX_CPUS}")),
    }
}

impl BootArgs {
    /// The overrides these flags ask for.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            dvma: self.dvma,
            completion: self.completion,
            spl: self.spl,
            intr_stack: self.intr_stack,
            cpus: self.cpus,
            data_dir: self.data_dir.clone(),
        }
    }

    /// The machine to boot: `--config FILE` (or the built-in default) with
    /// the flags applied, validated.
    pub fn load(&self) -> Result<MachineSpec> {
        MachineSpec::load(self.config.as_deref(), &self.overrides())
    }
}

fn spl_from_name(s: &str) -> Option<SplImpl> {
    SPL_ALL.into_iter().find(|i| i.name() == s)
}
