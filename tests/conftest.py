"""Shared test set-up: the tiny model factories in ``tests/tiny_models.py`` are importable from every test folder."""

import os
import sys
from pathlib import Path

import torch

# The Triton kernel tests run in Triton's interpreter on CPU tensors.  triton reads TRITON_INTERPRET when a function
# is decorated, and triton.language decorates its own helpers (tl.sum, tl.max, tl.zeros, ...) when triton is first
# imported, which `import peft` already does: the variable must be set before any test module is collected, i.e.
# here (this conftest is loaded first).  tests/kernels/conftest.py sets it on a GPU machine too, because the kernel
# tests run on CPU tensors: with a GPU, the compiled kernels are checked by `python benchmarks/gpu_kernels.py`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
