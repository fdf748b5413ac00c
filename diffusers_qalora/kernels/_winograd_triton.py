"""``@triton.jit`` kernels of `diffusers_qalora.kernels.winograd` (imported only through
`diffusers_qalora.kernels._build.load_kernel_module`, so ``TRITON_INTERPRET`` is read when they are decorated).

* `input_codes_kernel`: tile gather (zero padding included), input transform ``V = B^T d B`` as one product with the
  Kronecker matrix, dynamic absmax step per (position or tile, tile, channel group) and int8 codes;
* `position_gemm_kernel`: the ``n^2`` int8 x int8 -> int32 GEMMs, one channel group at a time, each group's sum
  scaled by its two steps and added in fp32 (the dequantize epilogue);
* `output_transform_kernel`: optional re-quantization of ``M`` per (tile, output channel), output transform
  ``Y = A^T M A``, bias, crop and the store into ``(N, K, H_o, W_o)``.

The maths and the tolerances are described in `diffusers_qalora.kernels.winograd`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _triton_helpers
from ._triton_helpers import device_function, reduce_max, round_half_even

# Read by the launchers (`kernels.INTERPRET`) to pick the interpreter-friendly code paths.
INTERPRET = _triton_helpers.INTERPRET

cdiv = triton.cdiv


@device_function
def _transformed_chunk(
    x_ptr,
    kb_ptr,
    t0,
    c_lo,
    c_stop,
    H,
    W,
    TH,
    TW,
    P,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    PAD_H,
    PAD_W,
    M_TILE: tl.constexpr,
    N_TILE: tl.constexpr,
    NN_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # V for BLOCK_T tiles x BLOCK_C channels (rows, tile-major) and the n^2 positions (columns, padded to NN_PAD).
    rows = tl.arange(0, BLOCK_T * BLOCK_C)
    t = t0 + rows // BLOCK_C
    c = c_lo + rows % BLOCK_C
    row_ok = (t < P) & (c < c_stop)
    b = t // (TH * TW)
    th = (t // TW) % TH
    tw = t % TW
    q = tl.arange(0, NN_PAD)
    i = q // N_TILE
    j = q % N_TILE
    h = th[:, None] * M_TILE + i[None, :] - PAD_H
    w = tw[:, None] * M_TILE + j[None, :] - PAD_W
    ok = row_ok[:, None] & (q[None, :] < N_TILE * N_TILE) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    d = tl.load(
        x_ptr + b[:, None].to(tl.int64) * stride_xn + c[:, None] * stride_xc + h * stride_xh + w * stride_xw,
        mask=ok,
        other=0.0,
    ).to(tl.float32)
    kb = tl.load(kb_ptr + q[:, None] * NN_PAD + q[None, :])  # (B^T kron B^T)^T, zero-padded
    return tl.dot(d, kb, input_precision="ieee"), rows, t, c, row_ok, q


@triton.jit
def input_codes_kernel(
    x_ptr,  # (N, C, H, W), any strides, fp16/bf16/fp32
    kb_ptr,  # (NN_PAD, NN_PAD) fp32: (B^T kron B^T)^T
    codes_ptr,  # (n^2, P, C) int8 out
    steps_ptr,  # (n^2, P, G) fp32 out
    C,
    H,
    W,
    TH,
    TW,
    P,
    GROUP,  # channels, input size, tile grid, tiles, channels per group
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    PAD_H,
    PAD_W,
    QMIN,
    QMAX,
    M_TILE: tl.constexpr,
    N_TILE: tl.constexpr,
    NN_PAD: tl.constexpr,
    PER_POSITION: tl.constexpr,  # one step per (position, tile, group); else per (tile, group)
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    groups = tl.num_programs(1)
    t0 = pid_t * BLOCK_T
    c_start = g * GROUP
    c_stop = c_start + GROUP
    # Pass 1: the group's absmax per (tile, position), the transform recomputed in pass 2 rather than stored.
    amax = tl.full((BLOCK_T, NN_PAD), 0.0, tl.float32)
    for c_lo in range(c_start, c_stop, BLOCK_C):
        v, rows, t, c, row_ok, q = _transformed_chunk(
            x_ptr,
            kb_ptr,
            t0,
            c_lo,
            c_stop,
            H,
            W,
            TH,
            TW,
            P,
            stride_xn,
            stride_xc,
            stride_xh,
            stride_xw,
            PAD_H,
            PAD_W,
            M_TILE,
            N_TILE,
            NN_PAD,
            BLOCK_T,
            BLOCK_C,
        )
        amax = tl.maximum(amax, reduce_max(tl.reshape(tl.abs(v), (BLOCK_T, BLOCK_C, NN_PAD)), 1, INTERPRET))
    if not PER_POSITION:
        q_ok = tl.arange(0, NN_PAD) < N_TILE * N_TILE
        amax = reduce_max(tl.where(q_ok[None, :], amax, 0.0), 1, INTERPRET)[:, None] + tl.full(
            (BLOCK_T, NN_PAD), 0.0, tl.float32
        )
    step = tl.maximum(amax / QMAX, 1e-30)
    tiles = t0 + tl.arange(0, BLOCK_T)
    qs = tl.arange(0, NN_PAD)
    tl.store(
        steps_ptr + qs[None, :].to(tl.int64) * P * groups + tiles[:, None] * groups + g,
        step,
        mask=(tiles[:, None] < P) & (qs[None, :] < N_TILE * N_TILE),
    )
    # Pass 2: codes = clamp(round(V / step)).
    for c_lo in range(c_start, c_stop, BLOCK_C):
        v, rows, t, c, row_ok, q = _transformed_chunk(
            x_ptr,
            kb_ptr,
            t0,
            c_lo,
            c_stop,
            H,
            W,
            TH,
            TW,
            P,
            stride_xn,
            stride_xc,
            stride_xh,
            stride_xw,
            PAD_H,
            PAD_W,
            M_TILE,
            N_TILE,
            NN_PAD,
            BLOCK_T,
            BLOCK_C,
        )
        row_step = tl.reshape(
            tl.broadcast_to(step[:, None, :], (BLOCK_T, BLOCK_C, NN_PAD)), (BLOCK_T * BLOCK_C, NN_PAD)
        )
        codes = tl.clamp(round_half_even(tl.div_rn(v, row_step)), QMIN, QMAX)
        tl.store(
            codes_ptr + q[None, :].to(tl.int64) * P * C + t[:, None].to(tl.int64) * C + c[:, None],
            codes.to(tl.int8),
            mask=row_ok[:, None] & (q[None, :] < N_TILE * N_TILE),
        )


@triton.jit
def position_gemm_kernel(
    a_ptr,  # (n^2, P, C) int8: input codes
    b_ptr,  # (n^2, C, K) int8: weight codes
    sa_ptr,  # (n^2, P, G) fp32: input steps
    sb_ptr,  # (n^2, G, K) fp32: weight steps
    out_ptr,  # (n^2, P, K) fp32: M
    P,
    C,
    K,
    GROUP,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    xi = tl.program_id(2).to(tl.int64)
    groups = C // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + xi * P * C
    b_base = b_ptr + xi * C * K
    out = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for g in range(0, groups):
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        for k0 in range(0, GROUP, BLOCK_K):
            ks = g * GROUP + k0 + offs_k
            k_ok = (k0 + offs_k) < GROUP
            a = tl.load(
                a_base + offs_m[:, None].to(tl.int64) * C + ks[None, :],
                mask=(offs_m[:, None] < P) & k_ok[None, :],
                other=0,
            )
            b = tl.load(
                b_base + ks[:, None].to(tl.int64) * K + offs_n[None, :],
                mask=k_ok[:, None] & (offs_n[None, :] < K),
                other=0,
            )
            acc += tl.dot(a, b)
        sa = tl.load(sa_ptr + xi * P * groups + offs_m * groups + g, mask=offs_m < P, other=0.0)
        sb = tl.load(sb_ptr + xi * groups * K + g * K + offs_n, mask=offs_n < K, other=0.0)
        out += (acc.to(tl.float32) * sb[None, :]) * sa[:, None]  # the reference's order: (acc * s_U) * s_V
    tl.store(
        out_ptr + xi * P * K + offs_m[:, None].to(tl.int64) * K + offs_n[None, :],
        out,
        mask=(offs_m[:, None] < P) & (offs_n[None, :] < K),
    )


@triton.jit
def output_transform_kernel(
    m_ptr,  # (n^2, P, K) fp32
    ka_ptr,  # (NN_PAD, MM_PAD) fp32: (A^T kron A^T)^T, zero-padded
    bias_ptr,  # (K,) fp32 (HAS_BIAS)
    y_ptr,  # (N, K, H_o, W_o) out
    P,
    K,
    TH,
    TW,
    OUT_H,
    OUT_W,
    stride_yn,
    stride_yk,
    stride_yh,
    stride_yw,
    QMIN,
    QMAX,
    M_TILE: tl.constexpr,
    N_TILE: tl.constexpr,
    NN_PAD: tl.constexpr,
    MM_PAD: tl.constexpr,
    REQUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_T * BLOCK_K)
    t = tl.program_id(0) * BLOCK_T + rows // BLOCK_K
    k = tl.program_id(1) * BLOCK_K + rows % BLOCK_K
    row_ok = (t < P) & (k < K)
    q = tl.arange(0, NN_PAD)
    q_ok = q < N_TILE * N_TILE
    mv = tl.load(
        m_ptr + q[None, :].to(tl.int64) * P * K + t[:, None].to(tl.int64) * K + k[:, None],
        mask=row_ok[:, None] & q_ok[None, :],
        other=0.0,
    )
    if REQUANT:
        # One dynamic step per (tile, output channel) over the n^2 positions: an integer output transform.
        step = tl.maximum(reduce_max(tl.abs(mv), 1, INTERPRET) / QMAX, 1e-30)
        mv = tl.clamp(round_half_even(tl.div_rn(mv, step[:, None])), QMIN, QMAX) * step[:, None]
    ka = tl.load(ka_ptr + q[:, None] * MM_PAD + tl.arange(0, MM_PAD)[None, :])
    y = tl.dot(mv, ka, input_precision="ieee")  # (rows, MM_PAD)
    if HAS_BIAS:
        y += tl.load(bias_ptr + k, mask=k < K, other=0.0)[:, None]
    o = tl.arange(0, MM_PAD)
    oh = (t // TW) % TH
    ow = t % TW
    b = t // (TH * TW)
    hh = oh[:, None] * M_TILE + (o // M_TILE)[None, :]
    ww = ow[:, None] * M_TILE + (o % M_TILE)[None, :]
    ok = row_ok[:, None] & (o[None, :] < M_TILE * M_TILE) & (hh < OUT_H) & (ww < OUT_W)
    tl.store(
        y_ptr + b[:, None].to(tl.int64) * stride_yn + k[:, None] * stride_yk + hh * stride_yh + ww * stride_yw,
        y.to(y_ptr.dtype.element_ty),
        mask=ok,
    )
