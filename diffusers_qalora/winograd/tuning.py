"""Data-free tuning of the Winograd transform scales of one layer against its full-precision direct convolution."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .conv import WinogradConv2d, WinogradWarning

InputSource = torch.Tensor | Callable[[], torch.Tensor] | None


@dataclass
class ScaleTuningResult:
    """What [tune_scales_][diffusers_qalora.tune_scales_] did.

    Args:
        history (`list[float]`): the training loss at each step.
        sqnr_before (`float`): SQNR (dB) of the quantized layer against the FP direct conv before tuning,
            measured in the layer's quantized inference mode on a fixed evaluation batch.
        sqnr_after (`float`): the same after tuning (after any revert).
        reverted (`bool`): whether the scales were restored because tuning made the SQNR worse.
    """

    history: list[float] = field(default_factory=list)
    sqnr_before: float = float("nan")
    sqnr_after: float = float("nan")
    reverted: bool = False


def sqnr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """``10 log10(||reference||^2 / ||reference - estimate||^2)`` in dB (``inf`` for an exact estimate)."""
    ref = reference.detach().to(torch.float64)
    err = (ref - estimate.detach().to(torch.float64)).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(sig / err) if sig > 0 else -math.inf


def scales_are_visible(layer: WinogradConv2d) -> bool:
    """Whether the transform scales can change the quantized result of ``layer``.

    Every quantizer of ``U`` is inside one Winograd position; with ``act_granularity="position"`` so is every
    quantizer of ``V``, and without ``output_bits`` the output transform is exact.  Absmax quantization commutes
    with a positive per-position factor, so the scales are then invisible (up to float rounding) and tuning them
    cannot change anything.
    """
    cfg = layer.config
    return cfg.bits is not None and (cfg.act_granularity != "position" or cfg.output_bits is not None)


def _input_source(
    layer: WinogradConv2d, inputs: InputSource, input_shape: tuple[int, ...] | None, seed: int
) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    device, dtype = layer.weight.device, layer.weight.dtype
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    if inputs is None:
        shape = input_shape or layer.last_input_shape or (4, layer.in_channels, 16, 16)
        if len(shape) != 4 or shape[1] != layer.in_channels:
            raise ValueError(f"`input_shape` must be (N, {layer.in_channels}, H, W), got {tuple(shape)}.")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        eval_batch = torch.randn(shape, generator=gen, dtype=dtype).to(device)

        def draw() -> torch.Tensor:
            return torch.randn(shape, generator=gen, dtype=dtype).to(device)

        return draw, eval_batch
    if isinstance(inputs, torch.Tensor):
        batch = inputs.to(device)
        return (lambda: batch), batch
    if callable(inputs):
        return inputs, inputs().to(device)
    raise TypeError(f"`inputs` must be None, a tensor or a callable returning a tensor, got {type(inputs).__name__}.")


def _quantized_sqnr(layer: WinogradConv2d, x: torch.Tensor, mode: str) -> float:
    saved = layer.quant_mode
    try:
        layer.quant_mode = mode
        with torch.no_grad():
            return sqnr_db(layer.reference_forward(x), layer.forward_core(x))
    finally:
        layer.quant_mode = saved


def tune_scales_(
    layer: WinogradConv2d,
    steps: int = 200,
    lr: float = 0.05,
    inputs: InputSource = None,
    loss: Literal["mse", "sqnr"] = "sqnr",
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    keep_best: bool = True,
    eval_inputs: torch.Tensor | None = None,
) -> ScaleTuningResult:
    """Tune the learnable transform scales of ``layer`` in place, data-free, against its FP direct convolution.

    Each step draws a batch ``x``, computes the reference ``y = F.conv2d(x, w, b)`` and the fake-quantized Winograd
    output ``y_hat`` and takes an Adam step on ``(theta_B, theta_G)`` (the log scales) for

    * ``loss="mse"``: ``mean((y - y_hat)^2)``;
    * ``loss="sqnr"``: ``-SQNR = 10 log10(||y - y_hat||^2 / ||y||^2)`` (Pan et al.'s objective).

    Gradients flow through the rounding by the straight-through estimator and through the (absmax) step sizes by
    LSQ's step gradient.  The weights never change.

    Args:
        layer ([WinogradConv2d][diffusers_qalora.WinogradConv2d]): a quantized layer (``config.bits`` set).
        steps (`int`, defaults to `200`): optimisation steps.
        lr (`float`, defaults to `0.05`): Adam learning rate on the log scales.
        inputs (`torch.Tensor | Callable[[], torch.Tensor]`, *optional*): a fixed batch, or a zero-argument callable
            returning a new batch per step.  Default: i.i.d. N(0, 1) batches shaped like ``input_shape``.
        loss (`str`, defaults to `"sqnr"`): ``"mse"`` or ``"sqnr"``.
        input_shape (`tuple[int, ...]`, *optional*): ``(N, C_in, H, W)`` of the random batches; defaults to the
            last input the layer saw, else ``(4, C_in, 16, 16)``.
        seed (`int`, defaults to `0`): seed of the random batches.
        keep_best (`bool`, defaults to `True`): restore the initial scales if tuning lowered the SQNR.
        eval_inputs (`torch.Tensor`, *optional*): the batch on which the SQNR before and after (and ``keep_best``) are
            measured; defaults to the first batch of ``inputs`` (or a seeded Gaussian batch).

    Returns:
        [ScaleTuningResult][diffusers_qalora.winograd.ScaleTuningResult]: loss history and the SQNR (dB) before and after, measured in the layer's quantized
        inference mode (``"int"`` unless the layer is in ``"fake"`` mode) on one fixed evaluation batch (the first
        batch of ``inputs``, or a seeded Gaussian batch).

    Raises:
        ValueError: if the layer is not quantized or an argument is invalid.
    """
    if not isinstance(layer, WinogradConv2d):
        raise TypeError(f"`layer` must be a WinogradConv2d, got {type(layer).__name__}.")
    if layer.config.bits is None:
        raise ValueError("`tune_scales_` needs a quantized layer: its config has `bits=None`.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be positive, got {lr!r}.")
    if loss not in ("mse", "sqnr"):
        raise ValueError(f"`loss` must be 'mse' or 'sqnr', got {loss!r}.")

    draw, eval_batch = _input_source(layer, inputs, input_shape, seed)
    if eval_inputs is not None:
        if not isinstance(eval_inputs, torch.Tensor):
            raise TypeError(f"`eval_inputs` must be a tensor, got {type(eval_inputs).__name__}.")
        eval_batch = eval_inputs.to(layer.weight.device)
    eval_mode = "fake" if layer.quant_mode == "fake" else "int"
    result = ScaleTuningResult()
    result.sqnr_before = _quantized_sqnr(layer, eval_batch, eval_mode)
    if not scales_are_visible(layer):
        warnings.warn(
            "the transform scales cannot change this layer's quantized output: all its quantizers lie inside one "
            "Winograd position (act_granularity='position', output_bits=None), so tuning is skipped. Use "
            "act_granularity='tile' or set output_bits to make the scales matter.",
            WinogradWarning,
            stacklevel=2,
        )
        result.sqnr_after = result.sqnr_before
        return result

    params = [layer.scales.log_b, layer.scales.log_g]
    initial = [p.detach().clone() for p in params]
    saved_mode = layer.quant_mode
    saved_flags = {p: p.requires_grad for p in layer.parameters()}
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        layer.quant_mode = "fake"
        for _ in range(steps):
            x = draw()
            with torch.no_grad():
                y = layer.reference_forward(x)
            y_hat = layer.forward_core(x)
            err = F.mse_loss(y_hat, y)
            if loss == "mse":
                value = err
            else:
                value = 10.0 * torch.log10(err / y.pow(2).mean().clamp_min(1e-30) + 1e-30)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            result.history.append(float(value.detach()))
    finally:
        layer.quant_mode = saved_mode
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
        layer.clear_cache()

    result.sqnr_after = _quantized_sqnr(layer, eval_batch, eval_mode)
    if keep_best and result.sqnr_after < result.sqnr_before:
        with torch.no_grad():
            for p, init in zip(params, initial):
                p.copy_(init)
        layer.clear_cache()
        result.reverted = True
        result.sqnr_after = _quantized_sqnr(layer, eval_batch, eval_mode)
    return result
