//! The machine's storage devices: a DMA disk controller and a programmed-I/O
//! file device, each a host file served by host threads.
//!
//! # What they are
//! * [`disk::DmaDisk`] implements [`kern::dev::DiskController`]: commands
//!   name sectors and an IOVA; the device moves data between its backing
//!   file and memory **only through the DVMA window**
//!   ([`crate::dvma::Window::pread`]/[`pwrite`](crate::dvma::Window::pwrite)),
//!   so a command whose IOVA is not mapped (or mapped read-only for a disk
//!   read) completes with [`DiskStatus::DmaFault`] instead of touching
//!   anything.
//! * [`ramdisk::RamDisk`] implements [`kern::dev::DiskController`] with a
//!   zero-latency medium (a memfd): commands complete on the doorbell,
//!   still through the DVMA window; for measuring the kernel's own cost.
//! * [`file::FileDev`] implements [`kern::dev::FileDevice`]: commands name a
//!   byte offset and a kernel direct-map address; the device copies between
//!   its file and that address itself (no IOMMU), as a programmed-I/O
//!   device would.
//!
//! Both are the same machine underneath: a bounded lock-free submission
//! ring, a bounded lock-free completion ring, a doorbell, `workers` host
//! threads executing commands, and an interrupt with coalescing.
//!
//! # Who may call what, from which context
//!
//! | call | context | cost |
//! |---|---|---|
//! | `submit`, `doorbell`, `reap`, `set_interrupt` (the `kern::dev` traits) | **any**: kernel thread, soft or hard interrupt handler, host thread | atomics and a clock read; `doorbell` adds one `futex_wake` system call only when every worker sleeps and none is making progress; `set_interrupt` may post the vector once |
//! | `stats`, `geometry`/`size`, `inject_*`, `clear_injection` | any | atomics |
//! | `open` | host or kernel thread (attach) | opens the file, allocates the rings, spawns the workers |
//! | `stop`, `Drop` | host or kernel thread, **never an interrupt handler** | joins host threads |
//!
//! The interrupt-context calls allocate nothing, take no lock, print
//! nothing and leave `errno` alone: the rings are
//! [`crossbeam_queue::ArrayQueue`]s (allocated once, at `open`), the
//! doorbell is an atomic counter plus a raw `futex` system call
//! (`futex_wake`), and the interrupt is
//! [`kern::intr::intr_post`], which is safe from any thread.
//!
//! # The queue discipline
//! A device accepts at most `queue_depth` commands between `submit` and the
//! `reap` of their completion: `submit` returns `false` when that many are
//! outstanding (or the device is stopped), never blocks. So neither ring
//! can overflow, and a completion is never dropped. Command ids are the
//! driver's: the device echoes them and never looks at them.
//!
//! # Workers and the doorbell
//! A worker that finds the submission ring empty polls it for `spin_ns`,
//! then sleeps on the doorbell futex. `doorbell` makes a system call only
//! if no worker is polling, one sleeps, no wake is already on its way and
//! no busy worker is making progress, so a busy device costs a few atomics
//! per doorbell and no system call. Concurrency is managed as Linux's
//! workqueues do: a second worker is woken (by a doorbell, or by a worker
//! that takes a command while more are queued) only when the busy ones
//! have neither started nor finished a command for 50 µs; a worker that
//! goes to sleep while commands are outstanding sleeps at most 1 ms, so a
//! command queued behind a worker that blocks (a FLUSH, a cold read) waits
//! at most that long for a sibling. The progress check reads the clock
//! (`clock_gettime` through the vDSO: async-signal-safe, errno untouched).
//!
//! # Interrupts and coalescing
//! Before `set_interrupt` completions are only queued (the driver polls
//! with `reap`). After it, a worker that pushes a completion posts the
//! vector when
//! 1. `coalesce_count` completions are un-signalled, or
//! 2. the submission ring is empty (nothing more is coming soon: the last
//!    completion of a burst is never delayed), or
//! 3. `coalesce_ns` have passed since the first un-signalled completion.
//!
//! Condition 3 is checked when a completion is pushed and by idle workers,
//! which act as the coalescing timer (a polling worker checks as it polls,
//! a sleeping one sleeps no longer than until held completions are due).
//! A held completion always has a queued command behind it (condition 2),
//! so it waits at most about `coalesce_ns` while a worker is idle, and
//! otherwise until the next completion (with one worker, or all of them
//! busy on long commands). Every completion is followed by a post that
//! happens after it was pushed, so a handler that reaps until the ring is
//! empty sees each completion exactly once. `set_interrupt` posts at once
//! if completions are already waiting. `stop` posts once more for the
//! completions it writes.
//!
//! # Stopping
//! `stop` (idempotent; `Drop` calls it) refuses new commands, lets each
//! worker finish the command it is executing, joins the workers, and
//! completes every command still in the submission ring with
//! [`DiskStatus::MediaError`]`(ESHUTDOWN)` rather than dropping it.
//! **Devices must be stopped before the machine shuts down**: a worker
//! posts interrupts into the kernel and reaches memory through the window,
//! both of which [`crate::Machine::shutdown`] frees.
//!
//! [`DiskStatus::DmaFault`]: kern::dev::DiskStatus::DmaFault
//! [`DiskStatus::MediaError`]: kern::dev::DiskStatus::MediaError

pub mod chan;
pub mod disk;
mod engine;
pub mod file;
pub mod nic;
pub mod ramdisk;
mod uring;

pub use chan::{HostChannel, ReplyQueue};
pub use disk::{DiskConfig, DiskEngine, DmaDisk};
pub use engine::DeviceStats;
pub use file::{FileConfig, FileDev};
pub use nic::{Nic, NicEvent};
pub use ramdisk::{RamDisk, RamDiskConfig};

/// Bytes per sector of the machine's disks.
pub const SECTOR: u32 = 512;
