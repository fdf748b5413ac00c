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


def make_sd3(seed: int = 0, in_channels: int = 4):
    """``SD3Transformer2DModel`` with one joint block (8 x 8 latents, 2 x 2 patches, context width 32, pooled 16)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    ).eval()


def make_flux(seed: int = 0, in_channels: int = 4, guidance_embeds: bool = False):
    """``FluxTransformer2DModel`` with one double and one single block (T5 width 16, pooled 16); its timestep argument
    lies in [0, 1]."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
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


def _sd_ddim_scheduler():
    """DDIM with Stable Diffusion's noise schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_tiny_sd_pipeline(seed: int = 0):
    """``StableDiffusionPipeline`` with a tiny UNet, VAE, CLIP text encoder, a local tokenizer and DDIM."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    unet = make_sd15_unet(seed)
    vae = _tiny_vae(4, seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), 32, 32)).eval()
    scheduler = _sd_ddim_scheduler()
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
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_tiny_tokenizer()
    unet = make_sdxl_unet(seed)
    vae = _tiny_vae(4, seed)
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), 16, 16)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer), 16, SDXL_POOLED_DIM)).eval()
    scheduler = _sd_ddim_scheduler()
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


def _tiny_vae(latent_channels: int, seed: int, flow_matching: bool = False):
    """A tiny ``AutoencoderKL`` (scale factor 2); ``flow_matching``: without the quant convs and with a shift factor,
    as SD3's and Flux's VAEs."""
    from diffusers import AutoencoderKL

    flow = {"use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.5, "shift_factor": 0.1}
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        **(flow if flow_matching else {}),
    ).eval()


def _clip_text_config(vocab_size: int, hidden_size: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection_dim,
    )


def make_sd3_pipeline_transformer(seed: int = 0):
    """The ``SD3Transformer2DModel`` of ``make_tiny_sd3_pipeline``: ``make_sd3`` with 16 latent channels (as SD3's
    VAE); 16 image tokens, context width 32 (the two CLIP encoders' 16 + 16, and T5's 32)."""
    return make_sd3(seed, in_channels=16)


def make_tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0):
    """``StableDiffusion3Pipeline`` with ``make_sd3_pipeline_transformer``, a 16-channel VAE (scale factor 2, so the
    default image is 16 x 16 pixels), two tiny ``CLIPTextModelWithProjection`` (hidden 16, projection 8 each), a tiny
    ``T5EncoderModel`` (width 32) with a local tokenizer, and SD3's flow-matching Euler scheduler (static shift).
    (``text_encoder_3=None`` runs, but a pipeline saved so does not load again with ``from_pretrained``.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = make_tiny_tokenizer()
    transformer = make_sd3_pipeline_transformer(seed)
    vae = _tiny_vae(16, seed, flow_matching=True)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer), 16, 8)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer), 16, 8)).eval()
    tokenizer_3 = make_tiny_t5_tokenizer()
    text_encoder_3 = _tiny_t5_encoder(len(tokenizer_3), 32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters, built locally: every lower-case prompt tokenizes."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    pieces += [("\u2581" + c, -3.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=32)


def _tiny_t5_encoder(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()


def make_flux_pipeline_transformer(seed: int = 0, guidance_embeds: bool = True):
    """The ``FluxTransformer2DModel`` of ``make_tiny_flux_pipeline``: ``make_flux`` on packed 2 x 2 patches of 4
    latent channels (``in_channels=16``), with a guidance embedding (FLUX.1-dev) unless ``guidance_embeds=False``."""
    return make_flux(seed, in_channels=16, guidance_embeds=guidance_embeds)


def make_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """``FluxPipeline`` with ``make_flux_pipeline_transformer``, a 4-channel VAE (scale factor 2), a tiny
    ``CLIPTextModel`` (pooled 16) and ``T5EncoderModel`` (width 16) with local tokenizers, and Flux-dev's scheduler
    (flow-matching Euler with resolution-dependent shifting).  FluxPipeline's default image is 128 latent rows: pass
    ``height=width=16`` (8 x 8 latents, 16 packed tokens) to keep it tiny."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    tokenizer_2 = make_tiny_t5_tokenizer()
    transformer = make_flux_pipeline_transformer(seed, guidance_embeds)
    vae = _tiny_vae(4, seed, flow_matching=True)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), 16, 16)).eval()
    text_encoder_2 = _tiny_t5_encoder(len(tokenizer_2), 16)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
