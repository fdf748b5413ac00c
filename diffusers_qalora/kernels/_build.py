"""Lazy loading of the modules that hold ``@triton.jit`` kernels.

``triton`` reads ``TRITON_INTERPRET`` when a function is *decorated*: with it set, ``@triton.jit`` returns an
interpreted function that runs on CPU tensors (numpy underneath); without it, a function compiled for the GPU.  The
kernel modules (``_fake_quant_triton``, ``_int_gemm_triton``, ...) therefore import ``triton`` at their top and are
imported only here, the first time a kernel runs, so that a test session can set the variable at any point before.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

ENV_INTERPRET = "TRITON_INTERPRET"

_state: dict[str, bool | None] = {"interpreted": None}


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """``None`` if ``triton`` imports, else why not (cached: the answer does not change within a process)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (`pip install diffusers-qalora[triton]`; CUDA builds of torch bring it)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as err:  # an incompatible build fails in many ways (ImportError, RuntimeError, ...)
        return f"`import triton` failed: {type(err).__name__}: {err}"
    return None


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value in the environment now."""
    return os.environ.get(ENV_INTERPRET, "0").strip().lower() in ("1", "true", "on", "yes")


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
