"""The tiny UNet of the Winograd tests (narrower than ``tiny_models.make_unet2d``, so that tuning stays quick) and
its inputs.  A module with a unique name: ``from conftest import`` picks whichever ``conftest`` pytest loaded first."""

import torch
from tiny_models import make_unet2d


def make_tiny_unet(seed: int = 0):
    """Class-conditional ``UNet2DModel`` (1 x 16 x 16, 10 classes, one attention block), channels 8 and 16."""
    return make_unet2d(seed, block_out_channels=(8, 16), norm_num_groups=4)


def unet_inputs(batch: int = 3, seed: int = 1, timestep: int = 500):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 16, 16, generator=gen)
    return x, torch.tensor(timestep), torch.arange(batch) % 10
