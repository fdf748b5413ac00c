#!/usr/bin/env bash
# One entry point for set-up and work.  `bash scripts/dev.sh test` runs the test suite,
# `bash scripts/dev.sh demo` runs the main job on the embedded default model.  Both set up what they need:
# a virtual environment in .venv that also sees the system's packages (so a user's CUDA torch is kept),
# the CPU torch wheel only when no torch is importable, triton (for the kernel tests' interpreter) only when none is
# installed, and this package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QALORA_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
  fi
  local vpy="$VENV/bin/python"
  if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
    # The pinned release is a CPU wheel on this project's build machines and the matching build elsewhere;
    # an unpinned `torch` would pull a multi-GB CUDA build on a CPU-only machine.
    "$vpy" -m pip install -q "torch==2.13.0"
  fi
  # The kernel tests run Triton's interpreter on CPU.  A CUDA build of torch brings its own triton, which is never
  # replaced: triton is installed only when none is present, and only on Linux x86-64 (the platform of its wheels).
  # 3.7.1 is the release torch 2.13.0's CUDA wheels pin, so CPU runs test the triton that CUDA users of that torch
  # have.
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && \
     ! "$vpy" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('triton') is None)" >/dev/null 2>&1; then
    "$vpy" -m pip install -q "triton==3.7.1"
  fi
  "$vpy" -m pip install -q -e ".[dev]"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  test)
    setup
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    "$VENV/bin/python" -m ruff check diffusers_qalora examples benchmarks tests
    NO_MKDOCS_2_WARNING=1 "$VENV/bin/python" -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
    set +e
    "$VENV/bin/python" -m pytest -q "$@"
    rc=$?
    set -e
    # pytest exits 5 when a selection holds no test: that is not a failure of the suite.
    if [ "$rc" -eq 5 ]; then echo "no tests selected"; exit 0; fi
    exit "$rc"
    ;;
  demo)
    setup
    "$VENV/bin/python" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no examples/distill.py "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh {setup|test|demo} [args...]" >&2
    exit 2
    ;;
esac
