#!/usr/bin/env bash
# Our quantized kernels against candle's through the whole runner, interleaved:
#   scripts/bench-kernels.sh [RUNS] FILE.gguf...
# For each file and run: `ouro-quant run` with 128 prompt ids and 32 new tokens (all loops),
# once with the build this CPU selects and once with OURO_QUANT_KERNELS=candle; prints prefill and
# decode tok/s, max RSS (/usr/bin/time) and which kernels multiplied the projections.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then runs=$1; shift; fi
[ $# -gt 0 ] || { echo "usage: $0 [RUNS] FILE.gguf..." >&2; exit 2; }
cargo build --release --quiet
bin=target/release/ouro-quant
grep -m1 '^model name' /proc/cpuinfo || true
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx_vnni|avx512f|avx512bw|avx512_vnni)$' | tr '\n' ' '; echo
prompt=$(seq 100 7 989 | head -128 | paste -sd,)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in "$@"; do
  for _ in $(seq "$runs"); do
    for k in "" candle; do
      /usr/bin/time -f "%M" -o "$tmp/rss" env OURO_QUANT_KERNELS=$k "$bin" run "$f" --prompt-tokens "$prompt" --max-tokens 32 --json 2>/dev/null >"$tmp/out.json"
      python3 - "$tmp" "$f" "${k:-ours}" <<'PY'
import json, sys
d, f, k = sys.argv[1:]
s = json.load(open(f"{d}/out.json"))["stats"]
rss = int(open(f"{d}/rss").read().split()[-1]) // 1024
print(f"{f} {k}: prefill {s['prefill_tokens_per_s']:.2f} tok/s, decode {s['decode_tokens_per_s']:.2f} tok/s, max RSS {rss} MB, {dict(s['kernels'])}")
PY
    done
  done
done
