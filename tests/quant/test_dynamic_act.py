"""Dynamic activation quantization (per token, per token and channel group) against an independent computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_qalora.quant import DynamicActQuantizer, PerGroup, PerToken
from diffusers_qalora.quant.quantizers import copy_calibration_, dynamic_fake_quantize


def _expected_row(row: list[float], bits: int, symmetric: bool) -> list[float]:
    """One token (group) quantized and dequantized, in plain Python floats (float64): the formulas written out."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        step = max(abs(v) for v in row) / qmax
        zero = 0
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)
        step = (hi - lo) / (qmax - qmin)
        zero = min(max(round(qmin - lo / step), qmin), qmax)
    if step == 0:
        return [0.0] * len(row)
    return [step * (min(max(round(v / step) + zero, qmin), qmax) - zero) for v in row]


def _expected(x: torch.Tensor, bits: int, symmetric: bool, group: int | None, channel_dim: int) -> torch.Tensor:
    moved = x.double().movedim(channel_dim, -1)
    rows = moved.reshape(-1, group or moved.shape[-1]).tolist()
    out = torch.tensor([_expected_row(r, bits, symmetric) for r in rows], dtype=torch.float64)
    return out.reshape(moved.shape).movedim(-1, channel_dim)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 4])
def test_linear_input_matches_the_formulas(bits, symmetric, group):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * torch.linspace(0.1, 4.0, 16) + 0.3  # channels of very different ranges
    gran = PerToken() if group is None else PerGroup(group)
    got = DynamicActQuantizer(bits, symmetric, gran, channel_dim=-1)(x)
    want = _expected(x, bits, symmetric, group, -1)
    # float32 step sizes against float64 ones: the codes may differ only at rounding ties, which random data avoids
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("group", [None, 2])
def test_conv_input_is_quantized_per_pixel_over_channels(group):
    """A token of a convolution is a pixel: the step is shared by its channels, not by a channel's pixels."""
    torch.manual_seed(1)
    x = torch.randn(2, 6, 4, 5)
    x[:, :, 0, 0] *= 100.0  # one loud pixel must not coarsen the others
    gran = PerToken() if group is None else PerGroup(group)
    got = DynamicActQuantizer(4, False, gran, channel_dim=1)(x)
    torch.testing.assert_close(got.double(), _expected(x, 4, False, group, 1), rtol=0, atol=1e-4)
    quiet = (got - x)[:, :, 1:, 1:].abs().max()
    assert quiet < x[:, :, 1:, 1:].abs().max() / 7  # a per-tensor step (set by the loud pixel) would be ~100x coarser


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=8, max_size=8),
    st.sampled_from([2, 3, 4, 8]),
    st.booleans(),
)
def test_extremes_hit_the_end_codes_and_zero_is_exact(values, bits, symmetric):
    x = torch.tensor([values + [0.0]])  # one token of 9 channels, 0 included
    q = DynamicActQuantizer(bits, symmetric)
    codes = q.integer_codes(x)
    qmin, qmax = q.qmin, q.qmax
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    out = q(x)
    assert out[0, -1] == 0  # 0 is a code (the zero point), so padding and ReLU zeros stay exact
    if symmetric and x.abs().max() > 0:
        assert codes.abs().max() == qmax  # the largest magnitude uses the top code: no wasted range, no clipping
    elif not symmetric and x.max() > x.min():
        # the whole [min(x, 0), max(x, 0)] range is covered; the zero point's rounding moves an end by at most one
        assert int(codes.max()) - int(codes.min()) >= qmax - qmin - 1
    step = q.qparams(x)[0]
    assert float((out - x).abs().max()) <= float(step.max()) * (0.5 + 1e-4) + 1e-6  # never clipped


def test_all_zero_token_and_empty_input():
    q = DynamicActQuantizer(4)
    x = torch.zeros(2, 8)
    assert torch.equal(q(x), x)
    empty = torch.zeros(0, 8)
    assert q(empty).shape == (0, 8)


def test_gradient_is_straight_through_and_step_has_none():
    x = torch.randn(4, 16, requires_grad=True)
    q = DynamicActQuantizer(4, False, PerGroup(8))
    assert list(q.parameters()) == []  # nothing to learn or to calibrate
    (q(x) * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(16.0).expand(4, 16))


def test_low_precision_inputs_quantize_in_float32():
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    out = DynamicActQuantizer(8)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, dynamic_fake_quantize(x.float(), 8, False, PerToken(), -1).bfloat16())


def test_calibration_passes_inputs_through_and_copy_needs_nothing():
    q = DynamicActQuantizer(4)
    x = torch.randn(2, 8)
    q.start_calibration("lp")
    assert q.is_calibrating and torch.equal(q(x), x)
    q.finish_calibration()
    assert not q.is_calibrating and not torch.equal(q(x), x)
    q.enabled = False
    assert torch.equal(q(x), x)
    copy_calibration_(q, DynamicActQuantizer(8))  # a dynamic target takes nothing from its source


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="act_group_size.*divide"):
        DynamicActQuantizer(4, granularity=PerGroup(3))(torch.randn(2, 8))
    with pytest.raises(TypeError, match="PerToken"):
        DynamicActQuantizer(4, granularity="token")
    with pytest.raises(ValueError, match="act_bits"):
        DynamicActQuantizer(9)
