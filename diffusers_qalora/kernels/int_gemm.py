"""Integer GEMM and implicit-GEMM convolution with a fused dequantize epilogue, and their torch references.

Codes and scales (the conventions of `diffusers_qalora.export`, moved into the ``int8`` domain):

* activations: ``int8`` codes ``a`` with a step size ``s_b`` and an integer zero point ``z_b`` per sample ``b``
  (looked up from the timestep table), ``x_hat = s_b * (a - z_b)``;
* weights: signed codes ``w`` (2, 4 or 8 bits per stored code, packed along ``K`` as `quant.pack_codes` does),
  one step size ``s_w[n, g]`` per output channel ``n`` and group ``g`` of input channels (``G = 1``: per channel).

The product of row ``m`` (of sample ``b``) and output channel ``n`` is

    y[m, n] = s_b * sum_g s_w[n, g] * (sum_{k in g} a[m, k] w[n, k]  -  z_b * sum_{k in g} w[n, k])  +  bias[n]

with ``int8 x int8 -> int32`` products, the zero-point correction ``z_b * rowsum`` in ``int32`` (exact), and a float32
epilogue written in the output dtype (float32, float16 or bfloat16).  The references compute the same sums in float64
(exact for the integer part) and the epilogue in float64, then cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant.packing import pack_codes, unpack_codes
from ._build import load_kernel_module
from .dispatch import resolve_kernel_preference

__all__ = [
    "PackedWeight",
    "int8_conv2d",
    "int8_conv2d_reference",
    "int8_linear",
    "int8_linear_reference",
    "quantize_activation_codes",
    "quantize_activation_codes_reference",
]

STORED_BITS = (2, 4, 8)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """Packed signed weight codes with their step sizes, as the integer GEMM reads them.

    Args:
        packed (`torch.Tensor`): ``uint8`` ``(N, ceil(K * bits / 8))``: ``8 // bits`` codes per byte along ``K``, low
            bits first, two's complement (the layout of `diffusers_qalora.quant.pack_codes` and of the exported
            ``weight_packed``).
        bits (`int`): bits per stored code: 2, 4 or 8 (3-, 5-, 6- and 7-bit codes are stored as 8).
        k (`int`): codes per row (the packed rows may carry padding).
        scale (`torch.Tensor`): float32 ``(N, G)`` step sizes; ``G`` divides ``K``.
        rowsum (`torch.Tensor`): int32 ``(N, G)`` sums of the codes of each group (for the zero-point correction).
    """

    packed: torch.Tensor
    bits: int
    k: int
    scale: torch.Tensor
    rowsum: torch.Tensor

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    @property
    def group_k(self) -> int:
        return self.k // self.groups

    @classmethod
    def from_codes(cls, codes: torch.Tensor, bits: int, scale: torch.Tensor) -> PackedWeight:
        """Pack integer ``codes`` ``(N, K)`` (any integer dtype, values in the signed ``bits``-bit range)."""
        if codes.dim() != 2 or codes.is_floating_point():
            raise ValueError(f"`codes` must be a 2-D integer tensor (N, K), got {codes.dtype} {tuple(codes.shape)}.")
        _check_bits(bits)
        k = codes.shape[1]
        per_byte = 8 // bits
        pad = -k % per_byte
        padded = F.pad(codes.to(torch.int16), (0, pad)) if pad else codes
        return cls.from_packed(pack_codes(padded, bits, signed=True, dim=-1), bits, k, scale)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, bits: int, k: int, scale: torch.Tensor) -> PackedWeight:
        """Wrap already packed codes (e.g. an exported layer's ``weight_packed``); computes the group sums."""
        _check_bits(bits)
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ValueError(f"`packed` must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}.")
        if packed.shape[1] != -(-k // (8 // bits)):
            raise ValueError(
                f"`packed` has {packed.shape[1]} bytes per row; {k} codes of {bits} bits need {-(-k // (8 // bits))}."
            )
        if scale.dim() != 2 or scale.shape[0] != packed.shape[0] or scale.shape[1] < 1 or k % scale.shape[1]:
            raise ValueError(
                f"`scale` must be (N, G) with N = {packed.shape[0]} and G dividing K = {k}, got {tuple(scale.shape)}."
            )
        codes = unpack_codes(packed, bits, signed=True, dim=-1)[:, :k]
        rowsum = codes.to(torch.int32).reshape(packed.shape[0], scale.shape[1], -1).sum(-1, dtype=torch.int32)
        return cls(packed.contiguous(), bits, int(k), scale.detach().float().contiguous(), rowsum.contiguous())

    def codes(self) -> torch.Tensor:
        """The codes as ``int8`` ``(N, K)``."""
        return unpack_codes(self.packed, self.bits, signed=True, dim=-1)[:, : self.k]


def _check_bits(bits: int) -> None:
    if bits not in STORED_BITS:
        raise ValueError(f"`bits` (bits per stored weight code) must be one of {STORED_BITS}, got {bits!r}.")


def _kernels():
    return load_kernel_module("_int_gemm_triton")


def _check_qparams(scale: torch.Tensor, zero_point: torch.Tensor, batch: int, what: str) -> int:
    """Number of samples the per-sample parameters describe (1 = one for all); raises on a mismatch."""
    if scale.dim() != 1 or zero_point.shape != scale.shape:
        raise ValueError(
            f"`row_scale` and `row_zero_point` must be 1-D of one shape, got {tuple(scale.shape)} and "
            f"{tuple(zero_point.shape)}."
        )
    if scale.numel() not in (1, batch):
        raise ValueError(
            f"{what}: `row_scale` must hold one step size per sample ({batch}) or a single one, got {scale.numel()}."
        )
    return scale.numel()


def _check_code_range(qmin: int, qmax: int) -> None:
    if not -128 <= qmin <= qmax <= 127:
        raise ValueError(
            f"int8 codes need -128 <= qmin <= qmax <= 127, got [{qmin}, {qmax}]; shift unsigned codes "
            f"(and their zero point) by -128."
        )


# -- activation quantization -----------------------------------------------------------------------------------------
def quantize_activation_codes_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``int8`` codes ``clamp(round(x / s_b) + round(z_b), qmin, qmax)`` (float32 maths, rounding half to even) with
    one ``s_b``/``z_b`` per sample of dim 0 (or one for all)."""
    _check_code_range(qmin, qmax)
    samples = _check_qparams(scale, zero_point, x.shape[0] if x.dim() else 1, "quantize_activation_codes")
    view = (samples,) + (1,) * (x.dim() - 1)
    s = scale.float().reshape(view)
    z = torch.round(zero_point.float()).reshape(view)
    return torch.clamp(torch.round(x.float() / s) + z, qmin, qmax).to(torch.int8)


def quantize_activation_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    kernel_preference: str = "auto",
) -> torch.Tensor:
    """[quantize_activation_codes_reference][diffusers_qalora.kernels.quantize_activation_codes_reference] in one Triton pass (the codes keep the memory format of ``x``).

    Args:
        x (`torch.Tensor`): float activations ``(B, ...)``.
        scale (`torch.Tensor`): ``(B,)`` or ``(1,)`` step sizes.
        zero_point (`torch.Tensor`): ``(B,)`` or ``(1,)`` zero points (int8 code domain).
        qmin (`int`): lowest code, inside ``[-128, 127]``.
        qmax (`int`): highest code, inside ``[-128, 127]``.
        kernel_preference (`str`, defaults to `"auto"`): ``"auto"`` (the dispatch rules), ``"triton"`` or ``"torch"``.
    """
    if resolve_kernel_preference(kernel_preference, x.device) == "torch" or x.numel() == 0:
        return quantize_activation_codes_reference(x, scale, zero_point, qmin, qmax)
    _check_code_range(qmin, qmax)
    _check_qparams(scale, zero_point, x.shape[0] if x.dim() else 1, "quantize_activation_codes")
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        x = x.contiguous()
    return _kernels().quantize_codes(x, scale.float().contiguous(), zero_point.float().contiguous(), qmin, qmax)


# -- linear ------------------------------------------------------------------------------------------------------------
def _check_linear(codes: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype):
    if codes.dtype != torch.int8 or codes.dim() < 1:
        raise ValueError(f"`codes` must be an int8 tensor (..., K), got {codes.dtype} {tuple(codes.shape)}.")
    if codes.shape[-1] != weight.k:
        raise ValueError(f"`codes` has K = {codes.shape[-1]}, the weight K = {weight.k}.")
    if bias is not None and bias.shape != (weight.n,):
        raise ValueError(f"`bias` must have shape ({weight.n},), got {tuple(bias.shape)}.")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"`out_dtype` must be one of {OUT_DTYPES}, got {out_dtype}.")


def _epilogue_reference(
    acc: torch.Tensor, weight: PackedWeight, row_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``acc`` float64 ``(M, G, N)`` group sums -> float64 ``(M, N)``."""
    y = (acc * weight.scale.double().t().unsqueeze(0)).sum(dim=1) * row_scale.double().unsqueeze(1)
    return y if bias is None else y + bias.double()


def int8_linear_reference(
    codes: torch.Tensor,
    row_scale: torch.Tensor,
    row_zero_point: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The torch reference of [int8_linear][diffusers_qalora.kernels.int8_linear] (same signature, no ``kernel_preference``): float64 sums (exact) and epilogue."""
    _check_linear(codes, weight, bias, out_dtype)
    samples = _check_qparams(row_scale, row_zero_point, codes.shape[0] if codes.dim() > 1 else 1, "int8_linear")
    a = codes.reshape(-1, weight.k).double()
    m = a.shape[0]
    if m == 0 or weight.n == 0:
        return torch.zeros((*codes.shape[:-1], weight.n), device=codes.device, dtype=out_dtype)
    per = m // samples
    z = torch.round(row_zero_point.double()).repeat_interleave(per).unsqueeze(1)
    s = row_scale.double().repeat_interleave(per)
    centered = (a - z).reshape(m, weight.groups, weight.group_k)
    w = weight.codes().double().reshape(weight.n, weight.groups, weight.group_k)
    acc = torch.einsum("mgk,ngk->mgn", centered, w)
    y = _epilogue_reference(acc, weight, s, bias)
    return y.to(out_dtype).reshape(*codes.shape[:-1], weight.n)


def int8_linear(
    codes: torch.Tensor,
    row_scale: torch.Tensor,
    row_zero_point: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    kernel_preference: str = "auto",
) -> torch.Tensor:
    """``y = s_b * sum_g s_w[:, g] * ((a - z_b) @ w_g^T) + bias``: integer GEMM with a fused dequantize epilogue.

    Args:
        codes (`torch.Tensor`): ``int8`` activation codes ``(B, ..., K)`` (or ``(M, K)``).
        row_scale (`torch.Tensor`): float ``(B,)`` activation step size of each sample of dim 0 (every row of a
            sample gathers it), or ``(1,)`` for all rows.
        row_zero_point (`torch.Tensor`): ``(B,)`` or ``(1,)`` integer-valued zero points of the codes (any int32
            value: the correction ``z * rowsum(w)`` is exact).
        weight ([PackedWeight][diffusers_qalora.kernels.PackedWeight]): packed 2/4/8-bit codes and their step sizes (per channel or per group).
        bias (`torch.Tensor`, *optional*): ``(N,)``.
        out_dtype (`torch.dtype`, defaults to `torch.float32`): float32, float16 or bfloat16.
        kernel_preference (`str`, defaults to `"auto"`): ``"auto"`` (the dispatch rules), ``"triton"`` or ``"torch"``.

    Returns:
        `torch.Tensor`: ``(B, ..., N)`` in ``out_dtype``.
    """
    if resolve_kernel_preference(kernel_preference, codes.device) == "torch":
        return int8_linear_reference(codes, row_scale, row_zero_point, weight, bias, out_dtype)
    _check_linear(codes, weight, bias, out_dtype)
    samples = _check_qparams(row_scale, row_zero_point, codes.shape[0] if codes.dim() > 1 else 1, "int8_linear")
    a = codes.reshape(-1, weight.k)
    m, n, k = a.shape[0], weight.n, weight.k
    out = torch.empty((m, n), device=codes.device, dtype=out_dtype)
    if m and n:
        if k == 0:
            out.zero_()
            if bias is not None:
                out += bias.to(out_dtype)
        else:
            _kernels().gemm(
                a,
                weight.packed,
                weight.bits,
                row_scale.float().contiguous(),
                torch.round(row_zero_point.float()).to(torch.int32).contiguous(),
                weight.scale,
                weight.rowsum,
                None if bias is None else bias.float().contiguous(),
                out,
                m,
                n,
                k,
                m // samples,
            )
    return out.reshape(*codes.shape[:-1], n)


# -- convolution -------------------------------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def _conv_geometry(codes, weight, kernel_size, stride, padding, dilation):
    if codes.dtype != torch.int8 or codes.dim() != 4:
        raise ValueError(f"`codes` must be int8 (B, C, H, W), got {codes.dtype} {tuple(codes.shape)}.")
    kh, kw = _pair(kernel_size)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    b, c, h, w = codes.shape
    if weight.k != c * kh * kw:
        raise ValueError(f"the weight holds K = {weight.k} codes per output channel; C * kh * kw = {c} * {kh} * {kw}.")
    if c % weight.groups:
        raise ValueError(f"{weight.groups} weight groups do not split {c} input channels.")
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (kh, kw), stride, padding, dilation, max(oh, 0), max(ow, 0)


def int8_conv2d_reference(
    codes: torch.Tensor,
    row_scale: torch.Tensor,
    row_zero_point: torch.Tensor,
    weight: PackedWeight,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The torch reference of [int8_conv2d][diffusers_qalora.kernels.int8_conv2d] (same signature, no ``kernel_preference``): float64 convolution of ``a - z``
    (zero padding of ``a - z`` = padding with the zero point), float64 epilogue."""
    (kh, kw), stride, padding, dilation, oh, ow = _conv_geometry(codes, weight, kernel_size, stride, padding, dilation)
    if bias is not None and bias.shape != (weight.n,):
        raise ValueError(f"`bias` must have shape ({weight.n},), got {tuple(bias.shape)}.")
    samples = _check_qparams(row_scale, row_zero_point, codes.shape[0], "int8_conv2d")
    b, c = codes.shape[:2]
    if b == 0 or weight.n == 0 or oh == 0 or ow == 0:
        return torch.zeros((b, weight.n, oh, ow), device=codes.device, dtype=out_dtype)
    z = torch.round(row_zero_point.double()).reshape(samples, 1, 1, 1)
    centered = codes.double() - z
    w = weight.codes().double().reshape(weight.n, c, kh, kw)
    gc = c // weight.groups
    parts = [
        F.conv2d(centered[:, g * gc : (g + 1) * gc], w[:, g * gc : (g + 1) * gc], None, stride, padding, dilation)
        for g in range(weight.groups)
    ]
    acc = torch.stack(parts, dim=1).permute(0, 3, 4, 1, 2).reshape(-1, weight.groups, weight.n)  # (B*OH*OW, G, N)
    s = row_scale.double().expand(b).repeat_interleave(oh * ow)  # one step per output pixel (row)
    y = _epilogue_reference(acc, weight, s, bias)
    return y.reshape(b, oh, ow, weight.n).permute(0, 3, 1, 2).to(out_dtype)


def int8_conv2d(
    codes: torch.Tensor,
    row_scale: torch.Tensor,
    row_zero_point: torch.Tensor,
    weight: PackedWeight,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    kernel_preference: str = "auto",
) -> torch.Tensor:
    """Implicit-GEMM integer convolution (groups = 1) with the epilogue of [int8_linear][diffusers_qalora.kernels.int8_linear].

    The GEMM rows are the output pixels (``M = B * OH * OW``, each gathering its sample's step size and zero
    point), ``K = C * kh * kw`` in the order of the flattened weight.  Zero padding pads with the zero point (a padded
    pixel contributes ``(z - z) * w = 0``), so the zero points must be int8 values.

    Args:
        codes (`torch.Tensor`): ``int8`` ``(B, C, H, W)``, contiguous or channels-last (any strides).
        row_scale (`torch.Tensor`): ``(B,)`` or ``(1,)`` activation step sizes.
        row_zero_point (`torch.Tensor`): ``(B,)`` or ``(1,)`` zero points in ``[-128, 127]``.
        weight ([PackedWeight][diffusers_qalora.kernels.PackedWeight]): ``(C_out, C * kh * kw)`` codes.
        kernel_size (`int` or pair): the kernel's spatial size.
        stride (`int` or pair, defaults to `1`): the convolution's stride.
        padding (`int` or pair, defaults to `0`): explicit zero padding.
        dilation (`int` or pair, defaults to `1`): the convolution's dilation.
        bias (`torch.Tensor`, *optional*): as in [int8_linear][diffusers_qalora.kernels.int8_linear].
        out_dtype (`torch.dtype`, defaults to `torch.float32`): as in [int8_linear][diffusers_qalora.kernels.int8_linear].
        kernel_preference (`str`, defaults to `"auto"`): as in [int8_linear][diffusers_qalora.kernels.int8_linear].

    Returns:
        `torch.Tensor`: ``(B, C_out, OH, OW)`` in ``out_dtype``, channels-last in memory on the Triton path.
    """
    if resolve_kernel_preference(kernel_preference, codes.device) == "torch":
        return int8_conv2d_reference(
            codes, row_scale, row_zero_point, weight, kernel_size, stride, padding, dilation, bias, out_dtype
        )
    zp = torch.round(row_zero_point.float())
    if zp.numel() and (float(zp.min()) < -128 or float(zp.max()) > 127):
        raise ValueError("int8_conv2d pads with the zero point, so `row_zero_point` must lie in [-128, 127].")
    return conv2d_triton(codes, row_scale, zp, weight, kernel_size, stride, padding, dilation, bias, out_dtype)


def conv2d_triton(
    codes: torch.Tensor,
    row_scale: torch.Tensor,
    row_zero_point: torch.Tensor,
    weight: PackedWeight,
    kernel_size,
    stride,
    padding,
    dilation,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[int8_conv2d][diffusers_qalora.kernels.int8_conv2d] on the Triton path without the zero-point range check (one device synchronisation); the caller
    guarantees int8 zero points."""
    (kh, kw), stride, padding, dilation, oh, ow = _conv_geometry(codes, weight, kernel_size, stride, padding, dilation)
    if bias is not None and bias.shape != (weight.n,):
        raise ValueError(f"`bias` must have shape ({weight.n},), got {tuple(bias.shape)}.")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"`out_dtype` must be one of {OUT_DTYPES}, got {out_dtype}.")
    samples = _check_qparams(row_scale, row_zero_point, codes.shape[0], "int8_conv2d")
    b = codes.shape[0]
    m, n = b * oh * ow, weight.n
    out = torch.empty((m, n), device=codes.device, dtype=out_dtype)
    if m and n:
        if samples == 1 and b > 1:  # one set for all samples: every row gathers entry 0
            row_scale, row_zero_point = row_scale.expand(b), row_zero_point.expand(b)
        _kernels().gemm(
            codes,
            weight.packed,
            weight.bits,
            row_scale.float().contiguous(),
            torch.round(row_zero_point.float()).to(torch.int32).contiguous(),
            weight.scale,
            weight.rowsum,
            None if bias is None else bias.float().contiguous(),
            out,
            m,
            n,
            weight.k,
            oh * ow,
            conv={"ow": ow, "stride": stride, "padding": padding, "dilation": dilation, "kernel_size": (kh, kw)},
        )
    return out.reshape(b, oh, ow, n).permute(0, 3, 1, 2)
