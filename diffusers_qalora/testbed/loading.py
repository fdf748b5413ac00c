"""Offline loading of the embedded default model shipped in `diffusers_qalora/testbed/weights/`."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from .data import DigitsSplit, load_digits_split
from .dit import ClassConditionalTransformer
from .models import DigitsClassifier, build_ddim_scheduler
from .pipeline import ClassConditionalDDIMPipeline

__all__ = [
    "TESTBED_MODELS",
    "WEIGHTS_DIR",
    "Testbed",
    "load_testbed",
    "read_dit_config",
    "read_testbed_config",
    "sha256_file",
    "verify_weights",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_CONFIG_NAME = "testbed.json"
_DIT_CONFIG_NAME = "dit.json"
# The embedded denoisers `load_testbed(model=...)` can load.
TESTBED_MODELS = ("unet", "dit")


@dataclass
class Testbed:
    """The embedded default model, ready to sample and to score.

    Args:
        pipeline ([`ClassConditionalDDIMPipeline`]): the denoiser with a `DDIMScheduler` built from the training
            config.
        unet (`UNet2DModel` or [`ClassConditionalTransformer`]): the class-conditional denoiser (eval mode, float32);
            the same object as `pipeline.unet`. With `model="dit"` it is the embedded DiT: the attribute keeps its
            name so that code written for the UNet runs on either (both are called `unet(x, t, class_labels=y)`).
        classifier ([`DigitsClassifier`]): the digits classifier (eval mode), the same for both denoisers.
        reference_images (`torch.Tensor`): held-out real digits `(500, 1, 16, 16)` in `[0, 1]`, never trained on.
        reference_labels (`torch.Tensor`): their labels `(500,)`.
        config (`dict`): the denoiser's record: `testbed.json` for the UNet, `dit.json` for the DiT.
        weights_dir (`pathlib.Path`): the folder the weights were loaded from.
        split ([`DigitsSplit`]): the whole train / held-out split (`reference_*` is its held-out part).
        model_name (`str`): `"unet"` or `"dit"`.
    """

    pipeline: ClassConditionalDDIMPipeline
    unet: UNet2DModel | ClassConditionalTransformer
    classifier: DigitsClassifier
    reference_images: torch.Tensor
    reference_labels: torch.Tensor
    config: dict[str, Any]
    weights_dir: Path
    split: DigitsSplit
    model_name: str = "unet"

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real digits the models were trained on: images `(1297, 1, 16, 16)` in `[0, 1]` and labels `(1297,)`."""
        return self.split.train_images, self.split.train_labels

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The training noise-schedule configuration (for building other schedulers of the same family)."""
        return dict(self.config["scheduler_config"])


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_record(weights_dir: str | os.PathLike | None, name: str, what: str, recipe: str) -> dict[str, Any]:
    path = Path(weights_dir if weights_dir is not None else WEIGHTS_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"No {what} at {path}. Train it with `python -m diffusers_qalora.testbed.{recipe} --out <folder>` or "
            "reinstall the package."
        )
    with open(path) as f:
        return json.load(f)


def read_testbed_config(weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read `testbed.json` of a weights folder (the shipped one by default)."""
    return _read_record(weights_dir, _CONFIG_NAME, "testbed configuration", "recipe")


def read_dit_config(weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read `dit.json`, the embedded DiT's record, of a weights folder (the shipped one by default)."""
    return _read_record(weights_dir, _DIT_CONFIG_NAME, "embedded-DiT record", "dit_recipe")


def verify_weights(weights_dir: str | os.PathLike | None = None, config: dict[str, Any] | None = None) -> None:
    """Check the sha256 of every weight file listed in `testbed.json` (or in the record given as `config`).

    Raises:
        FileNotFoundError: a listed file is missing.
        ValueError: a file's sha256 differs from the recorded one (the message names the file).
    """
    weights_dir = Path(weights_dir if weights_dir is not None else WEIGHTS_DIR)
    config = config if config is not None else read_testbed_config(weights_dir)
    for component, entry in config["files"].items():
        path = weights_dir / entry["name"]
        if not path.is_file():
            raise FileNotFoundError(f"Testbed weight file for `{component}` is missing: {path}.")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ValueError(
                f"Testbed weight file {path} is corrupted or was modified: its sha256 is {actual}, but "
                f"testbed.json records {entry['sha256']}. Restore the file (reinstall the package) or retrain with "
                "`python -m diffusers_qalora.testbed.recipe`."
            )


def _load_state(path: Path, component: str, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("component") != component or metadata.get("recipe_version") != config["recipe_version"]:
        raise ValueError(
            f"{path} holds component {metadata.get('component')!r} of recipe version "
            f"{metadata.get('recipe_version')!r}, but its record expects {component!r} of version "
            f"{config['recipe_version']!r}."
        )
    # safetensors never unpickles: loading untrusted weights cannot run code.
    return load_file(str(path))


def load_testbed(
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike | None = None,
    verify: bool = True,
    model: str = "unet",
) -> Testbed:
    """Load the embedded default model offline: denoiser, DDIM pipeline, classifier and the held-out reference digits.

    Args:
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the models go.
        weights_dir (`str` or `os.PathLike`, *optional*):
            Folder with `testbed.json` (and `dit.json` for the DiT) and the safetensors files; defaults to the
            weights shipped in the package.
        verify (`bool`, *optional*, defaults to `True`): check the sha256 of the weight files first.
        model (`str`, *optional*, defaults to `"unet"`): which denoiser: `"unet"` (the class-conditional
            `UNet2DModel`) or `"dit"` (the class-conditional SD3-style transformer,
            [`ClassConditionalTransformer`]). Both share the classifier, the split and the noise schedule.

    Returns:
        [Testbed][diffusers_qalora.testbed.Testbed]: models in eval mode, in float32.

    Raises:
        ValueError: a weight file does not match its recorded sha256 (the message names the file).

    Example:

    ```py
    >>> import torch
    >>> from diffusers_qalora.testbed import load_testbed

    >>> tb = load_testbed()
    >>> images = tb.pipeline([3, 1, 4], generator=torch.Generator().manual_seed(0)).images  # (3, 1, 16, 16)
    ```
    """
    if model not in TESTBED_MODELS:
        raise ValueError(f"`model` must be one of {TESTBED_MODELS}, got {model!r}.")
    weights_dir = Path(weights_dir if weights_dir is not None else WEIGHTS_DIR)
    config = read_testbed_config(weights_dir)
    if verify:
        verify_weights(weights_dir, config)

    if model == "unet":
        unet = UNet2DModel.from_config(config["unet_config"])
        unet.load_state_dict(_load_state(weights_dir / config["files"]["unet"]["name"], "unet", config), strict=True)
        model_config = config
    else:
        model_config = read_dit_config(weights_dir)
        if verify:
            verify_weights(weights_dir, model_config)
        if model_config["split"]["seed"] != config["split"]["seed"]:
            raise ValueError(
                f"{weights_dir / _DIT_CONFIG_NAME} was trained on split seed {model_config['split']['seed']}, but "
                f"the classifier of testbed.json on split seed {config['split']['seed']}: retrain the DiT with "
                f"`--split-seed {config['split']['seed']}`."
            )
        unet = ClassConditionalTransformer.from_config(model_config["dit_config"])
        state = _load_state(weights_dir / model_config["files"]["dit"]["name"], "dit", model_config)
        unet.load_state_dict(state, strict=True)
    unet = unet.to(device).eval()

    classifier = DigitsClassifier(**config["classifier_config"])
    classifier.load_state_dict(
        _load_state(weights_dir / config["files"]["classifier"]["name"], "classifier", config), strict=True
    )
    classifier = classifier.to(device).eval().requires_grad_(False)

    scheduler: DDIMScheduler = build_ddim_scheduler(model_config["scheduler_config"])
    pipeline = ClassConditionalDDIMPipeline(unet=unet, scheduler=scheduler)
    split = load_digits_split(config["split"]["seed"], heldout_size=config["split"]["heldout_size"])
    return Testbed(
        pipeline=pipeline,
        unet=unet,
        classifier=classifier,
        reference_images=split.heldout_images,
        reference_labels=split.heldout_labels,
        config=model_config,
        weights_dir=weights_dir,
        split=split,
        model_name=model,
    )
