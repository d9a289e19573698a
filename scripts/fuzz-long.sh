#!/usr/bin/env bash
# The long fuzzing run, before a release (not in CI): every cargo-fuzz target of fuzz/ for RUNS
# executions (default 10,000,000) from the committed seeds and regressions, one target after the
# other on one core, then a table for fuzz/README.md's "Recorded runs".
#
#   scripts/fuzz-long.sh [RUNS] [TARGET...]
#
# Needs a nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz if missing.
# The working corpus goes to target/fuzz-corpus/<target> (kept between runs, never committed). A
# crash stops the script with libFuzzer's report and the crashing input under
# fuzz/artifacts/<target>/: fix it, then copy the input into fuzz/regressions/<target>/ so that
# tests/fuzz.rs replays it on every CI run.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-10000000}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_header gguf_header config shard_index)

case "$runs" in
  ''|*[!0-9]*) echo "fuzz-long.sh: RUNS must be a whole number of executions, got '$runs'" >&2; exit 2 ;;
esac
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz-long.sh: cargo-fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

cpu=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || uname -m)
rows=()
for t in "${targets[@]}"; do
  [ -d "fuzz/seeds/$t" ] || { echo "fuzz-long.sh: no target '$t' (fuzz/seeds/$t is missing)" >&2; exit 2; }
  corpus="target/fuzz-corpus/$t"
  mkdir -p "$corpus"
  log="target/fuzz-corpus/$t.log"
  echo "== $t: $runs executions"
  start=$(date +%s)
  # -O: optimised with debug assertions (overflow checks on), as the CI replay builds it
  cargo +nightly fuzz run -O "$t" "$corpus" "fuzz/seeds/$t" "fuzz/regressions/$t" -- \
    -runs="$runs" -max_len=8192 -print_final_stats=1 >"$log" 2>&1 || {
      tail -40 "$log"
      echo "fuzz-long.sh: $t FAILED: see $log and fuzz/artifacts/$t/" >&2
      exit 1
    }
  secs=$(( $(date +%s) - start ))
  done_runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || echo "?")
  ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*' || echo "?")
  files=$(find "$corpus" -type f | wc -l)
  bytes=$(du -sk "$corpus" | cut -f1)
  rows+=("| \`$t\` | $done_runs | ${secs} s | $rate | $cov | $ft | $files inputs / $bytes KB |")
done

echo
echo "$(date -u +%Y-%m-%d), $cpu, 1 core per target, \`scripts/fuzz-long.sh $runs\`, no failure:"
echo
echo "| target | executions | time | exec/s | coverage (edges) | features | corpus grown to |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
