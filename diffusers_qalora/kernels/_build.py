"""Lazy loading of the modules that hold ``@triton.jit`` kernels.

``triton`` reads ``TRITON_INTERPRET`` when a function is *decorated*: with it set, ``@triton.jit`` returns an
interpreted function that runs on CPU tensors (numpy underneath); without it, a function compiled for the GPU.  The
kernel modules (``_fake_quant_triton``, ``_int_gemm_triton``, ...) therefore import ``triton`` at their top and are
imported only here, the first time a kernel runs, so that a test session can set the variable at any point before.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .dispatch import interpreter_requested, triton_import_error

_state: dict[str, bool | None] = {"interpreted": None}


def built_interpreted() -> bool | None:
    """Whether the kernels were built for the interpreter; ``None`` while none was built yet."""
    return _state["interpreted"]


def load_kernel_module(name: str) -> ModuleType:
    """Import ``diffusers_qalora.kernels.<name>`` (a module of ``@triton.jit`` kernels), decorating its kernels in the
    mode (interpreted or compiled) that the environment asks for at the first call."""
    why = triton_import_error()
    if why is not None:
        raise RuntimeError(f"the Triton kernels cannot be built: {why}.")
    if _state["interpreted"] is None:
        _state["interpreted"] = interpreter_requested()
    return importlib.import_module(f"{__package__}.{name}")
