//! Fuzz target `policy`: see `weft_fuzz::policy` and docs/fuzzing.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::policy(data));
