"""Granularities of a quantization step size: one per tensor, per output channel, per token, or per group of channels.

For weights, a granularity maps a weight of shape ``(C_out, C_in, *kernel)`` to a *grouped view* ``(C_out, G, E)``
where each of the ``G`` groups of ``E`` elements shares one step size; the step tensor then has shape
``(C_out or 1, G, 1)``.  For activations (dynamic quantization, ``DynamicActQuantizer``), `PerToken` gives one step
per token (a row of a linear layer's input, a pixel of a convolution's input) and `PerGroup` one step per token and
group of ``group_size`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerTensor:
    """One step size for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One step size per output channel (dim 0 of a weight)."""


@dataclass(frozen=True)
class PerToken:
    """One step size per token: per row of a linear layer's input, per pixel (over the channels) of a convolution's.
    Activations only (dynamic quantization)."""


@dataclass(frozen=True)
class PerGroup:
    """One step size per output channel and per group of ``group_size`` consecutive input channels (dim 1).

    For convolutions a group also spans the kernel window, so it holds ``group_size * kh * kw`` elements.
    """

    group_size: int

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"`group_size` must be a positive integer, got {self.group_size!r}.")


Granularity = PerTensor | PerChannel | PerGroup


def check_granularity(granularity: Granularity, weight_shape: torch.Size | tuple[int, ...]) -> None:
    """Raise a ``ValueError`` if ``granularity`` cannot be applied to a weight of ``weight_shape``."""
    if not isinstance(granularity, PerTensor | PerChannel | PerGroup):
        raise TypeError(
            f"`granularity` must be PerTensor(), PerChannel() or PerGroup(group_size), got {granularity!r}."
        )
    if len(weight_shape) < 2:
        raise ValueError(f"weight must have at least 2 dims (C_out, C_in, ...), got shape {tuple(weight_shape)}.")
    if isinstance(granularity, PerGroup) and weight_shape[1] % granularity.group_size:
        raise ValueError(
            f"`group_size` ({granularity.group_size}) must divide the number of input channels ({weight_shape[1]}); "
            f"choose a divisor of {weight_shape[1]}."
        )


def grouped_view(weight: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """View ``weight`` as ``(C_out or 1, G, E)`` so that a step of shape ``(C_out or 1, G, 1)`` broadcasts."""
    check_granularity(granularity, weight.shape)
    c_out = weight.shape[0]
    if isinstance(granularity, PerTensor):
        return weight.reshape(1, 1, -1)
    if isinstance(granularity, PerChannel):
        return weight.reshape(c_out, 1, -1)
    groups = weight.shape[1] // granularity.group_size
    return weight.reshape(c_out, groups, -1)


def step_shape(weight_shape: torch.Size | tuple[int, ...], granularity: Granularity) -> tuple[int, int, int]:
    """Shape ``(C_out or 1, G, 1)`` of the step tensor for ``granularity`` on a weight of ``weight_shape``."""
    check_granularity(granularity, weight_shape)
    if isinstance(granularity, PerTensor):
        return (1, 1, 1)
    if isinstance(granularity, PerChannel):
        return (weight_shape[0], 1, 1)
    return (weight_shape[0], weight_shape[1] // granularity.group_size, 1)
