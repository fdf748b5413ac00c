"""Shared set-up for the Winograd tests: one CPU thread (the build machines are shared) and a tiny UNet."""

import pytest
import torch

torch.set_num_threads(1)


def make_tiny_unet(seed: int = 0):
    """Class-conditional ``UNet2DModel`` (1 x 16 x 16, 10 classes, one attention block), like the testbed but tiny."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet


def unet_inputs(batch: int = 3, seed: int = 1, timestep: int = 500):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 16, 16, generator=gen)
    return x, torch.tensor(timestep), torch.arange(batch) % 10
