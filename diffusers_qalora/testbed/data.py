"""The digits data set of the embedded default model.

scikit-learn ships the UCI optical digits (1797 images of 8x8 pixels, values 0..16) inside its wheel, so the data
set needs no download. The images are upsampled to 16x16 with bilinear interpolation so that the UNet has three
resolution levels (16, 8, 4) and an attention block at a level that is not trivially small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "HELDOUT_SIZE",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "DigitsSplit",
    "load_digits_16x16",
    "load_digits_split",
    "to_model_range",
    "to_unit_range",
]

IMAGE_SIZE = 16
NUM_CLASSES = 10
DEFAULT_SPLIT_SEED = 0
# 1797 images in all: 500 held out (stratified) leaves 1297 for training the DDPM and the classifier.
HELDOUT_SIZE = 500


@dataclass(frozen=True)
class DigitsSplit:
    """A seeded, stratified train / held-out split of the 16x16 digits.

    Args:
        train_images (`torch.Tensor`):
            `(N_train, 1, 16, 16)` float32 images in `[0, 1]`.
        train_labels (`torch.Tensor`):
            `(N_train,)` int64 class labels in `0..9`.
        heldout_images (`torch.Tensor`):
            `(N_heldout, 1, 16, 16)` float32 images in `[0, 1]`; never seen by any training in the recipe.
        heldout_labels (`torch.Tensor`):
            `(N_heldout,)` int64 class labels in `0..9`.
        seed (`int`):
            The seed of the split.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    seed: int


def load_digits_16x16() -> tuple[torch.Tensor, torch.Tensor]:
    """Load all 1797 scikit-learn digits, upsampled to 16x16.

    The 8x8 images (values `0..16`) are divided by 16 and upsampled with bilinear interpolation
    (`align_corners=False`), which keeps them in `[0, 1]`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: images `(1797, 1, 16, 16)` float32 in `[0, 1]` and labels `(1797,)`
        int64.
    """
    # Imported here so that importing the package does not pay for scikit-learn.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    # Bilinear interpolation of values in [0, 1] stays in [0, 1] up to rounding; clamp makes that exact.
    images = images.clamp_(0.0, 1.0).contiguous()
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return images, labels


def load_digits_split(seed: int = DEFAULT_SPLIT_SEED, heldout_size: int = HELDOUT_SIZE) -> DigitsSplit:
    """Split the 16x16 digits into a train and a held-out part, stratified by class.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Seed of `sklearn.model_selection.train_test_split`. The shipped testbed records the seed it used in
            `testbed.json`.
        heldout_size (`int`, *optional*, defaults to `500`):
            Number of held-out images.

    Returns:
        [DigitsSplit][diffusers_qalora.testbed.DigitsSplit]: the split; both parts are in `[0, 1]`.
    """
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_16x16()
    if not 10 <= heldout_size <= len(labels) - 10:
        raise ValueError(f"`heldout_size` must be between 10 and {len(labels) - 10}, got {heldout_size!r}.")
    index = np.arange(len(labels))
    train_idx, heldout_idx = train_test_split(
        index, test_size=heldout_size, random_state=seed, shuffle=True, stratify=labels.numpy()
    )
    # Sorted indices make the split independent of scikit-learn's internal shuffling order.
    train_idx = torch.from_numpy(np.sort(train_idx))
    heldout_idx = torch.from_numpy(np.sort(heldout_idx))
    return DigitsSplit(
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        heldout_images=images[heldout_idx],
        heldout_labels=labels[heldout_idx],
        seed=seed,
    )


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map images from `[0, 1]` to the `[-1, 1]` range the UNet and the classifier work in."""
    return images * 2.0 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map images from `[-1, 1]` to `[0, 1]`, clamping values outside."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)
