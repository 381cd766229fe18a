//! ccd
