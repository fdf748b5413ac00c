"""Pure tensor primitives for uniform quantization.

Everything here is plain ``torch``: no modules, no Hugging Face imports.  Codes are integers held in float or
integer tensors; the *step size* (``s``, often called scale) and *zero point* (``z``) follow the convention

    q = clamp(round(x / s) + z, qmin, qmax)          (integer code)
    x_hat = s * (q - z)                               (dequantized value)

Symmetric (signed) quantization uses ``z = 0`` and ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``; asymmetric
(unsigned) quantization uses ``[0, 2^b - 1]`` and an integer zero point.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

MIN_BITS = 2
MAX_BITS = 8


def validate_bits(bits: int, name: str = "bits") -> int:
    """Return ``bits`` if it is an int in ``[2, 8]``, else raise a ``ValueError`` naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"`{name}` must be an integer between {MIN_BITS} and {MAX_BITS} (e.g. 4 or 8), got {bits!r}."
        )
    return bits


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` for ``bits`` bits.

    Symmetric codes are signed two's-complement values, asymmetric codes are unsigned.
    """
    validate_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class _RoundSTE(torch.autograd.Function):
    """``round`` in the forward pass, identity in the backward pass (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient."""
    return _RoundSTE.apply(x)


def _sum_to_shape(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to ``shape`` (the inverse of broadcasting)."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    if lead > 0:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (cheaper than ``torch.broadcast_shapes`` on a hot path)."""
    if len(shape) > len(target):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))


def _fits(t: torch.Tensor, *others: torch.Tensor | float | int) -> bool:
    """Whether an in-place op on ``t`` with ``others`` gives what the out-of-place op would (same shape and dtype)."""
    for o in others:
        if isinstance(o, torch.Tensor) and (
            o.dtype != t.dtype or o.device != t.device or not _broadcasts_to(o.shape, t.shape)
        ):
            return False
    return True


def _code_bounds(zero_point: torch.Tensor | None, qmin: int, qmax: int):
    """Bounds of the *unshifted* codes, using ``clamp(round(v) + z, qmin, qmax) - z == clamp(round(v), qmin - z,
    qmax - z)`` for an integer ``z`` (exact in floating point: every term is a small integer).

    A 0-d zero point on the CPU becomes a Python number: ``clamp`` with scalar bounds is much faster than with tensor
    bounds there (on CUDA, ``.item()`` would synchronise, so the tensor is kept).
    """
    if zero_point is None:
        return qmin, qmax
    zp = torch.round(zero_point.detach())
    if zp.dim() == 0 and zp.device.type == "cpu" and zp.is_floating_point():
        z = float(zp)
        return qmin - z, qmax - z
    return qmin - zp, qmax - zp


def _fake_quantize_values(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    keep_scaled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``s * clamp(round(x / s), qmin - z, qmax - z)`` (see `_LSQFakeQuantize`) and, if ``keep_scaled``, ``x / s``.

    Without ``keep_scaled`` everything after the division happens in place in one buffer.
    """
    lo, hi = _code_bounds(zero_point, qmin, qmax)
    v = x / step
    c = torch.round(v) if keep_scaled else v.round_()
    c = c.clamp_(lo, hi) if _fits(c, lo, hi) else torch.clamp(c, lo, hi)
    out = c.mul_(step) if _fits(c, step) else c * step
    return out, (v if keep_scaled else None)


class _LSQFakeQuantize(torch.autograd.Function):
    """Fake quantization with the gradients of Learned Step Size Quantization (Esser et al., 2020).

    Forward: ``x_hat = s * (clamp(round(x / s) + round(z), qmin, qmax) - round(z))``.

    Backward (per element, ``v = x / s``):
      * ``d x_hat / d x`` = 1 inside the clipping range, 0 outside (STE through round, clamp's own gradient);
      * ``d x_hat / d s`` = ``round(v) - v`` inside, ``qmin - z`` below, ``qmax - z`` above (LSQ);
      * ``d x_hat / d z`` = 0 inside, ``-s`` outside (the zero point only moves clipped values).
    The step and zero-point gradients are multiplied by ``grad_scale`` (LSQ's ``g = 1/sqrt(N * qmax)``) and summed
    to the shapes of ``step`` and ``zero_point``, which broadcast against ``x``.

    This runs on every weight and activation of every quantized layer, so it is written for few full-size passes
    and allocations (on CPU, eager elementwise ops are memory- and dispatch-bound):
      * with integer ``z``, ``clamp(round(v) + z, qmin, qmax) - z == clamp(round(v), qmin - z, qmax - z) =: c``
        exactly (all terms are small integers), so the forward is ``round``, ``clamp``, ``mul`` in place on ``v``;
      * only ``v`` is saved (the size of ``x``, as before); the backward recomputes ``r = round(v)`` and ``c``, and
        the float mask ``inside = (r == c)`` gives the step derivative in one pass as ``c - v * inside``
        (``round(v) - v`` inside, ``c = qmin - z`` or ``qmax - z`` outside) and ``grad_x = grad * inside``;
      * the clipped part of the gradient, for the zero point, is ``grad - grad_x`` (exact).
    Every result is bit-identical to the plain formulas above (the forward may give ``-0.0`` where ``+0.0`` was).
    """

    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, grad_scale):
        out, v = _fake_quantize_values(x, step, zero_point, qmin, qmax, keep_scaled=True)
        ctx.save_for_backward(v, step, zero_point)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        v, step, zero_point = ctx.saved_tensors
        need_x, need_step, need_zp = ctx.needs_input_grad[:3]
        lo, hi = _code_bounds(zero_point, *ctx.qrange)
        r = torch.round(v)
        c = torch.clamp(r, lo, hi)
        inside = torch.eq(r, c, out=r) if _fits(r, c) else torch.eq(r, c).to(c.dtype)  # 1.0 inside, 0.0 outside
        del r
        grad_x = grad_step = grad_zp = None
        scratch = None
        if need_step:
            d_step = torch.addcmul(c, v, inside, value=-1, out=c) if _fits(c, v, inside) else c - v * inside
            prod = d_step.mul_(grad) if _fits(d_step, grad) else d_step * grad
            grad_step = _sum_to_shape(prod, step.shape) * ctx.grad_scale
            scratch = prod
        if need_x or need_zp:
            grad_x = inside.mul_(grad) if _fits(inside, grad) else inside * grad
        if need_zp:
            if scratch is not None and _fits(scratch, grad, grad_x):
                clipped = torch.sub(grad, grad_x, out=scratch)
            else:
                clipped = grad - grad_x
            clipped = clipped.mul_(step) if _fits(clipped, step) else clipped * step
            grad_zp = -_sum_to_shape(clipped, zero_point.shape) * ctx.grad_scale
        if need_x:
            grad_x = _sum_to_shape(grad_x, ctx.x_shape)
        else:
            grad_x = None
        return grad_x, grad_step, grad_zp, None, None, None


def fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` with LSQ gradients for ``x``, ``step`` and ``zero_point``.

    Args:
        x (`torch.Tensor`): values to quantize, any shape.
        step (`torch.Tensor`): positive step sizes, broadcastable to ``x``.
        zero_point (`torch.Tensor`, *optional*): zero points (rounded to integers in the forward pass),
            broadcastable to ``x``; ``None`` for symmetric quantization.
        qmin (`int`): the lowest integer code, see [qrange][diffusers_qalora.quant.qrange].
        qmax (`int`): the highest integer code.
        grad_scale (`float`, defaults to `1.0`): LSQ gradient scale applied to the step and zero-point gradients.

    Returns:
        `torch.Tensor`: ``x_hat`` with the dtype and shape of ``x``.
    """
    tracked = x.requires_grad or step.requires_grad or (zero_point is not None and zero_point.requires_grad)
    if not (tracked and torch.is_grad_enabled()):
        # Inference (sampling, calibration, export): no graph, nothing saved, one buffer.
        return _fake_quantize_values(x, step, zero_point, qmin, qmax)[0]
    return _LSQFakeQuantize.apply(x, step, zero_point, qmin, qmax, grad_scale)


def quantize(
    x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, qmin, qmax)`` as an ``int32`` tensor (no gradient)."""
    with torch.no_grad():
        zp = 0.0 if zero_point is None else torch.round(zero_point)
        return torch.clamp(torch.round(x / step) + zp, qmin, qmax).to(torch.int32)


def dequantize(codes: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """``s * (q - z)`` in the dtype of ``step``."""
    q = codes.to(step.dtype)
    if zero_point is not None:
        q = q - torch.round(zero_point).to(step.dtype)
    return q * step


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass.

    Written as ``x + (y - y)`` with ``y = x * factor``: ``y - y`` is exactly zero for finite values, so the forward
    value is bit-identical to ``x`` (``(x - y) + y`` is not: it rounds twice).
    """
    scaled = x * factor
    return x.detach() + (scaled - scaled.detach())


def lsq_grad_scale(num_elements_per_step: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N * Q_P)``."""
    return 1.0 / float(max(num_elements_per_step, 1) * max(qmax, 1)) ** 0.5
