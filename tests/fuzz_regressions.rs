//! Replays every kept fuzz input through the fuzzing entry points with plain `cargo test`:
//! the minimized corpora (`tests/fuzz/corpus/TARGET/`) and the inputs that once crashed a
//! parser (`tests/fuzz/regressions/TARGET/`). CI thus re-checks every finding and the
//! coverage the corpora hold without a nightly toolchain or a libFuzzer build.
//!
//! The entry points are the very file the cargo-fuzz targets call (`tests/fuzz/src/lib.rs`),
//! compiled into this test. See docs/fuzzing.md.

#[path = "fuzz/src/lib.rs"]
mod entry;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Every file under `tests/fuzz/{corpus,regressions}/TARGET`, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for entry in dir {
            let path = entry.expect("readable fuzz directory").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs every input of `target`; fails naming each input that panicked.
fn replay(target: &str) {
    let run = entry::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .expect("a known fuzz target");
    let files = inputs(target);
    assert!(!files.is_empty(), "no kept inputs for fuzz target {target}");
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("readable fuzz input");
            catch_unwind(AssertUnwindSafe(|| run(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} inputs of fuzz target {target} panicked:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn tunnel_header_inputs_never_panic() {
    replay("tunnel_header");
}

#[test]
fn config_inputs_never_panic() {
    replay("config");
}

#[test]
fn policy_inputs_never_panic() {
    replay("policy");
}

#[test]
fn join_token_inputs_never_panic() {
    replay("join_token");
}

#[test]
fn gossip_frame_inputs_never_panic() {
    replay("gossip_frame");
}

#[test]
fn every_fuzz_target_has_a_replay_test() {
    let names: Vec<&str> = entry::TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            "tunnel_header",
            "config",
            "policy",
            "join_token",
            "gossip_frame"
        ]
    );
}
