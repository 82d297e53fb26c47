//! Fuzz target `config`: see `weft_fuzz::config` and docs/fuzzing.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::config(data));
