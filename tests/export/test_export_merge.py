"""export_quantized on QALoRA models: the integer model against the fake-quant model it came from, the timestep hook,
the QALoRA state removed, and every refusal leaving the model as it was."""

from __future__ import annotations

import pytest
import torch
from export_fixtures import make_sd15_unet, make_unet2d, qalora, sd15_inputs, unet2d_inputs
from peft import LoraConfig, inject_adapter_in_model
from tiny_models import relative_error

import diffusers_qalora as dq
from diffusers_qalora.export import IntegerLayer, integer_layers, onednn_status
from diffusers_qalora.tuners.qalora import QALoraLayer, qalora_layers

ONEDNN, WHY = onednn_status()

# Tolerance of the integer path against the fake-quant model, end to end.  Each integer layer matches the fake-quant
# layer to float32 rounding when both see the same input (test_each_integer_layer_reproduces_its_qalora_layer).
# Through the network, a rounding difference of 1e-7 can move one activation across a rounding boundary (a tie),
# which changes it by one activation step, and that propagates: on these tiny random models the end-to-end relative
# difference is either ~2e-7 (no tie crossed) or ~1.6e-2 (one crossed early), against a quantization error (fake-quant
# vs float) of ~0.16.  So the bound is relative to that quantization error, not to float32 epsilon.
REL_TOL_VS_QUANT_ERROR = 0.25


def _outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("bits", [(4, 8), (8, 8), (4, 4)])
def test_unet2d_export_matches_fake_quant(bits):
    model = qalora(make_unet2d(), unet2d_inputs, *bits)
    single, mixed = unet2d_inputs(300.0), unet2d_inputs(torch.tensor([0.0, 300.0, 999.0, 300.0]))
    fq_single, fq_mixed = _outputs(model, single), _outputs(model, mixed)
    with dq.adapters_disabled(model):
        float_single = _outputs(model, single)
    dq.export_quantized(model)
    assert not any(isinstance(m, QALoraLayer) for m in model.modules())
    assert not [k for k in model.state_dict() if "qal_" in k or "base_layer" in k]
    assert not hasattr(model, "peft_config")
    # The reference path is the fake-quant model, bit for bit, whatever the timesteps of the batch.
    dq.set_kernel_preference(model, "torch")
    assert torch.equal(_outputs(model, single), fq_single)
    assert torch.equal(_outputs(model, mixed), fq_mixed)
    if ONEDNN:
        dq.set_kernel_preference(model, "auto")
        quant_error = relative_error(fq_single, float_single)
        assert relative_error(_outputs(model, single), fq_single) < REL_TOL_VS_QUANT_ERROR * quant_error
        assert relative_error(_outputs(model, mixed), fq_mixed) < REL_TOL_VS_QUANT_ERROR * quant_error


def _integer_kernel_calls(model, inputs) -> dict[str, int]:
    """How many times each oneDNN integer op (and the float conv/matmul ops) ran in one forward pass."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs)
    names = (
        "onednn::qconv2d_pointwise",
        "onednn::qlinear_pointwise",
        "aten::quantize_per_tensor",
        "aten::convolution",
        "aten::linear",
    )
    return {n: sum(e.count for e in prof.key_averages() if e.key == n) for n in names}


@pytest.mark.skipif(not ONEDNN, reason=f"oneDNN int8 kernels unusable here: {WHY}")
def test_mixed_timesteps_do_not_loop_over_samples():
    """A batch of 8 samples at 8 different timesteps runs the same number of integer kernel calls as a batch that
    shares one timestep (one per integer layer), and no float fallback: no per-sample (or per-timestep) loop."""
    model = dq.export_quantized(qalora(make_unet2d(), unet2d_inputs, 4, 8))
    layers = integer_layers(model)
    convs = sum(isinstance(m, dq.IntegerConv2d) for m in layers.values())
    shared = _integer_kernel_calls(model, unet2d_inputs(300.0, batch=8))
    # The first mixed call builds each conv's zero-point tap map once (per layer and input size, not per timestep).
    _integer_kernel_calls(model, unet2d_inputs(torch.linspace(0.0, 999.0, 8), batch=8))
    mixed = _integer_kernel_calls(model, unet2d_inputs(torch.linspace(3.0, 990.0, 8).flip(0), batch=8))
    assert shared["onednn::qconv2d_pointwise"] == convs and shared["onednn::qlinear_pointwise"] == len(layers) - convs
    assert mixed == shared, (mixed, shared)


@pytest.mark.skipif(not ONEDNN, reason=f"oneDNN int8 kernels unusable here: {WHY}")
def test_each_integer_layer_reproduces_its_qalora_layer():
    model = qalora(make_unet2d(), unet2d_inputs, 4, 8)
    inputs = unet2d_inputs(torch.tensor([0.0, 999.0, 500.0, 999.0]))
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, (a[0].clone(), o.clone())))
        for name, layer in qalora_layers(model).items()
    ]
    _outputs(model, inputs)
    for h in hooks:
        h.remove()
    dq.export_quantized(model)
    for layer in integer_layers(model).values():
        layer.exact_activation_rounding = True
    model._qalora_timestep_context.set(inputs["timestep"])
    layers = integer_layers(model)
    assert layers.keys() == seen.keys()
    with torch.no_grad():
        for name, (x, y) in seen.items():
            assert relative_error(layers[name](x), y) < 1e-5, name


def test_timestep_hook_drives_the_integer_layers():
    model = qalora(make_unet2d(), unet2d_inputs, 4, 4)
    inputs = unet2d_inputs(0.0)
    expected = {t: _outputs(model, {**inputs, "timestep": torch.full((4,), t)}) for t in (0.0, 600.0)}
    dq.export_quantized(model, kernel_preference="torch")
    layers = integer_layers(model)
    assert layers and all(layer.context is model._qalora_timestep_context for layer in layers.values())
    for t, want in expected.items():
        assert torch.equal(_outputs(model, {**inputs, "timestep": torch.full((4,), t)}), want)


def test_sd15_unet_export_and_eight_bit_layers():
    model = qalora(make_sd15_unet(), sd15_inputs, 4, 8)
    inputs = sd15_inputs(500.0)
    fq = _outputs(model, inputs)
    dq.export_quantized(model, kernel_preference="torch")
    layers = integer_layers(model)
    assert layers["conv_in"].layout.weight_bits == 8 and layers["conv_in"].layout.num_timesteps == 1
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].layout.weight_bits == 4
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].layout.num_timesteps == 4
    assert torch.equal(_outputs(model, inputs), fq)


def test_group_granularity_exports():
    model = qalora(make_unet2d(), unet2d_inputs, 4, 8, weight_granularity="group", weight_group_size=8)
    inputs = unet2d_inputs(500.0)
    fq = _outputs(model, inputs)
    with dq.adapters_disabled(model):
        quant_error = relative_error(fq, _outputs(model, inputs))
    dq.export_quantized(model, kernel_preference="torch")
    groups = {layer.layout.group_size for layer in integer_layers(model).values()}
    assert groups == {None, 8}  # the 8-bit layers stay per channel
    assert torch.equal(_outputs(model, inputs), fq)
    if ONEDNN:
        dq.set_kernel_preference(model, "auto")
        assert relative_error(_outputs(model, inputs), fq) < REL_TOL_VS_QUANT_ERROR * quant_error


def test_inplace_false_leaves_the_qalora_model():
    model = qalora(make_unet2d(), unet2d_inputs)
    inputs = unet2d_inputs(500.0)
    fq = _outputs(model, inputs)
    exported = dq.export_quantized(model, inplace=False, kernel_preference="torch")
    assert exported is not model and any(isinstance(m, QALoraLayer) for m in model.modules())
    assert torch.equal(_outputs(model, inputs), fq)
    assert torch.equal(_outputs(exported, inputs), fq)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, state):
    assert not any(isinstance(m, IntegerLayer) for m in model.modules())
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_refusals_change_nothing():
    with pytest.raises(ValueError, match="no QALoRA layer"):
        dq.export_quantized(make_unet2d())

    model = dq.get_qalora_model(make_unet2d(), dq.QALoraConfig(r=4, timesteps=[0.0, 999.0]))
    state = _state(model)
    with pytest.raises(ValueError, match="not calibrated"):
        dq.export_quantized(model)
    _assert_unchanged(model, state)

    model = qalora(make_unet2d(), unet2d_inputs, weight_symmetric=False)
    state = _state(model)
    with pytest.raises(NotImplementedError, match="weight_symmetric=True"):
        dq.export_quantized(model)
    _assert_unchanged(model, state)

    model = qalora(make_unet2d(), unet2d_inputs)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), model, adapter_name="style")
    state = _state(model)
    with pytest.raises(ValueError, match="another adapter"):
        dq.export_quantized(model)
    _assert_unchanged(model, state)

    model = qalora(make_unet2d(), unet2d_inputs)
    with pytest.raises(ValueError, match="kernel_preference"):
        dq.export_quantized(model, kernel_preference="cuda")


def test_export_reuses_the_tuner_timestep_hook():
    # One timestep context and one pre-hook per model, whoever attached it first (diffusers_qalora.quant owns it).
    model = qalora(make_unet2d(), unet2d_inputs)
    context = model._qalora_timestep_context
    hooks = len(model._forward_pre_hooks)
    exported = dq.export_quantized(model)
    assert exported._qalora_timestep_context is context and len(exported._forward_pre_hooks) == hooks == 1


def test_peft_model_wrapper_is_unwrapped():
    import peft

    base = make_unet2d()
    wrapped = peft.get_peft_model(
        base, dq.QALoraConfig(r=4, timesteps=list((0.0, 999.0)), weight_init="minmax", act_init="minmax")
    )
    dq.calibrate_activations(base, lambda: [base(**unet2d_inputs(t)) for t in (0.0, 999.0)])
    inputs = unet2d_inputs(500.0)
    fq = _outputs(base, inputs)
    exported = dq.export_quantized(wrapped, kernel_preference="torch")
    assert exported is base and integer_layers(exported)
    assert torch.equal(_outputs(exported, inputs), fq)
