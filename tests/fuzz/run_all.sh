#!/bin/sh
# Fuzzes every target for MAX_TIME seconds (default 600), one after another, with the binaries
# that `RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir tests/fuzz` built (ASan). Run directly,
# the binaries are not rebuilt when the workspace changes mid-campaign. New inputs go to
# work/corpus/T, crashes to artifacts/T, logs to work/logs. See docs/fuzzing.md.
set -u
cd "$(dirname "$0")"
B=target/x86_64-unknown-linux-gnu/release
mkdir -p work/logs
for t in ${TARGETS:-tunnel_header config policy join_token gossip_frame}; do
  mkdir -p "work/corpus/$t" "artifacts/$t"
  echo "start $t $(date -u +%FT%TZ)" >> work/logs/times
  "$B/$t" "work/corpus/$t" "corpus/$t" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 \
    -ignore_ooms=1 -timeout=10 -rss_limit_mb=3072 -max_total_time="${MAX_TIME:-600}" \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" > "work/logs/$t.log" 2>&1
  echo "end $t $(date -u +%FT%TZ) rc=$?" >> work/logs/times
  grep -a '^#' "work/logs/$t.log" | tail -n 1
done
