//! The handshake driver over an in-memory stream fed with arbitrary client
//! bytes, against a small in-memory export table.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nbd::fuzzing::option_input(data));
