"""Quality metrics: the digits-FID, class accuracy and paired MSE, plus thin hooks to the standard FID / CLIP score.

The digits-FID is the Frechet distance between Gaussians fitted to the penultimate features of the testbed's
digits classifier, computed by torchmetrics' `FrechetInceptionDistance` with `DigitsFeatureExtractor` as its
custom feature extractor. It needs neither torch-fidelity nor Inception weights. Its scale is that of the
classifier's features, so it is comparable only between runs that use the same classifier (the shipped one).

Distributed runs: every function here scores exactly the tensors it is given, on the calling process alone (its
torchmetrics object is built with ``sync_on_compute=False``, a process group of one).  torchmetrics' default would
all-gather the metric state across every process of an initialised ``torch.distributed`` group at ``compute()``,
which deadlocks when only the main process scores, and double-counts when every process scores the same images.
To score samples spread over several processes, gather them first (``accelerate.utils.gather_object`` or
``Accelerator.gather_for_metrics``) and call these functions on the gathered tensors.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DigitsFeatureExtractor",
    "class_accuracy",
    "clip_score",
    "digits_fid",
    "fid",
    "paired_mse",
]


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_images(images: torch.Tensor, name: str, min_count: int = 1) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(images).__name__}.")
    if images.dim() != 4:
        raise ValueError(f"`{name}` must have shape (N, C, H, W), got {tuple(images.shape)}.")
    if images.shape[0] < min_count:
        raise ValueError(f"`{name}` must hold at least {min_count} images, got {images.shape[0]}.")
    if images.is_floating_point() and (float(images.min()) < -1e-4 or float(images.max()) > 1 + 1e-4):
        raise ValueError(
            f"`{name}` must be float images in [0, 1], got values in [{float(images.min()):.3f}, "
            f"{float(images.max()):.3f}]. Map [-1, 1] images with `(x + 1) / 2` first."
        )


class DigitsFeatureExtractor(nn.Module):
    """Penultimate features of a digits classifier, as a custom feature extractor for torchmetrics' FID.

    torchmetrics 1.9 hands a custom extractor the images exactly as they were given to `update` (it converts to
    uint8 only for its own Inception network) and reads the feature size from a `num_features` attribute when there
    is one. This module therefore accepts both conventions: uint8 images in `[0, 255]` and float images in
    `[0, 1]`, of shape `(B, 1, H, W)` or `(B, 3, H, W)` (averaged to grey); images not of the classifier's size are
    resized bilinearly. They are mapped to `[-1, 1]` and passed to `classifier.features`.

    The extractor stays in eval mode whatever `train()` is called with, like torchmetrics' own Inception wrapper,
    so that dropout never perturbs the features.

    Args:
        classifier (`nn.Module`):
            A classifier with a `features(x) -> (B, D)` method taking `(B, 1, S, S)` images in `[-1, 1]`, such as
            [DigitsClassifier][diffusers_qalora.testbed.DigitsClassifier].
        image_size (`int`, *optional*, defaults to `16`):
            Side `S` of the classifier's input.
    """

    def __init__(self, classifier: nn.Module, image_size: int = 16) -> None:
        super().__init__()
        if not callable(getattr(classifier, "features", None)):
            raise TypeError(
                f"`classifier` must have a `features(x)` method returning (B, D) features, got "
                f"{type(classifier).__name__}."
            )
        self.classifier = classifier
        self.image_size = int(image_size)
        dim = getattr(classifier, "feature_dim", None)
        if not isinstance(dim, int):
            with torch.no_grad():
                dummy = torch.zeros(1, 1, self.image_size, self.image_size, device=_module_device(classifier))
                dim = int(classifier.features(dummy).shape[-1])
        # torchmetrics sizes its running sums from this attribute instead of running a 299x299 dummy image.
        self.num_features = dim
        self.eval()

    def train(self, mode: bool = True) -> DigitsFeatureExtractor:
        """Keep eval mode: the features must not depend on the metric's training flag."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features `(B, D)` of uint8 `[0, 255]` or float `[0, 1]` images `(B, 1 or 3, H, W)`."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] != 1:
            raise ValueError(f"Images must have 1 or 3 channels, got shape {tuple(images.shape)}.")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = x.to(_module_device(self.classifier)) * 2.0 - 1.0
        with torch.no_grad():
            return self.classifier.features(x)


def digits_fid(
    fake: torch.Tensor,
    real: torch.Tensor,
    classifier: nn.Module,
    batch_size: int = 500,
) -> float:
    """Digits-FID: the Frechet distance between classifier features of generated and real digits.

    `FID = |mu_f - mu_r|^2 + Tr(S_f + S_r - 2 (S_f S_r)^(1/2))` over the classifier's penultimate features,
    computed by `torchmetrics.image.fid.FrechetInceptionDistance` with a `DigitsFeatureExtractor`.

    Args:
        fake (`torch.Tensor`):
            `(N, 1, 16, 16)` generated images in `[0, 1]`.
        real (`torch.Tensor`):
            `(M, 1, 16, 16)` real images in `[0, 1]` (the testbed's `reference_images`).
        classifier (`nn.Module`):
            The digits classifier (e.g. `load_testbed().classifier`).
        batch_size (`int`, *optional*, defaults to `500`):
            Images per feature-extraction batch.

    Returns:
        `float`: the digits-FID (lower is better; `0` for identical feature statistics).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    # Two images at least: the covariance of a single feature vector is undefined.
    _check_images(fake, "fake", min_count=2)
    _check_images(real, "real", min_count=2)
    was_training = classifier.training
    metric = FrechetInceptionDistance(feature=DigitsFeatureExtractor(classifier), normalize=True, sync_on_compute=False)
    try:
        for images, is_real in ((real, True), (fake, False)):
            for chunk in images.split(batch_size):
                metric.update(chunk.float(), real=is_real)
        value = float(metric.compute())
    finally:
        classifier.train(was_training)
    return value


@torch.no_grad()
def class_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    classifier: nn.Module,
    batch_size: int = 500,
) -> float:
    """Share of images that the classifier assigns to their conditioning label.

    Args:
        images (`torch.Tensor`):
            `(N, 1, 16, 16)` images in `[0, 1]`.
        labels (`torch.Tensor` or `Sequence[int]`):
            `(N,)` intended class of each image.
        classifier (`nn.Module`):
            A classifier taking `[-1, 1]` images and returning logits.
        batch_size (`int`, *optional*, defaults to `500`):
            Images per batch.

    Returns:
        `float`: accuracy in `[0, 1]`.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    _check_images(images, "images")
    if labels.numel() != images.shape[0]:
        raise ValueError(f"`labels` must hold one label per image ({images.shape[0]}), got {labels.numel()}.")
    was_training = classifier.training
    classifier.eval()
    device = _module_device(classifier)
    try:
        predictions = torch.cat(
            [classifier(chunk.float().to(device) * 2.0 - 1.0).argmax(dim=1).cpu() for chunk in images.split(batch_size)]
        )
    finally:
        classifier.train(was_training)
    return float((predictions == labels.cpu()).double().mean())


def paired_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between two batches of images sampled from the same noise and labels.

    Sampled with [sample_class_conditional][diffusers_qalora.evaluation.sample_class_conditional] and the same seed, image `i` of a
    quantized model is compared with image `i` of the full-precision model; this separates methods far more sharply
    than FID at a few hundred samples.

    Args:
        a (`torch.Tensor`): images of any shape.
        b (`torch.Tensor`): images of the same shape as `a`.

    Returns:
        `float`: `mean((a - b) ** 2)`, accumulated in float64.
    """
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return float((a.detach().double().cpu() - b.detach().double().cpu()).pow(2).mean())


def _require(module: str, install: str, purpose: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{purpose} needs the `{module}` package, which is not installed: `{install}`.") from err


def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    _check_images(images, "images")
    x = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x


def fid(
    fake: torch.Tensor,
    real: torch.Tensor,
    feature: int = 2048,
    feature_extractor_weights_path: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> float:
    """Standard (Inception-v3) FID through torchmetrics, for real models whose users have the weights.

    Needs `torch-fidelity` and the Inception weights: torch-fidelity downloads them on first use unless
    `feature_extractor_weights_path` points to a local copy (`pt_inception-2015-12-05-6726825d.pth`).

    Args:
        fake (`torch.Tensor`): `(N, C, H, W)` generated images, float in `[0, 1]` or uint8; 1 channel is repeated.
        real (`torch.Tensor`): `(M, C, H, W)` real images, same conventions.
        feature (`int`, *optional*, defaults to `2048`): Inception feature layer (64, 192, 768 or 2048).
        feature_extractor_weights_path (`str`, *optional*): local Inception weights.
        batch_size (`int`, *optional*, defaults to `64`): images per batch.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the Inception network runs.

    Returns:
        `float`: the FID.

    Raises:
        ImportError: torch-fidelity is not installed.
        RuntimeError: the Inception weights could not be loaded (no network and no local copy).
    """
    _require("torch_fidelity", "pip install torch-fidelity  # or: pip install 'torchmetrics[image]'", "`fid`")
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake_u8, real_u8 = _to_uint8_rgb(fake), _to_uint8_rgb(real)
    try:
        metric = FrechetInceptionDistance(
            feature=feature,
            normalize=False,
            feature_extractor_weights_path=feature_extractor_weights_path,
            sync_on_compute=False,
        ).to(device)
    except (OSError, RuntimeError, ValueError) as err:
        raise RuntimeError(
            "Could not load the Inception-v3 weights for `fid`. Download `pt_inception-2015-12-05-6726825d.pth` "
            "(https://github.com/toshas/torch-fidelity/releases) on a machine with network access and pass its "
            "path as `feature_extractor_weights_path`."
        ) from err
    for images, is_real in ((real_u8, True), (fake_u8, False)):
        for chunk in images.split(batch_size):
            metric.update(chunk.to(device), real=is_real)
    return float(metric.compute())


def clip_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    model_name_or_path: str = "openai/clip-vit-base-patch16",
    local_files_only: bool = False,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> float:
    """CLIP score of images against their prompts through torchmetrics' `CLIPScore`, for text-to-image models.

    Args:
        images (`torch.Tensor`): `(N, C, H, W)` images, float in `[0, 1]` or uint8; 1 channel is repeated.
        prompts (`Sequence[str]`): one prompt per image.
        model_name_or_path (`str`, *optional*, defaults to `"openai/clip-vit-base-patch16"`):
            Hub id or local directory of a `transformers` CLIP model and processor.
        local_files_only (`bool`, *optional*, defaults to `False`):
            Never touch the network; the model must be in the local cache or directory.
        batch_size (`int`, *optional*, defaults to `32`): images per batch.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where CLIP runs.

    Returns:
        `float`: the mean CLIP score (`100 * cosine similarity`, floored at 0).

    Raises:
        ImportError: `transformers` (or torchmetrics' multimodal part) is not installed.
        RuntimeError: the CLIP model could not be loaded.
    """
    _require("transformers", "pip install transformers  # or: pip install 'torchmetrics[multimodal]'", "`clip_score`")
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as err:
        raise ImportError(
            "`clip_score` needs torchmetrics' multimodal metrics: `pip install 'torchmetrics[multimodal]'`."
        ) from err
    prompts = list(prompts)
    images_u8 = _to_uint8_rgb(images)
    if len(prompts) != images_u8.shape[0]:
        raise ValueError(f"`prompts` must hold one prompt per image ({images_u8.shape[0]}), got {len(prompts)}.")

    def _load():
        # A callable lets local directories through: torchmetrics only accepts a fixed list of Hub ids by name.
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(model_name_or_path, local_files_only=local_files_only)
        processor = CLIPProcessor.from_pretrained(model_name_or_path, local_files_only=local_files_only)
        return model, processor

    try:
        metric = CLIPScore(model_name_or_path=_load, sync_on_compute=False).to(device)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"Could not load the CLIP model {model_name_or_path!r} for `clip_score`. Download it on a machine with "
            f"network access (`huggingface-cli download {model_name_or_path}`) or pass a local directory."
        ) from err
    for start in range(0, len(prompts), batch_size):
        metric.update(images_u8[start : start + batch_size].to(device), prompts[start : start + batch_size])
    return float(metric.compute())
