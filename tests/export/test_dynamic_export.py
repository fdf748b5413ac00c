"""Integer layers with dynamic activations (``act_granularity="token"`` / ``"group"``): the oneDNN path against an
int64 oracle, the torch path against the fake-quant model, and whole-model export / save / load round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from export_fixtures import make_sd15_unet, make_unet2d, qalora, sd15_inputs, unet2d_inputs

import diffusers_qalora as dq
from diffusers_qalora.export import IntegerConv2d, IntegerLayout, IntegerLinear, onednn_status
from diffusers_qalora.quant import set_kernel_preference

ONEDNN, WHY = onednn_status()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN int8 kernels unusable here: {WHY}")


def _layer(kind, act_group=None, weight_group=None, signed=False, bias=True, seed=0, **conv):
    gen = torch.Generator().manual_seed(seed)
    layout = IntegerLayout(
        kind,
        4,
        8,
        signed,
        weight_group,
        act_granularity="token" if act_group is None else "group",
        act_group_size=act_group,
    )
    if kind == "linear":
        layer, shape = IntegerLinear(16, 12, bias, layout), (12, 16)
    else:
        layer = IntegerConv2d(16, 12, bias=bias, layout=layout, **({"kernel_size": 3, "padding": 1} | conv))
        shape = (12, 16, *layer.kernel_size)
    codes = torch.randint(-8, 8, shape, generator=gen)
    groups = 1 if weight_group is None else 16 // weight_group
    w_scale = 0.01 + 0.02 * torch.rand(shape[0], groups, generator=gen)
    b = torch.randn(shape[0], generator=gen) if bias else None
    layer.load_codes_(codes, w_scale, b)
    return layer, codes, w_scale, b


def _x(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((3, 5, 16) if kind == "linear" else (2, 16, 6, 7), generator=g)
    return x * torch.linspace(0.2, 3.0, 16).reshape((16,) if kind == "linear" else (16, 1, 1)) + 0.4


def _int_oracle(layer, codes, w_scale, b, x):
    """Written out independently: min-max codes of every token (group) in float64, the products in int64, each
    scaled by its own token's and weight's steps in float64."""
    lay = layer.layout
    channel_dim = -1 if lay.kind == "linear" else 1
    tokens = x.double().movedim(channel_dim, -1)  # (..., C)
    size = lay.act_group_size or 16
    rows = tokens.reshape(*tokens.shape[:-1], 16 // size, size)
    qmin, qmax = lay.act_code_range
    if lay.act_signed:
        step = rows.abs().amax(-1, keepdim=True).float().double() / qmax
        zero = torch.zeros_like(step)
    else:
        lo = rows.amin(-1, keepdim=True).clamp(max=0)
        hi = rows.amax(-1, keepdim=True).clamp(min=0)
        step = ((hi - lo) / (qmax - qmin)).float().double()
        zero = torch.round(qmin - lo / step).clamp(qmin, qmax)
    q = (torch.clamp(torch.round(rows / step) + zero, qmin, qmax) - zero).to(torch.int64)  # (..., G, size)
    # The value of each input element, as an exact integer times its float64 step: expand back to channels.
    step_c = step.expand_as(rows).reshape(tokens.shape)
    q_c = q.reshape(tokens.shape)
    groups = w_scale.shape[1]
    s_w = w_scale.double().repeat_interleave(16 // groups, dim=1)  # (O, C)
    w = codes.to(torch.int64)
    if lay.kind == "linear":
        # sum_c q[m, c] * s_x[m, c] * w[o, c] * s_w[o, c]
        out = (q_c.double() * step_c) @ (w.double() * s_w).t()
        return out + (0 if b is None else b.double())
    q_img, s_img = q_c.movedim(-1, 1), step_c.movedim(-1, 1)  # back to (N, C, H, W)
    x_hat = q_img.double() * s_img  # exact: integer times a float64 step
    weight = w.double() * s_w[:, :, None, None]
    ph, pw = layer.padding
    if layer.padding_mode != "zeros":
        x_hat, padding = F.pad(x_hat, (pw, pw, ph, ph), mode=layer.padding_mode), 0
    else:
        padding = layer.padding
    return F.conv2d(x_hat, weight, None if b is None else b.double(), layer.stride, padding, layer.dilation)


CASES = [
    ("linear", {}),
    ("linear", {"act_group": 4}),
    ("linear", {"act_group": 4, "weight_group": 8, "signed": True}),
    ("linear", {"act_group": 8, "weight_group": 4, "bias": False}),
    ("conv2d", {}),
    ("conv2d", {"act_group": 8, "signed": True}),
    ("conv2d", {"act_group": 4, "weight_group": 8, "stride": 2}),
    ("conv2d", {"padding_mode": "reflect", "bias": False}),
    ("conv2d", {"kernel_size": 1, "padding": 0, "act_group": 8}),
]


@needs_onednn
@pytest.mark.parametrize("kind, kwargs", CASES)
def test_integer_path_matches_the_int64_oracle(kind, kwargs):
    layer, codes, w_scale, b = _layer(kind, **kwargs)
    x = _x(kind)
    expected = _int_oracle(layer, codes, w_scale, b, x)
    tol = {"rtol": 1e-5, "atol": 1e-5 * float(expected.abs().max())}
    torch.testing.assert_close(layer(x).double(), expected, **tol)
    set_kernel_preference(layer, "torch")
    torch.testing.assert_close(layer(x).double(), expected, **tol)


@needs_onednn
def test_no_timestep_is_needed_and_batches_are_independent():
    """Dynamic step sizes depend on each token alone: a sample's output is the same in any batch, and no timestep
    context is read (mixed timesteps cost nothing)."""
    layer, *_ = _layer("conv2d", act_group=8)
    x = _x("conv2d")
    assert layer.context is None
    both = layer(x)
    torch.testing.assert_close(torch.cat([layer(x[:1]), layer(x[1:])]), both, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_empty_batch(kind):
    layer, *_ = _layer(kind, act_group=8)
    x = _x(kind)[:0]
    expected = (0, 5, 12) if kind == "linear" else (0, 12, 6, 7)
    for preference in ("torch", "auto"):
        set_kernel_preference(layer, preference)
        assert layer(x).shape == expected


def test_layout_round_trip_and_validation():
    layout = IntegerLayout("conv2d", 4, 4, act_granularity="group", act_group_size=8)
    assert IntegerLayout.from_dict(layout.to_dict()) == layout
    assert layout.dynamic_activations and "act_scale" not in layout.tensor_shapes(8, 16, 9, True)
    table = IntegerLayout("linear", 4, 8)
    assert "act_granularity" not in table.to_dict()  # files of table layouts read as before
    with pytest.raises(ValueError, match="act_group_size"):
        IntegerLayout("linear", 4, 4, act_granularity="group")
    with pytest.raises(ValueError, match="act_group_size"):
        IntegerLayout("linear", 4, 4, act_group_size=8)
    with pytest.raises(ValueError, match="divide"):
        IntegerLinear(12, 4, True, layout.__class__("linear", 4, 4, act_granularity="group", act_group_size=8))
    with pytest.raises(ValueError, match="no step-size table"):
        layer, codes, w_scale, b = _layer("linear")
        layer.load_codes_(codes, w_scale, b, torch.zeros(1), torch.ones(1), torch.zeros(1))


@pytest.mark.parametrize("granularity, group, act_bits", [("token", None, 8), ("group", 8, 4)])
def test_export_reference_is_bit_identical_and_onednn_close(granularity, group, act_bits):
    model = qalora(make_unet2d(), unet2d_inputs, 4, act_bits, act_granularity=granularity, act_group_size=group)
    layer = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert isinstance(layer.qal_act_quantizer["default"], dq.quant.DynamicActQuantizer)
    inputs = {"shared": unet2d_inputs(250.0), "mixed": unet2d_inputs(torch.tensor([0.0, 999.0, 400.0, 250.0]))}
    with torch.no_grad():
        fake = {k: model(**v).sample for k, v in inputs.items()}
    exported = dq.export_quantized(model, kernel_preference="torch", inplace=False)
    conv = exported.get_submodule("down_blocks.0.resnets.0.conv1")
    assert conv.layout.act_granularity == granularity and conv.act_scale is None
    assert exported.get_submodule("conv_in").layout.act_granularity == "token"  # 8-bit layers: per token
    with torch.no_grad():
        for k, v in inputs.items():
            assert torch.equal(exported(**v).sample, fake[k])
    if ONEDNN and act_bits == 8:  # the layers' oneDNN path is checked exactly above; here, the whole model
        set_kernel_preference(exported, "onednn")
        with torch.no_grad():
            for k, v in inputs.items():
                # one-ulp differences of the float epilogue can flip a code downstream: compare as a whole
                out = exported(**v).sample
                assert float((out - fake[k]).norm() / fake[k].norm()) < 2e-2


def test_save_and_load_an_exported_dynamic_model(tmp_path):
    model = dq.export_quantized(qalora(make_sd15_unet(), sd15_inputs, 4, 8, act_granularity="token"))
    set_kernel_preference(model, "torch")
    inputs = sd15_inputs(torch.tensor([400.0, 30.0]))
    with torch.no_grad():
        before = model(**inputs).sample
    model.save_pretrained(tmp_path)
    layers = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layers"]
    assert {v.get("act_granularity") for v in layers.values()} == {"token"}
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    set_kernel_preference(loaded, "torch")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, before)


def test_quantize_on_load_with_dynamic_activations(tmp_path):
    make_unet2d().save_pretrained(tmp_path / "float")
    cfg = dq.QALoraQuantConfig(r=4, weight_bits=4, act_bits=4, act_granularity="group", act_group_size=8)
    model = UNet2DModel.from_pretrained(tmp_path / "float", quantization_config=cfg)
    # the 8-bit layers are dynamic too: calibration has nothing to do, and the model runs at once
    with torch.no_grad():
        fake = model(**unet2d_inputs(500.0)).sample
    dq.export_quantized(model, kernel_preference="torch")
    with torch.no_grad():
        assert torch.equal(model(**unet2d_inputs(500.0)).sample, fake)
