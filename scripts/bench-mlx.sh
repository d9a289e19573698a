#!/usr/bin/env bash
# MLX export benchmark: `ouro-quant convert --format mlx` (whole conversion: read, quantize, write,
# verify) beside MLX's own CPU `mx.quantize` on the same tensors, both on 2 cores, in one run.
#
#   scripts/bench-mlx.sh [MODEL_DIR]     (default: a synth ouro-1.4b under target/bench, made if absent)
#
# Needs `cargo build --release` and the oracle venv (scripts/test.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/ouro-quant
py=target/oracle-venv/bin/python
model=${1:-target/bench/ouro-1.4b}
mkdir -p target/bench
[ -d "$model" ] || "$bin" synth --preset ouro-1.4b --seed 0 -o "$model"
out=target/bench/mlx-out
for cfg in "4 64" "8 64" "4 32"; do
  set -- $cfg
  rm -rf "$out"
  # warm the page cache so both tools read from memory
  cat "$model"/model*.safetensors > /dev/null; sync
  /usr/bin/time -f "ouro-quant %e s wall, peak RSS %M KiB" env RAYON_NUM_THREADS=2 taskset -c 0,1 \
    "$bin" convert "$model" --format mlx --bits "$1" --group-size "$2" -o "$out" --json \
    | "$py" -c 'import json,sys; s=json.load(sys.stdin); print("ouro-quant %s-bit gs%s: %.2f s, %.0f MB written" % (s["bits"], s["group_size"], s["seconds"], s["bytes"]/1e6))'
  taskset -c 0,1 "$py" scripts/mlx_quantize_bench.py "$model" "$1" "$2"
done
rm -rf "$out"
