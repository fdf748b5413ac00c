"""The ``"qalora"`` diffusers backend: config, registration, save_pretrained / from_pretrained round trips (UNet2DModel,
UNet2DConditionModel, a tiny pipeline), PTQ on load, torch_dtype / device_map, and failures that load nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.quantizers import PipelineQuantizationConfig
from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from export_fixtures import (
    make_sd15_unet,
    make_tiny_sd_pipeline,
    make_unet2d,
    qalora,
    sd15_inputs,
    unet2d_inputs,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers_qalora as dq
from diffusers_qalora.export import IntegerConv2d, IntegerLayer, IntegerLinear, integer_layers
from diffusers_qalora.integrations.diffusers import (
    CHECKSUM_KEY,
    QALoraDiffusersQuantizer,
    register_diffusers_backend,
)
from diffusers_qalora.tuners.qalora import QALoraLayer

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.fixture(scope="module")
def exported_unet2d_dir(tmp_path_factory):
    """A W4A8 UNet2DModel exported and saved once for the module: (folder, inputs, outputs before saving)."""
    model = dq.export_quantized(qalora(make_unet2d(), unet2d_inputs, 4, 8))
    inputs = unet2d_inputs(torch.tensor([30.0, 30.0, 700.0, 999.0]))
    folder = tmp_path_factory.mktemp("unet2d-w4a8")
    model.save_pretrained(folder)
    return folder, inputs, _out(model, inputs), model.state_dict()


# -- config and registration -------------------------------------------------------------------------------------------
def test_config_round_trip_and_validation():
    cfg = dq.QALoraQuantConfig(weight_bits=4, act_bits=8, timesteps=[0, 500, 999], modules_to_not_convert=["conv_out"])
    data = cfg.to_dict()
    assert data["quant_method"] == "qalora" and json.loads(json.dumps(data)) == data
    again = dq.QALoraQuantConfig.from_dict(data)
    assert again.to_dict() == data and again.quant_method is dq.QALoraQuantMethod.QALORA
    assert "layers" not in cfg.to_diff_dict() and "qalora" in repr(cfg)
    names = ["conv_in"]
    dq.QALoraQuantConfig(modules_to_not_convert=names).modules_to_not_convert.append("x")
    assert names == ["conv_in"]  # never the caller's list
    with pytest.raises(ValueError, match="weight_bits"):
        dq.QALoraQuantConfig(weight_bits=1)
    with pytest.raises(ValueError, match="quant_method"):
        dq.QALoraQuantConfig(quant_method="torchao")
    with pytest.raises(ValueError, match="kernel_preference"):
        dq.QALoraQuantConfig(kernel_preference="cutlass")
    with pytest.raises(ValueError, match="'reference' is now 'torch'"):
        dq.QALoraQuantConfig(kernel_preference="reference")  # the old name is read from saved files only
    with pytest.raises(ValueError, match="quantizes a float model on load"):
        dq.QALoraQuantConfig(kernel_preference="onednn")  # integer layers only
    with pytest.raises(ValueError, match="disagrees"):
        dq.QALoraQuantConfig(weight_bits=4, layers={"a": {"kind": "linear", "weight_bits": 6, "act_bits": 8}})
    with pytest.raises(ValueError, match="does not know"):
        dq.QALoraQuantConfig.from_dict({**data, "weight_bitz": 4})


def test_backend_registration_is_idempotent_and_guarded():
    assert AUTO_QUANTIZER_MAPPING["qalora"] is QALoraDiffusersQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["qalora"] is dq.QALoraQuantConfig
    register_diffusers_backend()
    register_diffusers_backend()
    assert AUTO_QUANTIZER_MAPPING["qalora"] is QALoraDiffusersQuantizer

    class Intruder(QALoraDiffusersQuantizer):
        pass

    AUTO_QUANTIZER_MAPPING["qalora"] = Intruder
    try:
        with pytest.raises(RuntimeError, match="already has a quantizer"):
            register_diffusers_backend()
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["qalora"] is dq.QALoraQuantConfig  # nothing half-written
    finally:
        AUTO_QUANTIZER_MAPPING["qalora"] = QALoraDiffusersQuantizer


# -- round trips -------------------------------------------------------------------------------------------------------
def test_unet2d_save_load_is_bit_exact(exported_unet2d_dir):
    folder, inputs, before, state = exported_unet2d_dir
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qalora" and config["weight_bits"] == 4
    assert config["layers"]["conv_in"]["weight_bits"] == 8
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()[CHECKSUM_KEY]
        assert f.get_tensor("down_blocks.0.resnets.0.conv1.weight_packed").dtype == torch.uint8
    assert not [k for k in keys if "qal_" in k or "base_layer" in k]
    loaded = UNet2DModel.from_pretrained(folder)  # no quantization_config argument
    assert isinstance(loaded.hf_quantizer, QALoraDiffusersQuantizer) and loaded.is_quantized
    assert isinstance(loaded.conv_in, IntegerConv2d)
    assert isinstance(loaded.down_blocks[1].attentions[0].to_q, IntegerLinear)
    now = loaded.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert torch.equal(_out(loaded, inputs), before)  # the timestep hook is back, mixed timesteps included


def test_sharded_checkpoint_round_trip_and_checksum(exported_unet2d_dir, tmp_path):
    folder, inputs, before, _ = exported_unet2d_dir
    model = UNet2DModel.from_pretrained(folder)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 1
    assert torch.equal(_out(UNet2DModel.from_pretrained(tmp_path), inputs), before)
    path = str(tmp_path / shards[-1])
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("act_scale"))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        UNet2DModel.from_pretrained(tmp_path)


def test_sd15_unet_save_load_is_bit_exact(tmp_path):
    model = dq.export_quantized(qalora(make_sd15_unet(), sd15_inputs, 4, 8))
    inputs = sd15_inputs(400.0)
    before = _out(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert len(integer_layers(loaded)) == len(integer_layers(model))
    assert torch.equal(_out(loaded, inputs), before)
    auto = UNet2DConditionModel.from_pretrained(tmp_path, device_map="auto")  # UNet2DModel has no device_map="auto"
    assert torch.equal(_out(auto, inputs), before)


def test_export_before_save_is_required(tmp_path):
    model = qalora(make_unet2d(), unet2d_inputs)
    src = tmp_path / "float"
    make_unet2d().save_pretrained(src)
    ptq = UNet2DModel.from_pretrained(src, quantization_config=dq.QALoraQuantConfig(r=4, weight_init="minmax"))
    assert any(isinstance(m, QALoraLayer) for m in ptq.modules())
    with pytest.raises(ValueError, match="not serializable"):
        ptq.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / WEIGHTS).exists()
    del model


def test_ptq_on_load_then_export_then_reload(tmp_path):
    make_unet2d().save_pretrained(tmp_path / "float")
    cfg = dq.QALoraQuantConfig(
        weight_bits=4, act_bits=8, r=4, timesteps=[0.0, 500.0, 999.0], weight_init="minmax", act_init="minmax"
    )
    model = UNet2DModel.from_pretrained(tmp_path / "float", quantization_config=cfg)
    dq.calibrate_activations(model, lambda: [model(**unet2d_inputs(t)) for t in (0.0, 500.0, 999.0)])
    inputs = unet2d_inputs(250.0)
    fq = _out(model, inputs)
    dq.export_quantized(model, kernel_preference="torch")
    assert torch.equal(_out(model, inputs), fq)
    model.save_pretrained(tmp_path / "int")
    saved = json.loads((tmp_path / "int" / "config.json").read_text())["quantization_config"]
    assert saved["timesteps"] == [0.0, 500.0, 999.0] and saved["kernel_preference"] == "torch"
    loaded = UNet2DModel.from_pretrained(tmp_path / "int")
    assert torch.equal(_out(loaded, inputs), fq)
    assert cfg.layers is None  # the user's config object was not modified


def test_torch_dtype_and_device_map(exported_unet2d_dir):
    folder, inputs, before, _ = exported_unet2d_dir
    bf16 = UNet2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert bf16.conv_norm_out.weight.dtype == torch.bfloat16  # float layers follow torch_dtype
    layer = bf16.down_blocks[0].resnets[0].conv1
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float32
    out = _out(bf16, {**inputs, "sample": inputs["sample"].bfloat16()})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    on_cpu = UNet2DModel.from_pretrained(folder, device_map="cpu")
    assert torch.equal(_out(on_cpu, inputs), before)


def test_dtype_cast_of_an_integer_model_is_refused(exported_unet2d_dir):
    folder, inputs, before, state = exported_unet2d_dir
    model = UNet2DModel.from_pretrained(folder)
    for cast in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        with pytest.raises(ValueError, match="quantized model"):
            cast(model)
    assert all(v.dtype == state[k].dtype for k, v in model.state_dict().items())
    assert torch.equal(_out(model, inputs), before)


def test_pipeline_round_trip_and_quant_mapping(tmp_path):
    pipe = make_tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "float")
    mapping = PipelineQuantizationConfig(
        quant_mapping={
            "unet": dq.QALoraQuantConfig(
                weight_bits=4,
                act_bits=8,
                r=4,
                timesteps=[1.0, 501.0, 951.0],
                weight_init="minmax",
                act_init="minmax",
            )
        }
    )
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "float", quantization_config=mapping)
    assert any(isinstance(m, QALoraLayer) for m in pipe.unet.modules())
    assert not any(isinstance(m, QALoraLayer) for m in pipe.vae.modules())
    pipe.set_progress_bar_config(disable=True)

    def sample(p):
        return p(
            "a digit",
            num_inference_steps=3,
            guidance_scale=2.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    dq.calibrate_activations(pipe.unet, lambda: sample(pipe))
    pipe.unet = dq.export_quantized(pipe.unet)
    images = sample(pipe)
    pipe.save_pretrained(tmp_path / "int")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "int")  # no argument
    loaded.set_progress_bar_config(disable=True)
    assert integer_layers(loaded.unet) and not integer_layers(loaded.vae)
    assert torch.equal(sample(loaded), images)


# -- failures load nothing ---------------------------------------------------------------------------------------------
def _copy(folder, dst):
    dst.mkdir()
    for name in os.listdir(folder):
        (dst / name).write_bytes((folder / name).read_bytes())
    return dst


def _assert_clean():
    assert torch.get_default_dtype() == torch.float32
    assert AUTO_QUANTIZER_MAPPING["qalora"] is QALoraDiffusersQuantizer


def test_truncated_file_is_a_clear_error(exported_unet2d_dir, tmp_path):
    folder = _copy(exported_unet2d_dir[0], tmp_path / "cut")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises((OSError, ValueError), match=WEIGHTS):
        UNet2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    _assert_clean()
    sharded = tmp_path / "sharded"
    UNet2DModel.from_pretrained(exported_unet2d_dir[0]).save_pretrained(sharded, max_shard_size="100KB")
    shard = sorted(p for p in sharded.iterdir() if p.suffix == ".safetensors")[-1]
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(OSError, match=f"{shard.name} is not a readable safetensors file"):
        UNet2DModel.from_pretrained(sharded)
    _assert_clean()


def test_corrupt_tensor_data_is_caught_by_the_checksum(exported_unet2d_dir, tmp_path):
    folder = _copy(exported_unet2d_dir[0], tmp_path / "flip")
    path = str(folder / WEIGHTS)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = "down_blocks.0.resnets.0.conv1.weight_packed"
    tensors[key] = tensors[key] ^ 0x11  # same header, different bytes
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="corrupt"):
        UNet2DModel.from_pretrained(folder)
    _assert_clean()


def test_missing_tensor_is_a_clear_error(exported_unet2d_dir, tmp_path):
    folder = _copy(exported_unet2d_dir[0], tmp_path / "missing")
    path = str(folder / WEIGHTS)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors["down_blocks.0.resnets.0.conv1.act_scale"]
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="corrupt checkpoint"):  # the checksum of all tensors sees it first
        UNet2DModel.from_pretrained(folder)
    _assert_clean()
    from diffusers_qalora.integrations.diffusers.quantizer import STATE_CHECKSUM_KEY

    del metadata[STATE_CHECKSUM_KEY]  # a file saved before that checksum existed
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        UNet2DModel.from_pretrained(folder)
    _assert_clean()


@pytest.mark.parametrize("edit", ["layer_bits", "global_bits", "kind"])
def test_config_that_disagrees_with_the_tensors(exported_unet2d_dir, tmp_path, edit):
    folder = _copy(exported_unet2d_dir[0], tmp_path / edit)
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    if edit == "layer_bits":
        q["layers"]["down_blocks.0.resnets.0.conv1"]["weight_bits"] = 8
        match = "weight_packed` has shape"
    elif edit == "global_bits":
        q["weight_bits"] = 2
        match = "disagrees"
    else:
        q["layers"]["down_blocks.0.resnets.0.conv1"]["kind"] = "linear"
        match = "has a Conv2d there"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        UNet2DModel.from_pretrained(folder)
    _assert_clean()


def test_loading_without_the_plugin_names_the_fix(exported_unet2d_dir):
    from diffusers_qalora.integrations.diffusers import unregister_diffusers_backend

    unregister_diffusers_backend()
    try:
        with pytest.raises(ValueError, match="qalora"):
            UNet2DModel.from_pretrained(exported_unet2d_dir[0])
    finally:
        register_diffusers_backend()


def test_integer_layers_are_the_only_quantized_modules(exported_unet2d_dir):
    loaded = UNet2DModel.from_pretrained(exported_unet2d_dir[0])
    assert all(isinstance(m, IntegerLayer) for m in integer_layers(loaded).values())
    assert loaded.class_embedding.weight.dtype == torch.float32


def test_corrupt_float_tensor_is_caught_by_the_state_checksum(exported_unet2d_dir, tmp_path):
    from diffusers_qalora.integrations.diffusers.quantizer import STATE_CHECKSUM_KEY

    folder = _copy(exported_unet2d_dir[0], tmp_path / "float-flip")
    path = str(folder / WEIGHTS)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert len(metadata[STATE_CHECKSUM_KEY]) == 32
    tensors = load_file(path)
    key = "conv_norm_out.weight"  # a float layer: outside the integer layers' checksum
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=rf"corrupt checkpoint \(.*{WEIGHTS}\).*Download or save the model again"):
        UNet2DModel.from_pretrained(folder)
    _assert_clean()
    # A file saved before the state checksum existed still loads (its integer checksum is still verified).
    del metadata[STATE_CHECKSUM_KEY]
    save_file(load_file(str(exported_unet2d_dir[0] / WEIGHTS)), path, metadata=metadata)
    assert torch.equal(_out(UNet2DModel.from_pretrained(folder), exported_unet2d_dir[1]), exported_unet2d_dir[2])
