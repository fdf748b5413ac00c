"""`fake_quantize`'s one-pass path (float32 CPU tensors of at least ``COMPILE_MIN_NUMEL`` elements in the default
"auto" mode, every tensor in "eager" / "always") against the eager composition it replaces ("never").

Tolerances: the output, the inference output and the input gradient must be bit-identical (the same operations per
element); the step and zero-point gradients are sums that the pass takes in another order: ``rtol=1e-5``,
``atol=1e-5 * sum|grad|``.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_qalora.quant import fake_quantize, fused_compile, set_fused_compile
from diffusers_qalora.quant.primitives import COMPILE_MIN_NUMEL, _one_pass_view

CASES = [
    # x shape, step shape: shared, per sample (temporal steps of a mixed batch), per token group, per output channel
    ((2, 8, 12, 12), ()),
    ((3, 8, 10, 10), (3, 1, 1, 1)),
    ((2, 50, 24), (2, 1, 1)),
    ((16, 4, 3, 3), (16, 1, 1, 1)),
    ((12, 3, 20), (12, 3, 1)),
]


def run(mode, x, step, zp, qmin, qmax, needs=(True, True, True)):
    with fused_compile(mode):
        x = x.clone().requires_grad_(needs[0])
        step = step.clone().requires_grad_(needs[1])
        zp = None if zp is None else zp.clone().requires_grad_(needs[2])
        out = fake_quantize(x, step, zp, qmin, qmax, 0.3)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad_out)
        with torch.no_grad():
            values = fake_quantize(x, step, zp, qmin, qmax)
    grads = [None if t is None else t.grad for t in (x, step, zp)]
    return out.detach(), values, grads, grad_out


def make(shape, step_shape, asymmetric, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2
    # Steps small enough that a good share of the values clip at both ends.
    step = torch.rand(step_shape, generator=gen) * 0.1 + 0.2
    if not asymmetric:
        return x, step, None, -8, 7
    zp = torch.randint(3, 12, step_shape, generator=gen).float() + 0.3  # rounded in the forward pass
    return x, step, zp, 0, 15


@pytest.mark.parametrize("mode", ["eager", "always"])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("shape,step_shape", CASES)
def test_one_pass_matches_the_eager_composition(mode, shape, step_shape, asymmetric):
    x, step, zp, qmin, qmax = make(shape, step_shape, asymmetric)
    assert _one_pass_view(x, step, zp) is None  # "auto": these small tensors keep the eager composition
    codes = torch.round(x / step) + (0 if zp is None else torch.round(zp))
    assert bool((codes < qmin).any()) and bool((codes > qmax).any()) and bool(((codes >= qmin) & (codes <= qmax)).any())
    want_out, want_values, want_grads, grad_out = run("never", x, step, zp, qmin, qmax)
    got_out, got_values, got_grads, _ = run(mode, x, step, zp, qmin, qmax)
    assert torch.equal(got_out, want_out)
    assert torch.equal(got_values, want_values)
    assert torch.equal(got_grads[0], want_grads[0])
    bound = 1e-5 * float(grad_out.abs().sum())
    for got, want in zip(got_grads[1:], want_grads[1:]):
        if want is None:
            assert got is None
        else:
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=bound)


@pytest.mark.parametrize("needs", [(False, True, True), (True, True, False), (True, False, True)])
def test_one_pass_returns_only_the_gradients_asked_for(needs):
    x, step, zp, qmin, qmax = make((2, 8, 12, 12), (2, 1, 1, 1), asymmetric=True)
    _, _, want, _ = run("never", x, step, zp, qmin, qmax, needs)
    _, _, got, _ = run("eager", x, step, zp, qmin, qmax, needs)
    for need, g, w in zip(needs, got, want):
        assert (g is None) == (not need) == (w is None)
        if need:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_one_pass_is_taken_where_it_applies():
    previous = set_fused_compile("auto")
    try:
        big = torch.zeros(4, COMPILE_MIN_NUMEL // 4)
        assert _one_pass_view(big, torch.ones(()), None) is not None
        assert _one_pass_view(big, torch.ones(4, 1), torch.ones(4, 1)) is not None
        assert _one_pass_view(torch.zeros(COMPILE_MIN_NUMEL - 1), torch.ones(()), None) is None  # too small
        assert _one_pass_view(big.t(), torch.ones(()), None) is None  # not contiguous
        assert _one_pass_view(big, torch.ones(1, COMPILE_MIN_NUMEL // 4), None) is None  # a step per column
        assert _one_pass_view(big.double(), torch.ones((), dtype=torch.float64), None) is None
        assert _one_pass_view(big.to(torch.bfloat16), torch.ones(()), None) is None
        assert _one_pass_view(big, torch.ones(4, 1), torch.ones(())) is None  # zero point of another shape
        set_fused_compile("never")
        assert _one_pass_view(big, torch.ones(()), None) is None
    finally:
        set_fused_compile(previous)


def test_a_step_that_does_not_lead_takes_the_eager_composition():
    """A per-channel step of an activation varies over a middle dim: no row view, so the eager composition runs
    (and gives its own numbers)."""
    x, _, _, qmin, qmax = make((2, 8, 6, 6), (), asymmetric=False)
    step = torch.rand(1, 8, 1, 1, generator=torch.Generator().manual_seed(3)) * 0.1 + 0.2
    assert _one_pass_view(x, step, None) is None
    want = run("never", x, step, None, qmin, qmax)
    got = run("always", x, step, None, qmin, qmax)
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, w) for g, w in zip(got[2][:2], want[2][:2]))
