"""The embedded DiT: a class-conditional SD3-style MMDiT (`diffusers.SD3Transformer2DModel`) on the 16x16 digits.

Why SD3's transformer and not `DiTTransformer2DModel`: SD3's joint attention (image tokens and context tokens in one
softmax, `JointAttnProcessor2_0`) and its adaLN-Zero blocks are what users bring (SD3, SD3.5, and, with rotary
embeddings, Flux), and they are the attention the project's quantized attention must handle; the classic DiT block
uses the same self-attention as the UNet's attention blocks, which the UNet already exercises.

The class is the conditioning, fed through SD3's own inputs, so every weight lives in the diffusers model:

- `pooled_projections` is the one-hot class (`pooled_projection_dim = 10`): SD3's pooled-text projection becomes a
  class embedding added to the timestep embedding, which drives every adaLN modulation;
- `encoder_hidden_states` is one context token, the same one-hot class (`joint_attention_dim = 10`): the context
  embedder makes it a learned class token that the image tokens attend to in every joint attention.

[`ClassConditionalTransformer`] is an `SD3Transformer2DModel` whose `forward` has the UNet's call signature
(`model(sample, timestep, class_labels=labels).sample`), so the DDIM pipeline, the evaluation and the distillation
code drive it exactly as they drive the UNet; its `config.num_class_embeds`, `sample_size` and `in_channels` are the
ones the pipeline reads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES

__all__ = ["DEFAULT_DIT_CONFIG", "ClassConditionalTransformer", "build_dit"]

# 2x2 patches of the 16x16 image give 64 image tokens; 4 joint blocks of width 96 (3 heads of 32). About 1.3M
# parameters, close to the UNet's 1.1M, and a training step of about the same CPU cost.
DEFAULT_DIT_CONFIG: dict[str, Any] = {
    "num_class_embeds": NUM_CLASSES,
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 2,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 3,
}


class ClassConditionalTransformer(SD3Transformer2DModel):
    """A class-conditional `SD3Transformer2DModel` with the UNet's call signature.

    It is an `SD3Transformer2DModel` (same modules, same module names, same `JointAttnProcessor2_0` attention), so
    everything that handles SD3's transformer handles it; only `forward` differs: it takes the class labels and
    feeds them to SD3's conditioning inputs. Its config holds the arguments below; the SD3 arguments derived from
    them (`joint_attention_dim = pooled_projection_dim = num_class_embeds`, `caption_projection_dim` the model
    width, `pos_embed_max_size = sample_size // patch_size`) are not stored.

    Args:
        num_class_embeds (`int`, *optional*, defaults to `10`): number of classes.
        sample_size (`int`, *optional*, defaults to `16`): image height and width.
        in_channels (`int`, *optional*, defaults to `1`): image channels.
        out_channels (`int`, *optional*, defaults to `1`): predicted channels (the noise).
        patch_size (`int`, *optional*, defaults to `2`): patch size of the patch embedding.
        num_layers (`int`, *optional*, defaults to `4`): joint transformer blocks.
        attention_head_dim (`int`, *optional*, defaults to `32`): width of an attention head.
        num_attention_heads (`int`, *optional*, defaults to `3`): attention heads.
    """

    # SD3's own `register_to_config` would store these derived arguments beside ours; from_config would then warn
    # about unexpected keys, and a config edited in one place could disagree with the other.
    ignore_for_config = [
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
        "pos_embed_max_size",
        "dual_attention_layers",
        "qk_norm",
    ]

    @register_to_config
    def __init__(
        self,
        num_class_embeds: int = NUM_CLASSES,
        sample_size: int = IMAGE_SIZE,
        in_channels: int = 1,
        out_channels: int = 1,
        patch_size: int = 2,
        num_layers: int = 4,
        attention_head_dim: int = 32,
        num_attention_heads: int = 3,
    ) -> None:
        if sample_size % patch_size:
            raise ValueError(f"`sample_size` ({sample_size}) must be a multiple of `patch_size` ({patch_size}).")
        super().__init__(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=num_class_embeds,
            caption_projection_dim=attention_head_dim * num_attention_heads,
            pooled_projection_dim=num_class_embeds,
            out_channels=out_channels,
            pos_embed_max_size=sample_size // patch_size,
        )

    def class_conditioning(self, class_labels: torch.Tensor) -> torch.Tensor:
        """The one-hot classes `(B, num_class_embeds)` in the model's dtype; a clear error for a bad label."""
        labels = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        num_classes = self.config.num_class_embeds
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"`class_labels` must lie in [0, {num_classes - 1}], got values from {int(labels.min())} "
                f"to {int(labels.max())}."
            )
        return F.one_hot(labels, num_classes).to(self.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the noise of `sample` `(B, C, H, W)` at `timestep` (a scalar or `(B,)`) for `class_labels` `(B,)`.

        Returns:
            `Transformer2DModelOutput` (`.sample` of the shape of `sample`) or a one-element tuple.
        """
        if class_labels is None:
            raise ValueError("ClassConditionalTransformer needs `class_labels` (one class per image).")
        onehot = self.class_conditioning(class_labels)
        if onehot.shape[0] != sample.shape[0]:
            raise ValueError(f"{onehot.shape[0]} class labels for a batch of {sample.shape[0]} images.")
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        out = super().forward(
            hidden_states=sample,
            encoder_hidden_states=onehot[:, None, :],
            pooled_projections=onehot,
            timestep=timestep,
            return_dict=False,
        )[0]
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def _zero_init_modulation(model: ClassConditionalTransformer) -> None:
    """adaLN-Zero initialisation (DiT): every block's modulation and the output projection start at zero, so each
    block starts as the identity and the model's first prediction is zero; this trains faster and more stably."""
    for module in model.modules():
        linear = getattr(module, "linear", None)
        if isinstance(linear, nn.Linear) and module.__class__.__name__.startswith(("AdaLayerNorm", "SD35AdaLayerNorm")):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


def build_dit(config: dict[str, Any] | None = None, zero_init: bool = True) -> ClassConditionalTransformer:
    """Build the (untrained) class-conditional transformer of the testbed.

    Args:
        config (`dict`, *optional*): keyword arguments of [`ClassConditionalTransformer`]; defaults to
            `DEFAULT_DIT_CONFIG`.
        zero_init (`bool`, *optional*, defaults to `True`): adaLN-Zero initialisation of the modulations and of the
            output projection (what the recipe trains from).

    Returns:
        [`ClassConditionalTransformer`]: a float32 model.
    """
    model = ClassConditionalTransformer(**dict(config if config is not None else DEFAULT_DIT_CONFIG))
    if zero_init:
        _zero_init_modulation(model)
    return model
