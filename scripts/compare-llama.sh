#!/usr/bin/env bash
# ouro-quant beside llama.cpp, on the same model and the same machine, in one run:
#
#   scripts/compare-llama.sh --llama-bin DIR [--model CHECKPOINT] [--text FILE] [--ctx N]
#       [--types "Q8_0 Q6_K Q4_K_M ..."] [--threads N] [--prompt N] [--gen N] [--work DIR]
#       [--mix-fixture FILE.tsv [--model-label LABEL]]
#
# DIR holds a llama.cpp build with the community `ouro` port (llama-quantize, llama-perplexity,
# llama-bench, llama-simple). It cannot be built in CI (the port is not in llama.cpp's releases),
# so this script is how the README's llama.cpp figures and the claims below are re-checked by hand.
# Defaults: the trained fixture and its validation text at --ctx 128, 2 threads, 128 prompt
# tokens and 32 new ones; a synthetic full-size model (`ouro-quant synth --preset ouro-1.4b -o DIR`)
# gives the speed figures that matter.
#
# For each file type it prints one line per check:
#  - bytes: llama-quantize run on our F16 file against our direct conversion: tensors of the same
#    type, and of those the byte-identical ones (our quantizers are bit-exact with ggml's; from
#    bf16 checkpoints many Q4_K tensors differ in a few blocks, because llama.cpp quantizes the F16
#    rounding of the bf16 values: docs/conversion.md);
#  - loading and quality: llama-perplexity on our file (so llama.cpp loads it) against our own
#    all-loops perplexity of the same file; llama-perplexity --kl-divergence against our F32 file,
#    beside `ouro-quant validate`'s loop-4 KL and same-top share (both run all 4 loops);
#  - speed: llama-quantize against `ouro-quant convert` (wall seconds, max RSS), and llama-bench
#    against `ouro-quant run --json` (prefill and decode tok/s, all loops).
# It also loads the golden llama.cpp-layout files (fixtures/golden/gguf/*.gguf) with llama-simple,
# and with --mix-fixture writes the per-tensor types llama-quantize chose for every type it ran
# (the format of fixtures/llama-quantize/*.tsv, tested by tests/gguf.rs against src/gguf/mix.rs;
# its `# model:` line is --model-label, default the --model path: give `synth --preset ouro-1.4b`
# for a synthetic model, or a path inside this repository, so that the test can rebuild the config).
set -euo pipefail
cd "$(dirname "$0")/.."

llama= model=fixtures/ouro-tiny-trained text= ctx=128 threads=2 prompt=128 gen=32 work= fixture= label=
types="F16 Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_M Q4_0 IQ4_NL"
while [ $# -gt 0 ]; do
  case "$1" in
    --llama-bin) llama=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --text) text=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;;
    --types) types=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --prompt) prompt=$2; shift 2 ;;
    --gen) gen=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --mix-fixture) fixture=$2; shift 2 ;;
    --model-label) label=$2; shift 2 ;;
    *) sed -n '2,33p' "$0" >&2; exit 2 ;;
  esac
done
[ -n "$llama" ] || { echo "$0: --llama-bin DIR (a llama.cpp build with the ouro port) is required" >&2; exit 2; }
for t in llama-quantize llama-perplexity llama-bench llama-simple; do
  [ -x "$llama/$t" ] || { echo "$0: $llama/$t is missing or not executable" >&2; exit 2; }
done
[ -f "$model/config.json" ] || { echo "$0: $model is not an HF checkpoint (no config.json)" >&2; exit 2; }
text=${text:-$model/validation.txt}
[ -f "$text" ] || { echo "$0: no text $text: give --text FILE" >&2; exit 2; }
if [ -n "$fixture" ] && [ -e "$fixture" ]; then
  echo "$0: $fixture exists: give a new path (this script never overwrites a file)" >&2; exit 2
fi
py=${OURO_QUANT_PYTHON:-target/oracle-venv/bin/python}
[ -x "$py" ] || { echo "$0: $py missing: run scripts/test.sh once (it installs gguf-py there)" >&2; exit 2; }
"$py" scripts/llama_compare.py self-test >/dev/null

cargo build --release --quiet
bin=$PWD/target/release/ouro-quant
if [ -z "$work" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
else
  mkdir "$work" || { echo "$0: --work $work must be a new directory" >&2; exit 2; }
fi
q() { "$py" scripts/llama_compare.py "$@"; }
field() { "$py" -c "import json,sys; v=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'v': v}))" "$@"; }
timed() { local out=$1; shift; /usr/bin/time -f "%e %M" -o "$out" "$@"; }

echo "== $(date -u +%FT%TZ), $(git rev-parse --short HEAD), llama.cpp $("$llama/llama-quantize" --version 2>&1 | grep -m1 -i version || echo '(version unknown)')"
grep -m1 '^model name' /proc/cpuinfo || sysctl -n machdep.cpu.brand_string 2>/dev/null || true
grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx_vnni|avx512f|avx512bw|avx512_vnni)$' | tr '\n' ' ' || true
echo; echo "model $model, text $text, ctx $ctx, $threads threads, run: $prompt prompt + $gen new tokens"

echo "== golden llama.cpp-layout files"
for g in fixtures/golden/gguf/*.gguf; do
  if "$llama/llama-simple" -m "$g" -n 4 "Hello" >"$work/simple.log" 2>&1; then
    echo "$g: loads and generates"
  else
    echo "$g: FAILED to load: $(grep -m1 -iE 'error|failed' "$work/simple.log" || tail -1 "$work/simple.log")"
  fi
done

# the references: our F32 (KL base) and F16 (llama-quantize's input) files
RAYON_NUM_THREADS=$threads "$bin" convert "$model" --type F32 -o "$work/F32.gguf" >/dev/null 2>&1
RAYON_NUM_THREADS=$threads "$bin" convert "$model" --type F16 -o "$work/in.F16.gguf" >/dev/null 2>&1
"$llama/llama-perplexity" -m "$work/F32.gguf" -f "$text" -c "$ctx" -t "$threads" \
  --kl-divergence-base "$work/base.kld" >"$work/base.log" 2>&1 || { echo "llama-perplexity failed on our F32 file:"; tail -5 "$work/base.log"; exit 1; }
[ -z "$fixture" ] || cat >"$work/mix.tsv" <<EOF
# The tensor types llama-quantize gives each tensor of an Ouro model, per file type: the reference
# for src/gguf/mix.rs (tests/gguf.rs, mixes_match_what_llama_quantize_chose).
#
# model: ${label:-$model}
# source: scripts/compare-llama.sh on $(date -u +%F), llama-quantize of $llama
#   ($("$llama/llama-quantize" --version 2>&1 | grep -m1 -i version || echo 'version unknown')), from our F16 file
#
# columns: file type, GGUF tensor name, shape (outermost first), ggml type
EOF

prompt_ids=$("$py" -c "import json,sys; v=json.load(open(sys.argv[1]))['vocab_size']; print(','.join(str((100 + 7 * i) % v) for i in range(int(sys.argv[2]))))" "$model/config.json" "$prompt")
for ty in $types; do
  ours=$work/ours.$ty.gguf theirs=$work/llama.$ty.gguf
  timed "$work/t-ours" env RAYON_NUM_THREADS="$threads" "$bin" convert "$model" --type "$ty" -o "$ours" >/dev/null 2>&1
  timed "$work/t-llama" "$llama/llama-quantize" "$work/in.F16.gguf" "$theirs" "$ty" "$threads" >"$work/quant.$ty.log" 2>&1 \
    || { echo "$ty: llama-quantize failed: $(tail -1 "$work/quant.$ty.log")"; continue; }
  [ -z "$fixture" ] || q mix-log "$ty" "$work/quant.$ty.log" >>"$work/mix.tsv"
  read -r os om <"$work/t-ours"; read -r ls lm <"$work/t-llama"
  q same-tensors "$ours" "$theirs" >"$work/same.json"
  echo "$ty bytes: $(field "$work/same.json" "f\"{v['same_type']}/{v['tensors']} tensors of llama-quantize's type, {v['same_bytes']} byte-identical\"")"
  echo "$ty quantize: ours ${os} s, $((om / 1024)) MB; llama-quantize (from F16) ${ls} s, $((lm / 1024)) MB"

  if "$llama/llama-perplexity" -m "$ours" -f "$text" -c "$ctx" -t "$threads" --kl-divergence-base "$work/base.kld" --kl-divergence >"$work/ppl.$ty.log" 2>&1; then
    q kld-log "$work/ppl.$ty.log" >"$work/kld.json"
    "$bin" perplexity "$ours" --text "$text" --ctx "$ctx" --exit-threshold 1.0 --json >"$work/our-ppl.json" 2>/dev/null
    "$bin" validate --reference "$model" --candidate "$ours" --text "$text" --ctx "$ctx" --json >"$work/val.json" 2>/dev/null || true
    "$llama/llama-perplexity" -m "$ours" -f "$text" -c "$ctx" -t "$threads" >"$work/pplonly.$ty.log" 2>&1
    q ppl-log "$work/pplonly.$ty.log" >"$work/lppl.json"
    echo "$ty quality: llama.cpp loads it; ppl llama.cpp $(field "$work/lppl.json" "v['ppl']") vs ours $(field "$work/our-ppl.json" "round(v['runs'][0]['ppl'], 4)");" \
      "KL to F32 llama.cpp $(field "$work/kld.json" "v['kl_mean']") vs ours $(field "$work/val.json" "round(v['report']['per_loop'][3]['kl_mean'], 6)");" \
      "same top llama.cpp $(field "$work/kld.json" "v.get('same_top_pct')")% vs ours $(field "$work/val.json" "round(v['report']['per_loop'][3]['same_top_token_pct'], 2)")%"
  else
    echo "$ty quality: llama.cpp FAILED to load our file: $(grep -m1 -iE 'error|failed' "$work/ppl.$ty.log" || tail -1 "$work/ppl.$ty.log")"
  fi

  "$llama/llama-bench" -m "$ours" -p "$prompt" -n "$gen" -t "$threads" -r 3 -o json >"$work/bench.json" 2>/dev/null
  q bench-json "$work/bench.json" >"$work/lb.json"
  "$bin" run "$ours" --prompt-tokens "$prompt_ids" --max-tokens "$gen" --json >"$work/run.json" 2>/dev/null
  echo "$ty speed: prefill llama.cpp $(field "$work/lb.json" "round(v['prefill'], 2)") vs ours $(field "$work/run.json" "round(v['stats']['prefill_tokens_per_s'], 2)") tok/s;" \
    "decode llama.cpp $(field "$work/lb.json" "round(v['decode'], 2)") vs ours $(field "$work/run.json" "round(v['stats']['decode_tokens_per_s'], 2)") tok/s"
done

if [ -n "$fixture" ]; then
  cp -n "$work/mix.tsv" "$fixture"
  echo "wrote $fixture ($(grep -vc '^#' "$fixture") rows): copy it under fixtures/llama-quantize/ and run cargo test --test gguf mixes_match"
fi
