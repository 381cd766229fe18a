//! The resolved machine: the types [`MachineSpec`] is made of, and how a
//! spec is loaded (read, resolved, checked).

use std::fmt;
use std::path::{Path, PathBuf};

use kern::Completion;
use kern::bus_dma::{DvmaMode, TagConfig};
use machine::{MachineConfig, SplImpl};

use super::{BUILTIN, ConfigError, Cx, Overrides, Result};

/// The built-in machine, as a file. `cpus` is left to its default.
const DEFAULT_TOML: &str = r#"
[[disk]]
name = "sd0"
file = "sd0.img"
size = "256M"
"#;

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
