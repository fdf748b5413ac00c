"""Quantized attention on DiTs: SD3's joint attention (`QALoraJointAttnProcessor`) and Flux's attention
(`QALoraFluxAttnProcessor`) on tiny configs, against independent computations (the concatenated image + context q,
k, v fake-quantized per tensor, Flux's rotary embedding applied by hand, an explicit softmax), the three paths
(kernel / torch reference, training, calibration), save/load round trips, a few distillation steps, export / save / load of the quantized
attention and processor restoration."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from tiny_models import flux_inputs, make_flux, make_sd3, output_of, sd3_inputs

import diffusers_qalora as dq
from diffusers_qalora.quant import fake_quantize
from diffusers_qalora.tuners.qalora import qalora_layers
from diffusers_qalora.tuners.qalora.attention import QALoraFluxAttnProcessor, QALoraJointAttnProcessor

SD3_TABLE = [0.0, 250.0, 500.0, 999.0]
FLUX_TABLE = [0.0, 0.25, 0.5, 1.0]  # Flux's timestep argument lies in [0, 1]


def _config(table, **kwargs) -> dq.QALoraConfig:
    base = {
        "weight_bits": 8,
        "act_bits": 8,
        "timesteps": table,
        "quantize_attention": True,
        "init_weights": False,
        "r": 4,
        "weight_init": "minmax",
        "act_init": "minmax",
    }
    return dq.QALoraConfig(**{**base, **kwargs})


def make_flux_guided(seed: int = 0) -> FluxTransformer2DModel:
    """Tiny Flux-dev-like model: a guidance embedding beside the timestep embedding."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
        guidance_embeds=True,
    ).eval()


def make_sd35(seed: int = 0):
    """Tiny SD3.5-like model: RMS q/k norms and a second, image-only attention in its block."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ).eval()


def flux_guided_inputs(timestep, batch: int = 2, seed: int = 1) -> dict:
    return {**flux_inputs(timestep, batch, seed), "guidance": torch.full((batch,), 3.5)}


CASES = {
    "sd3": (make_sd3, sd3_inputs, SD3_TABLE),
    "sd35": (make_sd35, sd3_inputs, SD3_TABLE),
    "flux": (make_flux, flux_inputs, FLUX_TABLE),
    "flux_guidance": (make_flux_guided, flux_guided_inputs, FLUX_TABLE),
}


def _calibrated(case: str, **kwargs):
    build, inputs, table = CASES[case]
    model = dq.get_qalora_model(build(), _config(table, **kwargs))

    def run():
        for t in (table[1], table[-1]):
            model(**inputs(t))

    dq.calibrate_activations(model, run)
    return model


def _attention_backend(model, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, FluxAttention) or hasattr(module, "added_kv_proj_dim"):
            dq.set_kernel_preference(module, backend, recurse=False)


def _fake_quant(x: torch.Tensor, quantizer, t: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``x`` (B, ...) with the quantizer's step size and zero point at each sample's timestep, read
    from its table with the documented linear interpolation (not through its forward)."""
    table = quantizer.step.timesteps
    steps = quantizer.step.stacked().detach()
    zeros = torch.zeros_like(steps) if quantizer.zero_point is None else quantizer.zero_point.stacked().detach()
    out = []
    for b in range(x.shape[0]):
        tb = float(t[b].clamp(table[0], table[-1]))
        hi = int(torch.searchsorted(table, torch.tensor(tb)))
        lo = hi if float(table[hi]) == tb else hi - 1
        w = 0.0 if lo == hi else (tb - float(table[lo])) / float(table[hi] - table[lo])
        step = (1 - w) * steps[lo] + w * steps[hi]
        zero = (1 - w) * zeros[lo] + w * zeros[hi]
        zero = None if quantizer.symmetric else zero.round()
        out.append(fake_quantize(x[b], step, zero, quantizer.qmin, quantizer.qmax))
    return torch.stack(out)


def _explicit_attention(attn, q, k, v, t, scale, mask=None):
    """``(B, H, N, D)`` heads: fake-quantized q, k, v, explicit softmax, fake-quantized probabilities."""
    q = _fake_quant(q, attn.to_q.qal_out_quantizer["default"], t)
    k = _fake_quant(k, attn.to_k.qal_out_quantizer["default"], t)
    v = _fake_quant(v, attn.to_v.qal_out_quantizer["default"], t)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    if "default" in attn.to_v.qal_prob_quantizer:
        probs = _fake_quant(probs, attn.to_v.qal_prob_quantizer["default"], t)
    return probs @ v


def _independent_joint(attn, hidden, context, t):
    """SD3's joint attention written out: image tokens first, then context tokens, one quantizer per tensor."""
    b, n_image, heads = hidden.shape[0], hidden.shape[1], attn.heads

    def split(x):
        return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    q = torch.cat([split(attn.to_q(hidden)), split(attn.add_q_proj(context))], dim=2)
    k = torch.cat([split(attn.to_k(hidden)), split(attn.add_k_proj(context))], dim=2)
    v = torch.cat([split(attn.to_v(hidden)), split(attn.add_v_proj(context))], dim=2)
    out = _explicit_attention(attn, q, k, v, t, q.shape[-1] ** -0.5).transpose(1, 2).flatten(2)
    image, ctx = out[:, :n_image], out[:, n_image:]
    return attn.to_out[0](image), (ctx if attn.context_pre_only else attn.to_add_out(ctx))


def _rotate(x, cos, sin):
    """Rotary embedding of ``(B, N, H, D)``: pairs (x0, x1) rotate by the position's angle (Flux's real form)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def _independent_flux(attn, hidden, context, rotary, t, mask=None):
    """Flux's attention written out: context tokens first, RMS norms, rotary embedding, then the quantized product."""
    d = attn.head_dim

    def heads(x):
        return x.unflatten(-1, (-1, d))

    q, k, v = heads(attn.to_q(hidden)), heads(attn.to_k(hidden)), heads(attn.to_v(hidden))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is not None:
        cq, ck, cv = heads(attn.add_q_proj(context)), heads(attn.add_k_proj(context)), heads(attn.add_v_proj(context))
        q, k, v = (
            torch.cat([attn.norm_added_q(cq), q], 1),
            torch.cat([attn.norm_added_k(ck), k], 1),
            torch.cat([cv, v], 1),
        )
    cos, sin = rotary
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    out = _explicit_attention(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), t, d**-0.5, mask)
    out = out.transpose(1, 2).flatten(2)
    if context is None:
        return out
    n_ctx = context.shape[1]
    return attn.to_out[0](out[:, n_ctx:]), attn.to_add_out(out[:, :n_ctx])


def test_processors_installed_and_quantizers_placed():
    sd3 = dq.get_qalora_model(make_sd3(), _config(SD3_TABLE, quantize_attention_probs=True))
    assert sd3.attn_processors and all(isinstance(p, QALoraJointAttnProcessor) for p in sd3.attn_processors.values())
    flux = dq.get_qalora_model(make_flux(), _config(FLUX_TABLE))
    processors = flux.attn_processors
    assert len(processors) == 2 and all(isinstance(p, QALoraFluxAttnProcessor) for p in processors.values())
    for model in (sd3, flux):
        assert not any(".processor." in k for k in model.state_dict())
        for name, layer in qalora_layers(model).items():
            leaf = name.rpartition(".")[2]
            # q/k/v of the joint product live on to_q/to_k/to_v only; the context projections are plain layers
            assert bool(len(layer.qal_out_quantizer)) == (leaf in ("to_q", "to_k", "to_v")), name
    joint = sd3.transformer_blocks[0].attn
    assert joint.to_v.qal_out_quantizer["default"].step.timesteps.tolist() == SD3_TABLE
    assert "default" in joint.to_v.qal_prob_quantizer and "default" not in joint.add_v_proj.qal_prob_quantizer


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sd3_joint_attention_matches_independent_computation(backend, probs):
    model = _calibrated("sd3", quantize_attention_probs=probs, attention_bits=6)
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(3)
    hidden, context = torch.randn(2, 16, attn.query_dim, generator=g), torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([250.0, 700.0])
    model._qalora_timestep_context.set(t)
    _attention_backend(model, backend)
    with torch.no_grad():
        image, ctx = attn(hidden, encoder_hidden_states=context)
        want_image, want_ctx = _independent_joint(attn, hidden, context, t)
        attn.to_q.qal_out_quantizer["default"].enabled = False  # the quantizers do act
        unquantized_q, _ = attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(image, want_image, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(ctx, want_ctx, atol=5e-5, rtol=1e-4)
    assert (image - unquantized_q).abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("block", ["double", "single", "masked"])
def test_flux_attention_matches_independent_computation(backend, block):
    model = _calibrated("flux", quantize_attention_probs=True, attention_bits=6)
    inputs = flux_inputs(0.5)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]])
    rotary = model.pos_embed(ids)
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0.25, 0.8])
    model._qalora_timestep_context.set(t)
    _attention_backend(model, backend)
    with torch.no_grad():
        if block == "double":
            attn = model.transformer_blocks[0].attn
            hidden, context = torch.randn(2, 16, attn.query_dim, generator=g), torch.randn(2, 3, 16, generator=g)
            got = attn(hidden, encoder_hidden_states=context, image_rotary_emb=rotary)
            want = _independent_flux(attn, hidden, context, rotary, t)
        elif block == "masked":  # sample 0 does not attend to its last two context tokens
            attn = model.transformer_blocks[0].attn
            hidden, context = torch.randn(2, 16, attn.query_dim, generator=g), torch.randn(2, 3, 16, generator=g)
            mask = torch.ones(2, 1, 1, 19, dtype=torch.bool)
            mask[0, ..., 1:3] = False
            got = attn(hidden, encoder_hidden_states=context, attention_mask=mask, image_rotary_emb=rotary)
            want = _independent_flux(attn, hidden, context, rotary, t, mask)
            unmasked = attn(hidden, encoder_hidden_states=context, image_rotary_emb=rotary)
            assert (got[0] - unmasked[0])[0].abs().max() > 1e-4 and torch.allclose(got[0][1], unmasked[0][1])
        else:
            attn = model.single_transformer_blocks[0].attn
            hidden = torch.randn(2, 19, attn.query_dim, generator=g)  # context + image tokens, already joined
            got = (attn(hidden, image_rotary_emb=rotary),)
            want = (_independent_flux(attn, hidden, None, rotary, t),)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["sd3", "sd35", "flux_guidance"])
def test_no_active_quantizer_equals_the_stock_processor(case):
    build, inputs, table = CASES[case]
    model = _calibrated(case)
    x = inputs(torch.tensor([table[1], table[2]]))
    with torch.no_grad(), dq.adapters_disabled(model):
        ours = output_of(model(**x))
    with torch.no_grad():
        quantized = output_of(model(**x))
        for layer in qalora_layers(model).values():
            for quantizer in (*layer.qal_out_quantizer.values(), *layer.qal_prob_quantizer.values()):
                quantizer.enabled = False
        quantized_attention_off = output_of(model(**x))
    stock = build()
    with torch.no_grad():
        reference = output_of(stock(**x))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert (quantized - quantized_attention_off).abs().max() > 1e-5  # attention quantization moves the output


@pytest.mark.parametrize("case", ["sd3", "flux_guidance"])
def test_training_path_matches_inference_and_distils(case):
    """Three paths agree (inference kernel, LSQ training path); a few distillation steps against the FP teacher
    train the q/k/v step sizes of the current timestep entry only."""
    _, inputs, table = CASES[case]
    model = _calibrated(case, quantize_attention_probs=True, attention_bits=6)
    x = inputs(table[1])
    with torch.no_grad():
        inference = output_of(model(**x))
        with dq.adapters_disabled(model):
            teacher = output_of(model(**x))
    attn = (model.transformer_blocks[0]).attn
    step_q = attn.to_q.qal_out_quantizer["default"].step
    before = step_q.stacked().detach().clone()
    optimizer = torch.optim.AdamW(dq.get_qalora_param_groups(model, lora_lr=1e-3, act_step_lr=1e-2).param_groups)
    losses = []
    for i in range(3):
        out = output_of(model(**x))
        if i == 0:
            torch.testing.assert_close(out.detach(), inference, atol=5e-5, rtol=1e-4)
        loss = F.mse_loss(out, teacher)
        optimizer.zero_grad()
        loss.backward()
        if i == 0:
            grads = [p.grad for p in step_q.values]
            assert grads[1] is not None and grads[1] != 0 and all(grads[j] is None for j in (0, 2, 3))
            assert attn.to_v.qal_prob_quantizer["default"].step.values[1].grad is not None
        optimizer.step()
        losses.append(loss.item())
    after = step_q.stacked().detach()
    assert after[1] != before[1] and torch.equal(after[[0, 2, 3]], before[[0, 2, 3]])
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("case", ["sd3", "sd35", "flux", "flux_guidance"])
def test_adapter_round_trip_keeps_dit_attention_quantizers(case, tmp_path):
    build, inputs, table = CASES[case]
    model = _calibrated(case, quantize_attention_probs=True)
    with torch.no_grad():  # move a step size off its calibrated value so that the file must carry it
        quantizer = model.transformer_blocks[0].attn.to_k.qal_out_quantizer["default"]
        quantizer.step.fill_(quantizer.step.stacked() * 1.5)
    x = inputs(torch.tensor([table[1], table[2]]))
    with torch.no_grad():
        before = output_of(model(**x))
    dq.save_qalora_adapter(model, tmp_path)
    fresh = dq.load_qalora_adapter(build(), tmp_path)
    expected = QALoraJointAttnProcessor if case.startswith("sd3") else QALoraFluxAttnProcessor
    assert all(isinstance(p, expected) for p in fresh.attn_processors.values())
    loaded = fresh.transformer_blocks[0].attn.to_k.qal_out_quantizer["default"]
    assert torch.equal(loaded.step.stacked(), quantizer.step.stacked())
    with torch.no_grad():
        after = output_of(fresh(**x))
    assert torch.equal(after, before)


@pytest.mark.parametrize("case", ["sd3", "sd35", "flux", "flux_guidance"])
def test_export_save_and_load_keep_the_attention_quantizers(case, tmp_path):
    """Export carries the q/k/v and softmax step sizes on the integer projections: the exported model (torch
    kernels) computes the fake-quant model's numbers bit for bit, mixed timesteps included, and so does the model
    that from_pretrained rebuilds, with the QALoRA processors installed again."""
    build, inputs, table = CASES[case]
    model = _calibrated(case, quantize_attention_probs=True, attention_bits=6)
    x = inputs(torch.tensor([table[1], table[2]]))
    with torch.no_grad():
        fake = output_of(model(**x))
    exported = dq.export_quantized(model, kernel_preference="torch", inplace=False)
    attn = exported.transformer_blocks[0].attn
    assert isinstance(attn.to_q, dq.IntegerLinear) and attn.to_q.layout.output_bits == 6
    assert attn.to_v.layout.prob_bits == 6 and attn.to_q.layout.prob_bits is None
    expected = QALoraJointAttnProcessor if case.startswith("sd3") else QALoraFluxAttnProcessor
    assert all(isinstance(p, expected) for p in exported.attn_processors.values())
    with torch.no_grad():
        assert torch.equal(output_of(exported(**x)), fake)
        # the attention quantizers do act: without their tables the output moves
        no_tables = copy.deepcopy(exported)
        for module in no_tables.modules():
            if isinstance(module, dq.IntegerLinear) and module.out_timesteps is not None:
                module.out_timesteps = module.prob_timesteps = None
        assert not torch.equal(output_of(no_tables(**x)), fake)
    exported.save_pretrained(tmp_path)
    loaded = type(exported).from_pretrained(tmp_path)
    dq.set_kernel_preference(loaded, "torch")
    assert all(isinstance(p, expected) for p in loaded.attn_processors.values())
    with torch.no_grad():
        assert torch.equal(output_of(loaded(**x)), fake)


def test_export_of_uncalibrated_attention_is_refused_and_remove_restores_stock_processors():
    model = dq.get_qalora_model(make_sd3(), _config(SD3_TABLE))
    names = set(qalora_layers(model))
    with pytest.raises(ValueError, match="not calibrated"):
        dq.export_quantized(model)
    assert set(qalora_layers(model)) == names
    dq.remove_qalora(model)
    assert all(type(p) is JointAttnProcessor2_0 for p in model.attn_processors.values())
    flux = dq.remove_qalora(_calibrated("flux"))
    assert all(type(p) is FluxAttnProcessor for p in flux.attn_processors.values())


def test_other_attention_set_ups_are_refused_before_any_change():
    flux = make_flux()
    flux.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV"):
        dq.get_qalora_model(flux, _config(FLUX_TABLE, target_modules=["to_q", "to_k", "to_v"]))
    sd3 = make_sd3()
    from diffusers.models.attention_processor import AttnProcessor2_0

    sd3.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())  # cannot run SD3's added projections
    with pytest.raises(ValueError, match="added key/value"):
        dq.get_qalora_model(sd3, _config(SD3_TABLE))
    assert not qalora_layers(sd3)
    with pytest.raises(TypeError, match="FluxAttention"):
        QALoraFluxAttnProcessor()(make_sd3().transformer_blocks[0].attn, torch.zeros(1, 4, 16))
