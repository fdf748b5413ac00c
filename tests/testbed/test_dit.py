"""Tests of the embedded DiT: the class-conditional SD3-style transformer, its recipe and its loading."""

import json
import math
import shutil
from dataclasses import asdict

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_qalora.testbed import (
    DEFAULT_DIT_CONFIG,
    WEIGHTS_DIR,
    ClassConditionalDDIMPipeline,
    ClassConditionalTransformer,
    build_dit,
    load_testbed,
    sha256_file,
)
from diffusers_qalora.testbed.dit_recipe import DitRecipeConfig, run_dit_recipe

torch.set_num_threads(1)

TINY = {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2}


def _tiny_config(**overrides) -> DitRecipeConfig:
    fields = {"steps": 3, "warmup_steps": 1, "batch_size": 16, "eval_samples": 0, **TINY}
    return DitRecipeConfig(**{**fields, **overrides})


def _weights_with_dit(tmp_path, config: DitRecipeConfig, name: str = "w"):
    """A weights folder holding the shipped UNet testbed files plus a freshly trained tiny DiT."""
    weights = tmp_path / name
    weights.mkdir()
    for file in ("testbed.json", "classifier.safetensors", "unet.safetensors"):
        shutil.copy(WEIGHTS_DIR / file, weights / file)
    record = run_dit_recipe(weights, config)
    torch.set_num_threads(1)
    return weights, record


def test_dit_is_a_class_conditional_sd3_transformer():
    model = build_dit({**TINY, "num_class_embeds": 10}, zero_init=False).eval()
    assert isinstance(model, SD3Transformer2DModel)
    public_config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    assert public_config == {**DEFAULT_DIT_CONFIG, **TINY}
    joint = [m for m in model.modules() if isinstance(m, Attention)]
    assert joint and all(isinstance(m.processor, JointAttnProcessor2_0) for m in joint)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor(500), class_labels=torch.tensor([1, 2, 3])).sample
        per_sample_t = model(x, torch.tensor([500, 500, 500]), class_labels=torch.tensor([1, 2, 3])).sample
        other_class = model(x, torch.tensor(500), class_labels=torch.tensor([4, 2, 3])).sample
    assert out.shape == x.shape
    torch.testing.assert_close(out, per_sample_t)
    # The class reaches the prediction of its own image only.
    assert not torch.allclose(other_class[0], out[0])
    torch.testing.assert_close(other_class[1:], out[1:])


def test_dit_rejects_bad_labels():
    model = build_dit(TINY)
    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"class_labels.*\[0, 9\]"):
        model(x, 10, class_labels=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="class_labels"):
        model(x, 10)
    with pytest.raises(ValueError, match="3 class labels for a batch of 2"):
        model(x, 10, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        ClassConditionalTransformer(sample_size=15, patch_size=2)


def test_zero_init_makes_every_block_start_as_the_identity():
    # adaLN-Zero: zero modulation gates and a zero output projection give a zero first prediction.
    model = build_dit(TINY)
    out = model(torch.randn(2, 1, 16, 16), 10, class_labels=torch.tensor([0, 1])).sample
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(build_dit(TINY, zero_init=False)(torch.randn(1, 1, 16, 16), 10, [0]).sample) > 0


def test_dit_recipe_is_seeded(tmp_path):
    a = run_dit_recipe(tmp_path / "a", _tiny_config())
    b = run_dit_recipe(tmp_path / "b", _tiny_config())
    c = run_dit_recipe(tmp_path / "c", _tiny_config(seed=1))
    torch.set_num_threads(1)
    # The tensors, not the file hashes: safetensors writes its metadata in an unspecified order.
    weights = {name: load_file(str(tmp_path / name / "dit.safetensors")) for name in "abc"}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
    assert a["dit_final_loss_ema"] == b["dit_final_loss_ema"] != c["dit_final_loss_ema"]
    assert sha256_file(tmp_path / "a" / "dit.safetensors") == a["files"]["dit"]["sha256"]


def test_recipe_writes_a_dit_that_load_testbed_loads(tmp_path):
    weights, record = _weights_with_dit(tmp_path, _tiny_config(eval_samples=10, eval_steps=2))
    assert record["fp_evaluation"]["num_samples"] == 10
    tb = load_testbed(weights_dir=weights, model="dit")
    assert tb.model_name == "dit" and isinstance(tb.unet, ClassConditionalTransformer)
    assert isinstance(tb.pipeline, ClassConditionalDDIMPipeline) and tb.pipeline.unet is tb.unet
    assert tb.config["files"]["dit"]["sha256"] == record["files"]["dit"]["sha256"]
    assert sum(p.numel() for p in tb.unet.parameters()) == record["num_parameters"]["dit"]
    assert tb.classifier.config == load_testbed(weights_dir=weights).classifier.config
    tb.pipeline.set_progress_bar_config(disable=True)
    images = tb.pipeline([0, 5, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (3, 1, 16, 16)


def test_dit_loading_errors(tmp_path):
    weights, _ = _weights_with_dit(tmp_path, _tiny_config())
    with pytest.raises(ValueError, match="`model` must be one of"):
        load_testbed(weights_dir=weights, model="vit")
    path = weights / "dit.safetensors"
    original = path.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="dit.safetensors"):
        load_testbed(weights_dir=weights, model="dit")
    path.write_bytes(original)
    record = json.loads((weights / "dit.json").read_text())
    record["split"]["seed"] = 7
    (weights / "dit.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="split seed 7"):
        load_testbed(weights_dir=weights, model="dit")
    (weights / "dit.json").unlink()
    with pytest.raises(FileNotFoundError, match="dit_recipe"):
        load_testbed(weights_dir=weights, model="dit")
    load_testbed(weights_dir=weights)  # the UNet does not need the DiT's files


def test_main_job_runs_on_the_dit(tmp_path):
    """The embedded job (PTQ baselines, distillation, evaluation) on a DiT: the same outputs as for the UNet."""
    from diffusers_qalora.distill import DistillConfig
    from diffusers_qalora.distill.embedded import EmbeddedJobConfig, run_embedded_job

    weights, _ = _weights_with_dit(tmp_path, _tiny_config())
    testbed = load_testbed(weights_dir=weights, model="dit")
    job = EmbeddedJobConfig(
        weight_bits=8,
        act_bits=8,
        rank=2,
        table_steps=4,
        calibration_samples=2,
        eval_samples=6,
        eval_steps=2,
        distill=DistillConfig(num_inference_steps=4, batch_size=2, max_train_steps=2),
        model="dit",
    )
    results = run_embedded_job(job, tmp_path / "out", "test", testbed=testbed)
    torch.set_num_threads(1)
    assert set(results["methods"]) == {"FP", "naive PTQ", "per-timestep PTQ", "QALoRA distilled"}
    for row in results["methods"].values():
        assert math.isfinite(row["fid_mean"])
    out = tmp_path / "out"
    assert (out / "adapter").is_dir() and (out / "results.json").is_file()
    assert (out / "report.md").read_text().startswith("#") and "digits DiT" in (out / "report.md").read_text()
    # The distilled adapter wraps the transformer's joint-attention projections, context stream included.
    wrapped = {name for name, module in testbed.unet.named_modules() if "distilled" in getattr(module, "qal_A", {})}
    assert "transformer_blocks.0.attn.to_q" in wrapped and "transformer_blocks.0.attn.add_k_proj" in wrapped


def test_cli_refuses_dit_with_a_pretrained_model(tmp_path, monkeypatch):
    from diffusers_qalora.distill.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--model dit"):
        main(["--model", "dit", "--pretrained_model_name_or_path", "org/name"])
    assert not any(tmp_path.iterdir())


def test_shipped_dit_loads_offline_and_matches_its_record():
    record = json.loads((WEIGHTS_DIR / "dit.json").read_text())
    path = WEIGHTS_DIR / record["files"]["dit"]["name"]
    assert sha256_file(path) == record["files"]["dit"]["sha256"]
    assert path.stat().st_size < 6 * 2**20, "the shipped DiT must stay a few MB"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["component"] == "dit" and metadata["recipe_version"] == record["recipe_version"]
    assert json.loads(metadata["config"]) == record["dit_config"] == DEFAULT_DIT_CONFIG
    assert record["hyperparameters"] == {
        **asdict(DitRecipeConfig()),
        "num_threads": record["environment"]["num_threads"],
    }
    tb = load_testbed(model="dit")
    assert isinstance(tb.unet, ClassConditionalTransformer) and not tb.unet.training
    assert sum(p.numel() for p in tb.unet.parameters()) == record["num_parameters"]["dit"]
    assert record["split"] == {"seed": 0, "train_size": 1297, "heldout_size": 500}
    # A trained model: its predictions depend on the class and are not the zero of the initialisation.
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = tb.unet(x, 500, class_labels=torch.tensor([0, 1])).sample
        b = tb.unet(x, 500, class_labels=torch.tensor([7, 1])).sample
    assert a.abs().mean() > 0.1 and (a[0] - b[0]).abs().max() > 1e-2
    assert record["fp_evaluation"]["num_samples"] == 1000 and record["fp_evaluation"]["class_accuracy"] > 0.5
