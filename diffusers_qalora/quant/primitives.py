"""Pure tensor primitives for uniform quantization.

Everything here is plain ``torch``: no modules, no Hugging Face imports.  Codes are integers held in float or
integer tensors; the *step size* (``s``, often called scale) and *zero point* (``z``) follow the convention

    q = clamp(round(x / s) + z, qmin, qmax)          (integer code)
    x_hat = s * (q - z)                               (dequantized value)

Symmetric (signed) quantization uses ``z = 0`` and ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``; asymmetric
(unsigned) quantization uses ``[0, 2^b - 1]`` and an integer zero point.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.function import once_differentiable

MIN_BITS = 2
MAX_BITS = 8


def validate_bits(bits: int, name: str = "bits") -> int:
    """Return ``bits`` if it is an int in ``[2, 8]``, else raise a ``ValueError`` naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`{name}` must be an integer between {MIN_BITS} and {MAX_BITS} (e.g. 4 or 8), got {bits!r}.")
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
    Large float32 CPU tensors run the same formulas as one pass each way (`_lsq_forward_pass`, `_lsq_backward_pass`,
    compiled by ``torch.compile`` as [`set_fused_compile`] says): three full-size passes fewer forward, about seven
    backward; the step and zero-point sums come out in another order.
    """

    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, grad_scale):
        views = _one_pass_view(x, step, zero_point)
        ctx.one_pass = views is not None
        if ctx.one_pass:
            out, v = _run_pass(3, x.numel(), x.device, *views, qmin, qmax)
            out = out.view(x.shape)
        else:
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
        if ctx.one_pass:
            grad2 = grad.reshape(v.shape).detach()
            grad_x, grad_step, grad_zp = _run_pass(
                4, v.numel(), v.device, v, grad2, _column(step), _column(zero_point), *ctx.qrange
            )
            grad_x = grad_x.view(ctx.x_shape) if need_x else None
            grad_step = grad_step.view(step.shape) * ctx.grad_scale if need_step else None
            grad_zp = grad_zp.view(zero_point.shape) * ctx.grad_scale if need_zp else None
            return grad_x, grad_step, grad_zp, None, None, None
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
        views = _one_pass_view(x, step, zero_point)
        if views is not None:
            return _run_pass(5, x.numel(), x.device, *views, qmin, qmax).view(x.shape)
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


# -- fused fake quantization of a LoRA-merged weight -----------------------------------------------------------------
class WorkspacePool:
    """Free weight-sized buffers kept for reuse, keyed by shape, dtype and device.

    A fresh CPU allocation of tens of MB is returned to the OS when freed and costs a page fault per 4 KiB page when
    it is touched again: on the shared machines this project is measured on, that is ~5x the cost of the arithmetic
    of an elementwise pass.  The QALoRA weight path therefore takes its weight-sized temporaries from this pool and
    gives them back when its backward pass is done, so a training step after the first allocates none of them.

    A buffer is lent as an alias (``detach()``: the same storage and version counter) while the pool keeps the buffer
    itself.  It comes back when the code that took it gives it back, once nothing else reads it, or by itself when
    the alias dies unreturned: under gradient checkpointing the first forward pass drops what it saved unread, and
    without this its buffers were freed, so that the recomputed forward pass faulted in fresh pages for every weight.
    Writing into a reused buffer bumps its version counter, so a stale autograd graph that still holds it fails loudly
    instead of reading new values.  [`clear`] frees everything (call it after training).
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        # data_ptr of a lent buffer -> its lease ``[key, buffer]``; a lease ends once (given back, or its alias died).
        self._lent: dict[int, list] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype, device)
        stack = self._free.get(key)
        buffer = stack.pop() if stack else torch.empty(shape, dtype=dtype, device=device)
        if not buffer.numel():
            return buffer
        alias = buffer.detach()
        lease = [key, buffer]
        self._lent[buffer.data_ptr()] = lease
        weakref.finalize(alias, self._end_lease, buffer.data_ptr(), lease)
        return alias

    def give(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is not None and t.numel():
                self._end_lease(t.data_ptr(), self._lent.get(t.data_ptr()))

    def _end_lease(self, data_ptr: int, lease: list | None) -> None:
        if lease is None or self._lent.get(data_ptr) is not lease:
            return  # given back already, or the pool was cleared
        del self._lent[data_ptr]
        self._free.setdefault(lease[0], []).append(lease[1])

    def clear(self) -> None:
        self._free.clear()
        self._lent.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for stack in self._free.values() for t in stack)


WORKSPACE = WorkspacePool()


# Other caches of the fused path that live as long as the pool (`lora_op`'s sorted extremes of each base weight).
_WORKSPACE_CACHES: list[dict] = []


def clear_workspace() -> None:
    """Free the buffers the fused QALoRA weight path keeps between training steps (see [`WorkspacePool`]), and the
    per-weight lists of `qalora_conv2d` / `qalora_linear`."""
    WORKSPACE.clear()
    for cache in _WORKSPACE_CACHES:
        cache.clear()


def _merged_fake_quant_forward(
    merged: torch.Tensor, w0: torch.Tensor, step: torch.Tensor, lo, hi, w_hat_out: torch.Tensor
) -> None:
    """One elementwise pass over the weight: ``v = (merged + W0) / s``, ``r = round(v)``, ``c = clamp(r, lo, hi)``;
    writes ``s * c`` into ``w_hat_out`` and LSQ's ``d x_hat / d s`` over ``merged``: ``c - v`` where ``r`` lies in
    ``[lo, hi]`` (inside), ``c`` elsewhere -- the numbers of [`_LSQFakeQuantize`] (``c - v * inside``).

    Written as mutations of given buffers so that ``torch.compile`` makes it one loop without allocations.  No mask
    is stored: with symmetric bounds (``lo <= -1``, ``hi >= 1``) an inside element has ``|d| <= 0.5`` and an
    outside one ``|d| = |lo|`` or ``|hi| >= 1``, so the backward pass reads the mask off ``d``."""
    v = (merged + w0) / step
    r = torch.round(v)
    c = torch.clamp(r, lo, hi)
    w_hat_out.copy_(c * step)
    merged.copy_(torch.where((r >= lo) & (r <= hi), c - v, c))


def _merged_fake_quant_backward(grad: torch.Tensor, d_step: torch.Tensor) -> torch.Tensor:
    """One pass over the weight gradient (viewed as ``d``): the step gradient ``sum(grad * d)`` per cell (last dim), and the
    straight-through gradient ``grad * inside`` (``inside = |d| <= 0.5``, see above) written over ``grad``."""
    step_grad = (grad * d_step).sum(dim=-1, keepdim=True)
    grad.copy_(grad * (d_step.abs() <= 0.5))
    return step_grad


def _merged_fake_quant_step_grad(grad: torch.Tensor, d_step: torch.Tensor) -> torch.Tensor:
    """The step gradient ``sum(grad * d)`` per cell alone: one read of both, nothing written."""
    return (grad * d_step).sum(dim=-1, keepdim=True)


def _merged_fake_quant_forward_masked(merged, w0, step, lo, hi, w_hat_out, inside_out) -> None:
    """[`_merged_fake_quant_forward`] for asymmetric bounds (a bound may be 0, so ``d`` cannot tell inside from
    outside): the mask is stored.  Always eager (a bool store keeps Inductor's loop from vectorising)."""
    v = (merged + w0) / step
    r = torch.round(v)
    c = torch.clamp(r, lo, hi)
    inside = r == c
    w_hat_out.copy_(c * step)
    inside_out.copy_(inside)
    merged.copy_(c - v * inside)


def _merged_fake_quant_backward_masked(grad, d_step, inside) -> torch.Tensor:
    step_grad = (grad * d_step).sum(dim=-1, keepdim=True)
    grad.mul_(inside)
    return step_grad


# The compiled versions of the two passes (torch.compile / Inductor: one C++ loop each), built on first use.
_COMPILED: dict[str, Any] = {}
# Weights smaller than this keep the reference composition in "auto" mode: measured on the embedded model, the fused
# path run eagerly is no faster than the reference (3% slower), and compiling pays only on SD-scale weights.
COMPILE_MIN_NUMEL = 1 << 18
FUSED_MODES = ("auto", "always", "eager", "never")
_compile_setting: list[str] = [os.environ.get("QALORA_FUSED_COMPILE", "auto")]


def set_fused_compile(mode: str) -> str:
    """How QALoRA layers fake-quantize ``W0 + scaling * B @ A`` in training, and how [`fake_quantize`] runs on float32
    CPU tensors; returns the previous mode.

    * ``"auto"`` (default): on CPU, weights of at least ``COMPILE_MIN_NUMEL`` elements take the fused path with its
      two passes compiled by ``torch.compile`` (Inductor), and [`fake_quantize`] runs in one compiled pass each way
      on tensors of that size; smaller tensors, other devices (the Triton kernels on CUDA) and machines where
      Inductor fails take the reference composition;
    * ``"always"``: the fused path and the one-pass [`fake_quantize`], compiled, for every tensor;
    * ``"eager"``: the same passes run eagerly (same numbers, for tests and debugging);
    * ``"never"``: the reference composition everywhere.

    The environment variable ``QALORA_FUSED_COMPILE`` sets the initial mode.
    """
    if mode not in FUSED_MODES:
        raise ValueError(f"`mode` must be one of {FUSED_MODES}, got {mode!r}.")
    previous = _compile_setting[0]
    _compile_setting[0] = mode
    return previous


@contextlib.contextmanager
def fused_compile(mode: str) -> Iterator[None]:
    """[`set_fused_compile`] for a ``with`` block: the previous mode comes back on exit, an exception included.

    ```py
    with fused_compile("never"):  # the reference composition, e.g. to compare against
        y = fake_quantize(x, step, None, -8, 7)
    ```
    """
    previous = set_fused_compile(mode)
    try:
        yield
    finally:
        set_fused_compile(previous)


def fused_path_enabled(numel: int, device: torch.device) -> bool:
    """Whether a QALoRA weight of ``numel`` elements on ``device`` takes [`fake_quantize_lora_merged`] in training."""
    mode = _compile_setting[0]
    if mode in ("always", "eager"):
        return True
    if mode == "never" or "failed" in _COMPILED:
        return False
    return device.type == "cpu" and numel >= COMPILE_MIN_NUMEL


def _traced_code_bounds(zero_point: torch.Tensor | None, qmin: int, qmax: int):
    """`_code_bounds` as tensor operations: a trained zero point's value must not become a constant of compiled code."""
    if zero_point is None:
        return qmin, qmax
    z = torch.round(zero_point)
    return qmin - z, qmax - z


def _lsq_forward_pass(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int):
    """`_LSQFakeQuantize`'s forward in one pass over ``x``: ``(x_hat, v = x / s)``.  In this pass and the two below,
    ``x`` is a ``(rows, columns)`` view and ``step`` (``zero_point``) a ``(rows, 1)`` one (see
    `_one_pass_view`), so that every caller's shapes share a few compiled variants."""
    lo, hi = _traced_code_bounds(zero_point, qmin, qmax)
    v = x / step
    return torch.clamp(torch.round(v), lo, hi) * step, v


def _lsq_values_pass(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int):
    """``x_hat`` alone (no gradient wanted), in one pass."""
    lo, hi = _traced_code_bounds(zero_point, qmin, qmax)
    return torch.clamp(torch.round(x / step), lo, hi) * step


def _lsq_backward_pass(v, grad, step, zero_point, qmin: int, qmax: int):
    """`_LSQFakeQuantize`'s backward in one pass over ``v`` and ``grad``: the input gradient and the step (and zero
    point) gradient per row, before ``grad_scale``.  The numbers of the eager backward (``c - v * inside`` is
    ``c - v`` inside and ``c`` outside), the sums in another order."""
    lo, hi = _traced_code_bounds(zero_point, qmin, qmax)
    r = torch.round(v)
    c = torch.clamp(r, lo, hi)
    inside = r == c
    grad_x = torch.where(inside, grad, 0.0)
    grad_step = (torch.where(inside, c - v, c) * grad).sum(dim=1, keepdim=True)
    if zero_point is None:
        return grad_x, grad_step, None
    grad_zp = -(torch.where(inside, 0.0, grad) * step).sum(dim=1, keepdim=True)
    return grad_x, grad_step, grad_zp


def _one_pass_view(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor | None):
    """``(x, step, zero_point)`` as the detached ``(rows, columns)`` and ``(rows, 1)`` views of the one-pass
    functions, or ``None`` when they do not apply: float32 CPU tensors (as `fused_path_enabled` says), a contiguous
    ``x``, and parameters that vary over leading dims of ``x`` only (one step per tensor, sample, output channel or
    weight group); nor while an outer ``torch.compile`` traces the call (it fuses the plain formulas itself)."""
    if x.dtype != torch.float32 or step.dtype != torch.float32 or not x.is_contiguous():
        return None
    if torch.compiler.is_compiling() or not fused_path_enabled(x.numel(), x.device):
        return None
    rows = _leading_rows(step, x.shape)
    if rows is None or (
        zero_point is not None and (zero_point.dtype != torch.float32 or zero_point.shape != step.shape)
    ):
        return None
    # Detached after the view: a view's base would become part of the compiled code's guards (one variant per rank).
    return x.view(rows, -1).detach(), _column(step), _column(zero_point)


def _column(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.reshape(-1, 1).detach()


def _leading_rows(param: torch.Tensor, shape: torch.Size) -> int | None:
    """The number of rows ``x`` splits into when ``param`` broadcasts to ``shape`` varying over its leading dims only
    (1 for a single value), else ``None``."""
    if not _broadcasts_to(param.shape, shape):
        return None
    full = (1,) * (len(shape) - param.dim()) + tuple(param.shape)
    last = max((i for i, n in enumerate(full) if n != 1), default=-1)
    if any(full[i] != shape[i] for i in range(last + 1)):
        return None
    return math.prod(shape[: last + 1])


# The passes `_run_pass` runs by index: 0-2 the LoRA-merged weight path, 3-5 `fake_quantize` (forward, backward,
# values only).
_EAGER_PASSES = (
    _merged_fake_quant_forward,
    _merged_fake_quant_backward,
    _merged_fake_quant_step_grad,
    _lsq_forward_pass,
    _lsq_backward_pass,
    _lsq_values_pass,
)


def _passes(numel: int, device: torch.device):
    """The elementwise passes of `_EAGER_PASSES` to run: compiled or eager."""
    mode = _compile_setting[0]
    if mode in ("eager", "never") or "failed" in _COMPILED:
        return _EAGER_PASSES
    if "passes" not in _COMPILED:
        _COMPILED["passes"] = tuple(torch.compile(fn, dynamic=True, fullgraph=True) for fn in _EAGER_PASSES)
    return _COMPILED["passes"]


def _run_pass(which: int, numel: int, device: torch.device, *args):
    eager = _EAGER_PASSES[which]
    fn = _passes(numel, device)[which]
    if fn is eager:
        return eager(*args)
    try:
        return fn(*args)
    except Exception as err:  # Inductor needs a working C++ compiler; the eager passes give the same numbers
        if _compile_setting[0] == "always":
            raise
        warnings.warn(
            f"torch.compile of the fused fake-quant passes failed ({type(err).__name__}: {err}); running them eagerly.",
            stacklevel=3,
        )
        _COMPILED["failed"] = True
        return eager(*args)


def merged_weight_forward(
    w0: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    scaling: float,
    qmin: int,
    qmax: int,
    grouped_shape: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward half of the fused QALoRA weight path: ``(x_hat, d, inside)`` in the grouped view, where
    ``x_hat = Q(W0 + scaling * B @ A)``, ``d = d x_hat / d s`` and ``inside`` is the straight-through mask (``None``
    for symmetric bounds, where ``|d| <= 0.5`` tells it).  All three are [`WORKSPACE`] buffers: the caller gives them
    back once its backward pass is done with them."""
    device = w0.device
    out_features, rank = b.shape
    merged = WORKSPACE.take(grouped_shape, torch.float32, device)
    torch.mm(b, a.reshape(rank, -1), out=merged.view(out_features, -1))
    if scaling != 1.0:
        merged.mul_(scaling)
    w_hat = WORKSPACE.take(grouped_shape, torch.float32, device)
    lo, hi = _code_bounds(zero_point, qmin, qmax)
    # Views are passed as detached aliases: a view's base would become part of the compiled code's guards.
    w0g = w0.view(grouped_shape).detach()
    if zero_point is None:
        inside = None
        _run_pass(0, merged.numel(), device, merged, w0g, step, lo, hi, w_hat)
    else:
        inside = WORKSPACE.take(grouped_shape, torch.bool, device)
        _merged_fake_quant_forward_masked(merged, w0g, step, lo, hi, w_hat, inside)
    return w_hat, merged, inside


def merged_weight_backward_(grad: torch.Tensor, d_step: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
    """The backward half: one pass over the weight gradient ``grad`` (a fresh contiguous tensor, masked in place by
    the straight-through estimator) that returns the step gradient per cell of the grouped view (before
    ``grad_scale``)."""
    g3 = grad.view(d_step.shape).detach()
    if inside is None:
        return _run_pass(1, grad.numel(), grad.device, g3, d_step)
    return _merged_fake_quant_backward_masked(g3, d_step, inside)


def merged_weight_step_grad(grad: torch.Tensor, d_step: torch.Tensor) -> torch.Tensor:
    """The step gradient per cell of the grouped view (before ``grad_scale``) from the weight gradient ``grad``, in
    one read-only pass."""
    return _run_pass(2, grad.numel(), grad.device, grad.view(d_step.shape).detach(), d_step)


class _MergedLSQFakeQuantize(torch.autograd.Function):
    """``Q(W0 + scaling * B @ A)`` with the gradients of [`_LSQFakeQuantize`] for ``B``, ``A``, the step and (when it
    is trained) ``W0``, with one elementwise pass over the weight each way besides the rank-``r`` GEMMs:

      forward:  ``B @ A`` into a pooled buffer; one pass reads it and ``W0`` and writes ``x_hat`` and
                ``d x_hat / d s`` (over the product);
      backward: one pass over the weight gradient (step gradient, straight-through mask); ``B``'s and ``A``'s
                gradients (two GEMMs).

    Weight-sized buffers come from [`WORKSPACE`] and go back there at the end of the backward pass.  The numbers are
    those of the reference composition ``fake_quantize(W0 + (B @ A) * scaling, ...)`` (bit-identical output and
    LoRA/``W0`` gradients; the step gradient is summed in another order).
    """

    @staticmethod
    def forward(ctx, w0, a, b, step, zero_point, scaling, qmin, qmax, grad_scale, grouped_shape):
        w_hat, d_step, inside = merged_weight_forward(w0, a, b, step, zero_point, scaling, qmin, qmax, grouped_shape)
        ctx.save_for_backward(a, b, step, d_step, inside, w_hat)
        ctx.settings = (scaling, grad_scale, w0.shape)
        return w_hat.view(w0.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b, step, d_step, inside, w_hat = ctx.saved_tensors
        scaling, grad_scale, w_shape = ctx.settings
        need_w0, need_a, need_b, need_step = ctx.needs_input_grad[:4]
        # The op that used x_hat (and saved it) has run its backward pass: x_hat's buffer is free again.
        WORKSPACE.give(w_hat)
        # The incoming weight gradient is the op's own fresh output, so it is masked in place (a view or an
        # expanded gradient is copied first).
        g = grad if grad.is_contiguous() and grad._base is None else grad.contiguous().clone()
        step_grad = merged_weight_backward_(g, d_step, inside)
        WORKSPACE.give(d_step, inside)
        grad_step = step_grad.reshape(step.shape) * grad_scale if need_step else None
        g2 = g.reshape(b.shape[0], -1)
        grad_w0 = g2.view(w_shape) if need_w0 else None
        grad_a = grad_b = None
        if need_a or need_b:
            lora_g = g2 if scaling == 1.0 else (g2 * scaling if need_w0 else g2.mul_(scaling))
            a2 = a.reshape(a.shape[0], -1)
            if need_b:
                grad_b = lora_g.mm(a2.t())
            if need_a:
                grad_a = b.t().mm(lora_g).view(a.shape)
        return grad_w0, grad_a, grad_b, grad_step, None, None, None, None, None, None


def merged_grouped_shape(
    w0: torch.Tensor, zero_point: torch.Tensor | None, grouped_shape: tuple[int, ...] | None, caller: str
) -> tuple[int, ...]:
    """The grouped view of the fused weight path (per output channel by default) as a tuple of ints; a trained
    zero point, which the path does not support, is refused naming ``caller``."""
    if zero_point is not None and zero_point.requires_grad:
        raise ValueError(f"{caller}: a trained weight zero point is not supported; freeze it.")
    if grouped_shape is None:
        grouped_shape = (w0.shape[0], 1, w0.numel() // max(w0.shape[0], 1))
    return tuple(int(s) for s in grouped_shape)


def fake_quantize_lora_merged(
    w0: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
    grouped_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``fake_quantize(W0 + scaling * B @ A, step, zero_point, ...)`` in as few passes over the weight as possible.

    Args:
        w0 (`torch.Tensor`): the frozen base weight ``(C_out, ...)`` (fp32; trained only with full QAT).
        a (`torch.Tensor`): LoRA ``A``, ``(r, ...)`` with ``prod(...) == prod(w0.shape[1:])``.
        b (`torch.Tensor`): LoRA ``B``, ``(C_out, r)``.
        scaling (`float`): the LoRA scaling ``lora_alpha / r``.
        step (`torch.Tensor`): step sizes of shape ``grouped_shape[:2] + (1,)`` (see `grouped_view`).
        zero_point (`torch.Tensor`, *optional*): frozen zero points of the shape of ``step``; ``None`` if symmetric.
        qmin (`int`): the lowest integer code.
        qmax (`int`): the highest integer code.
        grad_scale (`float`, defaults to `1.0`): LSQ gradient scale of the step.
        grouped_shape (`tuple[int, ...]`, *optional*): ``(C_out or 1, G, E)``, the view in which ``step``
            broadcasts; defaults to per-output-channel ``(C_out, 1, -1)``.

    Returns:
        `torch.Tensor`: the fake-quantized merged weight, float32, shape of ``w0``.  With gradients enabled its
        weight-sized buffers are reused after the backward pass: use it once, in one graph.
    """
    grouped_shape = merged_grouped_shape(w0, zero_point, grouped_shape, "fake_quantize_lora_merged")
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (w0, a, b, step))
    if not tracked:
        # Inference: the reference composition (its buffers are the caller's to keep).
        with torch.no_grad():
            delta = (b @ a.reshape(a.shape[0], -1)).reshape(w0.shape) * scaling
            merged = (w0.float() + delta).reshape(grouped_shape)
            return _fake_quantize_values(merged, step.float(), zero_point, qmin, qmax)[0].reshape(w0.shape)
    return _MergedLSQFakeQuantize.apply(
        w0.float().contiguous(),
        a.float(),
        b.float(),
        step.float(),
        zero_point,
        float(scaling),
        qmin,
        qmax,
        grad_scale,
        grouped_shape,
    )
