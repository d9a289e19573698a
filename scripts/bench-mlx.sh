#!/usr/bin/env bash
# MLX export benchmark: `ouro-quant convert --format mlx` (the whole conversion: read, quantize,
# write, fsync, read back and check) beside MLX's own CPU `mx.quantize` on the same tensors, all
# pinned to 2 cores, in one run. Each ouro-quant conversion runs 3 times to the disk (beside the
# model) and, where /dev/shm exists, 3 times to tmpfs: on a VM the page cache's fresh pages make the
# disk figure vary from run to run; tmpfs shows the conversion without that.
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
log=$(mktemp)
trap 'rm -f "$log"; rm -rf target/bench/mlx-out /dev/shm/ouro-quant-bench-mlx' EXIT
ours() { # bits group out label
  rm -rf "$3"
  /usr/bin/time -f "%e %M" -o "$log.t" env RAYON_NUM_THREADS=2 taskset -c 0,1 \
    "$bin" convert "$model" --format mlx --bits "$1" --group-size "$2" -o "$3" --json > "$log.j"
  read -r wall rss < "$log.t"
  echo "{\"tool\": \"ouro-quant\", \"where\": \"$4\", \"bits\": $1, \"group_size\": $2, \"wall_s\": $wall, \"peak_rss_bytes\": $((rss * 1024)), \"bytes\": $("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes"])' "$log.j")}" | tee -a "$log"
  rm -rf "$3"
}
for cfg in "4 64" "8 64" "4 32"; do
  set -- $cfg
  # warm the page cache so both tools read from memory
  cat "$model"/model*.safetensors > /dev/null; sync
  taskset -c 0,1 "$py" scripts/mlx_quantize_bench.py "$model" "$1" "$2" | tee -a "$log"
  for _ in 1 2 3; do ours "$1" "$2" target/bench/mlx-out disk; done
  if [ -d /dev/shm ]; then
    for _ in 1 2 3; do ours "$1" "$2" /dev/shm/ouro-quant-bench-mlx tmpfs; done
  fi
done
"$py" - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("| output | mx.quantize (s, peak RSS) | ouro-quant to disk: median (min-max) s | ratio | to tmpfs: median (min-max) s | ratio | ouro-quant peak RSS |")
print("|---|---|---|---|---|---|---|")
for bits, gs in [(4, 64), (8, 64), (4, 32)]:
    mx = [r for r in rows if r["tool"] == "mx.quantize" and r["bits"] == bits and r["group_size"] == gs][0]
    cells = []
    rss = 0
    for where in ("disk", "tmpfs"):
        w = [r["wall_s"] for r in rows if r["tool"] == "ouro-quant" and r["where"] == where and r["bits"] == bits and r["group_size"] == gs]
        rss = max([rss] + [r["peak_rss_bytes"] for r in rows if r["tool"] == "ouro-quant" and r["bits"] == bits and r["group_size"] == gs])
        if w:
            m = statistics.median(w)
            cells += ["%.2f (%.2f-%.2f)" % (m, min(w), max(w)), "%.1fx" % (mx["quantize_s"] / m)]
        else:
            cells += ["-", "-"]
    size = [r["bytes"] for r in rows if r["tool"] == "ouro-quant" and r["bits"] == bits and r["group_size"] == gs][0]
    print("| %d-bit gs%d (%.0f MB) | %.2f s, %.0f MB | %s | %s | %s | %s | %.0f MB |" % (
        bits, gs, size / 1e6, mx["quantize_s"], mx["peak_rss_bytes"] / 1e6, *cells, rss / 1e6))
PY
rm -f "$log.t" "$log.j"
