"""Triton kernels of the integer GEMM (imported lazily by `diffusers_qalora.kernels._build`).

* ``quantize_codes_kernel``: float activations -> ``int8`` codes ``clamp(round(x / s_b) + z_b, qmin, qmax)``, with the
  step size and zero point of each sample ``b`` (one segment of the storage per sample, any dense layout);
* ``int_gemm_kernel``: ``out[m, n] = s_x[b(m)] * sum_g s_w[n, g] * (sum_{k in g} a[m, k] w[n, k] - z[b(m)] rowsum_g(w)[n])
  + bias[n]`` with ``int8 x int8 -> int32`` products on the tensor cores and the epilogue fused; ``a`` is a row-major
  matrix (linear layers) or gathered from an NCHW/NHWC code tensor (``IS_CONV``: implicit-GEMM convolution, zero
  padding = the zero point); ``w`` is packed 2/4/8-bit codes (``BITS``), unpacked to int8 in the kernel.  Hopper has
  no int4 tensor cores (and Triton exposes none on Ampere), so 4- and 2-bit weights run as int8 products everywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._build import built_interpreted
from ._fake_quant_triton import _cast_out, _rint
from ._triton_helpers import device_function

INTERPRET = bool(built_interpreted())
MAX_BLOCK = 8192 if INTERPRET else 1024


@triton.jit
def quantize_codes_kernel(
    x_ptr,  # float activations; sample b occupies storage [b * inner, (b + 1) * inner)
    out_ptr,  # int8 codes, same strides as x
    scale_ptr,  # float32 step size per sample
    zp_ptr,  # float32 zero point per sample (rounded here)
    inner,  # elements per sample
    chunks,  # programs per sample
    qmin,
    qmax,  # code range, float32, inside [-128, 127]
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // chunks
    chunk = pid - b * chunks
    s = tl.load(scale_ptr + b).to(tl.float32)
    z = _rint(tl.load(zp_ptr + b).to(tl.float32), INTERPRET)
    local = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = local < inner
    offs = b.to(tl.int64) * inner + local
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(x, s)
    r = _rint(tl.minimum(tl.maximum(v, qmin - z - 1.0), qmax - z + 1.0), INTERPRET)
    q = tl.minimum(tl.maximum(r + z, qmin), qmax)
    tl.store(out_ptr + offs, q.to(tl.int8), mask=mask)


@device_function
def _load_weight_tile(w_ptr, rn, rk, n_mask, k_mask, stride_wn, stride_wk, BITS: tl.constexpr):
    """``(BLOCK_K, BLOCK_N)`` int8 weight codes from packed bytes: code ``k`` of row ``n`` sits in byte
    ``k // (8 // BITS)`` at bit ``(k % (8 // BITS)) * BITS``, two's complement in its field (`quant.pack_codes`)."""
    mask = k_mask[:, None] & n_mask[None, :]
    if BITS == 8:
        raw = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk, mask=mask, other=0)
        return raw.to(tl.int8, bitcast=True)
    else:
        PER_BYTE: tl.constexpr = 8 // BITS
        raw = tl.load(w_ptr + rn[None, :] * stride_wn + (rk // PER_BYTE)[:, None] * stride_wk, mask=mask, other=0)
        field = (raw.to(tl.int32) >> ((rk % PER_BYTE) * BITS)[:, None]) & ((1 << BITS) - 1)
        field = tl.where(field >= (1 << (BITS - 1)), field - (1 << BITS), field)
        return field.to(tl.int8)


@triton.jit
def int_gemm_kernel(
    a_ptr,  # int8 activation codes: (M, K) matrix, or (B, C, H, W) for IS_CONV (any strides)
    w_ptr,  # uint8 packed weight codes (N, bytes)
    out_ptr,  # (M, N) output in the output dtype
    row_scale_ptr,  # float32 activation step size per sample
    row_zp_ptr,  # int32 activation zero point per sample (in the int8 code domain)
    w_scale_ptr,  # float32 (N, n_groups) weight step sizes
    w_rowsum_ptr,  # int32 (N, n_groups) sums of the weight codes of each group
    bias_ptr,  # float32 (N,) (unused without HAS_BIAS)
    M,
    N,
    K,
    rows_per_sample,  # row m belongs to sample m // rows_per_sample
    group_k,  # K elements per weight group (K for one step per output channel)
    n_groups,
    stride_am,
    stride_ak,  # linear: strides of the (M, K) codes
    stride_ab,
    stride_ac,
    stride_ah,
    stride_aw,  # conv: strides of the (B, C, H, W) codes
    H,
    W,
    OW,  # conv: input height / width, output width
    conv_sh,
    conv_sw,
    pad_h,
    pad_w,
    dil_h,
    dil_w,  # conv geometry
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    M_BUCKET,  # next power of two of M: only an autotuning key
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_CONV: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Grouped ordering of the output tiles: GROUP_M row blocks share weight tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # builtins only (see _triton_helpers)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rm_safe = tl.where(m_mask, rm, 0)
    sample = rm_safe // rows_per_sample
    z_row = tl.load(row_zp_ptr + sample)  # int32
    s_row = tl.load(row_scale_ptr + sample)
    if IS_CONV:
        pix = rm_safe - sample * rows_per_sample
        oh = pix // OW
        ow = pix - oh * OW
        ih0 = oh * conv_sh - pad_h
        iw0 = ow * conv_sw - pad_w
        a_row = a_ptr + sample.to(tl.int64) * stride_ab
    else:
        a_row = a_ptr + rm_safe.to(tl.int64) * stride_am

    out = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for g in range(0, n_groups):
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        for kk in range(0, group_k, BLOCK_K):
            rk_local = kk + tl.arange(0, BLOCK_K)
            k_mask = rk_local < group_k
            rk = g * group_k + rk_local
            if IS_CONV:
                c = rk // (KH * KW)
                r = rk - c * (KH * KW)
                kh = r // KW
                kw = r - kh * KW
                ih = ih0[:, None] + (kh * dil_h)[None, :]
                iw = iw0[:, None] + (kw * dil_w)[None, :]
                inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & k_mask[None, :] & m_mask[:, None]
                a = tl.load(
                    a_row[:, None] + c[None, :] * stride_ac + ih * stride_ah + iw * stride_aw, mask=inside, other=0
                )
                # Zero padding: a padded code equals the zero point, so it adds (z - z) * w = 0.
                a = tl.where(inside, a, z_row[:, None].to(tl.int8))
            else:
                a = tl.load(a_row[:, None] + rk[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :], other=0)
            w = _load_weight_tile(w_ptr, rn, rk, n_mask, k_mask, stride_wn, stride_wk, BITS)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        rowsum = tl.load(w_rowsum_ptr + rn * n_groups + g, mask=n_mask, other=0)
        w_scale = tl.load(w_scale_ptr + rn * n_groups + g, mask=n_mask, other=0.0)
        # sum_k (a - z) w = sum_k a w - z * sum_k w, exact in int32
        acc = acc - z_row[:, None] * rowsum[None, :]
        out += acc.to(tl.float32) * w_scale[None, :]
    out = out * s_row[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_mask, other=0.0)[None, :]
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
        _cast_out(out, out_ptr, INTERPRET),
        mask=m_mask[:, None] & n_mask[None, :],
    )


# -- autotuning ------------------------------------------------------------------------------------------------------
def _config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# Ampere (sm80/sm86/sm89): int8 mma.sync with K = 32 per instruction; 64-deep K tiles, 3-4 pipeline stages.
SM80_CONFIGS = [
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 128, 64, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(64, 32, 64, 2, 5),
]
# Hopper (sm90): wgmma int8 with K = 32; deeper K tiles (128) and larger tiles with 8 warps.
SM90_CONFIGS = [
    _config(128, 256, 128, 8, 3),
    _config(256, 128, 128, 8, 3),
    _config(128, 128, 128, 8, 4),
    _config(128, 128, 64, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(32, 64, 128, 4, 4),
]
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "group_k", "IS_CONV", "BITS", "HAS_BIAS"]


def _prune(configs, named_args, **kwargs):
    """Drop configurations whose K tile is deeper than a weight group (their tail would be mostly masked)."""
    depth = max(32, triton.next_power_of_2(int(named_args["group_k"])))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= depth]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_K"])]


if INTERPRET:
    _TUNED = {}
else:
    _TUNED = {
        arch: triton.autotune(configs=configs, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
            int_gemm_kernel
        )
        for arch, configs in (("sm80", SM80_CONFIGS), ("sm90", SM90_CONFIGS))
    }


def _tuned_kernel(device: torch.device):
    major, _ = torch.cuda.get_device_capability(device)
    return _TUNED["sm90" if major >= 9 else "sm80"]


# -- launchers -------------------------------------------------------------------------------------------------------
def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``int8`` codes of ``x`` (``numel > 0``; contiguous or channels-last) with per-sample ``scale``/``zero_point``
    (float32, one per sample of dim 0, or a single one for all).  The output has the strides of ``x``."""
    batch = scale.numel()
    inner = x.numel() // batch
    out = torch.empty_like(x, dtype=torch.int8)
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(max(inner, 1))))
    chunks = triton.cdiv(inner, block)
    quantize_codes_kernel[(batch * chunks,)](
        x,
        out,
        scale,
        zero_point,
        inner,
        chunks,
        float(qmin),
        float(qmax),
        BLOCK=block,
        INTERPRET=INTERPRET,
        num_warps=4,
    )
    return out


def gemm(
    a: torch.Tensor,
    packed: torch.Tensor,
    bits: int,
    row_scale: torch.Tensor,
    row_zp: torch.Tensor,
    w_scale: torch.Tensor,
    w_rowsum: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    m: int,
    n: int,
    k: int,
    rows_per_sample: int,
    conv: dict | None = None,
) -> torch.Tensor:
    """Launch ``int_gemm_kernel`` writing ``out`` (M, N).  ``conv`` holds the geometry of an implicit-GEMM
    convolution (``a`` is then the (B, C, H, W) code tensor)."""
    n_groups = w_scale.shape[1]
    group_k = k // n_groups
    if conv is None:
        conv_args = (0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1)
        a_strides = (a.stride(0), a.stride(1))
        kh = kw = 1
    else:
        conv_args = (
            *a.stride(),
            a.shape[2],
            a.shape[3],
            conv["ow"],
            *conv["stride"],
            *conv["padding"],
            *conv["dilation"],
        )
        a_strides = (0, 0)
        kh, kw = conv["kernel_size"]
    args = (
        a,
        packed,
        out,
        row_scale,
        row_zp,
        w_scale,
        w_rowsum,
        w_scale if bias is None else bias,
        m,
        n,
        k,
        rows_per_sample,
        group_k,
        n_groups,
        *a_strides,
        *conv_args,
        packed.stride(0),
        packed.stride(1),
        out.stride(0),
        out.stride(1),
        triton.next_power_of_2(max(m, 1)),
    )
    flags = {
        "KH": kh,
        "KW": kw,
        "HAS_BIAS": bias is not None,
        "IS_CONV": conv is not None,
        "BITS": bits,
        "INTERPRET": INTERPRET,
    }
    if INTERPRET:
        grid = (triton.cdiv(m, INTERPRET_CONFIG["BLOCK_M"]) * triton.cdiv(n, INTERPRET_CONFIG["BLOCK_N"]),)
        int_gemm_kernel[grid](*args, **flags, **INTERPRET_CONFIG)
    else:

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _tuned_kernel(a.device)[grid](*args, **flags)
    return out
