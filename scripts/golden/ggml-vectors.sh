#!/usr/bin/env bash
# Regenerates ggml's golden bytes (fixtures/golden/ggml/) with ggml itself and compares them:
#
#   scripts/golden/ggml-vectors.sh [--write OUTDIR]
#
# Downloads the PyPI sdist llama-cpp-python 0.3.36 (its vendored llama.cpp holds ggml 0.25.3,
# commit 0c1e570; sha256 checked), builds ggml-base with CMake (Release, -DGGML_NATIVE=OFF: no
# -march flags, so no fused multiply-add contraction) from a cmake wheel installed under target/,
# compiles scripts/golden/quantize_vectors.c against it, and re-runs ggml_quantize_chunk on every
# stored input (the inputs are data: the generator that drew them is not kept) with and without
# each importance vector. Prints how many block tensors came out byte for byte the same; with
# --write, writes the regenerated files into OUTDIR (never over the fixtures). Needs gcc, python3
# and the network; about a minute on 2 cores. Measured 2026-12-04: 115 of 115 (vectors) and 65 of
# 65 (../shared's vectors_iq), and the rewritten vectors.safetensors has the recorded sha256.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=
[ "${1:-}" = --write ] && { out=${2:?--write OUTDIR}; mkdir "$out" || { echo "$0: $out must be a new directory" >&2; exit 2; }; }
work=target/golden-ggml
mkdir -p "$work"
sdist=$work/llama_cpp_python-0.3.36.tar.gz
url=https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz
sum=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
if [ ! -f "$sdist" ]; then
  curl -fsSL -o "$sdist.part" "$url"
  mv "$sdist.part" "$sdist"
fi
echo "$sum  $sdist" | sha256sum -c --quiet || { echo "$0: $sdist: sha256 differs from $sum" >&2; exit 1; }
src=$work/llama_cpp_python-0.3.36/vendor/llama.cpp
[ -d "$src" ] || tar xzf "$sdist" -C "$work"
[ -x "$work/venv/bin/cmake" ] || { python3 -m venv "$work/venv"; "$work/venv/bin/pip" install -q cmake ninja; }
export PATH=$PWD/$work/venv/bin:$PATH
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF >/dev/null
ninja -C "$work/build" ggml-base >/dev/null
gcc -O2 -o "$work/quantize_vectors" scripts/golden/quantize_vectors.c -I"$src/ggml/include" \
  -L"$work/build/bin" -lggml-base -Wl,-rpath,"$PWD/$work/build/bin"
rc=0
for f in fixtures/golden/ggml/vectors*.safetensors; do
  spec=${f%.safetensors}.json
  if [ -n "$out" ]; then
    python3 scripts/golden/ggml_vectors.py "$work/quantize_vectors" "$f" "$spec" --write "$out/$(basename "$f")" || rc=1
    cp "$spec" "$out/"
  else
    python3 scripts/golden/ggml_vectors.py "$work/quantize_vectors" "$f" "$spec" || rc=1
  fi
done
exit $rc
