//! Device interfaces: what the machine's devices offer the drivers.
//!
//! A real disk controller is registers and rings in DMA memory; here it is
//! this trait, which the machine implements with lock-free rings shared
//! with device threads. Every method may be called from any context
//! (interrupt handlers included): none blocks, allocates or takes a lock
//! thread code may hold.
//!
//! * [`DiskController`]: a DMA disk controller. Commands carry an IOVA
//!   (from a loaded `bus_dma` map); the device reaches memory only through
//!   the IOMMU.
//! * [`FileDevice`]: a non-DMA asynchronous file device (for `vnd`): it
//!   copies to and from a kernel buffer given by its kernel address, as a
//!   programmed-I/O device would.
//!
//! The drivers here contain no `unsafe`: what they share between contexts
//! is in the audited primitives ([`crate::slot`], [`crate::once`],
//! [`crate::lock`], [`crate::vm`], [`crate::bio`]).
#![forbid(unsafe_code)]

pub mod ccd;
pub mod completer;
pub mod sd;
pub mod vnd;

use crate::intr::IntrHandle;

/// What a disk looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Number of sectors.
    pub sectors: u64,
    /// Bytes per sector.
    pub sector_size: u32,
    /// Largest transfer of one command, bytes.
    pub max_transfer: usize,
    /// Commands the device accepts at once.
    pub queue_depth: u16,
}

/// A command's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOp {
    /// Device to memory.
    Read,
    /// Memory to device.
    Write,
    /// Make every completed write durable.
    Flush,
}

/// A command for a [`DiskController`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskCmd {
    /// The driver's command slot, echoed in the completion.
    pub id: u16,
    /// Operation.
    pub op: DiskOp,
    /// First sector.
    pub lba: u64,
    /// Sectors (0 for a flush).
    pub nsect: u32,
    /// I/O virtual address of the data (unused for a flush).
    pub iova: crate::iommu::Iova,
    /// Write through to stable storage before completing.
    pub fua: bool,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskStatus {
    /// Done.
    Ok,
    /// The device's DMA faulted (the IOVA was not mapped as needed).
    DmaFault,
    /// The medium failed, with the host errno.
    MediaError(i32),
    /// The command was malformed (out of range, too large).
    Invalid,
}

/// A completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskDone {
    /// The command's `id`.
    pub id: u16,
    /// Its status.
    pub status: DiskStatus,
}

/// A DMA disk controller.
pub trait DiskController: Sync {
    /// Its geometry.
    fn geometry(&self) -> DiskGeometry;
    /// Put a command on the submission ring; `false` if the ring is full.
    fn submit(&self, cmd: DiskCmd) -> bool;
    /// Ring the doorbell: the device looks at its submission ring.
    fn doorbell(&self);
    /// Take a completion off the completion ring.
    fn reap(&self) -> Option<DiskDone>;
    /// From now on the device posts `vector` on `cpu` when completions are
    /// ready (coalesced as the device is configured).
    fn set_interrupt(&self, cpu: usize, vector: IntrHandle);
}

/// A command for a [`FileDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileCmd {
    /// The driver's command slot, echoed in the completion.
    pub id: u16,
    /// Operation.
    pub op: DiskOp,
    /// Byte offset in the file.
    pub offset: u64,
    /// Kernel address of the buffer (the direct map).
    pub kva: usize,
    /// Bytes (0 for a flush).
    pub len: usize,
    /// Write through before completing.
    pub fua: bool,
}

/// A non-DMA asynchronous file device.
pub trait FileDevice: Sync {
    /// Size of the backing file, bytes.
    fn size(&self) -> u64;
    /// Put a command on the ring; `false` if it is full.
    fn submit(&self, cmd: FileCmd) -> bool;
    /// Ring the doorbell.
    fn doorbell(&self);
    /// Take a completion.
    fn reap(&self) -> Option<DiskDone>;
    /// Post `vector` on `cpu` when completions are ready.
    fn set_interrupt(&self, cpu: usize, vector: IntrHandle);
}
