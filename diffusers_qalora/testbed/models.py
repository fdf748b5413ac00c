"""Architectures of the embedded default model: the class-conditional UNet and the digits classifier."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES

__all__ = [
    "DEFAULT_CLASSIFIER_CONFIG",
    "DEFAULT_SCHEDULER_CONFIG",
    "DEFAULT_UNET_CONFIG",
    "DigitsClassifier",
    "build_ddim_scheduler",
    "build_ddpm_scheduler",
    "build_unet",
]

# About 1.11M parameters. Three resolution levels (16x16, 8x8, 4x4) with one ResNet per level; self-attention at
# 8x8 (AttnDownBlock2D / AttnUpBlock2D) and in the 4x4 mid block, so the quantization work sees real attention.
# `norm_num_groups=16` because 32 groups of a 32-channel level would be groups of a single channel.
DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "num_class_embeds": NUM_CLASSES,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "attention_head_dim": 32,
}

# Cosine ("squaredcos_cap_v2") betas: with the linear schedule a 16x16 image is pure noise well before t=1000, so a
# large share of the steps would be wasted; the cosine schedule destroys information more evenly. "trailing"
# spacing makes a 20-step DDIM schedule start at t=999 (pure noise), which is where sampling starts.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
}

DEFAULT_CLASSIFIER_CONFIG: dict[str, Any] = {"channels": [32, 64], "feature_dim": 128, "num_classes": NUM_CLASSES}


def build_unet(config: dict[str, Any] | None = None) -> UNet2DModel:
    """Build the (untrained) class-conditional UNet of the testbed.

    Args:
        config (`dict`, *optional*):
            Keyword arguments of `diffusers.UNet2DModel`; defaults to `DEFAULT_UNET_CONFIG`.

    Returns:
        `diffusers.UNet2DModel`: a float32 model with randomly initialised weights.
    """
    return UNet2DModel(**dict(config if config is not None else DEFAULT_UNET_CONFIG))


def build_ddpm_scheduler(config: dict[str, Any] | None = None) -> DDPMScheduler:
    """Build the training noise schedule (`DDPMScheduler`, 1000 steps, epsilon prediction, cosine betas)."""
    return DDPMScheduler(**dict(config if config is not None else DEFAULT_SCHEDULER_CONFIG))


def build_ddim_scheduler(config: dict[str, Any] | None = None) -> DDIMScheduler:
    """Build the sampling scheduler: a `DDIMScheduler` from the same configuration as the training schedule."""
    return DDIMScheduler.from_config(build_ddpm_scheduler(config).config)


class DigitsClassifier(nn.Module):
    """A small CNN for the 16x16 digits, whose penultimate features drive the digits-FID.

    Two stages of two 3x3 convolutions (ReLU) and a 2x2 max-pool take `(B, 1, 16, 16)` to `(B, C, 4, 4)`; a
    linear layer with ReLU gives the `feature_dim` features, and a last linear layer gives the logits.

    Args:
        channels (`list[int]`, *optional*, defaults to `[32, 64]`):
            Channels of the two convolution stages.
        feature_dim (`int`, *optional*, defaults to `128`):
            Size `D` of the penultimate features returned by `DigitsClassifier.features`.
        num_classes (`int`, *optional*, defaults to `10`):
            Number of classes.
        dropout (`float`, *optional*, defaults to `0.2`):
            Dropout on the features during training only; it is not part of the saved configuration because it
            has no parameters.
    """

    def __init__(
        self,
        channels: list[int] | tuple[int, int] = (32, 64),
        feature_dim: int = 128,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(channels) != 2:
            raise ValueError(f"`channels` must hold the channels of the two stages, got {channels!r}.")
        c1, c2 = (int(c) for c in channels)
        self.config = {"channels": [c1, c2], "feature_dim": int(feature_dim), "num_classes": int(num_classes)}
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (IMAGE_SIZE // 4) ** 2, feature_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        """Size `D` of the penultimate features."""
        return self.config["feature_dim"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features.

        Args:
            x (`torch.Tensor`): `(B, 1, 16, 16)` images in `[-1, 1]`.

        Returns:
            `torch.Tensor`: `(B, D)` non-negative features (after the ReLU).
        """
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits `(B, num_classes)` of `(B, 1, 16, 16)` images in `[-1, 1]`."""
        return self.head(self.dropout(self.features(x)))
