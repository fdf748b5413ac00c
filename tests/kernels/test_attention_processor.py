"""`QALoraAttnProcessor` and the attention quantizers of ``QALoraConfig(quantize_attention=True)`` on tiny UNets:
installation, the three paths (fused kernel / torch reference, differentiable training path, calibration) against
each other and against independent computations, PEFT saving and loading, optimizer groups, export refusal, and the
models it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import (
    make_flux,
    make_sd3,
    make_sd15_unet,
    make_unet2d,
    output_of,
    relative_error,
    sd3_inputs,
    sd15_inputs,
    unet2d_inputs,
)

import diffusers_qalora as dq
from diffusers_qalora.tuners.qalora import qalora_layers
from diffusers_qalora.tuners.qalora.attention import QALoraAttnProcessor

TABLE = [0.0, 250.0, 500.0, 999.0]


def _config(**kwargs) -> dq.QALoraConfig:
    base = {
        "weight_bits": 8,
        "act_bits": 8,
        "timesteps": TABLE,
        "quantize_attention": True,
        "init_weights": False,
        "r": 4,
        "weight_init": "minmax",
        "act_init": "minmax",
    }  # the cheap initialisers keep the tests fast
    return dq.QALoraConfig(**{**base, **kwargs})


def _calibrated(build=make_sd15_unet, inputs=sd15_inputs, **kwargs):
    model = dq.get_qalora_model(build(), _config(**kwargs))

    def run():
        for t in (250.0, 999.0):
            model(**inputs(t))

    dq.calibrate_activations(model, run)
    return model


def _attention_backend(model, backend: str) -> None:
    """Choose the kernel of the attention modules only (``recurse=True`` would also switch every fake-quantizer
    inside them, whose own kernels are tested in their own files)."""
    for module in model.modules():
        if isinstance(module, Attention):
            dq.set_kernel_preference(module, backend, recurse=False)


def _attn(unet):
    return unet.down_blocks[0].attentions[0].transformer_blocks[0]


def test_processors_installed_stateless_and_quantizers_placed():
    unet = dq.get_qalora_model(make_sd15_unet(), _config(quantize_attention_probs=True, attention_bits=6))
    processors = unet.attn_processors
    assert processors and all(isinstance(p, QALoraAttnProcessor) for p in processors.values())
    assert not any(".processor." in k for k in unet.state_dict())  # the processor holds no tensor
    attn = _attn(unet).attn2
    for leaf in ("to_q", "to_k", "to_v"):
        quantizer = getattr(attn, leaf).qal_out_quantizer["default"]
        assert quantizer.bits == 6 and len(quantizer.step) == len(TABLE)
    assert list(attn.to_v.qal_prob_quantizer) == ["default"] and not attn.to_v.qal_prob_quantizer["default"].symmetric
    assert not len(attn.to_q.qal_prob_quantizer) and not len(attn.to_out[0].qal_out_quantizer)
    plain = dq.get_qalora_model(make_sd15_unet(), _config(quantize_attention=False))
    assert not any(isinstance(p, QALoraAttnProcessor) for p in plain.attn_processors.values())
    assert not any(len(layer.qal_out_quantizer) for layer in qalora_layers(plain).values())


def _independent_attention(attn, hidden, context, bias, t):
    """What the processor must compute, built from the QALoRA layers and the quantizer modules directly: fake-quantize
    q, k, v and the explicit softmax with each quantizer's own forward, then the output projection."""
    b, n, _ = hidden.shape
    heads = attn.heads
    q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    q, k, v = (x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
    q = attn.to_q.qal_out_quantizer["default"](q)
    k = attn.to_k.qal_out_quantizer["default"](k)
    v = attn.to_v.qal_out_quantizer["default"](v)
    scores = q @ k.transpose(-1, -2) * attn.scale + bias[:, None]
    probs = attn.to_v.qal_prob_quantizer["default"](scores.softmax(-1))
    out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[0](out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cross_attention_with_mask_matches_independent_computation(backend):
    unet = _calibrated(quantize_attention_probs=True)
    attn = _attn(unet).attn2
    context = unet._qalora_timestep_context
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 64, attn.query_dim, generator=g)
    encoder = torch.randn(2, 5, 32, generator=g)
    bias = torch.zeros(2, 1, 5)
    bias[0, 0, 3:] = -10000.0  # sample 0 attends to its first 3 tokens only
    context.set(torch.tensor([250.0, 700.0]))
    _attention_backend(unet, backend)
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=encoder, attention_mask=bias)
        want = _independent_attention(attn, hidden, encoder, bias, context.timesteps)
        unmasked = attn(hidden, encoder_hidden_states=encoder)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - unmasked)[0].abs().max() > 1e-3 and torch.allclose(got[1], unmasked[1], atol=1e-6)


def test_no_active_quantizer_equals_attn_processor_2_0():
    inputs = sd15_inputs(500.0)
    unet = _calibrated()
    with torch.no_grad(), dq.adapters_disabled(unet):  # the teacher pass: every layer full precision
        ours = output_of(unet(**inputs))
    for layer in qalora_layers(unet).values():  # quantizers off, the QALoRA linears still quantized
        for quantizer in layer.qal_out_quantizer.values():
            quantizer.enabled = False
    with torch.no_grad():
        ours_off = output_of(unet(**inputs))
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad(), dq.adapters_disabled(unet):
        stock = output_of(unet(**inputs))
    with torch.no_grad():
        stock_off = output_of(unet(**inputs))
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_off, stock_off, atol=1e-6, rtol=0)
    fp = make_sd15_unet()  # a model without QALoRA at all: the processor is AttnProcessor2_0
    with torch.no_grad():
        default = output_of(fp(**inputs))
        fp.set_attn_processor(QALoraAttnProcessor())
        torch.testing.assert_close(output_of(fp(**inputs)), default, atol=1e-6, rtol=0)


def test_training_path_matches_inference_and_trains_only_the_current_step():
    unet = _calibrated(quantize_attention_probs=True)
    inputs = sd15_inputs(250.0)
    with torch.no_grad():
        inference = output_of(unet(**inputs))
    out = output_of(unet(**inputs))  # gradients needed: quantizer modules + SDPA / explicit softmax
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), inference, atol=2e-5, rtol=1e-4)
    out.square().mean().backward()
    attn = _attn(unet).attn1
    for quantizer in (attn.to_q.qal_out_quantizer["default"], attn.to_v.qal_prob_quantizer["default"]):
        grads = [p.grad for p in quantizer.step.values]
        assert grads[1] is not None and grads[1] != 0  # t = 250 is table entry 1
        assert all(grads[i] is None for i in (0, 2, 3))
    groups = dq.get_qalora_param_groups(unet)
    act = {id(p) for group in groups.param_groups if group["name"] == "act_steps" for p in group["params"]}
    assert {id(p) for p in attn.to_k.qal_out_quantizer["default"].parameters()} <= act
    assert {id(p) for p in attn.to_v.qal_prob_quantizer["default"].parameters()} <= act


def test_calibration_observes_q_k_v_and_probabilities():
    unet = _calibrated(quantize_attention_probs=True, act_symmetric=True)
    attn = _attn(unet).attn1
    for leaf in ("to_q", "to_k", "to_v"):
        quantizer = getattr(attn, leaf).qal_out_quantizer["default"]
        assert bool(quantizer.calibrated) and quantizer.symmetric
        assert float(quantizer.step.stacked().detach().min()) > 0
    probs = attn.to_v.qal_prob_quantizer["default"]
    steps = probs.step.stacked().detach()
    assert bool(probs.calibrated) and bool((steps * probs.qmax <= 1.0 + 1e-4).all())  # it saw values in [0, 1]
    # a second adapter takes the attention calibration over with the rest
    dq.get_qalora_model(unet, _config(quantize_attention_probs=True, act_symmetric=True), adapter_name="second")
    dq.copy_activation_calibration(unet, "default", "second")
    copied = attn.to_v.qal_prob_quantizer["second"]
    assert bool(copied.calibrated) and torch.equal(copied.step.stacked(), probs.step.stacked())
    with pytest.raises(ValueError, match="quantizes the attention"):
        dq.get_qalora_model(unet, _config(quantize_attention=False, act_symmetric=True), adapter_name="plain")
        dq.copy_activation_calibration(unet, "plain", "second")


def test_unet2d_attention_group_norm_residual():
    """UNet2DModel's attention (group norm, residual connection, output rescale), per-sample timesteps: the whole model
    through the fused kernel (interpreter) equals it through the torch reference, quantization is active, and with
    the adapter disabled the processor equals AttnProcessor2_0."""
    unet = _calibrated(make_unet2d, unet2d_inputs, quantize_attention_probs=True)
    inputs = unet2d_inputs(torch.tensor([0.0, 999.0]))
    with torch.no_grad():
        _attention_backend(unet, "torch")
        ref = output_of(unet(**inputs))
        _attention_backend(unet, "triton")
        got = output_of(unet(**inputs))
        with dq.adapters_disabled(unet):
            ours_fp = output_of(unet(**inputs))
        for layer in qalora_layers(unet).values():  # the attention quantizers alone move the output
            for quantizer in (*layer.qal_out_quantizer.values(), *layer.qal_prob_quantizer.values()):
                quantizer.enabled = False
        no_attention_quant = output_of(unet(**inputs))
        for module in unet.modules():  # UNet2DModel has no set_attn_processor
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor2_0())
        with dq.adapters_disabled(unet):
            stock_fp = output_of(unet(**inputs))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert (ref - no_attention_quant).abs().max() > 1e-3
    torch.testing.assert_close(ours_fp, stock_fp, atol=1e-6, rtol=0)


def test_adapter_round_trip_keeps_attention_quantizers(tmp_path):
    unet = _calibrated(quantize_attention_probs=True)
    with torch.no_grad():  # move the step sizes away from their calibrated values so the file must carry them
        quantizer = _attn(unet).attn1.to_k.qal_out_quantizer["default"]
        quantizer.step.fill_(quantizer.step.stacked() * 1.5)
    inputs = sd15_inputs(torch.tensor([250.0, 700.0]))
    with torch.no_grad():
        before = output_of(unet(**inputs))
    dq.save_qalora_adapter(unet, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".to_k.qal_out_quantizer.step.values" in k for k in keys)
    assert any(".to_v.qal_prob_quantizer.zero_point.values" in k for k in keys)
    fresh = dq.load_qalora_adapter(make_sd15_unet(), tmp_path)
    assert all(isinstance(p, QALoraAttnProcessor) for p in fresh.attn_processors.values())
    loaded = _attn(fresh).attn1.to_k.qal_out_quantizer["default"]
    assert torch.equal(loaded.step.stacked(), quantizer.step.stacked())
    with torch.no_grad():
        after = output_of(fresh(**inputs))
    assert torch.equal(after, before)
    via_peft = get_peft_model(make_sd15_unet(), _config())  # PEFT's own entry point installs the processor too
    assert all(isinstance(p, QALoraAttnProcessor) for p in via_peft.get_base_model().attn_processors.values())


@pytest.mark.parametrize("build, inputs", [(make_sd15_unet, sd15_inputs), (make_unet2d, unet2d_inputs)])
def test_export_save_and_load_keep_the_attention_quantizers(build, inputs, tmp_path):
    """The exported UNet (torch kernels) quantizes q, k, v and the softmax output with the stored tables: the
    fake-quant model's numbers bit for bit, also after save_pretrained / from_pretrained (mixed timesteps)."""
    unet = _calibrated(build, inputs, quantize_attention_probs=True)
    x = inputs(torch.tensor([250.0, 700.0]))
    with torch.no_grad():
        fake = output_of(unet(**x))
    exported = dq.export_quantized(unet, kernel_preference="torch")
    assert all(isinstance(p, QALoraAttnProcessor) for p in _processors(exported))
    with torch.no_grad():
        assert torch.equal(output_of(exported(**x)), fake)
    exported.save_pretrained(tmp_path)
    loaded = type(exported).from_pretrained(tmp_path)
    dq.set_kernel_preference(loaded, "torch")
    assert all(isinstance(p, QALoraAttnProcessor) for p in _processors(loaded))
    with torch.no_grad():
        assert torch.equal(output_of(loaded(**x)), fake)


def _processors(model) -> list:
    found = [m.processor for m in model.modules() if isinstance(m, Attention)]
    assert found
    return found


def test_remove_restores_processors():
    unet = dq.remove_qalora(_calibrated())
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_unsupported_models_and_options_are_refused():
    # SD3's joint attention and Flux's attention have their own processors (tests/kernels/test_dit_attention.py);
    # the UNet processor still refuses a module with added key/value projections.
    sd3 = make_sd3()
    sd3.set_attn_processor(QALoraAttnProcessor())
    with pytest.raises(NotImplementedError, match="added key/value"):
        sd3(**sd3_inputs(500.0))
    with pytest.raises(ValueError, match="quantize_attention_probs"):
        dq.QALoraConfig(quantize_attention_probs=True)
    with pytest.raises(ValueError, match="attention_bits"):
        dq.QALoraConfig(quantize_attention=True, attention_bits=12)
    with pytest.raises(ValueError, match="to_q"):
        dq.get_qalora_model(make_sd15_unet(), _config(target_modules=["conv_in", "proj_in"]))


def test_processor_refuses_other_attention_modules():
    flux = make_flux()
    attn = flux.transformer_blocks[0].attn
    with pytest.raises(TypeError, match="Attention"):
        QALoraAttnProcessor()(attn, torch.zeros(1, 4, 16))


def test_quantized_attention_is_not_the_float_attention():
    """Guard against vacuous comparisons: at 4 bits the attention output moves visibly."""
    unet = _calibrated(attention_bits=4)
    attn = _attn(unet).attn1
    unet._qalora_timestep_context.set(250.0)
    hidden = torch.randn(2, 64, attn.query_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        quantized = attn(hidden)
        for leaf in ("to_q", "to_k", "to_v"):
            getattr(attn, leaf).qal_out_quantizer["default"].enabled = False
        plain = attn(hidden)
    assert F.mse_loss(quantized, plain) > 1e-6


# -- compute_dtype: float attention in bf16 ------------------------------------------------------------------------
def test_compute_dtype_runs_the_float_attention_in_that_dtype(monkeypatch):
    """``compute_dtype=torch.bfloat16``: SDPA receives bf16 q, k, v, the model's output stays float32 and within bf16
    rounding of the float32 attention; without it nothing changes."""
    fp = make_sd15_unet()
    inputs = sd15_inputs(250.0)
    with torch.no_grad():
        default = output_of(fp(**inputs))
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    fp.set_attn_processor(QALoraAttnProcessor(compute_dtype=torch.bfloat16))
    with torch.no_grad():
        low = output_of(fp(**inputs))
    assert seen and set(seen) == {torch.bfloat16} and low.dtype == torch.float32
    assert 0 < relative_error(low, default) < 2e-2
    seen.clear()
    fp.set_attn_processor(QALoraAttnProcessor(compute_dtype=torch.float32))  # the query's dtype: nothing to do
    with torch.no_grad():
        torch.testing.assert_close(output_of(fp(**inputs)), default, atol=1e-6, rtol=0)
    assert set(seen) == {torch.float32}
    assert (
        repr(QALoraAttnProcessor(compute_dtype=torch.bfloat16)) == "QALoraAttnProcessor(compute_dtype=torch.bfloat16)"
    )
    with pytest.raises(ValueError, match="compute_dtype"):
        QALoraAttnProcessor(compute_dtype=torch.int8)


def test_compute_dtype_keeps_a_boolean_mask_and_leaves_quantized_attention_alone():
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, -2:] = False
    with torch.no_grad():
        full = QALoraAttnProcessor()(attn, x, attention_mask=mask)
        low = QALoraAttnProcessor(compute_dtype=torch.bfloat16)(attn, x, attention_mask=mask)
    assert relative_error(low, full) < 2e-2  # a mask cast to 0/1 floats would attend to the masked keys
    unet = _calibrated()  # active attention quantizers: their own arithmetic, compute_dtype unused
    inputs = sd15_inputs(250.0)
    with torch.no_grad():
        quantized = output_of(unet(**inputs))
        unet.set_attn_processor(QALoraAttnProcessor(compute_dtype=torch.bfloat16))
        assert torch.equal(output_of(unet(**inputs)), quantized)
