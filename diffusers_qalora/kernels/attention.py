"""Quantized attention: ``softmax(Q(q) Q(k)^T * scale + mask) -> Q_p(.) -> @ Q(v)`` as a fused Triton kernel, with a
torch reference of the same signature.

Each of ``q``, ``k``, ``v`` (and optionally the softmax output ``p``) is fake-quantized with one step size ``s`` and
zero point ``z`` per *sample* (the temporal step size at that sample's timestep, see [QuantSpec][diffusers_qalora.kernels.QuantSpec]):

    x_hat = s * (clamp(round(x / s) + z, qmin, qmax) - z)        (round half to even, as torch.round)

**What the Triton path computes.**  A small elementwise kernel turns each quantized input into its integer codes
``c - z`` (``|c - z| <= 255`` for a zero point inside the code range, where calibration puts it; float16 holds every
integer up to 2048 exactly); the fused attention kernel then runs online-softmax ("flash") attention on those codes,
one program per (block of queries, batch x head):

* ``S = (c_q - z_q) (c_k - z_k)^T`` on fp16 tensor cores with fp32 accumulation is an *exact* integer sum (every
  partial sum is below ``2^24`` for head dims up to 256), then ``S * (s_q s_k scale) + mask``;
* without softmax quantization: running max / sum, ``acc += exp(S - m) (c_v - z_v)``, output ``acc * s_v / l``;
* with softmax quantization the normalised probabilities exist only after the last key block, so the kernel makes two
  passes over the keys: the first computes the row max and sum, the second ``p = exp(S - m) / l``, its codes
  ``c_p - z_p`` and ``acc += (c_p - z_p) (c_v - z_v)`` (again exact in fp16), output ``acc * s_p s_v``.

A tensor that is not quantized enters the products in its own dtype (fp16/bf16; fp32 with IEEE products).  The
codes equal the reference's codes (same division, same rounding), so the two paths differ only by float
accumulation order and ``exp``; where the softmax is quantized, a probability within an ulp of a rounding boundary
may land on the neighbouring code (``test_attention_kernel.py`` states the tolerances).

**The torch reference** ([quantized_attention_reference][diffusers_qalora.kernels.quantized_attention_reference]) fake-quantizes in float32 (float64 for float64 inputs)
and calls ``F.scaled_dot_product_attention``; with softmax quantization it computes the softmax explicitly, in
chunks of query rows.  Neither path is differentiable: training goes through the quantizer modules (LSQ gradients)
and SDPA, see `diffusers_qalora.tuners.qalora.attention`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "QuantSpec",
    "attention_codes_reference",
    "attention_codes_triton",
    "quantized_attention",
    "quantized_attention_reference",
    "quantized_attention_triton",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REFERENCE_CHUNK = 1024  # query rows per explicit-softmax chunk of the reference (bounds its memory)


class QuantSpec(NamedTuple):
    """How one attention operand is quantized: per-sample step sizes and zero points and the code range.

    Attributes:
        step (`torch.Tensor`): positive step sizes, shape ``(B,)`` (one per sample) or a single value.
        zero_point (`torch.Tensor`, *optional*): zero points of the same shape (rounded to integers); ``None`` for
            symmetric codes.
        qmin (`int`): smallest code, e.g. ``0`` (unsigned) or ``-128`` (signed 8-bit).
        qmax (`int`): largest code.
    """

    step: torch.Tensor
    zero_point: torch.Tensor | None
    qmin: int
    qmax: int


# -- validation ------------------------------------------------------------------------------------------------------
def _check_spec(spec: QuantSpec | None, name: str, batch: int) -> QuantSpec | None:
    if spec is None:
        return None
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"`{name}` must be a QuantSpec or None, got {type(spec).__name__}.")
    for field_name, tensor in (("step", spec.step), ("zero_point", spec.zero_point)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`{name}.{field_name}` must be a tensor, got {type(tensor).__name__}.")
        if tensor.numel() not in (1, batch):
            raise ValueError(
                f"`{name}.{field_name}` must hold one value per sample ({batch}) or a single value, got shape "
                f"{tuple(tensor.shape)}."
            )
    if not isinstance(spec.qmin, int) or not isinstance(spec.qmax, int) or not spec.qmin < spec.qmax:
        raise ValueError(f"`{name}` needs integer codes qmin < qmax, got qmin={spec.qmin!r}, qmax={spec.qmax!r}.")
    if spec.qmax - spec.qmin > 255:
        raise ValueError(f"`{name}`: codes wider than 8 bits are not supported, got [{spec.qmin}, {spec.qmax}].")
    if spec.step.device.type == "cpu" and spec.step.numel() and not bool((spec.step > 0).all()):
        # checked where it is free; on a GPU the check would synchronise every call
        raise ValueError(f"`{name}.step` must be positive.")
    return spec


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}.")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"`{name}` must be a float tensor, got {t.dtype}.")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"`query`, `key` and `value` must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}."
        )
    if query.shape[:2] != key.shape[:2] or key.shape[:2] != value.shape[:2]:
        raise ValueError(
            f"`query`, `key` and `value` must share batch and heads, got {tuple(query.shape)}, {tuple(key.shape)}, "
            f"{tuple(value.shape)}."
        )
    if key.shape[2] != value.shape[2]:
        raise ValueError(
            f"`key` and `value` must have the same number of tokens, got {key.shape[2]} and {value.shape[2]}."
        )
    if query.shape[3] != key.shape[3]:
        raise ValueError(f"`query` and `key` must have the same head_dim, got {query.shape[3]} and {key.shape[3]}.")
    if attn_mask is not None:
        target = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError:
            raise ValueError(
                f"`attn_mask` of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, queries, keys) = "
                f"{target}."
            ) from None


def _additive_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = attend, as in SDPA) becomes ``0 / -inf``; a float mask is added as it is."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask, -math.inf)
    return attn_mask.to(dtype)


def _per_sample(t: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype).reshape(-1).expand(batch).contiguous()


def _default_scale(head_dim: int) -> float:
    """SDPA's default ``1 / sqrt(D)`` (1 for an empty head dim, where every score is 0 anyway)."""
    return 1.0 / math.sqrt(head_dim) if head_dim else 1.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- torch reference -------------------------------------------------------------------------------------------------
def attention_codes_reference(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes minus zero point, ``clamp(round(x / s) + z, qmin, qmax) - z``, of ``x: (B, ...)`` in float32
    (float64 for a float64 ``x``); per-sample ``s`` and ``z`` from ``spec``."""
    dtype = _compute_dtype(x.dtype)
    batch = x.shape[0]
    view = (batch,) + (1,) * (x.dim() - 1)
    step = _per_sample(spec.step, batch, x.device, dtype).reshape(view)
    codes = torch.round(x.detach().to(dtype) / step)
    if spec.zero_point is None:
        return codes.clamp_(spec.qmin, spec.qmax)
    zero_point = torch.round(_per_sample(spec.zero_point, batch, x.device, dtype)).reshape(view)
    return codes.add_(zero_point).clamp_(spec.qmin, spec.qmax).sub_(zero_point)


def _fake_quantize(x: torch.Tensor, spec: QuantSpec | None, dtype: torch.dtype) -> torch.Tensor:
    if spec is None:
        return x.detach().to(dtype)
    batch = x.shape[0]
    step = _per_sample(spec.step, batch, x.device, dtype).reshape((batch,) + (1,) * (x.dim() - 1))
    return attention_codes_reference(x.to(dtype), spec).mul_(step)


@torch.no_grad()
def quantized_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    query_quant: QuantSpec | None = None,
    key_quant: QuantSpec | None = None,
    value_quant: QuantSpec | None = None,
    probs_quant: QuantSpec | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Torch reference of [quantized_attention][diffusers_qalora.kernels.quantized_attention] (same arguments, no ``kernel_preference``)."""
    _check_inputs(query, key, value, attn_mask)
    batch = query.shape[0]
    specs = [
        _check_spec(s, n, batch)
        for s, n in (
            (query_quant, "query_quant"),
            (key_quant, "key_quant"),
            (value_quant, "value_quant"),
            (probs_quant, "probs_quant"),
        )
    ]
    scale = _default_scale(query.shape[-1]) if scale is None else float(scale)
    dtype = _compute_dtype(query.dtype)
    q, k, v = (_fake_quantize(t, s, dtype) for t, s in zip((query, key, value), specs[:3]))
    mask = _additive_mask(attn_mask, dtype)
    if math.prod(query.shape[:3]) == 0 or value.numel() == 0:  # no output, or no key (an empty sum)
        return query.new_zeros(*query.shape[:3], value.shape[-1])
    if specs[3] is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.to(query.dtype)
    out = query.new_empty(*query.shape[:3], value.shape[-1], dtype=dtype)
    full = None if mask is None else mask.expand(*query.shape[:3], key.shape[2])
    for start in range(0, query.shape[2], _REFERENCE_CHUNK):
        rows = slice(start, start + _REFERENCE_CHUNK)
        scores = torch.matmul(q[:, :, rows], k.transpose(-1, -2)) * scale
        if full is not None:
            scores = scores + full[:, :, rows]
        probs = _fake_quantize(scores.softmax(dim=-1), specs[3], dtype)
        out[:, :, rows] = torch.matmul(probs, v)
    return out.to(query.dtype)


# -- Triton --------------------------------------------------------------------------------------------------------
def _kernels():
    """The ``@triton.jit`` kernels (`diffusers_qalora.kernels._attention_triton`), built on first use."""
    from ._build import load_kernel_module

    return load_kernel_module("_attention_triton")


def _interpreting() -> bool:
    from ._build import built_interpreted

    return bool(built_interpreted())


def _block(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def attention_codes_triton(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Triton version of `attention_codes_reference` for ``x: (B, H, N, D)`` (any strides); returns contiguous
    float16 codes (exact: ``|c - z| <= 255``)."""
    kernels = _kernels()
    batch, heads, tokens, dim = x.shape
    out = torch.empty((batch, heads, tokens, dim), dtype=torch.float16, device=x.device)
    total = heads * tokens * dim
    if out.numel() == 0:
        return out
    step = _per_sample(spec.step, batch, x.device, torch.float32)
    zp = (
        torch.round(_per_sample(spec.zero_point, batch, x.device, torch.float32))
        if spec.zero_point is not None
        else step
    )  # an unused pointer when HAS_ZP is False
    block = 1024
    grid = (kernels.cdiv(total, block), batch)
    kernels.codes_kernel[grid](
        x,
        out,
        step,
        zp,
        heads,
        tokens,
        dim,
        *x.stride(),
        float(spec.qmin),
        float(spec.qmax),
        HAS_ZP=spec.zero_point is not None,
        BLOCK=block,
    )
    return out


def _dot_dtype(input_dtype: torch.dtype, both_codes: bool) -> torch.dtype:
    """fp16 for two integer-code operands (exact); otherwise the input dtype.  bf16 products are wrong in Triton's
    interpreter, so they run in fp32 there."""
    if both_codes:
        return torch.float16
    if input_dtype == torch.bfloat16 and _interpreting():
        return torch.float32
    return input_dtype


@torch.no_grad()
def quantized_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    query_quant: QuantSpec | None = None,
    key_quant: QuantSpec | None = None,
    value_quant: QuantSpec | None = None,
    probs_quant: QuantSpec | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton version of [quantized_attention][diffusers_qalora.kernels.quantized_attention] (same arguments, no ``kernel_preference``).  fp16, bf16 and fp32 inputs;
    empty inputs return an empty (or, with no key, zero) output without a launch."""
    _check_inputs(query, key, value, attn_mask)
    if query.dtype not in _TRITON_DTYPES:
        raise ValueError(
            f"the Triton attention kernel takes fp16, bf16 or fp32 inputs, got {query.dtype}; use the "
            f"torch reference (kernel_preference='torch')."
        )
    batch, heads, n_q, dim = query.shape
    n_k, dim_v = key.shape[2], value.shape[3]
    specs = [
        _check_spec(s, n, batch)
        for s, n in (
            (query_quant, "query_quant"),
            (key_quant, "key_quant"),
            (value_quant, "value_quant"),
            (probs_quant, "probs_quant"),
        )
    ]
    out = torch.zeros((batch, heads, n_q, dim_v), dtype=query.dtype, device=query.device)
    if out.numel() == 0 or n_k == 0:
        return out
    if dim == 0:
        raise ValueError("`query` and `key` have head_dim 0; use the torch reference (kernel_preference='torch').")
    kernels = _kernels()
    scale = _default_scale(dim) if scale is None else float(scale)
    device = query.device
    ones = torch.ones(batch, dtype=torch.float32, device=device)
    operands, factors = [], []
    for tensor, spec in zip((query, key, value), specs[:3]):
        if spec is None:
            operands.append(tensor)
            factors.append(ones)
        else:
            operands.append(attention_codes_triton(tensor, spec))
            factors.append(_per_sample(spec.step, batch, device, torch.float32))
    q, k, v = operands
    qk_scale = factors[0] * factors[1] * scale
    v_scale = factors[2]
    p_spec = specs[3]
    if p_spec is not None:
        p_step = _per_sample(p_spec.step, batch, device, torch.float32)
        p_zp = (
            torch.round(_per_sample(p_spec.zero_point, batch, device, torch.float32))
            if p_spec.zero_point is not None
            else torch.zeros_like(p_step)
        )
        p_range = (float(p_spec.qmin), float(p_spec.qmax))
    else:
        p_step, p_zp, p_range = ones, ones, (0.0, 1.0)
    if attn_mask is not None:
        mask = _additive_mask(attn_mask, torch.float32 if attn_mask.dtype == torch.bool else attn_mask.dtype)
        mask = mask.to(device).expand(batch, heads, n_q, n_k)  # broadcast dims get stride 0
        mask_strides = mask.stride()
    else:
        mask, mask_strides = out, (0, 0, 0, 0)  # an unused pointer when HAS_MASK is False
    tl_dtypes = kernels.TL_DTYPES
    qk_dtype = _dot_dtype(query.dtype, specs[0] is not None and specs[1] is not None)
    pv_dtype = _dot_dtype(query.dtype, p_spec is not None and specs[2] is not None)
    block_d, block_dv = _block(dim), _block(dim_v)
    if _interpreting() or device.type != "cuda":
        # The interpreter's cost grows with programs x loop trips, not with tile size: one block for short sequences.
        block_m, block_n, launch = min(64, _block(n_q)), min(64, _block(n_k)), {}
    else:
        block_m = 128 if n_q >= 128 else 64
        block_n = 64 if block_d <= 64 else 32
        launch = {"num_warps": 4 if block_d <= 64 else 8, "num_stages": 2}
    grid = (kernels.cdiv(n_q, block_m), batch * heads)
    kernels.attention_kernel[grid](
        q,
        k,
        v,
        out,
        mask,
        qk_scale,
        v_scale,
        p_step,
        p_zp,
        *p_range,
        heads,
        n_q,
        n_k,
        dim,
        dim_v,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *mask_strides,
        HAS_MASK=attn_mask is not None,
        QUANT_P=p_spec is not None,
        INTERPRET=kernels.INTERPRET,
        QK_DTYPE=tl_dtypes[qk_dtype],
        PV_DTYPE=tl_dtypes[pv_dtype],
        QK_IEEE=qk_dtype == torch.float32,
        PV_IEEE=pv_dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        **launch,
    )
    return out


# -- dispatch ------------------------------------------------------------------------------------------------------
def quantized_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    query_quant: QuantSpec | None = None,
    key_quant: QuantSpec | None = None,
    value_quant: QuantSpec | None = None,
    probs_quant: QuantSpec | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    kernel_preference: str = "auto",
) -> torch.Tensor:
    """Attention with fake-quantized ``q``, ``k``, ``v`` and (optionally) softmax output, per-sample step sizes.

    ``out = Q_p(softmax(Q(q) Q(k)^T * scale + attn_mask)) @ Q(v)``; an operand whose spec is ``None`` is used as is.
    Inference only (no gradient).

    Args:
        query (`torch.Tensor`): ``(B, H, N_q, D)``, any strides (e.g. diffusers' ``view(...).transpose(1, 2)``).
        key (`torch.Tensor`): ``(B, H, N_k, D)``.
        value (`torch.Tensor`): ``(B, H, N_k, D_v)``.
        query_quant ([QuantSpec][diffusers_qalora.kernels.QuantSpec], *optional*): per-sample step sizes, zero points and code range of ``query``.
        key_quant ([QuantSpec][diffusers_qalora.kernels.QuantSpec], *optional*): the same for ``key``.
        value_quant ([QuantSpec][diffusers_qalora.kernels.QuantSpec], *optional*): the same for ``value``.
        probs_quant ([QuantSpec][diffusers_qalora.kernels.QuantSpec], *optional*): the same for the softmax output (usually unsigned codes).
        attn_mask (`torch.Tensor`, *optional*): additive float mask, or boolean (``True`` = attend, as in
            ``F.scaled_dot_product_attention``), broadcastable to ``(B, H, N_q, N_k)``.
        scale (`float`, *optional*): score scale, ``1 / sqrt(D)`` by default.
        kernel_preference (`str`, defaults to `"auto"`): ``"auto"`` (Triton for CUDA tensors when it imports, the
            torch reference otherwise), ``"triton"`` or ``"torch"``.  float64 inputs (and an empty head dim) always run the torch reference.

    Returns:
        `torch.Tensor`: ``(B, H, N_q, D_v)`` in the dtype of ``query``.
    """
    from .dispatch import resolve_kernel_preference

    chosen = resolve_kernel_preference(kernel_preference, query.device)
    if chosen == "triton" and query.dtype in _TRITON_DTYPES and query.shape[-1] > 0:
        fn = quantized_attention_triton
    else:
        fn = quantized_attention_reference
    return fn(
        query,
        key,
        value,
        query_quant=query_quant,
        key_quant=key_quant,
        value_quant=value_quant,
        probs_quant=probs_quant,
        attn_mask=attn_mask,
        scale=scale,
    )
