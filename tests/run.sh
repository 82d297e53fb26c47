#!/usr/bin/env bash
# Weft's whole test suite, as the README gives it and CI runs it:
#   formatting and lints, unit tests of every crate, CA protocol tests over QUIC, multi-agent
#   process tests on loopback, and network-namespace lab tests (these need root, iproute2 and
#   nftables). Everything it starts it stops; the lab tests tear their namespaces down even on
#   failure. The last line sums every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The process and lab tests run the real binary: build it first.
cargo build --locked --bin weft

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --lib --bins --tests 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
