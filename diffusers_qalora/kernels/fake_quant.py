"""Fused fake quantization with LSQ gradients: one Triton kernel for the forward pass, one for the backward pass.

The maths is that of [fake_quantize][diffusers_qalora.quant.fake_quantize] (which is the torch reference):

    x_hat = s * clamp(round(x / s), qmin - z, qmax - z)          (z = round(zero_point), 0 if symmetric)

    d x_hat / d x = 1 inside the clipping range, 0 outside       (straight-through estimator)
    d x_hat / d s = round(x / s) - x / s inside, qmin - z or qmax - z outside        (LSQ)
    d x_hat / d z = 0 inside, -s outside

with the step and zero-point gradients multiplied by ``grad_scale`` and summed over the elements that share a step.
Rounding is half to even (``torch.round``).  The kernels compute in float32 and return the input's dtype: for
float16/bfloat16 inputs the reference is ``fake_quantize`` on float32 copies, cast back (what the quantizer modules
of `diffusers_qalora.quant` do).

Step sizes may be per tensor, per channel (a step of shape ``(C, 1, ...)`` or ``(1, C, 1, 1)``), per group (the
``(C_out, G, 1)`` steps of a grouped weight view), or per sample (``(B, 1, ...)``, the interpolated per-timestep steps
of a batch); [fake_quantize_by_index][diffusers_qalora.kernels.fake_quantize_by_index] gathers each sample's step from a timestep table inside the kernel.  Any
step shape whose non-1 dims are not adjacent in ``x`` runs the torch reference.
"""

from __future__ import annotations

import math

import torch

from ..quant.primitives import fake_quantize
from ._build import load_kernel_module

__all__ = ["fake_quantize_by_index", "fake_quantize_reference", "fused_fake_quantize", "param_layout"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fake_quantize_reference(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """The torch reference of [fused_fake_quantize][diffusers_qalora.kernels.fused_fake_quantize] (same signature): `quant.fake_quantize` in float32 for
    float16/bfloat16 inputs (cast back to the input's dtype), as is for float32 / float64."""
    if x.dtype in (torch.float16, torch.bfloat16):
        zp = None if zero_point is None else zero_point.float()
        return fake_quantize(x.float(), step.float(), zp, qmin, qmax, grad_scale).to(x.dtype)
    return fake_quantize(x, step, zero_point, qmin, qmax, grad_scale)


def param_layout(
    x_shape: torch.Size | tuple[int, ...], param_shape: torch.Size | tuple[int, ...]
) -> tuple[int, int] | None:
    """``(n_params, inner)`` such that element ``i`` of a contiguous ``x`` (row-major) uses parameter
    ``(i // inner) % n_params`` of a contiguous parameter tensor broadcasting to ``x``; ``None`` when the parameter's
    non-1 dims are not adjacent (or it does not broadcast to ``x`` without growing it)."""
    nd = len(x_shape)
    if len(param_shape) > nd:
        if any(int(s) != 1 for s in param_shape[: len(param_shape) - nd]):
            return None
        param_shape = param_shape[len(param_shape) - nd :]
    p = (1,) * (nd - len(param_shape)) + tuple(int(s) for s in param_shape)
    dims = [i for i in range(nd) if p[i] != 1]
    if not dims:
        return 1, max(math.prod(x_shape), 1)
    first, last = dims[0], dims[-1]
    if any(p[i] != x_shape[i] for i in range(first, last + 1)):
        return None
    return math.prod(x_shape[first : last + 1]), math.prod(x_shape[last + 1 :])


def _kernels():
    return load_kernel_module("_fake_quant_triton")


class _FusedFakeQuantize(torch.autograd.Function):
    """Autograd wrapper of the two kernels.  Saves the input (not ``x / s``): the backward kernel recomputes it."""

    @staticmethod
    def forward(ctx, x, step, zero_point, index, qmin, qmax, grad_scale, n_params, inner):
        kernels = _kernels()
        x_c = x.contiguous()
        step_c = step.detach().contiguous()
        zp_c = None if zero_point is None else zero_point.detach().contiguous()
        out = kernels.forward(x_c, step_c, zp_c, index, inner, n_params, qmin, qmax)
        ctx.save_for_backward(x_c, step_c, zp_c, index)
        ctx.settings = (
            qmin,
            qmax,
            grad_scale,
            n_params,
            inner,
            x.shape,
            step.shape,
            None if zero_point is None else zero_point.shape,
        )
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, step, zero_point, index = ctx.saved_tensors
        qmin, qmax, grad_scale, n_params, inner, x_shape, step_shape, zp_shape = ctx.settings
        need_x, need_step, need_zp = ctx.needs_input_grad[:3]
        grad_x, part_step, part_zp = _kernels().backward(
            x,
            grad.contiguous(),
            step,
            zero_point,
            index,
            inner,
            n_params,
            qmin,
            qmax,
            need_x,
            need_step,
            need_zp and zero_point is not None,
        )
        grad_step = grad_zp = None
        if part_step is not None:
            grad_step = _reduce_partials(part_step, n_params, index, step.numel(), grad_scale)
            grad_step = grad_step.reshape(step_shape).to(step.dtype)
        if part_zp is not None:
            grad_zp = _reduce_partials(part_zp, n_params, index, zero_point.numel(), grad_scale)
            grad_zp = grad_zp.reshape(zp_shape).to(zero_point.dtype)
        grad_x = None if grad_x is None else grad_x.view(x_shape)
        return (grad_x, grad_step, grad_zp) + (None,) * 6


def _reduce_partials(
    partials: torch.Tensor, n_params: int, index: torch.Tensor | None, size: int, grad_scale: float
) -> torch.Tensor:
    """Per-program partial sums ``(segments, chunks)`` -> one gradient per parameter (fixed summation order)."""
    per_segment = partials.sum(dim=1)
    per_slot = per_segment.view(-1, n_params).sum(dim=0)
    if index is not None:
        # Table entry t receives the sum over the slots that gathered it.  A one-hot product rather than index_add_,
        # whose CUDA atomics would make the order (and the last bits) vary between runs.
        table = torch.arange(size, device=index.device).unsqueeze(1)
        per_slot = (table == index.long().unsqueeze(0)).to(per_slot.dtype) @ per_slot
    return per_slot * grad_scale


def _prepare(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | None) -> tuple[int, int] | None:
    """The kernel layout ``(n_params, inner)``, or ``None`` if this call must run the torch reference."""
    if x.dtype not in _KERNEL_DTYPES or step.dtype not in _KERNEL_DTYPES:
        return None
    if zero_point is not None and (zero_point.shape != step.shape or zero_point.dtype not in _KERNEL_DTYPES):
        return None
    if step.device != x.device or (zero_point is not None and zero_point.device != x.device):
        return None
    layout = param_layout(x.shape, step.shape)
    if layout is None or layout[0] != step.numel():
        return None
    return layout


def _tracked(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused_fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize ``x`` with the Triton kernels (LSQ gradients); same signature and numbers as
    [fake_quantize_reference][diffusers_qalora.kernels.fake_quantize_reference].

    Args:
        x (`torch.Tensor`): float32, float16 or bfloat16 values, any shape (a CUDA tensor, or a CPU tensor under the
            Triton interpreter).
        step (`torch.Tensor`): positive step sizes broadcasting to ``x`` (per tensor, channel, group or sample).
        zero_point (`torch.Tensor`, *optional*): zero points of the shape of ``step`` (rounded in the forward pass);
            ``None`` for symmetric quantization.
        qmin (`int`): the lowest integer code.
        qmax (`int`): the highest integer code.
        grad_scale (`float`, defaults to `1.0`): LSQ gradient scale of the step and zero-point gradients.

    Returns:
        `torch.Tensor`: ``x_hat`` with the shape and dtype of ``x`` (contiguous).
    """
    layout = _prepare(x, step, zero_point)
    if layout is None:
        return fake_quantize_reference(x, step, zero_point, qmin, qmax, grad_scale)
    if x.numel() == 0:
        return fake_quantize_reference(x, step, zero_point, qmin, qmax, grad_scale)
    n_params, inner = layout
    if not _tracked(x, step, zero_point):
        zp = None if zero_point is None else zero_point.detach().contiguous()
        out = _kernels().forward(
            x.detach().contiguous(), step.detach().contiguous(), zp, None, inner, n_params, qmin, qmax
        )
        return out.view(x.shape)
    return _FusedFakeQuantize.apply(x, step, zero_point, None, qmin, qmax, grad_scale, n_params, inner)


# Callers that cast float16/bfloat16 inputs to float32 for the torch path may skip the cast: the kernel computes in
# float32 itself (see `TemporalActQuantizer.forward`).
fused_fake_quantize.computes_in_float32 = True


def fake_quantize_by_index(
    x: torch.Tensor,
    step_table: torch.Tensor,
    zero_point_table: torch.Tensor | None,
    index: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Per-sample fake quantization with the step size gathered inside the kernel: sample ``b`` of ``x`` uses
    ``step_table[index[b]]`` (and ``zero_point_table[index[b]]``).

    Gradients reach the tables: each entry receives the sum over the samples that used it (entries no sample used get
    zero).  The torch reference is ``fake_quantize_reference(x, step_table[index].view(-1, 1, ...), ...)``.

    Args:
        x (`torch.Tensor`): ``(B, ...)``.
        step_table (`torch.Tensor`): ``(T,)`` step sizes, e.g. one per calibrated timestep.
        zero_point_table (`torch.Tensor`, *optional*): ``(T,)`` zero points, or ``None`` (symmetric).
        index (`torch.Tensor`): ``(B,)`` integer table positions.
        qmin (`int`): as in [fused_fake_quantize][diffusers_qalora.kernels.fused_fake_quantize].
        qmax (`int`): as in [fused_fake_quantize][diffusers_qalora.kernels.fused_fake_quantize].
        grad_scale (`float`, defaults to `1.0`): as in [fused_fake_quantize][diffusers_qalora.kernels.fused_fake_quantize].
    """
    if x.dim() == 0 or index.shape != (x.shape[0],):
        raise ValueError(
            f"`index` must hold one table position per sample, shape ({x.shape[0] if x.dim() else 0},); "
            f"got {tuple(index.shape)} for `x` of shape {tuple(x.shape)}."
        )
    if step_table.dim() != 1 or (zero_point_table is not None and zero_point_table.shape != step_table.shape):
        raise ValueError(
            f"`step_table` and `zero_point_table` must be 1-D tables of one shape, got "
            f"{tuple(step_table.shape)} and "
            f"{None if zero_point_table is None else tuple(zero_point_table.shape)}."
        )
    if index.is_floating_point():
        raise TypeError(f"`index` must be an integer tensor, got {index.dtype}.")
    view = (-1,) + (1,) * (x.dim() - 1)
    if (
        x.dtype not in _KERNEL_DTYPES
        or step_table.dtype not in _KERNEL_DTYPES
        or x.numel() == 0
        or step_table.device != x.device
    ):
        zp = None if zero_point_table is None else zero_point_table[index].view(view)
        return fake_quantize_reference(x, step_table[index].view(view), zp, qmin, qmax, grad_scale)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= step_table.numel()):
        raise IndexError(
            f"`index` values must lie in [0, {step_table.numel()}), got [{int(index.min())}, {int(index.max())}]."
        )
    inner = x.numel() // x.shape[0]
    index32 = index.to(device=x.device, dtype=torch.int32).contiguous()
    if not _tracked(x, step_table, zero_point_table):
        zp = None if zero_point_table is None else zero_point_table.detach().contiguous()
        out = _kernels().forward(
            x.detach().contiguous(), step_table.detach().contiguous(), zp, index32, inner, x.shape[0], qmin, qmax
        )
        return out.view(x.shape)
    return _FusedFakeQuantize.apply(x, step_table, zero_point_table, index32, qmin, qmax, grad_scale, x.shape[0], inner)
