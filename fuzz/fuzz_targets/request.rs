//! Request::parse + validate on arbitrary bytes, against fixed exports.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nbd::fuzzing::request_input(data));
