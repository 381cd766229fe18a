//! `dvma` as a library: the configuration, the system builder, the
//! commands. The `dvma` binary (`src/main.rs`) is a thin command line over
//! it, and the integration tests use it directly.
#![forbid(unsafe_code)]

pub mod bench;
pub mod config;
pub mod metal;
pub mod race;
pub mod serve;
pub mod soak;
pub mod system;
