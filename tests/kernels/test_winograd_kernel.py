"""The integer Winograd kernels (Triton, run by the interpreter on CPU) against the torch reference, which is the
``"int"`` mode of `diffusers_qalora.winograd.WinogradConv2d`, stage by stage and end to end; and the wiring of that
mode to the kernels.

Tolerances: the GEMM stage is exact (integer sums, the reference's scaling order), so for equal codes the two paths
give the same bits.  The input and output transforms sum in another order than torch's GEMM: codes may differ where
``V / s`` lies within float rounding of a rounding boundary (at most 1 in 1000 here), outputs by float rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffusers_qalora as dq
from diffusers_qalora.kernels import resolved_kernel
from diffusers_qalora.kernels.winograd import (
    pack_winograd_weight,
    winograd_input_codes_reference,
    winograd_input_codes_triton,
    winograd_int_conv2d,
    winograd_int_conv2d_reference,
    winograd_int_conv2d_triton,
    winograd_output_transform_reference,
    winograd_output_transform_triton,
    winograd_position_gemm_reference,
    winograd_position_gemm_triton,
)
from diffusers_qalora.winograd import WinogradConfig, WinogradConv2d, winograd_transforms
from diffusers_qalora.winograd.functional import TileGrid, weight_transform
from diffusers_qalora.winograd.quantized import quantize_weight_codes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

CASES = [  # (tile, N, C, K, H, W, group_size, act_granularity, output_bits, padding, bits)
    (4, 2, 8, 6, 7, 9, None, "position", None, 1, 8),
    (2, 1, 16, 5, 5, 6, 8, "tile", 8, 1, 8),
    (6, 1, 12, 7, 11, 5, 4, "position", 8, 1, 8),
    (4, 1, 6, 3, 1, 1, 3, "position", None, 1, 6),  # single pixel: one tile, mostly padding
    (4, 1, 4, 4, 6, 7, None, "tile", None, 0, 8),  # valid convolution
]


def _weights(tile, c, k, group_size, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = winograd_transforms(tile)
    w = torch.randn(k, c, 3, 3, generator=g)
    codes_u, step_u = quantize_weight_codes(weight_transform(w.double(), t.G), bits, group_size)
    return t, w, codes_u, step_u, torch.randn(k, generator=g)


def _close(got, want, dtype):
    atol = {torch.float32: 1e-4, torch.float16: 2e-2}[dtype]
    scale = float(want.float().abs().max()) + 1e-6
    diff = (got.float() - want.float()).abs()
    # rare neighbouring codes (see the module docstring) move a few outputs by about one step's worth
    assert float((diff > atol * max(1.0, scale)).float().mean()) <= 1e-3
    assert float(diff.max()) <= 0.05 * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_matches_reference(device, case, dtype):
    tile, n, c, k, h, w, group_size, gran, output_bits, padding, bits = case
    t, _, codes_u, step_u, bias = _weights(tile, c, k, group_size, bits)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    kwargs = {"bits": bits, "group_size": group_size, "act_granularity": gran, "output_bits": output_bits}
    args = (codes_u.to(device), step_u.to(device), t.BT.to(device), t.AT.to(device), bias.to(device), padding)
    got = winograd_int_conv2d_triton(x, *args, **kwargs)
    want = winograd_int_conv2d_reference(x, *args, **kwargs)
    assert got.shape == want.shape and got.dtype == dtype
    _close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input_and_zero_size(device):
    t, _, codes_u, step_u, bias = _weights(4, 8, 5, 4, 8)
    base = torch.randn(2, 9, 10, 8, generator=torch.Generator().manual_seed(2)).to(device)
    x = base.permute(0, 3, 1, 2)  # channels-last (N, C, H, W) view
    assert not x.is_contiguous()
    args = (codes_u, step_u, t.BT, t.AT, bias, 1)
    _close(
        winograd_int_conv2d_triton(x, *args, group_size=4),
        winograd_int_conv2d_reference(x.contiguous(), *args, group_size=4),
        torch.float32,
    )
    empty = torch.zeros(0, 8, 9, 10, device=device)
    got = winograd_int_conv2d_triton(empty, *args, group_size=4)
    assert got.shape == (0, 5, 9, 10) and got.shape == winograd_int_conv2d_reference(empty, *args, group_size=4).shape


@pytest.mark.parametrize("case", CASES[:3])
def test_input_codes_stage(case):
    tile, n, c, _, h, w, group_size, gran, _, padding, bits = case
    t = winograd_transforms(tile)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(3))
    codes, steps = winograd_input_codes_triton(x, t.BT, tile, padding, bits, group_size, gran)
    ref_codes, ref_steps = winograd_input_codes_reference(x, t.BT, tile, padding, bits, group_size, gran)
    assert codes.dtype == torch.int8 and codes.shape == ref_codes.shape and steps.shape == ref_steps.shape
    torch.testing.assert_close(steps, ref_steps, atol=0, rtol=1e-6)
    assert float((codes != ref_codes).float().mean()) <= 1e-3
    assert int((codes.int() - ref_codes.int()).abs().max()) <= 1


@pytest.mark.parametrize("group_size", [None, 5])
def test_gemm_stage_is_exact(group_size):
    """Equal codes in, equal bits out (int32 sums, the reference's scaling order), incl. groups that do not fill the
    kernel's 32-channel blocks and more channels than one block."""
    c = 40 if group_size is None else 15
    t, _, codes_u, step_u, _ = _weights(2, c, 20, group_size, 8, seed=4)
    x = torch.randn(1, c, 6, 9, generator=torch.Generator().manual_seed(5))
    codes_v, steps_v = winograd_input_codes_reference(x, t.BT, 2, 1, 8, group_size)
    packed = pack_winograd_weight(codes_u, step_u)
    got = winograd_position_gemm_triton(codes_v, steps_v, packed)
    assert torch.equal(got, winograd_position_gemm_reference(codes_v, steps_v, packed))


@pytest.mark.parametrize("output_bits", [None, 8, 4])
def test_output_stage(output_bits):
    t = winograd_transforms(4)
    grid = TileGrid(batch=2, tiles_h=2, tiles_w=3, out_h=7, out_w=9)  # the last tiles are cropped
    m_prod = torch.randn(36, grid.num_tiles, 5, generator=torch.Generator().manual_seed(6)) * 10
    bias = torch.randn(5)
    got = winograd_output_transform_triton(m_prod, t.AT, grid, bias, output_bits, torch.float16)
    want = winograd_output_transform_reference(m_prod, t.AT, grid, bias, output_bits, torch.float16)
    assert got.shape == (2, 5, 7, 9) and got.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-3)


def test_reference_is_the_winograd_layer_and_close_to_conv2d():
    """The reference is the int mode of WinogradConv2d (same numbers), which approximates the direct convolution."""
    conv = torch.nn.Conv2d(16, 8, 3, padding=1)
    layer = WinogradConv2d.from_conv2d(conv, config=WinogradConfig(tile=4, bits=8, group_size=8, scale_init="lavin"))
    x = torch.randn(2, 16, 10, 7, generator=torch.Generator().manual_seed(7))
    dq.set_kernel_preference(layer, "torch")
    with torch.no_grad():
        out = layer(x)
    t = winograd_transforms(4)
    codes_u, step_u = quantize_weight_codes(weight_transform(conv.weight.detach().double(), t.G), 8, 8)
    ref = winograd_int_conv2d_reference(x, codes_u, step_u, t.BT, t.AT, conv.bias.detach(), 1, group_size=8)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    exact = F.conv2d(x, conv.weight, conv.bias, padding=1).detach()
    assert float((ref - exact).square().mean() / exact.square().mean()) < 1e-2  # SQNR above 20 dB


@pytest.mark.parametrize(
    "config",
    [
        WinogradConfig(tile=4, bits=8, group_size=8),
        WinogradConfig(tile=6, bits=8, group_size=None, act_granularity="tile", output_bits=8),
    ],
)
def test_winograd_layer_runs_the_kernels_when_asked(config):
    """``WinogradConv2d`` in int mode on the Triton kernels (chosen per module) gives the torch path's numbers."""
    conv = torch.nn.Conv2d(16, 8, 3, padding=1)
    layer = WinogradConv2d.from_conv2d(conv, config=config)
    x = torch.randn(2, 16, 9, 11, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        dq.set_kernel_preference(layer, "torch")
        ref = layer(x)
        dq.set_kernel_preference(layer, "triton")
        got = layer(x)
    assert resolved_kernel(layer) == "triton"
    _close(got, ref, torch.float32)


def test_dispatch_and_errors():
    t, _, codes_u, step_u, bias = _weights(4, 8, 4, None, 8)
    x = torch.randn(1, 8, 5, 5, generator=torch.Generator().manual_seed(9))
    args = (codes_u, step_u, t.BT, t.AT, bias)
    torch.testing.assert_close(
        winograd_int_conv2d(x, *args, kernel_preference="triton"),
        winograd_int_conv2d(x, *args, kernel_preference="torch"),
        atol=1e-4,
        rtol=1e-4,
    )
    f64 = winograd_int_conv2d(x.double(), *args, kernel_preference="triton")  # float64 runs the reference
    assert f64.dtype == torch.float64
    with pytest.raises(ValueError, match="act_granularity"):
        winograd_int_conv2d_triton(x, *args, act_granularity="channel")
    with pytest.raises(ValueError, match="F\\(m, 3\\)"):
        winograd_int_conv2d_triton(x, codes_u, step_u, t.BT[:5, :5], t.AT)
    with pytest.raises(ValueError, match="input channels"):
        winograd_int_conv2d_triton(x[:, :4], *args)
    with pytest.raises(ValueError, match="group_size"):
        winograd_int_conv2d_triton(x, *args, group_size=2)
