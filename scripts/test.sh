#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the Python oracles (llama.cpp's gguf-py,
# mlx-lm) into a venv under target/, then runs every Rust test against them.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/oracle-venv
req=tests/oracle-requirements.txt
stamp="$venv/.installed-$(sha256sum "$req" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== installing Python oracles into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
export OURO_QUANT_PYTHON="$PWD/$venv/bin/python"

echo "== cargo test"
cargo test --locked "$@"
