#!/usr/bin/env bash
# Converts the released Ouro checkpoints into the files llama.cpp and mlx-community users expect:
# GGUF Q8_0, Q6_K, Q4_K_M and MLX 8-bit, 4-bit (group size 64) and 4-bit gs32, one batch run.
#
#   scripts/convert-ouro.sh OUT_DIR NAME=CHECKPOINT_DIR... [--text VALIDATION.txt]
#       [--calibration CALIBRATION.txt] [--jobs N]
#
#   scripts/convert-ouro.sh ~/ouro-out Ouro-1.4B=~/hf/Ouro-1.4B Ouro-1.4B-Thinking=~/hf/Ouro-1.4B-Thinking \
#       Ouro-2.6B=~/hf/Ouro-2.6B Ouro-2.6B-Thinking=~/hf/Ouro-2.6B-Thinking --text wiki.txt --calibration cal.txt
#
# With --calibration, Q6_K and Q4_K_M are quantized with an importance matrix computed on that text
# (batch's default weighting per type, exit:0.5 for K-quants: docs/calibration.md; keep it apart
# from the validation text; MLX at 4 bits and more measured no gain from one and gets none). Writes OUT_DIR/ouro-all.toml and runs `ouro-quant batch` on it (set
# OURO_QUANT to the binary; default: `ouro-quant` on PATH). Re-running resumes.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,15p' "$0"; exit 2; }
out=$1; shift
text=""; calibration=""; jobs=1; sources=()
while [ $# -gt 0 ]; do
  case "$1" in
    --text) text=$(realpath "$2"); shift 2 ;;
    --calibration) calibration=$(realpath "$2"); shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    *=*) sources+=("$1"); shift ;;
    *) echo "convert-ouro.sh: expected NAME=DIR, --text, --calibration or --jobs, got '$1'" >&2; exit 2 ;;
  esac
done
[ ${#sources[@]} -gt 0 ] || { echo "convert-ouro.sh: no NAME=DIR sources" >&2; exit 2; }
mkdir -p "$out"
manifest="$out/ouro-all.toml"
{
  echo "# written by scripts/convert-ouro.sh"
  echo 'output_dir = "."'
  if [ -n "$text" ]; then
    printf '[validate]\ntext = "%s"\nctx = 512\nchunks = 8\n' "$text"
  fi
  if [ -n "$calibration" ]; then
    printf '[calibration]\ntext = "%s"\nctx = 512\n' "$calibration"
  fi
  for s in "${sources[@]}"; do
    name=${s%%=*}; dir=$(realpath "${s#*=}")
    printf '[[sources]]\nname = "%s"\npath = "%s"\n' "$name" "$dir"
  done
  v=false; [ -n "$text" ] && v=true
  for t in Q8_0 Q6_K Q4_K_M; do
    printf '[[targets]]\nformat = "gguf"\ntype = "%s"\nvalidate = %s\n' "$t" "$v"
  done
  printf '[[targets]]\nformat = "mlx"\nbits = 8\nvalidate = %s\n' "$v"
  printf '[[targets]]\nformat = "mlx"\nbits = 4\nvalidate = %s\n' "$v"
  printf '[[targets]]\nformat = "mlx"\nbits = 4\ngroup_size = 32\nvalidate = %s\n' "$v"
} > "$manifest"
exec "${OURO_QUANT:-ouro-quant}" batch "$manifest" --jobs "$jobs"
