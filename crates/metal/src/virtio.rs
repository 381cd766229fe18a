//! virtio-blk over modern (1.x) virtio-pci: a `kern::dev::DiskController`
//! for kern's `sd` driver.
//!
//! QEMU's `-device virtio-blk-pci,disable-legacy=on` is PCI function
//! 1af4:1042. [`VirtioBlk::probe`] finds its four vendor capabilities
//! (common configuration, notify, ISR, device configuration) and its
//! MSI-X capability, maps their BARs uncached, and brings the device up:
//! reset, ACKNOWLEDGE, DRIVER, features (only `VIRTIO_F_VERSION_1`),
//! FEATURES_OK, queue 0 (a split virtqueue in zeroed heap RAM, which is
//! identity-mapped: its address is its physical address), DRIVER_OK.
//!
//! # Commands
//! `sd` gives command slot ids below [`DiskGeometry::queue_depth`]; slot
//! `s` owns descriptors `[s * DPS, (s + 1) * DPS)`: the request header
//! (type, sector), the data (one descriptor per physically contiguous
//! piece, at most 17 for a 64 KiB transfer), and the status byte. The data
//! IOVA is translated by [`crate::iommu::SoftIommu`] when there is no
//! IOMMU (the device sees physical addresses); a command whose IOVA is not
//! mapped with the right it needs is not given to the device but completed
//! at once with [`DiskStatus::DmaFault`], and its interrupt raised.
//!
//! Behind VT-d ([`crate::vtd`]) the driver negotiates
//! `VIRTIO_F_ACCESS_PLATFORM`, maps its queue memory at [`RING_IOVA`] (plus
//! 16 KiB per disk index: the disks share one VT-d domain), and
//! gives the device the command's IOVA as one data descriptor: the unit
//! translates every access. QEMU's virtio-blk completes a request whose
//! data access the unit blocked with status OK; the unit's fault record
//! for an IOVA of the command ([`crate::vtd::Vtd::faulted_in`], checked at
//! reap) is what fails it with [`DiskStatus::DmaFault`].
//!
//! # Completions
//! MSI-X vector 0 of the device is queue 0's; [`VirtioBlk::set_interrupt`]
//! points its message at the chosen CPU's local APIC with
//! [`crate::intr::DISK`] plus the disk's index (a vector of IPL_BIO's
//! priority class, one per disk, so several disks interrupt apart), and the
//! trap of that vector marks the kern interrupt pending on that CPU
//! ([`crate::intr::route_disk`]), as the Linux machine's devices post
//! theirs: the handler, and whichever completion mode it hands the work
//! to, reaps the used ring through [`DiskController::reap`].
//!
//! # Contexts
//! `probe`: the boot CPU at boot, before the other CPUs start (it maps
//! registers uncached). The `DiskController` methods: any kernel context,
//! interrupt handlers included; the ring state is behind one kern spin
//! mutex at IPL_BIO (the level of the disk's interrupt), so thread code
//! holding it cannot be interrupted by the disk's handler on its CPU, and
//! nothing here allocates.

use alloc::alloc::{Layout, alloc_zeroed};
use core::sync::atomic::{AtomicU64, Ordering::*, fence};

use kern::dev::{DiskCmd, DiskController, DiskDone, DiskGeometry, DiskOp, DiskStatus};
use kern::intr::IntrHandle;
use kern::ipl::Ipl;
use kern::lock::SpinMutex;

use crate::iommu::SOFT_IOMMU;
use crate::pci::{CMD_BUS_MASTER, CMD_INTX_DISABLE, CMD_MEMORY};

/// PCI vendor of virtio devices.
pub const VENDOR: u16 = 0x1af4;
/// A modern (non-transitional) virtio block device.
pub const DEVICE_BLK: u16 = 0x1042;

/// Descriptors per command slot: header, up to 17 data pieces, status.
const DPS: usize = 19;
/// Largest transfer of one command.
const MAX_TRANSFER: usize = 64 << 10;
/// Most entries of the queue used.
const QMAX: u16 = 256;
/// Most command slots.
const MAXSLOTS: usize = 32;

const STATUS_ACK: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 128;

const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

const REQ_IN: u32 = 0;
const REQ_OUT: u32 = 1;
const REQ_FLUSH: u32 = 4;

// Common configuration registers (virtio 1.x, 4.1.4.3).
const C_DFSELECT: usize = 0;
const C_DF: usize = 4;
const C_GFSELECT: usize = 8;
const C_GF: usize = 12;
const C_MSIX_CONFIG: usize = 16;
const C_STATUS: usize = 20;
const C_Q_SELECT: usize = 22;
const C_Q_SIZE: usize = 24;
const C_Q_MSIX: usize = 26;
const C_Q_ENABLE: usize = 28;
const C_Q_NOTIFY_OFF: usize = 30;
const C_Q_DESC: usize = 32;
const C_Q_DRIVER: usize = 40;
const C_Q_DEVICE: usize = 48;

/// Ring state, behind the IPL_BIO mutex.
struct Ring {
    /// The next avail index to publish.
    avail: u16,
    /// The used index reaped up to.
    used: u16,
    /// Commands completed without the device (DMA fault, invalid).
    early: [(u16, DiskStatus); MAXSLOTS],
    nearly: usize,
}

/// A virtio-blk device.
pub struct VirtioBlk {
    /// Its index among the disks (its vector is `DISK + index`).
    index: usize,
    /// Its PCI requester id (VT-d fault records name it).
    sid: u16,
    common: usize,
    notify: usize,
    msix_table: usize,
    /// The queue memory: descriptors, avail ring, used ring, headers,
    /// status bytes (identity-mapped: addresses are physical).
    mem: usize,
    /// The device address of `mem`: `mem` itself without an IOMMU, its
    /// IOVA ([`RING_IOVA`]) behind VT-d.
    mem_dev: u64,
    /// Behind VT-d: data descriptors carry the IOVA itself.
    vtd: bool,
    qsize: u16,
    depth: u16,
    sectors: u64,
    ring: SpinMutex<Ring>,
    /// The local APIC id the completions interrupt, or `u64::MAX` before
    /// `set_interrupt`.
    intr: AtomicU64,
    /// Behind VT-d: each slot's data IOVA and length (`iova << 20 | len`
    /// would not fit: two words), for matching the unit's faults.
    spans: [[AtomicU64; 2]; MAXSLOTS],
    /// Commands given to the device.
    pub submitted: AtomicU64,
    /// Commands completed by the device.
    pub completed: AtomicU64,
    /// Commands that faulted in translation (never reached the device).
    pub dma_faults: AtomicU64,
}

impl core::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "VirtioBlk({} sectors, queue {}, depth {})",
            self.sectors, self.qsize, self.depth
        )
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn r8(a: usize) -> u8 {
    // SAFETY: every caller passes a register of the device's mapped BARs.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn w8(a: usize, v: u8) {
    // SAFETY: as `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u8, v) }
}
fn r16(a: usize) -> u16 {
    // SAFETY: as `r8`, or the rings of queue memory this driver owns.
    unsafe { core::ptr::read_volatile(a as *const u16) }
}
fn w16(a: usize, v: u16) {
    // SAFETY: as `r16`.
    unsafe { core::ptr::write_volatile(a as *mut u16, v) }
}
fn r32(a: usize) -> u32 {
    // SAFETY: as `r16`.
    unsafe { core::ptr::read_volatile(a as *const u32) }
}
fn w32(a: usize, v: u32) {
    // SAFETY: as `r16`.
    unsafe { core::ptr::write_volatile(a as *mut u32, v) }
}
fn w64(a: usize, v: u64) {
    w32(a, v as u32);
    w32(a + 4, (v >> 32) as u32);
}

impl VirtioBlk {
    /// The first virtio-blk function, if any.
    pub fn find() -> Option<crate::pci::Function> {
        crate::pci::find(VENDOR, DEVICE_BLK)
    }

    /// Every virtio-blk function, in PCI order, into `out`; how many.
    pub fn find_all(out: &mut [crate::pci::Function]) -> usize {
        crate::pci::find_all(VENDOR, DEVICE_BLK, out)
    }

    /// Bring up the virtio-blk function `f` ([`VirtioBlk::find`]) as disk
    /// `index` (below [`crate::intr::MAX_DISKS`]); `vtd`: it sits behind
    /// VT-d (already translating for it): negotiate
    /// `VIRTIO_F_ACCESS_PLATFORM` and give it IOVAs. Boot CPU, before the
    /// others start, after [`crate::pci::init`].
    pub fn probe(
        f: crate::pci::Function,
        vtd: bool,
        index: usize,
    ) -> Result<VirtioBlk, &'static str> {
        if index >= crate::intr::MAX_DISKS {
            return Err("too many disks");
        }
        f.enable(CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE);
        let mut bars = [None; 6];
        let mut bar = |i: u8| -> Result<usize, &'static str> {
            let b = bars
                .get_mut(usize::from(i))
                .ok_or("capability names no BAR")?;
            if b.is_none() {
                *b = f.map_bar(i);
            }
            b.map(|(a, _)| a).ok_or("capability in an unassigned BAR")
        };
        let (caps, n) = f.capabilities(0x09);
        let (mut common, mut notify, mut device, mut mult) = (0, 0, 0, 0);
        for &c in &caps[..n] {
            let ty = f.read32(c) >> 24;
            let b = f.read32(c + 4) as u8;
            let off = f.read32(c + 8) as usize;
            match ty {
                1 => common = bar(b)? + off,
                2 => {
                    notify = bar(b)? + off;
                    mult = f.read32(c + 16) as usize;
                }
                4 => device = bar(b)? + off,
                _ => {}
            }
        }
        if common == 0 || notify == 0 || device == 0 {
            return Err("virtio capabilities missing");
        }
        let (msix, n) = f.capabilities(0x11);
        if n == 0 {
            return Err("no MSI-X capability");
        }
        let msix = msix[0];
        let tbl = f.read32(msix + 4);
        let msix_table = bar((tbl & 7) as u8)? + (tbl & !7) as usize;
        // Reset, then the handshake (virtio 1.x, 3.1.1).
        w8(common + C_STATUS, 0);
        while r8(common + C_STATUS) != 0 {
            core::hint::spin_loop();
        }
        w8(common + C_STATUS, STATUS_ACK);
        w8(common + C_STATUS, STATUS_ACK | STATUS_DRIVER);
        w32(common + C_DFSELECT, 1);
        if r32(common + C_DF) & 1 == 0 {
            w8(common + C_STATUS, STATUS_FAILED);
            return Err("the device does not offer VIRTIO_F_VERSION_1");
        }
        w32(common + C_GFSELECT, 0);
        w32(common + C_GF, 0);
        w32(common + C_GFSELECT, 1);
        // VIRTIO_F_VERSION_1 (bit 32), and VIRTIO_F_ACCESS_PLATFORM (bit
        // 33) behind VT-d.
        w32(common + C_GF, if vtd { 3 } else { 1 });
        let st = STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK;
        w8(common + C_STATUS, st);
        if r8(common + C_STATUS) & STATUS_FEATURES_OK == 0 {
            w8(common + C_STATUS, STATUS_FAILED);
            return Err("the device refused our features");
        }
        // MSI-X on, every entry masked until `set_interrupt`.
        let entries = usize::from(f.read16(msix + 2) & 0x7ff) + 1;
        for e in 0..entries {
            w32(msix_table + 16 * e + 12, 1);
        }
        f.write16(msix + 2, (f.read16(msix + 2) | 1 << 15) & !(1 << 14));
        w16(common + C_MSIX_CONFIG, 0xffff);
        // Queue 0.
        w16(common + C_Q_SELECT, 0);
        let qsize = r16(common + C_Q_SIZE).min(QMAX);
        if qsize < DPS as u16 {
            return Err("queue too small");
        }
        w16(common + C_Q_SIZE, qsize);
        let depth = (usize::from(qsize) / DPS).min(MAXSLOTS) as u16;
        let layout = Layout::from_size_align(16 << 10, 4096).map_err(|_| "layout")?;
        // SAFETY: a non-zero-sized layout; the block is the device's queue
        // memory for the rest of the boot, never freed.
        let mem = unsafe { alloc_zeroed(layout) } as usize;
        if mem == 0 {
            return Err("no memory for the queue");
        }
        let mem_dev = if vtd {
            let iova = RING_IOVA + (index as u64) * (16 << 10);
            if !crate::vtd::VTD.map_driver(iova, mem as u64, 16 << 10) {
                return Err("could not map the queue in VT-d");
            }
            iova
        } else {
            mem as u64
        };
        w64(common + C_Q_DESC, mem_dev);
        w64(common + C_Q_DRIVER, mem_dev + AVAIL as u64);
        w64(common + C_Q_DEVICE, mem_dev + USED as u64);
        w16(common + C_Q_MSIX, 0);
        if r16(common + C_Q_MSIX) != 0 {
            w8(common + C_STATUS, STATUS_FAILED);
            return Err("the device refused MSI-X vector 0 for queue 0");
        }
        let notify = notify + usize::from(r16(common + C_Q_NOTIFY_OFF)) * mult;
        w16(common + C_Q_ENABLE, 1);
        w8(common + C_STATUS, st | STATUS_DRIVER_OK);
        let sectors = u64::from(r32(device)) | (u64::from(r32(device + 4)) << 32);
        kprintln!(
            "virtio-blk{index}: PCI {:02x}:{:02x}.{} common {common:#x} notify {notify:#x} MSI-X table {msix_table:#x}, {sectors} sectors, queue {qsize}, {depth} slots",
            f.bus,
            f.dev,
            f.func
        );
        Ok(VirtioBlk {
            index,
            sid: f.sid(),
            common,
            notify,
            msix_table,
            mem,
            mem_dev,
            vtd,
            qsize,
            depth,
            sectors,
            ring: SpinMutex::new(
                Ipl::Bio,
                Ring {
                    avail: 0,
                    used: 0,
                    early: [(0, DiskStatus::Ok); MAXSLOTS],
                    nearly: 0,
                },
            ),
            intr: AtomicU64::new(u64::MAX),
            spans: [const { [AtomicU64::new(0), AtomicU64::new(0)] }; MAXSLOTS],
            submitted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            dma_faults: AtomicU64::new(0),
        })
    }

    /// Its MSI-X vector.
    fn vector(&self) -> u8 {
        crate::intr::DISK + self.index as u8
    }

    /// Its index among the disks.
    pub fn index(&self) -> usize {
        self.index
    }

    fn desc(&self, i: usize) -> *mut Desc {
        (self.mem + 16 * i) as *mut Desc
    }

    fn header(&self, slot: usize) -> usize {
        self.mem + HEADERS + 16 * slot
    }

    /// The device address of driver memory `a` (in `mem`).
    fn dev(&self, a: usize) -> u64 {
        self.mem_dev + (a - self.mem) as u64
    }

    fn status(&self, slot: usize) -> usize {
        self.mem + STATUS + slot
    }

    /// Raise the interrupt the driver asked for, from software (an early
    /// completion).
    fn post(&self) {
        let apic = self.intr.load(Relaxed);
        if apic != u64::MAX {
            // What the device's MSI would send: the disk vector to that
            // CPU (an IPI, to itself too).
            crate::lapic::send_ipi(crate::lapic::Dest::Apic(apic as u32), self.vector());
        }
    }

    /// Complete `id` without the device.
    fn early(&self, id: u16, st: DiskStatus) {
        {
            let mut r = self.ring.lock();
            let n = r.nearly;
            r.early[n] = (id, st);
            r.nearly += 1;
        }
        self.post();
    }
}

/// The IOVA of the queue memory behind VT-d (above kern's window).
pub const RING_IOVA: u64 = crate::vtd::WINDOW;

/// Offsets in the queue memory.
const AVAIL: usize = 4096;
const USED: usize = 8192;
const HEADERS: usize = 12288;
const STATUS: usize = HEADERS + 16 * MAXSLOTS;

impl DiskController for VirtioBlk {
    fn geometry(&self) -> DiskGeometry {
        DiskGeometry {
            sectors: self.sectors,
            sector_size: 512,
            max_transfer: MAX_TRANSFER,
            queue_depth: self.depth,
        }
    }

    fn submit(&self, cmd: DiskCmd) -> bool {
        let slot = usize::from(cmd.id);
        if slot >= usize::from(self.depth) {
            return false;
        }
        let len = cmd.nsect as usize * 512;
        if cmd.op != DiskOp::Flush
            && (len == 0 || len > MAX_TRANSFER || cmd.lba + u64::from(cmd.nsect) > self.sectors)
        {
            self.early(cmd.id, DiskStatus::Invalid);
            return true;
        }
        let ty = match cmd.op {
            DiskOp::Read => REQ_IN,
            DiskOp::Write => REQ_OUT,
            DiskOp::Flush => REQ_FLUSH,
        };
        let h = self.header(slot);
        w32(h, ty);
        w32(h + 4, 0);
        w64(h + 8, cmd.lba);
        w8(self.status(slot), 0xff);
        self.spans[slot][1].store(0, Relaxed);
        let d0 = slot * DPS;
        let mut n = 1;
        let dev_writes = cmd.op == DiskOp::Read;
        let ok = cmd.op == DiskOp::Flush
            || self.vtd && {
                // Behind VT-d the device gets the IOVA: the unit translates
                // (and faults) on every access.
                let d = Desc {
                    addr: cmd.iova.get(),
                    len: len as u32,
                    flags: DESC_NEXT | if dev_writes { DESC_WRITE } else { 0 },
                    next: (d0 + 2) as u16,
                };
                // SAFETY: descriptor d0 + 1 is this slot's, not yet
                // published to the device.
                unsafe { self.desc(d0 + 1).write_volatile(d) };
                self.spans[slot][0].store(cmd.iova.get(), Relaxed);
                self.spans[slot][1].store(len as u64, Relaxed);
                n = 2;
                true
            }
            || SOFT_IOMMU.translate(cmd.iova, len, dev_writes, |pa, l| {
                let d = Desc {
                    addr: pa,
                    len: l as u32,
                    flags: DESC_NEXT | if dev_writes { DESC_WRITE } else { 0 },
                    next: (d0 + n + 1) as u16,
                };
                // SAFETY: descriptor d0 + n is this slot's (n <= 17: a
                // transfer of at most 64 KiB spans at most 17 pages), and
                // the device does not read it until the avail ring says so.
                unsafe { self.desc(d0 + n).write_volatile(d) };
                n += 1;
            });
        if !ok {
            self.dma_faults.fetch_add(1, Relaxed);
            self.early(cmd.id, DiskStatus::DmaFault);
            return true;
        }
        let descs = [
            Desc {
                addr: self.dev(h),
                len: 16,
                flags: DESC_NEXT,
                next: (d0 + 1) as u16,
            },
            Desc {
                addr: self.dev(self.status(slot)),
                len: 1,
                flags: DESC_WRITE,
                next: 0,
            },
        ];
        // SAFETY: descriptors d0 and d0 + n are this slot's, not yet
        // published to the device.
        unsafe {
            self.desc(d0).write_volatile(descs[0]);
            self.desc(d0 + n).write_volatile(descs[1]);
        }
        let mut r = self.ring.lock();
        let a = self.mem + AVAIL;
        w16(a + 4 + 2 * usize::from(r.avail % self.qsize), d0 as u16);
        r.avail = r.avail.wrapping_add(1);
        // The descriptors and the ring entry before the index the device
        // polls.
        fence(Release);
        w16(a + 2, r.avail);
        self.submitted.fetch_add(1, Relaxed);
        true
    }

    fn doorbell(&self) {
        // The avail index before the notify (a device register write).
        fence(SeqCst);
        w16(self.notify, 0);
    }

    fn reap(&self) -> Option<DiskDone> {
        let mut r = self.ring.lock();
        if r.nearly > 0 {
            r.nearly -= 1;
            let (id, status) = r.early[r.nearly];
            return Some(DiskDone { id, status });
        }
        let u = self.mem + USED;
        if r16(u + 2) == r.used {
            return None;
        }
        // The used entry and the status byte after the index.
        fence(Acquire);
        let e = u + 4 + 8 * usize::from(r.used % self.qsize);
        let head = r32(e) as usize;
        r.used = r.used.wrapping_add(1);
        let slot = head / DPS;
        let mut status = match r8(self.status(slot)) {
            0 => DiskStatus::Ok,
            2 => DiskStatus::Invalid,
            _ => DiskStatus::MediaError(5),
        };
        // Behind VT-d, QEMU's virtio-blk reports success for a request
        // whose data access the unit blocked: the unit's fault record for
        // an IOVA of this command is what says it failed.
        if self.vtd
            && self.spans[slot][1].load(Relaxed) != 0
            && crate::vtd::VTD.faulted_in(
                self.sid,
                self.spans[slot][0].load(Relaxed),
                self.spans[slot][1].load(Relaxed) as usize,
            )
        {
            status = DiskStatus::DmaFault;
            self.dma_faults.fetch_add(1, Relaxed);
        }
        drop(r);
        self.completed.fetch_add(1, Relaxed);
        Some(DiskDone {
            id: slot as u16,
            status,
        })
    }

    fn set_interrupt(&self, cpu: usize, vector: IntrHandle) {
        let apic = crate::md::PERCPU[cpu].apic_id.load(Relaxed) as u32;
        crate::intr::route_disk(self.index, vector);
        self.intr.store(u64::from(apic), Relaxed);
        let e = self.msix_table;
        w32(e + 12, 1);
        w32(e, 0xfee0_0000 | (apic << 12));
        w32(e + 4, 0);
        w32(e + 8, u32::from(self.vector()));
        w32(e + 12, 0);
        // A completion that came while masked is pending in the PBA and is
        // sent at the unmask; raise it anyway, in case the old route took
        // it and nothing reaped it.
        self.post();
    }
}

impl VirtioBlk {
    /// The device status register (DRIVER_OK and FEATURES_OK set while it
    /// runs; DEVICE_NEEDS_RESET, 64, if it gave up).
    pub fn device_status(&self) -> u8 {
        r8(self.common + C_STATUS)
    }
}
