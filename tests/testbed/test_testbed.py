"""Tests of the embedded default model: shipped weights, pipeline, split and recipe."""

import json
import shutil
import socket

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.attention_processor import Attention
from safetensors import safe_open

from diffusers_qalora.testbed import (
    WEIGHTS_DIR,
    ClassConditionalDDIMPipeline,
    DigitsClassifier,
    build_unet,
    load_digits_16x16,
    load_digits_split,
    load_testbed,
    sha256_file,
)
from diffusers_qalora.testbed.recipe import RecipeConfig, _random_shift, run_recipe

torch.set_num_threads(1)


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection."""

    def guard(*args, **kwargs):
        raise RuntimeError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


def _tiny_sample(pipe, seed, labels=(0, 3, 7, 9), steps=4):
    generator = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe(list(labels), num_inference_steps=steps, generator=generator).images


# --- shipped weights -------------------------------------------------------------------------------------------


def test_shipped_weights_load_offline(no_network):
    tb = load_testbed()
    assert isinstance(tb.pipeline, ClassConditionalDDIMPipeline)
    assert isinstance(tb.pipeline.scheduler, DDIMScheduler)
    assert tb.pipeline.unet is tb.unet
    assert not tb.unet.training and not tb.classifier.training


def test_shipped_unet_matches_recipe_description(testbed):
    unet, config = testbed.unet, testbed.config
    num_params = sum(p.numel() for p in unet.parameters())
    assert 800_000 <= num_params <= 1_300_000
    assert num_params == config["num_parameters"]["unet"]
    assert unet.config.num_class_embeds == 10
    assert unet.config.sample_size == 16
    assert unet.config.in_channels == 1 and unet.config.out_channels == 1
    assert any(isinstance(m, Attention) for m in unet.modules()), "the testbed UNet must hold an attention block"
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    # The scheduler is the documented one: 1000 steps, epsilon prediction.
    scheduler_config = testbed.pipeline.scheduler.config
    assert scheduler_config.num_train_timesteps == 1000
    assert scheduler_config.prediction_type == "epsilon"
    assert scheduler_config.beta_schedule == config["scheduler_config"]["beta_schedule"]
    out = unet(torch.zeros(2, 1, 16, 16), torch.tensor(500), class_labels=torch.tensor([1, 2])).sample
    assert out.shape == (2, 1, 16, 16)


def test_shipped_classifier_matches_recipe_description(testbed):
    classifier, config = testbed.classifier, testbed.config
    assert isinstance(classifier, DigitsClassifier)
    assert 64 <= classifier.feature_dim <= 128
    assert classifier.config == config["classifier_config"]
    x = torch.zeros(3, 1, 16, 16)
    assert classifier.features(x).shape == (3, classifier.feature_dim)
    assert classifier(x).shape == (3, 10)
    assert all(p.dtype == torch.float32 for p in classifier.parameters())


def test_shipped_files_hashes_and_metadata():
    config = json.loads((WEIGHTS_DIR / "testbed.json").read_text())
    total = 0
    for component in ("unet", "classifier"):
        entry = config["files"][component]
        path = WEIGHTS_DIR / entry["name"]
        assert sha256_file(path) == entry["sha256"]
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        assert metadata["component"] == component
        assert metadata["recipe_version"] == config["recipe_version"]
        assert json.loads(metadata["config"]) == config[f"{component}_config"]
        total += path.stat().st_size
    assert total < 6 * 2**20, "the shipped weights must stay a few MB"
    for key in ("unet_config", "scheduler_config", "classifier_config", "split", "hyperparameters", "timing_seconds"):
        assert key in config
    assert config["split"] == {"seed": 0, "train_size": 1297, "heldout_size": 500}


def test_classifier_heldout_accuracy(testbed):
    with torch.no_grad():
        logits = testbed.classifier(testbed.reference_images * 2 - 1)
    accuracy = (logits.argmax(1) == testbed.reference_labels).double().mean().item()
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(testbed.config["classifier_heldout_accuracy"], abs=1e-6)


def test_reference_images_are_the_heldout_split(testbed):
    images, labels = testbed.reference_images, testbed.reference_labels
    assert images.shape == (500, 1, 16, 16) and labels.shape == (500,)
    assert images.dtype == torch.float32 and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    train_images, train_labels = testbed.train_data()
    assert train_images.shape == (1297, 1, 16, 16) and train_labels.shape == (1297,)


def test_tampered_weights_give_a_clear_error(tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, weights)
    path = weights / "unet.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="unet.safetensors"):
        load_testbed(weights_dir=weights)
    shutil.copy(WEIGHTS_DIR / "unet.safetensors", path)
    load_testbed(weights_dir=weights)  # restored: loads again
    (weights / "classifier.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="classifier"):
        load_testbed(weights_dir=weights)


def test_loader_rejects_swapped_components(tmp_path):
    # Files with valid hashes but swapped roles must not load silently as the wrong model.
    weights = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, weights)
    config = json.loads((weights / "testbed.json").read_text())
    config["files"]["unet"], config["files"]["classifier"] = config["files"]["classifier"], config["files"]["unet"]
    (weights / "testbed.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="component"):
        load_testbed(weights_dir=weights)


# --- pipeline --------------------------------------------------------------------------------------------------


def test_sampling_is_deterministic_under_a_seed(testbed):
    a = _tiny_sample(testbed.pipeline, seed=0)
    b = _tiny_sample(testbed.pipeline, seed=0)
    c = _tiny_sample(testbed.pipeline, seed=1)
    assert a.shape == (4, 1, 16, 16) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 0.1


def test_pipeline_calls_unet_with_scheduler_timesteps(testbed):
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[1], kwargs["class_labels"].clone()))

    handle = testbed.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _tiny_sample(testbed.pipeline, seed=0, labels=(2, 5), steps=5)
    finally:
        handle.remove()
    timesteps = testbed.pipeline.scheduler.timesteps
    assert len(seen) == 5
    assert [int(t) for t, _ in seen] == [int(t) for t in timesteps]
    assert int(timesteps[0]) == 999, "trailing spacing starts sampling from pure noise"
    assert all(labels.tolist() == [2, 5] for _, labels in seen)


def test_pipeline_output_types(testbed):
    pipe = testbed.pipeline
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2}
    pt = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
    np_images = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    pil = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pil", **kwargs).images
    (as_tuple,) = pipe([1, 2], generator=torch.Generator().manual_seed(0), return_dict=False, **kwargs)
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "L"
    torch.testing.assert_close(as_tuple, pt)


def test_pipeline_rejects_bad_arguments(testbed):
    with pytest.raises(ValueError, match="class_labels"):
        testbed.pipeline([10])
    with pytest.raises(ValueError, match="output_type"):
        testbed.pipeline([1], output_type="latent")
    with pytest.raises(ValueError, match="latents"):
        testbed.pipeline([1, 2], latents=torch.zeros(1, 1, 16, 16))


def test_pipeline_latents_replace_the_generator(testbed):
    pipe = testbed.pipeline
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    a = pipe([4, 6], num_inference_steps=3, latents=noise).images
    b = pipe([4, 6], num_inference_steps=3, generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pipeline_works_with_other_schedulers_of_the_family(testbed, eta):
    ddpm = DDPMScheduler.from_config(testbed.pipeline.scheduler.config)
    pipe = ClassConditionalDDIMPipeline(unet=testbed.unet, scheduler=ddpm)
    a = _tiny_sample(pipe, seed=0, steps=3)
    b = _tiny_sample(pipe, seed=0, steps=3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    ddim = ClassConditionalDDIMPipeline(unet=testbed.unet, scheduler=DDIMScheduler.from_config(ddpm.config))
    ddim.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    c = ddim([0, 3], num_inference_steps=3, eta=eta, generator=gen).images
    d = ddim([0, 3], num_inference_steps=3, eta=eta, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(c, d, atol=0, rtol=0)


def test_save_pretrained_round_trip(testbed, tmp_path, no_network):
    testbed.pipeline.save_pretrained(tmp_path / "pipe")
    saved = {p.name for p in (tmp_path / "pipe").rglob("*") if p.is_file()}
    assert "model_index.json" in saved and not any(name.endswith((".bin", ".pt", ".pkl")) for name in saved)
    loaded = ClassConditionalDDIMPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.scheduler, DDIMScheduler)
    torch.testing.assert_close(_tiny_sample(loaded, seed=5), _tiny_sample(testbed.pipeline, seed=5), atol=0, rtol=0)


# --- data and recipe -------------------------------------------------------------------------------------------


def test_split_is_seeded_stratified_and_complete():
    images, labels = load_digits_16x16()
    assert images.shape == (1797, 1, 16, 16)
    split = load_digits_split(0)
    again = load_digits_split(0)
    other = load_digits_split(1)
    torch.testing.assert_close(split.heldout_images, again.heldout_images, atol=0, rtol=0)
    assert not torch.equal(split.heldout_labels, other.heldout_labels)
    assert len(split.train_labels) == 1297 and len(split.heldout_labels) == 500
    # Stratified: every class holds 500/1797 of its images in the held-out part, to within one image.
    expected = torch.bincount(labels).double() * 500 / 1797
    assert (torch.bincount(split.heldout_labels).double() - expected).abs().max() <= 1.0
    # Complete and disjoint: the two parts together are exactly the data set.
    together = torch.cat([split.train_images, split.heldout_images]).flatten(1)
    assert torch.equal(together.sum(1).sort().values, images.flatten(1).sum(1).sort().values)


def test_random_shift_moves_content_without_flipping():
    x = torch.full((1, 1, 16, 16), -1.0)
    x[0, 0, 5, 3] = 1.0
    generator = torch.Generator().manual_seed(0)
    shifted = _random_shift(x.repeat(64, 1, 1, 1), max_shift=2, generator=generator)
    positions = {tuple(torch.nonzero(s[0] > 0)[0].tolist()) for s in shifted}
    assert positions <= {(5 + dy, 3 + dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert len(positions) > 5
    assert torch.equal(_random_shift(x, 0, generator), x)


def test_recipe_writes_a_loadable_testbed(tmp_path):
    config = RecipeConfig(
        num_threads=1, classifier_epochs=1, ddpm_steps=2, ddpm_warmup_steps=1, eval_samples=20, eval_steps=2
    )
    record = run_recipe(tmp_path / "w", config)
    assert set(record["files"]) == {"unet", "classifier"}
    tb = load_testbed(weights_dir=tmp_path / "w")
    assert sum(p.numel() for p in tb.unet.parameters()) == record["num_parameters"]["unet"]
    assert record["fp_evaluation"]["num_samples"] == 20
    # The recipe's UNet is the documented one.
    assert sum(p.numel() for p in build_unet().parameters()) == record["num_parameters"]["unet"]
    torch.set_num_threads(1)
