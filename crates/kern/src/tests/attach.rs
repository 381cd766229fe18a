//! The drivers' attach errors: the checks made before anything is
//! allocated from the kernel return the variant, with its fields, that
//! names what is wrong (no kernel is booted here).

use alloc::string::{String, ToString};
use alloc::vec;

use crate::bio::{BlockDev, BufBox, BufqStrategy};
use crate::bus_dma::{DvmaMode, TagConfig};
use crate::completion::Completion;
use crate::dev::ccd::{self, CbufAlloc, Ccd, CcdConfig};
use crate::dev::sd::{self, Sd, SdConfig};
use crate::dev::{DiskCmd, DiskController, DiskDone, DiskGeometry};
use crate::fake::keep;
use crate::intr::IntrHandle;

/// A controller that only has a geometry.
struct Geometry(DiskGeometry);

impl DiskController for Geometry {
    fn geometry(&self) -> DiskGeometry {
        self.0
    }
    fn submit(&self, _: DiskCmd) -> bool {
        false
    }
    fn doorbell(&self) {}
    fn reap(&self) -> Option<DiskDone> {
        None
    }
    fn set_interrupt(&self, _: usize, _: IntrHandle) {}
}

/// A block device that only has a size.
struct Sectors(&'static str, u64);

impl BlockDev for Sectors {
    fn name(&self) -> &'static str {
        self.0
    }
    fn sectors(&self) -> u64 {
        self.1
    }
    fn read_only(&self) -> bool {
        false
    }
    fn max_transfer(&self) -> usize {
        64 << 10
    }
    fn strategy(&self, _: BufBox) {
        unreachable!("no I/O in these tests")
    }
    fn describe(&self) -> String {
        self.0.to_string()
    }
}

fn sd_config() -> SdConfig {
    SdConfig {
        name: "sd3",
        parent: "dmadisk3",
        dma: TagConfig::new(DvmaMode::Strict),
        completion: Completion::Intr,
        cpu: 0,
        bufq: BufqStrategy::Fcfs,
        read_only: false,
    }
}

#[test]
fn sd_refuses_a_sector_size_it_does_not_address() {
    let ctrl: &'static Geometry = keep(Geometry(DiskGeometry {
        sectors: 1 << 20,
        sector_size: 4096,
        max_transfer: 64 << 10,
        queue_depth: 8,
    }));
    let Err(e) = Sd::attach(sd_config(), ctrl) else {
        panic!("a 4096-byte-sector controller attached");
    };
    assert_eq!(
        e,
        sd::AttachError::SectorSize {
            unit: "sd3",
            got: 4096,
            want: 512,
        }
    );
    assert_eq!(e.to_string(), "sd3: sector size 4096 (only 512)");
}

fn ccd_config(components: vec::Vec<&'static dyn BlockDev>, interleave: u64) -> CcdConfig {
    CcdConfig {
        name: "ccd1",
        components,
        interleave,
        completion: Completion::Intr,
        cpu: 0,
        cbufs: CbufAlloc::Pool,
        pool_size: 4,
        read_only: false,
    }
}

#[test]
fn ccd_without_components_says_so() {
    let Err(e) = Ccd::attach(ccd_config(vec![], 0)) else {
        panic!("a ccd of nothing attached");
    };
    assert_eq!(e, ccd::AttachError::NoComponents { unit: "ccd1" });
    assert_eq!(e.to_string(), "ccd1: no components");
}

#[test]
fn ccd_below_one_stripe_names_the_smallest_component_and_the_interleave() {
    let a: &'static dyn BlockDev = keep(Sectors("sd0", 100));
    let b: &'static dyn BlockDev = keep(Sectors("sd1", 7));
    let Err(e) = Ccd::attach(ccd_config(vec![a, b], 16)) else {
        panic!("a ccd with a 7-sector component and a 16-sector interleave attached");
    };
    assert_eq!(
        e,
        ccd::AttachError::TooSmall {
            unit: "ccd1",
            smallest: 7,
            interleave: 16,
        }
    );
    let text = e.to_string();
    assert!(
        text.starts_with("ccd1: components too small for the interleave") && text.contains('7'),
        "{text}"
    );
}

#[test]
fn a_completer_error_passes_through_a_driver_unchanged() {
    use crate::dev::completer;
    use crate::sched::SchedError;
    let inner = completer::AttachError::Thread {
        unit: "vnd0",
        cpu: 3,
        source: SchedError::NoSuchCpu { cpu: 3, ncpu: 2 },
    };
    let outer = crate::dev::vnd::AttachError::from(inner.clone());
    assert_eq!(outer.to_string(), inner.to_string());
    assert!(
        core::error::Error::source(&inner)
            .is_some_and(|s| s.to_string() == SchedError::NoSuchCpu { cpu: 3, ncpu: 2 }.to_string())
    );
}
