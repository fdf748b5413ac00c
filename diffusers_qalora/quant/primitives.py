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


class _LSQFakeQuantize(torch.autograd.Function):
    """Fake quantization with the gradients of Learned Step Size Quantization (Esser et al., 2020).

    Forward: ``x_hat = s * (clamp(round(x / s) + round(z), qmin, qmax) - round(z))``.

    Backward (per element, ``v = x / s``):
      * ``d x_hat / d x`` = 1 inside the clipping range, 0 outside (STE through round, clamp's own gradient);
      * ``d x_hat / d s`` = ``round(v) - v`` inside, ``qmin - z`` below, ``qmax - z`` above (LSQ);
      * ``d x_hat / d z`` = 0 inside, ``-s`` outside (the zero point only moves clipped values).
    The step and zero-point gradients are multiplied by ``grad_scale`` (LSQ's ``g = 1/sqrt(N * qmax)``) and summed
    to the shapes of ``step`` and ``zero_point``, which broadcast against ``x``.  Written as one function so that the
    backward recomputes the masks from ``x`` instead of keeping five intermediate tensors alive.
    """

    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, grad_scale):
        zp = torch.round(zero_point)
        v = x / step
        q = torch.clamp(torch.round(v) + zp, qmin, qmax)
        ctx.save_for_backward(x, step, zero_point)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        return (q - zp) * step

    @staticmethod
    def backward(ctx, grad):
        x, step, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        zp = torch.round(zero_point)
        v = x / step
        shifted = torch.round(v) + zp
        below = shifted < qmin
        above = shifted > qmax
        inside = ~(below | above)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = grad_zp = None
        if ctx.needs_input_grad[1]:
            d_step = torch.where(inside, torch.round(v) - v, torch.where(below, qmin - zp, qmax - zp))
            grad_step = _sum_to_shape(grad * d_step, step.shape) * ctx.grad_scale
        if ctx.needs_input_grad[2]:
            grad_zp = _sum_to_shape(torch.where(inside, 0.0, -grad * step), zero_point.shape) * ctx.grad_scale
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
        qmin, qmax (`int`): the integer code range, see [`qrange`].
        grad_scale (`float`, defaults to `1.0`): LSQ gradient scale applied to the step and zero-point gradients.

    Returns:
        `torch.Tensor`: ``x_hat`` with the dtype and shape of ``x``.
    """
    if zero_point is None:
        zero_point = torch.zeros((), dtype=step.dtype, device=step.device)
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
