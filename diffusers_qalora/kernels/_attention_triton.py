"""``@triton.jit`` kernels of `diffusers_qalora.kernels.attention` (imported only through
`diffusers_qalora.kernels._build.load_kernel_module`, so ``TRITON_INTERPRET`` is read when they are decorated).

* `codes_kernel`: integer codes minus zero point of one attention operand, stored as exact float16 integers;
* `attention_kernel`: online-softmax attention on those codes, with the optional two-pass softmax quantization.

The maths and the tolerances are described in `diffusers_qalora.kernels.attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _triton_helpers
from ._triton_helpers import device_function, reduce_max, reduce_sum, round_half_even

# Read by the launchers (`kernels.INTERPRET`) to pick the interpreter-friendly code paths.
INTERPRET = _triton_helpers.INTERPRET

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
cdiv = triton.cdiv


@triton.jit
def codes_kernel(
    x_ptr,
    out_ptr,
    step_ptr,
    zp_ptr,
    H,
    N,
    D,  # heads, tokens, head_dim of x: (B, H, N, D)
    stride_xb,
    stride_xh,
    stride_xn,
    stride_xd,
    qmin,
    qmax,  # code range (floats holding integers)
    HAS_ZP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per BLOCK elements of one sample; out is contiguous (B, H, N, D) float16.
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = H * N * D
    valid = offs < total
    d = offs % D
    n = (offs // D) % N
    h = offs // (N * D)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + n * stride_xn + d * stride_xd, mask=valid, other=0.0)
    step = tl.load(step_ptr + b)
    r = round_half_even(tl.div_rn(x.to(tl.float32), step))
    if HAS_ZP:
        z = tl.load(zp_ptr + b)
        c = tl.clamp(r + z, qmin, qmax) - z
    else:
        c = tl.clamp(r, qmin, qmax)
    tl.store(out_ptr + b.to(tl.int64) * total + offs, c.to(tl.float16), mask=valid)


@device_function
def _scores(
    q,
    k_base,
    m_base,
    offs_m,
    offs_d,
    cols,
    N_Q,
    N_K,
    D,
    stride_kn,
    stride_kd,
    stride_mm,
    stride_mn,
    qk_scale,
    HAS_MASK: tl.constexpr,
    QK_DTYPE: tl.constexpr,
    QK_IEEE: tl.constexpr,
):
    """Scaled (and masked) scores of the queries ``q`` against the key block ``cols``; columns past ``N_K`` are
    ``-inf``.  Both passes of `attention_kernel` compute them the same way."""
    kt = tl.load(
        k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=(cols[None, :] < N_K) & (offs_d[:, None] < D),
        other=0.0,
    ).to(QK_DTYPE)
    if QK_IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt, out_dtype=tl.float32)
    s = s * qk_scale
    if HAS_MASK:
        s += tl.load(
            m_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn,
            mask=(offs_m[:, None] < N_Q) & (cols[None, :] < N_K),
            other=0.0,
        ).to(tl.float32)
    return tl.where(cols[None, :] < N_K, s, float("-inf"))


@triton.jit
def attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    mask_ptr,
    qk_scale_ptr,  # (B,) s_q * s_k * scale (1 for an unquantized operand)
    v_scale_ptr,  # (B,) s_v (1 if v is not quantized)
    p_step_ptr,
    p_zp_ptr,  # (B,) softmax-output step and zero point (QUANT_P only)
    p_qmin,
    p_qmax,
    H,
    N_Q,
    N_K,
    D,
    DV,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,  # additive mask, 0 strides where it broadcasts
    HAS_MASK: tl.constexpr,
    QUANT_P: tl.constexpr,
    INTERPRET: tl.constexpr,
    QK_DTYPE: tl.constexpr,
    PV_DTYPE: tl.constexpr,  # operand dtypes of the two products
    QK_IEEE: tl.constexpr,
    PV_IEEE: tl.constexpr,  # fp32 operands: IEEE products (not TF32)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    m_base = mask_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < D),
        other=0.0,
    ).to(QK_DTYPE)
    qk_scale = tl.load(qk_scale_ptr + b)
    v_scale = tl.load(v_scale_ptr + b)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_DV), 0.0, tl.float32)
    # Pass 1 (QUANT_P: row max and sum only; otherwise the whole online softmax).
    for start in range(0, N_K, BLOCK_N):
        cols = start + offs_n
        s = _scores(
            q,
            k_base,
            m_base,
            offs_m,
            offs_d,
            cols,
            N_Q,
            N_K,
            D,
            stride_kn,
            stride_kd,
            stride_mm,
            stride_mn,
            qk_scale,
            HAS_MASK,
            QK_DTYPE,
            QK_IEEE,
        )
        m_new = tl.maximum(m_i, reduce_max(s, 1, INTERPRET))
        # A row whose keys so far are all masked (-inf) keeps m = -inf; exp against 0 keeps it NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + reduce_sum(p, 1, INTERPRET)
        if not QUANT_P:
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(cols[:, None] < N_K) & (offs_dv[None, :] < DV),
                other=0.0,
            ).to(PV_DTYPE)
            if PV_IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(PV_DTYPE), v, out_dtype=tl.float32)
            acc = acc * alpha[:, None] + pv
        m_i = m_new
    if QUANT_P:
        # Pass 2: normalised probabilities, their codes, and the exact code product with v.
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        p_step = tl.load(p_step_ptr + b)
        p_zp = tl.load(p_zp_ptr + b)
        for start in range(0, N_K, BLOCK_N):
            cols = start + offs_n
            s = _scores(
                q,
                k_base,
                m_base,
                offs_m,
                offs_d,
                cols,
                N_Q,
                N_K,
                D,
                stride_kn,
                stride_kd,
                stride_mm,
                stride_mn,
                qk_scale,
                HAS_MASK,
                QK_DTYPE,
                QK_IEEE,
            )
            p = tl.exp(s - m_safe[:, None]) / l_i[:, None]
            c = tl.clamp(round_half_even(tl.div_rn(p, p_step)) + p_zp, p_qmin, p_qmax) - p_zp
            c = tl.where(cols[None, :] < N_K, c, 0.0)
            v = tl.load(
                v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(cols[:, None] < N_K) & (offs_dv[None, :] < DV),
                other=0.0,
            ).to(PV_DTYPE)
            if PV_IEEE:
                acc += tl.dot(c, v, input_precision="ieee")
            else:
                acc += tl.dot(c.to(PV_DTYPE), v, out_dtype=tl.float32)
        out = acc * (p_step * v_scale)
    else:
        out = acc * v_scale / l_i[:, None]
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < N_Q) & (offs_dv[None, :] < DV),
    )
