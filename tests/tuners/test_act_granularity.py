"""``QALoraConfig(act_granularity="token" | "group")``: dynamic input quantizers in the tuner, on every model kind."""

from __future__ import annotations

import json

import pytest
import torch
from test_qalora import assert_unchanged, make_config, quantized_model, run, snapshot
from tiny_models import MODEL_KINDS
from torch import nn

import diffusers_qalora as dq
from diffusers_qalora.quant import DynamicActQuantizer, PerGroup, PerToken, TemporalActQuantizer
from diffusers_qalora.tuners.qalora import qalora_layers

KINDS = sorted(MODEL_KINDS)


def _group_size(model: nn.Module) -> int:
    """The largest power of two dividing the input channels of every layer outside the 8-bit ones (>= 2 here)."""
    channels = [m.weight.shape[1] for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    size = 1
    while all(c % (size * 2) == 0 for c in channels if c >= 8):
        size *= 2
    return size


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("granularity", ["token", "group"])
def test_every_input_quantizer_is_dynamic_and_matches_the_formula(kind, granularity):
    case = MODEL_KINDS[kind]
    extra = {"act_group_size": _group_size(case.build())} if granularity == "group" else {}
    model = quantized_model(case, init_weights=False, act_granularity=granularity, **extra)
    for name, layer in qalora_layers(model).items():
        aq = layer.qal_act_quantizer["default"]
        assert isinstance(aq, DynamicActQuantizer), name
        assert aq.channel_dim == (-1 if isinstance(layer.get_base_layer(), nn.Linear) else 1)
        eight_bit = layer.eight_bit["default"]
        want = PerToken() if granularity == "token" or eight_bit else PerGroup(extra["act_group_size"])
        assert aq.granularity == want and aq.bits == (8 if eight_bit else 4)
    # the model's output is that of the layers' own computation: q(x) then the fake-quantized weight
    layer = next(iter(qalora_layers(model).values()))
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    run(model, case)
    handle.remove()
    aq = layer.qal_act_quantizer["default"]
    assert torch.equal(seen["y"], layer._op(aq(seen["x"]), layer.quantized_weight("default")))


@pytest.mark.parametrize("kind", ["unet2d", "sd3"])
def test_eight_bit_layers_are_per_token_and_others_per_group(kind):
    case = MODEL_KINDS[kind]
    size = _group_size(case.build())
    model = quantized_model(case, act_granularity="group", act_group_size=size)
    kinds = {layer.eight_bit["default"]: set() for layer in qalora_layers(model).values()}
    for layer in qalora_layers(model).values():
        kinds[layer.eight_bit["default"]].add(layer.qal_act_quantizer["default"].granularity)
    assert kinds[True] == {PerToken()} and kinds[False] == {PerGroup(size)}


def test_tensor_granularity_is_unchanged():
    case = MODEL_KINDS["unet2d"]
    model = quantized_model(case)
    assert all(
        isinstance(layer.qal_act_quantizer["default"], TemporalActQuantizer) for layer in qalora_layers(model).values()
    )


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    case = MODEL_KINDS[kind]
    model = quantized_model(case, init_weights=False, act_granularity="token")
    t = case.timesteps[1] * 1.3
    before = run(model, case, t)
    folder = dq.save_qalora_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["act_granularity"] == "token" and config["act_group_size"] is None
    fresh = dq.load_qalora_adapter(case.build(), folder)
    assert torch.equal(run(fresh, case, t), before)


def test_calibration_only_touches_the_temporal_quantizers():
    """With dynamic inputs, calibration fills the 8-bit layers' static step and nothing else; copying a calibration
    from a per-tensor adapter works (the dynamic quantizers take nothing)."""
    case = MODEL_KINDS["unet2d"]
    model = quantized_model(case, calibrate=False, act_granularity="token")
    temporal = [
        layer.qal_act_quantizer["default"]
        for layer in qalora_layers(model).values()
        if isinstance(layer.qal_act_quantizer["default"], TemporalActQuantizer)
    ]
    assert temporal == []  # 8-bit layers are dynamic too: nothing needs calibrating
    run(model, case)  # so the model runs at once
    dq.get_qalora_model(model, make_config(case), "tensor")
    dq.calibrate_activations(model, lambda: run(model, case))
    dq.get_qalora_model(model, make_config(case, act_granularity="token"), "token2")
    dq.copy_activation_calibration(model, "tensor", "token2")
    with pytest.raises(ValueError, match="dynamic quantizer stores no step sizes"):
        dq.copy_activation_calibration(model, "token2", "tensor")


def test_training_reaches_the_lora_through_the_dynamic_quantizer():
    case = MODEL_KINDS["unet2d"]
    model = quantized_model(case, act_granularity="group", act_group_size=_group_size(case.build()))
    dq.set_qalora_adapter(model, "default", trainable=True)
    groups = dq.get_qalora_param_groups(model)
    assert "act_steps" not in [g["name"] for g in groups]  # nothing to learn in the activation quantizers
    out = model(**case.inputs(case.timesteps[1]))
    (out.sample if hasattr(out, "sample") else out[0]).square().mean().backward()
    layers = [layer for layer in qalora_layers(model).values() if "default" in layer.qal_B]
    assert all(
        layer.qal_B["default"].grad is not None and layer.qal_B["default"].grad.abs().sum() > 0 for layer in layers
    )


def test_bad_values_name_the_field_and_leave_the_model_unchanged():
    with pytest.raises(ValueError, match="act_granularity"):
        dq.QALoraConfig(act_granularity="channel")
    with pytest.raises(ValueError, match="act_group_size.*positive"):
        dq.QALoraConfig(act_granularity="group")
    with pytest.raises(ValueError, match="only used with act_granularity='group'"):
        dq.QALoraConfig(act_group_size=32)
    case = MODEL_KINDS["unet2d"]
    model = case.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"must divide the layer's \d+ input channels"):
        dq.get_qalora_model(model, make_config(case, act_granularity="group", act_group_size=3))
    assert_unchanged(model, before)
    assert not hasattr(model, "peft_config")
