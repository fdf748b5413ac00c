"""`DirectQuantConv2d`: the direct-convolution W/A-quantized baseline that Winograd layers are compared with.

Same convolutions, same bit width, no Winograd transform:

* weight: symmetric signed codes with one step per output channel (absmax, or the MSE-optimal clipping of
  ``config.weight_init="mse"``), computed once from the spatial weight;
* input: symmetric signed codes with one **dynamic** absmax step per sample (per tensor for a batch of one), so a
  result never depends on what else is in the batch.

The products of integer codes are summed in floating point: ``conv2d(Q(x), Q(w))`` equals the integer convolution
``s_x s_w sum q_x q_w`` up to float32 summation order (the values ``q * s`` are exact in float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import lp_search_qparams, qrange, quantize
from .config import WinogradConfig
from .conv import Conv3x3Layer, winograd_ineligibility
from .quantized import absmax_step

DIRECT_MODES = ("fp", "int")


def _weight_step(weight: torch.Tensor, bits: int, method: str) -> torch.Tensor:
    _, qmax = qrange(bits, True)
    flat = weight.detach().reshape(weight.shape[0], 1, -1).to(torch.float64)
    step = absmax_step(flat, -1, qmax)
    if method == "mse":
        searched, _ = lp_search_qparams(flat, bits, True, p=2.0)
        step = torch.minimum(searched.to(step.dtype), step).clamp_min(1e-30)
    return step.reshape(-1, 1, 1, 1)


class DirectQuantConv2d(Conv3x3Layer):
    """A 3x3 stride-1 convolution with ``bits``-bit weights (per output channel) and inputs (dynamic, per sample),
    computed directly: the baseline of the Winograd layers (``WinogradConfig(algorithm="direct")``).

    Args:
        in_channels (`int`): ``C``.
        out_channels (`int`): ``K``.
        padding (`int | tuple[int, int] | str`, defaults to `1`): zero padding, ``"same"`` or ``"valid"``.
        bias (`bool`, defaults to `True`): whether the layer has a bias.
        config ([WinogradConfig][diffusers_qalora.WinogradConfig], *optional*): ``bits`` and ``weight_init`` are
            used; defaults to ``WinogradConfig(algorithm="direct")`` (8 bits).
        device (`torch.device`, *optional*): of the weight and bias.
        dtype (`torch.dtype`, *optional*): of the weight and bias.

    Attributes:
        quant_mode (`str`): ``"int"`` (quantized, the default) or ``"fp"`` (plain ``F.conv2d``).
        input_quantizer (`nn.Module | None`): as for [WinogradConv2d][diffusers_qalora.WinogradConv2d].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int | tuple[int, int] | str = 1,
        bias: bool = True,
        config: WinogradConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = WinogradConfig(algorithm="direct") if config is None else config
        if not isinstance(config, WinogradConfig):
            raise TypeError(f"`config` must be a WinogradConfig, got {type(config).__name__}.")
        if config.algorithm != "direct" or config.bits is None:
            raise ValueError(f"a DirectQuantConv2d needs `algorithm='direct'` and `bits`, got {config!r}.")
        self._init_layer(in_channels, out_channels, padding, bias, config, device, dtype)
        if self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -((in_channels * 9) ** -0.5), (in_channels * 9) ** -0.5)
        self._quant_mode = "int"

    @classmethod
    def from_conv2d(
        cls, conv: nn.Conv2d, *, config: WinogradConfig | None = None, **overrides: Any
    ) -> DirectQuantConv2d:
        """Wrap an eligible ``conv`` (sharing its weight and bias); ``overrides`` replace fields of ``config``."""
        reason = winograd_ineligibility(conv)
        if reason is not None:
            raise ValueError(f"cannot replace {conv!r} by a DirectQuantConv2d: {reason}.")
        base = config if config is not None else WinogradConfig(algorithm="direct")
        return cls._sharing_weights_of(conv, dataclasses.replace(base, **overrides))

    @property
    def quant_mode(self) -> str:
        """``"int"`` or ``"fp"``."""
        return self._quant_mode

    @quant_mode.setter
    def quant_mode(self, mode: str) -> None:
        if mode not in DIRECT_MODES:
            raise ValueError(f"`quant_mode` must be one of {DIRECT_MODES}, got {mode!r}.")
        self._quant_mode = mode

    def clear_cache(self) -> None:
        """Drop the cached quantized weight."""
        self._cache = {}

    def quantized_weight(self) -> torch.Tensor:
        """``s_w * q_w`` (float32), cached until the weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.config.bits, self.config.weight_init)
        if self._cache.get("key") != key:
            with torch.no_grad():
                bits = self.config.bits
                qmin, qmax = qrange(bits, True)
                step = _weight_step(w, bits, self.config.weight_init)
                codes = quantize(w.detach().to(torch.float64), step, None, qmin, qmax)
                self._cache = {"key": key, "value": (codes.to(torch.float64) * step).float()}
        return self._cache["value"]

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized direct convolution of ``x`` (computed in float32, returned in the dtype of ``x``)."""
        self._check_input(x)
        if self._quant_mode == "fp":
            return self.reference_forward(x)
        with torch.no_grad():
            qmin, qmax = qrange(self.config.bits, True)
            xf = x.detach().float()
            step = absmax_step(xf, (1, 2, 3), qmax)
            x_hat = quantize(xf, step, None, qmin, qmax).float() * step
            bias = None if self.bias is None else self.bias.detach().float()
            y = F.conv2d(x_hat, self.quantized_weight(), bias, padding=self._pad)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}", f"padding={self.padding}", f"bits={self.config.bits}"]
        if self.bias is None:
            parts.append("bias=False")
        parts.append(f"quant_mode={self._quant_mode!r}")
        return ", ".join(parts)
