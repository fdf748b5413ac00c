"""Save / load of Winograd models (safetensors + JSON, and ``state_dict``) and the composition with QALoRA."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel
from winograd_models import make_tiny_unet, unet_inputs

import diffusers_qalora as dq
from diffusers_qalora.quant import TemporalActQuantizer
from diffusers_qalora.winograd import (
    DirectQuantConv2d,
    WinogradConfig,
    WinogradConv2d,
    apply_winograd,
    load_winograd,
    save_winograd,
    sqnr_db,
    winograd_modules,
    winograd_state_dict,
)

TABLE = [100.0, 500.0, 900.0]


def _out(model, batch=3, timestep=500):
    x, t, y = unet_inputs(batch, timestep=timestep)
    with torch.no_grad():
        return model(x, t, class_labels=y).sample


def _run(model):
    def run():
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for t in TABLE:
                model(torch.randn(4, 1, 16, 16, generator=gen), torch.tensor(t), class_labels=torch.arange(4))

    return run


TUNED = WinogradConfig(tile=4, bits=8, group_size=8, output_bits=8, scale_init="lavin", tune_steps=4, tune_samples=4)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = make_tiny_unet()
    apply_winograd(model, TUNED, calibration_run=_run(model))
    assert any(
        float(m.scales.log_b.detach().abs().sum()) > 0 for m in winograd_modules(model).values()
    )  # tuned: not lavin
    out = save_winograd(model, tmp_path / "wino")
    assert sorted(p.name for p in out.iterdir()) == ["winograd.safetensors", "winograd_config.json"]
    record = json.loads((out / "winograd_config.json").read_text())
    assert record["format"] == "diffusers_qalora.winograd" and len(record["modules"]) == 18
    assert record["modules"][0]["config"]["output_bits"] == 8
    fresh = make_tiny_unet()
    report = load_winograd(fresh, out)
    assert set(report.replaced) == set(winograd_modules(model))
    assert torch.equal(_out(fresh), _out(model))
    # the Winograd state also lives in the modules: state_dict round-trips between two converted models
    other = make_tiny_unet(seed=5)
    apply_winograd(other, TUNED)
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_out(other), _out(model))
    tensors, _ = winograd_state_dict(model)
    assert "conv_out.scales.log_b" in tensors and "conv_out.weight" in tensors


def test_direct_baseline_round_trip(tmp_path):
    model = make_tiny_unet()
    apply_winograd(model, WinogradConfig(algorithm="direct", bits=8, target_modules=["conv2"]))
    save_winograd(model, tmp_path)
    fresh = make_tiny_unet()
    load_winograd(fresh, tmp_path)
    assert all(isinstance(m, DirectQuantConv2d) for m in winograd_modules(fresh).values())
    assert torch.equal(_out(fresh), _out(model))


def test_load_into_a_different_model_fails_and_changes_nothing(tmp_path):
    model = make_tiny_unet()
    apply_winograd(model, WinogradConfig(bits=8))
    save_winograd(model, tmp_path)
    torch.manual_seed(0)
    wider = UNet2DModel(**{**dict(make_tiny_unet().config), "block_out_channels": (8, 24)}).eval()
    before = dict(wider.named_modules())
    with pytest.raises(ValueError, match="channels in this model"):
        load_winograd(wider, tmp_path)
    assert dict(wider.named_modules()) == before
    with pytest.raises(FileNotFoundError, match="winograd_config.json"):
        load_winograd(make_tiny_unet(), tmp_path / "missing")
    with pytest.raises(ValueError, match="no WinogradConv2d"):
        save_winograd(make_tiny_unet(), tmp_path / "empty")


# -- QALoRA ---------------------------------------------------------------------------------------------------------


def _qalora_model(seed: int = 0):
    model = make_tiny_unet(seed)
    cfg = dq.QALoraConfig(r=2, lora_alpha=2, weight_bits=4, act_bits=8, timesteps=TABLE, init_weights=False)
    dq.get_qalora_model(model, cfg)
    dq.calibrate_activations(model, _run(model))
    return model


def test_full_precision_winograd_on_a_qalora_student_computes_the_student():
    model = _qalora_model()
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "qal_act_quantizer")}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0].clone())) for n, m in layers.items()
    ]
    student = _out(model)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        student_layers = {n: layers[n](x) for n, x in inputs.items()}
    weights = {
        n: layers[n].quantized_weight("default").detach().clone() for n in ("conv_out", "mid_block.resnets.0.conv1")
    }
    report = apply_winograd(model, WinogradConfig(bits=None))
    assert len(report.replaced) == 19
    assert all(
        r.source == "QALoRA Conv2d" and r.adapter == "default" and r.input_quantizer for r in report.replaced.values()
    )
    assert "kernel size" in report.skipped["down_blocks.1.resnets.0.conv_shortcut"]  # still a QALoRA layer
    assert not any(n.endswith("base_layer") for n in report.skipped)
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, WinogradConv2d) and isinstance(layer.input_quantizer, TemporalActQuantizer)
        assert torch.equal(layer.weight, weight)  # Q_w(W0 + scaling B A): the student's weight
    with torch.no_grad():  # each layer computes the student's layer (the timestep context still holds t=500)
        for name, layer in winograd_modules(model).items():
            torch.testing.assert_close(layer(inputs[name]), student_layers[name], atol=2e-5, rtol=1e-5)
    # end to end, the 8-bit activation quantizers downstream may flip a code where the float sums differ by 1e-6
    assert sqnr_db(student, _out(model)) > 35.0
    quantized = _qalora_model()
    assert len(apply_winograd(quantized, WinogradConfig(bits=8, group_size=8)).replaced) == 18
    assert sqnr_db(student, _out(quantized)) > 10.0


def test_qalora_weight_and_act_options():
    model = _qalora_model()
    layer = model.get_submodule("mid_block.resnets.0.conv1")
    float_weight = layer.merged_float_weight("default").detach().clone()
    apply_winograd(model, WinogradConfig(bits=8, qalora_weight="float", qalora_act="drop"))
    new = model.get_submodule("mid_block.resnets.0.conv1")
    assert new.input_quantizer is None and torch.equal(new.weight, float_weight)
    with pytest.raises(ValueError, match="`qalora_act`"):
        WinogradConfig(qalora_act="maybe")


def test_uncalibrated_qalora_model_is_refused():
    model = make_tiny_unet()
    dq.get_qalora_model(model, dq.QALoraConfig(r=2, lora_alpha=2, weight_bits=8, act_bits=8, timesteps=TABLE))
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match="not calibrated"):
        apply_winograd(model, WinogradConfig(bits=8))
    assert dict(model.named_modules()) == before


def test_qalora_winograd_layers_save_and_load_into_a_plain_model(tmp_path):
    model = _qalora_model()
    apply_winograd(model, WinogradConfig(bits=8, group_size=8))
    save_winograd(model, tmp_path)
    fresh = make_tiny_unet()  # no QALoRA: the loaded layers bring their input quantizers and a timestep hook
    report = load_winograd(fresh, tmp_path)
    assert all(r.input_quantizer for r in report.replaced.values())
    for timestep in (100, 700):
        _out(model, timestep=timestep), _out(fresh, timestep=timestep)  # sets both timestep contexts
        for name, layer in winograd_modules(model).items():
            loaded = fresh.get_submodule(name)
            x = torch.randn(2, layer.in_channels, 8, 8)
            with torch.no_grad():
                assert torch.equal(loaded(x), layer(x)), name


def test_dynamic_input_quantizers_save_and_load(tmp_path):
    """A QALoRA model with per-group dynamic activations: its Winograd layers keep the dynamic quantizer, and
    save/load rebuilds it from its settings."""
    torch.manual_seed(0)
    model = dq.get_qalora_model(
        make_tiny_unet(),
        dq.QALoraConfig(r=2, timesteps=TABLE, weight_init="minmax", act_granularity="group", act_group_size=4),
    )
    apply_winograd(model, WinogradConfig(bits=8, group_size=8))
    layers = winograd_modules(model)
    assert all(isinstance(m.input_quantizer, dq.quant.DynamicActQuantizer) for m in layers.values())
    save_winograd(model, tmp_path)
    fresh = make_tiny_unet()
    load_winograd(fresh, tmp_path)
    for name, layer in layers.items():
        loaded = fresh.get_submodule(name)
        assert loaded.input_quantizer.granularity == layer.input_quantizer.granularity
        x = torch.randn(2, layer.in_channels, 8, 8)
        with torch.no_grad():
            assert torch.equal(loaded(x), layer(x)), name


def test_exported_winograd_model_save_pretrained_and_from_pretrained(tmp_path):
    """QALoRA -> Winograd convs -> export_quantized -> save_pretrained -> from_pretrained: the same layers come back
    and compute the same numbers; a config naming a module the model lacks fails with a clear error."""
    model = _qalora_model()
    apply_winograd(model, TUNED)
    exported = dq.export_quantized(model)
    names = sorted(winograd_modules(exported))
    assert names and any(isinstance(m, dq.IntegerLinear) for m in exported.modules())
    exported.save_pretrained(tmp_path / "int")
    saved = json.loads((tmp_path / "int" / "config.json").read_text())["quantization_config"]
    assert sorted(m["name"] for m in saved["winograd"]["modules"]) == names
    loaded = UNet2DModel.from_pretrained(tmp_path / "int")
    assert sorted(winograd_modules(loaded)) == names
    for name in names:
        a, b = exported.get_submodule(name), loaded.get_submodule(name)
        assert type(a) is type(b) and a.config == b.config
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), f"{name}.{key}"
    for timestep in (100, 700):
        assert torch.equal(_out(exported, timestep=timestep), _out(loaded, timestep=timestep))

    config = json.loads((tmp_path / "int" / "config.json").read_text())
    config["quantization_config"]["winograd"]["modules"][0]["name"] = "down_blocks.9.conv"
    (tmp_path / "int" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="down_blocks.9.conv"):
        UNet2DModel.from_pretrained(tmp_path / "int")
