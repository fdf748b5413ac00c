"""`QALoraQuantConfig` is derived from `QALoraConfig`: one validation, one conversion, regex targets kept; and
``from_pretrained(..., quantization_config=QALoraQuantConfig())`` loads fast with the adapter frozen."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DModel
from tiny_models import make_unet2d, output_of, unet2d_inputs

import diffusers_qalora as dq
from diffusers_qalora.integrations.diffusers.config import METHOD_FIELDS, NOT_TAKEN_FROM_QALORA_CONFIG
from diffusers_qalora.tuners.qalora.layer import QALoraLayer
from diffusers_qalora.tuners.qalora.model import qalora_layers

# A value different from the default for every method field (a new QALoraConfig field must be added here).
NON_DEFAULT = {
    "r": 8,
    "lora_alpha": 16.0,
    "weight_bits": 3,
    "act_bits": 6,
    "target_modules": ["to_q", "conv1"],
    "eight_bit_modules": ["conv_in"],
    "special_bits": 7,
    "weight_granularity": "group",
    "weight_group_size": 4,
    "weight_symmetric": False,
    "weight_init": "lp",
    "act_symmetric": True,
    "act_init": "mse",
    "act_granularity": "group",
    "act_group_size": 4,
    "timesteps": [0.0, 250.0, 999.0],
    "temporal_activations": False,
    "lsq_grad_scale": True,
    "quantize_attention": True,
    "attention_bits": 5,
    "quantize_attention_probs": True,
    "timestep_argument": "t",
    "kernel_preference": "triton",
    "init_weights": False,
}


def test_every_qalora_config_field_is_taken_or_excluded_for_a_reason():
    qalora_fields = [f.name for f in dataclasses.fields(dq.QALoraConfig)]
    quant_fields = {f.name for f in dataclasses.fields(dq.QALoraQuantConfig)}
    assert set(METHOD_FIELDS) == set(NON_DEFAULT)
    for name in qalora_fields:
        assert name in quant_fields or name in NOT_TAKEN_FROM_QALORA_CONFIG, name
    assert "modules_to_not_convert" in quant_fields and "exclude_modules" not in quant_fields
    # Same help and defaults as QALoraConfig, except the loader's own defaults and the kernel preference, which
    # also names the integer layers' "onednn".
    source = {f.name: f for f in dataclasses.fields(dq.QALoraConfig)}
    for f in dataclasses.fields(dq.QALoraQuantConfig):
        if f.name in METHOD_FIELDS and f.name not in ("act_bits", "weight_init", "kernel_preference"):
            assert (f.default, f.metadata["help"]) == (source[f.name].default, source[f.name].metadata["help"])
    assert dq.QALoraQuantConfig().act_bits == 8 and dq.QALoraQuantConfig().weight_init == "minmax"
    # The docstring names every field.
    for name in quant_fields:
        assert f"``{name}``" in dq.QALoraQuantConfig.__doc__ or f"{name} (" in dq.QALoraQuantConfig.__doc__, name


def test_conversion_keeps_every_setting_both_ways():
    qalora = dq.QALoraConfig(**NON_DEFAULT, exclude_modules=["conv_out"])
    quant = dq.QALoraQuantConfig.from_qalora_config(qalora)
    for name, value in NON_DEFAULT.items():
        expected = sorted(value) if name == "target_modules" else value
        assert getattr(quant, name) == expected, name
    assert quant.modules_to_not_convert == ["conv_out"]
    assert dq.QALoraQuantConfig.from_qalora_config(qalora, kernel_preference="torch").kernel_preference == "torch"
    data = quant.to_dict()
    assert json.loads(json.dumps(data)) == data
    again = dq.QALoraQuantConfig.from_dict(data).to_qalora_config()
    for name in NON_DEFAULT:
        assert getattr(again, name) == getattr(qalora, name), name
    assert again.exclude_modules == qalora.exclude_modules == {"conv_out"}


def test_regex_targets_are_kept():
    regex = r".*attentions\.\d+\.(to_q|to_k)"
    quant = dq.QALoraQuantConfig.from_qalora_config(dq.QALoraConfig(target_modules=regex, exclude_modules=r".*to_k"))
    assert quant.target_modules == regex and quant.modules_to_not_convert == r".*to_k"
    data = json.loads(json.dumps(quant.to_dict()))
    back = dq.QALoraQuantConfig.from_dict(data).to_qalora_config()
    assert back.target_modules == regex and back.exclude_modules == r".*to_k"


def test_regex_targets_select_the_layers_on_load(tmp_path):
    make_unet2d().save_pretrained(tmp_path)
    config = dq.QALoraQuantConfig(
        target_modules=r".*attentions\.0\.to_(q|k)", modules_to_not_convert=r".*to_k", eight_bit_modules=[], r=4
    )
    model = UNet2DModel.from_pretrained(tmp_path, quantization_config=config)
    wrapped = sorted(qalora_layers(model))
    assert wrapped and all(name.endswith("attentions.0.to_q") for name in wrapped)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"lora_alpha": 0.0}, "lora_alpha"),  # checked only by QALoraConfig before the derivation
        ({"quantize_attention_probs": True}, "quantize_attention"),
        ({"weight_granularity": "group"}, "weight_group_size"),
        ({"timesteps": [5.0, 1.0]}, "timesteps"),
        ({"weight_init": "kmeans"}, "weight_init"),
        ({"backend": "cutlass"}, "backend"),
        ({"trainable_adapter": "yes"}, "trainable_adapter"),
        ({"target_modules": 3}, "target_modules"),
    ],
)
def test_one_validation_with_qalora_config_messages(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match) as quant_error:
        dq.QALoraQuantConfig(**kwargs)
    if not {"backend", "trainable_adapter", "target_modules"} & set(kwargs):
        with pytest.raises(ValueError) as qalora_error:
            dq.QALoraConfig(**kwargs)
        assert str(quant_error.value) == str(qalora_error.value)


def test_load_default_is_minmax_and_frozen_and_trainable_on_request(tmp_path):
    make_unet2d().save_pretrained(tmp_path)
    timesteps = [0.0, 500.0, 999.0]
    frozen = UNet2DModel.from_pretrained(tmp_path, quantization_config=dq.QALoraQuantConfig(r=4, timesteps=timesteps))
    assert any(isinstance(m, QALoraLayer) for m in frozen.modules())
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert frozen.peft_config["default"].weight_init == "minmax" and frozen.peft_config["default"].inference_mode
    with pytest.raises(ValueError, match="no trainable QALoRA parameter"):
        dq.get_qalora_param_groups(frozen)
    # The frozen default is the min-max PTQ model: same weight steps as get_qalora_model with weight_init="minmax".
    reference = dq.get_qalora_model(
        make_unet2d(), dq.QALoraConfig(r=4, act_bits=8, timesteps=timesteps, weight_init="minmax")
    )
    for name, layer in qalora_layers(frozen).items():
        torch.testing.assert_close(
            layer.qal_weight_quantizer["default"].step,
            qalora_layers(reference)[name].qal_weight_quantizer["default"].step,
        )
    dq.calibrate_activations(frozen, lambda: [frozen(**unet2d_inputs(t)) for t in timesteps])
    assert torch.isfinite(output_of(frozen(**unet2d_inputs(500.0)))).all()

    trainable = UNet2DModel.from_pretrained(
        tmp_path, quantization_config=dq.QALoraQuantConfig(r=4, timesteps=timesteps, trainable_adapter=True)
    )
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(".qal_" in n for n in names)
    torch.optim.AdamW(dq.get_qalora_param_groups(trainable))
    # A frozen load becomes trainable through the public switch.
    dq.set_qalora_adapter(frozen, "default", trainable=True)
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == names
