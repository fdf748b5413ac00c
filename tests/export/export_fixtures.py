"""Tiny diffusers models for the export tests, built from configs (no download), and QALoRA helpers.

Every factory seeds torch, so two calls give bit-identical models.
"""

from __future__ import annotations

import torch

import diffusers_qalora as dq

TABLE = (0.0, 250.0, 500.0, 999.0)


def make_unet2d(seed: int = 0):
    """Class-conditional ``UNet2DModel`` with one attention block, 1 x 16 x 16 (the testbed's shape, smaller)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


def unet2d_inputs(timestep, batch: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
    return {
        "sample": torch.randn(batch, 1, 16, 16, generator=g),
        "timestep": t.expand(batch).clone() if t.numel() == 1 else t,
        "class_labels": torch.arange(batch) % 10,
    }


def make_sd15_unet(seed: int = 0):
    """SD1.5-like ``UNet2DConditionModel`` with cross attention, 4 latent channels, cross_attention_dim 32."""
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


def sd15_inputs(timestep, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": t.expand(batch).clone() if t.numel() == 1 else t,
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
    }


def qalora(model, inputs_fn, weight_bits=4, act_bits=8, table=TABLE, random_lora=True, **config):
    """``get_qalora_model`` + calibration at every table timestep.  ``random_lora`` draws ``B`` at random so that
    the LoRA update is non-zero (as after distillation) and must end up in the exported codes."""
    config = {"weight_init": "minmax", "act_init": "minmax", **config}  # the searches are slow and irrelevant here
    cfg = dq.QALoraConfig(
        r=4, weight_bits=weight_bits, act_bits=act_bits, timesteps=list(table), init_weights=not random_lora, **config
    )
    model = dq.get_qalora_model(model, cfg)

    def calibrate():
        for t in table:
            model(**inputs_fn(t, seed=11))

    dq.calibrate_activations(model, calibrate)
    return model


def make_tiny_sd_pipeline(seed: int = 0):
    """``StableDiffusionPipeline`` with a tiny UNet, VAE and CLIP text encoder, a byte-level tokenizer and DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
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
