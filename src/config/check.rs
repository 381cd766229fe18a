//! Validation: every rule of the file, checked on a resolved
//! [`MachineSpec`] (so that a spec built or changed in code is checked as a
//! file is).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use kern::bus_dma::DvmaMode;

use super::file::show;
use super::{
    COALESCE_US_MAX, Cx, DiskSpec, M, MAX_CPUS, MAX_TRANSFER_MAX, MAX_TRANSFER_MIN, MEMORY_MAX,
    MEMORY_MIN, MEMORY_SLACK, MachineSpec, Overrides, PAGE, POLL_US_MAX, QUEUE_DEPTH_MAX, Result,
    SECTOR, SECTOR_SIZES, SLOTS_MAX, WORKERS_MAX,
};

impl Cx<'_> {
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

    pub(super) fn check(&self, spec: &MachineSpec, ov: &Overrides) -> Result<()> {
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
