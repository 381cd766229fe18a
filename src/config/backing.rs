//! Backing files: what a disk's or vnd's file must be, and what boot does
//! to it (create, grow, keep; never truncate).

use std::path::PathBuf;

use super::{ConfigError, MachineSpec, Result, SECTOR};

/// The backing file of a disk or vnd, and the size its configuration asks
/// for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingFile {
    /// The device (`sd0`).
    pub device: String,
    /// Its entry (`disk[0]`).
    pub key: String,
    /// The file.
    pub path: PathBuf,
    /// `size`, if given.
    pub size: Option<u64>,
    /// The device's sector size.
    pub sector_size: u32,
    /// The device is read-only: its file is never changed.
    pub read_only: bool,
}

/// What [`BackingFile::prepare`] does to a backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingPlan {
    /// Create it, sparse, with this size.
    Create {
        /// Bytes.
        size: u64,
    },
    /// Extend it, sparse, from `from` to `to` bytes.
    Grow {
        /// Its size now.
        from: u64,
        /// Its size after.
        to: u64,
    },
    /// Use it as it is.
    Keep {
        /// Its size.
        size: u64,
    },
}

impl BackingPlan {
    /// The device's size after the plan is carried out.
    pub fn size(self) -> u64 {
        match self {
            BackingPlan::Create { size } | BackingPlan::Keep { size } => size,
            BackingPlan::Grow { to, .. } => to,
        }
    }
}

impl BackingFile {
    /// The rule for a file whose current length is `existing` (`None`: it
    /// does not exist). Missing: created with `size` (required). Existing:
    /// kept when `size` is not given or equal, grown when `size` is larger,
    /// refused when `size` is smaller (never truncated). Read-only devices
    /// only keep. The resulting size must be a multiple of the sector size.
    pub fn plan(&self, existing: Option<u64>) -> Result<BackingPlan> {
        let plan = match (existing, self.size) {
            (None, None) => {
                return Err(self.refuse(
                    "file",
                    "does not exist, and no size is given to create it with",
                ));
            }
            (None, Some(_)) if self.read_only => {
                return Err(self.refuse(
                    "file",
                    "does not exist (a read_only device never creates its file)",
                ));
            }
            (None, Some(size)) => BackingPlan::Create { size },
            (Some(len), None) => BackingPlan::Keep { size: len },
            (Some(len), Some(size)) if len == size => BackingPlan::Keep { size },
            (Some(len), Some(size)) if len > size => {
                return Err(self.refuse(
                    "size",
                    format!(
                        "the file has {len} bytes, more than size = {size}; dvma never truncates a backing file (raise or remove size)"
                    ),
                ));
            }
            (Some(len), Some(_)) if self.read_only => {
                return Err(self.refuse(
                    "size",
                    format!("the file has {len} bytes, less than size; a read_only device never grows its file"),
                ));
            }
            (Some(from), Some(to)) => BackingPlan::Grow { from, to },
        };
        let size = plan.size();
        if size == 0 || !size.is_multiple_of(u64::from(self.sector_size)) {
            return Err(self.refuse(
                "file",
                format!(
                    "has {size} bytes, not a positive multiple of the {}-byte sector",
                    self.sector_size
                ),
            ));
        }
        Ok(plan)
    }

    /// Carry out [`plan`](Self::plan) on the host: create the directory and
    /// the file, or grow it; return the device's size in bytes.
    pub fn prepare(&self) -> Result<u64> {
        let io = |e: std::io::Error| self.refuse("file", e.to_string());
        let existing = match std::fs::metadata(&self.path) {
            Ok(md) if md.is_file() => Some(md.len()),
            Ok(_) => return Err(self.refuse("file", "is not a regular file")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let plan = self.plan(existing)?;
        match plan {
            BackingPlan::Keep { .. } => {}
            BackingPlan::Create { size } => {
                if let Some(dir) = self.path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&self.path)
                    .map_err(io)?;
                f.set_len(size).map_err(io)?;
            }
            BackingPlan::Grow { to, .. } => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .map_err(io)?;
                f.set_len(to).map_err(io)?;
            }
        }
        Ok(plan.size())
    }

    fn refuse(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Backing {
            path: self.path.clone(),
            key: format!("{}.{key}", self.key),
            message: message.into(),
        }
    }
}

impl MachineSpec {
    /// The backing file of every disk and vnd, in file order (disks first).
    pub fn backing_files(&self) -> Vec<BackingFile> {
        let disks = self.disks.iter().enumerate().map(|(i, d)| BackingFile {
            device: d.name.clone(),
            key: format!("disk[{i}]"),
            path: d.file.clone(),
            size: d.size,
            sector_size: d.sector_size,
            read_only: d.read_only,
        });
        let vnds = self.vnds.iter().enumerate().map(|(i, v)| BackingFile {
            device: v.name.clone(),
            key: format!("vnd[{i}]"),
            path: v.file.clone(),
            size: v.size,
            sector_size: SECTOR as u32,
            read_only: v.read_only,
        });
        disks.chain(vnds).collect()
    }
}
