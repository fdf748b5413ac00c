"""Pure tensor functions of integer inference: activation step sizes by timestep, activation codes, weight codes.

Conventions (the same as `diffusers_qalora.quant`):

* weights: signed codes ``q_w`` with a step size per output channel (or group), ``W_hat = s_w * q_w``;
* activations: codes ``q_x = clamp(round(x / s_x) + z_x, qmin, qmax)`` with one step size ``s_x`` and integer zero
  point ``z_x`` per call (looked up by timestep), ``x_hat = s_x * (q_x - z_x)``.

Then ``x_hat @ W_hat^T = s_x * s_w * sum_k (q_x - z_x) * q_w``: an integer product with ``int32`` accumulation and one
floating-point epilogue.  In the kernels, activation codes are ``uint8``: unsigned codes as they are, signed codes
shifted by 128 (their zero point becomes 128).
"""

from __future__ import annotations

import threading
import warnings

import torch

from ..quant import interpolation_indices, unpack_codes


def lookup_act_qparams(
    timesteps: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    t: torch.Tensor,
    indices: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step sizes and (rounded) zero points at timesteps ``t`` (1-D): linear interpolation between table entries,
    clamped at the ends, computed with the same operations as the fake-quant model's lookup (so the values are
    bit-identical).  ``indices``: ``interpolation_indices(timesteps, t)`` when the caller has them already."""
    lo, hi, w = interpolation_indices(timesteps, t.to(timesteps.device)) if indices is None else indices
    w = w.to(scale.dtype)
    s = scale[lo] * (1.0 - w) + scale[hi] * w
    z = zero_point[lo] * (1.0 - w) + zero_point[hi] * w
    return s, torch.round(z)


def quantize_activation_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Codes ``clamp(round(x / s) + z, qmin, qmax)`` as float32 (exactly the fake-quant model's rounding)."""
    return torch.clamp(torch.round(x.float() / scale) + zero_point, qmin, qmax)


def dequantize_activation_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``x_hat = s * (clamp(round(x / s), qmin - z, qmax - z))`` in float32: the fake-quant model's value."""
    z = zero_point
    return torch.clamp(torch.round(x.float() / scale), qmin - z, qmax - z) * scale


def _fast_quantize_available() -> bool:
    return hasattr(torch, "quantize_per_tensor") and hasattr(torch.Tensor, "int_repr")


_FAST_QUANTIZE = _fast_quantize_available()


def quantize_activation_uint8(
    x: torch.Tensor, scale: float, zero_point: int, lo: int, hi: int, exact: bool = False
) -> torch.Tensor:
    """``uint8`` codes ``clamp(round(x / scale) + zero_point, lo, hi)`` with ``0 <= lo <= hi <= 255``.

    ``exact=False`` uses torch's fused quantizer (one pass; it rounds ``x * (1 / scale)``, so about one element in
    10^5 can land one code away from the ``x / scale`` of the fake-quant model, at exact ties); ``exact=True`` uses
    the fake-quant model's own formula (several passes).  The memory format of ``x`` is kept.
    """
    if not exact and _FAST_QUANTIZE and x.device.type == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized-tensor creation is deprecated; the op itself stays fast
            q = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8)
        # A plain uint8 tensor on the quint8 storage: no copy (``int_repr`` would copy the codes once more).
        codes = torch.empty(0, dtype=torch.uint8, device=x.device).set_(
            q.untyped_storage(), q.storage_offset(), q.shape, q.stride()
        )
        if lo > 0 or hi < 255:
            codes = codes.clamp_(lo, hi)
        return codes
    v = torch.div(x.float(), scale)
    v = v.round_().add_(zero_point).clamp_(lo, hi)
    return v.to(torch.uint8)


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...], device: torch.device, channels_last: bool) -> torch.Tensor:
    """A float32 buffer reused across calls (per thread): the shifted input of the per-sample quantizer lives only
    until its codes are written, and a fresh multi-megabyte tensor per layer costs more in page faults than the pass
    that fills it."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (tuple(shape), str(device), channels_last)
    buf = buffers.get(key)
    if buf is None:
        if len(buffers) >= 32:
            buffers.clear()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        buf = buffers[key] = torch.empty(shape, dtype=torch.float32, device=device, memory_format=fmt)
    return buf


def quantize_activation_uint8_per_sample(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    lo: int,
    hi: int,
    exact: bool = False,
    padding: tuple[int, int] = (0, 0),
    inv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``uint8`` codes ``clamp(round(x / s_b) + z_b, lo, hi)`` with one step size ``s_b`` and integer zero point
    ``z_b`` per sample (``scale``, ``zero_point``: ``(B,)`` float tensors; ``x``: ``(B, ...)``).

    ``padding=(ph, pw)`` (``x`` of shape ``(B, C, H, W)``) returns the codes of ``x`` zero-padded by ``ph`` rows and
    ``pw`` columns on each side, channels-last: a padded zero quantizes to ``z_b``, the zero point of its own sample.

    ``exact=False`` runs two passes: ``v = x * (1 / s_b) + z_b`` and torch's fused quantizer with step 1 (rounding
    and the ``uint8`` saturation in one pass).  Like the per-tensor fast path it rounds ``x * (1 / s)``, and adding
    ``z_b`` in float32 can move a value within about ``2**-15`` of a rounding tie by one code: both are at most one
    code away from the fake-quant model's ``round(x / s)``, on rare exact ties.  (torch's own per-channel quantizer
    takes the same arguments but is about 25x slower on CPU.)  ``exact=True`` uses the fake-quant formula.  Without
    padding, the memory format of ``x`` is kept.  ``inv_scale``: ``1 / scale`` when the caller has it already.
    """
    view = (-1,) + (1,) * (x.dim() - 1)
    s = scale.to(device=x.device, dtype=torch.float32).reshape(view)
    z = zero_point.to(device=x.device, dtype=torch.float32).reshape(view)
    inv = torch.reciprocal(s) if inv_scale is None else inv_scale.to(device=x.device, dtype=torch.float32).reshape(view)
    fast = not exact and _FAST_QUANTIZE and x.device.type == "cpu"
    ph, pw = padding
    if ph or pw:
        b, c, h, w = x.shape
        buf = _scratch((b, c, h + 2 * ph, w + 2 * pw), x.device, channels_last=True)
        inner = buf[:, :, ph : ph + h, pw : pw + w]
        if not fast:
            buf.zero_()
            inner.copy_(x)
            return quantize_activation_uint8_per_sample(buf, scale, zero_point, lo, hi, exact=True)
        torch.addcmul(z, x.float(), inv, out=inner)  # written in place into the padded buffer
        for strip in (
            buf[:, :, :ph],
            buf[:, :, ph + h :],
            buf[:, :, ph : ph + h, :pw],
            buf[:, :, ph : ph + h, pw + w :],
        ):
            if strip.numel():
                strip.copy_(z.expand_as(strip))
        return quantize_activation_uint8(buf, 1.0, 0, lo, hi)
    if fast:
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        shifted = torch.addcmul(z, x.float(), inv, out=_scratch(x.shape, x.device, channels_last))
        return quantize_activation_uint8(shifted, 1.0, 0, lo, hi)
    v = torch.div(x.float(), s)
    v = v.round_().add_(z).clamp_(lo, hi)
    return v.to(torch.uint8)


def unpack_weight_codes(packed: torch.Tensor, packed_bits: int, k: int) -> torch.Tensor:
    """``int8`` weight codes ``(C_out, k)`` from the stored ``uint8`` bytes (padding dropped)."""
    codes = unpack_codes(packed, packed_bits, signed=True, dim=-1)
    return codes[:, :k].contiguous()


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W_hat = s_w * q_w`` in float32 for codes ``(C_out, K)`` and scales ``(C_out, G)`` (groups split ``K``)."""
    c_out, k = codes.shape
    groups = scale.shape[1]
    return (codes.float().reshape(c_out, groups, k // groups) * scale.float().unsqueeze(-1)).reshape(c_out, k)
