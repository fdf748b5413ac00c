"""Shared set-up of the kernel tests: the Triton interpreter, one CPU thread.

``TRITON_INTERPRET`` is read when a kernel is decorated.  The kernels of `diffusers_qalora.kernels` are decorated
lazily, at their first run, so setting the variable here (at collection, before any test runs) is enough even when
an earlier import (``import diffusers_qalora``, or ``peft``, which imports ``triton``) already happened.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def triton_on_cpu():
    """Skip the test if triton does not import (the test asks for ``kernel_preference="triton"`` itself, which runs
    the interpreted kernels on CPU tensors)."""
    pytest.importorskip("triton")
