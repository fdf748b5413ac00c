"""Which implementation runs: the Triton kernels or their torch references.

Rules (see ``docs/kernels.md``):

* ``"auto"`` (the default): Triton for CUDA tensors when ``triton`` imports, the torch reference everywhere else;
* ``"triton"``: the Triton kernels; an error (naming the fix) where they cannot run, e.g. on CPU tensors unless the
  Triton interpreter is on (``TRITON_INTERPRET=1`` in the environment before the kernels are first built);
* ``"torch"``: the torch reference.

The request is looked up in this order: the module's own setting ([set_module_kernel_backend][diffusers_qalora.kernels.set_module_kernel_backend]), then the global
one ([set_kernel_backend][diffusers_qalora.kernels.set_kernel_backend], the [kernel_backend][diffusers_qalora.kernels.kernel_backend] context manager, or the ``QALORA_KERNEL_BACKEND`` environment
variable), then ``"auto"``.  A module resolves its choice once per device (at its first forward there) and keeps it
until one of these settings changes.

Nothing here imports ``triton``: it is imported, and the kernels are decorated, the first time a kernel runs, so
``import diffusers_qalora`` works without Triton, and the interpreter switch is read when the kernels are built.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._build import built_interpreted, interpreter_requested, triton_import_error

KERNEL_BACKENDS = ("auto", "triton", "torch")
ENV_BACKEND = "QALORA_KERNEL_BACKEND"

# The module attribute that holds a per-module request, and the one that caches the resolved choice.
MODULE_BACKEND_ATTR = "_qalora_kernel_backend"
MODULE_CHOICE_ATTR = "_qalora_kernel_choice"

_state: dict[str, Any] = {"backend": None, "version": 0}


def validate_kernel_backend(backend: str, name: str = "backend") -> str:
    """Return ``backend`` if it is one of ``"auto"``, ``"triton"``, ``"torch"``; else raise a ``ValueError``."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"`{name}` must be one of {KERNEL_BACKENDS}, got {backend!r}.")
    return backend


# -- availability ----------------------------------------------------------------------------------------------------
def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """``None`` if the Triton kernels can run on ``device``, else the reason (a sentence that names the fix)."""
    device = torch.device(device)
    why = triton_import_error()
    if why is not None:
        return why
    interpreted = built_interpreted()
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreted is None:
            interpreted = interpreter_requested()
        if interpreted:
            return None
        return (
            "Triton kernels run on CUDA tensors; CPU tensors need the Triton interpreter, i.e. TRITON_INTERPRET=1 in "
            "the environment before the kernels are first used (they were built, or would be built, without it)"
        )
    return f"the Triton kernels support CUDA (and CPU through the interpreter) tensors, not {device.type!r}"


# -- global and per-module requests ------------------------------------------------------------------------------------
def get_kernel_backend() -> str:
    """The global request: what [set_kernel_backend][diffusers_qalora.kernels.set_kernel_backend] set, else ``QALORA_KERNEL_BACKEND``, else ``"auto"``."""
    backend = _state["backend"]
    if backend is None:
        env = os.environ.get(ENV_BACKEND, "").strip().lower()
        if env:
            return validate_kernel_backend(env, ENV_BACKEND)
        return "auto"
    return backend


def set_kernel_backend(backend: str | None) -> str | None:
    """Set the global request (``"auto"``, ``"triton"`` or ``"torch"``; ``None`` goes back to the environment
    variable / ``"auto"``) and return the previous setting.  Modules re-resolve their choice at their next call."""
    if backend is not None:
        validate_kernel_backend(backend)
    previous = _state["backend"]
    _state["backend"] = backend
    _state["version"] += 1
    return previous


@contextmanager
def kernel_backend(backend: str) -> Iterator[None]:
    """Use ``backend`` globally inside the block.

    Example:

    ```py
    >>> from diffusers_qalora.kernels import kernel_backend
    >>> with kernel_backend("torch"):
    ...     loss = model(x, t).sample.square().mean()   # every quantizer runs the torch reference
    ```
    """
    previous = set_kernel_backend(validate_kernel_backend(backend))
    try:
        yield
    finally:
        set_kernel_backend(previous)


def set_module_kernel_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Set the request of ``model`` and of every sub-module that dispatches (fake-quantizers, integer layers).

    ``None`` removes the per-module setting (the global one applies again).  Integer layers (``IntegerLinear`` /
    ``IntegerConv2d``) have their own ``backend`` attribute: ``"triton"`` and ``"torch"`` set it to ``"triton"`` and
    ``"reference"``, ``"auto"``/``None`` to ``"auto"``.
    """
    if backend is not None:
        validate_kernel_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    from ..export.modules import IntegerLayer

    for module in model.modules():
        if isinstance(module, IntegerLayer):
            module.set_backend({"triton": "triton", "torch": "reference"}.get(backend, "auto"))
            continue
        if backend is None:
            module.__dict__.pop(MODULE_BACKEND_ATTR, None)
        else:
            module.__dict__[MODULE_BACKEND_ATTR] = backend
        module.__dict__.pop(MODULE_CHOICE_ATTR, None)
    return model


def requested_backend(module: nn.Module | None = None) -> str:
    """The request that applies to ``module``: its own setting, else the global one."""
    if module is not None:
        own = module.__dict__.get(MODULE_BACKEND_ATTR)
        if own is not None and own != "auto":
            return own
    return get_kernel_backend()


def resolve_kernel_backend(requested: str, device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for a request on ``device``; a ``RuntimeError`` if ``"triton"`` cannot run there."""
    validate_kernel_backend(requested, "requested")
    device = torch.device(device)
    if requested == "torch":
        return "torch"
    if requested == "triton":
        why = triton_unavailable_reason(device)
        if why is not None:
            raise RuntimeError(
                f"kernel backend 'triton' was requested for a tensor on {device}, but {why}. Use "
                f"set_kernel_backend('auto') or 'torch' to run the torch reference instead."
            )
        return "triton"
    return "triton" if device.type == "cuda" and triton_import_error() is None else "torch"


def module_choice(module: nn.Module, device: torch.device) -> str:
    """The backend ``module`` uses on ``device``: resolved at its first call there, then cached on the module."""
    key = (device.type, _state["version"], module.__dict__.get(MODULE_BACKEND_ATTR))
    cached = module.__dict__.get(MODULE_CHOICE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    choice = resolve_kernel_backend(requested_backend(module), device)
    module.__dict__[MODULE_CHOICE_ATTR] = (key, choice)
    return choice


def module_kernel_backend(module: nn.Module) -> str | None:
    """The backend ``module`` resolved at its last call (``"triton"`` / ``"torch"``), or ``None`` before any call."""
    cached = module.__dict__.get(MODULE_CHOICE_ATTR)
    return None if cached is None else cached[1]


# -- the hook into diffusers_qalora.quant ------------------------------------------------------------------------------
def fake_quantize_resolver(module: nn.Module, x: torch.Tensor) -> Callable:
    """The implementation of ``fake_quantize`` for ``module``'s input ``x`` (installed into ``quant``)."""
    return _fake_quantize_impls()[module_choice(module, x.device)]


@functools.lru_cache(maxsize=1)
def _fake_quantize_impls() -> dict[str, Callable]:
    from ..quant.primitives import fake_quantize
    from .fake_quant import fused_fake_quantize

    return {"torch": fake_quantize, "triton": fused_fake_quantize}
