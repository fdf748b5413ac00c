"""Which implementation a module runs: one vocabulary, carried in the configs and stored on the modules.

[KernelPreference][diffusers_qalora.KernelPreference] names the implementations of every module that has more than
one (the fake-quantizers, the QALoRA attention modules, the Winograd layers, the exported integer layers):

* ``"auto"`` (the default): Triton on CUDA tensors when ``triton`` imports; on CPU, oneDNN for the integer layers
  where its int8 kernels are exact, the torch code everywhere else;
* ``"torch"``: the torch code (the references of the kernels; for the integer layers, the dequantized float
  computation, bit for bit the fake-quant model);
* ``"triton"``: the Triton kernels (an error naming the reason where they cannot run);
* ``"onednn"``: oneDNN's int8 kernels, for the integer layers on CPU only.

The preference travels in the configs (``QALoraConfig.kernel_preference`` for the fake-quant modules a QALoRA adapter
injects, ``QALoraQuantConfig.kernel_preference`` / ``export_quantized(kernel_preference=...)`` for the integer
layers), is written on the modules when they are built, and [set_kernel_preference][diffusers_qalora.set_kernel_preference]
changes it afterwards.  There is no process-wide switch.  Pure torch: the kernels read the attribute written here.
"""

from __future__ import annotations

import enum
from typing import Any

from torch import nn

__all__ = ["KernelPreference", "set_kernel_preference"]


class KernelPreference(str, enum.Enum):
    """The implementation a module runs (a ``str`` enum: configs hold it and JSON stores its value)."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"
    ONEDNN = "onednn"

    def __str__(self) -> str:
        return self.value


# Saved files written before the one vocabulary name the torch path of the integer layers "reference"
# (`quantization_config.backend` of an exported model).  Accepted when a saved file is read, never from a caller.
SAVED_ALIASES = {"reference": KernelPreference.TORCH}

# The module attributes (in ``__dict__``, so that any module, diffusers' attention modules too, can carry them): the
# preference, and the implementation the kernels' dispatch resolved from it (cached per device).
KERNEL_PREFERENCE_ATTR = "_qalora_kernel_preference"
KERNEL_CHOICE_ATTR = "_qalora_kernel_choice"

# What a module kind can run; a class lists more with a ``kernel_preferences`` class attribute (the integer layers).
DEFAULT_MODULE_PREFERENCES = (KernelPreference.AUTO, KernelPreference.TORCH, KernelPreference.TRITON)


def validate_kernel_preference(
    value: Any, name: str = "kernel_preference", *, integer_layers: bool = False, saved: bool = False
) -> KernelPreference:
    """``value`` as a [KernelPreference][diffusers_qalora.KernelPreference], or a ``ValueError`` naming ``name``.

    ``"onednn"`` is accepted only where ``integer_layers`` (it has no implementation for the fake-quant modules);
    the old name ``"reference"`` (``"torch"`` now) only where ``saved`` (a file being read).
    """
    if saved and isinstance(value, str) and value in SAVED_ALIASES:
        return SAVED_ALIASES[value]
    try:
        preference = KernelPreference(value)
    except ValueError:
        choices = [p.value for p in KernelPreference if integer_layers or p is not KernelPreference.ONEDNN]
        hint = " ('reference' is now 'torch')" if value == "reference" else ""
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}{hint}.") from None
    if preference is KernelPreference.ONEDNN and not integer_layers:
        raise ValueError(
            f"`{name}='onednn'` names oneDNN's int8 kernels of the exported integer layers (CPU only); fake-quant "
            f"modules run 'auto', 'torch' or 'triton'. Pass 'onednn' to export_quantized, QALoraQuantConfig or "
            f"set_kernel_preference of an exported model."
        )
    return preference


def kernel_preference_of(module: nn.Module) -> KernelPreference:
    """The preference written on ``module`` (``"auto"`` if none is)."""
    return module.__dict__.get(KERNEL_PREFERENCE_ATTR, KernelPreference.AUTO)


def set_kernel_preference(model: nn.Module, preference: str, recurse: bool = True) -> nn.Module:
    """Set the implementation that ``model`` (and, with ``recurse``, every sub-module) runs; return ``model``.

    ``"auto"``, ``"torch"`` and ``"triton"`` are written on every module (the ones without a choice ignore it);
    ``"onednn"`` only on the modules that have a oneDNN implementation (the integer layers of an exported model),
    which must be on the CPU, and the others keep their setting.  A module resolves its choice again at its next call.

    Args:
        model (`torch.nn.Module`): a QALoRA model, an exported integer model, or any module of them.
        preference (`str`): ``"auto"``, ``"torch"``, ``"triton"`` or ``"onednn"`` (see
            [KernelPreference][diffusers_qalora.KernelPreference]).
        recurse (`bool`, defaults to `True`): also set the sub-modules; `False` sets ``model`` alone.

    Raises:
        ValueError: an unknown preference, or ``"onednn"`` for modules none of which has a oneDNN implementation,
            or one of which is not on the CPU.  Nothing is changed then.

    Example:

    ```py
    >>> import diffusers_qalora as dq
    >>> dq.set_kernel_preference(pipe.unet, "torch")    # the torch references (e.g. to compare with the kernels)
    >>> dq.set_kernel_preference(pipe.unet, "auto")     # back to the default choice
    ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    preference = validate_kernel_preference(preference, "preference", integer_layers=True)
    modules = list(model.named_modules()) if recurse else [("", model)]
    if preference is KernelPreference.ONEDNN:
        modules = [
            (name, m)
            for name, m in modules
            if preference in getattr(type(m), "kernel_preferences", DEFAULT_MODULE_PREFERENCES)
        ]
        if not modules:
            raise ValueError(
                f"`preference='onednn'` runs the integer layers of an exported model on oneDNN; {type(model).__name__} "
                f"has none (export it with diffusers_qalora.export_quantized). Its fake-quant modules run 'auto', "
                f"'torch' or 'triton'."
            )
        for name, m in modules:
            device = next((t.device for t in m.buffers(recurse=False) if t.device.type not in ("cpu", "meta")), None)
            if device is not None:
                raise ValueError(
                    f"`{name or type(m).__name__}` is on {device}, but oneDNN's int8 kernels run on CPU: use "
                    f"'auto' or 'triton' there, or move the model to the CPU first."
                )
    for _, m in modules:
        if preference is KernelPreference.AUTO:
            m.__dict__.pop(KERNEL_PREFERENCE_ATTR, None)
        else:
            m.__dict__[KERNEL_PREFERENCE_ATTR] = preference
        m.__dict__.pop(KERNEL_CHOICE_ATTR, None)
    return model
