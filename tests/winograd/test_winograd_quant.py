"""Tests of the fully quantized Winograd path: an independent reference, fake vs integer modes, exact accumulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_qalora.winograd import WinogradConfig, WinogradConv2d, sqnr_db
from diffusers_qalora.winograd.quantized import exact_accumulator_dtype, hadamard_int

# -- an independent reference: explicit 6-D tensors, python loops over tiles, einsum for the transforms ----------


def _reference_quantized(layer: WinogradConv2d, x: torch.Tensor) -> torch.Tensor:
    """Float64 re-implementation of the quantized forward from the definitions, without the layer's helpers."""
    cfg = layer.config
    t = layer.transforms
    at, g_mat, bt = t.AT, t.G, t.BT
    m, n = t.m, t.n
    qmax = 2 ** (cfg.bits - 1) - 1
    x = x.double()
    w = layer.weight.detach().double()
    batch, c, h, wd = x.shape
    k = w.shape[0]
    gs = c if cfg.group_size is None else cfg.group_size
    ph, pw = layer._pad
    ho, wo = h + 2 * ph - 2, wd + 2 * pw - 2
    th, tw = math.ceil(ho / m), math.ceil(wo / m)
    xp = torch.zeros(batch, c, th * m + 2, tw * m + 2, dtype=torch.float64)
    xp[:, :, ph : ph + h, pw : pw + wd] = x
    d = torch.empty(batch, c, th, tw, n, n, dtype=torch.float64)
    for a in range(th):
        for b in range(tw):
            d[:, :, a, b] = xp[:, :, a * m : a * m + n, b * m : b * m + n]
    v = torch.einsum("ai,nctsij,bj->nctsab", bt, d, bt)
    u = torch.einsum("ai,kcij,bj->kcab", g_mat, w, g_mat)

    def q(val, step, bits=cfg.bits):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(val / step), lo, hi) * step

    ug = u.reshape(k, c // gs, gs, n, n)
    u_hat = q(ug, (ug.abs().amax(dim=2, keepdim=True) / qmax).clamp_min(1e-30)).reshape(k, c, n, n)
    vg = v.reshape(batch, c // gs, gs, th, tw, n, n)
    dims = (2,) if cfg.act_granularity == "position" else (2, 5, 6)
    v_hat = q(vg, (vg.abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(1e-30)).reshape(v.shape)
    prod = torch.einsum("kcab,nctsab->nktsab", u_hat, v_hat)
    if cfg.output_bits is not None:
        oq = 2 ** (cfg.output_bits - 1) - 1
        prod = q(prod, (prod.abs().amax(dim=(4, 5), keepdim=True) / oq).clamp_min(1e-30), cfg.output_bits)
    y_tiles = torch.einsum("ia,nktsab,jb->nktsij", at, prod, at)
    y = y_tiles.permute(0, 1, 2, 4, 3, 5).reshape(batch, k, th * m, tw * m)[:, :, :ho, :wo]
    if layer.bias is not None:
        y = y + layer.bias.detach().double().view(1, -1, 1, 1)
    return y


def _layer(tile=4, c_in=8, c_out=6, padding=1, seed=0, dtype=torch.float32, **cfg) -> WinogradConv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, padding=padding).to(dtype)
    return WinogradConv2d.from_conv2d(conv, tile, **cfg)


CONFIGS = [
    {"bits": 8},
    {"bits": 8, "group_size": 2},
    {"bits": 8, "group_size": 4, "act_granularity": "tile"},
    {"bits": 8, "group_size": 2, "output_bits": 8, "scale_init": "lavin"},
    {"bits": 4, "group_size": 4, "act_granularity": "tile", "output_bits": 6},
    {"bits": 8, "group_size": 4, "weight_init": "mse"},
]


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_int_mode_matches_independent_reference_in_float64(tile, cfg):
    layer = _layer(tile, dtype=torch.float64, padding=(1, 0), **cfg)
    with torch.no_grad():
        layer.scales.log_b.uniform_(-0.5, 0.5)
        layer.scales.log_g.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    if cfg.get("weight_init") == "mse":  # the reference has no MSE search: compare against fake mode instead
        layer.quant_mode = "fake"
        with torch.no_grad():
            ref = layer(x)
    else:
        ref = _reference_quantized(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_fake_and_int_modes_agree_in_float32(tile, cfg):
    layer = _layer(tile, c_in=16, c_out=8, **cfg)
    x = torch.randn(2, 16, 10, 9)
    with torch.no_grad():
        y_int = layer(x)
        layer.quant_mode = "fake"
        y_fake = layer(x)
    if cfg.get("output_bits") is None:
        torch.testing.assert_close(y_int, y_fake, atol=1e-5 * y_fake.abs().max().item(), rtol=1e-5)
    else:  # M is re-quantized: a rare rounding tie may flip one code between the two summation orders
        assert sqnr_db(y_fake, y_int) > 60.0


def test_exact_accumulator_dtype_bound():
    assert exact_accumulator_dtype(1024, 8, torch.float32) == torch.float32  # 1024 * 128^2 = 2^24
    assert exact_accumulator_dtype(1025, 8, torch.float32) == torch.float64
    assert exact_accumulator_dtype(2**16, 4, torch.float32) == torch.float32  # 2^16 * 8^2 = 2^22
    assert exact_accumulator_dtype(32, 8, torch.float64) == torch.float64


@pytest.mark.parametrize("group", [64, 4096])
def test_integer_accumulation_is_exact(group):
    # large same-sign codes: with group=4096 the sums exceed 2^24, where float32 accumulation would round
    gen = torch.Generator().manual_seed(0)
    n2, k, p = 4, 3, 5
    codes_u = torch.randint(64, 128, (1, n2, k, group), generator=gen, dtype=torch.int32)
    step_u = torch.ones(1, n2, k, 1, dtype=torch.float64)
    v = torch.randint(64, 128, (n2, group, p), generator=gen).float()
    v[:, 0] = 127.0  # the absmax step of V is then exactly 1 and V's codes are V itself
    out = hadamard_int(codes_u, step_u, v, bits=8, group_size=None)
    exact = torch.matmul(codes_u[0].long(), v.long())  # int64 reference
    # the only rounding is the final conversion of the exact group sum to float32
    assert torch.equal(out, exact.to(torch.float64).to(torch.float32))
    assert (exact.abs().max() > 2**24) == (group > 1024)


def test_quantized_sqnr_levels_w8a8():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 12, 12)
    ref = conv(x).detach()
    expected = {2: 32.0, 4: 17.0, 6: 12.0}  # measured ~38 / 22 / 17 dB; intrinsic Winograd error amplification
    for tile, low in expected.items():
        layer = WinogradConv2d.from_conv2d(conv, tile, bits=8)
        with torch.no_grad():
            assert sqnr_db(ref, layer(x)) > low, tile


def test_smaller_groups_do_not_hurt():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 16, 3, padding=1)
    x = torch.randn(2, 64, 8, 8) * torch.linspace(0.1, 3.0, 64).view(1, -1, 1, 1)  # channel-dependent ranges
    ref = conv(x).detach()
    with torch.no_grad():
        whole = sqnr_db(ref, WinogradConv2d.from_conv2d(conv, 4, bits=8)(x))
        grouped = sqnr_db(ref, WinogradConv2d.from_conv2d(conv, 4, bits=8, group_size=8)(x))
    assert grouped > whole + 1.0


def test_scales_are_invisible_with_per_position_groups():
    layer = _layer(6, dtype=torch.float64, bits=8, group_size=4, scale_init="lavin")
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        layer.scales.log_b.uniform_(-2, 2)
        layer.scales.log_g.uniform_(-2, 2)
        after = layer(x)
    assert sqnr_db(before, after) > 100.0


def test_scales_matter_for_the_integer_output_transform():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 12, 12)
    ref = conv(x).detach()
    with torch.no_grad():
        lavin = sqnr_db(ref, WinogradConv2d.from_conv2d(conv, 6, bits=8, output_bits=8, scale_init="lavin")(x))
        balanced = sqnr_db(ref, WinogradConv2d.from_conv2d(conv, 6, bits=8, output_bits=8, scale_init="balanced")(x))
    assert lavin < 0.0 < 10.0 < balanced  # notes: -17 dB -> 14 dB for F(6,3)


def test_fake_mode_is_differentiable_wrt_scales_weight_and_input():
    layer = _layer(6, bits=8, group_size=4, output_bits=8, act_granularity="tile", scale_init="lavin")
    layer.quant_mode = "fake"
    x = torch.randn(1, 8, 7, 7, requires_grad=True)
    ref = layer.reference_forward(x).detach()
    F.mse_loss(layer(x), ref).backward()
    for p in (layer.scales.log_b, layer.scales.log_g, layer.weight, x):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_int_mode_cache_follows_weight_and_scale_updates():
    layer = _layer(4, bits=8, group_size=4)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        first = layer(x)
        layer.weight.mul_(2.0)
        doubled = layer(x)
        bias = layer.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(doubled - bias, 2.0 * (first - bias), rtol=1e-5, atol=1e-5)
        layer.weight.div_(2.0)
        layer.scales.log_b.fill_(0.3)
        layer.quant_mode = "fake"
        fake = layer(x)
        layer.quant_mode = "int"
        torch.testing.assert_close(layer(x), fake, rtol=1e-5, atol=1e-5)


def test_config_shorthand_groups_and_repr():
    layer = WinogradConv2d(32, 8, config=WinogradConfig(tile=6, bits=8, group_size=32, output_bits=8))
    assert layer.quant_mode == "int"
    text = repr(layer)
    assert "tile=6" in text and "group_size=32" in text and "output_bits=8" in text
    with pytest.raises(ValueError, match="quant_mode"):
        layer.quant_mode = "int8"
