//! Resolution: the file's sections, with the command-line overrides, into a
//! [`MachineSpec`]: defaults filled in, sizes in bytes, names parsed, paths
//! joined to `data_dir`.

use std::num::NonZero;
use std::path::{Component, Path, PathBuf};

use kern::Completion;
use kern::bus_dma::DvmaMode;
use machine::SplImpl;

use super::file::{CcdToml, DiskToml, FileToml, SizeValue, Switch, VndToml, parse_size};
use super::{
    COALESCE_US_MAX, CcdBufs, CcdSpec, Cx, DEFAULT_DATA_DIR, DEFAULT_IDLE_POLL_US, DEFAULT_MEMORY,
    DEFAULT_POLL_US, DiskSpec, M, MAX_CPUS, MachineSection, MachineSpec, Overrides, POLL_US_MAX,
    QUEUE_DEPTH_MAX, Result, SLOTS_MAX, SPL_ALL, VndSpec, WORKERS_MAX, join,
};

impl Cx<'_> {
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

    pub(super) fn resolve(&self, f: FileToml, base: &Path, ov: &Overrides) -> Result<MachineSpec> {
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
                None => DEFAULT_IDLE_POLL_US,
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
                // Run to completion: the vCPU submits and reaps itself;
                // the thread engine where the uring one cannot go (a
                // write cache, or no io_uring on this host).
                None if d.write_cache != Some(true)
                    && machine::dev::DiskEngine::uring_available() =>
                {
                    machine::dev::DiskEngine::Uring
                }
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
}

fn host_cpus() -> usize {
    std::thread::available_parallelism()
        .map_or(1, NonZero::get)
        .min(MAX_CPUS)
}

/// `p` without `.` and with `..` applied (lexically).
pub(super) fn normalize(p: &Path) -> PathBuf {
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
