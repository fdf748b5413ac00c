"""Helpers shared by the ``@triton.jit`` kernel modules (imported only by them, so only through
`diffusers_qalora.kernels._build.load_kernel_module`: ``TRITON_INTERPRET`` is read when these are decorated).

The kernels call only the *builtins* of triton.language (load, where, full, dot, reduce, ...), never its
jit-decorated helpers (sum, max, zeros, cdiv, ...): those are decorated when `triton` is imported, so a process that
imported triton before setting TRITON_INTERPRET=1 (``import peft`` does) holds compiled versions that an interpreted
kernel cannot call.  Reductions therefore go through `tl.reduce` with triton's own combiners, which the interpreter
recognises.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._build import built_interpreted

INTERPRET = bool(built_interpreted())


def device_function(fn):
    """``triton.jit`` for the compiled kernels; the plain Python function under the interpreter, where every call of
    a nested jit function re-patches ``triton.language`` (most of an interpreted kernel's time).  Helpers decorated
    so must avoid chained comparisons and multiple assignment targets (which the interpreter rewrites only in jit
    functions)."""
    return fn if INTERPRET else triton.jit(fn)


@device_function
def reduce_max(x, axis: tl.constexpr, INTERPRET: tl.constexpr):
    """``tl.max(x, axis)``; under the interpreter the same reduction through the builtin ``tl.reduce``."""
    if INTERPRET:
        return tl.reduce(x, axis, tl.standard._elementwise_max)
    else:
        return tl.max(x, axis)


@device_function
def reduce_sum(x, axis: tl.constexpr, INTERPRET: tl.constexpr):
    """``tl.sum(x, axis)``; under the interpreter the same reduction through the builtin ``tl.reduce``."""
    if INTERPRET:
        return tl.reduce(x, axis, tl.standard._sum_combine)
    else:
        return tl.sum(x, axis)


@device_function
def round_half_even(v):
    """``torch.round``'s rounding (half to even) of any magnitude, built from exact operations: ``floor`` and
    ``v - floor(v)`` are exact."""
    f = tl.floor(v)
    frac = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return f + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
