//! Fuzz target `join_token`: see `weft_fuzz::join_token` and docs/fuzzing.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::join_token(data));
