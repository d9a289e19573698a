#!/usr/bin/env bash
# The runner on a device, checked against upstream and against the CPU, in one prepared run that
# fits in 10 minutes on a lent GPU machine (16 cores; bare of Rust: it needs bash, python3 and
# the binary):
#
#   scripts/device-check.sh --device cuda [--bin PATH] [--work DIR] [--preset ouro-1.4b] [--parts golden,trained,synth]
#   scripts/device-check.sh --device cpu        # the same table on the CPU (the dry run)
#
# Binary (--bin; a .gz is unpacked first): target/cuda/build/release/ouro-quant for cuda
# (scripts/build-cuda.sh, which also writes target/cuda/ouro-quant-cuda-smNN.gz to carry; for an H100/H200
# build with CUDA_COMPUTE_CAP=90: PTX of an older architecture runs on newer GPUs, not the
# reverse), target/release/ouro-quant otherwise. On the device the CUDA 13 libraries the binary
# needs (cuBLAS, cuRAND, NVRTC, the runtime) are looked up where CUDA and PyTorch's wheels put
# them. What the script runs and prints: scripts/device_check.py. Exit status 1 if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cpu bin="" work="" rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
if [ -z "$bin" ]; then
  if [ "$device" = cuda ]; then bin=target/cuda/build/release/ouro-quant; else bin=target/release/ouro-quant; fi
fi
work=${work:-target/device-check-$device}
mkdir -p "$work"
if [[ "$bin" == *.gz ]]; then
  # the carried copy scripts/build-cuda.sh writes
  gunzip -c "$bin" > "$work/ouro-quant" && chmod +x "$work/ouro-quant" && bin=$work/ouro-quant
fi
[ -x "$bin" ] || { echo "error: $bin: no such binary (build it: cargo build --release, or scripts/build-cuda.sh)" >&2; exit 2; }

if [ "$device" = cuda ] && ldd "$bin" | grep -q 'not found'; then
  # the CUDA 13 libraries: a system toolkit, or the nvidia wheels of a Python environment
  dirs=$(ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib 2>/dev/null || true)
  for py in python3 /opt/torch/.venv/bin/python3; do
    sp=$("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
    for s in $sp; do dirs="$dirs $(ls -d "$s"/nvidia/*/lib "$s"/nvidia/cu13/lib 2>/dev/null || true)"; done
  done
  for d in $dirs; do LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
  export LD_LIBRARY_PATH
  if ldd "$bin" | grep 'not found' >&2; then
    echo "error: $bin: the libraries above were not found on this machine (looked in: $dirs)" >&2
    exit 2
  fi
fi
exec python3 scripts/device_check.py --bin "$bin" --device "$device" --work "$work" --json-out "$work/device-check.json" "${rest[@]}"
