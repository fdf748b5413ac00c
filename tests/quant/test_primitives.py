"""Tests of the quantization primitives: ranges, rounding, fake quantization and its LSQ gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_qalora.quant import (
    TemporalActQuantizer,
    WeightQuantizer,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    round_ste,
    scale_gradient,
    validate_bits,
)
from diffusers_qalora.quant.primitives import lsq_grad_scale

SETTINGS = settings(max_examples=120, deadline=None)


# -- independent reference implementations ---------------------------------------------------------------------


def ref_fake_quant(x, s, z, qmin, qmax):
    """The plain autograd composition ``s * (clamp(round_ste(x / s) + z, qmin, qmax) - z)`` with ``z`` rounded
    (straight-through) as well; written without touching the library's autograd Function."""
    z = torch.zeros((), dtype=s.dtype) if z is None else z
    z = z + (torch.round(z) - z).detach()
    v = x / s
    r = v + (torch.round(v) - v).detach()
    return s * (torch.clamp(r + z, qmin, qmax) - z)


def regions(x, s, z, qmin, qmax):
    """Masks (below, inside, above) of the clipping range, computed from the definition."""
    zr = torch.zeros(()) if z is None else torch.round(z)
    shifted = torch.round(x / s) + zr
    below = shifted < qmin
    above = shifted > qmax
    return below, ~(below | above), above


def sum_like(t, shape):
    """Sum ``t`` down to ``shape`` (the inverse of broadcasting), written independently of the library."""
    while t.dim() > len(shape):
        t = t.sum(0)
    for i, n in enumerate(shape):
        if n == 1 and t.shape[i] != 1:
            t = t.sum(i, keepdim=True)
    return t


def expected_grads(x, s, z, qmin, qmax, g, grad_scale=1.0):
    """(grad_x, grad_step, grad_zero_point) from the LSQ formulas."""
    below, inside, above = regions(x, s, z, qmin, qmax)
    zr = torch.zeros((), dtype=x.dtype) if z is None else torch.round(z)
    v = x / s
    d_step = torch.where(inside, torch.round(v) - v, torch.where(below, qmin - zr, qmax - zr))
    grad_x = g * inside
    grad_s = sum_like(g * d_step, s.shape) * grad_scale
    d_zp = torch.where(inside, torch.zeros_like(x), -s.expand_as(x))
    grad_z = None if z is None else sum_like(g * d_zp, z.shape) * grad_scale
    return grad_x, grad_s, grad_z


# -- strategies ------------------------------------------------------------------------------------------------


@st.composite
def quant_case(draw, max_dims=3):
    """bits, symmetric, qmin, qmax, a step, an integer zero point and ``x`` spanning the range and beyond.

    ``x`` is drawn in units of the step (``v``), so values land on code boundaries (``k + 0.5``), on codes, inside,
    and outside the clipping range on both sides.
    """
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    qmin, qmax = qrange(bits, symmetric)
    step = draw(st.floats(1e-3, 1e2, allow_nan=False, allow_infinity=False))
    zp = 0 if symmetric else draw(st.integers(qmin, qmax))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=max_dims)))
    n = math.prod(shape)
    lo, hi = qmin - zp - 3, qmax - zp + 3
    halves = st.integers(2 * lo, 2 * hi).map(lambda k: k / 2)  # exact codes and exact half-way points
    anywhere = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    v = draw(st.lists(st.one_of(halves, anywhere), min_size=n, max_size=n))
    x = torch.tensor(v, dtype=torch.float32).reshape(shape) * step
    s = torch.tensor(step, dtype=torch.float32)
    z = None if symmetric else torch.tensor(float(zp))
    return bits, symmetric, qmin, qmax, s, z, x


# -- bits and ranges -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange_symmetric_and_unsigned(bits):
    assert qrange(bits, symmetric=True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert qrange(bits, symmetric=False) == (0, 2**bits - 1)
    assert validate_bits(bits) == bits


@pytest.mark.parametrize("bad", [0, 1, 9, 16, -4, 4.0, "4", True, None])
def test_bits_outside_range_raise_naming_argument_and_allowed_values(bad):
    with pytest.raises(ValueError, match=r"`bits`.*2 and 8"):
        validate_bits(bad)
    with pytest.raises(ValueError, match=r"`weight_bits`.*2 and 8"):
        WeightQuantizer((4, 4), bits=bad)
    with pytest.raises(ValueError, match=r"`act_bits`.*2 and 8"):
        TemporalActQuantizer([0, 1], bits=bad)
    with pytest.raises(ValueError, match=r"`my_bits`"):
        validate_bits(bad, "my_bits")


@pytest.mark.parametrize("bad", [1, 9])
def test_qrange_rejects_bits(bad):
    with pytest.raises(ValueError, match="`bits`"):
        qrange(bad, True)


# -- round_ste -------------------------------------------------------------------------------------------------


def test_round_ste_is_round_half_to_even_with_identity_gradient():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51, 3.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0, -1.0, 4.0]))
    g = torch.randn(9)
    y.backward(g)
    assert torch.equal(x.grad, g)


# -- forward: error bound, consistency with quantize/dequantize, idempotence ------------------------------------


@SETTINGS
@given(quant_case())
def test_fake_quantize_error_bound_and_clipping(case):
    bits, symmetric, qmin, qmax, s, z, x = case
    x_hat = fake_quantize(x, s, z, qmin, qmax)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    zf = 0.0 if z is None else float(z)
    sf = float(s)
    lo_val, hi_val = sf * (qmin - zf), sf * (qmax - zf)
    codes = quantize(x, s, z, qmin, qmax)
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    # x_hat is exactly the dequantized code
    assert torch.equal(dequantize(codes, s, z), x_hat)
    # every x_hat is a representable value s * (q - z)
    assert torch.equal(torch.round(x_hat / s) * s, x_hat)
    x64, xh64 = x.double(), x_hat.double()
    # inside the clipping range (up to half a step beyond the end codes) the error is at most half a step
    inside = (x64 >= lo_val - sf / 2) & (x64 <= hi_val + sf / 2)
    tol = sf / 2 + 1e-6 * (x64.abs() + xh64.abs()) + 1e-12
    assert bool(((x64 - xh64).abs() <= tol)[inside].all())
    # beyond it, values clip to the end codes
    far_below = x64 < lo_val - sf * 0.51
    far_above = x64 > hi_val + sf * 0.51
    assert bool((x_hat[far_below] == torch.tensor(lo_val, dtype=torch.float32)).all())
    assert bool((x_hat[far_above] == torch.tensor(hi_val, dtype=torch.float32)).all())


@SETTINGS
@given(quant_case())
def test_fake_quantize_is_idempotent(case):
    _, _, qmin, qmax, s, z, x = case
    once = fake_quantize(x, s, z, qmin, qmax)
    twice = fake_quantize(once, s, z, qmin, qmax)
    assert torch.equal(once, twice)
    assert torch.equal(quantize(once, s, z, qmin, qmax), quantize(x, s, z, qmin, qmax))


@SETTINGS
@given(quant_case())
def test_fake_quantize_matches_reference_composition_forward(case):
    _, _, qmin, qmax, s, z, x = case
    assert torch.equal(fake_quantize(x, s, z, qmin, qmax), ref_fake_quant(x, s, z, qmin, qmax))


def test_symmetric_signed_codes_and_exact_zero():
    qmin, qmax = qrange(4, symmetric=True)
    s = torch.tensor(0.5)
    x = torch.tensor([-10.0, -4.0, -3.9, -0.2, 0.0, 0.26, 3.4, 3.6, 10.0])
    codes = quantize(x, s, None, qmin, qmax)
    assert codes.tolist() == [-8, -8, -8, 0, 0, 1, 7, 7, 7]
    x_hat = fake_quantize(x, s, None, qmin, qmax)
    assert x_hat.tolist() == [-4.0, -4.0, -4.0, 0.0, 0.0, 0.5, 3.5, 3.5, 3.5]
    # None and an explicit zero zero point are the same quantizer
    assert torch.equal(x_hat, fake_quantize(x, s, torch.tensor(0.0), qmin, qmax))


def test_asymmetric_unsigned_codes_with_zero_point():
    qmin, qmax = qrange(4, symmetric=False)
    s, z = torch.tensor(0.25), torch.tensor(4.0)
    x = torch.tensor([-5.0, -1.0, -0.9, 0.0, 0.1, 0.13, 2.75, 2.76, 9.0])
    codes = quantize(x, s, z, qmin, qmax)
    assert codes.tolist() == [0, 0, 0, 4, 4, 5, 15, 15, 15]
    x_hat = fake_quantize(x, s, z, qmin, qmax)
    assert x_hat.tolist() == [-1.0, -1.0, -1.0, 0.0, 0.0, 0.25, 2.75, 2.75, 2.75]
    assert float(fake_quantize(torch.zeros(()), s, z, qmin, qmax)) == 0.0


def test_zero_point_is_rounded_in_the_forward_pass():
    qmin, qmax = qrange(8, symmetric=False)
    x = torch.linspace(-3, 3, 101)
    s = torch.tensor(0.03)
    for raw, integer in [(2.4, 2.0), (2.6, 3.0), (2.5, 2.0), (3.5, 4.0)]:
        a = fake_quantize(x, s, torch.tensor(raw), qmin, qmax)
        b = fake_quantize(x, s, torch.tensor(integer), qmin, qmax)
        assert torch.equal(a, b)
        assert torch.equal(
            quantize(x, s, torch.tensor(raw), qmin, qmax), quantize(x, s, torch.tensor(integer), qmin, qmax)
        )


def test_per_channel_step_and_zero_point_broadcast_forward():
    torch.manual_seed(0)
    qmin, qmax = qrange(4, symmetric=False)
    x = torch.randn(3, 5, 7)
    s = torch.tensor([0.1, 0.3, 1.0]).reshape(3, 1, 1)
    z = torch.tensor([2.0, 8.0, 15.0]).reshape(3, 1, 1)
    out = fake_quantize(x, s, z, qmin, qmax)
    for c in range(3):
        assert torch.equal(out[c], fake_quantize(x[c], s[c, 0, 0], z[c, 0, 0], qmin, qmax))


# -- backward: STE and LSQ -------------------------------------------------------------------------------------


def run_backward(x, s, z, qmin, qmax, grad_scale=1.0, seed=0):
    x = x.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    z = None if z is None else z.clone().requires_grad_(True)
    y = fake_quantize(x, s, z, qmin, qmax, grad_scale)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(g)
    return g, x.grad, s.grad, None if z is None else z.grad


@SETTINGS
@given(quant_case(), st.sampled_from([1.0, 0.37, 1e-3]))
def test_ste_and_lsq_gradients_follow_the_formulas(case, grad_scale):
    _, _, qmin, qmax, s, z, x = case
    g, gx, gs, gz = run_backward(x, s, z, qmin, qmax, grad_scale)
    ex, es, ez = expected_grads(x, s, z, qmin, qmax, g, grad_scale)
    # d x_hat / d x is exactly 1 inside and 0 outside, whatever the grad scale
    assert torch.equal(gx, ex)
    assert gs.shape == s.shape
    torch.testing.assert_close(gs, es, rtol=1e-5, atol=1e-6 * float(g.abs().sum() * (qmax + 1) * grad_scale + 1e-6))
    if z is not None:
        assert gz.shape == z.shape
        torch.testing.assert_close(gz, ez, rtol=1e-5, atol=1e-6 * float(g.abs().sum() * s * grad_scale + 1e-6))


@SETTINGS
@given(quant_case())
def test_gradients_match_reference_autograd_composition(case):
    _, _, qmin, qmax, s, z, x = case
    g, gx, gs, gz = run_backward(x, s, z, qmin, qmax)
    xr = x.clone().requires_grad_(True)
    sr = s.clone().requires_grad_(True)
    zr = None if z is None else z.clone().requires_grad_(True)
    ref_fake_quant(xr, sr, zr, qmin, qmax).backward(g)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-6, atol=1e-6)
    # The composition computes (q - z) - x / s as two separate sums: allow for their cancellation.
    scale = float(g.abs().sum()) * (qmax - qmin + 2)
    torch.testing.assert_close(gs, sr.grad, rtol=1e-5, atol=1e-5 * scale + 1e-6)
    if z is not None:
        torch.testing.assert_close(gz, zr.grad, rtol=1e-5, atol=1e-5 * float(g.abs().sum() * s) + 1e-6)


def test_step_gradient_hand_example():
    # 2-bit unsigned, s = 1, z = 1: codes 0..3, representable x_hat in {-1, 0, 1, 2}
    qmin, qmax = qrange(2, symmetric=False)
    x = torch.tensor([-5.0, -1.2, 0.3, 1.6, 2.4, 9.0])
    g, gx, gs, gz = run_backward(x, torch.tensor(1.0), torch.tensor(1.0), qmin, qmax)
    # per element d x_hat / d s: below -> qmin - z = -1; inside round(v) - v; above -> qmax - z = 2
    d = torch.tensor([-1.0, -1.0 + 1.2, 0.0 - 0.3, 2.0 - 1.6, 2.0 - 2.4, 2.0])
    inside = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(gs, (g * d).sum())
    assert torch.equal(gx, g * inside)
    torch.testing.assert_close(gz, (-g * (1 - inside)).sum())


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_and_per_sample_step_gradients(symmetric):
    gen = torch.Generator().manual_seed(1)
    qmin, qmax = qrange(3, symmetric)
    # per channel: weight (C_out, C_in), step (C_out, 1)
    w = torch.randn(6, 20, generator=gen) * 2
    s = torch.rand(6, 1, generator=gen) * 0.4 + 0.05
    z = None if symmetric else torch.randint(qmin, qmax + 1, (6, 1), generator=gen).float()
    g, gx, gs, gz = run_backward(w, s, z, qmin, qmax, grad_scale=0.25)
    ex, es, ez = expected_grads(w, s, z, qmin, qmax, g, 0.25)
    assert gs.shape == (6, 1)
    assert torch.equal(gx, ex)
    torch.testing.assert_close(gs, es, rtol=1e-5, atol=1e-5)
    for c in range(6):
        # a channel's step gradient only depends on that channel's elements
        xc = w[c : c + 1].clone().requires_grad_(True)
        sc = s[c : c + 1].clone().requires_grad_(True)
        fake_quantize(xc, sc, None if z is None else z[c : c + 1], qmin, qmax, 0.25).backward(g[c : c + 1])
        torch.testing.assert_close(sc.grad, gs[c : c + 1], rtol=1e-5, atol=1e-6)
    if z is not None:
        assert gz.shape == (6, 1)
        torch.testing.assert_close(gz, ez, rtol=1e-5, atol=1e-5)
    # per sample: activation (B, C, H, W), step (B, 1, 1, 1)
    x = torch.randn(4, 3, 5, 5, generator=gen) * 3
    s = torch.tensor([0.05, 0.2, 0.5, 1.0]).reshape(4, 1, 1, 1)
    z = None if symmetric else torch.tensor([0.0, 2.0, 4.0, 7.0]).reshape(4, 1, 1, 1)
    g, gx, gs, gz = run_backward(x, s, z, qmin, qmax)
    ex, es, ez = expected_grads(x, s, z, qmin, qmax, g)
    assert gs.shape == (4, 1, 1, 1)
    assert torch.equal(gx, ex)
    torch.testing.assert_close(gs, es, rtol=1e-5, atol=1e-5)
    if z is not None:
        torch.testing.assert_close(gz, ez, rtol=1e-5, atol=1e-5)


def test_scalar_step_with_leading_broadcast_dims():
    gen = torch.Generator().manual_seed(2)
    qmin, qmax = qrange(4, False)
    x = torch.randn(2, 3, 4, generator=gen) * 4
    for shape in [(), (1,), (1, 1, 1), (4,), (3, 1)]:
        s = (torch.rand(shape, generator=gen) + 0.1) if shape else torch.tensor(0.3)
        z = torch.full(shape, 5.0)
        g, gx, gs, gz = run_backward(x, s, z, qmin, qmax)
        ex, es, ez = expected_grads(x, s, z, qmin, qmax, g)
        assert gs.shape == s.shape and gz.shape == z.shape
        torch.testing.assert_close(gs, es, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gz, ez, rtol=1e-5, atol=1e-5)


def test_only_requested_gradients_are_computed():
    qmin, qmax = qrange(4, False)
    x = torch.randn(10, requires_grad=True)
    s = torch.tensor(0.2)  # frozen step
    z = torch.tensor(3.0)  # frozen zero point
    fake_quantize(x, s, z, qmin, qmax).sum().backward()
    assert x.grad is not None
    x2 = torch.randn(10)
    s2 = torch.tensor(0.2, requires_grad=True)
    fake_quantize(x2, s2, z, qmin, qmax).sum().backward()
    assert s2.grad is not None and s2.grad.shape == ()


# -- finite differences on the continuous part -------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", [(2, True), (4, False), (8, False), (8, True)])
def test_step_gradient_matches_finite_differences_on_clipped_elements(bits, symmetric):
    """Clipped elements are ``s * (qmin - z)`` or ``s * (qmax - z)``: linear in ``s``, so central differences are
    exact up to rounding there.  Inside the range the true derivative is piecewise constant and LSQ's value is a
    surrogate, so only the clipped elements are compared."""
    gen = torch.Generator().manual_seed(bits)
    qmin, qmax = qrange(bits, symmetric)
    s0 = 0.1
    z = None if symmetric else torch.tensor(float((qmin + qmax) // 3), dtype=torch.float64)
    x = torch.randn(200, generator=gen, dtype=torch.float64) * s0 * (qmax - qmin) * 0.8
    below, inside, above = regions(x, torch.tensor(s0, dtype=torch.float64), z, qmin, qmax)
    clipped = (below | above).double()
    assert 10 < int(clipped.sum()) < 190, "the draw should mix clipped and inside elements"
    # keep clipped elements well away from the range ends so a small change of s does not unclip them
    zf = 0.0 if z is None else float(z)
    margin = ((x / s0 + zf - qmax).abs() > 1.0) & ((x / s0 + zf - qmin).abs() > 1.0)
    x = torch.where(margin | inside, x, x * 1.5)
    below, inside, above = regions(x, torch.tensor(s0, dtype=torch.float64), z, qmin, qmax)
    clipped = (below | above).double()
    g = torch.randn(200, generator=gen, dtype=torch.float64)

    def f(step):
        return (g * clipped * fake_quantize(x, step, z, qmin, qmax)).sum()

    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    f(s).backward()
    h = 1e-6
    fd = (f(torch.tensor(s0 + h, dtype=torch.float64)) - f(torch.tensor(s0 - h, dtype=torch.float64))) / (2 * h)
    torch.testing.assert_close(s.grad, fd, rtol=1e-6, atol=1e-8)
    # torch's own gradcheck on a fully clipped input (the whole function is then smooth in s and x)
    xc = torch.cat([x[below], x[above]]).detach()
    assert torch.autograd.gradcheck(
        lambda st_, xx: fake_quantize(xx, st_, z, qmin, qmax),
        (s.detach().clone().requires_grad_(True), xc.clone().requires_grad_(True)),
        eps=1e-6,
    )


def test_per_channel_step_gradcheck_on_clipped_region():
    qmin, qmax = qrange(4, symmetric=True)
    s = torch.tensor([[0.1], [0.2], [0.05]], dtype=torch.float64, requires_grad=True)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    x = (s.detach() * (qmax + 3)) * sign * torch.tensor([[1.0], [1.3], [2.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda st_: fake_quantize(x, st_, None, qmin, qmax), (s,), eps=1e-7)


def test_grad_scale_helper():
    assert lsq_grad_scale(100, 7) == pytest.approx(1 / math.sqrt(700))
    assert lsq_grad_scale(0, 0) == 1.0


# -- scale_gradient ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.3, 2.0, 1e-3, 0.0])
def test_scale_gradient_is_exact_identity_forward_and_scales_backward(factor):
    x = (torch.randn(10000, generator=torch.Generator().manual_seed(3)) * 10).requires_grad_(True)
    y = scale_gradient(x, factor)
    assert torch.equal(y, x.detach())
    g = torch.randn(10000)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * factor)


@SETTINGS
@given(quant_case())
def test_inference_path_matches_training_path(case):
    _, _, qmin, qmax, s, z, x = case
    with torch.no_grad():
        fast = fake_quantize(x, s.requires_grad_(True), z, qmin, qmax)
    assert fast.grad_fn is None
    tracked = fake_quantize(x.clone().requires_grad_(True), s, z, qmin, qmax)
    assert tracked.grad_fn is not None
    assert torch.equal(fast, tracked.detach())
    with torch.inference_mode():
        assert torch.equal(fake_quantize(x, s, z, qmin, qmax), fast)


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    qmin, qmax = qrange(4, symmetric=False)
    x = (torch.randn(5, 40, generator=torch.Generator().manual_seed(4)) * 3).requires_grad_(True)
    s = torch.full((5, 1), 0.2, requires_grad=True)
    z = torch.full((5, 1), 7.0, requires_grad=True)
    y = fake_quantize(x, s, z, qmin, qmax)
    g = torch.randn(5, 40)
    y.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in (x, s, z)]
    for t in (x, s, z):
        t.grad = None
    y.backward(g)
    for a, t in zip(first, (x, s, z)):
        assert torch.equal(a, t.grad)


def test_double_backward_is_refused():
    x = torch.randn(10, requires_grad=True)
    s = torch.tensor(0.3, requires_grad=True)
    y = fake_quantize(x, s, None, -8, 7)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.parametrize(
    "x_shape,s_shape,z_shape",
    [
        ((4,), (), (3, 1)),
        ((1, 6), (), (4, 1)),
        ((5,), (3, 1), None),
        ((5,), (3, 1), (3, 1)),
        ((1, 6), (4, 1), (4, 6)),
        ((2, 1, 4), (3, 1), ()),
    ],
)
@pytest.mark.parametrize("z_dtype", [torch.float32, torch.float64])
def test_step_or_zero_point_broadcasting_beyond_x(x_shape, s_shape, z_shape, z_dtype):
    """The output takes the broadcast shape of x, step and zero point; each gradient is summed to its input's shape."""
    gen = torch.Generator().manual_seed(5)
    qmin, qmax = qrange(4, symmetric=z_shape is None)
    x = torch.randn(x_shape, generator=gen) * 3
    s = torch.rand(s_shape, generator=gen) + 0.1 if s_shape else torch.tensor(0.4)
    z = None if z_shape is None else torch.randint(0, 16, z_shape, generator=gen).to(z_dtype)
    out = fake_quantize(x, s, z, qmin, qmax)
    ref = ref_fake_quant(x, s, z, qmin, qmax)
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.equal(out, ref)
    g = torch.randn(out.shape, generator=gen)
    leaves = [x.clone().requires_grad_(True), s.clone().requires_grad_(True)]
    leaves.append(None if z is None else z.clone().requires_grad_(True))
    fake_quantize(*leaves, qmin, qmax).backward(g)
    ref_leaves = [x.clone().requires_grad_(True), s.clone().requires_grad_(True)]
    ref_leaves.append(None if z is None else z.clone().requires_grad_(True))
    ref_fake_quant(*ref_leaves, qmin, qmax).backward(g)
    for a, b in zip(leaves, ref_leaves):
        if a is not None:
            assert a.grad.shape == a.shape
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        fast = fake_quantize(x, s, z, qmin, qmax)
        assert fast.dtype == out.dtype and torch.equal(fast, out)
