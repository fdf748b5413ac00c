"""Tiny diffusers denoisers and a tiny Stable Diffusion pipeline, all built from configs (no download).

A module with a unique name (not ``conftest``): test modules import it directly, which a ``from conftest import``
cannot do safely when pytest collects several test folders that each have a ``conftest.py``.

Each factory seeds torch before building, so two calls with the same seed give bit-identical weights (what the
save/load round-trip tests need).  ``MODEL_KINDS`` maps a kind name to a ``Case`` holding the factory, an input
factory and the timestep table that suits the model (Flux receives timesteps in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


# -- denoisers ------------------------------------------------------------------------------------------------------
def make_unet2d(seed: int = 0, block_out_channels: tuple[int, ...] = (16, 32), norm_num_groups: int = 8):
    """Class-conditional ``UNet2DModel`` (10 classes, one attention block), 1 x 16 x 16 like the testbed."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
        norm_num_groups=norm_num_groups,
        attention_head_dim=8,
    ).eval()


def make_sd15_unet(seed: int = 0):
    """SD1.5-like ``UNet2DConditionModel``: cross-attention blocks, ``cross_attention_dim=32``, 4 latent channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


SDXL_TIME_DIM = 4
SDXL_POOLED_DIM = 16


def make_sdxl_unet(seed: int = 0):
    """SDXL-like ``UNet2DConditionModel``: ``addition_embed_type="text_time"``, linear projections, and
    ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + pooled text dim``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(4, 8),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_POOLED_DIM,
    ).eval()


def make_sd3(seed: int = 0):
    """``SD3Transformer2DModel`` with one joint block."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    ).eval()


def make_flux(seed: int = 0):
    """``FluxTransformer2DModel`` with one double and one single block; its timestep argument lies in [0, 1]."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).eval()


# -- inputs ---------------------------------------------------------------------------------------------------------
def unet2d_inputs(timestep, batch: int = 2, seed: int = 1, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": scale * torch.randn(batch, 1, 16, 16, generator=g),
        "timestep": _timesteps(timestep, batch),
        "class_labels": torch.arange(batch) % 10,
    }


def sd15_inputs(timestep, batch: int = 2, seed: int = 1, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": scale * torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": _timesteps(timestep, batch),
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
    }


def sdxl_inputs(timestep, batch: int = 2, seed: int = 1, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": scale * torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": _timesteps(timestep, batch),
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, SDXL_POOLED_DIM, generator=g),
            "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).repeat(batch, 1),
        },
    }


def sd3_inputs(timestep, batch: int = 2, seed: int = 1, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": scale * torch.randn(batch, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "timestep": _timesteps(timestep, batch),
    }


def flux_inputs(timestep, batch: int = 2, seed: int = 1, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h = w = 4
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1
    )
    return {
        "hidden_states": scale * torch.randn(batch, h * w, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 3, 16, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "timestep": _timesteps(timestep, batch),
        "img_ids": img_ids.reshape(-1, 3).float(),
        "txt_ids": torch.zeros(3, 3),
    }


def _timesteps(timestep, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
    return t.expand(batch).clone() if t.numel() == 1 else t


@dataclass(frozen=True)
class Case:
    """One model kind: how to build it, how to feed it, and a timestep table in its own units."""

    name: str
    build: Callable
    inputs: Callable
    timesteps: tuple[float, ...]

    @property
    def t_lo(self) -> float:
        return self.timesteps[0]

    @property
    def t_hi(self) -> float:
        return self.timesteps[-1]


MODEL_KINDS = {
    "unet2d": Case("unet2d", make_unet2d, unet2d_inputs, (0.0, 250.0, 500.0, 999.0)),
    "sd15": Case("sd15", make_sd15_unet, sd15_inputs, (0.0, 250.0, 500.0, 999.0)),
    "sdxl": Case("sdxl", make_sdxl_unet, sdxl_inputs, (0.0, 250.0, 500.0, 999.0)),
    "sd3": Case("sd3", make_sd3, sd3_inputs, (0.0, 250.0, 500.0, 999.0)),
    "flux": Case("flux", make_flux, flux_inputs, (0.0, 0.25, 0.5, 1.0)),
}


def output_of(out) -> torch.Tensor:
    """The tensor of a diffusers model output (``.sample``) or a plain tensor."""
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


# -- tiny Stable Diffusion pipeline -----------------------------------------------------------------------------------
def make_tiny_tokenizer():
    """A ``CLIPTokenizer`` over a byte-level vocabulary (each byte, alone or ending a word) with no merges: every
    prompt tokenizes, and nothing is downloaded."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def make_tiny_sd_pipeline(seed: int = 0):
    """``StableDiffusionPipeline`` with a tiny UNet, VAE, CLIP text encoder, a local tokenizer and DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    unet = make_sd15_unet(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=32,
        )
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sdxl_pipeline(seed: int = 0):
    """``StableDiffusionXLPipeline`` with the SDXL-like tiny UNet, two tiny CLIP text encoders (hidden 16 + 16 =
    the UNet's cross-attention dim; the second projects to the pooled dim), a local tokenizer and DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_tiny_tokenizer()
    unet = make_sdxl_unet(seed)

    def text_config(projection_dim: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=projection_dim,
        )

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()
    text_encoder = CLIPTextModel(text_config(16)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_config(SDXL_POOLED_DIM)).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
