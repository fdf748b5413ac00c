"""The kernel preference travels in the configs and the saved files: ``QALoraConfig.kernel_preference`` for the
fake-quant modules an adapter injects, ``export_quantized`` / ``QALoraQuantConfig.kernel_preference`` for the integer
layers; and files written by earlier versions still load (``"backend": "reference"`` in an exported model's
``quantization_config``, ``layers_to_transform`` / ``layers_pattern`` in adapter configs)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from peft import PeftModel
from tiny_models import make_sd15_unet, make_unet2d, unet2d_inputs

import diffusers_qalora as dq
from diffusers_qalora.export import integer_layers
from diffusers_qalora.quant import TemporalActQuantizer, WeightQuantizer
from diffusers_qalora.quant.kernel_preference import kernel_preference_of

TABLE = [0.0, 500.0, 999.0]


def _calibrated(**config):
    cfg = dq.QALoraConfig(
        r=2, weight_bits=4, act_bits=8, timesteps=TABLE, weight_init="minmax", act_init="minmax", **config
    )
    model = dq.get_qalora_model(make_unet2d(), cfg)
    dq.calibrate_activations(model, lambda: [model(**unet2d_inputs(t)) for t in TABLE])
    return model


def _preferences(model) -> set[str]:
    quantizers = [m for m in model.modules() if isinstance(m, WeightQuantizer | TemporalActQuantizer)]
    assert quantizers
    return {kernel_preference_of(q).value for q in quantizers}


def _integer_preferences(model) -> set[str]:
    return {kernel_preference_of(layer).value for layer in integer_layers(model).values()}


def _out(model, t=250.0):
    with torch.no_grad():
        return model(**unet2d_inputs(t)).sample


def test_the_adapter_config_sets_its_modules_and_the_export(tmp_path):
    model = _calibrated(kernel_preference="torch")
    assert _preferences(model) == {"torch"}
    dq.save_qalora_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["kernel_preference"] == "torch"
    assert _preferences(PeftModel.from_pretrained(make_unet2d(), tmp_path / "adapter")) == {"torch"}
    fake_quant = _out(model)
    exported = dq.export_quantized(model)  # the adapter's preference by default
    assert _integer_preferences(exported) == {"torch"}
    assert torch.equal(_out(exported), fake_quant)  # the torch path is the fake-quant model, bit for bit
    exported.save_pretrained(tmp_path / "int")
    saved = json.loads((tmp_path / "int" / "config.json").read_text())["quantization_config"]
    assert saved["kernel_preference"] == "torch" and "backend" not in saved
    loaded = UNet2DModel.from_pretrained(tmp_path / "int")
    assert _integer_preferences(loaded) == {"torch"} and torch.equal(_out(loaded), fake_quant)


def test_export_preference_overrides_and_onednn_is_for_integer_layers_only(tmp_path):
    with pytest.raises(ValueError, match="`kernel_preference='onednn'` names oneDNN"):
        dq.QALoraConfig(kernel_preference="onednn")
    model = _calibrated()
    exported = dq.export_quantized(model, kernel_preference="onednn")
    assert _integer_preferences(exported) == {"onednn"}
    exported.save_pretrained(tmp_path / "int")
    loaded = UNet2DModel.from_pretrained(tmp_path / "int")
    assert loaded.config.quantization_config.kernel_preference == "onednn"
    assert _integer_preferences(loaded) == {"onednn"}
    dq.set_kernel_preference(loaded, "auto")
    assert _integer_preferences(loaded) == {"auto"}


def test_quantized_attention_modules_take_the_adapter_preference():
    config = dq.QALoraConfig(r=2, quantize_attention=True, kernel_preference="torch", weight_init="minmax")
    unet = dq.get_qalora_model(make_sd15_unet(), config)
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert attention and {kernel_preference_of(m).value for m in attention} == {"torch"}


@pytest.mark.parametrize("old, new", [("reference", "torch"), ("auto", "auto"), ("onednn", "onednn")])
def test_exported_folders_of_earlier_versions_load(tmp_path, old, new):
    model = _calibrated()
    fake_quant = _out(model)
    dq.export_quantized(model).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]["kernel_preference"]
    config["quantization_config"]["backend"] = old  # what earlier versions wrote
    path.write_text(json.dumps(config))
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.kernel_preference == new
    assert _integer_preferences(loaded) == {new}
    if old == "reference":
        assert torch.equal(_out(loaded), fake_quant)


def _with_obsolete_fields(config: dict) -> dict:
    config = {**config, "layers_to_transform": None, "layers_pattern": None}  # what earlier versions wrote
    del config["kernel_preference"]
    return config


def _no_unexpected_keyword_warning(caught) -> None:
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)], [str(w.message) for w in caught]


def test_adapter_configs_of_earlier_versions_load(tmp_path):
    model = _calibrated()
    expected = _out(model)
    dq.save_qalora_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(_with_obsolete_fields(json.loads(path.read_text()))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_peft = PeftModel.from_pretrained(make_unet2d(), tmp_path)
        ours = dq.load_qalora_adapter(make_unet2d(), tmp_path)
    _no_unexpected_keyword_warning(caught)
    assert not hasattr(by_peft.peft_config["default"], "layers_to_transform")
    assert torch.equal(_out(ours), expected) and _preferences(ours) == {"auto"}


def test_diffusers_save_records_of_earlier_versions_load(tmp_path):
    unet = dq.get_qalora_model(make_sd15_unet(), dq.QALoraConfig(r=2, weight_init="minmax"))
    state = unet.state_dict()
    unet.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    record = config["quantization_config"]["adapters"]["configs"]
    record["default"] = _with_obsolete_fields(record["default"])
    path.write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    _no_unexpected_keyword_warning(caught)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)
