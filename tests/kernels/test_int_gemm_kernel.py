"""The integer GEMM / implicit-GEMM convolution kernels (Triton interpreter on CPU) against their torch references,
the references against independent float64 computations, and the exported integer layers with the kernel preference
``"triton"`` against ``"torch"``.

Tolerances: the integer sums are exact on both paths (int32 in the kernel, float64 in the reference); only the
epilogue differs (float32 in the kernel, float64 in the reference), so float32 outputs agree to ``rtol 1e-6`` of the
output's scale, and float16 / bfloat16 outputs to one unit in their last place (``2^-10`` / ``2^-7`` relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import diffusers_qalora as dq  # noqa: E402
from diffusers_qalora.export import IntegerConv2d, IntegerLayout, IntegerLinear  # noqa: E402
from diffusers_qalora.kernels import (  # noqa: E402
    PackedWeight,
    int8_conv2d,
    int8_conv2d_reference,
    int8_linear,
    int8_linear_reference,
    quantize_activation_codes,
    quantize_activation_codes_reference,
)
from diffusers_qalora.quant import TimestepContext  # noqa: E402

ULP = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(want.float().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.float(), want.float(), rtol=ULP[want.dtype], atol=ULP[want.dtype] * scale + 1e-12)


def _weight(n: int, k: int, bits: int, groups: int, seed: int = 0) -> tuple[PackedWeight, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lim = 2 ** (bits - 1)
    codes = torch.randint(-lim, lim, (n, k), generator=g)
    scale = 0.002 + 0.01 * torch.rand(n, groups, generator=g)
    return PackedWeight.from_codes(codes, bits, scale), codes


def _acts(shape, samples: int, seed: int = 1, zp_range=(-20, 20)):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    scale = 0.01 + 0.02 * torch.rand(samples, generator=g)
    zero_point = torch.randint(*zp_range, (samples,), generator=g).float()
    return codes, scale, zero_point


# -- the packed weight -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_weight_round_trip_and_group_sums(bits):
    w, codes = _weight(5, 13, bits, 1)  # 13 codes: the last byte is padded
    assert torch.equal(w.codes().long(), codes)
    assert torch.equal(w.rowsum, codes.sum(1, keepdim=True).int())
    w2 = PackedWeight.from_packed(w.packed, bits, 13, w.scale)
    assert torch.equal(w2.rowsum, w.rowsum)
    with pytest.raises(ValueError, match="bits"):
        PackedWeight.from_codes(codes, 3, w.scale)
    with pytest.raises(ValueError, match="G dividing K"):
        PackedWeight.from_packed(w.packed, bits, 13, torch.ones(5, 2))


# -- activation codes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "one-scale", "empty"])
def test_activation_codes_match_the_reference(dtype, layout):
    g = torch.Generator().manual_seed(3)
    shape = (0, 3, 5, 5) if layout == "empty" else (3, 4, 5, 7)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    samples = 1 if layout == "one-scale" else shape[0]
    scale = 0.01 + 0.03 * torch.rand(max(samples, 1), generator=g)[:samples]
    zero_point = torch.randint(-10, 10, (samples,), generator=g).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    got = quantize_activation_codes(x, scale, zero_point, -128, 127, kernel_preference="triton")
    want = quantize_activation_codes_reference(x, scale, zero_point, -128, 127)
    assert got.dtype == torch.int8 and torch.equal(got, want)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    # Independent formula: clamp(round(x / s) + z) with ties to even.
    view = (samples,) + (1,) * (x.dim() - 1)
    expected = torch.clamp(torch.round(x.float() / scale.view(view)) + zero_point.view(view), -128, 127)
    assert torch.equal(want.float(), expected)
    with pytest.raises(ValueError, match="shift unsigned codes"):
        quantize_activation_codes(x, scale, zero_point, 0, 255, kernel_preference="triton")


# -- linear ----------------------------------------------------------------------------------------------------------------
def _dequantized_linear(codes, scale, zero_point, w: PackedWeight, w_codes, bias):
    """Independent float64 computation: x_hat = s (a - z), W_hat = s_w w, y = x_hat W_hat^T + b."""
    samples = scale.numel()
    a = codes.reshape(codes.shape[0] if samples > 1 else 1, -1, w.k).double()
    x_hat = scale.double().view(-1, 1, 1) * (a - zero_point.double().view(-1, 1, 1))
    w_hat = w.scale.double().repeat_interleave(w.group_k, dim=1) * w_codes.double()
    y = x_hat @ w_hat.t()
    return (y if bias is None else y + bias.double()).reshape(*codes.shape[:-1], w.n)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("groups", [1, 3], ids=["per-channel", "per-group"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_matches_the_reference_and_an_independent_oracle(bits, groups, bias):
    n, k = 37, 45  # neither divides the 32-wide tiles
    w, w_codes = _weight(n, k, bits, groups)
    codes, scale, zero_point = _acts((3, 5, k), 3)
    b = torch.randn(n, generator=torch.Generator().manual_seed(4)) if bias else None
    want = int8_linear_reference(codes, scale, zero_point, w, b, torch.float32)
    torch.testing.assert_close(
        want.double(), _dequantized_linear(codes, scale, zero_point, w, w_codes, b), rtol=1e-6, atol=1e-6
    )
    got = int8_linear(codes, scale, zero_point, w, b, torch.float32, kernel_preference="triton")
    _close(got, want)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_linear_output_dtypes_and_one_scale_for_all_rows(out_dtype):
    w, _ = _weight(20, 64, 4, 2)
    codes, scale, zero_point = _acts((33, 64), 1)
    bias = torch.randn(20)
    got = int8_linear(codes, scale, zero_point, w, bias, out_dtype, kernel_preference="triton")
    _close(got, int8_linear_reference(codes, scale, zero_point, w, bias, out_dtype))


def test_linear_zero_points_beyond_int8_and_edges():
    w, _ = _weight(9, 16, 8, 1)
    codes, scale, _ = _acts((2, 3, 16), 2)
    zero_point = torch.tensor([300.0, -500.0])  # drifted learned zero points: the int32 correction stays exact
    _close(
        int8_linear(codes, scale, zero_point, w, None, kernel_preference="triton"),
        int8_linear_reference(codes, scale, zero_point, w, None),
    )
    single, s1, z1 = _acts((1, 16), 1)
    _close(
        int8_linear(single, s1, z1, w, None, kernel_preference="triton"), int8_linear_reference(single, s1, z1, w, None)
    )
    empty = torch.zeros(0, 16, dtype=torch.int8)
    out = int8_linear(empty, s1, z1, w, None, kernel_preference="triton")
    assert out.shape == (0, 9)
    with pytest.raises(ValueError, match="K = 15"):
        int8_linear(torch.zeros(2, 15, dtype=torch.int8), s1, z1, w, None, kernel_preference="triton")
    with pytest.raises(ValueError, match="one step size per sample"):
        int8_linear(codes, torch.ones(3), torch.zeros(3), w, None, kernel_preference="triton")


# -- convolution -----------------------------------------------------------------------------------------------------------
CONVS = [
    ("3x3 pad 1", dict(kernel_size=3, stride=1, padding=1, dilation=1)),
    ("3x3 stride 2, pad (0, 2), dilation (1, 2)", dict(kernel_size=3, stride=2, padding=(0, 2), dilation=(1, 2))),
    ("1x1", dict(kernel_size=1, stride=1, padding=0, dilation=1)),
    ("2x3 stride (2, 1)", dict(kernel_size=(2, 3), stride=(2, 1), padding=1, dilation=1)),
]


def _dequantized_conv(codes, scale, zero_point, w: PackedWeight, w_codes, geometry, bias):
    """Independent float64 computation: pad x_hat = s (a - z) with zeros and convolve with W_hat."""
    kh, kw = (geometry["kernel_size"],) * 2 if isinstance(geometry["kernel_size"], int) else geometry["kernel_size"]
    x_hat = scale.double().view(-1, 1, 1, 1) * (codes.double() - zero_point.double().view(-1, 1, 1, 1))
    w_hat = (w.scale.double().repeat_interleave(w.group_k, dim=1) * w_codes.double()).reshape(w.n, -1, kh, kw)
    return F.conv2d(
        x_hat,
        w_hat,
        None if bias is None else bias.double(),
        geometry["stride"],
        geometry["padding"],
        geometry["dilation"],
    )


@pytest.mark.parametrize("name, geometry", CONVS, ids=[c[0] for c in CONVS])
@pytest.mark.parametrize("bits", [8, 4])
def test_conv_matches_the_reference_and_an_independent_oracle(name, geometry, bits):
    c_in, c_out = 6, 11
    kh, kw = (geometry["kernel_size"],) * 2 if isinstance(geometry["kernel_size"], int) else geometry["kernel_size"]
    w, w_codes = _weight(c_out, c_in * kh * kw, bits, 2)
    codes, scale, zero_point = _acts((3, c_in, 7, 6), 3)
    bias = torch.randn(c_out)
    want = int8_conv2d_reference(codes, scale, zero_point, w, bias=bias, **geometry)
    torch.testing.assert_close(
        want.double(), _dequantized_conv(codes, scale, zero_point, w, w_codes, geometry, bias), rtol=1e-6, atol=1e-6
    )
    got = int8_conv2d(codes, scale, zero_point, w, bias=bias, kernel_preference="triton", **geometry)
    _close(got, want)
    cl = int8_conv2d(
        codes.contiguous(memory_format=torch.channels_last),
        scale,
        zero_point,
        w,
        bias=bias,
        kernel_preference="triton",
        **geometry,
    )
    _close(cl, want)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_conv_output_dtypes_one_scale_and_edges(out_dtype):
    w, _ = _weight(5, 4 * 9, 8, 1)
    codes, scale, zero_point = _acts((2, 4, 5, 5), 1)
    got = int8_conv2d(codes, scale, zero_point, w, 3, 1, 1, 1, None, out_dtype, kernel_preference="triton")
    _close(got, int8_conv2d_reference(codes, scale, zero_point, w, 3, 1, 1, 1, None, out_dtype))
    single = codes[:1, :, :1, :1].contiguous()
    _close(
        int8_conv2d(single, scale, zero_point, w, 3, 1, 1, 1, None, out_dtype, kernel_preference="triton"),
        int8_conv2d_reference(single, scale, zero_point, w, 3, 1, 1, 1, None, out_dtype),
    )
    empty = codes[:0]
    assert int8_conv2d(empty, scale, zero_point, w, 3, 1, 1, 1, kernel_preference="triton").shape == (0, 5, 5, 5)
    with pytest.raises(ValueError, match="pads with the zero point"):
        int8_conv2d(codes, scale, torch.tensor([200.0]), w, 3, 1, 1, 1, kernel_preference="triton")


# -- the exported integer layers on the Triton kernels ----------------------------------------------------------------------
TABLE = torch.tensor([0.0, 250.0, 500.0, 999.0])


def _integer_layer(kind: str, weight_bits: int, signed: bool, group_size: int | None, seed: int = 0, act_bits: int = 8):
    g = torch.Generator().manual_seed(seed)
    layout = IntegerLayout(kind, weight_bits, act_bits, signed, group_size, len(TABLE))
    if kind == "linear":
        layer, shape = IntegerLinear(24, 19, True, layout), (19, 24)
    else:
        layer, shape = IntegerConv2d(8, 10, 3, padding=1, bias=True, layout=layout), (10, 8, 3, 3)
    lim = 2 ** (weight_bits - 1)
    groups = 1 if group_size is None else shape[1] // group_size
    mid = 2 ** (act_bits - 1)  # unsigned activation codes: a zero point near the middle of [0, 2^bits - 1]
    zp = (
        torch.zeros(len(TABLE))
        if signed
        else torch.randint(mid - mid // 4, mid + mid // 4 + 1, (len(TABLE),), generator=g).float()
    )
    layer.load_codes_(
        torch.randint(-lim, lim, shape, generator=g),
        0.005 + 0.01 * torch.rand(shape[0], groups, generator=g),
        torch.randn(shape[0], generator=g),
        TABLE,
        0.01 + 0.03 * torch.rand(len(TABLE), generator=g),
        zp,
    )
    layer.context = TimestepContext()
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize(
    "weight_bits, act_bits, signed, group_size",
    [(8, 8, False, None), (4, 8, True, None), (4, 8, False, 4), (4, 4, False, None), (4, 4, True, 4)],
    ids=["W8A8", "W4A8-signed", "W4A8-group", "W4A4", "W4A4-signed-group"],
)
@pytest.mark.parametrize("timesteps", [[500.0], [0.0, 700.0, 999.0]], ids=["one-timestep", "mixed-timesteps"])
def test_integer_layers_on_the_triton_kernels(kind, weight_bits, act_bits, signed, group_size, timesteps):
    layer = _integer_layer(kind, weight_bits, signed, group_size, act_bits=act_bits)
    g = torch.Generator().manual_seed(7)
    x = torch.randn((3, 5, 24) if kind == "linear" else (3, 8, 6, 5), generator=g)
    layer.context.set(torch.tensor(timesteps))
    dq.set_kernel_preference(layer, "torch")
    want = layer(x)
    dq.set_kernel_preference(layer, "triton")
    got = layer(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    # The reference computes the same codes in float32 (rounding ~1e-7 of the output).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if kind == "conv2d":
        x16 = x.half().contiguous(memory_format=torch.channels_last)
        got16 = layer(x16)
        assert got16.dtype == torch.float16
        torch.testing.assert_close(got16.float(), want, rtol=0, atol=5e-3 * float(want.abs().max()))
