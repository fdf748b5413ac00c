"""Triton kernels of the fused fake quantization (imported lazily by `diffusers_qalora.kernels._build`).

Layout shared by both kernels: the input is contiguous and split into *segments* of ``inner`` consecutive elements;
segment ``s`` uses the step size (and zero point) number ``p = s % n_params``, or ``index[s % n_params]`` when an
index is given (the per-sample timestep gather).  A program handles a tile of ``ROWS`` segments x ``BLOCK``
elements: one long segment is split into ``chunks`` tiles of one row, and many short ones (per-channel weights,
whose rows are a few hundred elements) share a tile, so no program is mostly masked.  The backward kernel writes one
partial sum per (segment, chunk) and parameter gradient (no atomics): the caller adds them in a fixed order, so the
results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._triton_helpers import INTERPRET, device_function, reduce_sum

# Elements per program.  Interpreted programs cost about the same whatever their size, so there they are large.
TILE = 16384 if INTERPRET else 2048


@device_function
def _rint(v, INTERPRET: tl.constexpr):
    """Round half to even (``torch.round``).  The interpreter has no libdevice: there, adding and subtracting
    1.5 * 2**23 rounds in the float addition itself, which is exact for |v| < 2**22 (callers clamp first)."""
    if INTERPRET:
        return (v + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(v)


@device_function
def _cast_out(v, ptr, INTERPRET: tl.constexpr):
    """``v`` (float32) in the element type of ``ptr``, rounded to nearest even as torch's casts do.  The interpreter
    truncates float32 to bfloat16, so there the rounding is done on the bits first (the cast is then exact)."""
    if INTERPRET:  # noqa: SIM102  (two constexpr tests kept apart: simplest for the Triton compiler)
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@device_function
def _tile(
    pid,
    step_ptr,
    zp_ptr,
    index_ptr,
    segments,
    inner,
    n_params,
    chunks,
    qmin,
    qmax,
    HAS_ZP: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Segments, element offsets, mask, and per-row step size and code bounds ``[qmin - z, qmax - z]`` of program
    ``pid``."""
    row_block = pid // chunks
    chunk = pid - row_block * chunks
    seg = row_block * ROWS + tl.arange(0, ROWS)
    row_mask = seg < segments
    seg = tl.where(row_mask, seg, 0)
    p = seg % n_params
    if HAS_INDEX:
        p = tl.load(index_ptr + p)
    s = tl.load(step_ptr + p).to(tl.float32)
    lo = tl.full((ROWS,), qmin, tl.float32)  # float32 arguments: an int equal to 1 would become a constant
    hi = tl.full((ROWS,), qmax, tl.float32)
    if HAS_ZP:
        z = _rint(tl.load(zp_ptr + p).to(tl.float32), INTERPRET)
        lo = lo - z
        hi = hi - z
    local = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (local < inner)[None, :]
    offs = seg.to(tl.int64)[:, None] * inner + local[None, :]
    return seg, chunk, offs, mask, row_mask, s, lo, hi


@triton.jit
def fake_quant_fwd_kernel(
    x_ptr,  # input, contiguous, any float dtype
    out_ptr,  # output, contiguous, dtype of the input
    step_ptr,  # step sizes (n_params, or the table that index_ptr points into)
    zp_ptr,  # zero points, same layout as the step sizes (unused without HAS_ZP)
    index_ptr,  # int32 table index per parameter slot (unused without HAS_INDEX)
    segments,  # numel // inner
    inner,  # elements per segment
    n_params,  # segment s uses parameter slot s % n_params
    chunks,  # programs per row block, cdiv(inner, BLOCK)
    qmin,
    qmax,  # integer code range, as float32
    HAS_ZP: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    seg, chunk, offs, mask, row_mask, s_row, lo, hi = _tile(
        pid,
        step_ptr,
        zp_ptr,
        index_ptr,
        segments,
        inner,
        n_params,
        chunks,
        qmin,
        qmax,
        HAS_ZP,
        HAS_INDEX,
        ROWS,
        BLOCK,
        INTERPRET,
    )
    s = s_row[:, None]
    lo = lo[:, None]
    hi = hi[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(x, s)  # IEEE division, as torch's x / s (a plain `/` may be approximate on the GPU)
    # clamp(round(v), lo, hi) == clamp(round(clamp(v, lo - 1, hi + 1)), lo, hi), and the inner clamp keeps the
    # rounding trick of the interpreter in its exact range.
    c = _rint(tl.minimum(tl.maximum(v, lo - 1.0), hi + 1.0), INTERPRET)
    c = tl.minimum(tl.maximum(c, lo), hi)
    tl.store(out_ptr + offs, _cast_out(c * s, out_ptr, INTERPRET), mask=mask)


@triton.jit
def fake_quant_bwd_kernel(
    x_ptr,  # forward input, contiguous
    grad_ptr,  # gradient of the output, contiguous
    grad_x_ptr,  # gradient of the input (written if NEED_X)
    step_ptr,
    zp_ptr,
    index_ptr,
    part_step_ptr,  # float32 (segments, chunks): partial sums of d out / d step (written if NEED_STEP)
    part_zp_ptr,  # float32 (segments, chunks): partial sums of d out / d zero point (written if NEED_ZP)
    segments,
    inner,
    n_params,
    chunks,
    qmin,
    qmax,
    HAS_ZP: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_STEP: tl.constexpr,
    NEED_ZP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    seg, chunk, offs, mask, row_mask, s_row, lo, hi = _tile(
        pid,
        step_ptr,
        zp_ptr,
        index_ptr,
        segments,
        inner,
        n_params,
        chunks,
        qmin,
        qmax,
        HAS_ZP,
        HAS_INDEX,
        ROWS,
        BLOCK,
        INTERPRET,
    )
    s = s_row[:, None]
    lo = lo[:, None]
    hi = hi[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # masked lanes contribute nothing
    v = tl.div_rn(x, s)
    r = _rint(tl.minimum(tl.maximum(v, lo - 1.0), hi + 1.0), INTERPRET)
    inside = (r >= lo) & (r <= hi)
    part = seg * chunks + chunk
    if NEED_X:
        # Straight-through inside the clipping range, zero outside.
        tl.store(grad_x_ptr + offs, tl.where(inside, g, 0.0).to(grad_x_ptr.dtype.element_ty), mask=mask)
    if NEED_STEP:
        # LSQ: round(v) - v inside, the clipped code (qmin - z or qmax - z) outside.
        d_step = tl.where(inside, r - v, tl.minimum(tl.maximum(r, lo), hi))
        tl.store(part_step_ptr + part, reduce_sum(d_step * g, 1, INTERPRET), mask=row_mask)
    if NEED_ZP:
        # The zero point only moves clipped values: d out / d z = -s there.
        clipped = tl.where(inside, 0.0, g)
        tl.store(part_zp_ptr + part, -reduce_sum(clipped, 1, INTERPRET) * s_row, mask=row_mask)


def _tiling(numel: int, inner: int) -> tuple[int, int, int, int, int]:
    """``(segments, rows, block, chunks, programs)`` for ``numel`` elements in segments of ``inner``."""
    segments = numel // inner
    block = max(16, min(TILE, triton.next_power_of_2(inner)))
    rows = max(1, min(TILE // block, triton.next_power_of_2(segments)))
    chunks = triton.cdiv(inner, block)
    return segments, rows, block, chunks, triton.cdiv(segments, rows) * chunks


def forward(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    index: torch.Tensor | None,
    inner: int,
    n_params: int,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """Launch the forward kernel on contiguous ``x`` (``numel > 0``); returns the output in ``x.dtype``."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    segments, rows, block, chunks, programs = _tiling(x.numel(), inner)
    fake_quant_fwd_kernel[(programs,)](
        x,
        out,
        step,
        step if zero_point is None else zero_point,
        step if index is None else index,
        segments,
        inner,
        n_params,
        chunks,
        float(qmin),
        float(qmax),
        HAS_ZP=zero_point is not None,
        HAS_INDEX=index is not None,
        ROWS=rows,
        BLOCK=block,
        INTERPRET=INTERPRET,
        num_warps=4,
    )
    return out


def backward(
    x: torch.Tensor,
    grad: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    index: torch.Tensor | None,
    inner: int,
    n_params: int,
    qmin: int,
    qmax: int,
    need_x: bool,
    need_step: bool,
    need_zp: bool,
):
    """Launch the backward kernel; returns ``(grad_x or None, step partials or None, zero-point partials or None)``
    where the partials have shape ``(segments, chunks)`` (float32)."""
    segments, rows, block, chunks, programs = _tiling(x.numel(), inner)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    part_step = torch.empty(segments, chunks, device=x.device, dtype=torch.float32) if need_step else None
    part_zp = torch.empty(segments, chunks, device=x.device, dtype=torch.float32) if need_zp else None
    dummy = x  # never read or written when its flag is off
    fake_quant_bwd_kernel[(programs,)](
        x,
        grad,
        dummy if grad_x is None else grad_x,
        step,
        step if zero_point is None else zero_point,
        step if index is None else index,
        dummy if part_step is None else part_step,
        dummy if part_zp is None else part_zp,
        segments,
        inner,
        n_params,
        chunks,
        float(qmin),
        float(qmax),
        HAS_ZP=zero_point is not None,
        HAS_INDEX=index is not None,
        NEED_X=need_x,
        NEED_STEP=need_step,
        NEED_ZP=need_zp,
        ROWS=rows,
        BLOCK=block,
        INTERPRET=INTERPRET,
        num_warps=4,
    )
    return grad_x, part_step, part_zp
