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
//! | `idle_poll_us` | integer | 5 | 0 to 1000000: how long an idle CPU polls for work before it sleeps (host CPUs are shared: long polls steal them from devices and clients) |
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
//! | `engine` | string | `"threads"` | `threads` (`workers` host threads do the I/O), `uring` (the vCPU submits to an io_uring, a reaper thread takes late completions; not with `write_cache`; fails at boot where the host has no io_uring) |
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

mod args;
mod backing;
mod file;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::num::NonZero;
use std::path::{Component, Path, PathBuf};

use kern::Completion;
use kern::bus_dma::{DvmaMode, TagConfig};
use machine::{MachineConfig, SplImpl};

pub use args::{BootArgs, Overrides};
pub use backing::{BackingFile, BackingPlan};
use file::{CcdToml, DiskToml, FileToml, SizeValue, Switch, VndToml, parse_size, show};

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
/// Default `machine.idle_poll_us` and `disk.poll_us`: short, because the
/// host's CPUs are shared by the virtual CPUs, the device workers and the
/// clients: a long poll takes the CPU from whoever would make progress.
const DEFAULT_POLL_US: u32 = 5;
/// Most `disk.slots`.
const SLOTS_MAX: usize = 4096;
/// The name shown for a spec that comes from no file.
const BUILTIN: &str = "(built-in default)";

/// The built-in machine, as a file. `cpus` is left to its default.
const DEFAULT_TOML: &str = r#"
[[disk]]
name = "sd0"
file = "sd0.img"
size = "256M"
"#;

// ---------------------------------------------------------------------------
// The resolved machine
// ---------------------------------------------------------------------------

/// A machine to boot, fully resolved: sizes in bytes, paths absolute (when
/// the current directory could be read), every default filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineSpec {
    /// CPUs, memory, spl, interrupt stack, data directory.
    pub machine: MachineSection,
    /// `[[disk]]`: DMA disk controllers with their `sd` drivers.
    pub disks: Vec<DiskSpec>,
    /// `[[ccd]]`: concatenated or striped disks.
    pub ccds: Vec<CcdSpec>,
    /// `[[vnd]]`: file-backed disks behind a non-DMA file device.
    pub vnds: Vec<VndSpec>,
}

/// `[machine]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineSection {
    /// Number of CPUs (1 to 64).
    pub cpus: usize,
    /// RAM (the memfd), bytes.
    pub memory: u64,
    /// The spl implementation.
    pub spl: SplImpl,
    /// Take interrupts on a per-CPU `sigaltstack`.
    pub intr_stack: bool,
    /// The directory relative backing files are in.
    pub data_dir: PathBuf,
    /// How long an idle CPU polls before sleeping, µs.
    pub idle_poll_us: u32,
}

/// `[[disk]]`: a DMA disk controller and its `sd` driver.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskSpec {
    /// `sd` and a unit number.
    pub name: String,
    /// The backing file.
    pub file: PathBuf,
    /// Size in bytes, if given (else the existing file's size).
    pub size: Option<u64>,
    /// Bytes per sector.
    pub sector_size: u32,
    /// How the driver maps its I/O.
    pub dvma: DvmaMode,
    /// How the driver completes an I/O.
    pub completion: Completion,
    /// Refuse writes.
    pub read_only: bool,
    /// The CPU that takes the controller's interrupts.
    pub cpu: usize,
    /// Commands the controller accepts at once.
    pub queue_depth: u16,
    /// Largest transfer of one command, bytes.
    pub max_transfer: usize,
    /// Device threads serving the controller.
    pub workers: usize,
    /// Open the backing file with `O_DIRECT`.
    pub o_direct: bool,
    /// A volatile write cache in the controller.
    pub write_cache: bool,
    /// Its capacity, bytes.
    pub write_cache_size: u64,
    /// How the controller does its I/O.
    pub engine: machine::dev::DiskEngine,
    /// Completions gathered before an interrupt.
    pub coalesce_count: u16,
    /// Longest wait for more completions before interrupting, µs (0: none).
    pub coalesce_us: u32,
    /// How long an idle device worker polls before sleeping, µs.
    pub poll_us: u32,
    /// `slots`: DVMA slots reserved at attach.
    pub slots: usize,
    /// `permanent`/`shadow`: the DVMA pool, bytes.
    pub pool: u64,
}

/// `[[ccd]]`: a concatenated or striped disk over `sd` units.
#[derive(Clone, Debug, PartialEq)]
pub struct CcdSpec {
    /// `ccd` and a unit number.
    pub name: String,
    /// The disks, in order.
    pub components: Vec<String>,
    /// Stripe unit, bytes; 0 concatenates.
    pub interleave: u64,
    /// How the driver completes an I/O.
    pub completion: Completion,
    /// Where component buffers come from.
    pub cbufs: CcdBufs,
    /// Refuse writes.
    pub read_only: bool,
}

/// `[[vnd]]`: a disk backed by a host file through a non-DMA file device.
#[derive(Clone, Debug, PartialEq)]
pub struct VndSpec {
    /// `vnd` and a unit number.
    pub name: String,
    /// The backing file.
    pub file: PathBuf,
    /// Size in bytes, if given (else the existing file's size).
    pub size: Option<u64>,
    /// How the driver completes an I/O.
    pub completion: Completion,
    /// Refuse writes.
    pub read_only: bool,
}

/// Where a ccd allocates the buffers of its component I/Os.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CcdBufs {
    /// A pool bound to IPL_BIO (the principled fix).
    Pool,
    /// The general allocator, as in 1995: the configuration of the malloc
    /// race of the mail.
    Kmem,
}

impl CcdBufs {
    /// Every choice.
    pub const ALL: [CcdBufs; 2] = [CcdBufs::Pool, CcdBufs::Kmem];

    /// Its name in the file (`pool`, `kmem`).
    pub const fn name(self) -> &'static str {
        match self {
            CcdBufs::Pool => "pool",
            CcdBufs::Kmem => "kmem",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == s)
    }
}

impl fmt::Display for CcdBufs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl MachineSpec {
    /// The built-in machine used without `--config`: one 256 MiB `sd0` on a
    /// sparse `sd0.img` under `./dvma-data/`, dvma `permanent`, completion
    /// `softint`; the host's cores (at most 64), 256 MiB of memory, spl
    /// `lazy`, interrupt stack on.
    pub fn default_spec() -> Self {
        let base = std::env::current_dir().unwrap_or_default();
        match Self::from_toml(
            DEFAULT_TOML,
            Path::new(BUILTIN),
            &base,
            &Overrides::default(),
        ) {
            Ok(spec) => spec,
            Err(e) => unreachable!("the built-in machine is valid: {e}"),
        }
    }

    /// Load `config` (or the built-in default when `None`), apply
    /// `overrides` and validate. Relative paths are relative to the current
    /// directory.
    pub fn load(config: Option<&Path>, overrides: &Overrides) -> Result<Self> {
        let origin = config.unwrap_or(Path::new(BUILTIN));
        let base = std::env::current_dir().map_err(|source| ConfigError::Io {
            path: origin.to_path_buf(),
            source,
        })?;
        match config {
            None => Self::from_toml(DEFAULT_TOML, origin, &base, overrides),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::from_toml(&text, path, &base, overrides)
            }
        }
    }

    /// Parse the TOML `text` of the file `origin` (used in messages only),
    /// resolve a relative `data_dir` against `base`, apply `overrides` and
    /// validate.
    pub fn from_toml(
        text: &str,
        origin: &Path,
        base: &Path,
        overrides: &Overrides,
    ) -> Result<Self> {
        let cx = Cx { origin };
        let file = cx.parse(text)?;
        let spec = cx.resolve(file, base, overrides)?;
        cx.check(&spec, overrides)?;
        Ok(spec)
    }

    /// Check a spec built or changed in code against every rule of the file.
    pub fn validate(&self) -> Result<()> {
        Cx {
            origin: Path::new("(in memory)"),
        }
        .check(self, &Overrides::default())
    }
}

impl MachineSection {
    /// The machine's configuration: the defaults of
    /// [`MachineConfig::default`] with CPUs, spl, interrupt stack and RAM
    /// from this section.
    pub fn machine_config(&self) -> MachineConfig {
        let mut c = MachineConfig::default();
        c.kernel.ncpu = self.cpus;
        c.kernel.spl = self.spl;
        c.intr_stack = self.intr_stack;
        c.ram_bytes = self.memory;
        c.kernel.idle_poll_ns = u64::from(self.idle_poll_us) * 1000;
        c
    }
}

impl DiskSpec {
    /// The `bus_dma` tag of the disk's driver: [`TagConfig::new`] of its mode
    /// with its largest transfer, slots and pool.
    pub fn tag_config(&self) -> TagConfig {
        let mut t = TagConfig::new(self.dvma);
        t.maxsize = self.max_transfer;
        t.slots = self.slots;
        t.pool_bytes = usize::try_from(self.pool).unwrap_or(usize::MAX);
        t
    }
}

// ---------------------------------------------------------------------------
// Parsing and resolution
// ---------------------------------------------------------------------------

/// The file being read, for messages.
struct Cx<'a> {
    origin: &'a Path,
}

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

    fn required<T>(&self, v: Option<T>, key: String) -> Result<T> {
        v.ok_or_else(|| self.err(key, "missing required key"))
    }

    /// An integer key of type `T` in `lo..=hi`.
    fn int<T: TryFrom<i64>>(&self, key: &str, v: i64, lo: i64, hi: i64) -> Result<T> {
        if (lo..=hi).contains(&v)
            && let Ok(t) = T::try_from(v)
        {
            return Ok(t);
        }
        Err(self.err(key, format!("{v} is not between {lo} and {hi}")))
    }

    fn size(&self, key: &str, v: &SizeValue) -> Result<u64> {
        parse_size(v).map_err(|m| self.err(key, m))
    }

    fn choose<T: Copy>(
        &self,
        key: &str,
        s: &str,
        all: &[T],
        name: fn(T) -> &'static str,
    ) -> Result<T> {
        all.iter().copied().find(|&t| name(t) == s).ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|&t| name(t)).collect();
            self.err(key, format!("{s:?} is not one of {}", names.join(", ")))
        })
    }

    /// A backing file: relative to `data_dir`, normalized.
    fn file(&self, key: &str, s: &str, data_dir: &Path) -> Result<PathBuf> {
        if s.is_empty() {
            return Err(self.err(key, "must not be empty"));
        }
        let p = normalize(&data_dir.join(s));
        if data_dir.starts_with(&p) {
            return Err(self.err(key, format!("{s:?} names a directory, not a file")));
        }
        Ok(p)
    }

    fn resolve(&self, f: FileToml, base: &Path, ov: &Overrides) -> Result<MachineSpec> {
        let m = f.machine.unwrap_or_default();
        let cpus = match (ov.cpus, m.cpus) {
            (Some(n), _) => self.int(
                "--cpus",
                i64::try_from(n).unwrap_or(i64::MAX),
                1,
                MAX_CPUS as i64,
            )?,
            (None, Some(n)) => self.int("machine.cpus", n, 1, MAX_CPUS as i64)?,
            (None, None) => host_cpus(),
        };
        let memory = match &m.memory {
            Some(v) => self.size("machine.memory", v)?,
            None => DEFAULT_MEMORY,
        };
        let spl = match (ov.spl, &m.spl) {
            (Some(s), _) => s,
            (None, Some(s)) => self.choose("machine.spl", s, &SPL_ALL, SplImpl::name)?,
            (None, None) => SplImpl::Lazy,
        };
        let intr_stack = match (ov.intr_stack, &m.intr_stack) {
            (Some(b), _) => b,
            (None, Some(Switch::Bool(b))) => *b,
            (None, Some(Switch::Text(s))) => match s.as_str() {
                "on" => true,
                "off" => false,
                _ => {
                    return Err(self.err(
                        "machine.intr_stack",
                        format!("{s:?} is not one of on, off (or true, false)"),
                    ));
                }
            },
            (None, None) => true,
        };
        let data_dir = match (&ov.data_dir, &m.data_dir) {
            (Some(d), _) if d.as_os_str().is_empty() => {
                return Err(self.err("--data-dir", "must not be empty"));
            }
            (Some(d), _) => d.clone(),
            (None, Some(d)) if d.is_empty() => {
                return Err(self.err("machine.data_dir", "must not be empty"));
            }
            (None, Some(d)) => PathBuf::from(d),
            (None, None) => PathBuf::from(DEFAULT_DATA_DIR),
        };
        let machine = MachineSection {
            cpus,
            memory,
            spl,
            intr_stack,
            data_dir: normalize(&base.join(data_dir)),
            idle_poll_us: match m.idle_poll_us {
                Some(v) => self.int::<u32>("machine.idle_poll_us", v, 0, i64::from(POLL_US_MAX))?,
                None => DEFAULT_POLL_US,
            },
        };
        let dir = &machine.data_dir;

        let disks = f
            .disk
            .iter()
            .enumerate()
            .map(|(i, d)| self.disk(d, &format!("disk[{i}]"), dir, ov))
            .collect::<Result<Vec<_>>>()?;
        let ccds = f
            .ccd
            .iter()
            .enumerate()
            .map(|(i, c)| self.ccd(c, &format!("ccd[{i}]"), ov))
            .collect::<Result<Vec<_>>>()?;
        let vnds = f
            .vnd
            .iter()
            .enumerate()
            .map(|(i, v)| self.vnd(v, &format!("vnd[{i}]"), dir, ov))
            .collect::<Result<Vec<_>>>()?;
        Ok(MachineSpec {
            machine,
            disks,
            ccds,
            vnds,
        })
    }

    fn completion(&self, at: &str, v: &Option<String>, ov: &Overrides) -> Result<Completion> {
        match (ov.completion, v) {
            (Some(c), _) => Ok(c),
            (None, Some(s)) => self.choose(
                &join(at, "completion"),
                s,
                &Completion::ALL,
                Completion::name,
            ),
            (None, None) => Ok(Completion::Softint),
        }
    }

    fn disk(&self, d: &DiskToml, at: &str, dir: &Path, ov: &Overrides) -> Result<DiskSpec> {
        let key = |k: &str| join(at, k);
        let name = self.required(d.name.clone(), key("name"))?;
        let file = self.required(d.file.as_deref(), key("file"))?;
        let int = |k: &str, v: Option<i64>, default: i64, lo: i64, hi: i64| -> Result<i64> {
            self.int(&key(k), v.unwrap_or(default), lo, hi)
        };
        let size = |k: &str, v: &Option<SizeValue>, default: u64| -> Result<u64> {
            v.as_ref().map_or(Ok(default), |v| self.size(&key(k), v))
        };
        let queue_depth = int(
            "queue_depth",
            d.queue_depth,
            64,
            1,
            i64::from(QUEUE_DEPTH_MAX),
        )?;
        Ok(DiskSpec {
            file: self.file(&key("file"), file, dir)?,
            size: d
                .size
                .as_ref()
                .map(|v| self.size(&key("size"), v))
                .transpose()?,
            sector_size: int("sector_size", d.sector_size, 512, 1, i64::from(u32::MAX))? as u32,
            dvma: match (ov.dvma, &d.dvma) {
                (Some(m), _) => m,
                (None, Some(s)) => self.choose(&key("dvma"), s, &DvmaMode::ALL, DvmaMode::name)?,
                (None, None) => DvmaMode::Permanent,
            },
            completion: self.completion(at, &d.completion, ov)?,
            read_only: d.read_only.unwrap_or(false),
            cpu: int("cpu", d.cpu, 0, 0, MAX_CPUS as i64 - 1)? as usize,
            queue_depth: queue_depth as u16,
            max_transfer: usize::try_from(size("max_transfer", &d.max_transfer, M)?)
                .unwrap_or(usize::MAX),
            workers: int("workers", d.workers, 2, 1, WORKERS_MAX as i64)? as usize,
            o_direct: d.o_direct.unwrap_or(false),
            write_cache: d.write_cache.unwrap_or(false),
            write_cache_size: size("write_cache_size", &d.write_cache_size, 16 * M)?,
            engine: match &d.engine {
                Some(s) => self.choose(
                    &key("engine"),
                    s,
                    &machine::dev::DiskEngine::ALL,
                    machine::dev::DiskEngine::name,
                )?,
                None => machine::dev::DiskEngine::Threads,
            },
            coalesce_count: int("coalesce_count", d.coalesce_count, 1, 1, queue_depth)? as u16,
            coalesce_us: int(
                "coalesce_us",
                d.coalesce_us,
                0,
                0,
                i64::from(COALESCE_US_MAX),
            )? as u32,
            poll_us: int(
                "poll_us",
                d.poll_us,
                i64::from(DEFAULT_POLL_US),
                0,
                i64::from(POLL_US_MAX),
            )? as u32,
            slots: int("slots", d.slots, 64, 1, SLOTS_MAX as i64)? as usize,
            pool: size("pool", &d.pool, 64 * M)?,
            name,
        })
    }

    fn ccd(&self, c: &CcdToml, at: &str, ov: &Overrides) -> Result<CcdSpec> {
        let key = |k: &str| join(at, k);
        Ok(CcdSpec {
            name: self.required(c.name.clone(), key("name"))?,
            components: self.required(c.components.clone(), key("components"))?,
            interleave: c
                .interleave
                .as_ref()
                .map_or(Ok(0), |v| self.size(&key("interleave"), v))?,
            completion: self.completion(at, &c.completion, ov)?,
            cbufs: match &c.cbufs {
                Some(s) => self.choose(&key("cbufs"), s, &CcdBufs::ALL, CcdBufs::name)?,
                None => CcdBufs::Pool,
            },
            read_only: c.read_only.unwrap_or(false),
        })
    }

    fn vnd(&self, v: &VndToml, at: &str, dir: &Path, ov: &Overrides) -> Result<VndSpec> {
        let key = |k: &str| join(at, k);
        let name = self.required(v.name.clone(), key("name"))?;
        let file = self.required(v.file.as_deref(), key("file"))?;
        Ok(VndSpec {
            name,
            file: self.file(&key("file"), file, dir)?,
            size: v
                .size
                .as_ref()
                .map(|s| self.size(&key("size"), s))
                .transpose()?,
            completion: self.completion(at, &v.completion, ov)?,
            read_only: v.read_only.unwrap_or(false),
        })
    }

    // -----------------------------------------------------------------------
    // Validation of a resolved spec
    // -----------------------------------------------------------------------

    fn range<T: Into<u64> + Copy + fmt::Display>(
        &self,
        key: &str,
        v: T,
        lo: T,
        hi: T,
    ) -> Result<()> {
        if (lo.into()..=hi.into()).contains(&v.into()) {
            Ok(())
        } else {
            Err(self.err(key, format!("{v} is not between {lo} and {hi}")))
        }
    }

    fn name(&self, key: String, name: &str, prefix: &str) -> Result<()> {
        let ok = name
            .strip_prefix(prefix)
            .is_some_and(|unit| !unit.is_empty() && unit.bytes().all(|b| b.is_ascii_digit()));
        if ok {
            Ok(())
        } else {
            Err(self.err(
                key,
                format!("{name:?} does not match {prefix}[0-9]+ ({prefix} and a unit number, e.g. {prefix}0)"),
            ))
        }
    }

    fn device_size(&self, key: String, size: Option<u64>, sector: u32) -> Result<()> {
        match size {
            Some(s) if s == 0 || !s.is_multiple_of(u64::from(sector)) => Err(self.err(
                key,
                format!(
                    "{} is not a positive multiple of the {sector}-byte sector",
                    show(s)
                ),
            )),
            _ => Ok(()),
        }
    }

    fn check(&self, spec: &MachineSpec, ov: &Overrides) -> Result<()> {
        let m = &spec.machine;
        let by = |set: bool, flag: &str| {
            if set {
                format!(" (set by {flag})")
            } else {
                String::new()
            }
        };
        self.range("machine.cpus", m.cpus as u64, 1, MAX_CPUS as u64)?;
        if !(MEMORY_MIN..=MEMORY_MAX).contains(&m.memory) || !m.memory.is_multiple_of(PAGE) {
            return Err(self.err(
                "machine.memory",
                format!(
                    "{} is not a multiple of 4K between {} and {}",
                    show(m.memory),
                    show(MEMORY_MIN),
                    show(MEMORY_MAX)
                ),
            ));
        }

        for (i, d) in spec.disks.iter().enumerate() {
            let key = |k: &str| format!("disk[{i}].{k}");
            self.name(key("name"), &d.name, "sd")?;
            if !SECTOR_SIZES.contains(&d.sector_size) {
                return Err(self.err(
                    key("sector_size"),
                    format!("{} is not one of 512, 1024, 2048, 4096", d.sector_size),
                ));
            }
            self.device_size(key("size"), d.size, d.sector_size)?;
            if d.cpu >= m.cpus {
                return Err(self.err(
                    key("cpu"),
                    format!(
                        "{} is not a CPU of this machine: cpus = {}{}, so 0 to {}",
                        d.cpu,
                        m.cpus,
                        by(ov.cpus.is_some(), "--cpus"),
                        m.cpus - 1
                    ),
                ));
            }
            self.range(&key("queue_depth"), d.queue_depth, 1, QUEUE_DEPTH_MAX)?;
            if !d.max_transfer.is_power_of_two()
                || !(MAX_TRANSFER_MIN..=MAX_TRANSFER_MAX).contains(&d.max_transfer)
            {
                return Err(self.err(
                    key("max_transfer"),
                    format!(
                        "{} is not a power of two between 4K and 32M (4K, 8K, 16K, ... 1M, ... 32M)",
                        show(d.max_transfer as u64)
                    ),
                ));
            }
            self.range(&key("workers"), d.workers as u64, 1, WORKERS_MAX as u64)?;
            self.range(&key("coalesce_count"), d.coalesce_count, 1, d.queue_depth)?;
            self.range(&key("coalesce_us"), d.coalesce_us, 0, COALESCE_US_MAX)?;
            self.range(&key("poll_us"), d.poll_us, 0, POLL_US_MAX)?;
            self.range(&key("slots"), d.slots as u64, 1, SLOTS_MAX as u64)?;
            if !d.write_cache_size.is_multiple_of(PAGE)
                || !(PAGE..=1024 * M).contains(&d.write_cache_size)
            {
                return Err(self.err(
                    key("write_cache_size"),
                    format!(
                        "{} is not a multiple of 4K between 4K and 1G",
                        show(d.write_cache_size)
                    ),
                ));
            }
            if d.pool == 0 || !d.pool.is_multiple_of(PAGE) {
                return Err(self.err(
                    key("pool"),
                    format!("{} is not a positive multiple of 4K", show(d.pool)),
                ));
            }
            if uses_pool(d.dvma) && d.pool < d.max_transfer as u64 {
                return Err(self.err(
                    key("pool"),
                    format!(
                        "{} is smaller than max_transfer ({}): a {} pool must hold one transfer",
                        show(d.pool),
                        show(d.max_transfer as u64),
                        d.dvma
                    ),
                ));
            }
        }
        for (i, v) in spec.vnds.iter().enumerate() {
            self.name(format!("vnd[{i}].name"), &v.name, "vnd")?;
            self.device_size(format!("vnd[{i}].size"), v.size, SECTOR as u32)?;
        }
        for (i, c) in spec.ccds.iter().enumerate() {
            self.name(format!("ccd[{i}].name"), &c.name, "ccd")?;
        }

        // Names, over every section.
        let mut names: HashMap<&str, (String, Kind)> = HashMap::new();
        let all = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (&d.name, format!("disk[{i}]"), Kind::Disk(i)))
            .chain(
                spec.ccds
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (&c.name, format!("ccd[{i}]"), Kind::Ccd)),
            )
            .chain(
                spec.vnds
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (&v.name, format!("vnd[{i}]"), Kind::Vnd)),
            );
        for (name, at, kind) in all {
            if let Some((first, _)) = names.get(name.as_str()) {
                return Err(self.err(
                    format!("{at}.name"),
                    format!("{name:?} is already the name of {first}"),
                ));
            }
            names.insert(name, (at, kind));
        }

        // Backing files.
        let mut files: HashMap<&Path, String> = HashMap::new();
        let all = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (&d.file, format!("disk[{i}]")))
            .chain(
                spec.vnds
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (&v.file, format!("vnd[{i}]"))),
            );
        for (file, at) in all {
            if let Some(first) = files.get(file.as_path()) {
                return Err(self.err(
                    format!("{at}.file"),
                    format!("{} is already the file of {first}", file.display()),
                ));
            }
            files.insert(file, at);
        }

        // ccds.
        let mut owner: HashMap<&str, String> = HashMap::new();
        for (i, c) in spec.ccds.iter().enumerate() {
            let at = format!("ccd[{i}]");
            if c.components.is_empty() {
                return Err(self.err(
                    format!("{at}.components"),
                    "a ccd needs at least 1 component",
                ));
            }
            let disk_names: Vec<&str> = spec.disks.iter().map(|d| d.name.as_str()).collect();
            let mut first: Option<&DiskSpec> = None;
            for (j, comp) in c.components.iter().enumerate() {
                let key = format!("{at}.components[{j}]");
                let d = match names.get(comp.as_str()) {
                    Some((_, Kind::Disk(k))) => &spec.disks[*k],
                    Some((where_, kind)) => {
                        return Err(self.err(
                            key,
                            format!(
                                "{comp:?} is a {} ({where_}), not a disk: ccd components must be [[disk]] units",
                                kind.name()
                            ),
                        ));
                    }
                    None => {
                        let known = if disk_names.is_empty() {
                            "there are no disks".to_owned()
                        } else {
                            format!("the disks are {}", disk_names.join(", "))
                        };
                        return Err(self.err(key, format!("{comp:?} is not a disk; {known}")));
                    }
                };
                if let Some(prev) = owner.get(comp.as_str()) {
                    return Err(self.err(key, format!("{comp:?} is already used as {prev}")));
                }
                owner.insert(comp, format!("{at}.components[{j}]"));
                if !c.read_only && d.read_only {
                    return Err(self.err(
                        key,
                        format!(
                            "{comp:?} is read_only but {} is not (set {at}.read_only = true)",
                            c.name
                        ),
                    ));
                }
                match first {
                    None => first = Some(d),
                    Some(f) if f.sector_size != d.sector_size => {
                        return Err(self.err(
                            key,
                            format!(
                                "{comp:?} has {}-byte sectors but {} has {}: the components of a ccd must have one sector size",
                                d.sector_size, f.name, f.sector_size
                            ),
                        ));
                    }
                    Some(f) if f.dvma != d.dvma => {
                        return Err(self.err(
                            key,
                            format!(
                                "{comp:?} uses dvma {} but {} uses {}: the components of a ccd must use one DVMA mode",
                                d.dvma, f.name, f.dvma
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
            let sector = first
                .map_or(SECTOR, |f| u64::from(f.sector_size))
                .max(SECTOR);
            if !c.interleave.is_multiple_of(sector) {
                return Err(self.err(
                    format!("{at}.interleave"),
                    format!(
                        "{} is not a multiple of {sector} (the components' sector size); 0 concatenates",
                        c.interleave
                    ),
                ));
            }
        }

        // Memory for the pools.
        let pools: Vec<(&DiskSpec, u64)> = spec
            .disks
            .iter()
            .filter(|d| uses_pool(d.dvma))
            .map(|d| (d, d.pool))
            .collect();
        let sum: u64 = pools.iter().map(|&(_, p)| p).sum();
        if sum.saturating_add(MEMORY_SLACK) > m.memory {
            let terms: Vec<String> = pools
                .iter()
                .map(|(d, p)| format!("{} {} ({})", d.name, show(*p), d.dvma))
                .collect();
            return Err(self.err(
                "machine.memory",
                format!(
                    "{} cannot hold the DVMA pools{}: {} = {}, plus {} for the kernel and I/O buffers, needs at least {}",
                    show(m.memory),
                    by(ov.dvma.is_some(), "--dvma"),
                    terms.join(" + "),
                    show(sum),
                    show(MEMORY_SLACK),
                    show(sum + MEMORY_SLACK)
                ),
            ));
        }
        Ok(())
    }
}

/// What a name is.
#[derive(Clone, Copy)]
enum Kind {
    Disk(usize),
    Ccd,
    Vnd,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Disk(_) => "disk",
            Kind::Ccd => "ccd",
            Kind::Vnd => "vnd",
        }
    }
}

fn uses_pool(mode: DvmaMode) -> bool {
    matches!(mode, DvmaMode::Permanent | DvmaMode::Shadow)
}

fn host_cpus() -> usize {
    std::thread::available_parallelism()
        .map_or(1, NonZero::get)
        .min(MAX_CPUS)
}

/// `p` without `.` and with `..` applied (lexically).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `..` of the root is the root.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                // Above a relative start: kept.
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    out
}
