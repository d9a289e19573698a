#!/usr/bin/env bash
# What calibration buys on the trained fixture: for each GGUF type and MLX 4/3-bit, no importance matrix vs
# `--weighting loops` vs `--weighting exit:0.5`, the matrix computed on calibration.txt (drawn from
# another seed than validation.txt), each output validated on the whole validation text at --ctx 128.
# Prints a Markdown table (docs/calibration.md holds its output). Types that cannot be made without
# an importance matrix (llama-quantize refuses them too) get no "none" row.
#
# usage: [FIXTURE=DIR] scripts/imatrix-table.sh [OURO_QUANT_BINARY [TYPE...]]
#   FIXTURE: a trained fixture with calibration.txt and validation.txt (fixtures/ouro-tiny-trained;
#   fixtures/ouro-deep-trained for the deep one's table);
#   TYPE: a GGUF file type (Q4_K_M, IQ2_M, ...), MLX-<bits>bit or MLX-<recipe> (MLX-mixed_2_6);
#   the default list is the table of docs/calibration.md; docs/iquants.md lists the low-bit one.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/ouro-quant}
shift || true
types=("$@")
[ ${#types[@]} -gt 0 ] || types=(Q4_K_M Q4_K_S IQ4_XS IQ4_NL Q3_K_M Q2_K MLX-4bit MLX-3bit)
[ -x "$bin" ] || cargo build --release --locked
fx=${FIXTURE:-fixtures/ouro-tiny-trained}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" imatrix "$fx" --text "$fx/calibration.txt" --ctx 128 -o "$work/loops.gguf" --json >/dev/null
"$bin" imatrix "$fx" --text "$fx/calibration.txt" --ctx 128 --weighting exit:0.5 -o "$work/exit.gguf" --json >/dev/null
# parameters of the fixture (every tensor of its safetensors), for bits per weight
params=$(python3 - "$fx/model.safetensors" <<'PY'
import json, struct, sys
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n)); h.pop("__metadata__", None)
t = 0
for v in h.values():
    k = 1
    for d in v["shape"]:
        k *= d
    t += k
print(t)
PY
)
echo "| type | imatrix | size (bytes) | bits/weight | ppl ratio | mean KL per loop (1, 2, 3, 4) | same top % | exit agreement q=0.5 / 0.9 % |"
echo "|---|---|---|---|---|---|---|---|"
for ty in "${types[@]}"; do
  for w in none loops exit; do
    case "$ty" in
      MLX-mixed_*) out="$work/$ty-$w"; how=(--format mlx --recipe "${ty#MLX-}") ;;
      MLX-*) out="$work/$ty-$w"; how=(--format mlx --bits "${ty:4:1}") ;;
      *) out="$work/$ty-$w.gguf"; how=(--type "$ty") ;;
    esac
    im=()
    [ "$w" = none ] || im=(--imatrix "$work/$w.gguf")
    if ! "$bin" convert "$fx" "${how[@]}" "${im[@]}" -o "$out" --json >/dev/null 2>&1; then
      [ "$w" = none ] && continue  # needs an importance matrix
      echo "imatrix-table.sh: converting $ty with $w failed" >&2
      exit 1
    fi
    # the bytes of the weights: the GGUF file, or the MLX directory's safetensors shards
    if [ -d "$out" ]; then size=$(cat "$out"/*.safetensors | wc -c); else size=$(stat -c %s "$out"); fi
    "$bin" validate --reference "$fx" --candidate "$out" --text "$fx/validation.txt" --ctx 128 \
      --exit-threshold 0.5,0.9 --report "$work/$ty-$w.json" >/dev/null 2>&1 || true
    python3 - "$work/$ty-$w.json" "$ty" "$w" "$size" "$params" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["report"]
d = r["default_mode"]
kl = ", ".join("%.5f" % l["kl_mean"] for l in r["per_loop"])
ex = {round(e["q"], 2): e["exit_agreement_pct"] for e in r["exits"]}
w = {"none": "none", "loops": "loops", "exit": "exit:0.5"}[sys.argv[3]]
bpw = int(sys.argv[4]) * 8 / int(sys.argv[5])
print("| %s | %s | %s | %.2f | %.4f | %s | %.2f | %.2f / %.2f |" % (sys.argv[2], w, sys.argv[4], bpw, d["ppl_ratio"], kl, d["same_top_token_pct"], ex[0.5], ex[0.9]))
PY
  done
done
