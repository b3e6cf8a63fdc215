#!/usr/bin/env bash
# Runs every fuzz target of branchd for a bounded time and fails if any
# of them finds a crash (a panic, a broken property, an abort).
#
#   fuzz/run.sh            60 seconds per target
#   fuzz/run.sh 600        ten minutes per target
#   FUZZ_SECONDS=300 fuzz/run.sh
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a nightly
# toolchain (`rustup toolchain install nightly`). Not part of CI: the
# time it takes is the point. Inputs that crash are kept in
# fuzz/artifacts/TARGET/ (replay one with
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`); the
# corpus grows in fuzz/corpus/TARGET/ and is reused by the next run. Both
# stay out of git.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-${FUZZ_SECONDS:-60}}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2 ;;
esac

log() { echo "== $*"; }

# Built once up front, so the time limit is spent fuzzing, not compiling.
log "building the fuzz targets"
cargo +nightly fuzz build

failed=()
for target in $(cargo +nightly fuzz list); do
  dict=()
  if [ -f "$target.dict" ]; then
    dict=("-dict=$target.dict")
  fi
  log "fuzzing $target for ${seconds}s"
  if ! cargo +nightly fuzz run "$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 "${dict[@]}"; then
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  log "crashes found by: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
log "no crash in any target"
