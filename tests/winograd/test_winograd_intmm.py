"""The integer-GEMM (``torch._int_mm``) convolutions used by the CPU speed benchmark compute what the reference
quantized layers compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_qalora.winograd import DirectQuantConv2d, WinogradConfig, WinogradConv2d, sqnr_db
from diffusers_qalora.winograd.intmm import Int8Im2colConv2d, Int8WinogradConv2d


@pytest.mark.parametrize("tile", [2, 4, 6])
@pytest.mark.parametrize("group_size, padding, size", [(None, 1, (9, 11)), (4, 0, (10, 7)), (8, (1, 2), (6, 13))])
def test_int8_winograd_matches_the_quantized_layer(tile, group_size, padding, size):
    torch.manual_seed(tile)
    conv = nn.Conv2d(16, 12, 3, padding=padding)
    x = torch.randn(2, 16, *size)
    reference = WinogradConv2d.from_conv2d(conv, tile, bits=8, group_size=group_size)
    fast = Int8WinogradConv2d.from_conv2d(conv, tile, group_size)
    with torch.no_grad():
        expected, out = reference(x), fast(x)
    assert out.shape == expected.shape == conv(x).shape
    # the same integer codes up to a rare rounding-boundary flip (the transforms sum in a different order)
    assert sqnr_db(expected, out) > 50.0
    assert sqnr_db(conv(x).detach(), out) > {2: 30.0, 4: 17.0, 6: 11.0}[tile]


def test_int8_im2col_matches_the_direct_baseline():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 5, 3, padding=1)
    x = torch.randn(1, 8, 7, 9)
    direct = DirectQuantConv2d.from_conv2d(conv, config=WinogradConfig(algorithm="direct", bits=8))
    with torch.no_grad():
        out, expected = Int8Im2colConv2d.from_conv2d(conv)(x), direct(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # one sample: per-tensor == per-sample step


def test_int8_paths_reject_bad_weights():
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\)"):
        Int8WinogradConv2d(torch.randn(4, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\)"):
        Int8Im2colConv2d(torch.randn(4, 4))
    with pytest.raises(ValueError, match="stride"):
        Int8WinogradConv2d.from_conv2d(nn.Conv2d(4, 4, 3, stride=2))
    with pytest.raises(ValueError, match="must divide"):
        Int8WinogradConv2d(torch.randn(4, 6, 3, 3), group_size=4)
