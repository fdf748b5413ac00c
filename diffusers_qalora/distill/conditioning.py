"""Conditioning for data-free distillation: what each trajectory is conditioned on, and how the denoiser is called.

Nothing here reads a dataset: class labels are drawn at random, prompts come from a short prompt list (embedded
once by the pipeline's own text encoders), and the initial latents are Gaussian noise.

The trainer keeps latents as ``(batch, channels, rows, columns)`` and hands ``predict`` the timestep in the units the
denoiser takes (see ``tuners.qalora.sampling``); a conditioning that calls a denoiser on another layout (Flux's packed
2 x 2 patches) converts around the call.
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
        self._set_prompts(prompts, guidance_scale)
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

    def _set_prompts(
        self, prompts: list[str], guidance_scale: float | None, call_kwargs: dict[str, Any] | None = None
    ) -> None:
        if not prompts:
            raise ValueError("`prompts` must hold at least one prompt.")
        self.prompts = list(prompts)
        self.guidance_scale = guidance_scale
        self._call_kwargs = dict(call_kwargs or {})

    def pipeline_call_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the pipeline's ``__call__`` that sample what ``predict`` sees (image size, text
        length): calibration runs the pipeline with them."""
        return dict(getattr(self, "_call_kwargs", {}))

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


class SD3PromptConditioning(PromptConditioning):
    """Random prompts for ``StableDiffusion3Pipeline`` (SD3, SD3.5): joint text embeddings (the two CLIP encoders'
    hidden states and T5's, from ``encode_prompt``) and pooled projections, with classifier-free guidance on an empty
    negative prompt, as the pipeline samples.  The transformer is called as
    ``transformer(hidden_states=, timestep=, encoder_hidden_states=, pooled_projections=)``.

    Args:
        pipeline: a ``StableDiffusion3Pipeline``.
        prompts (`list[str]`): the prompt list.
        guidance_scale (`float`, *optional*, defaults to `7.0`): the pipeline's default guidance.
        max_sequence_length (`int`, defaults to `256`): T5 tokens, as the pipeline's argument.
        height (`int`, *optional*): image height in pixels (default: the pipeline's), for calibration calls.
        width (`int`, *optional*): image width in pixels (default: the pipeline's).
    """

    def __init__(
        self,
        pipeline: Any,
        prompts: list[str],
        guidance_scale: float | None = 7.0,
        max_sequence_length: int = 256,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        self._set_prompts(
            prompts, guidance_scale, {"max_sequence_length": max_sequence_length, "height": height, "width": width}
        )
        self.sdxl = False
        with torch.no_grad():
            pe, npe, pooled, npooled = pipeline.encode_prompt(
                self.prompts,
                None,
                None,
                device=pipeline.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                max_sequence_length=max_sequence_length,
            )
        self.embeds, self.neg_embeds = pe.cpu(), npe.cpu()
        self.pooled, self.neg_pooled = pooled.cpu(), npooled.cpu()

    def predict(self, model, x, t, cond):
        idx = cond["prompt_index"].cpu()

        def pick(table: torch.Tensor) -> torch.Tensor:
            return table[idx].to(x.device, x.dtype)

        if self.use_guidance:  # the pipeline's order: unconditional first
            hidden = torch.cat([x, x])
            embeds = torch.cat([pick(self.neg_embeds), pick(self.embeds)])
            pooled = torch.cat([pick(self.neg_pooled), pick(self.pooled)])
        else:
            hidden, embeds, pooled = x, pick(self.embeds), pick(self.pooled)
        out = model(
            hidden_states=hidden,
            timestep=t.expand(len(hidden)),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if not self.use_guidance:
            return out
        uncond, conditional = out.chunk(2)
        return self._guide(uncond, conditional)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latents -> Flux's ``(B, H/2 * W/2, 4C)`` tokens of 2 x 2 patches (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for ``height x width`` latents."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(rows: int, columns: int, device=None, dtype=None) -> torch.Tensor:
    """Flux's position ids of the packed tokens, ``(rows * columns, 3)``: ``(0, row, column)``."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


class FluxPromptConditioning(PromptConditioning):
    """Random prompts for ``FluxPipeline`` (FLUX.1 dev / schnell): T5 prompt embeddings, CLIP pooled projections and
    text ids from ``encode_prompt``; the guidance scale goes in as the transformer's ``guidance`` embedding when its
    config has ``guidance_embeds`` (guidance-distilled models; no true classifier-free guidance, as the pipeline's
    default).  ``predict`` packs the ``(B, C, H, W)`` latents into 2 x 2 patches with their image ids, calls
    ``transformer(hidden_states=, timestep=, guidance=, pooled_projections=, encoder_hidden_states=, txt_ids=,
    img_ids=)`` with the timestep it is given (the sampler's, already ``t / 1000``), and unpacks the velocity.

    Args:
        pipeline: a ``FluxPipeline``.
        prompts (`list[str]`): the prompt list.
        guidance_scale (`float`, *optional*, defaults to `3.5`): the pipeline's default (embedded guidance).
        max_sequence_length (`int`, defaults to `512`): T5 tokens, as the pipeline's argument.
        height (`int`, *optional*): image height in pixels (default: the pipeline's), for calibration calls.
        width (`int`, *optional*): image width in pixels (default: the pipeline's).
    """

    def __init__(
        self,
        pipeline: Any,
        prompts: list[str],
        guidance_scale: float | None = 3.5,
        max_sequence_length: int = 512,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        self._set_prompts(
            prompts,
            3.5 if guidance_scale is None else guidance_scale,
            {"max_sequence_length": max_sequence_length, "height": height, "width": width},
        )
        self.guidance_embeds = bool(pipeline.transformer.config.guidance_embeds)
        with torch.no_grad():
            pe, pooled, text_ids = pipeline.encode_prompt(
                self.prompts,
                None,
                device=pipeline.device,
                num_images_per_prompt=1,
                max_sequence_length=max_sequence_length,
            )
        self.embeds, self.pooled, self.text_ids = pe.cpu(), pooled.cpu(), text_ids.cpu()

    @property
    def use_guidance(self) -> bool:
        return False  # the guidance scale is an input of the transformer, not a second pass

    def predict(self, model, x, t, cond):
        idx = cond["prompt_index"].cpu()
        b, _, h, w = x.shape
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), float(self.guidance_scale), device=x.device, dtype=torch.float32)
        out = model(
            hidden_states=pack_latents(x),
            timestep=t.expand(b),
            guidance=guidance,
            pooled_projections=self.pooled[idx].to(x.device, x.dtype),
            encoder_hidden_states=self.embeds[idx].to(x.device, x.dtype),
            txt_ids=self.text_ids.to(x.device, x.dtype),
            img_ids=latent_image_ids(h // 2, w // 2, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)
