"""Distillation of a diffusers pipeline's denoiser from ``--pretrained_model_name_or_path``: Stable Diffusion,
SDXL, any class-conditional or unconditional UNet pipeline (DDIM teacher trajectories), SD3 and Flux (flow-matching
Euler trajectories of the pipeline's own sigmas)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from ..tuners.qalora.api import calibrate_activations, get_qalora_model, timestep_table
from ..tuners.qalora.config import QALoraConfig
from ..tuners.qalora.sampling import is_flow_matching, is_flux_pipeline, latent_size, trajectory_sampler
from .conditioning import (
    ClassLabelConditioning,
    Conditioning,
    FluxPromptConditioning,
    PromptConditioning,
    SD3PromptConditioning,
    UnconditionalConditioning,
    load_prompts,
)
from .distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, broadcast_module_state, distributed_phase, make_accelerator
from .trainer import DataFreeDistiller, DistillConfig


def denoiser_name(pipeline: Any) -> str:
    """``"unet"`` or ``"transformer"``: the pipeline component the job distils (SD3 and Flux transformers only)."""
    if getattr(pipeline, "unet", None) is not None:
        return "unet"
    if is_flux_pipeline(pipeline) or _is_sd3_pipeline(pipeline):
        return "transformer"
    found = type(getattr(pipeline, "transformer", None)).__name__
    raise ValueError(
        f"{type(pipeline).__name__} has no `unet` and its `transformer` is a {found}; the distillation job samples "
        f"the teacher trajectories of UNet pipelines (DDIM) and of SD3 and Flux pipelines (flow matching, "
        f"SD3Transformer2DModel / FluxTransformer2DModel)."
    )


def _is_sd3_pipeline(pipeline: Any) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(getattr(pipeline, "transformer", None), SD3Transformer2DModel) and hasattr(
        pipeline, "text_encoder_3"
    )


def conditioning_for(
    pipeline: Any,
    prompt_file: str | None,
    guidance_scale: float | None,
    *,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
) -> Conditioning:
    """Prompts for text-to-image pipelines, class labels for class-conditional UNets, else none.

    UNet pipelines sample at their UNet's size (``height``, ``width`` and ``max_sequence_length`` are not used); SD3
    and Flux get their own prompt conditioning (joint text embeddings and pooled projections; Flux's packed
    latents and guidance embedding) at ``height x width`` pixels (default: the pipeline's size) and
    ``max_sequence_length`` T5 tokens (default: the pipeline's, 256 for SD3 and 512 for Flux)."""
    if denoiser_name(pipeline) == "transformer":
        prompts = load_prompts(prompt_file)
        size = {"height": height, "width": width}
        if is_flux_pipeline(pipeline):
            return FluxPromptConditioning(pipeline, prompts, guidance_scale, max_sequence_length or 512, **size)
        return SD3PromptConditioning(
            pipeline, prompts, 7.0 if guidance_scale is None else guidance_scale, max_sequence_length or 256, **size
        )
    if hasattr(pipeline, "encode_prompt") and getattr(pipeline, "text_encoder", None) is not None:
        return PromptConditioning(
            pipeline, load_prompts(prompt_file), 7.5 if guidance_scale is None else guidance_scale
        )
    denoiser = pipeline.unet
    num_classes = getattr(denoiser.config, "num_class_embeds", None)
    if num_classes:
        return ClassLabelConditioning(num_classes, guidance_scale)
    return UnconditionalConditioning()


def _calibration_call(pipeline: Any, conditioning: Conditioning, steps: int, samples: int):
    def run() -> None:
        generator = torch.Generator().manual_seed(1234)
        if isinstance(conditioning, PromptConditioning):
            prompts = [conditioning.prompts[i % len(conditioning.prompts)] for i in range(samples)]
            pipeline(
                prompts,
                num_inference_steps=steps,
                guidance_scale=conditioning.guidance_scale or 1.0,
                generator=generator,
                output_type="latent",
                **conditioning.pipeline_call_kwargs(),
            )
        elif isinstance(conditioning, ClassLabelConditioning):
            pipeline(torch.arange(samples) % conditioning.num_classes, num_inference_steps=steps, generator=generator)
        else:
            pipeline(batch_size=samples, num_inference_steps=steps, generator=generator)

    return run


def run_pipeline_job(args: argparse.Namespace, distill: DistillConfig, command: str) -> dict[str, Any]:
    """Load the pipeline, inject QALoRA into its denoiser, calibrate, distil, and save the adapter.

    On several processes every process loads the pipeline onto its own device and calibrates (deterministic; the main
    process's adapter state is then broadcast), training is data-parallel, and the adapter and ``results.json`` are
    written by the main process while the others wait."""
    from diffusers import DiffusionPipeline

    timeout = getattr(args, "ddp_timeout", DEFAULT_COLLECTIVE_TIMEOUT_S)
    accelerator = make_accelerator(args.output_dir, args.mixed_precision, args.report_to, timeout)
    with distributed_phase("load pipeline"):
        pipeline = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path)
        pipeline.set_progress_bar_config(disable=True)
        name = _check_pipeline_args(pipeline, args)
        pipeline.to(accelerator.device)
    denoiser = getattr(pipeline, name)
    size = {"height": args.resolution, "width": args.resolution}
    with distributed_phase("calibration"):
        conditioning = conditioning_for(
            pipeline, args.prompt_file, args.guidance_scale, max_sequence_length=args.max_sequence_length, **size
        )
        # One schedule for all three: the calibration runs the pipeline itself (same steps, size and text length),
        # the table holds the timesteps its denoiser receives, and the trainer follows the same sampler.
        sampler = trajectory_sampler(pipeline, args.num_inference_steps, eta=distill.eta, **size)
        table = timestep_table(pipeline, args.num_inference_steps, **size)
        cfg = QALoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            weight_bits=args.weight_bits,
            act_bits=args.act_bits,
            timesteps=table,
            quantize_attention=args.quantize_attention,
            act_granularity=args.act_granularity,
            act_group_size=args.act_group_size,
            weight_granularity=args.weight_granularity,
            weight_group_size=args.weight_group_size,
        )
        set_seed(distill.seed)  # the LoRA factors are drawn at injection: the same command gives the same adapter
        get_qalora_model(denoiser, cfg)
        samples = args.calibration_samples or max(2, distill.batch_size)
        calibrate_activations(denoiser, _calibration_call(pipeline, conditioning, args.num_inference_steps, samples))
        broadcast_module_state(denoiser, only="qal_")
    distiller = DataFreeDistiller(
        denoiser,
        sampler,
        conditioning,
        sample_shape(pipeline, args.resolution),
        distill,
        args.output_dir,
        accelerator=accelerator,
    )
    summary = distiller.train(resume_from_checkpoint=args.resume_from_checkpoint)
    adapter_dir = distiller.save_adapter()
    results = {
        "command": command,
        "model": args.pretrained_model_name_or_path,
        "denoiser": name,
        "adapter": str(adapter_dir),
        "num_processes": accelerator.num_processes,
        "training": {k: v for k, v in summary.items() if k != "history"},
        "loss_history": [h["loss"] for h in summary["history"]],
    }
    with distributed_phase("write results"):
        if accelerator.is_main_process:
            (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        accelerator.wait_for_everyone()
    return results


def sample_shape(pipeline: Any, resolution: int | None = None) -> tuple[int, int, int]:
    """One latent ``(channels, rows, columns)`` as the trainer holds it: a UNet's configured sample; an SD3 latent of
    ``resolution`` pixels (default: the pipeline's size); a Flux latent unpacked (its transformer's packed channels
    / 4)."""
    if denoiser_name(pipeline) == "unet":
        c = pipeline.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)
    channels = pipeline.transformer.config.in_channels
    if is_flux_pipeline(pipeline):
        channels //= 4
    return (channels, *latent_size(pipeline, resolution, resolution))


def _check_pipeline_args(pipeline: Any, args: argparse.Namespace) -> str:
    """The denoiser's name, after checking the options that depend on the pipeline (before any work)."""
    where = args.pretrained_model_name_or_path
    try:
        name = denoiser_name(pipeline)
    except ValueError as err:
        raise SystemExit(f"error: {where}: {err}") from None
    if name == "unet":
        for option in ("resolution", "max_sequence_length"):
            if getattr(args, option) is not None:
                raise SystemExit(
                    f"error: --{option} applies to SD3 and Flux pipelines; {where} is a UNet pipeline, which samples "
                    f"at its UNet's configured size (drop --{option})."
                )
        return name
    if args.eta and is_flow_matching(pipeline.scheduler):
        raise SystemExit(
            f"error: --eta is DDIM's; {where} is a flow-matching pipeline whose teacher trajectories are Euler steps "
            f"(drop --eta)."
        )
    if args.resolution is not None:
        multiple = pipeline.vae_scale_factor * (2 if is_flux_pipeline(pipeline) else pipeline.patch_size)
        if args.resolution % multiple:
            raise SystemExit(
                f"error: --resolution {args.resolution} must be a multiple of {multiple} for {where} (the VAE's scale "
                f"factor times the transformer's patch size)."
            )
    return name
