#!/usr/bin/env bash
# One entry point for set-up and work.  `bash scripts/dev.sh test` runs the test suite,
# `bash scripts/dev.sh demo` runs the main job on the embedded default model.  Both set up what they need:
# a virtual environment in .venv that also sees the system's packages (so a user's CUDA torch is kept),
# the CPU torch wheel only when no torch is importable, triton (for the kernel tests' interpreter) only when none is
# installed, and this package with its dev extras.  `bash scripts/dev.sh test-floor` runs the tuner, export and Hub
# tests in a separate plain environment (.venv-floor) holding exactly the lowest releases pyproject.toml allows.
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

# The Hugging Face packages whose floors (">=X" in pyproject.toml) test-floor installs exactly ("==X").
FLOOR_PACKAGES="diffusers peft accelerate transformers safetensors huggingface_hub"

floor_pins() {
  local name version
  for name in $FLOOR_PACKAGES; do
    version=$(sed -n "s/^ *\"$name>=\([0-9.]*\)\",*$/\1/p" pyproject.toml)
    if [ -z "$version" ]; then echo "pyproject.toml declares no floor for $name" >&2; exit 1; fi
    echo "$name==$version"
  done
}

test_floor() {
  local fvenv=${QALORA_FLOOR_VENV:-.venv-floor} pins
  pins=$(floor_pins)
  # A plain environment (no system site-packages): nothing newer can leak in.  Rebuilt when the pins change.
  if [ ! -x "$fvenv/bin/python" ] || [ "$(cat "$fvenv/.floor-pins" 2>/dev/null)" != "$pins" ]; then
    rm -rf "$fvenv"
    "$PY" -m venv "$fvenv"
    "$fvenv/bin/python" -m pip install -q "torch==2.13.0"
    local constraints="$fvenv/floor-constraints.txt"
    echo "$pins" > "$constraints"
    # -c pins the Hugging Face packages wherever they are required; the package with the demo extra (the tests build the embedded testbed).
    "$fvenv/bin/python" -m pip install -q -c "$constraints" $pins -e ".[demo]" "pytest>=8" "hypothesis>=6.100"
    echo "$pins" > "$fvenv/.floor-pins"
  fi
  echo "floor versions:"; "$fvenv/bin/python" -m pip list 2>/dev/null | grep -i -E "^(torch|$(echo $FLOOR_PACKAGES | sed 's/ /|/g' | sed 's/_/[-_]/g')) "
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  "$fvenv/bin/python" -m pytest -q -p no:cacheprovider tests/tuners tests/export tests/hub tests/integrations "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  test)
    setup
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    "$VENV/bin/python" -m ruff check diffusers_qalora examples benchmarks tests
    "$VENV/bin/python" -m ruff format --check diffusers_qalora examples benchmarks tests
    NO_MKDOCS_2_WARNING=1 "$VENV/bin/python" -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
    set +e
    "$VENV/bin/python" -m pytest -q "$@"
    rc=$?
    set -e
    # pytest exits 5 when a selection holds no test: that is not a failure of the suite.
    if [ "$rc" -eq 5 ]; then echo "no tests selected"; exit 0; fi
    exit "$rc"
    ;;
  test-floor) test_floor "$@" ;;
  demo)
    setup
    "$VENV/bin/python" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no examples/distill.py "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh {setup|test|test-floor|demo} [args...]" >&2
    exit 2
    ;;
esac
