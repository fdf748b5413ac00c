"""The Triton kernels of the exported integer layers (`diffusers_qalora.export.IntegerLinear` /
``IntegerConv2d``): activation quantization and the integer GEMM of `int_gemm`, with each sample's timestep step
size gathered in the kernels.

The layers store unsigned activation codes as they are and signed ones shifted by 128 (``uint8``); the kernels work
on ``int8`` codes, so unsigned 8-bit codes are shifted by -128 here, together with their zero point (which cancels in
``a - z``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.kernel_preference import KernelPreference
from .dispatch import resolve_kernel_preference
from .int_gemm import PackedWeight, conv2d_triton, int8_linear, quantize_activation_codes

__all__ = ["integer_kernel_provider", "triton_integer_conv2d", "triton_integer_linear"]


def _packed_weight(layer) -> PackedWeight:
    def build():
        return PackedWeight.from_packed(layer.weight_packed, layer.layout.packed_bits, layer.k, layer.weight_scale)

    return layer._cached("triton_weight", layer._weight_key(), build)


def _act_qparams(
    layer, x: torch.Tensor, scale, zero_point, need_fits: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int, int, bool]:
    """Per-sample (or single) step sizes and int8-domain zero points as tensors on ``x.device``, the int8 code range,
    and (if ``need_fits``) whether every zero point is an int8 value (needed for padding with it)."""
    qmin, qmax = layer.layout.act_code_range
    shift = 128 if qmax > 127 else 0  # unsigned 8-bit codes do not fit int8 as they are
    if isinstance(scale, torch.Tensor):
        s = scale.to(device=x.device, dtype=torch.float32)
        z = zero_point.to(device=x.device, dtype=torch.float32) - shift
        fits = True
        if need_fits:  # one synchronisation, only for the (rare) batches of mixed timesteps
            z_host = zero_point.detach().float().cpu() - shift
            fits = bool(((z_host >= -128) & (z_host <= 127)).all())
    else:
        key = (float(scale), float(zero_point), str(x.device))

        def build():
            return (
                torch.tensor([float(scale)], device=x.device),
                torch.tensor([float(zero_point) - shift], device=x.device),
            )

        s, z = layer._cached("triton_qparams", key, build)
        fits = -128 <= float(zero_point) - shift <= 127
    return s, z, qmin - shift, qmax - shift, fits


def triton_integer_linear(layer, x: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """``IntegerLinear`` forward on the Triton kernels (``scale``/``zero_point``: numbers, or ``(B,)`` tensors)."""
    s, z, qmin, qmax, _ = _act_qparams(layer, x, scale, zero_point)
    codes = quantize_activation_codes(x, s, z, qmin, qmax, kernel_preference="triton")
    return int8_linear(codes, s, z, _packed_weight(layer), layer.bias, x.dtype, kernel_preference="triton")


def triton_integer_conv2d(layer, x: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """``IntegerConv2d`` forward on the Triton kernels: activation codes, then the implicit-GEMM convolution.  A zero
    point outside the int8 range cannot pad, and runs the layer's reference path (as the oneDNN path does)."""
    s, z, qmin, qmax, fits = _act_qparams(layer, x, scale, zero_point, need_fits=True)
    if not fits:
        if isinstance(scale, torch.Tensor):
            view = (-1,) + (1,) * (x.dim() - 1)
            return layer._reference(x, scale.reshape(view).to(x.device), zero_point.reshape(view).to(x.device))
        return layer._reference(x, scale, zero_point)
    x, padding = layer._pad_input(x)
    codes = quantize_activation_codes(x, s, z, qmin, qmax, kernel_preference="triton")
    return conv2d_triton(
        codes,
        s,
        z,
        _packed_weight(layer),
        layer.kernel_size,
        layer.stride,
        padding,
        layer.dilation,
        layer.bias,
        x.dtype,
    )


triton_integer_linear.per_sample_qparams = True
triton_integer_conv2d.per_sample_qparams = True
_KERNELS = {"linear": triton_integer_linear, "conv2d": triton_integer_conv2d}


def integer_kernel_provider(preference: KernelPreference, device: torch.device, op: str) -> Callable | None:
    """The provider installed into `diffusers_qalora.export.backends`.

    ``"triton"``: the Triton kernel (a ``RuntimeError`` naming the reason where it cannot run).  ``"auto"``: the
    Triton kernel on CUDA when ``triton`` imports; ``None`` otherwise, which leaves the choice to the export backends
    (oneDNN on CPU, else the torch path).
    """
    if resolve_kernel_preference(preference, device) == "triton":
        return _KERNELS[op]
    return None
