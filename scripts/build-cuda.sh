#!/usr/bin/env bash
# Builds the runner with CUDA (`cargo build --release --features cuda`) on a machine with no GPU,
# no driver and no system CUDA: the toolkit comes from PyPI into target/cuda/toolkit.
#
#   scripts/build-cuda.sh                 # release build -> target/cuda/build/release/ouro-quant
#   scripts/build-cuda.sh --check         # cargo check --features cuda only (what CI runs)
#   CUDA_COMPUTE_CAP=90 scripts/build-cuda.sh   # kernels for an H100/H200 instead of the RTX 5070
#
# Besides the binary, target/cuda/ouro-quant-cuda-smNN.gz: stripped and compressed, for carrying
# to a GPU machine (scripts/device-check.sh --bin takes it as it is).
#
# What it sets up:
# - the compiler and libraries pinned in scripts/cuda-requirements.txt (CUDA 13.0: the 12.x
#   wheels on PyPI have no nvcc), installed with pip --target --no-deps;
# - PATH with that nvcc, CUDA_ROOT/CUDA_PATH at it (candle-kernels' and cudarc's build scripts
#   read them), CUDA_COMPUTE_CAP (default 120, the RTX 5070's Blackwell; candle compiles its
#   kernels to PTX for that architecture, which the driver JIT-compiles on first use);
# - a link-time stand-in for the driver library: cudarc links libcuda.so, which only a driver
#   installs. target/cuda/stub/libcuda.so defines every entry point of the toolkit's cuda.h and
#   returns CUDA_ERROR_UNKNOWN; the binary records the soname libcuda.so.1, so on a machine with a
#   driver the real one is loaded. The stub folder is on the link path only, never in the rpath;
# - an rpath to the toolkit's lib folder, so that the binary built here finds cuBLAS, cuRAND and
#   NVRTC of the same release where it was built (elsewhere: LD_LIBRARY_PATH, see docs/runner.md).
#
# The build goes to its own target folder (target/cuda/build) so that it does not invalidate the
# CPU build. Needs: python3 with pip, gcc, cargo; about 1.3 GB of disk for the toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
mode=build
case "${1:-}" in
  --check) mode=check ;;
  "") ;;
  *) echo "usage: scripts/build-cuda.sh [--check]" >&2; exit 2 ;;
esac

req=scripts/cuda-requirements.txt
kit=$root/target/cuda/toolkit
stamp="$kit/.installed-$(sha256sum "$req" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "installing the CUDA toolkit from PyPI into $kit ($req)" >&2
  rm -rf "$kit"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$kit" -r "$req"
  touch "$stamp"
fi
cuda=$kit/nvidia/cu13
[ -x "$cuda/bin/nvcc" ] || { echo "error: $cuda/bin/nvcc missing after install" >&2; exit 1; }
# nvcc finds cicc through nvcc.profile relative to its own folder: the nvvm wheel puts it there
[ -x "$cuda/nvvm/bin/cicc" ] || { echo "error: $cuda/nvvm/bin/cicc missing (nvidia-nvvm)" >&2; exit 1; }

# link names: the wheels ship only the versioned sonames
links=$root/target/cuda/lib
mkdir -p "$links"
for l in cublas cublasLt nvrtc curand cudart; do
  so=$(cd "$cuda/lib" && ls "lib$l.so."* 2>/dev/null | grep -E "^lib$l\.so\.[0-9]+$" | head -1)
  [ -n "$so" ] || { echo "error: no lib$l.so.N in $cuda/lib" >&2; exit 1; }
  ln -sfn "$cuda/lib/$so" "$links/lib$l.so"
done

# the driver stand-in, made from the toolkit's own header (every symbol name, before and after
# the header's versioning macros)
stub=$root/target/cuda/stub
if [ ! -e "$stub/libcuda.so" ] || [ "$stub/libcuda.so" -ot "$cuda/include/cuda.h" ]; then
  mkdir -p "$stub"
  {
    grep -ohE 'CUresult +CUDAAPI +cu[A-Za-z0-9_]+' "$cuda/include/cuda.h" | awk '{print $3}'
    gcc -E -P -I"$cuda/include" "$cuda/include/cuda.h" | tr '\n' ' ' \
      | grep -oE 'CUresult +cu[A-Za-z0-9_]+ *\(' | sed -E 's/CUresult +//; s/ *\(//'
  } | sort -u | awk '{printf "int %s(void) { return 999; }\n", $1}' > "$stub/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda_stub.c"
fi
# by its soname too: LD_LIBRARY_PATH=target/cuda/stub runs the CUDA build here on the CPU (every
# driver call answers CUDA_ERROR_UNKNOWN, so --device cuda is refused with a message)
ln -sfn libcuda.so "$stub/libcuda.so.1"

export PATH="$cuda/bin:$PATH"
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-120}"
# candle-kernels' build compiles its CUDA sources with cudaforge, on half the cores by default
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export LIBRARY_PATH="$links:$stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$links -L native=$stub -C link-arg=-Wl,-rpath,$cuda/lib"
echo "nvcc: $(nvcc --version | tail -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2
if [ "$mode" = check ]; then
  exec cargo check --locked --features cuda --target-dir target/cuda/build --all-targets
fi
cargo build --locked --release --features cuda --target-dir target/cuda/build
bin=target/cuda/build/release/ouro-quant
# the binary must want the driver by its soname (the stub is never recorded by path)
readelf -d "$bin" | grep -q 'NEEDED.*\[libcuda\.so\.1\]' || { echo "error: $bin does not link libcuda.so.1" >&2; exit 1; }
# it starts, runs on the CPU, and refuses CUDA without a driver rather than failing otherwise
LD_LIBRARY_PATH="$stub" "$bin" run fixtures/ouro-tiny-trained --prompt-tokens 10,17,24 --max-tokens 2 --json > /dev/null \
  || { echo "error: $bin does not run on the CPU" >&2; exit 1; }
if LD_LIBRARY_PATH="$stub" "$bin" run fixtures/ouro-tiny-trained --prompt-tokens 10 --max-tokens 1 --device cuda 2> "$root/target/cuda/nodriver.txt" > /dev/null \
  || ! grep -q 'no usable GPU' "$root/target/cuda/nodriver.txt"; then
  echo "error: $bin --device cuda without a driver did not refuse cleanly: $(cat "$root/target/cuda/nodriver.txt")" >&2; exit 1
fi
# a copy small enough to carry to a lent GPU machine (64 MiB): stripped and compressed
carry="target/cuda/ouro-quant-cuda-sm$CUDA_COMPUTE_CAP.gz"
strip -o "$carry.tmp" "$bin" && gzip -9 -c "$carry.tmp" > "$carry" && rm -f "$carry.tmp"
echo "built $bin ($(du -h "$bin" | cut -f1)); to carry: $carry ($(du -h "$carry" | cut -f1))" >&2
