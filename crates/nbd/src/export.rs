//! What a server exports: [`ExportInfo`], its [`BlockSizes`], and the
//! [`ExportTable`] the handshake looks names up in.

use crate::wire::{
    DEFAULT_MAX_PAYLOAD, MAX_MIN_BLOCK, MAX_STRING_LEN, NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, TransmissionFlags,
};

/// Errors of the export description layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The minimum block size is not a power of two in `1..=65536`
    /// ("Size constraints").
    #[error("minimum block size {min} is not a power of two no larger than 65536")]
    BadMinimum {
        /// The rejected value.
        min: u32,
    },
    /// The preferred block size is not a power of two at least
    /// `max(minimum, 512)`.
    #[error("preferred block size {preferred} is not a power of two >= max({min}, 512)")]
    BadPreferred {
        /// The rejected value.
        preferred: u32,
        /// The minimum block size it was checked against.
        min: u32,
    },
    /// The maximum payload is smaller than the preferred block size.
    #[error("maximum payload {max} is smaller than the preferred block size {preferred}")]
    BadMaximum {
        /// The rejected value.
        max: u32,
        /// The preferred block size it was checked against.
        preferred: u32,
    },
    /// An export name or description that the protocol cannot carry: longer
    /// than 4096 bytes or containing NUL ("Conventions").
    #[error("export {what} is not a valid NBD string ({len} bytes, NUL or longer than 4096)")]
    BadString {
        /// `"name"` or `"description"`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
}

/// The three size constraints of an export ("Size constraints",
/// `NBD_INFO_BLOCK_SIZE`). Only valid combinations can be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSizes {
    min: u32,
    preferred: u32,
    max: u32,
}

impl BlockSizes {
    /// The protocol's defaults: minimum 1, preferred 4096, maximum payload
    /// 2^25 (32 MiB).
    pub const DEFAULT: BlockSizes = BlockSizes {
        min: 1,
        preferred: 4096,
        max: DEFAULT_MAX_PAYLOAD,
    };

    /// Checks the constraints the spec puts on advertised sizes: `min` a power
    /// of two no larger than 2^16; `preferred` a power of two at least
    /// `max(min, 512)`; `max` at least `preferred`.
    pub fn new(min: u32, preferred: u32, max: u32) -> Result<BlockSizes, ExportError> {
        if !min.is_power_of_two() || min > MAX_MIN_BLOCK {
            return Err(ExportError::BadMinimum { min });
        }
        if !preferred.is_power_of_two() || preferred < min.max(512) {
            return Err(ExportError::BadPreferred { preferred, min });
        }
        if max < preferred {
            return Err(ExportError::BadMaximum { max, preferred });
        }
        Ok(BlockSizes {
            min,
            preferred,
            max,
        })
    }

    /// Minimum block size: offsets and lengths must be multiples of it.
    pub const fn min(self) -> u32 {
        self.min
    }

    /// Preferred block size.
    pub const fn preferred(self) -> u32 {
        self.preferred
    }

    /// Maximum payload of a read or write.
    pub const fn max(self) -> u32 {
        self.max
    }

    /// Whether these are the defaults a client may assume without asking
    /// (minimum 1): a server with a larger minimum may insist that the client
    /// asks for `NBD_INFO_BLOCK_SIZE`.
    pub const fn is_default_minimum(self) -> bool {
        self.min == 1
    }
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes::DEFAULT
    }
}

/// Everything the protocol needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's (canonical) name, as listed by `NBD_OPT_LIST`.
    pub name: String,
    /// A human-readable description; empty for none.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// The export refuses writes (`NBD_FLAG_READ_ONLY`).
    pub read_only: bool,
    /// Size constraints (`NBD_INFO_BLOCK_SIZE`).
    pub block_sizes: BlockSizes,
    /// The server implements `NBD_CMD_FLUSH` (`NBD_FLAG_SEND_FLUSH`).
    pub can_flush: bool,
    /// The server implements `NBD_CMD_FLAG_FUA` (`NBD_FLAG_SEND_FUA`).
    pub can_fua: bool,
    /// The server implements `NBD_CMD_TRIM` (`NBD_FLAG_SEND_TRIM`).
    pub can_trim: bool,
    /// The server implements `NBD_CMD_WRITE_ZEROES` with `NBD_CMD_FLAG_NO_HOLE`
    /// (`NBD_FLAG_SEND_WRITE_ZEROES`).
    pub can_write_zeroes: bool,
    /// Flush and FUA are visible across connections
    /// (`NBD_FLAG_CAN_MULTI_CONN`).
    pub can_multi_conn: bool,
}

impl ExportInfo {
    /// A writable export with default block sizes and no optional feature;
    /// set the public fields to change that.
    pub fn new(name: impl Into<String>, size: u64) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: String::new(),
            size,
            read_only: false,
            block_sizes: BlockSizes::DEFAULT,
            can_flush: false,
            can_fua: false,
            can_trim: false,
            can_write_zeroes: false,
            can_multi_conn: false,
        }
    }

    /// Checks that the name and description are strings the protocol can
    /// carry (no NUL, at most 4096 bytes).
    pub fn check(&self) -> Result<(), ExportError> {
        for (what, s) in [("name", &self.name), ("description", &self.description)] {
            if s.len() > MAX_STRING_LEN || s.contains('\0') {
                return Err(ExportError::BadString { what, len: s.len() });
            }
        }
        Ok(())
    }

    /// The transmission flags for this export: `HAS_FLAGS` always, each
    /// optional flag exactly when the export says so, and `SEND_DF` exactly
    /// when structured replies were negotiated (the spec requires it clear
    /// otherwise; with structured replies this crate's reply encoders can
    /// always send a read as one content chunk, so `NBD_CMD_FLAG_DF` is
    /// supported).
    pub fn transmission_flags(&self, structured_replies: bool) -> TransmissionFlags {
        let mut f = NBD_FLAG_HAS_FLAGS;
        for (on, flag) in [
            (self.read_only, NBD_FLAG_READ_ONLY),
            (self.can_flush, NBD_FLAG_SEND_FLUSH),
            (self.can_fua, NBD_FLAG_SEND_FUA),
            (self.can_trim, NBD_FLAG_SEND_TRIM),
            (self.can_write_zeroes, NBD_FLAG_SEND_WRITE_ZEROES),
            (self.can_multi_conn, NBD_FLAG_CAN_MULTI_CONN),
            (structured_replies, NBD_FLAG_SEND_DF),
        ] {
            if on {
                f |= flag;
            }
        }
        TransmissionFlags(f)
    }
}

/// The server's set of exports, as the handshake sees it.
///
/// The handshake sends names and descriptions as they are: every export
/// should pass [`ExportInfo::check`].
pub trait ExportTable {
    /// The export called `name` (never called with the empty name: that one
    /// goes to [`ExportTable::default_export`]).
    fn lookup(&self, name: &str) -> Option<ExportInfo>;

    /// Every export, in the order `NBD_OPT_LIST` should report them.
    fn list(&self) -> Vec<ExportInfo>;

    /// The export the empty name selects, if there is one.
    fn default_export(&self) -> Option<ExportInfo> {
        None
    }
}

impl<T: ExportTable + ?Sized> ExportTable for &T {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (**self).lookup(name)
    }
    fn list(&self) -> Vec<ExportInfo> {
        (**self).list()
    }
    fn default_export(&self) -> Option<ExportInfo> {
        (**self).default_export()
    }
}

/// A fixed list of exports, optionally with a default: the simplest
/// [`ExportTable`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportList {
    /// The exports, looked up by exact name.
    pub exports: Vec<ExportInfo>,
    /// Name of the export the empty name selects.
    pub default: Option<String>,
}

impl ExportList {
    /// A table of `exports` with no default export.
    pub fn new(exports: Vec<ExportInfo>) -> ExportList {
        ExportList {
            exports,
            default: None,
        }
    }

    /// The same table with `name` as its default export.
    pub fn with_default(mut self, name: impl Into<String>) -> ExportList {
        self.default = Some(name.into());
        self
    }
}

impl ExportTable for ExportList {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.exports.iter().find(|e| e.name == name).cloned()
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.exports.clone()
    }

    fn default_export(&self) -> Option<ExportInfo> {
        self.default.as_deref().and_then(|n| self.lookup(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert!(BlockSizes::new(512, 4096, 1 << 25).is_ok());
        assert!(BlockSizes::new(1, 512, 512).is_ok());
        assert!(BlockSizes::new(65536, 65536, 65536).is_ok());
        assert!(
            BlockSizes::new(4096, 4096, 3 * 4096).is_ok(),
            "max need not be 2^n"
        );
        assert_eq!(
            BlockSizes::new(0, 4096, 4096),
            Err(ExportError::BadMinimum { min: 0 })
        );
        assert_eq!(
            BlockSizes::new(3, 4096, 4096),
            Err(ExportError::BadMinimum { min: 3 })
        );
        assert_eq!(
            BlockSizes::new(1 << 17, 1 << 17, 1 << 17),
            Err(ExportError::BadMinimum { min: 1 << 17 })
        );
        assert_eq!(
            BlockSizes::new(1, 256, 4096),
            Err(ExportError::BadPreferred {
                preferred: 256,
                min: 1
            })
        );
        assert_eq!(
            BlockSizes::new(4096, 2048, 4096),
            Err(ExportError::BadPreferred {
                preferred: 2048,
                min: 4096
            })
        );
        assert_eq!(
            BlockSizes::new(512, 4096, 1024),
            Err(ExportError::BadMaximum {
                max: 1024,
                preferred: 4096
            })
        );
        assert_eq!(
            BlockSizes::default(),
            BlockSizes::new(1, 4096, 1 << 25).unwrap()
        );
    }

    #[test]
    fn transmission_flags_follow_the_export() {
        let mut e = ExportInfo::new("a", 1);
        assert_eq!(e.transmission_flags(false).bits(), 0x0001);
        assert_eq!(e.transmission_flags(true).bits(), 0x0081);
        e.read_only = true;
        assert_eq!(e.transmission_flags(false).bits(), 0x0003);
        e.can_flush = true;
        e.can_fua = true;
        e.can_trim = true;
        e.can_write_zeroes = true;
        e.can_multi_conn = true;
        // 0b1_0110_1111: HAS_FLAGS, READ_ONLY, FLUSH, FUA, TRIM, WZ, MULTI_CONN.
        assert_eq!(e.transmission_flags(false).bits(), 0x016f);
        assert_eq!(e.transmission_flags(true).bits(), 0x01ef);
    }

    #[test]
    fn export_list_lookup_and_default() {
        let t = ExportList::new(vec![ExportInfo::new("a", 1), ExportInfo::new("b", 2)]);
        assert_eq!(t.lookup("b").map(|e| e.size), Some(2));
        assert_eq!(t.lookup("c"), None);
        assert_eq!(t.default_export(), None);
        let t = t.with_default("a");
        assert_eq!(t.default_export().map(|e| e.name), Some("a".into()));
        assert_eq!(t.list().len(), 2);
    }

    #[test]
    fn export_strings_are_checked() {
        assert!(ExportInfo::new("ok", 0).check().is_ok());
        assert!(ExportInfo::new("a\0b", 0).check().is_err());
        assert!(ExportInfo::new("x".repeat(4097), 0).check().is_err());
    }
}
