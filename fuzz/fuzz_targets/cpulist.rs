//! Fuzz target: `sevplace::fuzzing::check_cpulist` on each input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sevplace::fuzzing::check_cpulist(data));
