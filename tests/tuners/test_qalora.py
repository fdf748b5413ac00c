"""The QALoRA PEFT tuner on tiny diffusers denoisers: injection, exact PTQ start, calibration, save/load and PEFT
interop, pipelines, gradients and optimizer groups, coexistence with a plain LoRA, bad input, merge/unmerge.

Every model is built from a config with a fixed seed (see ``tiny_models.py``); reference values are computed here
independently of the library (manual fake quantization, FP models with hooks) wherever that is possible.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.functional import set_adapter as peft_set_adapter
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import MODEL_KINDS, make_sd15_unet, make_tiny_sd_pipeline, make_unet2d, output_of
from torch import nn

import diffusers_qalora as dq
from diffusers_qalora.tuners.qalora import Conv2d as QConv2d
from diffusers_qalora.tuners.qalora import Linear as QLinear
from diffusers_qalora.tuners.qalora import QALoraLayer, qalora_layers

KINDS = sorted(MODEL_KINDS)

# The 8-bit layers (no LoRA) that the default `eight_bit_modules` select in each tiny model, written out by hand.
EIGHT_BIT = {
    "unet2d": {"conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_out"},
    "sd15": {"conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_out"},
    "sdxl": {
        "conv_in",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
        "add_embedding.linear_2",
        "conv_out",
    },
    "sd3": {
        "pos_embed.proj",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "context_embedder",
        "norm_out.linear",
        "proj_out",
    },
    "flux": {
        "x_embedder",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "context_embedder",
        "norm_out.linear",
        "proj_out",
    },
}

FORBIDDEN_SUBSTRINGS = ("lora_", "lora_A", "lora_B")


# -- helpers ----------------------------------------------------------------------------------------------------------
def make_config(case, **overrides) -> dq.QALoraConfig:
    """r = 2, the case's own timestep table, min-max initialisers (fast)."""
    kwargs = dict(r=2, timesteps=list(case.timesteps), weight_init="minmax", act_init="minmax")
    kwargs.update(overrides)
    return dq.QALoraConfig(**kwargs)


def calibration_run(model, case, scale=None):
    """A callable feeding ``model`` one batch per table timestep (input scaled by ``scale(t)`` if given)."""

    def run():
        for t in case.timesteps:
            model(**case.inputs(t, scale=1.0 if scale is None else scale(t)))

    return run


def quantized_model(case, seed=0, calibrate=True, **overrides):
    model = dq.get_qalora_model(case.build(seed), make_config(case, **overrides))
    if calibrate:
        dq.calibrate_activations(model, calibration_run(model, case))
    return model


def run(model, case, t=None, seed=1) -> torch.Tensor:
    with torch.no_grad():
        return output_of(model(**case.inputs(case.timesteps[1] if t is None else t, seed=seed)))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: module tree and types, tensors, hooks, PEFT configs."""
    return {
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": dict(model._forward_pre_hooks),
        "peft_config": dict(getattr(model, "peft_config", {}) or {}),
        "context": getattr(model, "_qalora_timestep_context", None),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["hooks"].keys() == before["hooks"].keys()
    assert after["peft_config"] == before["peft_config"]
    assert after["context"] is before["context"]


def manual_fake_quant(x, step, zero_point, qmin, qmax):
    """``s * (clamp(round(x / s) + round(z), qmin, qmax) - round(z))``, written out independently."""
    z = torch.round(zero_point)
    return (torch.clamp(torch.round(x / step) + z, qmin, qmax) - z) * step


def manual_weight(layer: QALoraLayer, adapter: str = "default") -> torch.Tensor:
    """Per-output-channel symmetric fake quantization of the layer's base weight plus its LoRA update."""
    wq = layer.qal_weight_quantizer[adapter]
    weight = layer.get_base_layer().weight.detach().float()
    if adapter in layer.qal_A:
        a, b = layer.qal_A[adapter].detach(), layer.qal_B[adapter].detach()
        weight = weight + (b @ a.reshape(a.shape[0], -1)).reshape(weight.shape) * layer.scaling[adapter]
    bits = wq.bits
    step = wq.step.detach().reshape(-1, *([1] * (weight.dim() - 1)))
    return manual_fake_quant(weight, step, torch.zeros(()), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def act_qparams_at(layer: QALoraLayer, t: float, adapter: str = "default"):
    """(step, zero point, qmin, qmax) of the layer's activation quantizer at ``t``, by linear interpolation between
    the two table entries around ``t`` (clamped at the ends), computed from the raw table."""
    aq = layer.qal_act_quantizer[adapter]
    table = aq.timesteps.tolist()
    steps = [v.item() for v in aq.step.values]
    zps = [v.item() for v in aq.zero_point.values]
    if t <= table[0] or len(table) == 1:
        i = j = 0
        w = 0.0
    elif t >= table[-1]:
        i = j = len(table) - 1
        w = 0.0
    else:
        j = next(k for k, v in enumerate(table) if v >= t)
        i = j if table[j] == t else j - 1
        w = 0.0 if i == j else (t - table[i]) / (table[j] - table[i])
    step = torch.tensor(steps[i]) * (1 - w) + torch.tensor(steps[j]) * w
    zp = torch.tensor(zps[i]) * (1 - w) + torch.tensor(zps[j]) * w
    return step, zp, 0, 2**aq.bits - 1


def eligible(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the nn.Linear and of the groups=1 nn.Conv2d modules of an unwrapped model."""
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    conv = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    return linear, conv


# -- injection --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_injection_wraps_every_linear_and_conv(kind):
    case = MODEL_KINDS[kind]
    linear, conv = eligible(case.build())
    assert linear and (conv or kind == "flux")  # flux has no conv at all
    model = case.build()
    returned = dq.get_qalora_model(model, make_config(case))
    assert returned is model and type(model).__name__ == type(case.build()).__name__
    layers = qalora_layers(model)
    assert set(layers) == linear | conv
    assert {n for n, m in layers.items() if isinstance(m, QLinear)} == linear
    assert {n for n, m in layers.items() if isinstance(m, QConv2d)} == conv
    for layer in layers.values():
        expected = nn.Linear if isinstance(layer, QLinear) else nn.Conv2d
        assert type(layer.base_layer) is expected
    # No wrapper nested inside a wrapper, and every other module keeps its type.
    assert not any(isinstance(m.base_layer, QALoraLayer) for m in layers.values())
    wrapped = tuple(f"{n}." for n in layers)
    before = {n: type(m) for n, m in case.build().named_modules() if n not in layers}
    after = {n: type(m) for n, m in model.named_modules() if n not in layers and not n.startswith(wrapped)}
    assert after == before


@pytest.mark.parametrize("kind", KINDS)
def test_eight_bit_layers_have_no_lora_and_eight_bit_quantizers(kind):
    case = MODEL_KINDS[kind]
    model = dq.get_qalora_model(case.build(), make_config(case, r=3, weight_bits=4, act_bits=4))
    layers = qalora_layers(model)
    assert {n for n, m in layers.items() if m.eight_bit["default"]} == EIGHT_BIT[kind]
    for name, layer in layers.items():
        wq, aq = layer.qal_weight_quantizer["default"], layer.qal_act_quantizer["default"]
        weight = layer.get_base_layer().weight
        if name in EIGHT_BIT[kind]:
            assert "default" not in layer.qal_A and "default" not in layer.qal_B
            assert (wq.bits, aq.bits) == (8, 8)
            assert len(aq.step) == 1  # one static activation step size for every timestep
            assert not any(p.requires_grad for p in layer.parameters())
        else:
            assert tuple(layer.qal_A["default"].shape) == (3, weight.shape[1], *weight.shape[2:])
            assert tuple(layer.qal_B["default"].shape) == (weight.shape[0], 3)
            assert (wq.bits, aq.bits) == (4, 4)
            assert aq.timesteps.tolist() == list(case.timesteps)
            assert tuple(wq.step.shape) == (weight.shape[0], 1, 1)  # per output channel
            assert torch.count_nonzero(layer.qal_B["default"]) == 0  # init_weights=True: B = 0
            assert layer.qal_A["default"].requires_grad and layer.qal_B["default"].requires_grad
        assert not layer.get_base_layer().weight.requires_grad
    state = get_peft_model_state_dict(model, adapter_name="default")
    for name in EIGHT_BIT[kind]:
        assert f"{name}.qal_A" not in state and f"{name}.qal_B" not in state
        assert f"{name}.qal_weight_quantizer.step" in state
    # Trainable = LoRA factors + step sizes (+ zero points) of the 4-bit layers, nothing else.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".qal_" in n for n in trainable)
    assert not any(n.startswith(tuple(f"{e}." for e in EIGHT_BIT[kind])) for n in trainable)


def test_eight_bit_modules_can_be_disabled_and_targets_restricted():
    case = MODEL_KINDS["sd15"]
    model = dq.get_qalora_model(
        case.build(), make_config(case, eight_bit_modules=[], target_modules=["conv_in", "to_q"])
    )
    layers = qalora_layers(model)
    assert set(layers) == {"conv_in"} | {n for n, _ in case.build().named_modules() if n.endswith(".to_q")}
    assert not any(layer.eight_bit["default"] for layer in layers.values())
    assert layers["conv_in"].qal_weight_quantizer["default"].bits == 4


def test_exclude_modules():
    case = MODEL_KINDS["sd15"]
    model = dq.get_qalora_model(case.build(), make_config(case, exclude_modules=["to_k", "conv_in"]))
    layers = qalora_layers(model)
    linear, conv = eligible(case.build())
    excluded = {n for n in linear | conv if n == "conv_in" or n.endswith(".to_k")}
    assert excluded and set(layers) == (linear | conv) - excluded


def test_model_config_still_reads_and_remove_restores_fp():
    case = MODEL_KINDS["sd15"]
    fp_out = run(case.build(), case)
    model = quantized_model(case)
    assert model.config.in_channels == 4 and model.config.cross_attention_dim == 32
    assert not torch.equal(run(model, case), fp_out)
    dq.remove_qalora(model)
    assert not qalora_layers(model) and not model._forward_pre_hooks
    assert [type(m) for m in model.modules()] == [type(m) for m in case.build().modules()]
    assert torch.equal(run(model, case), fp_out)


# -- the model at init is the PTQ model -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "flux"])
@pytest.mark.parametrize("position", ["entry", "between", "beyond"])
@pytest.mark.parametrize("init_weights", [True, False])
def test_single_layer_equals_manual_fake_quant(kind, position, init_weights):
    """``op(Q_a(x; t), Q_w(W0 + scaling * B A))``, with Q_a's step interpolated at t; B = 0 at init."""
    case = MODEL_KINDS[kind]
    model = quantized_model(case, init_weights=init_weights)
    lo, hi = case.timesteps[1], case.timesteps[2]
    t = {"entry": lo, "between": lo + 0.3 * (hi - lo), "beyond": case.timesteps[-1] * 1.5}[position]
    model._qalora_timestep_context.set(torch.tensor([t, t]))
    layers = qalora_layers(model)
    picked = [n for n, m in layers.items() if isinstance(m, QLinear) and not m.eight_bit["default"]][:2]
    picked += [n for n, m in layers.items() if isinstance(m, QConv2d) and not m.eight_bit["default"]][:2]
    picked += sorted(EIGHT_BIT[kind])[:1]
    g = torch.Generator().manual_seed(3)
    for name in picked:
        layer = layers[name]
        base = layer.get_base_layer()
        if isinstance(base, nn.Linear):
            x = 2.0 * torch.randn(2, 5, base.in_features, generator=g)
        else:
            x = 2.0 * torch.randn(2, base.in_channels, 6, 6, generator=g)
        step, zp, qmin, qmax = act_qparams_at(layer, t if not layer.eight_bit["default"] else 0.0)
        x_hat = manual_fake_quant(x, step, zp, qmin, qmax)
        w_hat = manual_weight(layer)
        if isinstance(base, nn.Linear):
            expected = F.linear(x_hat, w_hat, base.bias)
        else:
            expected = F.conv2d(x_hat, w_hat, base.bias, base.stride, base.padding, base.dilation)
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=name)
        # The weight holds at most 2^bits distinct codes per output channel.
        bits = layer.qal_weight_quantizer["default"].bits
        codes = torch.round(
            w_hat.reshape(w_hat.shape[0], -1) / layer.qal_weight_quantizer["default"].step.reshape(-1, 1)
        )
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init_weights", [True, False])
def test_model_equals_independent_fake_quant_model(kind, init_weights):
    """An FP model whose weights are replaced by manually fake-quantized ones and whose layer inputs are fake-
    quantized by hooks at the call's timestep gives the same output as the QALoRA model: at init (B = 0) that is
    the PTQ model; with B != 0 the weights are Q_w(W0 + scaling * B A)."""
    case = MODEL_KINDS[kind]
    model = quantized_model(case, init_weights=init_weights)
    t = case.timesteps[2]
    reference = case.build()
    modules = dict(reference.named_modules())
    for name, layer in qalora_layers(model).items():
        target = modules[name]
        with torch.no_grad():
            target.weight.copy_(manual_weight(layer))
        qparams = act_qparams_at(layer, t if not layer.eight_bit["default"] else 0.0)
        target.register_forward_pre_hook(lambda m, args, q=qparams: (manual_fake_quant(args[0], *q), *args[1:]))
    expected = run(reference, case, t)
    got = run(model, case, t)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, run(case.build(), case, t))  # and it is not the FP model


@pytest.mark.parametrize("kind", KINDS)
def test_zero_B_gives_the_init_model(kind):
    case = MODEL_KINDS[kind]
    ptq = quantized_model(case)
    trained = quantized_model(case, init_weights=False)
    for t in (case.timesteps[0], case.timesteps[2]):
        assert not torch.equal(run(trained, case, t), run(ptq, case, t))
    with torch.no_grad():
        for layer in qalora_layers(trained).values():
            if "default" in layer.qal_B:
                layer.qal_B["default"].zero_()
    for t in (case.timesteps[0], case.timesteps[2]):
        assert torch.equal(run(trained, case, t), run(ptq, case, t))


@pytest.mark.parametrize("kind", ["unet2d", "sd3"])
def test_mixed_timestep_batch_uses_each_samples_step_sizes(kind):
    case = MODEL_KINDS[kind]
    model = quantized_model(case, init_weights=False)
    t_a, t_b = case.timesteps[0], case.timesteps[2]
    inputs = case.inputs(torch.tensor([t_a, t_b]))
    with torch.no_grad():
        mixed = output_of(model(**inputs))
        singles = []
        for i, t in enumerate((t_a, t_b)):
            single = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            single["timestep"] = torch.tensor([t])
            singles.append(output_of(model(**single)))
    torch.testing.assert_close(mixed, torch.cat(singles), atol=1e-5, rtol=1e-5)
    # ...and the gradient reaches both samples' table entries, and only those.
    model.zero_grad(set_to_none=True)
    output_of(model(**inputs)).pow(2).mean().backward()
    layer = next(m for m in qalora_layers(model).values() if not m.eight_bit["default"])
    grads = [v.grad is not None for v in layer.qal_act_quantizer["default"].step.values]
    assert grads == [True, False, True, False]


# -- calibration ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_uncalibrated_forward_raises_and_leaves_model_unchanged(kind):
    case = MODEL_KINDS[kind]
    model = quantized_model(case, calibrate=False)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"not calibrated.*calibrate_activations"):
        model(**case.inputs(case.timesteps[1]))
    assert_unchanged(model, before)
    dq.calibrate_activations(model, calibration_run(model, case))
    quantizers = [q for layer in qalora_layers(model).values() for q in layer.qal_act_quantizer.values()]
    assert all(bool(q.calibrated) for q in quantizers)
    out = run(model, case)
    assert torch.isfinite(out).all()


def test_calibration_gives_timestep_dependent_step_sizes():
    case = MODEL_KINDS["unet2d"]
    model = quantized_model(case, calibrate=False)
    # The input's scale grows with t, as a noisy sample does; conv_shortcut sees the (un-normalised) hidden state.
    dq.calibrate_activations(model, calibration_run(model, case, scale=lambda t: 1.0 + t / 100.0))
    layers = qalora_layers(model)
    shortcut = [
        v.item() for v in layers["down_blocks.1.resnets.0.conv_shortcut"].qal_act_quantizer["default"].step.values
    ]
    assert all(b > a for a, b in zip(shortcut, shortcut[1:])), shortcut
    assert shortcut[-1] > 3 * shortcut[0]
    varying = [
        name
        for name, layer in layers.items()
        if not layer.eight_bit["default"]
        and len({v.item() for v in layer.qal_act_quantizer["default"].step.values}) > 1
    ]
    assert len(varying) == len([m for m in layers.values() if not m.eight_bit["default"]])
    # The outputs at two timesteps use different step sizes: the same input gives different quantization errors.
    ref = case.build()
    inputs = case.inputs(case.timesteps[0])
    with torch.no_grad():
        errors = []
        for t in (case.timesteps[0], case.timesteps[-1]):
            inputs["timestep"] = torch.full((2,), t)
            errors.append((output_of(model(**inputs)) - output_of(ref(**inputs))).abs().mean())
    assert errors[0] != errors[1]


def test_unobserved_table_entries_are_interpolated():
    case = MODEL_KINDS["unet2d"]
    model = quantized_model(case, calibrate=False)
    lo, hi = case.timesteps[0], case.timesteps[-1]

    def run_ends():
        for t, s in ((lo, 1.0), (hi, 5.0)):
            model(**case.inputs(t, scale=s))

    dq.calibrate_activations(model, run_ends)
    for name, layer in qalora_layers(model).items():
        if layer.eight_bit["default"]:
            continue
        values = [v.item() for v in layer.qal_act_quantizer["default"].step.values]
        for t, v in zip(case.timesteps[1:-1], values[1:-1]):
            w = (t - lo) / (hi - lo)
            assert v == pytest.approx(values[0] * (1 - w) + values[-1] * w, rel=1e-5), name


def test_table_from_a_scheduler():
    pipe = make_tiny_sd_pipeline()
    pipe.scheduler.set_timesteps(4)
    table = sorted(set(pipe.scheduler.timesteps.tolist()))
    assert table == [1, 251, 501, 751]
    pipe.unet = dq.get_qalora_model(
        pipe.unet, dq.QALoraConfig(r=2, timesteps=table, weight_init="minmax", act_init="minmax")
    )
    call = dict(prompt="a cat", num_inference_steps=4, height=16, width=16, output_type="np")
    dq.calibrate_activations(pipe.unet, lambda: pipe(**call))
    layer = qalora_layers(pipe.unet)["down_blocks.0.resnets.0.time_emb_proj"]
    quantizer = layer.qal_act_quantizer["default"]
    assert quantizer.timesteps.tolist() == table
    assert len({v.item() for v in quantizer.step.values}) == 4  # each entry observed on its own
    assert pipe(**call).images.shape == (1, 16, 16, 3)


def test_failed_calibration_changes_nothing():
    case = MODEL_KINDS["unet2d"]
    model = quantized_model(case)
    before = snapshot(model)

    def broken():
        model(**case.inputs(case.timesteps[0], scale=7.0))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dq.calibrate_activations(model, broken)
    assert_unchanged(model, before)
    assert not any(layer._calibrating for layer in qalora_layers(model).values())
    with pytest.raises(TypeError, match="callable"):
        dq.calibrate_activations(model, None)


# -- save / load and PEFT interop -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_bit_identical(kind, tmp_path):
    case = MODEL_KINDS[kind]
    model = quantized_model(case, init_weights=False)
    outputs = [run(model, case, t) for t in (case.timesteps[0], case.timesteps[1] * 1.3)]
    folder = dq.save_qalora_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "QALORA" and config["r"] == 2 and config["timesteps"] == list(case.timesteps)

    fresh = case.build()
    assert dq.load_qalora_adapter(fresh, folder) is fresh
    for out, t in zip(outputs, (case.timesteps[0], case.timesteps[1] * 1.3)):
        assert torch.equal(run(fresh, case, t), out)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference by default

    peft_model = PeftModel.from_pretrained(case.build(), folder)
    assert isinstance(peft_model.peft_config["default"], dq.QALoraConfig)
    for out, t in zip(outputs, (case.timesteps[0], case.timesteps[1] * 1.3)):
        assert torch.equal(run(peft_model, case, t), out)


def test_load_trainable_and_uncalibrated_adapter(tmp_path):
    case = MODEL_KINDS["unet2d"]
    model = quantized_model(case, calibrate=False, init_weights=False)
    dq.save_qalora_adapter(model, tmp_path)
    fresh = dq.load_qalora_adapter(case.build(), tmp_path, is_trainable=True)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="not calibrated"):  # the uncalibrated flag is saved
        fresh(**case.inputs(0.0))


def test_peft_get_peft_model_save_pretrained_from_pretrained(tmp_path):
    case = MODEL_KINDS["sd15"]
    fp_out = run(case.build(), case)
    peft_model = peft.get_peft_model(case.build(), make_config(case, init_weights=False))
    assert isinstance(peft_model.base_model, dq.QALoraModel)
    dq.calibrate_activations(peft_model, calibration_run(peft_model, case))
    out = run(peft_model, case)
    assert not torch.equal(out, fp_out)
    with peft_model.disable_adapter():
        assert torch.equal(run(peft_model, case), fp_out)
    assert torch.equal(run(peft_model, case), out)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.build(), tmp_path)
    assert torch.equal(run(reloaded, case), out)
    # save_qalora_adapter on a PeftModel writes the same tensors.
    dq.save_qalora_adapter(peft_model, tmp_path / "dq")
    a, b = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "dq" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peft_needs_the_import_to_read_a_qalora_folder(tmp_path):
    """PEFT has no plug-in discovery: a fresh interpreter reads a QALoRA folder only after `import diffusers_qalora`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    case = MODEL_KINDS["unet2d"]
    dq.save_qalora_adapter(quantized_model(case, calibrate=False), tmp_path)
    code = (
        "import sys\n"
        "from peft import PeftConfig\n"
        "try:\n"
        "    PeftConfig.from_pretrained(sys.argv[1])\n"
        "    print('loaded without the import')\n"
        "except Exception as err:\n"
        "    print('error', type(err).__name__, err)\n"
        "import diffusers_qalora\n"
        "print(type(PeftConfig.from_pretrained(sys.argv[1])).__name__)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    plain, imported = proc.stdout.strip().splitlines()[-2:]
    assert plain.startswith("error") and "QALORA" in plain
    assert imported == "QALoraConfig"


def test_multiple_adapters_with_peft_model(tmp_path):
    case = MODEL_KINDS["sd15"]
    peft_model = peft.get_peft_model(case.build(), make_config(case, init_weights=False))
    dq.calibrate_activations(peft_model, calibration_run(peft_model, case))
    out_a = run(peft_model, case)
    peft_model.add_adapter("b", make_config(case, init_weights=False, weight_bits=3))
    assert torch.equal(run(peft_model, case), out_a)  # adding an adapter does not switch to it
    peft_model.set_adapter("b")
    with pytest.raises(RuntimeError, match="not calibrated"):
        peft_model(**case.inputs(case.timesteps[1]))
    dq.calibrate_activations(peft_model, calibration_run(peft_model, case))
    out_b = run(peft_model, case)
    assert not torch.equal(out_b, out_a)
    peft_model.set_adapter("default")
    assert torch.equal(run(peft_model, case), out_a)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.build(), tmp_path)
    reloaded.load_adapter(tmp_path / "b", adapter_name="b")
    assert torch.equal(run(reloaded, case), out_a)
    reloaded.set_adapter("b")
    assert torch.equal(run(reloaded, case), out_b)
    # Files hold no adapter name, so an adapter saved as "b" loads under any name.
    with safe_open(tmp_path / "b" / "adapter_model.safetensors", "pt") as f:
        keys = f.keys()
    assert not any(".b." in k or k.endswith(".b") for k in keys)
    as_default = PeftModel.from_pretrained(case.build(), tmp_path / "b")
    assert torch.equal(run(as_default, case), out_b)
    assert torch.equal(run(dq.load_qalora_adapter(case.build(), tmp_path / "b", adapter_name="x"), case), out_b)


def test_multiple_adapters_on_the_raw_model(tmp_path):
    case = MODEL_KINDS["unet2d"]
    fp_out = run(case.build(), case)
    model = quantized_model(case, init_weights=False)
    out_a = run(model, case)
    dq.save_qalora_adapter(model, tmp_path / "a")
    dq.get_qalora_model(model, make_config(case, init_weights=False, weight_bits=3), adapter_name="b")
    # PEFT activates the adapter injected last.
    assert {tuple(m.active_adapters) for m in qalora_layers(model).values()} == {("b",)}
    dq.calibrate_activations(model, calibration_run(model, case))
    out_b = run(model, case)
    assert not torch.equal(out_a, out_b)
    peft_set_adapter(model, "default")
    assert torch.equal(run(model, case), out_a)
    before = snapshot(model)
    with pytest.raises(ValueError, match="only one QALoRA adapter can be active"):  # refused up front
        peft_set_adapter(model, ["default", "b"])
    assert_unchanged(model, before)
    assert {tuple(m.active_adapters) for m in qalora_layers(model).values()} == {("default",)}
    peft_set_adapter(model, "b")
    assert torch.equal(run(model, case), out_b)
    with dq.adapters_disabled(model):
        assert torch.equal(run(model, case), fp_out)
    assert torch.equal(run(model, case), out_b)
    # A saved adapter loads next to an existing one under a new name.
    dq.load_qalora_adapter(model, tmp_path / "a", adapter_name="a2")
    assert torch.equal(run(model, case), out_a)


def test_adapters_disabled_gives_the_fp_output():
    case = MODEL_KINDS["sdxl"]
    fp_out = run(case.build(), case)
    model = quantized_model(case, init_weights=False)
    out = run(model, case)
    with dq.adapters_disabled(model):
        assert torch.equal(run(model, case), fp_out)
    assert torch.equal(run(model, case), out)


# -- pipelines --------------------------------------------------------------------------------------------------------
PIPE_CALL = dict(prompt="a photo of a cat", num_inference_steps=2, height=16, width=16, output_type="np")


def sample(pipe, seed=0):
    return pipe(**PIPE_CALL, generator=torch.Generator().manual_seed(seed)).images


def test_stable_diffusion_pipeline_calibrate_sample_save(tmp_path):
    pipe = make_tiny_sd_pipeline()
    fp_image = sample(pipe)
    pipe.unet = dq.get_qalora_model(pipe.unet, dq.QALoraConfig(r=4))  # defaults: W4A4, table 0, 10, ..., 990
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 4
    dq.calibrate_activations(pipe.unet, lambda: sample(pipe, seed=1))
    image = sample(pipe)
    assert image.shape == fp_image.shape == (1, 16, 16, 3)
    assert torch.isfinite(torch.from_numpy(image)).all() and not (image == fp_image).all()
    # DDIM with 2 steps samples at t = 501 and t = 1: the entries 500 and 0 are observed, the ones above 500 are
    # clamped to entry 500, the ones in between interpolated.
    layer = qalora_layers(pipe.unet)["down_blocks.0.resnets.0.conv1"]
    values = [v.item() for v in layer.qal_act_quantizer["default"].step.values]
    assert layer.qal_act_quantizer["default"].timesteps.tolist() == [float(t) for t in range(0, 1000, 10)]
    assert len(values) == 100 and len(set(values[50:])) == 1
    assert values[25] == pytest.approx((values[0] + values[50]) / 2, rel=1e-5)
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "config.json").is_file()

    # The supported way to ship it: the adapter on its own, the pipeline without QALoRA.
    dq.save_qalora_adapter(pipe.unet, tmp_path / "adapter")
    dq.remove_qalora(pipe.unet)
    assert (sample(pipe) == fp_image).all()
    pipe.save_pretrained(tmp_path / "plain")
    from diffusers import StableDiffusionPipeline

    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "plain", local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    dq.load_qalora_adapter(reloaded.unet, tmp_path / "adapter")
    assert reloaded.unet.peft_config["default"].weight_init == "mse"  # the adapter's setting is kept
    assert (sample(reloaded) == image).all()


def test_pipeline_saved_with_qalora_reloads_to_the_same_images(tmp_path):
    """`pipe.save_pretrained` with a QALoRA UNet records the adapter in the UNet's config.json
    (``quantization_config.adapters``); `DiffusionPipeline.from_pretrained` re-injects it before the weights load, so
    the reloaded pipeline samples the same images, with the base weights and every QALoRA tensor in place."""
    from diffusers import DiffusionPipeline

    pipe = make_tiny_sd_pipeline()
    pipe.unet = dq.get_qalora_model(pipe.unet, dq.QALoraConfig(r=2, weight_init="minmax", init_weights=False))
    dq.calibrate_activations(pipe.unet, lambda: sample(pipe, seed=1))
    image = sample(pipe)
    state = pipe.unet.state_dict()
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qalora"
    assert set(config["quantization_config"]["adapters"]["configs"]) == {"default"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "weights not initialized" warning
        reloaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    reloaded_state = reloaded.unet.state_dict()
    assert reloaded_state.keys() == state.keys()
    assert not any(v.is_meta for v in reloaded_state.values())
    assert all(torch.equal(reloaded_state[k], state[k]) for k in state)
    assert (sample(reloaded) == image).all()
    assert reloaded.unet.peft_config["default"].weight_init == "minmax"


# -- gradients and optimizer groups -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unet2d", "sd15", "flux"])
def test_gradients_reach_lora_and_current_step_sizes_only(kind):
    case = MODEL_KINDS[kind]
    model = quantized_model(case, init_weights=False)
    index = 1
    out = output_of(model(**case.inputs(case.timesteps[index])))
    out.pow(2).mean().backward()
    layers = qalora_layers(model)
    for name, layer in layers.items():
        assert layer.get_base_layer().weight.grad is None
        aq = layer.qal_act_quantizer["default"]
        if layer.eight_bit["default"]:
            assert all(p.grad is None for p in layer.parameters())
            continue
        a, b = layer.qal_A["default"], layer.qal_B["default"]
        assert a.grad is not None and b.grad is not None, name
        assert torch.count_nonzero(a.grad) > 0 and torch.count_nonzero(b.grad) > 0, name
        assert layer.qal_weight_quantizer["default"].step.grad is not None, name
        for i, (step, zp) in enumerate(zip(aq.step.values, aq.zero_point.values)):
            if i == index:
                assert step.grad is not None and zp.grad is not None, name
            else:
                assert step.grad is None and zp.grad is None, (name, i)
    assert (
        sum(
            int(torch.count_nonzero(m.qal_act_quantizer["default"].step.values[index].grad))
            for m in layers.values()
            if not m.eight_bit["default"]
        )
        > 0
    )


def test_param_groups_scale_aware_learning_rates_and_inactive_timesteps_frozen():
    case = MODEL_KINDS["sd15"]
    model = quantized_model(case, init_weights=False)
    groups = dq.get_qalora_param_groups(model, lora_lr=2e-4, weight_step_lr=1e-6, act_step_lr=5e-4)
    layers = {n: m for n, m in qalora_layers(model).items() if not m.eight_bit["default"]}
    mean_steps = {n: m.qal_weight_quantizer["default"].step.detach().abs().mean().item() for n, m in layers.items()}
    reference = sum(mean_steps.values()) / len(mean_steps)
    lora_groups = {g["name"].removeprefix("lora:"): g for g in groups.param_groups if g["name"].startswith("lora:")}
    assert set(lora_groups) == set(layers)
    for name, group in lora_groups.items():
        assert group["lr"] == pytest.approx(2e-4 * mean_steps[name] / reference, rel=1e-6)
        assert (
            group["params"][0] is layers[name].qal_A["default"] and group["params"][1] is layers[name].qal_B["default"]
        )
    assert len({round(g["lr"], 12) for g in lora_groups.values()}) > 1
    by_name = {g["name"]: g for g in groups.param_groups}
    assert by_name["weight_steps"]["lr"] == 1e-6 and by_name["act_steps"]["lr"] == 5e-4
    assert by_name["weight_steps"]["weight_decay"] == by_name["act_steps"]["weight_decay"] == 0.0
    grouped = [p for g in groups.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}

    # One Adam step at the table entry 1: the other entries stay bit-identical.
    optimizer = torch.optim.AdamW(groups.param_groups, weight_decay=0.01)
    aq = layers["down_blocks.0.resnets.0.conv1"].qal_act_quantizer["default"]
    before = [v.detach().clone() for v in aq.step.values]
    a_before = layers["down_blocks.0.resnets.0.conv1"].qal_A["default"].detach().clone()
    output_of(model(**case.inputs(case.timesteps[1]))).pow(2).mean().backward()
    optimizer.step()
    after = [v.detach() for v in aq.step.values]
    assert not torch.equal(after[1], before[1])
    assert all(torch.equal(after[i], before[i]) for i in (0, 2, 3))
    assert not torch.equal(layers["down_blocks.0.resnets.0.conv1"].qal_A["default"], a_before)


def test_param_groups_other_modes():
    case = MODEL_KINDS["unet2d"]
    model = quantized_model(case, init_weights=False)
    plain = dq.get_qalora_param_groups(model, lora_lr=1e-3, scale_aware="none")
    assert [g["name"] for g in plain.param_groups] == ["lora", "weight_steps", "act_steps"]
    assert plain.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="scale_aware"):
        dq.get_qalora_param_groups(model, scale_aware="bogus")


# -- coexistence with a plain LoRA ------------------------------------------------------------------------------------
STYLE = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def _sd15_with_style():
    case = MODEL_KINDS["sd15"]
    model = quantized_model(case, init_weights=False)
    out = run(model, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "Already found a `peft_config` attribute"
        model.add_adapter(LoraConfig(**STYLE), adapter_name="style")
    return case, model, out


def test_plain_lora_saved_from_a_qalora_model_holds_no_qalora_tensor(tmp_path):
    case, model, _ = _sd15_with_style()
    style = get_peft_model_state_dict(model, adapter_name="style")
    n_targets = len([n for n, _ in case.build().named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))])
    assert len(style) == 2 * n_targets
    assert all("lora_A" in k or "lora_B" in k for k in style)
    assert not any("qal" in k for k in style)
    model.save_lora_adapter(tmp_path, adapter_name="style")  # diffusers' writer
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(style) and not any("qal" in k for k in keys)


@pytest.mark.parametrize("kind", KINDS)
def test_qalora_tensor_names_contain_no_lora_substring(kind, tmp_path):
    case = MODEL_KINDS[kind]
    model = quantized_model(case, init_weights=False)
    state = get_peft_model_state_dict(model, adapter_name="default")
    dq.save_qalora_adapter(model, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        saved = list(f.keys())
    assert len(saved) == len(state) > 0
    for key in list(state) + saved:
        for bad in FORBIDDEN_SUBSTRINGS:
            assert bad not in key, key
    assert all(".qal_" in k for k in saved)
    assert not any(".default." in k or k.endswith(".default") for k in saved)


def test_qalora_adapter_saved_under_a_style_lora_loads_into_a_plain_model(tmp_path):
    case, model, _ = _sd15_with_style()
    model.set_adapters(["default", "style"])
    dq.save_qalora_adapter(model, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert not any(".base_layer." in k for k in state) and not any("lora" in k for k in state)
    fresh = case.build()
    dq.load_qalora_adapter(fresh, tmp_path)
    model.set_adapters(["default", "style"], [1.0, 0.0])  # style LoRA at weight 0: only QALoRA is left
    expected = run(model, case)
    assert torch.equal(run(fresh, case), expected)


def test_style_lora_on_top_of_qalora_with_set_adapters():
    case, model, qalora_out = _sd15_with_style()
    model.set_adapters(["default", "style"], [1.0, 0.0])
    assert torch.equal(run(model, case), qalora_out)  # a zero-weight style LoRA adds exactly nothing
    model.set_adapters(["default", "style"], [1.0, 1.0])
    both = run(model, case)
    assert not torch.equal(both, qalora_out)
    to_q = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert isinstance(to_q.base_layer, QLinear) and to_q.base_layer.active_qalora_adapter() == "default"


def test_add_adapter_keeps_qalora_active():
    """diffusers' `add_adapter(cfg, adapter_name="style")` calls `set_adapter("style")`: QALoRA stays active
    alongside (with its trainable state unchanged), exactly as after `set_adapters(["default", "style"])`."""
    case = MODEL_KINDS["sd15"]
    model = quantized_model(case, init_weights=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "Already found a `peft_config` attribute"
        model.add_adapter(LoraConfig(**STYLE), adapter_name="style")
    assert all(layer.active_qalora_adapter() == "default" for layer in qalora_layers(model).values())
    style = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
    assert style and {n for n, p in model.named_parameters() if p.requires_grad} - style == {
        n.replace("to_q.", "to_q.base_layer.")
        .replace("to_k.", "to_k.base_layer.")
        .replace("to_v.", "to_v.base_layer.")
        .replace("to_out.0.", "to_out.0.base_layer.")
        for n in trainable
    }
    after_add = run(model, case)
    model.set_adapters(["default", "style"])
    assert torch.equal(run(model, case), after_add)
    model.set_adapters(["default", "style"], [1.0, 0.0])
    model.set_adapter("style")  # a call naming only the style LoRA keeps QALoRA too
    with dq.adapters_disabled(model):
        fp_style = run(model, case)
    assert not torch.equal(run(model, case), fp_style)


def test_qalora_after_a_lora_is_refused():
    case = MODEL_KINDS["sd15"]
    model = case.build()
    model.add_adapter(LoraConfig(**STYLE), adapter_name="style")
    before = snapshot(model)
    with pytest.raises(ValueError, match="before other adapters"):
        dq.get_qalora_model(model, make_config(case))
    assert_unchanged(model, before)


# -- bad input: a clear error, and the model unchanged ----------------------------------------------------------------
def test_unknown_target_modules():
    case = MODEL_KINDS["unet2d"]
    model = case.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['nope', 'to_zz'\] match no module"):
        dq.get_qalora_model(model, make_config(case, target_modules=["conv1", "nope", "to_zz"]))
    assert_unchanged(model, before)


def test_grouped_conv_as_explicit_target():
    case = MODEL_KINDS["unet2d"]
    model = case.build()
    old = model.down_blocks[0].resnets[0].conv1
    model.down_blocks[0].resnets[0].conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1, groups=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"down_blocks\.0\.resnets\.0\.conv1.*groups=2"):
        dq.get_qalora_model(model, make_config(case, target_modules=["down_blocks.0.resnets.0.conv1", "conv2"]))
    assert_unchanged(model, before)
    # With the default targets it is skipped, not an error.
    dq.get_qalora_model(model, make_config(case))
    assert "down_blocks.0.resnets.0.conv1" not in qalora_layers(model)


@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "special_bits"])
@pytest.mark.parametrize("value", [1, 9, 16, 4.0, True])
def test_bits_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be an integer between 2 and 8"):
        dq.QALoraConfig(**{field: value})


@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
def test_bits_corrupted_after_validation_roll_back(field):
    """A config edited after construction fails inside the injection loop: every layer wrapped so far is undone."""
    case = MODEL_KINDS["unet2d"]
    model = case.build()
    before = snapshot(model)
    config = make_config(case)
    setattr(config, field, 12)
    with pytest.raises(ValueError, match=f"`{field}` must be an integer between 2 and 8"):
        dq.get_qalora_model(model, config)
    assert_unchanged(model, before)
    assert not hasattr(model, "peft_config")


def test_bad_config_values():
    with pytest.raises(ValueError, match="`r` must be a positive integer"):
        dq.QALoraConfig(r=0)
    with pytest.raises(ValueError, match="`timesteps` must be strictly increasing"):
        dq.QALoraConfig(timesteps=[0, 10, 5])
    with pytest.raises(ValueError, match="weight_group_size"):
        dq.QALoraConfig(weight_granularity="group")
    with pytest.raises(TypeError, match="QALoraConfig"):
        dq.get_qalora_model(make_unet2d(), LoraConfig(r=2))


def test_wrong_timestep_argument_and_reused_adapter_name():
    case = MODEL_KINDS["unet2d"]
    model = case.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no `t` argument"):
        dq.get_qalora_model(model, make_config(case, timestep_argument="t"))
    assert_unchanged(model, before)
    dq.get_qalora_model(model, make_config(case))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'default' is already used"):
        dq.get_qalora_model(model, make_config(case))
    assert_unchanged(model, before)


@pytest.mark.parametrize("target", ["sd15", "wider_unet2d"])
def test_loading_an_adapter_of_another_architecture(target, tmp_path):
    case = MODEL_KINDS["unet2d"]
    dq.save_qalora_adapter(quantized_model(case), tmp_path)
    if target == "sd15":
        model = make_sd15_unet()
        pattern = (
            r"does not fit UNet2DConditionModel(.|\n)*no Linear/Conv2d named 'down_blocks\.1\.attentions\.0\.to_k'"
        )
    else:
        from diffusers import UNet2DModel

        model = UNet2DModel(**{**dict(make_unet2d().config), "block_out_channels": (32, 64)})
        pattern = r"does not fit UNet2DModel(.|\n)*conv_in\.qal_weight_quantizer\.step: shape \(16, 1, 1\) does not fit"
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        dq.load_qalora_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_loading_a_plain_lora_folder(tmp_path):
    case = MODEL_KINDS["unet2d"]
    peft.get_peft_model(case.build(), LoraConfig(r=2, target_modules=["to_q"])).save_pretrained(tmp_path)
    model = case.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="holds a 'LORA' adapter, not a QALoRA one"):
        dq.load_qalora_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_loading_a_folder_without_adapter_files(tmp_path):
    model = make_unet2d()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="not a QALoRA adapter folder"):
        dq.load_qalora_adapter(model, tmp_path)
    assert_unchanged(model, before)


# -- merge / unmerge / scale ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_exact(kind):
    case = MODEL_KINDS[kind]
    model = quantized_model(case, init_weights=False)
    layers = qalora_layers(model)
    original = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    out = run(model, case)
    for layer in layers.values():
        layer.merge()
        assert layer.merged
    merged_out = run(model, case)
    torch.testing.assert_close(merged_out, out, atol=1e-6, rtol=0)
    for name, layer in layers.items():
        layer.unmerge()
        assert not layer.merged
        assert torch.equal(layer.get_base_layer().weight, original[name]), name
    assert torch.equal(run(model, case), out)


def test_merged_weight_is_the_fake_quantized_merged_weight():
    case = MODEL_KINDS["sd15"]
    model = quantized_model(case, init_weights=False)
    layers = qalora_layers(model)
    expected = {name: manual_weight(layer) for name, layer in layers.items()}
    original = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()}
    for layer in layers.values():
        layer.merge()
    run(model, case)  # the merged weight is built at the first forward pass after merge()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.qal_merged_weight, expected[name], atol=0, rtol=0, msg=name)
        assert torch.equal(layer.get_base_layer().weight, original[name]), name  # W0 is never overwritten
        layer.unmerge()


def test_peft_merge_adapter_and_disable():
    case = MODEL_KINDS["sd15"]
    fp_out = run(case.build(), case)
    peft_model = peft.get_peft_model(case.build(), make_config(case, init_weights=False))
    dq.calibrate_activations(peft_model, calibration_run(peft_model, case))
    out = run(peft_model, case)
    layers = qalora_layers(peft_model.get_base_model())
    original = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    peft_model.merge_adapter()
    assert all(m.merged for m in layers.values())
    torch.testing.assert_close(run(peft_model, case), out, atol=1e-6, rtol=0)
    peft_model.unmerge_adapter()
    assert all(torch.equal(m.get_base_layer().weight, original[n]) for n, m in layers.items())
    peft_model.merge_adapter()
    with peft_model.disable_adapter():  # disabling unmerges: the FP weights are back, exactly
        assert torch.equal(run(peft_model, case), fp_out)
    assert torch.equal(run(peft_model, case), out)


@pytest.mark.parametrize("kind", ["unet2d", "sd3"])
def test_set_scale_changes_the_output(kind):
    case = MODEL_KINDS[kind]
    ptq_out = run(quantized_model(case), case)
    model = quantized_model(case, init_weights=False)
    out = run(model, case)
    layers = qalora_layers(model).values()
    for layer in layers:
        layer.set_scale("default", 0.0)
    assert torch.equal(run(model, case), ptq_out)  # scale 0 removes the LoRA update entirely
    for layer in layers:
        layer.set_scale("default", 2.0)
    doubled = run(model, case)
    assert not torch.equal(doubled, out) and not torch.equal(doubled, ptq_out)
    for layer in layers:
        layer.set_scale("default", 1.0)
    assert torch.equal(run(model, case), out)


def test_cross_attention_kwargs_scale():
    case = MODEL_KINDS["sd15"]
    ptq_out = run(quantized_model(case), case)
    model = quantized_model(case, init_weights=False)
    out = run(model, case)
    with torch.no_grad():
        scaled = output_of(model(**case.inputs(case.timesteps[1]), cross_attention_kwargs={"scale": 0.0}))
    assert torch.equal(scaled, ptq_out)
    assert torch.equal(run(model, case), out)  # the scale is undone after the call
