//! Building a running system from a [`MachineSpec`]: boot the machine,
//! create the devices, attach the drivers (autoconfiguration), print what
//! was found, and take it all down again in order.

use std::fmt::Write as _;
use std::path::PathBuf;

use kern::bio::{BioError, BlockDev, bdev_attach, bdev_lookup, bdevs, bio_init};
use kern::dev::ccd::{self, CbufAlloc, Ccd, CcdConfig};
use kern::dev::sd::{self, Sd, SdConfig};
use kern::dev::vnd::{self, Vnd, VndConfig};
use machine::dev::disk::{DiskConfig, DmaDisk};
use machine::dev::file::{FileConfig, FileDev};
use machine::{Machine, MachineError};

use crate::config::{CcdBufs, ConfigError, MachineSpec};

/// Why a system did not boot. Every variant names what failed; the
/// drivers' own errors pass through unchanged.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A disk asks for sectors other than the buf layer's.
    #[error(
        "disk {disk}: sector_size {got} is not supported: only {want}-byte sectors are implemented (the DMA disk, sd and the buf layer address 512-byte sectors); remove sector_size or set it to {want}"
    )]
    SectorSize {
        /// The disk's name.
        disk: String,
        /// Its configured sector size.
        got: u32,
        /// The only one supported (`DEV_BSIZE`).
        want: usize,
    },
    /// A backing file could not be prepared.
    #[error(transparent)]
    Backing(#[from] ConfigError),
    /// The machine did not boot.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// A DMA disk controller could not be created.
    #[error("dmadisk{index} ({}): {source}", file.display())]
    Disk {
        /// Its unit number.
        index: usize,
        /// Its backing file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file device could not be created.
    #[error("filedev{index} ({}): {source}", file.display())]
    FileDev {
        /// Its unit number.
        index: usize,
        /// Its backing file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// sd did not attach.
    #[error(transparent)]
    Sd(#[from] sd::AttachError),
    /// ccd did not attach.
    #[error(transparent)]
    Ccd(#[from] ccd::AttachError),
    /// vnd did not attach.
    #[error(transparent)]
    Vnd(#[from] vnd::AttachError),
    /// A ccd names a component that is not attached.
    #[error("{ccd}: no component {component}")]
    NoComponent {
        /// The ccd.
        ccd: String,
        /// The missing component.
        component: String,
    },
    /// A unit could not enter the block device switch (a duplicate name,
    /// or the switch is full).
    #[error("{unit}: bdev_attach: {source}")]
    Bdev {
        /// The unit.
        unit: String,
        /// Why.
        #[source]
        source: BioError,
    },
}

/// System buffers (`struct buf`s) in the pool.
pub const NBUF: usize = 4096;

/// A booted system.
pub struct System {
    /// The machine.
    pub machine: Machine,
    /// What it was built from.
    pub spec: MachineSpec,
    /// Disk controllers, by unit name.
    pub disks: Vec<(String, &'static DmaDisk)>,
    /// File devices, by unit name.
    pub files: Vec<(String, &'static FileDev)>,
    /// sd units.
    pub sds: Vec<&'static Sd>,
    /// ccd units.
    pub ccds: Vec<&'static Ccd>,
    /// vnd units.
    pub vnds: Vec<&'static Vnd>,
    /// The boot messages.
    pub messages: Vec<String>,
    down: bool,
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

impl System {
    /// Boot `spec`: prepare the backing files, boot the machine, attach
    /// every device. Host context.
    pub fn boot(spec: MachineSpec) -> Result<System, BootError> {
        for d in &spec.disks {
            let bs = kern::bio::DEV_BSIZE;
            if d.sector_size != bs as u32 {
                // The DMA disk, sd and the whole buf layer address 512-byte
                // sectors (DEV_BSIZE); a larger sector would need all three.
                return Err(BootError::SectorSize {
                    disk: d.name.clone(),
                    got: d.sector_size,
                    want: bs,
                });
            }
        }
        for b in spec.backing_files() {
            b.prepare()?;
        }
        let m = &spec.machine;
        let machine = Machine::boot(m.machine_config())?;
        let x = machine.xsave();
        let mut sys = System {
            machine,
            spec: spec.clone(),
            disks: Vec::new(),
            files: Vec::new(),
            sds: Vec::new(),
            ccds: Vec::new(),
            vnds: Vec::new(),
            messages: Vec::new(),
            down: false,
        };
        sys.messages.push(format!(
            "dvma: {} cpu{}, {} MiB memory, spl {}, interrupt stack {}, {} byte XSAVE{} area",
            m.cpus,
            if m.cpus == 1 { "" } else { "s" },
            m.memory >> 20,
            m.spl.name(),
            if m.intr_stack { "on" } else { "off" },
            x.size,
            if x.xsavec { "C" } else { "" },
        ));
        if let Err(e) = sys.attach_all() {
            let _ = sys.shutdown_inner();
            return Err(e);
        }
        Ok(sys)
    }

    fn attach_all(&mut self) -> Result<(), BootError> {
        bio_init(NBUF);
        let window = self.machine.window();
        let spec = self.spec.clone();
        for (i, d) in spec.disks.iter().enumerate() {
            let mut dc = DiskConfig::new(&d.file, d.size.unwrap_or(0));
            dc.create = false; // prepared above
            dc.o_direct = d.o_direct;
            dc.write_cache = d.write_cache;
            dc.engine = d.engine;
            dc.write_cache_bytes = usize::try_from(d.write_cache_size).unwrap_or(usize::MAX);
            dc.max_transfer = d.max_transfer;
            dc.queue_depth = d.queue_depth;
            dc.workers = d.workers;
            dc.coalesce_count = d.coalesce_count as u32;
            dc.coalesce_ns = d.coalesce_us as u64 * 1000;
            dc.read_only = d.read_only;
            dc.spin_ns = u64::from(d.poll_us) * 1000;
            let disk =
                DmaDisk::leak(DmaDisk::open(window, dc).map_err(|source| BootError::Disk {
                    index: i,
                    file: d.file.clone(),
                    source,
                })?);
            self.disks.push((d.name.clone(), disk));
            self.messages.push(format!(
                "dmadisk{i} at mainbus: {}, {}, queue depth {}, coalescing {} / {} us{}{}",
                d.file.display(),
                match d.engine {
                    machine::dev::DiskEngine::Uring => "io_uring".to_owned(),
                    machine::dev::DiskEngine::Threads => format!("{} workers", d.workers),
                },
                d.queue_depth,
                d.coalesce_count,
                d.coalesce_us,
                if d.o_direct { ", O_DIRECT" } else { "" },
                if d.write_cache {
                    format!(", write cache {} KiB", d.write_cache_size >> 10)
                } else {
                    String::new()
                }
            ));
            let sd = Sd::attach(
                SdConfig {
                    name: leak(&d.name),
                    parent: leak(&format!("dmadisk{i}")),
                    dma: d.tag_config(),
                    completion: d.completion,
                    cpu: d.cpu,
                    bufq: kern::bio::BufqStrategy::Disksort,
                    read_only: d.read_only,
                },
                disk,
            )?;
            bdev_attach(sd).map_err(|source| BootError::Bdev {
                unit: d.name.clone(),
                source,
            })?;
            self.messages.push(sd.describe());
            self.sds.push(sd);
        }
        for c in &spec.ccds {
            let comps = c
                .components
                .iter()
                .map(|n| {
                    bdev_lookup(n).ok_or_else(|| BootError::NoComponent {
                        ccd: c.name.clone(),
                        component: n.clone(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ccd = Ccd::attach(CcdConfig {
                name: leak(&c.name),
                components: comps,
                interleave: c.interleave / kern::bio::DEV_BSIZE as u64,
                completion: c.completion,
                cpu: 0,
                cbufs: match c.cbufs {
                    CcdBufs::Pool => CbufAlloc::Pool,
                    CcdBufs::Kmem => CbufAlloc::Kmem,
                },
                pool_size: 1024,
                read_only: c.read_only,
            })?;
            bdev_attach(ccd).map_err(|source| BootError::Bdev {
                unit: c.name.clone(),
                source,
            })?;
            self.messages.push(ccd.describe());
            self.ccds.push(ccd);
        }
        for (i, v) in spec.vnds.iter().enumerate() {
            let mut fc = FileConfig::new(&v.file, v.size.unwrap_or(0));
            fc.create = false;
            fc.read_only = v.read_only;
            fc.spin_ns = u64::from(spec.machine.idle_poll_us) * 1000;
            let dev = FileDev::leak(FileDev::open(fc).map_err(|source| BootError::FileDev {
                index: i,
                file: v.file.clone(),
                source,
            })?);
            self.files.push((v.name.clone(), dev));
            self.messages
                .push(format!("filedev{i} at mainbus: {}", v.file.display()));
            let vnd = Vnd::attach(
                VndConfig {
                    name: leak(&v.name),
                    parent: leak(&format!("filedev{i}")),
                    completion: v.completion,
                    cpu: 0,
                    slots: 64,
                    max_transfer: 1 << 20,
                    read_only: v.read_only,
                },
                dev,
            )?;
            bdev_attach(vnd).map_err(|source| BootError::Bdev {
                unit: v.name.clone(),
                source,
            })?;
            self.messages.push(vnd.describe());
            self.vnds.push(vnd);
        }
        Ok(())
    }

    /// Every attached block device.
    pub fn bdevs(&self) -> Vec<&'static dyn BlockDev> {
        bdevs()
    }

    /// The statistics, as `vmstat -i` and friends would show them.
    pub fn stats(&self) -> String {
        let mut s = self.machine.stats().to_string();
        let w = &self.machine.window().stats;
        let _ = writeln!(
            s,
            "DVMA window: {} maps, {} unmaps, {} device accesses, {} IOMMU faults",
            w.enters.load(std::sync::atomic::Ordering::Relaxed),
            w.removes.load(std::sync::atomic::Ordering::Relaxed),
            w.accesses.load(std::sync::atomic::Ordering::Relaxed),
            w.faults.load(std::sync::atomic::Ordering::Relaxed),
        );
        let devs: Vec<(&str, Vec<(&'static str, u64)>)> = self
            .disks
            .iter()
            .map(|(n, d)| (n.as_str(), d.stats().fields()))
            .chain(
                self.files
                    .iter()
                    .map(|(n, d)| (n.as_str(), d.stats().fields())),
            )
            .collect();
        if let Some((_, first)) = devs.first() {
            // One row per counter, one column per device (as the CPU tables).
            let _ = write!(s, "\n{:<22}", "device");
            for (name, _) in &devs {
                let _ = write!(s, " {name:>14}");
            }
            let _ = writeln!(s);
            for (i, (field, _)) in first.iter().enumerate() {
                let _ = write!(s, "{:<22}", field.replace('_', " "));
                for (_, f) in &devs {
                    let _ = write!(s, " {:>14}", f[i].1);
                }
                let _ = writeln!(s);
            }
        }
        s
    }

    /// Stop the devices and the machine; returns the final statistics.
    pub fn shutdown(mut self) -> Result<String, MachineError> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<String, MachineError> {
        if self.down {
            return Ok(String::new());
        }
        self.down = true;
        let stats = self.stats();
        // Devices first (they finish what they hold, with interrupts the
        // kernel still takes), then the CPUs.
        for (_, d) in &self.disks {
            d.stop();
        }
        for (_, f) in &self.files {
            f.stop();
        }
        self.machine.shutdown_ref()?;
        Ok(stats)
    }
}

impl Drop for System {
    fn drop(&mut self) {
        let _ = self.shutdown_inner();
    }
}
