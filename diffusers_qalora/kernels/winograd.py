"""Integer Winograd F(m, 3) convolution: Triton kernels for its three stages, and the torch reference they match.

The scheme is the ``"int"`` mode of `diffusers_qalora.winograd.WinogradConv2d` (see
`diffusers_qalora.winograd.quantized`): weights ``U = G w G^T`` quantized offline per (Winograd position, output
channel, group of input channels); ``V = B^T d B`` quantized dynamically with an absmax step per (position, tile,
channel group), or per (tile, channel group) with ``act_granularity="tile"``; ``M[xi] = sum_groups s_U s_V
(q_U q_V)`` with exact integer sums; optionally ``M`` re-quantized per (tile, output channel) over the positions
(``output_bits``); then ``Y = A^T M A``, cropped, plus the bias.

Three kernels, fused where the data allow it:

1. **input transform + quantization** (`winograd_input_codes`): each program gathers the ``n x n`` tiles of a block
   of tiles for one channel group straight from the ``(N, C, H, W)`` input (zero padding by masking), transforms
   them with one product by the Kronecker matrix ``(B^T kron B^T)`` (fp32, IEEE), reduces the group's absmax, and
   writes int8 codes ``(n^2, P, C)`` and steps ``(n^2, P, G)``.  The group's absmax needs every channel of the group
   before the first code, so the transform runs twice (recomputing is cheaper than a float round trip of ``V``);
2. **per-position GEMM** (`winograd_position_gemm`): ``n^2`` int8 x int8 -> int32 GEMMs (tensor cores on CUDA),
   one channel group at a time, each group's sum scaled by ``s_U`` then ``s_V`` and added in fp32 (the reference's
   order, so for equal codes the two paths agree bit for bit);
3. **output transform** (`winograd_output_transform`): optional re-quantization of ``M``, ``(A^T kron A^T) M`` (fp32,
   IEEE), the bias, the crop and the store in the output dtype.

A full weight-stationary fusion of 2 and 3 would keep ``n^2`` accumulators per output tile (36 for F(4,3)), more
than a program's registers hold at useful block sizes, so ``M`` makes one fp32 round trip through memory.

**Agreement with the reference.**  The GEMM stage is exact.  The transforms sum in another order than torch's
``kron @ d`` GEMM, so ``V`` (and ``Y``) differ by float rounding (~1e-7 relative); a value of ``V / s`` within such
an error of a rounding boundary can take the neighbouring code, and an absmax that differs in its last bit moves
its group's step by as much.  ``tests/kernels/test_winograd_kernel.py`` bounds both.

Dispatch: [winograd_int_conv2d][diffusers_qalora.kernels.winograd_int_conv2d] runs the Triton kernels for CUDA tensors (fp16/bf16/fp32) when Triton imports and
the torch reference otherwise; `WinogradConv2d` in ``"int"`` mode calls it with the implementation it resolved once
from its [KernelPreference][diffusers_qalora.KernelPreference].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..quant import qrange
from ..winograd.functional import TileGrid, conv_output_size, input_transform, output_transform, tile_input
from ..winograd.quantized import channel_groups, exact_accumulator_dtype, hadamard_int, quantize_output

__all__ = [
    "WinogradPackedWeight",
    "pack_winograd_weight",
    "winograd_input_codes_reference",
    "winograd_input_codes_triton",
    "winograd_int_conv2d",
    "winograd_int_conv2d_reference",
    "winograd_int_conv2d_triton",
    "winograd_output_transform_reference",
    "winograd_output_transform_triton",
    "winograd_position_gemm_reference",
    "winograd_position_gemm_triton",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACT_GRANULARITIES = ("position", "tile")


class WinogradPackedWeight(NamedTuple):
    """Winograd-domain weight codes in the layout of the GEMM kernel.

    Attributes:
        codes (`torch.Tensor`): ``(n^2, C, K)`` int8.
        steps (`torch.Tensor`): ``(n^2, G, K)`` float32, one step per (position, channel group, output channel).
        group_size (`int`): input channels per group ``g = C / G``.
    """

    codes: torch.Tensor
    steps: torch.Tensor
    group_size: int


def pack_winograd_weight(codes_u: torch.Tensor, step_u: torch.Tensor) -> WinogradPackedWeight:
    """Repack the weight codes of `diffusers_qalora.winograd.quantized.quantize_weight_codes` (``(G, n^2, K, g)``
    integer codes and ``(G, n^2, K, 1)`` steps) for the GEMM kernel."""
    groups, n2, k, g = codes_u.shape
    if step_u.shape != (groups, n2, k, 1):
        raise ValueError(f"`step_u` must have shape {(groups, n2, k, 1)}, got {tuple(step_u.shape)}.")
    if codes_u.numel() and (int(codes_u.min()) < -128 or int(codes_u.max()) > 127):
        raise ValueError("`codes_u` must hold 8-bit codes (at most `bits=8`).")
    codes = codes_u.permute(1, 0, 3, 2).reshape(n2, groups * g, k).to(torch.int8).contiguous()
    steps = step_u.reshape(groups, n2, k).permute(1, 0, 2).to(torch.float32).contiguous()
    return WinogradPackedWeight(codes, steps, g)


def _pad_pair(padding: tuple[int, int] | int) -> tuple[int, int]:
    pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if len(pad) != 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pad):
        raise ValueError(f"`padding` must be a non-negative int or a pair of them, got {padding!r}.")
    return pad  # type: ignore[return-value]


def _check_common(x: torch.Tensor, bt: torch.Tensor, at: torch.Tensor, act_granularity: str) -> tuple[int, int]:
    if x.dim() != 4:
        raise ValueError(f"`x` must be (N, C, H, W), got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"`x` must be a float tensor, got {x.dtype}.")
    m, n = at.shape
    if bt.shape != (n, n) or n != m + 2:
        raise ValueError(f"`bt` {tuple(bt.shape)} and `at` {tuple(at.shape)} are not the transforms of an F(m, 3).")
    if act_granularity not in _ACT_GRANULARITIES:
        raise ValueError(f"`act_granularity` must be one of {_ACT_GRANULARITIES}, got {act_granularity!r}.")
    return m, n


def _grid(x: torch.Tensor, m: int, padding: tuple[int, int]) -> TileGrid:
    out_h, out_w = conv_output_size(x.shape[2], x.shape[3], padding)
    return TileGrid(x.shape[0], -(-out_h // m), -(-out_w // m), out_h, out_w)


# -- torch references -------------------------------------------------------------------------------------------------
def winograd_input_codes_reference(
    x: torch.Tensor,
    bt: torch.Tensor,
    m: int,
    padding: tuple[int, int] | int,
    bits: int,
    group_size: int | None,
    act_granularity: str = "position",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 in torch: int8 codes ``(n^2, P, C)`` and float32 steps ``(n^2, P, G)`` of ``V = B^T d B`` (the
    quantization of `hadamard_int`, computed in float32)."""
    padding = _pad_pair(padding)
    tiles, _ = tile_input(x.float(), m, 3, padding)
    v = input_transform(tiles, bt.float())  # (n^2, C, P)
    n2, c, p = v.shape
    groups, g = channel_groups(c, group_size)
    qmin, qmax = qrange(bits, True)
    vg = v.reshape(n2, groups, g, p)
    dims = (2,) if act_granularity == "position" else (0, 2)
    step = torch.maximum(vg.amax(dim=dims, keepdim=True), vg.amin(dim=dims, keepdim=True).neg()) / qmax
    step = step.clamp_min(1e-30)
    codes = torch.div(vg, step).round_().clamp_(qmin, qmax).to(torch.int8)
    codes = codes.reshape(n2, c, p).transpose(1, 2).contiguous()
    steps = step.expand(n2, groups, 1, p).reshape(n2, groups, p).transpose(1, 2).contiguous()
    return codes, steps


def winograd_position_gemm_reference(
    codes_v: torch.Tensor, steps_v: torch.Tensor, weight: WinogradPackedWeight
) -> torch.Tensor:
    """Stage 2 in torch: ``M: (n^2, P, K)`` float32 from input codes ``(n^2, P, C)``, steps ``(n^2, P, G)`` and the
    packed weight; exact integer sums per group, scaled as `hadamard_int` does."""
    n2, p, c = codes_v.shape
    g = weight.group_size
    groups = c // g
    acc_dtype = exact_accumulator_dtype(g, 8, torch.float32)
    out = torch.zeros(n2, p, weight.codes.shape[2], dtype=torch.float32, device=codes_v.device)
    for j in range(groups):
        cols = slice(j * g, (j + 1) * g)
        acc = torch.matmul(codes_v[:, :, cols].to(acc_dtype), weight.codes[:, cols].to(acc_dtype)).float()
        out += (acc * weight.steps[:, j, None, :]) * steps_v[:, :, j, None]
    return out


def winograd_output_transform_reference(
    m_prod: torch.Tensor,
    at: torch.Tensor,
    grid: TileGrid,
    bias: torch.Tensor | None = None,
    output_bits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stage 3 in torch: optional re-quantization of ``M: (n^2, P, K)``, ``Y = A^T M A``, crop, bias, cast."""
    prod = m_prod.float().transpose(1, 2)  # (n^2, K, P), the layout of the Winograd functional code
    if output_bits is not None:
        prod = quantize_output(prod, output_bits, fake=False)
    y = output_transform(prod, at.float(), grid)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    return y.to(out_dtype)


def winograd_int_conv2d_reference(
    x: torch.Tensor,
    codes_u: torch.Tensor,
    step_u: torch.Tensor,
    bt: torch.Tensor,
    at: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: tuple[int, int] | int = (1, 1),
    *,
    bits: int = 8,
    group_size: int | None = None,
    act_granularity: str = "position",
    output_bits: int | None = None,
    packed: WinogradPackedWeight | None = None,
) -> torch.Tensor:
    """The torch reference of [winograd_int_conv2d][diffusers_qalora.kernels.winograd_int_conv2d]: the ``"int"`` mode of ``WinogradConv2d`` (`tile_input`,
    `input_transform`, `hadamard_int`, `quantize_output`, `output_transform`), in float32 (float64 for a float64
    ``x``), then the bias and a cast to ``x.dtype``.  ``packed`` is ignored (the Triton path's weight layout)."""
    m, _ = _check_common(x, bt, at, act_granularity)
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tiles, grid = tile_input(x.to(cdtype), m, 3, _pad_pair(padding))
    v = input_transform(tiles, bt.to(cdtype))
    prod = hadamard_int(codes_u, step_u, v, bits, group_size, act_granularity)
    if output_bits is not None:
        prod = quantize_output(prod, output_bits, fake=False)
    y = output_transform(prod, at.to(cdtype), grid)
    if bias is not None:
        y = y + bias.to(cdtype).view(1, -1, 1, 1)
    return y.to(x.dtype)


# -- Triton -------------------------------------------------------------------------------------------------------
def _kernels():
    """The ``@triton.jit`` kernels (`diffusers_qalora.kernels._winograd_triton`), built on first use."""
    from ._build import load_kernel_module

    return load_kernel_module("_winograd_triton")


def _on_gpu(device: torch.device) -> bool:
    from ._build import built_interpreted

    return device.type == "cuda" and not built_interpreted()


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def winograd_input_codes_triton(
    x: torch.Tensor,
    bt: torch.Tensor,
    m: int,
    padding: tuple[int, int] | int,
    bits: int,
    group_size: int | None,
    act_granularity: str = "position",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `winograd_input_codes_reference` (fp16/bf16/fp32 ``x``, any strides)."""
    padding = _pad_pair(padding)
    kernels = _kernels()
    n = m + 2
    batch, c, h, w = x.shape
    grid_ = _grid(x, m, padding)
    p = grid_.num_tiles
    groups, g = channel_groups(c, group_size)
    nn_pad = _pow2(n * n)
    kb = torch.zeros(nn_pad, nn_pad, dtype=torch.float32, device=x.device)
    kb[: n * n, : n * n] = torch.kron(bt.float(), bt.float()).to(x.device).T
    codes = torch.empty(n * n, p, c, dtype=torch.int8, device=x.device)
    steps = torch.empty(n * n, p, groups, dtype=torch.float32, device=x.device)
    if codes.numel() == 0:
        return codes, steps
    qmin, qmax = qrange(bits, True)
    block_t, block_c = (8, 16) if _on_gpu(x.device) else (16, 16)
    launch = {"num_warps": 8} if _on_gpu(x.device) else {}
    kernels.input_codes_kernel[(kernels.cdiv(p, block_t), groups)](
        x,
        kb,
        codes,
        steps,
        c,
        h,
        w,
        grid_.tiles_h,
        grid_.tiles_w,
        p,
        g,
        *x.stride(),
        padding[0],
        padding[1],
        float(qmin),
        float(qmax),
        M_TILE=m,
        N_TILE=n,
        NN_PAD=nn_pad,
        PER_POSITION=act_granularity == "position",
        INTERPRET=kernels.INTERPRET,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        **launch,
    )
    return codes, steps


def winograd_position_gemm_triton(
    codes_v: torch.Tensor, steps_v: torch.Tensor, weight: WinogradPackedWeight
) -> torch.Tensor:
    """Triton version of `winograd_position_gemm_reference`."""
    kernels = _kernels()
    n2, p, c = codes_v.shape
    k = weight.codes.shape[2]
    out = torch.empty(n2, p, k, dtype=torch.float32, device=codes_v.device)
    if out.numel() == 0:
        return out.zero_()
    if _on_gpu(codes_v.device):
        # groups of 32 channels (the usual size) would leave half of a 64-wide reduction block masked
        block_k = 32 if weight.group_size <= 32 else 64
        block_m, block_n, launch = 128, 128, {"num_warps": 8, "num_stages": 3}
    else:
        block_m, block_n, block_k, launch = 32, 32, 32, {}
    grid = (kernels.cdiv(p, block_m), kernels.cdiv(k, block_n), n2)
    kernels.position_gemm_kernel[grid](
        codes_v,
        weight.codes,
        steps_v,
        weight.steps,
        out,
        p,
        c,
        k,
        weight.group_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **launch,
    )
    return out


def winograd_output_transform_triton(
    m_prod: torch.Tensor,
    at: torch.Tensor,
    grid: TileGrid,
    bias: torch.Tensor | None = None,
    output_bits: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton version of `winograd_output_transform_reference` (``m_prod`` contiguous float32)."""
    kernels = _kernels()
    m, n = at.shape
    n2, p, k = m_prod.shape
    y = torch.empty(grid.batch, k, grid.out_h, grid.out_w, dtype=out_dtype, device=m_prod.device)
    if y.numel() == 0:
        return y
    nn_pad, mm_pad = _pow2(n * n), _pow2(m * m)
    ka = torch.zeros(nn_pad, mm_pad, dtype=torch.float32, device=m_prod.device)
    ka[: n * n, : m * m] = torch.kron(at.float(), at.float()).to(m_prod.device).T
    qmin, qmax = qrange(output_bits, True) if output_bits is not None else (0, 1)
    block_t, block_k = (4, 32) if _on_gpu(m_prod.device) else (4, 16)
    bias_arg = bias.float().contiguous() if bias is not None else ka
    kernels.output_transform_kernel[(kernels.cdiv(p, block_t), kernels.cdiv(k, block_k))](
        m_prod.contiguous(),
        ka,
        bias_arg,
        y,
        p,
        k,
        grid.tiles_h,
        grid.tiles_w,
        grid.out_h,
        grid.out_w,
        *y.stride(),
        float(qmin),
        float(qmax),
        M_TILE=m,
        N_TILE=n,
        NN_PAD=nn_pad,
        MM_PAD=mm_pad,
        REQUANT=output_bits is not None,
        HAS_BIAS=bias is not None,
        INTERPRET=kernels.INTERPRET,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
    )
    return y


def winograd_int_conv2d_triton(
    x: torch.Tensor,
    codes_u: torch.Tensor,
    step_u: torch.Tensor,
    bt: torch.Tensor,
    at: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: tuple[int, int] | int = (1, 1),
    *,
    bits: int = 8,
    group_size: int | None = None,
    act_granularity: str = "position",
    output_bits: int | None = None,
    packed: WinogradPackedWeight | None = None,
) -> torch.Tensor:
    """Triton version of [winograd_int_conv2d][diffusers_qalora.kernels.winograd_int_conv2d] (same arguments, no ``kernel_preference``).  ``packed`` (from
    [pack_winograd_weight][diffusers_qalora.kernels.pack_winograd_weight]) saves repacking ``codes_u``/``step_u`` at every call."""
    m, _ = _check_common(x, bt, at, act_granularity)
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(
            f"the Triton Winograd kernels take fp16, bf16 or fp32 inputs, got {x.dtype}; use the torch "
            f"reference (kernel_preference='torch')."
        )
    padding = _pad_pair(padding)
    weight = packed if packed is not None else pack_winograd_weight(codes_u, step_u)
    if weight.codes.shape[1] != x.shape[1]:
        raise ValueError(f"the weight codes have {weight.codes.shape[1]} input channels, `x` has {x.shape[1]}.")
    if group_size is not None and group_size != weight.group_size:
        raise ValueError(f"`group_size` ({group_size}) differs from the weight codes' ({weight.group_size}).")
    grid = _grid(x, m, padding)
    codes_v, steps_v = winograd_input_codes_triton(x, bt, m, padding, bits, weight.group_size, act_granularity)
    prod = winograd_position_gemm_triton(codes_v, steps_v, weight)
    return winograd_output_transform_triton(prod, at, grid, bias, output_bits, x.dtype)


def winograd_int_conv2d(
    x: torch.Tensor,
    codes_u: torch.Tensor,
    step_u: torch.Tensor,
    bt: torch.Tensor,
    at: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: tuple[int, int] | int = (1, 1),
    *,
    bits: int = 8,
    group_size: int | None = None,
    act_granularity: str = "position",
    output_bits: int | None = None,
    packed: WinogradPackedWeight | None = None,
    kernel_preference: str = "auto",
) -> torch.Tensor:
    """Integer Winograd F(m, 3) convolution of ``x`` with quantized Winograd-domain weights.

    Args:
        x (`torch.Tensor`): ``(N, C, H, W)``.
        codes_u (`torch.Tensor`): ``(G, n^2, K, g)`` integer weight codes from
            `diffusers_qalora.winograd.quantized.quantize_weight_codes`.
        step_u (`torch.Tensor`): ``(G, n^2, K, 1)`` their steps.
        bt (`torch.Tensor`): ``B^T`` ``(n, n)``, the (scaled) input transform.
        at (`torch.Tensor`): ``A^T`` ``(m, n)``, the (scaled) output transform.
        bias (`torch.Tensor`, *optional*): ``(K,)``.
        padding (`int | tuple[int, int]`, defaults to `(1, 1)`): zero padding.
        bits (`int`, defaults to `8`): bits of the ``V`` codes (signed, absmax step).
        group_size (`int`, *optional*): input channels per quantization group (``None`` = all).
        act_granularity (`"position" | "tile"`, defaults to `"position"`): the ``V`` step granularity.
        output_bits (`int`, *optional*): re-quantize ``M`` before the output transform.
        packed ([WinogradPackedWeight][diffusers_qalora.kernels.WinogradPackedWeight], *optional*): the weight already packed for the Triton path.
        kernel_preference (`str`, defaults to `"auto"`): ``"auto"`` (Triton for CUDA tensors when it imports, else the
            torch reference), ``"triton"`` or ``"torch"``.  float64 runs the reference.

    Returns:
        `torch.Tensor`: ``(N, K, H_o, W_o)`` in the dtype of ``x``.  Not differentiable.
    """
    from .dispatch import resolve_kernel_preference

    chosen = resolve_kernel_preference(kernel_preference, x.device)
    fn = (
        winograd_int_conv2d_triton
        if chosen == "triton" and x.dtype in _TRITON_DTYPES
        else (winograd_int_conv2d_reference)
    )
    with torch.no_grad():
        return fn(
            x,
            codes_u,
            step_u,
            bt,
            at,
            bias,
            padding,
            bits=bits,
            group_size=group_size,
            act_granularity=act_granularity,
            output_bits=output_bits,
            packed=packed,
        )


class WinogradKernels:
    """The Triton ``"int"`` mode of `diffusers_qalora.winograd.WinogradConv2d`, installed by `install` through
    `diffusers_qalora.winograd.conv.set_winograd_kernel_provider` (so ``winograd`` never imports ``kernels``)."""

    @staticmethod
    def choice(module, device: torch.device) -> str:
        from .dispatch import module_choice

        return module_choice(module, device)

    pack = staticmethod(pack_winograd_weight)
    conv2d = staticmethod(winograd_int_conv2d_triton)
