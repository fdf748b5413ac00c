"""Conditioning for data-free distillation: what each trajectory is conditioned on, and how the denoiser is called.

Nothing here reads a dataset: class labels are drawn at random, prompts come from a short prompt list (embedded
once by the pipeline's own text encoders), and the initial latents are Gaussian noise.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """Prompts from ``path`` (one per line, blank lines and ``#`` comments skipped) or the shipped default list."""
    if path is None:
        text = resources.files("diffusers_qalora.distill").joinpath("prompts/default.txt").read_text(encoding="utf-8")
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt file {p} does not exist; pass a text file with one prompt per line.")
        text = p.read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt; write one prompt per line.")
    return prompts


def _sample_output(out: Any) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0]


class Conditioning(ABC):
    """Draws the conditioning of a batch of trajectories and calls the denoiser with it."""

    guidance_scale: float | None = None

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Conditioning tensors for ``batch_size`` trajectories (kept on CPU; moved by the trainer)."""

    @abstractmethod
    def predict(
        self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The denoiser's prediction at ``(x, t)``, after classifier-free guidance when it is used."""

    def _guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return uncond + self.guidance_scale * (cond - uncond)

    @property
    def use_guidance(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale > 1.0


class UnconditionalConditioning(Conditioning):
    """An unconditional denoiser ``model(x, t)``."""

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def predict(self, model, x, t, cond):
        return _sample_output(model(x, t))


class ClassLabelConditioning(Conditioning):
    """Random class labels, ``model(x, t, class_labels=y)``.  With guidance, ``null_class`` is the unconditional label.

    Args:
        num_classes (`int`): labels are drawn uniformly from ``[0, num_classes)``.
        guidance_scale (`float`, *optional*): classifier-free guidance scale (needs ``null_class``).
        null_class (`int`, *optional*): the label of the unconditional embedding.
    """

    def __init__(self, num_classes: int, guidance_scale: float | None = None, null_class: int | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes!r}.")
        if guidance_scale is not None and guidance_scale > 1.0 and null_class is None:
            raise ValueError(
                "classifier-free guidance needs an unconditional class (`null_class`); this model has none, so run "
                "without `--guidance_scale`."
            )
        self.num_classes = num_classes
        self.guidance_scale = guidance_scale
        self.null_class = null_class

    def sample(self, batch_size, generator):
        return {"class_labels": torch.randint(0, self.num_classes, (batch_size,), generator=generator)}

    def predict(self, model, x, t, cond):
        labels = cond["class_labels"]
        if not self.use_guidance:
            return _sample_output(model(x, t, class_labels=labels))
        null = torch.full_like(labels, self.null_class)
        both = _sample_output(model(torch.cat([x, x]), t, class_labels=torch.cat([null, labels])))
        uncond, conditional = both.chunk(2)
        return self._guide(uncond, conditional)


class PromptConditioning(Conditioning):
    """Random prompts from a list, embedded once with the pipeline's text encoder(s) (Stable Diffusion and SDXL).

    Args:
        pipeline: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (anything with ``encode_prompt``).
        prompts (`list[str]`): the prompt list.
        guidance_scale (`float`, *optional*, defaults to `7.5`): the guidance used by the teacher and the student.
    """

    def __init__(self, pipeline: Any, prompts: list[str], guidance_scale: float | None = 7.5) -> None:
        if not prompts:
            raise ValueError("`prompts` must hold at least one prompt.")
        self.prompts = list(prompts)
        self.guidance_scale = guidance_scale
        self.sdxl = hasattr(pipeline, "text_encoder_2")
        device = pipeline.device
        with torch.no_grad():
            if self.sdxl:
                pe, npe, pooled, npooled = pipeline.encode_prompt(
                    self.prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
                )
                unet = pipeline.unet
                size = unet.config.sample_size * pipeline.vae_scale_factor
                add_time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pe.dtype)
                self.time_ids = add_time_ids
                self.pooled, self.neg_pooled = pooled.cpu(), npooled.cpu()
            else:
                pe, npe = pipeline.encode_prompt(
                    self.prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
                )
        self.embeds, self.neg_embeds = pe.cpu(), npe.cpu()

    def sample(self, batch_size, generator):
        return {"prompt_index": torch.randint(0, len(self.prompts), (batch_size,), generator=generator)}

    def _kwargs(self, idx: torch.Tensor, negative: bool, device, dtype) -> dict[str, Any]:
        embeds = (self.neg_embeds if negative else self.embeds)[idx.cpu()].to(device, dtype)
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if self.sdxl:
            pooled = (self.neg_pooled if negative else self.pooled)[idx.cpu()].to(device, dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": self.time_ids.to(device, dtype).expand(len(idx), -1),
            }
        return kwargs

    def predict(self, model, x, t, cond):
        idx = cond["prompt_index"]
        dtype = x.dtype
        if not self.use_guidance:
            return _sample_output(model(x, t, **self._kwargs(idx, False, x.device, dtype)))
        neg, pos = self._kwargs(idx, True, x.device, dtype), self._kwargs(idx, False, x.device, dtype)
        kwargs: dict[str, Any] = {
            "encoder_hidden_states": torch.cat([neg["encoder_hidden_states"], pos["encoder_hidden_states"]])
        }
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {
                k: torch.cat([neg["added_cond_kwargs"][k], pos["added_cond_kwargs"][k]])
                for k in ("text_embeds", "time_ids")
            }
        both = _sample_output(model(torch.cat([x, x]), t, **kwargs))
        uncond, conditional = both.chunk(2)
        return self._guide(uncond, conditional)
