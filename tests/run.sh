#!/usr/bin/env bash
# Weft's whole test suite, as the README gives it and CI runs it:
#   formatting and lints, unit tests of every crate, multi-agent process tests on loopback,
#   and network-namespace lab tests (these need root, iproute2 and nftables).
# Everything it starts it stops; the lab tests tear their namespaces down even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The process and lab tests run the real binary: build it first.
cargo build --locked --bin weft
cargo test --workspace --locked
