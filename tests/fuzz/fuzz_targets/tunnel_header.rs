//! Fuzz target `tunnel_header`: see `weft_fuzz::tunnel_header` and docs/fuzzing.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::tunnel_header(data));
