//! Fuzz target: `sevplace::fuzzing::check_trace` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sevplace::fuzzing::check_trace(data));
