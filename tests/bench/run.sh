#!/usr/bin/env bash
# One command for every measurement Weft publishes: builds the release binary, runs each
# benchmark in tests/bench/ (each with its baselines in the same run, repeated in rounds for
# median and spread) and the fault suite, then replaces docs/benchmarks.md,
# docs/reliability.md and the plots in docs/img/ with what this run printed.
#
#   sudo bash tests/bench/run.sh            # everything, about 50 minutes on 2 cores
#   sudo bash tests/bench/run.sh dataplane  # only the named parts, in the order given
#
# Parts: gossip_transport gossip_sim gossip_records ca_issuance dataplane policy faults.
# With every part, the documents are written from scratch in a staging folder and copied into
# docs/ only when every part succeeded; with some parts, their sections replace the old ones
# in the current documents. Needs root (the fault suite builds network namespaces) and, from
# Debian: haproxy iperf3 nghttp2-client nginx-light wrk openssl nftables iproute2 python3.
# Nothing here leaves the machine: every server, proxy and agent runs on loopback or in
# namespaces the suite creates and deletes.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

all_parts=(gossip_transport gossip_sim gossip_records ca_issuance dataplane policy faults)
if [ "$#" -gt 0 ]; then
  parts=("$@")
else
  parts=("${all_parts[@]}")
fi
for part in "${parts[@]}"; do
  case " ${all_parts[*]} " in
    *" $part "*) ;;
    *) echo "unknown part '$part'; parts: ${all_parts[*]}" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "run as root: the fault suite builds network namespaces" >&2
  exit 1
fi
missing=()
for tool in haproxy:haproxy iperf3:iperf3 h2load:nghttp2-client nginx:nginx-light wrk:wrk \
            openssl:openssl nft:nftables ip:iproute2 python3:python3; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "missing tools; install them with: apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

# A full run starts from empty documents; a partial one edits copies of the current ones.
stage="$(mktemp -d /tmp/weft-bench-docs.XXXXXX)"
trap 'rm -rf "$stage"' EXIT
if [ "${#parts[@]}" -lt "${#all_parts[@]}" ]; then
  cp docs/benchmarks.md docs/reliability.md "$stage"/
fi
export WEFT_DOCS_DIR="$stage"

started=$SECONDS
step() { printf '\n=== %s (%d s so far) ===\n' "$1" "$((SECONDS - started))"; }

step "release build"
cargo build --release --locked --bin weft
cargo build --locked --bin weft # the fault suite's agents are the test build

for part in "${parts[@]}"; do
  step "$part"
  case "$part" in
    faults)
      # Only this run's scenarios go into reliability.md.
      rm -rf target/faults
      WEFT_FAULTS_DOCS=1 cargo test --locked -p weft-tests --test faults -- --test-threads=1
      ;;
    *)
      cargo bench --locked -p weft-tests --bench "$part"
      ;;
  esac
done

step "copying into docs/"
mkdir -p docs/img
for file in benchmarks.md reliability.md; do
  if [ -f "$stage/$file" ]; then cp "$stage/$file" docs/; fi
done
if [ -d "$stage/img" ]; then cp "$stage"/img/*.png docs/img/; fi
echo "done in $((SECONDS - started)) s: docs/benchmarks.md, docs/reliability.md, docs/img/"
