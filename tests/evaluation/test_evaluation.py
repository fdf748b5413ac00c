"""Tests of the evaluation module: paired sampling, digits-FID, accuracy, paired MSE, plots, optional hooks."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from diffusers_qalora.evaluation import (
    DigitsFeatureExtractor,
    balanced_labels,
    class_accuracy,
    clip_score,
    digits_fid,
    fid,
    make_image_grid,
    paired_mse,
    plot_step_sizes,
    sample_class_conditional,
    save_image_grid,
)
from diffusers_qalora.testbed import ClassConditionalDDIMPipeline, build_ddim_scheduler, load_testbed

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two feature sets, straight from the definition (scipy's matrix square root)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


# --- metrics ---------------------------------------------------------------------------------------------------


def test_fid_of_real_digits_is_far_below_fid_of_noise(testbed):
    train_images, _ = testbed.train_data()
    real_vs_real = digits_fid(train_images, testbed.reference_images, testbed.classifier)
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    noise_vs_real = digits_fid(noise, testbed.reference_images, testbed.classifier)
    assert real_vs_real < 0.1 * noise_vs_real
    # Identical sets have identical feature statistics.
    assert abs(digits_fid(testbed.reference_images, testbed.reference_images, testbed.classifier)) < 1e-3


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU features make the covariances singular
def test_digits_fid_matches_the_definition(testbed):
    train_images, _ = testbed.train_data()
    fake, real = train_images[:600], testbed.reference_images
    with torch.no_grad():
        f_fake = testbed.classifier.features(fake * 2 - 1).double().numpy()
        f_real = testbed.classifier.features(real * 2 - 1).double().numpy()
    expected = _reference_fid(f_fake, f_real)
    assert digits_fid(fake, real, testbed.classifier) == pytest.approx(expected, rel=1e-3)


def test_feature_extractor_accepts_torchmetrics_conventions(testbed):
    extractor = DigitsFeatureExtractor(testbed.classifier)
    assert extractor.num_features == testbed.classifier.feature_dim
    images = testbed.reference_images[:8]
    as_float = extractor(images)
    as_uint8 = extractor((images * 255).round().to(torch.uint8))
    as_rgb = extractor(images.repeat(1, 3, 1, 1))
    assert as_float.shape == (8, testbed.classifier.feature_dim)
    torch.testing.assert_close(as_uint8, as_float, atol=0.05, rtol=0.02)
    torch.testing.assert_close(as_rgb, as_float)
    extractor.train()
    assert not extractor.training and not testbed.classifier.training


def test_class_accuracy(testbed):
    images, labels = testbed.reference_images, testbed.reference_labels
    assert class_accuracy(images, labels, testbed.classifier) >= 0.97
    wrong = (labels + 1) % 10
    assert class_accuracy(images, wrong, testbed.classifier) < 0.05
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(images, labels[:-1], testbed.classifier)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_accuracy(images * 2 - 1, labels, testbed.classifier)


def test_paired_mse():
    a = torch.zeros(4, 1, 2, 2)
    b = torch.full((4, 1, 2, 2), 0.5)
    assert paired_mse(a, b) == pytest.approx(0.25)
    assert paired_mse(a, a) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        paired_mse(a, b[:3])


def test_optional_metrics_explain_what_to_install(monkeypatch):
    images = torch.rand(4, 1, 16, 16)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        fid(images, images)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        clip_score(images, ["a digit"] * 4)


# --- sampling --------------------------------------------------------------------------------------------------


def test_balanced_labels():
    labels = balanced_labels(1000, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    assert not torch.equal(labels, torch.arange(1000) % 10)
    uneven = torch.bincount(balanced_labels(23), minlength=10)
    assert uneven.max() - uneven.min() <= 1 and uneven.sum() == 23


def test_sample_class_conditional_is_seeded_and_paired(testbed):
    kwargs = {"num_inference_steps": 3, "show_progress": False}
    a, la = sample_class_conditional(testbed.pipeline, 20, seed=0, batch_size=20, **kwargs)
    b, lb = sample_class_conditional(testbed.pipeline, 20, seed=0, batch_size=7, **kwargs)
    c, lc = sample_class_conditional(testbed.pipeline, 20, seed=1, batch_size=20, **kwargs)
    assert a.shape == (20, 1, 16, 16) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.bincount(la, minlength=10).tolist() == [2] * 10
    # Same seed: same labels and the same images whatever the batch size, up to the float rounding of the
    # convolutions (oneDNN picks kernels by batch size).
    assert torch.equal(la, lb)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    assert not torch.equal(la, lc)
    assert (a - c).abs().max() > 0.1


def test_two_models_get_the_same_noise_and_labels(testbed):
    """The paired comparison: a second model sampled with the same seed starts from the same noise."""
    other_unet = type(testbed.unet).from_config(testbed.unet.config)
    other = ClassConditionalDDIMPipeline(unet=other_unet, scheduler=build_ddim_scheduler(testbed.scheduler_config))
    first_inputs = {}

    def recorder(name):
        def hook(module, args, kwargs):
            first_inputs.setdefault(name, (args[0].clone(), kwargs["class_labels"].clone()))

        return hook

    handles = [
        testbed.unet.register_forward_pre_hook(recorder("fp"), with_kwargs=True),
        other_unet.register_forward_pre_hook(recorder("other"), with_kwargs=True),
    ]
    try:
        sample_class_conditional(testbed.pipeline, 10, seed=4, num_inference_steps=2, show_progress=False)
        sample_class_conditional(other, 10, seed=4, num_inference_steps=2, show_progress=False)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(first_inputs["fp"][0], first_inputs["other"][0], atol=0, rtol=0)
    assert torch.equal(first_inputs["fp"][1], first_inputs["other"][1])


def test_sample_class_conditional_uses_given_labels(testbed):
    labels = [7] * 5
    images, out_labels = sample_class_conditional(
        testbed.pipeline, 5, seed=0, num_inference_steps=2, labels=labels, show_progress=False
    )
    assert out_labels.tolist() == labels and images.shape[0] == 5
    with pytest.raises(ValueError, match="labels"):
        sample_class_conditional(testbed.pipeline, 6, seed=0, labels=labels, show_progress=False)


# --- plots -----------------------------------------------------------------------------------------------------


def test_save_image_grid(tmp_path):
    images = torch.rand(23, 1, 16, 16)
    path = save_image_grid(images, tmp_path / "grid.png", nrow=10, scale=2)
    with Image.open(path) as image:
        assert image.size == ((10 * 17 + 1) * 2, (3 * 17 + 1) * 2)
    grid = make_image_grid(images, nrow=10, padding=1)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 17 + 1, 10 * 17 + 1)
    # The first image sits right after the one-pixel border, unchanged up to rounding.
    np.testing.assert_array_equal(grid[1:17, 1:17], (images[0, 0] * 255).round().to(torch.uint8).numpy())


def test_plot_step_sizes(tmp_path):
    table = {
        "down_blocks.1.attentions.0.to_q": ([999, 500, 0], [0.1, 0.05, 0.02]),
        "conv_out": ([0, 999], [0.3, 0.4]),
    }
    path = plot_step_sizes(table, tmp_path / "steps.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    with pytest.raises(ValueError, match="conv_out"):
        plot_step_sizes({"conv_out": ([0, 1], [0.1])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        plot_step_sizes({}, tmp_path / "empty.png")


def test_results_markdown_shows_a_spread_only_over_several_seeds():
    from diffusers_qalora.evaluation.report import results_markdown

    row = {
        "method": "m",
        "fid_mean": 30.0,
        "fid_std": 0.0,
        "accuracy_mean": 0.99,
        "accuracy_std": 0.0,
        "x0_mse_mean": 0.002,
        "x0_mse_std": 0.0,
    }
    one = results_markdown([{**row, "per_seed": [{}]}], "t", "cmd")
    assert "| 30.00 | — | 99.0 | 0.00200 |" in one and "±" not in one
    three = results_markdown([{**row, "fid_std": 4.5, "per_seed": [{}, {}, {}]}], "t", "cmd")
    assert "30.00 ± 4.50" in three


def test_fid_ratio_to_fp_is_taken_per_seed():
    from diffusers_qalora.evaluation.report import fid_ratio_to_fp, results_markdown

    def row(method, fids, seeds=(0, 1)):
        return {
            "method": method,
            "fid_mean": sum(fids) / len(fids),
            "fid_std": 1.0,
            "accuracy_mean": 0.99,
            "accuracy_std": 0.0,
            "per_seed": [{"seed": s, "fid": f} for s, f in zip(seeds, fids)],
        }

    fp, quant = row("FP", [10.0, 30.0]), row("q", [20.0, 30.0])
    mean, std = fid_ratio_to_fp(quant, fp)
    # per seed 2.0 and 1.0, not the ratio of the means (50 / 40 = 1.25)
    assert mean == pytest.approx(1.5) and std == pytest.approx(0.5**0.5)
    assert fid_ratio_to_fp(row("q", [20.0, 30.0], seeds=(0, 2)), fp) is None  # other seeds: no pairing
    assert fid_ratio_to_fp(row("q", [20.0], seeds=(0,)), row("FP", [10.0], seeds=(0,))) == (2.0, None)
    table = results_markdown([fp, quant], "t", "cmd")
    assert "| FP | fp32 | 20.00 ± 1.00 | 1.000 ± 0.000 |" in table
    assert "| q | fp32 | 25.00 ± 1.00 | 1.500 ± 0.707 |" in table
