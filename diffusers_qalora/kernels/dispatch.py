"""Which implementation runs: the Triton kernels or their torch references.

The request is a [KernelPreference][diffusers_qalora.KernelPreference] (see ``docs/kernels.md``):

* ``"auto"`` (the default): Triton for CUDA tensors when ``triton`` imports, the torch reference everywhere else;
* ``"triton"``: the Triton kernels; an error (naming the fix) where they cannot run, e.g. on CPU tensors unless the
  Triton interpreter is on (``TRITON_INTERPRET=1`` in the environment before the kernels are first built);
* ``"torch"``: the torch reference.

A module's request is the preference written on it (by its config when it was built, or by
[set_kernel_preference][diffusers_qalora.set_kernel_preference]); a function's is its ``kernel_preference`` argument.
A module resolves its choice once per device (at its first forward there) and keeps it until its preference changes.

Nothing here imports ``triton``: it is imported, and the kernels are decorated, the first time a kernel runs, so
``import diffusers_qalora`` works without Triton, and the interpreter switch is read when the kernels are built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..quant.kernel_preference import (
    KERNEL_CHOICE_ATTR,
    KernelPreference,
    kernel_preference_of,
    validate_kernel_preference,
)
from ._build import built_interpreted, interpreter_requested, triton_import_error


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


# -- resolution ------------------------------------------------------------------------------------------------------
def resolve_kernel_preference(preference: str, device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"`` for ``preference`` (``"auto"``, ``"torch"`` or ``"triton"``) on ``device``; a
    ``RuntimeError`` if ``"triton"`` cannot run there."""
    preference = validate_kernel_preference(preference)
    device = torch.device(device)
    if preference is KernelPreference.TORCH:
        return "torch"
    if preference is KernelPreference.TRITON:
        why = triton_unavailable_reason(device)
        if why is not None:
            raise RuntimeError(
                f"kernel_preference='triton' was requested for a tensor on {device}, but {why}. Use "
                f"kernel_preference='auto' or 'torch' (set_kernel_preference(model, 'auto')) to run the torch "
                f"reference instead."
            )
        return "triton"
    return "triton" if device.type == "cuda" and triton_import_error() is None else "torch"


def module_choice(module: nn.Module, device: torch.device) -> str:
    """The implementation ``module`` runs on ``device`` (``"triton"`` or ``"torch"``): resolved from its preference
    at its first call there, then cached on the module."""
    preference = kernel_preference_of(module)
    key = (device.type, preference)
    cached = module.__dict__.get(KERNEL_CHOICE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    choice = resolve_kernel_preference(preference, device)
    module.__dict__[KERNEL_CHOICE_ATTR] = (key, choice)
    return choice


def resolved_kernel(module: nn.Module) -> str | None:
    """The implementation ``module`` resolved at its last call (``"triton"`` / ``"torch"``), or ``None`` before any
    call."""
    cached = module.__dict__.get(KERNEL_CHOICE_ATTR)
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
