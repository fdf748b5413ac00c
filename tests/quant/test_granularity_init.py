"""Granularities (tensor, channel, group) and initialisers (min-max, MSE/Lp search)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_qalora.quant import (
    PerChannel,
    PerGroup,
    PerTensor,
    WeightQuantizer,
    dequantize,
    fake_quantize,
    grouped_view,
    init_qparams,
    lp_search_qparams,
    minmax_qparams,
    qrange,
    quantize,
    step_shape,
)
from diffusers_qalora.quant.primitives import lsq_grad_scale

SETTINGS = settings(max_examples=80, deadline=None)

LINEAR = (8, 12)
CONV = (8, 12, 3, 3)


# -- granularities -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [LINEAR, CONV])
def test_grouped_view_and_step_shapes(shape):
    w = torch.randn(shape)
    cases = {
        PerTensor(): ((1, 1, w.numel()), (1, 1, 1)),
        PerChannel(): ((8, 1, w.numel() // 8), (8, 1, 1)),
        PerGroup(4): ((8, 3, w.numel() // 24), (8, 3, 1)),
        PerGroup(12): ((8, 1, w.numel() // 8), (8, 1, 1)),
        PerGroup(1): ((8, 12, w.numel() // 96), (8, 12, 1)),
    }
    for gran, (view_shape, s_shape) in cases.items():
        assert tuple(grouped_view(w, gran).shape) == view_shape
        assert step_shape(shape, gran) == s_shape


@pytest.mark.parametrize("shape", [LINEAR, CONV])
def test_group_holds_consecutive_input_channels_and_the_kernel_window(shape):
    w = torch.randn(shape)
    gv = grouped_view(w, PerGroup(4))
    for o in range(shape[0]):
        for g in range(3):
            assert torch.equal(gv[o, g], w[o, 4 * g : 4 * g + 4].reshape(-1))
    cv = grouped_view(w, PerChannel())
    for o in range(shape[0]):
        assert torch.equal(cv[o, 0], w[o].reshape(-1))


@pytest.mark.parametrize("shape", [LINEAR, CONV])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(), PerGroup(4), PerGroup(6)], ids=str)
def test_weight_quantizer_matches_per_cell_fake_quantization(shape, symmetric, gran):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    wq = WeightQuantizer(shape, bits=4, symmetric=symmetric, granularity=gran)
    s_shape = step_shape(shape, gran)
    assert tuple(wq.step.shape) == s_shape
    assert (wq.zero_point is None) == symmetric
    with torch.no_grad():
        wq.step.copy_(torch.rand(s_shape, generator=gen) * 0.3 + 0.02)
        if not symmetric:
            wq.zero_point.copy_(torch.randint(0, 16, s_shape, generator=gen).float())
    out = wq(w)
    assert out.shape == w.shape
    gsize = shape[1] // s_shape[1]
    for o in range(shape[0]):
        for g in range(s_shape[1]):
            oi = 0 if isinstance(gran, PerTensor) else o
            s = wq.step[oi, g, 0].detach()
            z = None if symmetric else wq.zero_point[oi, g, 0]
            cell = w[o, g * gsize : (g + 1) * gsize]
            assert torch.equal(out[o, g * gsize : (g + 1) * gsize], fake_quantize(cell, s, z, wq.qmin, wq.qmax))
    # integer codes agree with the fake-quantized weight
    codes = wq.quantize(w)
    assert codes.shape == w.shape and codes.dtype == torch.int32
    assert int(codes.min()) >= wq.qmin and int(codes.max()) <= wq.qmax
    deq = dequantize(grouped_view(codes, gran), wq.step.detach(), wq.zero_point).reshape(shape)
    assert torch.equal(deq, out.detach())


def test_changing_one_group_step_only_changes_that_group():
    w = torch.randn(CONV)
    wq = WeightQuantizer(CONV, bits=3, granularity=PerGroup(4))
    wq.initialize_(w, "minmax")
    before = wq(w).detach()
    with torch.no_grad():
        wq.step[2, 1, 0] *= 1.7
    after = wq(w).detach()
    changed = (before != after).any(dim=(2, 3))
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[2, 4:8] = True
    assert bool(changed[expected].any())
    assert not bool(changed[~expected].any())


@pytest.mark.parametrize("shape", [LINEAR, CONV])
def test_group_step_gradient_sums_over_its_cell(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    wq = WeightQuantizer(shape, bits=4, symmetric=False, granularity=PerGroup(3))
    wq.initialize_(w, "minmax")
    g = torch.randn(shape)
    (wq(w) * g).sum().backward()
    assert wq.step.grad.shape == wq.step.shape
    for o in (0, 5):
        for grp in (0, 3):
            cell = slice(3 * grp, 3 * grp + 3)
            s = wq.step[o, grp, 0].detach().clone().requires_grad_(True)
            z = wq.zero_point[o, grp, 0]
            (fake_quantize(w[o, cell], s, z, wq.qmin, wq.qmax) * g[o, cell]).sum().backward()
            torch.testing.assert_close(wq.step.grad[o, grp, 0], s.grad, rtol=1e-5, atol=1e-6)


def test_weight_quantizer_lsq_grad_scale_uses_elements_per_cell():
    wq = WeightQuantizer(CONV, bits=4, symmetric=True, granularity=PerChannel(), lsq_grad_scale=True)
    assert wq.grad_scale == pytest.approx(lsq_grad_scale(12 * 9, 7))
    wq_g = WeightQuantizer(CONV, bits=4, symmetric=False, granularity=PerGroup(4), lsq_grad_scale=True)
    assert wq_g.grad_scale == pytest.approx(lsq_grad_scale(4 * 9, 15))
    plain = WeightQuantizer(CONV, bits=4)
    assert plain.grad_scale == 1.0
    w = torch.randn(CONV)
    for q in (wq, plain):
        q.initialize_(w, "minmax")
        q(w).pow(2).sum().backward()
    torch.testing.assert_close(wq.step.grad, plain.step.grad * wq.grad_scale)


@pytest.mark.parametrize("shape", [LINEAR, CONV, (8, 10)])
def test_group_size_not_dividing_channels_raises(shape):
    with pytest.raises(ValueError, match="`group_size`"):
        WeightQuantizer(shape, bits=4, granularity=PerGroup(5) if shape[1] != 10 else PerGroup(3))
    bad = PerGroup(5) if shape[1] != 10 else PerGroup(4)
    with pytest.raises(ValueError, match="`group_size`"):
        grouped_view(torch.randn(shape), bad)
    with pytest.raises(ValueError, match="`group_size`"):
        step_shape(shape, bad)


def test_granularity_validation():
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="`group_size`"):
            PerGroup(bad)
    with pytest.raises(ValueError, match="2 dims"):
        WeightQuantizer((8,), bits=4)
    with pytest.raises(TypeError):
        WeightQuantizer(LINEAR, bits=4, granularity="channel")


def test_non_contiguous_weight():
    w = torch.randn(12, 8).t()  # (8, 12), not contiguous
    wq = WeightQuantizer(LINEAR, bits=4, granularity=PerGroup(4))
    wq.initialize_(w, "minmax")
    torch.testing.assert_close(wq(w), wq(w.contiguous()), rtol=0, atol=0)


def test_weight_quantizer_low_precision_weight():
    w = torch.randn(LINEAR).to(torch.bfloat16)
    wq = WeightQuantizer(LINEAR, bits=4)
    wq.initialize_(w, "minmax")
    out = wq(w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, wq(w.float()).to(torch.bfloat16))


# -- initialisers ------------------------------------------------------------------------------------------------


@st.composite
def init_case(draw):
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "positive", "negative", "outlier", "constant"]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, cols, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    if kind == "positive":
        x = x.abs()
    elif kind == "negative":
        x = -x.abs()
    elif kind == "outlier":
        x[:, :, 0] *= 30
    elif kind == "constant":
        x = torch.full_like(x, float(x[0, 0, 0]))
    return bits, symmetric, x


def quant_error(x, step, zp, bits, symmetric, p):
    qmin, qmax = qrange(bits, symmetric)
    x_hat = fake_quantize(x.double(), step.double(), None if zp is None else zp.double(), qmin, qmax)
    return (x.double() - x_hat).abs().pow(p).sum(dim=-1)


@SETTINGS
@given(init_case())
def test_minmax_covers_the_range(case):
    bits, symmetric, x = case
    qmin, qmax = qrange(bits, symmetric)
    step, zp = minmax_qparams(x, bits, symmetric)
    assert step.shape == (x.shape[0], 1, 1)
    assert bool((step > 0).all())
    if symmetric:
        assert zp is None
    else:
        assert zp.shape == step.shape
        assert torch.equal(zp, torch.round(zp))
        assert bool(((zp >= qmin) & (zp <= qmax)).all())
    # no element is clipped: every element is within half a step of its quantized value
    zr = 0.0 if zp is None else zp
    unclamped = torch.round(x / step) + zr
    assert bool(((unclamped >= qmin) & (unclamped <= qmax)).all())
    x_hat = fake_quantize(x, step, zp, qmin, qmax)
    tol = step / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    assert bool(((x - x_hat).abs() <= tol).all())
    # zero is exactly representable
    assert bool((fake_quantize(torch.zeros_like(x), step, zp, qmin, qmax) == 0).all())
    # the step is not wastefully large: the range spans at least (almost) all codes
    span = (x.amax(-1, keepdim=True).clamp_min(0) - x.amin(-1, keepdim=True).clamp_max(0)).double()
    if symmetric:
        span_codes = 2 * qmax
        ref = 2 * torch.maximum(x.amax(-1, keepdim=True).abs(), x.amin(-1, keepdim=True).abs()).double()
        expected = ref / span_codes
    else:
        expected = span / (qmax - qmin)
    big = expected > 1e-6
    torch.testing.assert_close(step.double()[big], expected[big], rtol=1e-5, atol=0)


@SETTINGS
@given(init_case(), st.sampled_from([("mse", 2.0), ("lp", 2.4)]))
def test_search_never_worse_than_minmax(case, method_p):
    bits, symmetric, x = case
    method, p = method_p
    s_mm, z_mm = init_qparams(x, bits, symmetric, "minmax")
    s_se, z_se = init_qparams(x, bits, symmetric, method)
    assert s_se.shape == s_mm.shape and (z_se is None) == symmetric
    if not symmetric:
        assert torch.equal(z_se, torch.round(z_se))
    err_mm = quant_error(x, s_mm, z_mm, bits, symmetric, p)
    err_se = quant_error(x, s_se, z_se, bits, symmetric, p)
    assert bool((err_se <= err_mm * (1 + 1e-5) + 1e-30).all()), (err_se, err_mm)


def test_search_beats_minmax_with_an_outlier():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 4096, generator=gen)
    x[:, :, 0] = 40.0
    for method, p in (("mse", 2.0), ("lp", 2.4)):
        s_mm, z_mm = init_qparams(x, 4, False, "minmax")
        s_se, z_se = init_qparams(x, 4, False, method)
        err_mm = quant_error(x, s_mm, z_mm, 4, False, p)
        err_se = quant_error(x, s_se, z_se, 4, False, p)
        assert bool((err_se < 0.8 * err_mm).all())
        assert bool((s_se < s_mm).all())


def test_search_is_best_among_its_candidates():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 500, generator=gen) ** 3
    step, zp = lp_search_qparams(x, 3, False, p=2.0, num_candidates=20, min_ratio=0.2)
    best = quant_error(x, step, zp, 3, False, 2.0)
    for ratio in torch.linspace(1.0, 0.2, 20).tolist():
        s_r, z_r = minmax_qparams(x * ratio, 3, False)
        assert bool((best <= quant_error(x, s_r, z_r, 3, False, 2.0) * (1 + 1e-6)).all())


def test_init_validation():
    x = torch.randn(1, 1, 10)
    with pytest.raises(ValueError, match="`init_method`"):
        init_qparams(x, 4, True, "percentile")
    with pytest.raises(ValueError, match="`num_candidates`"):
        lp_search_qparams(x, 4, True, num_candidates=0)
    with pytest.raises(ValueError, match="`min_ratio`"):
        lp_search_qparams(x, 4, True, min_ratio=0.0)
    with pytest.raises(ValueError, match="`init_method`"):
        WeightQuantizer(LINEAR, 4).initialize_(torch.randn(LINEAR), "bogus")


def test_all_zero_input_gives_finite_positive_step():
    for method in ("minmax", "mse", "lp"):
        for symmetric in (True, False):
            step, zp = init_qparams(torch.zeros(2, 1, 16), 4, symmetric, method)
            assert bool(torch.isfinite(step).all() and (step > 0).all())
            x_hat = fake_quantize(torch.zeros(2, 1, 16), step, zp, *qrange(4, symmetric))
            assert bool((x_hat == 0).all())


@pytest.mark.parametrize("method", ["minmax", "mse", "lp"])
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(), PerGroup(3)], ids=str)
def test_weight_quantizer_initialize_uses_grouped_view(method, gran):
    w = torch.randn(CONV, generator=torch.Generator().manual_seed(2))
    wq = WeightQuantizer(CONV, bits=4, symmetric=False, granularity=gran)
    wq.initialize_(w, method)
    step, zp = init_qparams(grouped_view(w, gran), 4, False, method)
    assert torch.equal(wq.step.detach(), step)
    assert torch.equal(wq.zero_point, zp)
    assert not wq.step.grad_fn
    # codes pass through quantize -> dequantize to the fake-quantized weight
    codes = wq.quantize(w)
    assert torch.equal(
        dequantize(grouped_view(codes, gran), wq.step.detach(), wq.zero_point).reshape(CONV), wq(w).detach()
    )
    assert torch.equal(codes, quantize(grouped_view(w, gran), step, zp, wq.qmin, wq.qmax).reshape(CONV))
