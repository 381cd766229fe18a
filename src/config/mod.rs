//! The machine description: a TOML file, plus command-line overrides.
//!
//! Every command that boots a machine takes [`BootArgs`]: `--config FILE`
//! and flags that override the file. [`BootArgs::load`] reads the file (or
//! the built-in default, [`MachineSpec::default_spec`]), applies the flags
//! and validates the result into a [`MachineSpec`]: every value resolved
//! (sizes in bytes, paths absolute, enums parsed), every default filled in.
//! [`MachineSpec::to_toml`] prints it back (the effective configuration); the
//! output parses to the same spec.
//!
//! # The file
//!
//! ```toml
//! [machine]
//! cpus = 2
//! memory = "256M"
//!
//! [[disk]]
//! name = "sd0"
//! file = "sd0.img"
//! size = "256M"
//!
//! [[disk]]
//! name = "sd1"
//! file = "sd1.img"
//! size = "256M"
//!
//! [[ccd]]
//! name = "ccd0"
//! components = ["sd0", "sd1"]
//! interleave = "64K"
//! ```
//!
//! `examples/ccd-vnd.toml` sets every key. A file describes the whole
//! machine: a file without `[[disk]]` has no disks (the default `sd0` is only
//! used when there is no file at all). Unknown sections and keys are errors.
//!
//! A *size* is an integer number of bytes or a string: digits with an
//! optional `K`, `M` or `G` suffix (binary: `1K` = 1024; `k`, `m`, `g` work
//! too), e.g. `"64K"`, `"256M"`, `"4096"`. A *switch* is `true`/`false` or
//! `"on"`/`"off"`.
//!
//! ## `[machine]` (optional; every key has a default)
//!
//! | key | type | default | allowed |
//! |---|---|---|---|
//! | `cpus` | integer | the host's cores, at most 64 | 1 to 64 |
//! | `memory` | size | `"256M"` | 16M to 64G, a multiple of 4K, and at least the DVMA pools + 32M (below) |
//! | `spl` | string | `"lazy"` | `lazy`, `mask` |
//! | `intr_stack` | switch | `true` | |
//! | `data_dir` | string | `"./dvma-data"` | a relative path is relative to the current directory (not to the file) |
//! | `idle_poll_us` | integer | 50 | 0 to 1000000: the longest an idle CPU polls for work before it sleeps; within it the window adapts to the CPU's idle periods (`kern::haltpoll`: it grows while work comes soon after the CPU idles, and shrinks to nothing while it does not). Host CPUs are shared: long polls steal them from devices and clients; short ones sleep between a client's requests |
//!
//! ## `[[disk]]`: a DMA disk controller and its `sd` driver
//!
//! | key | type | default | allowed |
//! |---|---|---|---|
//! | `name` | string | required | `sd[0-9]+` |
//! | `file` | string | required | relative to `data_dir`, or absolute |
//! | `size` | size | the existing file's size; required to create the file | > 0, a multiple of `sector_size` |
//! | `sector_size` | integer | 512 | 512, 1024, 2048, 4096 (parsed and checked, but booting refuses all but 512: only 512-byte sectors are implemented) |
//! | `dvma` | string | `"permanent"` | `strict`, `lazy`, `slots`, `permanent`, `shadow` |
//! | `completion` | string | `"softint"` | `intr`, `softint`, `thread`, `ast` |
//! | `read_only` | bool | `false` | |
//! | `cpu` | integer | 0 | a CPU of the machine (below `cpus`) |
//! | `queue_depth` | integer | 64 | 1 to 1024 |
//! | `max_transfer` | size | `"1M"` | a power of two from 4K to 32M |
//! | `workers` | integer | 2 | 1 to 64 (device threads) |
//! | `o_direct` | bool | `false` | |
//! | `write_cache` | bool | `false` | a volatile write cache in the controller: writes without FUA are acknowledged from its memory and reach the file at a flush, when the cache is full, and at a clean shutdown (so `kill -9` loses unflushed writes, as a power cut loses a disk's cache) |
//! | `engine` | string | `"uring"`, or `"threads"` with `write_cache` or where the host has no io_uring | `threads` (`workers` host threads do the I/O), `uring` (the vCPU submits to an io_uring and writes itself, a reaper thread takes late completions; not with `write_cache`; fails at boot where the host has no io_uring) |
//! | `write_cache_size` | size | `"16M"` | a multiple of 4K, 4K to 1G; used when `write_cache = true` (a write larger than the cache goes straight through) |
//! | `coalesce_count` | integer | 1 (an interrupt per completion) | 1 to `queue_depth` |
//! | `coalesce_us` | integer | 0 (no coalescing timer) | 0 to 1000000 |
//! | `poll_us` | integer | 5 | 0 to 1000000: how long an idle device worker polls its ring before it sleeps |
//! | `slots` | integer | 64 | 1 to 4096; used when `dvma = "slots"` |
//! | `pool` | size | `"64M"` | a multiple of 4K, at least `max_transfer`; used when `dvma` is `permanent` or `shadow` |
//!
//! `slots` and `pool` are accepted with every mode and used only by theirs,
//! so that `--dvma` can switch a disk to any mode.
//!
//! ## `[[ccd]]`: concatenation or striping over disks
//!
//! | key | type | default | allowed |
//! |---|---|---|---|
//! | `name` | string | required | `ccd[0-9]+` |
//! | `components` | array of strings | required | at least one `[[disk]]` name; each disk in at most one ccd, once |
//! | `interleave` | size | 0 (concatenation) | 0 or a multiple of 512 and of the components' sector size |
//! | `completion` | string | `"softint"` | `intr`, `softint`, `thread`, `ast` |
//! | `cbufs` | string | `"pool"` | `pool`, `kmem` (the 1995 race configuration) |
//! | `read_only` | bool | `false` | a writable ccd needs writable components |
//!
//! The components of a ccd must have the same sector size and the same
//! DVMA mode: a ccd I/O is split over its components, and a measurement of
//! the ccd must be a measurement of one DVMA mode.
//!
//! ## `[[vnd]]`: a disk backed by a host file through a non-DMA file device
//!
//! | key | type | default | allowed |
//! |---|---|---|---|
//! | `name` | string | required | `vnd[0-9]+` |
//! | `file` | string | required | relative to `data_dir`, or absolute |
//! | `size` | size | the existing file's size; required to create the file | > 0, a multiple of 512 |
//! | `completion` | string | `"softint"` | `intr`, `softint`, `thread`, `ast` |
//! | `read_only` | bool | `false` | |
//!
//! ## Across sections
//!
//! * Device names are unique over all sections.
//! * No two devices use the same backing file (paths are compared after
//!   joining `data_dir` and removing `.` and `..`; symbolic links are not
//!   followed).
//! * `memory` must hold every `permanent`/`shadow` disk's `pool` plus 32M
//!   for the kernel and the I/O buffers of the other modes.
//!
//! ## Backing files
//!
//! [`BackingFile::prepare`] applies one rule at boot (see
//! [`BackingFile::plan`]): a missing file is created sparse with `size`; an
//! existing file keeps its size when `size` is not given or equal, and is
//! grown (sparse) when `size` is larger. It is never truncated: an existing
//! file larger than `size` is an error. A `read_only` device never changes
//! its file: the file must exist, and a `size`, if given, must equal its
//! length. The resulting size must be a multiple of the sector size.
//!
//! ## The built-in default
//!
//! Without `--config`: the `[machine]` defaults above and one disk,
//! `name = "sd0"`, `file = "sd0.img"` (under `./dvma-data/`),
//! `size = "256M"`, every other disk key at its default (`dvma =
//! "permanent"`, `completion = "softint"`).
//!
//! # Overrides
//!
//! | flag | overrides |
//! |---|---|
//! | `--config FILE` | the built-in default |
//! | `--dvma MODE` | `dvma` of every disk |
//! | `--completion MODE` | `completion` of every disk, ccd and vnd |
//! | `--spl lazy\|mask` | `machine.spl` |
//! | `--intr-stack on\|off` | `machine.intr_stack` |
//! | `--cpus N` | `machine.cpus` |
//! | `--data-dir DIR` | `machine.data_dir` (relative files follow it) |
//!
//! The whole machine is validated after the overrides are applied.
//!
//! # Errors
//!
//! A [`ConfigError`] names the file, the key as a path (`machine.cpus`,
//! `disk[1].dvma`, `ccd[0].components[1]`) and, where there is a list, the
//! allowed values: `config m.toml: disk[0].dvma: "fast" is not one of strict,
//! lazy, slots, permanent, shadow`. A TOML syntax error gives the line and
//! column.
//!
//! # Why the reader is not serde derive
//!
//! The file is read into a `toml::Table` and then key by key (`file.rs`),
//! not with `#[derive(Deserialize)]` and `#[serde(deny_unknown_fields)]`,
//! because serde cannot give the errors promised above: a
//! `toml::de::Error` has serde's fixed text (``unknown field `dvmaa`,
//! expected one of `name`, ...``, ``invalid type: string "two", expected
//! i64``) and a byte span, but not the key as a path with its array indices
//! (`disk[0].dvmaa`, `ccd[0].components[1]`) that [`ConfigError::key`]
//! returns, and the misspelt key exists only inside that text, so there is
//! nothing to suggest "did you mean dvma?" from (a unit test shows both).
//! Serde does the writing ([`MachineSpec::to_toml`] serializes the same
//! section types), and a unit test checks that the keys read are the keys
//! written.

mod args;
mod backing;
mod check;
mod file;
mod resolve;
mod spec;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use machine::SplImpl;

pub use args::{BootArgs, Overrides};
pub use backing::{BackingFile, BackingPlan};
pub use spec::{CcdBufs, CcdSpec, DiskSpec, MachineSection, MachineSpec, VndSpec};

// ---------------------------------------------------------------------------
// Limits and defaults
// ---------------------------------------------------------------------------

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
const G: u64 = 1 << 30;

/// Most CPUs a machine has.
const MAX_CPUS: usize = kern::cpu::MAXCPU;
/// Default `machine.data_dir`.
const DEFAULT_DATA_DIR: &str = "./dvma-data";
/// Default `machine.memory`.
const DEFAULT_MEMORY: u64 = 256 * M;
/// Memory kept beyond the DVMA pools: the kernel, kmem, and the I/O buffers
/// of the disks that do not use a pool.
const MEMORY_SLACK: u64 = 32 * M;
/// Least and most `machine.memory`.
const MEMORY_MIN: u64 = 16 * M;
const MEMORY_MAX: u64 = 64 * G;
/// The page: memory and pools are whole pages.
const PAGE: u64 = 4 * K;
/// The unit of every disk size and of ccd interleaves.
const SECTOR: u64 = 512;
/// Allowed `disk.sector_size`.
const SECTOR_SIZES: [u32; 4] = [512, 1024, 2048, 4096];
/// Most `disk.queue_depth`.
const QUEUE_DEPTH_MAX: u16 = 1024;
/// Least and most `disk.max_transfer`.
const MAX_TRANSFER_MIN: usize = 4 << 10;
const MAX_TRANSFER_MAX: usize = 32 << 20;
/// Most `disk.workers`.
const WORKERS_MAX: usize = 64;
/// Most `disk.coalesce_us`.
const COALESCE_US_MAX: u32 = 1_000_000;
/// Most `machine.idle_poll_us` and `disk.poll_us`.
const POLL_US_MAX: u32 = 1_000_000;
/// Default `disk.poll_us`: short, because the host's CPUs are shared by
/// the virtual CPUs, the device workers and the clients: a long poll takes
/// the CPU from whoever would make progress.
const DEFAULT_POLL_US: u32 = 5;
/// Default `machine.idle_poll_us`: about one client round trip on loopback,
/// so that a vCPU serving a connection at queue depth 1 catches the next
/// request while it polls, instead of sleeping and being woken for it (a
/// host context switch each way). It costs that much CPU per idle period
/// (docs/bench/rtc.md).
const DEFAULT_IDLE_POLL_US: u32 = 50;
/// Most `disk.slots`.
const SLOTS_MAX: usize = 4096;
/// The name shown for a spec that comes from no file.
const BUILTIN: &str = "(built-in default)";

/// Every spl implementation, in the order messages list them.
const SPL_ALL: [SplImpl; 2] = [SplImpl::Lazy, SplImpl::Mask];

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a machine description was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is wrong; `key` is its path (`disk[1].dvma`).
    #[error("config {}: {key}: {message}", path.display())]
    Invalid {
        /// The file (or `(built-in default)`).
        path: PathBuf,
        /// The key, as a path.
        key: String,
        /// What is wrong, with the allowed values where there is a list.
        message: String,
    },
    /// The file could not be read.
    #[error("config {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config {}: line {line}, column {column}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A backing file cannot be used as the configuration says.
    #[error("backing file {}: {key}: {message}", path.display())]
    Backing {
        /// The backing file.
        path: PathBuf,
        /// The key that asks for it (`disk[0].size`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::Backing { key, .. } => Some(key),
            ConfigError::Io { .. } | ConfigError::Syntax { .. } => None,
        }
    }
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The file being read, for messages. Its methods read the file
/// (`file.rs`), resolve it (`resolve.rs`) and check the result
/// (`check.rs`).
struct Cx<'a> {
    origin: &'a Path,
}

/// `key` under the path `at` (`disk[0]` and `dvma`: `disk[0].dvma`).
fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

impl Cx<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }
}
