//! Fuzz target `gossip_frame`: see `weft_fuzz::gossip_frame` and docs/fuzzing.md.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::gossip_frame(data));
