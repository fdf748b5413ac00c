"""Tests of the full-precision WinogradConv2d: equality with F.conv2d, scale invariance, eligibility, round trips."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffusers_qalora.winograd import (
    WinogradConfig,
    WinogradConv2d,
    WinogradPrecisionWarning,
    sqnr_db,
    winograd_conv2d,
    winograd_ineligibility,
    winograd_transforms,
)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def conv_cases(draw):
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, 3 - 2 * ph), 13))
    w = draw(st.integers(max(1, 3 - 2 * pw), 13))
    return {
        "batch": draw(st.integers(1, 2)),
        "c_in": draw(st.integers(1, 4)),
        "c_out": draw(st.integers(1, 4)),
        "h": h,
        "w": w,
        "padding": (ph, pw),
        "tile": draw(st.sampled_from([2, 4, 6])),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@SETTINGS
@given(case=conv_cases())
def test_fp_winograd_equals_conv2d_in_float64(case):
    gen = torch.Generator().manual_seed(case["seed"])
    conv = nn.Conv2d(case["c_in"], case["c_out"], 3, padding=case["padding"], bias=case["bias"]).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(case["batch"], case["c_in"], case["h"], case["w"], generator=gen, dtype=torch.float64)
    layer = WinogradConv2d.from_conv2d(conv, case["tile"], bits=None)
    with torch.no_grad():
        ref = conv(x)
        out = layer(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # any positive transform scales leave the full-precision result unchanged
    with torch.no_grad():
        layer.scales.log_b.uniform_(-2.0, 2.0, generator=gen)
        layer.scales.log_g.uniform_(-2.0, 2.0, generator=gen)
        torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("scale_init", ["lavin", "balanced"])
def test_fp_winograd_float32_close_to_conv2d(tile, scale_init):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(2, 16, 11, 9)
    layer = WinogradConv2d.from_conv2d(conv, tile, bits=None, scale_init=scale_init)
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert sqnr_db(ref, layer(x)) > 95.0  # notes: 125 / 109 / 103 dB at C=320


def test_fp_winograd_backward_matches_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    layer = WinogradConv2d.from_conv2d(copy.deepcopy(conv), 4, bits=None)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    conv(x).pow(2).sum().backward()
    layer(x2).pow(2).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.weight.grad, conv.weight.grad, atol=1e-9, rtol=0)
    torch.testing.assert_close(layer.bias.grad, conv.bias.grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("padding, expected", [("same", (1, 1)), ("valid", (0, 0)), (2, (2, 2)), ((0, 3), (0, 3))])
def test_padding_forms_and_to_conv2d_round_trip(padding, expected):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=padding).double()
    layer = WinogradConv2d.from_conv2d(conv, 2, bits=None)
    assert layer._pad == expected and layer.padding == conv.padding
    x = torch.randn(1, 3, 8, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-10, rtol=0)
    back = layer.to_conv2d()
    assert isinstance(back, nn.Conv2d) and back.padding == conv.padding
    assert back.weight is conv.weight and back.bias is conv.bias  # shared, no copy
    torch.testing.assert_close(back(x), conv(x), atol=0, rtol=0)


def test_from_conv2d_shares_parameters_and_keeps_dtype_device():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    layer = WinogradConv2d.from_conv2d(conv)
    assert layer.weight is conv.weight and layer.bias is None
    assert layer.scales.log_b.device == conv.weight.device
    assert layer.config == WinogradConfig(tile=4)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride) == (4, 6, (3, 3), (1, 1))
    names = dict(layer.named_parameters())
    assert set(names) == {"weight", "scales.log_b", "scales.log_g"}


def test_from_conv2d_config_and_overrides_do_not_mutate_the_config():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    cfg = WinogradConfig(tile=2, bits=8, group_size=4)
    layer = WinogradConv2d.from_conv2d(conv, 6, config=cfg, bits=4)
    assert (layer.config.tile, layer.config.bits, layer.config.group_size) == (6, 4, 4)
    assert cfg == WinogradConfig(tile=2, bits=8, group_size=4)
    with pytest.raises(TypeError, match="unknown WinogradConfig fields"):
        WinogradConv2d.from_conv2d(conv, bitz=4)
    with pytest.raises(TypeError, match="WinogradConfig"):
        WinogradConv2d.from_conv2d(conv, config={"tile": 4})


INELIGIBLE = [
    (nn.Conv2d(3, 3, 5, padding=2), "kernel size"),
    (nn.Conv2d(3, 3, (3, 1)), "kernel size"),
    (nn.Conv2d(3, 3, 3, stride=2), "stride"),
    (nn.Conv2d(3, 3, 3, dilation=2), "dilation"),
    (nn.Conv2d(4, 4, 3, groups=2), "groups"),
    (nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (nn.ConvTranspose2d(3, 3, 3), "transposed"),
    (nn.Conv1d(3, 3, 3), "not 2-D"),
    (nn.Linear(3, 3), "not a convolution"),
    (nn.LazyConv2d(3, 3), "lazy"),
]


@pytest.mark.parametrize("module, reason", INELIGIBLE, ids=[r for _, r in INELIGIBLE])
def test_ineligible_convs_are_rejected_with_the_reason(module, reason):
    assert reason in winograd_ineligibility(module)
    with pytest.raises(ValueError, match=reason):
        WinogradConv2d.from_conv2d(module)


class _CustomConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _PlainSubclass(nn.Conv2d):
    pass


def test_eligibility_of_subclasses_and_parametrized_convs():
    assert winograd_ineligibility(nn.Conv2d(3, 3, 3, padding="same")) is None
    assert winograd_ineligibility(_PlainSubclass(3, 3, 3)) is None
    assert "overrides forward" in winograd_ineligibility(_CustomConv(3, 3, 3))
    conv = nn.Conv2d(3, 3, 3)
    nn.utils.parametrize.register_parametrization(conv, "weight", nn.Identity())
    assert "parametriz" in winograd_ineligibility(conv)


def test_group_size_must_divide_in_channels():
    conv = nn.Conv2d(12, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"`group_size` \(8\) must divide in_channels \(12\)"):
        WinogradConv2d.from_conv2d(conv, bits=8, group_size=8)
    WinogradConv2d.from_conv2d(conv, bits=8, group_size=6)
    WinogradConv2d.from_conv2d(conv, bits=None, group_size=8)  # unquantized: group_size is unused


def test_input_errors():
    layer = WinogradConv2d(4, 4, padding=0, config=WinogradConfig(bits=None))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        layer(torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="padding"):
        WinogradConv2d(4, 4, padding="full")
    with pytest.raises(ValueError, match="quant_mode"):
        layer.quant_mode = "int"


def test_direct_constructor_initialises_like_conv2d():
    torch.manual_seed(0)
    layer = WinogradConv2d(16, 8, config=WinogradConfig(bits=None))
    bound = 1.0 / (16 * 9) ** 0.5
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    x = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer.double()(x), layer.reference_forward(x), atol=1e-10, rtol=0)


def test_state_dict_round_trip_and_deepcopy():
    torch.manual_seed(0)
    a = WinogradConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding=1), 4, bits=8)
    with torch.no_grad():
        a.scales.log_b.normal_()
    b = WinogradConv2d(4, 4, config=WinogradConfig(tile=4, bits=8))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(b(x), a(x))
    torch.testing.assert_close(copy.deepcopy(a)(x), a(x))


def test_functional_winograd_conv2d():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 7, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    for m in (2, 4, 6):
        out = winograd_conv2d(x, w, b, padding=(1, 2), transforms=winograd_transforms(m))
        torch.testing.assert_close(out, F.conv2d(x, w, b, padding=(1, 2)), atol=1e-10, rtol=0)


def test_f63_in_half_precision_warns():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    with pytest.warns(WinogradPrecisionWarning, match="F\\(6,3\\)"):
        WinogradConv2d.from_conv2d(conv, 6, bits=None).to(torch.bfloat16)(x.to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", WinogradPrecisionWarning)
        WinogradConv2d.from_conv2d(conv, 4, bits=None).to(torch.bfloat16)(x.to(torch.bfloat16))
        WinogradConv2d.from_conv2d(conv, 6, bits=None)(x)
        # the quantized modes compute in float32 whatever the input dtype
        out = WinogradConv2d.from_conv2d(conv, 6, bits=8).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_config_round_trip_and_errors():
    cfg = WinogradConfig(
        tile=6,
        bits=8,
        group_size=32,
        act_granularity="tile",
        output_bits=8,
        points=("0", "1", "-1", "2", "-2", "3/2", "-3/2", "inf"),
    )
    assert WinogradConfig.from_dict(cfg.to_dict()) == cfg
    assert WinogradConfig(points=(0, 1, -1, 0.5, -0.5, float("inf"))).points == ("0", "1", "-1", "1/2", "-1/2", "inf")
    bad = [
        ({"tile": 3}, "`tile`"),
        ({"tile": True}, "`tile`"),
        ({"bits": 9}, "`bits`"),
        ({"bits": None, "output_bits": 8}, "`output_bits` needs `bits`"),
        ({"group_size": 0}, "`group_size`"),
        ({"act_granularity": "channel"}, "`act_granularity`"),
        ({"scale_init": "ones"}, "`scale_init`"),
        ({"weight_init": "lp"}, "`weight_init`"),
        ({"points": ("0", "1", "inf")}, "`points`"),
        ({"version": 2}, "`version`"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            WinogradConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown WinogradConfig keys"):
        WinogradConfig.from_dict({"tile": 4, "tiles": 4})


def test_custom_points_layer_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1).double()
    cfg = WinogradConfig(tile=6, bits=None, points=("0", "1", "-1", "2", "-2", "3/2", "-3/2", "inf"))
    layer = WinogradConv2d.from_conv2d(conv, config=cfg)
    x = torch.randn(1, 3, 13, 13, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-10, rtol=0)
    assert "3/2" in repr(layer.transforms)
