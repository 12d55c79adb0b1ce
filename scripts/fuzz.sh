#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a short time, after installing
# cargo-fuzz when it is missing. Used by scripts/test.sh; see fuzz/README.md
# for longer runs.
#
#   scripts/fuzz.sh                 # every target, FIKRA_FUZZ_SECONDS each (default 60)
#   scripts/fuzz.sh decide 600      # one target for 10 minutes
#
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it accept the
# sanitizer-coverage flags cargo-fuzz passes, and --sanitizer none skips
# AddressSanitizer, which needs nightly. Targets build with overflow checks
# and debug assertions (-a), so arithmetic overflow is a crash.
#
# The build goes to FIKRA_FUZZ_TARGET_DIR (default: a cache directory outside
# the checkout), so a second run on the same machine rebuilds only what
# changed. New corpus entries land in fuzz/corpus/TARGET, where git ignores
# all but the committed seed-* files.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
TARGETS=(decide answer config_parse)
SECONDS_EACH=${FIKRA_FUZZ_SECONDS:-60}
TARGET_DIR=${FIKRA_FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fikra-ratelimit/fuzz-target}

if [ $# -ge 1 ]; then
  TARGETS=("$1")
fi
if [ $# -ge 2 ]; then
  SECONDS_EACH=$2
fi

# cargo install puts the binary in ~/.cargo/bin, which later runs reuse.
if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION"; then
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

export RUSTC_BOOTSTRAP=1
FUZZ_FLAGS=(--sanitizer none --debug-assertions --target-dir "$TARGET_DIR")

cd fuzz
started=$(date +%s)
cargo fuzz build "${FUZZ_FLAGS[@]}"
echo "fuzz: built the targets in $(( $(date +%s) - started )) s"

failed=()
for target in "${TARGETS[@]}"; do
  dict=()
  if [ -f "$target.dict" ]; then
    dict=("-dict=$target.dict")
  fi
  mkdir -p "corpus/$target" "artifacts/$target"
  echo "fuzz: running $target for $SECONDS_EACH s"
  # -timeout and -rss_limit_mb turn a hang or a memory blow-up into a finding.
  if ! cargo fuzz run "${FUZZ_FLAGS[@]}" "$target" "corpus/$target" -- \
      -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 "${dict[@]}" 2> "artifacts/$target/last-run.log"; then
    failed+=("$target")
    echo "fuzz: $target FAILED; its log ends with:" >&2
    tail -n 40 "artifacts/$target/last-run.log" >&2
    continue
  fi
  grep -E "^(stat::number_of_executed_units|stat::new_units_added|Done)" "artifacts/$target/last-run.log" | sed "s/^/fuzz: $target: /"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]}; inputs are in fuzz/artifacts/. Reproduce with" \
    "RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none -a TARGET fuzz/artifacts/TARGET/crash-..." >&2
  exit 1
fi
echo "fuzz: ${#TARGETS[@]} targets ran $SECONDS_EACH s each without a crash"
