"""The timestep plumbing of an integer model: the shared [TimestepContext][diffusers_qalora.TimestepContext] and the denoiser's pre-hook that fills
it.  Pure torch (the QALoRA tuner uses the same model attributes, so a model exported from QALoRA
keeps its hook)."""

from __future__ import annotations

import torch
from torch import nn

from ..quant import TimestepContext, attach_timestep_context
from .modules import integer_layers

__all__ = ["OUTPUT_HOOK_ATTR", "attach_integer_context"]

OUTPUT_HOOK_ATTR = "_qalora_contiguous_output_hook"


def _contiguous(value):
    if isinstance(value, torch.Tensor):
        return value.contiguous() if value.dim() == 4 and not value.is_contiguous() else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_contiguous(v) for v in value)
    if isinstance(value, dict):  # diffusers' BaseOutput is an OrderedDict dataclass
        for key in list(value.keys()):
            value[key] = _contiguous(value[key])
    return value


def _contiguous_output_hook(module: nn.Module, args, output):
    """Integer convolutions work in channels-last; hand the denoiser's output back in the usual NCHW layout."""
    return _contiguous(output)


def attach_integer_context(model: nn.Module, timestep_argument: str = "timestep") -> TimestepContext:
    """Give every integer layer of ``model`` the model's shared [TimestepContext][diffusers_qalora.TimestepContext], installing the forward pre-hook
    that fills it from the ``timestep_argument`` of ``model.forward`` if the model has none yet, and a forward hook
    that returns the model's 4-D outputs contiguous (NCHW) (idempotent)."""
    # The context and hook `get_qalora_model` installed, if any, are reused: a model exported from QALoRA keeps them.
    context = attach_timestep_context(model, timestep_argument, integer_layers(model).values())
    if getattr(model, OUTPUT_HOOK_ATTR, None) is None:
        object.__setattr__(model, OUTPUT_HOOK_ATTR, model.register_forward_hook(_contiguous_output_hook))
    return context
