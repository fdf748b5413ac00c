"""Distillation of a diffusers pipeline's denoiser (Stable Diffusion, SDXL, or any class-conditional or
unconditional UNet pipeline) from ``--pretrained_model_name_or_path``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from ..tuners.qalora.api import calibrate_activations, get_qalora_model, timestep_table
from ..tuners.qalora.config import QALoraConfig
from .conditioning import (
    ClassLabelConditioning,
    Conditioning,
    PromptConditioning,
    UnconditionalConditioning,
    load_prompts,
)
from .distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, broadcast_module_state, distributed_phase, make_accelerator
from .trainer import DataFreeDistiller, DistillConfig


def conditioning_for(pipeline: Any, prompt_file: str | None, guidance_scale: float | None) -> Conditioning:
    """Prompts for text-to-image pipelines, class labels for class-conditional UNets, else none."""
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
        if getattr(pipeline, "unet", None) is None:
            raise SystemExit(
                f"error: {args.pretrained_model_name_or_path} has no `unet`; data-free distillation of transformer "
                f"pipelines (SD3, Flux) needs their flow-matching trajectories, which this script does not sample "
                f"yet."
            )
        pipeline.to(accelerator.device)
    denoiser = pipeline.unet
    with distributed_phase("calibration"):
        conditioning = conditioning_for(pipeline, args.prompt_file, args.guidance_scale)
        table = timestep_table(pipeline.scheduler, args.num_inference_steps)
        cfg = QALoraConfig(
            r=args.rank, lora_alpha=args.rank, weight_bits=args.weight_bits, act_bits=args.act_bits, timesteps=table
        )
        set_seed(distill.seed)  # the LoRA factors are drawn at injection: the same command gives the same adapter
        get_qalora_model(denoiser, cfg)
        samples = args.calibration_samples or max(2, distill.batch_size)
        calibrate_activations(denoiser, _calibration_call(pipeline, conditioning, args.num_inference_steps, samples))
        broadcast_module_state(denoiser, only="qal_")
    c = denoiser.config
    sample_shape = (c.in_channels, c.sample_size, c.sample_size)
    distiller = DataFreeDistiller(
        denoiser, pipeline.scheduler, conditioning, sample_shape, distill, args.output_dir, accelerator=accelerator
    )
    summary = distiller.train(resume_from_checkpoint=args.resume_from_checkpoint)
    adapter_dir = distiller.save_adapter()
    results = {
        "command": command,
        "model": args.pretrained_model_name_or_path,
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
