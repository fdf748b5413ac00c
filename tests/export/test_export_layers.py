"""Integer layers on their own: storage layout, the reference path against an independent float computation (exact),
the oneDNN integer path against an int64 oracle, timestep lookup and splitting, dtype guards and the kernel registry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_qalora.export import (
    IntegerConv2d,
    IntegerLayout,
    IntegerLinear,
    lookup_act_qparams,
    onednn_status,
    quantize_activation_uint8,
    register_kernel,
    unregister_kernel,
)
from diffusers_qalora.quant import TemporalValues, TimestepContext, fake_quantize, set_kernel_preference

ONEDNN, WHY = onednn_status()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN int8 kernels unusable here: {WHY}")
TABLE = torch.tensor([0.0, 250.0, 500.0, 999.0])


def _tables(num_timesteps: int, signed: bool, gen: torch.Generator):
    t = TABLE if num_timesteps == 4 else torch.tensor([0.0])
    scale = 0.01 + 0.05 * torch.rand(len(t), generator=gen)
    zp = torch.zeros(len(t)) if signed else torch.randint(40, 90, (len(t),), generator=gen).float()
    return t, scale, zp


def _layer(
    kind: str,
    weight_bits=4,
    act_bits=8,
    signed=False,
    group_size=None,
    bias=True,
    num_timesteps=4,
    seed=0,
    conv_kwargs=None,
    conv_channels=(16, 24),
):
    gen = torch.Generator().manual_seed(seed)
    layout = IntegerLayout(kind, weight_bits, act_bits, signed, group_size, num_timesteps)
    if kind == "linear":
        layer = IntegerLinear(48, 24, bias, layout)
        shape = (24, 48)
    else:
        kw = {"kernel_size": 3, "stride": 1, "padding": 1} | (conv_kwargs or {})
        layer = IntegerConv2d(*conv_channels, bias=bias, layout=layout, **kw)
        shape = (conv_channels[1], conv_channels[0], *layer.kernel_size)
    qmax = 2 ** (weight_bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, shape, generator=gen)
    groups = 1 if group_size is None else shape[1] // group_size
    w_scale = 0.01 + 0.02 * torch.rand(shape[0], groups, generator=gen)
    b = torch.randn(shape[0], generator=gen) if bias else None
    layer.load_codes_(codes, w_scale, b, *_tables(num_timesteps, signed, gen))
    context = TimestepContext()
    layer.context = context
    return layer, codes, w_scale, b, context


def _x(kind: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 7, 48) if kind == "linear" else (batch, 16, 9, 9), generator=g)


def _float_reference(layer, codes, w_scale, b, x, t):
    """The fake-quant model's computation, written independently: LSQ fake quantization of the input with the
    interpolated step size of each sample, the dequantized weight, then the float op."""
    lay = layer.layout
    values = TemporalValues(layer.act_timesteps.tolist())
    values.fill_(layer.act_scale)
    zps = TemporalValues(layer.act_timesteps.tolist())
    zps.fill_(layer.act_zero_point)
    with torch.no_grad():
        step, zp = values.lookup(t), zps.lookup(t)
    view = (-1,) + (1,) * (x.dim() - 1)
    qmin, qmax = lay.act_code_range
    x_hat = fake_quantize(x, step.reshape(view), None if lay.act_signed else zp.reshape(view), qmin, qmax)
    groups = w_scale.shape[1]
    w = (codes.float().reshape(codes.shape[0], groups, -1) * w_scale[:, :, None]).reshape(codes.shape)
    if lay.kind == "linear":
        return F.linear(x_hat, w, b)
    if layer.padding_mode != "zeros":  # as nn.Conv2d does: pad the (quantized) input, then convolve unpadded
        ph, pw = layer.padding
        return F.conv2d(F.pad(x_hat, (pw, pw, ph, ph), mode=layer.padding_mode), w, b, layer.stride, 0)
    return F.conv2d(x_hat, w, b, layer.stride, layer.padding)


def _int_oracle(layer, codes, w_scale, b, x, t_value):
    """Exact integer product in int64 and the epilogue in float64, at one timestep."""
    lay = layer.layout
    s, z = lookup_act_qparams(layer.act_timesteps, layer.act_scale, layer.act_zero_point, torch.tensor([t_value]))
    qmin, qmax = lay.act_code_range
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.int64) - int(z)
    groups = w_scale.shape[1]
    out = 0
    e = codes[0].numel() // groups
    padding = layer.padding if lay.kind == "conv2d" else None
    if lay.kind == "conv2d" and layer.padding_mode != "zeros":
        ph, pw = layer.padding
        q, padding = F.pad(q.double(), (pw, pw, ph, ph), mode=layer.padding_mode).to(torch.int64), (0, 0)
    for g in range(groups):
        wg = codes.reshape(codes.shape[0], -1)[:, g * e : (g + 1) * e].to(torch.int64)
        if lay.kind == "linear":
            acc = q[..., g * e : (g + 1) * e] @ wg.t()
        else:  # float64 holds these integer sums exactly
            c = layer.in_channels // groups
            acc = (
                F.conv2d(
                    q[:, g * c : (g + 1) * c].double(),
                    wg.reshape(codes.shape[0], c, *codes.shape[2:]).double(),
                    None,
                    layer.stride,
                    padding,
                )
                .round()
                .to(torch.int64)
            )
        scale = w_scale[:, g].double() * float(s)
        out = out + acc.double() * (scale if lay.kind == "linear" else scale[:, None, None])
    if b is not None:
        out = out + (b.double() if lay.kind == "linear" else b.double()[:, None, None])
    return out


# -- layout ------------------------------------------------------------------------------------------------------------
def test_layout_round_trip_and_errors():
    lay = IntegerLayout("conv2d", 4, 8, False, 8, 100)
    assert IntegerLayout.from_dict(lay.to_dict()) == lay
    assert lay.packed_bits == 4 and IntegerLayout("linear", 3, 8).packed_bits == 8
    assert lay.tensor_shapes(32, 16, 9, True)["weight_packed"] == (32, 72)
    with pytest.raises(ValueError, match="weight_bits"):
        IntegerLayout("linear", 9, 8)
    with pytest.raises(ValueError, match="kind"):
        IntegerLayout("conv3d", 4, 8)
    with pytest.raises(ValueError, match="unknown keys"):
        IntegerLayout.from_dict({"kind": "linear", "weight_bits": 4, "act_bits": 8, "bits": 2})


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_round_trip_through_packing(bits):
    layer, codes, *_ = _layer("conv2d", weight_bits=bits, conv_kwargs={"kernel_size": 1, "padding": 0})
    layer2, codes2, *_ = _layer("linear", weight_bits=bits)
    for lay, c in ((layer, codes), (layer2, codes2)):
        assert lay.weight_packed.dtype == torch.uint8
        assert torch.equal(lay.int8_weight(), c.reshape(c.shape[0], -1).to(torch.int8))
    if bits == 4:  # two codes per byte
        assert layer2.weight_packed.shape == (24, 24)


def test_odd_k_is_padded():
    layout = IntegerLayout("conv2d", 4, 8, num_timesteps=1)
    conv = IntegerConv2d(1, 4, 3, padding=1, layout=layout)  # K = 9
    codes = torch.arange(-4, 5).repeat(4, 1).reshape(4, 1, 3, 3)
    conv.load_codes_(codes, torch.ones(4, 1), torch.zeros(4), torch.zeros(1), torch.ones(1), torch.zeros(1))
    assert conv.weight_packed.shape == (4, 5)
    assert torch.equal(conv.int8_weight(), codes.reshape(4, 9).to(torch.int8))


def test_load_codes_validates_before_writing():
    layer, codes, w_scale, b, _ = _layer("linear", weight_bits=4)
    before = layer.weight_packed.clone()
    with pytest.raises(ValueError, match=r"lie in \[-8, 7\]"):
        layer.load_codes_(codes * 4, w_scale, b, *_tables(4, False, torch.Generator()))
    with pytest.raises(ValueError, match="positive"):
        layer.load_codes_(codes, -w_scale, b, *_tables(4, False, torch.Generator()))
    assert torch.equal(layer.weight_packed, before)


# -- reference path: the fake-quant model's numbers ------------------------------------------------------------------
CASES = [
    ("linear", {}),
    ("linear", {"weight_bits": 8}),
    ("linear", {"act_bits": 4, "group_size": 16}),
    ("linear", {"signed": True, "bias": False}),
    ("conv2d", {}),
    ("conv2d", {"weight_bits": 8, "act_bits": 8, "num_timesteps": 1}),
    ("conv2d", {"group_size": 8, "act_bits": 4}),
    ("conv2d", {"conv_kwargs": {"stride": 2}}),
    ("conv2d", {"conv_kwargs": {"padding_mode": "reflect"}, "signed": True}),
]


@pytest.mark.parametrize("kind, kwargs", CASES)
def test_reference_path_is_bit_identical_to_fake_quant(kind, kwargs):
    layer, codes, w_scale, b, context = _layer(kind, **kwargs)
    set_kernel_preference(layer, "torch")
    x = _x(kind)
    for t in (torch.tensor([300.0]), torch.tensor([0.0, 640.0, 999.0])):
        context.set(t)
        expected = _float_reference(layer, codes, w_scale, b, x, t.expand(x.shape[0]) if t.numel() == 1 else t)
        assert torch.equal(layer(x), expected)


@needs_onednn
@pytest.mark.parametrize("kind, kwargs", CASES)
def test_integer_path_matches_int64_oracle(kind, kwargs):
    layer, codes, w_scale, b, context = _layer(kind, **kwargs)
    layer.exact_activation_rounding = True
    x = _x(kind)
    context.set(torch.tensor(300.0))
    expected = _int_oracle(layer, codes, w_scale, b, x, 300.0)
    got = layer(x).double()
    # Integer accumulation is exact; only the float32 epilogue rounds.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    set_kernel_preference(layer, "torch")
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


MIXED = torch.tensor([999.0, 10.0, 999.0, 640.0])  # two samples share a timestep, two sit between table entries


@needs_onednn
@pytest.mark.parametrize("kind, kwargs", CASES)
def test_mixed_timesteps_run_one_integer_call_matching_the_oracle(kind, kwargs, monkeypatch):
    """A batch whose samples sit at different timesteps: per-sample step sizes and zero points in one integer call,
    equal to the int64 oracle of each sample at its own timestep."""
    import diffusers_qalora.export.modules as modules

    layer, codes, w_scale, b, context = _layer(kind, **kwargs)
    x = _x(kind, batch=4)
    calls = []
    for name in ("linear_onednn", "conv2d_onednn"):
        original = getattr(modules, name)
        monkeypatch.setattr(modules, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    # Integer timesteps read the dense per-layer table; fractional ones (e.g. from a sigma schedule) interpolate.
    for timesteps in (MIXED, MIXED - 0.25):
        context.set(timesteps)
        expected = torch.cat(
            [_int_oracle(layer, codes, w_scale, b, x[i : i + 1], float(t)) for i, t in enumerate(timesteps)]
        )
        tol = {"rtol": 1e-5, "atol": 2e-6 * float(expected.abs().max())}
        layer.exact_activation_rounding = True
        calls.clear()
        torch.testing.assert_close(layer(x).double(), expected, **tol)
        assert len(calls) == layer.weight_scale.shape[1]  # one call per weight group, not one per timestep
        # The default (fused) activation rounding is at most one code away at rare ties: the same result here.
        layer.exact_activation_rounding = False
        torch.testing.assert_close(layer(x).double(), expected, **tol)


@needs_onednn
def test_mixed_timesteps_with_drifted_zero_points_pad_with_each_zero_point():
    """Zero points that differ strongly between timesteps (the per-sample padding matters) and a layer whose
    padded border matters: still the oracle."""
    layer, codes, w_scale, b, context = _layer("conv2d", conv_kwargs={"kernel_size": 3, "padding": 2, "stride": 2})
    layer.act_zero_point.copy_(torch.tensor([0.0, 255.0, 128.0, 3.0]))
    layer.exact_activation_rounding = True
    x = _x("conv2d", batch=4) + 1.0
    context.set(torch.tensor([0.0, 250.0, 500.0, 999.0]))
    expected = torch.cat(
        [_int_oracle(layer, codes, w_scale, b, x[i : i + 1], t) for i, t in enumerate([0.0, 250.0, 500.0, 999.0])]
    )
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=2e-6 * float(expected.abs().max()))


@needs_onednn
@pytest.mark.parametrize("timesteps", [torch.tensor([500.0]), MIXED])
def test_a_1x1_convolution_does_not_reorder_its_weight_on_every_call(timesteps, capfd):
    """oneDNN packs a conv weight in the layout its kernel takes for the call's input (`prepack_conv2d`'s
    ``input_shape``): packed without it, a 1x1 kernel reorders its weight before each call, 37 ms for an SD-sized
    weight at zero point 0 (the mixed-timestep call), where the convolution takes 4 ms.  Read from oneDNN's verbose
    log, not timed; a zero point other than 0 (the shared timestep) still costs one reorder, to the weight with its
    zero-point compensation, which torch does not keep."""
    # Large enough for oneDNN's 1x1 kernel to want another weight layout than the shapeless packing gives.
    conv = {"conv_kwargs": {"kernel_size": 1, "padding": 0}, "conv_channels": (64, 128)}
    layer, codes, w_scale, b, context = _layer("conv2d", **conv)
    weight = "x".join(str(n) for n in layer._weight_shape())
    x = torch.randn(4, 64, 9, 9, generator=torch.Generator().manual_seed(1))
    context.set(timesteps)
    layer(x)  # packs the weight
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        layer(x)
    log = [
        line for line in capfd.readouterr().out.splitlines() if line.startswith("onednn_verbose") and ",exec," in line
    ]
    if not any(",convolution," in line for line in log):
        pytest.skip("this torch build's oneDNN prints no verbose log (built without ONEDNN_VERBOSE support)")
    reorders = [line for line in log if ",reorder," in line and f",{weight}," in line]
    assert len(reorders) <= (0 if len(timesteps) > 1 else 1), reorders


@needs_onednn
def test_fast_activation_rounding_is_at_most_one_code_off():
    x = torch.randn(64, 32, 16, 16) * 3
    scale, zp = 0.0173, 117
    fast = quantize_activation_uint8(x, scale, zp, 0, 255, exact=False)
    exact = quantize_activation_uint8(x, scale, zp, 0, 255, exact=True)
    expected = torch.clamp(torch.round(x / torch.tensor(scale)) + zp, 0, 255)
    assert torch.equal(exact.float(), expected)
    diff = (fast.int() - exact.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-4
    assert fast.dtype == torch.uint8 and not fast.is_quantized
    four_bit = quantize_activation_uint8(x, scale, 7, 0, 15)
    assert int(four_bit.max()) <= 15


@needs_onednn
def test_per_sample_activation_rounding_is_at_most_one_code_off():
    from diffusers_qalora.export.functional import quantize_activation_uint8_per_sample

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 32, 16, 16, generator=g) * 3).contiguous(memory_format=torch.channels_last)
    scale = 0.01 + 0.02 * torch.rand(8, generator=g)
    zp = torch.randint(0, 256, (8,), generator=g).float()
    view = (-1, 1, 1, 1)
    expected = torch.clamp(torch.round(x / scale.reshape(view)) + zp.reshape(view), 0, 255)
    exact = quantize_activation_uint8_per_sample(x, scale, zp, 0, 255, exact=True)
    fast = quantize_activation_uint8_per_sample(x, scale, zp, 0, 255)
    assert torch.equal(exact.float(), expected) and fast.is_contiguous(memory_format=torch.channels_last)
    diff = (fast.int() - exact.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-4
    # Padded codes: the border holds each sample's zero point, the interior the codes of x.
    padded = quantize_activation_uint8_per_sample(x, scale, zp, 0, 255, padding=(1, 2))
    assert padded.shape == (8, 32, 18, 20)
    assert torch.equal(padded[:, :, 1:-1, 2:-2], fast)
    border = padded.clone()
    border[:, :, 1:-1, 2:-2] = 0
    assert torch.equal(border[:, :, 0, 0], zp.to(torch.uint8)[:, None].expand(8, 32))
    assert int((border.float() - zp.reshape(view)).abs()[:, :, [0, -1]].max()) == 0


@needs_onednn
def test_bfloat16_input_and_channels_last():
    layer, *_, context = _layer("conv2d")
    context.set(torch.tensor(500.0))
    x = _x("conv2d")
    y = layer(x)
    y_cl = layer(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(y, y_cl) and y.is_contiguous(memory_format=torch.channels_last)  # oneDNN's layout, kept
    layer.channels_last_output = False
    assert torch.equal(layer(x), y) and layer(x).is_contiguous()
    y_bf16 = layer(x.bfloat16())
    assert y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y_bf16.float(), y, rtol=0.05, atol=0.05)


def test_empty_batch():
    layer, *_, context = _layer("linear")
    context.set(torch.tensor(500.0))
    assert layer(torch.zeros(0, 7, 48)).shape == (0, 7, 24)


# -- guards ------------------------------------------------------------------------------------------------------------
def test_no_context_is_a_clear_error():
    layer, *_ = _layer("linear")
    layer.context = None
    with pytest.raises(RuntimeError, match="no TimestepContext"):
        layer(_x("linear"))


def test_dtype_cast_is_refused_and_changes_nothing():
    # On a whole diffusers model, ModelMixin.to refuses before any layer is touched (tests/export/test_export_diffusers).
    layer, *_, context = _layer("conv2d")
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.to("cpu", torch.float16)):
        with pytest.raises(TypeError, match="cannot be cast to torch"):
            cast(layer)
    for k, v in layer.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k])
    layer.to("cpu")  # moving without a cast is fine
    layer.float()


def test_registered_kernel_is_the_dispatch_point():
    layer, *_, context = _layer("linear")
    context.set(torch.tensor(500.0))
    calls = []

    def kernel(module, x, scale, zero_point):
        calls.append((module, scale, zero_point))
        return torch.zeros(*x.shape[:-1], module.out_features)

    register_kernel("cpu", "linear", kernel)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_kernel("cpu", "linear", lambda *a: None)
        out = layer(_x("linear"))
        assert calls and calls[0][0] is layer and float(out.abs().sum()) == 0.0
        set_kernel_preference(layer, "torch")  # an explicit preference bypasses the registry
        assert float(layer(_x("linear")).abs().sum()) > 0
    finally:
        unregister_kernel("cpu", "linear")
    with pytest.raises(ValueError, match="op"):
        register_kernel("cuda", "conv3d", kernel)
