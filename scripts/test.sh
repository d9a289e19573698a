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

# tests note what they could and could not exercise here (src/test_report.rs); printed at the end
report="$PWD/target/test-report"
rm -rf "$report"
mkdir -p "$report"
export OURO_QUANT_TEST_REPORT="$report"

echo "== cargo test"
status=0
cargo test --locked "$@" || status=$?

cpu=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
echo "== what ran on this machine (${cpu:-$(uname -m)}, $(nproc) cores)"
if [ -f "$report/report.txt" ]; then
  sort -u "$report/report.txt"
else
  echo "(no test reported: did the suite run?)"
fi
exit "$status"
