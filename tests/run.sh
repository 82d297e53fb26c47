#!/usr/bin/env bash
# Weft's whole test suite, as the README gives it and CI runs it:
#   formatting and lints, unit tests of every crate, CA protocol tests over QUIC, multi-agent
#   process tests on loopback, and network-namespace lab tests (these need root, iproute2 and
#   nftables), and packaging tests: the .deb and .rpm (lintian, rpmlint, dpkg, rpm --root) and
#   the Ansible role on booted systemd machines (systemd-nspawn in lab namespaces; needs root,
#   debootstrap, systemd-container, ansible, cargo-deb, cargo-generate-rpm: .ci/run installs
#   them). Everything it starts it stops; the lab tests tear their namespaces and machines down
#   even on failure. The last line sums every test binary's results.
#
#   WEFT_SKIP_BOOTED=1 bash tests/run.sh   skips the booted Ansible lab test (several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The process and lab tests run the real binary: build it first.
cargo build --locked --bin weft

# Packaging inputs, made once per run (tests/packaging.rs uses them): the release binary and
# the .deb/.rpm built from it (tests/packaging/build.sh), and the Debian rootfs the booted lab
# machines start from (tests/packaging/rootfs.sh; cached in target/, reused when present).
# debootstrap mostly waits on the mirror, so it runs beside the release build.
# WEFT_SKIP_BOOTED=1 skips the booted Ansible lab test (several minutes); the package tests
# (lintian, rpmlint, rpm --root, dpkg in a chroot of the rootfs) still run.
t=$(date +%s)
rootfs_log=$(mktemp)
bash tests/packaging/rootfs.sh >"$rootfs_log" 2>&1 &
rootfs_pid=$!
bash tests/packaging/build.sh
rootfs_status=0
wait "$rootfs_pid" || rootfs_status=$?
cat "$rootfs_log"
rm -f "$rootfs_log"
[[ $rootfs_status -eq 0 ]] || { echo "tests/packaging/rootfs.sh failed" >&2; exit 1; }
echo "packaging: inputs ready ($(( $(date +%s) - t ))s)"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast --lib --bins --tests 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
