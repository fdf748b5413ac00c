"""The PEFT / diffusers lifecycle of a QALoRA model (docs/lifecycle.md): every verb either gives the right model or
raises before changing anything.

Over the tiny UNet2DModel, UNet2DConditionModel (SD1.5- and SDXL-like), SD3 and Flux configs of ``tiny_models.py``:
merge / dtype cast / unmerge, ``merge_and_unload`` (refused), ``unload``, ``remove_qalora`` next to a style LoRA,
diffusers' adapter verbs (``add_adapter``, ``set_adapters``, ``disable_adapters`` / ``enable_adapters``,
``delete_adapters``) with a style LoRA and with several QALoRA adapters.  A failed call is checked against a snapshot
of the module tree, every tensor, the hooks and the PEFT configs taken before it.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft import LoraConfig
from peft.functional import set_adapter as peft_set_adapter
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tiny_models import MODEL_KINDS, output_of
from torch import nn

import diffusers_qalora as dq
from diffusers_qalora.quant import TemporalActQuantizer
from diffusers_qalora.tuners.qalora import qalora_layers

KINDS = sorted(MODEL_KINDS)
CONTEXT_ATTR = "_qalora_timestep_context"

# Style LoRA targets that every tiny model has (diffusers' attention projections).
STYLE_TARGETS = ["to_q", "to_k", "to_v"]


# -- helpers ----------------------------------------------------------------------------------------------------------
def make_config(case, **overrides) -> dq.QALoraConfig:
    kwargs = dict(r=2, timesteps=list(case.timesteps), weight_init="minmax", act_init="minmax", init_weights=False)
    kwargs.update(overrides)
    return dq.QALoraConfig(**kwargs)


def calibrate(model, case) -> None:
    def run_all():
        for t in case.timesteps:
            model(**case.inputs(t))

    dq.calibrate_activations(model, run_all)


def quantized(case, adapter_name="default", model=None, **overrides):
    model = dq.get_qalora_model(
        model if model is not None else case.build(), make_config(case, **overrides), adapter_name=adapter_name
    )
    calibrate(model, case)
    return model


def run(model, case, t=None, dtype=None) -> torch.Tensor:
    inputs = case.inputs(case.timesteps[1] if t is None else t)
    if dtype is not None:
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return output_of(model(**inputs))


def add_style(model, name="style", seed=3):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "Already found a `peft_config` attribute"
        model.add_adapter(
            LoraConfig(r=2, lora_alpha=2, target_modules=STYLE_TARGETS, init_lora_weights=False), adapter_name=name
        )
    return model


def snapshot(model: nn.Module) -> dict:
    return {
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": dict(model._forward_pre_hooks),
        "peft_config": dict(getattr(model, "peft_config", {}) or {}),
        "active": {
            n: list(m.active_adapters)
            for n, m in model.named_modules()
            if hasattr(m, "active_adapters") and not callable(m.active_adapters)
        },
        "merged": {n: list(m.merged_adapters) for n, m in qalora_layers(model).items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype and torch.equal(after["state"][key], value), key
    assert after["hooks"].keys() == before["hooks"].keys()
    assert after["peft_config"] == before["peft_config"]
    assert after["active"] == before["active"] and after["merged"] == before["merged"]


def assert_plain(model: nn.Module, reference: nn.Module) -> None:
    """No QALoRA left (layers, quantizers, timestep hook, configs) and the reference's exact tensors."""
    assert not qalora_layers(model)
    assert not any(isinstance(m, TemporalActQuantizer) for m in model.modules())
    assert getattr(model, CONTEXT_ATTR, None) is None and not model._forward_pre_hooks
    assert not any(
        getattr(c, "peft_type", None) == "QALORA" for c in (getattr(model, "peft_config", {}) or {}).values()
    )
    state, ref = model.state_dict(), reference.state_dict()
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in ref)


# -- merge, dtype / device cast, unmerge -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_cast_then_unmerge_gives_the_cast_weight(kind):
    """merge() never overwrites W0: after merge, .half() and unmerge() every base weight is W0 in fp16 (no stale
    fp32 copy comes back), the merged cache followed the cast, and state dicts never see the merged weight."""
    case = MODEL_KINDS[kind]
    model = quantized(case)
    layers = qalora_layers(model)
    original = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = run(model, case)
    for layer in layers.values():
        layer.merge()
    torch.testing.assert_close(run(model, case), out, atol=1e-6, rtol=0)
    merged_state = model.state_dict()
    assert merged_state.keys() == state.keys() and all(torch.equal(merged_state[k], state[k]) for k in state)
    model.half()
    for name, layer in layers.items():
        assert layer.merged and layer.qal_merged_weight.dtype == torch.float16, name
        layer.unmerge()
        weight = layer.get_base_layer().weight
        assert weight.dtype == torch.float16 and torch.equal(weight, original[name].half()), name
        assert layer.qal_merged_weight is None


def test_merged_layer_follows_a_dtype_cast_in_its_forward():
    case = MODEL_KINDS["unet2d"]
    model = quantized(case)
    model.double()
    unmerged = run(model, case, dtype=torch.float64)
    for layer in qalora_layers(model).values():
        layer.merge()
    assert torch.equal(
        run(model, case, dtype=torch.float64), unmerged
    )  # the merged cache is exactly the on-the-fly weight
    assert all(layer.qal_merged_weight.dtype == torch.float64 for layer in qalora_layers(model).values())


@pytest.mark.parametrize(
    "device",
    [
        "meta",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
def test_merge_then_move_then_unmerge_keeps_everything_on_the_new_device(device):
    case = MODEL_KINDS["unet2d"]
    model = quantized(case)
    for layer in qalora_layers(model).values():
        layer.merge()
    out = run(model, case)  # builds the merged weights
    original = {n: m.get_base_layer().weight.detach().clone() for n, m in qalora_layers(model).items()}
    model.to(device)
    for name, layer in qalora_layers(model).items():
        assert layer.qal_merged_weight.device.type == device, name
        layer.unmerge()
        assert layer.get_base_layer().weight.device.type == device, name
        if device != "meta":
            assert torch.equal(layer.get_base_layer().weight.cpu(), original[name]), name
    if device != "meta":
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in case.inputs(case.timesteps[1]).items()}
        with torch.no_grad():
            torch.testing.assert_close(output_of(model(**inputs)).cpu(), out, atol=1e-4, rtol=1e-4)


# -- merge_and_unload, unload ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_peft_merge_and_unload_is_refused_before_any_change(kind):
    case = MODEL_KINDS[kind]
    peft_model = peft.get_peft_model(case.build(), make_config(case))
    calibrate(peft_model, case)
    base = peft_model.get_base_model()
    out = run(peft_model, case)
    for merged in (False, True):
        if merged:
            peft_model.merge_adapter()  # an in-place merge keeps the activation quantizers: allowed
        before = snapshot(base)
        with pytest.raises(ValueError, match=r"merge_and_unload\(\) is not supported.*export_quantized"):
            peft_model.merge_and_unload()
        assert_unchanged(base, before)
        assert isinstance(peft_model.get_base_model(), type(base))
        torch.testing.assert_close(run(peft_model, case), out, atol=1e-6, rtol=0)
    # The QALoRA tuner refuses too when called directly.
    with pytest.raises(ValueError, match="export_quantized"):
        peft_model.base_model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_unload_gives_back_the_plain_full_precision_model(kind):
    case = MODEL_KINDS[kind]
    reference = case.build()
    fp_out = run(reference, case)
    peft_model = peft.get_peft_model(case.build(), make_config(case))
    calibrate(peft_model, case)
    peft_model.merge_adapter()
    assert not torch.equal(run(peft_model, case), fp_out)
    plain = peft_model.unload()
    assert type(plain) is type(reference)
    assert_plain(plain, reference)
    assert torch.equal(run(plain, case), fp_out)


# -- remove_qalora ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sd3", "flux"])
def test_remove_qalora_keeps_a_style_lora_and_its_config(kind):
    case = MODEL_KINDS[kind]
    model = add_style(quantized(case))
    style_state = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="style").items()}
    style_config = model.peft_config["style"]
    dq.remove_qalora(model)
    assert set(model.peft_config) == {"style"} and model.peft_config["style"] is style_config
    wrapped = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert wrapped and all(type(m.base_layer) is nn.Linear for m in wrapped)
    # Same output as the full-precision model carrying the same style LoRA.
    reference = add_style(case.build())
    set_peft_model_state_dict(reference, style_state, adapter_name="style")
    assert torch.equal(run(model, case), run(reference, case))
    assert getattr(model, CONTEXT_ATTR, None) is None and not model._forward_pre_hooks
    # The remaining adapter still works through diffusers' verbs.
    model.disable_adapters()
    assert torch.equal(run(model, case), run(case.build(), case))


def test_remove_qalora_alone_deletes_peft_config():
    case = MODEL_KINDS["unet2d"]
    model = quantized(case)
    dq.remove_qalora(model)
    assert_plain(model, case.build())
    assert not hasattr(model, "peft_config") and not getattr(model, "_hf_peft_config_loaded", False)


# -- composition with a style LoRA (diffusers' verbs) ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_diffusers_adapter_verbs_with_a_style_lora(kind):
    case = MODEL_KINDS[kind]
    model = quantized(case)
    q_out = run(model, case)
    add_style(model)
    assert all(layer.active_qalora_adapter() == "default" for layer in qalora_layers(model).values())
    both = run(model, case)
    assert not torch.equal(both, q_out)
    model.set_adapters(["default", "style"])
    assert torch.equal(run(model, case), both)
    model.set_adapters("style")  # naming only the style LoRA keeps QALoRA (it is the quantization, not a style)
    assert torch.equal(run(model, case), both)
    model.set_adapters(["default", "style"], [1.0, 0.0])
    assert torch.equal(run(model, case), q_out)  # a zero-weight style LoRA adds exactly nothing
    model.set_adapters(["default", "style"], [1.0, 1.0])
    # disable_adapters turns every adapter off, QALoRA included: the full-precision base model.
    model.disable_adapters()
    assert torch.equal(run(model, case), run(case.build(), case))
    model.enable_adapters()
    assert torch.equal(run(model, case), both)
    # Deleting the style LoRA gives the QALoRA model back, exactly.
    model.delete_adapters("style")
    assert set(model.peft_config) == {"default"}
    assert torch.equal(run(model, case), q_out)


def test_quantized_attention_stays_on_under_a_style_lora():
    """With ``quantize_attention``, the q/k/v step sizes live on the QALoRA projections; a style LoRA wrapping
    ``to_q``/``to_k``/``to_v`` must not hide them from the attention processor."""
    case = MODEL_KINDS["sd15"]
    model = quantized(case, quantize_attention=True)
    q_out = run(model, case)
    add_style(model)
    model.set_adapters(["default", "style"], [1.0, 0.0])
    assert torch.equal(run(model, case), q_out)


def test_fuse_lora_with_a_style_lora_quantizes_the_fused_weight_and_unfuses_exactly():
    """diffusers' fuse_lora merges the QALoRA layer first, then the style LoRA wrapping it adds its delta to W0: the
    merged QALoRA weight must be Q_w(W0 + style + B A), not a stale Q_w(W0 + B A) that drops the style."""
    case = MODEL_KINDS["sd15"]
    model = quantized(case)
    q_out = run(model, case)
    add_style(model)
    both = run(model, case)
    model.fuse_lora()
    fused = run(model, case)
    with torch.no_grad():
        for name, layer in qalora_layers(model).items():
            assert layer.merged and torch.equal(layer.qal_merged_weight, layer.quantized_weight("default")), name
    assert not torch.equal(fused, q_out)
    model.unfuse_lora()
    assert torch.equal(run(model, case), both)
    assert all(not layer.merged for layer in qalora_layers(model).values())


def test_diffusers_verbs_on_a_qalora_only_model():
    """Without a style LoRA, diffusers' verbs work too (get_qalora_model sets diffusers' "adapter loaded" flag)."""
    case = MODEL_KINDS["sd15"]
    fp_out = run(case.build(), case)
    model = quantized(case)
    out = run(model, case)
    assert model.active_adapters() == ["default"]
    model.disable_adapters()
    assert torch.equal(run(model, case), fp_out)
    model.enable_adapters()
    assert torch.equal(run(model, case), out)
    model.set_adapter("default")
    assert torch.equal(run(model, case), out)
    with pytest.raises(ValueError, match="could not be found"):
        model.set_adapter("nope")
    model.delete_adapters("default")
    assert not hasattr(model, "peft_config")
    assert torch.equal(run(model, case), fp_out)


def test_several_qalora_adapters_switch_and_refuse_two_at_once():
    case = MODEL_KINDS["sd15"]
    model = quantized(case)
    out_a = run(model, case)
    quantized(case, adapter_name="b", model=model, weight_bits=3)
    out_b = run(model, case)
    assert not torch.equal(out_a, out_b)
    add_style(model)
    with_style_b = run(model, case)
    before = snapshot(model)
    with pytest.raises(ValueError, match="only one QALoRA adapter can be active"):
        model.set_adapters(["default", "b", "style"])
    assert_unchanged(model, before)
    model.set_adapters(["default", "style"], [1.0, 0.0])
    assert torch.equal(run(model, case), out_a)
    model.set_adapters(["b", "style"])
    assert torch.equal(run(model, case), with_style_b)
    # Deleting the active QALoRA adapter leaves the other one inactive: the layers run in full precision.
    model.set_adapters(["default", "style"], [1.0, 0.0])
    for layer in qalora_layers(model).values():
        layer.merge()
    model.delete_adapters("default")
    assert all(not layer.merged for layer in qalora_layers(model).values())
    assert set(model.peft_config) == {"b", "style"}
    model.set_adapters(["b", "style"], [1.0, 0.0])
    assert torch.equal(run(model, case), out_b)


def test_add_adapter_keeps_the_trainable_state_of_qalora():
    case = MODEL_KINDS["sd15"]
    model = quantized(case)
    dq.set_qalora_adapter(model, "default", trainable=False)
    assert not any(p.requires_grad for p in model.parameters())
    add_style(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # PEFT's functional set_adapter naming a QALoRA adapter still controls its trainable state.
    peft_set_adapter(model, ["default", "style"])
    assert any(".qal_A." in n for n, p in model.named_parameters() if p.requires_grad)


# -- save_pretrained / from_pretrained of a model carrying QALoRA -------------------------------------------------------
def reload(model, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. diffusers' "Some weights ... were not initialized"
        return type(model).from_pretrained(path, **kwargs)


def assert_same_state(model, reference) -> None:
    state, ref = model.state_dict(), reference.state_dict()
    assert state.keys() == ref.keys()
    assert not any(v.is_meta for v in state.values())
    for k in ref:
        assert state[k].dtype == ref[k].dtype and torch.equal(state[k], ref[k]), k


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trip(kind, tmp_path):
    case = MODEL_KINDS[kind]
    model = quantized(case)
    out = run(model, case)
    model.save_pretrained(tmp_path / "a")
    reloaded = reload(model, tmp_path / "a")
    assert_same_state(reloaded, model)
    assert torch.equal(run(reloaded, case), out)
    assert torch.equal(run(reloaded, case, t=case.t_hi), run(model, case, t=case.t_hi))
    # The reloaded model saves again (its record is live) and dtype casts stay allowed, as before saving.
    reloaded.save_pretrained(tmp_path / "b")
    assert torch.equal(run(reload(model, tmp_path / "b"), case), out)
    reloaded.double()


def test_reloaded_model_exports_like_the_original(tmp_path):
    case = MODEL_KINDS["unet2d"]
    model = quantized(case)
    model.save_pretrained(tmp_path / "a")
    reloaded = reload(model, tmp_path / "a")
    expected = run(dq.export_quantized(model, kernel_preference="torch"), case)
    exported = dq.export_quantized(reloaded, kernel_preference="torch")
    assert torch.equal(run(exported, case), expected)
    exported.save_pretrained(tmp_path / "b")  # the export's quantization_config replaced the adapter record
    assert torch.equal(run(reload(model, tmp_path / "b"), case), expected)


def test_save_pretrained_keeps_style_lora_weights_active_set_disabled_and_merged_state(tmp_path):
    case = MODEL_KINDS["sd15"]
    model = quantized(case)
    quantized(case, adapter_name="b", model=model, weight_bits=3)
    add_style(model)
    model.set_adapters(["b", "style"], [1.0, 0.5])
    for layer in qalora_layers(model).values():
        layer.merge()
    out = run(model, case)
    model.save_pretrained(tmp_path / "a")
    reloaded = reload(model, tmp_path / "a")
    assert_same_state(reloaded, model)
    assert list(reloaded.peft_config) == ["default", "b", "style"]
    assert torch.equal(run(reloaded, case), out)
    assert all(layer.merged_adapters == ["b"] for layer in qalora_layers(reloaded).values())
    model.set_adapters(["default", "style"], [1.0, 0.0])
    reloaded.set_adapters(["default", "style"], [1.0, 0.0])
    assert torch.equal(run(reloaded, case), run(model, case))
    # Disabled adapters are saved disabled.
    model.disable_adapters()
    model.save_pretrained(tmp_path / "b")
    assert torch.equal(run(reload(model, tmp_path / "b"), case), run(case.build(), case))


def test_save_pretrained_loaded_in_half_keeps_qalora_tensors_in_float32(tmp_path):
    case = MODEL_KINDS["sd15"]
    model = quantized(case)
    model.save_pretrained(tmp_path)
    half = reload(model, tmp_path, torch_dtype=torch.float16)
    saved = model.state_dict()
    for key, value in half.state_dict().items():
        if ".qal_" in key:
            assert value.dtype == saved[key].dtype and torch.equal(value, saved[key]), key
        elif value.is_floating_point():
            assert value.dtype == torch.float16 and torch.equal(value, saved[key].half()), key


def test_save_pretrained_after_remove_qalora_is_a_plain_model(tmp_path):
    import json

    case = MODEL_KINDS["sd15"]
    model = quantized(case)
    dq.remove_qalora(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] is None
    reloaded = reload(model, tmp_path)
    assert_plain(reloaded, case.build())
    assert not getattr(reloaded, "is_quantized", False)


def test_save_pretrained_with_missing_adapter_tensors_fails_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    case = MODEL_KINDS["unet2d"]
    model = quantized(case)
    model.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if "conv_out.qal_" not in k}, path)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors lacks .* adapter tensor"):
        type(model).from_pretrained(tmp_path)


# -- the tiny Stable Diffusion pipeline -------------------------------------------------------------------------------
PIPE_CALL = dict(prompt="a photo of a cat", num_inference_steps=2, height=16, width=16, output_type="np")


def test_pipeline_with_a_loaded_style_lora_saves_and_reloads_to_the_same_images(tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from tiny_models import make_sd15_unet, make_tiny_sd_pipeline

    def sample(pipe):
        return pipe(**PIPE_CALL, generator=torch.Generator().manual_seed(0)).images

    # A style LoRA file, written by diffusers from a plain UNet.
    style_unet = add_style(make_sd15_unet())
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "style", unet_lora_layers=get_peft_model_state_dict(style_unet, adapter_name="style")
    )

    pipe = make_tiny_sd_pipeline()
    pipe.unet = dq.get_qalora_model(pipe.unet, dq.QALoraConfig(r=2, weight_init="minmax", init_weights=False))
    dq.calibrate_activations(pipe.unet, lambda: sample(pipe))
    quantized_image = sample(pipe)
    pipe.load_lora_weights(tmp_path / "style", adapter_name="style")
    assert all(layer.active_qalora_adapter() == "default" for layer in qalora_layers(pipe.unet).values())
    image = sample(pipe)
    assert not (image == quantized_image).all()
    pipe.set_adapters(["default", "style"], [1.0, 0.0])
    assert (sample(pipe) == quantized_image).all()
    pipe.set_adapters(["default", "style"], [1.0, 0.7])
    image = sample(pipe)

    pipe.save_pretrained(tmp_path / "pipe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert_same_state(reloaded.unet, pipe.unet)
    assert (sample(reloaded) == image).all()
