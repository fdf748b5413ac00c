"""The sampling schedule of a diffusers pipeline, in the units its denoiser sees, and a stateless step along it.

Two things must agree for a QALoRA adapter: the timestep table of its activation step sizes, and the timesteps the
denoiser receives while it is calibrated (the pipeline's own ``__call__``) and distilled (the teacher's trajectory).
This module is the one place that knows how a pipeline samples:

* diffusion schedulers (DDPM, DDIM, PNDM, ...): a DDIM trajectory built from the scheduler's config
  (`DDIMSampler`); the denoiser sees the scheduler's integer timesteps;
* flow matching (``FlowMatchEulerDiscreteScheduler``, as SD3 and Flux ship): the Euler trajectory of the pipeline's
  sigmas (`FlowMatchEulerSampler`), ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i``.  SD3 sets the sigmas from
  the scheduler's static ``shift``; Flux passes ``sigmas = linspace(1, 1/n, n)`` and the resolution-dependent shift
  ``mu`` (a line through ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` evaluated at the
  number of image tokens), and its transformer receives ``t / 1000``.

`trajectory_sampler` picks the sampler from the scheduler class and the schedule from the pipeline; the trainer
steps along it and ``timestep_table`` reads its ``model_timesteps``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

__all__ = [
    "DDIMSampler",
    "FlowMatchEulerSampler",
    "TrajectorySampler",
    "is_flow_matching",
    "is_flux_pipeline",
    "latent_size",
    "resolution_shift",
    "trajectory_sampler",
]


class TrajectorySampler:
    """A fixed schedule of ``n`` steps and the rule that takes ``x`` from one position to the next.

    Attributes:
        timesteps (`torch.Tensor`): the ``n`` timesteps of the schedule in the scheduler's units (the ``t`` of the
            pipeline's denoising loop).
        model_timesteps (`torch.Tensor`): what the denoiser's ``timestep`` argument receives at each position.
    """

    timesteps: torch.Tensor
    model_timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(
        self, velocity: torch.Tensor, position: int, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``x`` at ``position + 1`` from ``x`` at ``position`` and the (guided) prediction ``velocity`` there.

        Stateless: the result depends only on the arguments, so a run may resume at any position."""
        raise NotImplementedError


class DDIMSampler(TrajectorySampler):
    """DDIM over the scheduler's training noise schedule (``DDIMScheduler.from_config(scheduler.config)``).

    Args:
        scheduler: any diffusers diffusion scheduler (its config gives the betas and the timestep spacing).
        num_inference_steps (`int`): steps of the trajectory.
        eta (`float`, defaults to `0.0`): DDIM eta (``0`` deterministic; noise drawn from the step's generator).
    """

    def __init__(self, scheduler: Any, num_inference_steps: int, eta: float = 0.0) -> None:
        from diffusers import DDIMScheduler

        self.eta = eta
        self.ddim = DDIMScheduler.from_config(scheduler.config)
        self.ddim.set_timesteps(num_inference_steps)
        self.timesteps = self.ddim.timesteps.clone()
        self.model_timesteps = self.timesteps

    def step(self, velocity, position, x, generator=None):
        # DDIMScheduler.step reads only its arguments and the fixed schedule (no step counter).
        t = self.timesteps[position]
        return self.ddim.step(velocity, t, x, eta=self.eta, generator=generator).prev_sample


class FlowMatchEulerSampler(TrajectorySampler):
    """The Euler trajectory of a flow-matching model: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i``.

    Computed from the sigmas directly (``FlowMatchEulerDiscreteScheduler.step`` keeps a step counter, which a resumed
    run would have to restore).  With ``stochastic=True`` (the scheduler's ``stochastic_sampling``) the step is
    ``x_{i+1} = (1 - sigma_{i+1}) * (x_i - sigma_i * v_i) + sigma_{i+1} * noise``.

    Args:
        sigmas (`torch.Tensor`): the ``n + 1`` sigmas, the last one terminal (``0``).
        timesteps (`torch.Tensor`): the ``n`` scheduler timesteps (``sigma * num_train_timesteps``).
        model_timesteps (`torch.Tensor`): what the denoiser receives at each position.
        stochastic (`bool`, defaults to `False`): re-noise at each step instead of the deterministic Euler step.
    """

    def __init__(
        self,
        sigmas: torch.Tensor,
        timesteps: torch.Tensor,
        model_timesteps: torch.Tensor,
        stochastic: bool = False,
    ) -> None:
        if len(sigmas) != len(timesteps) + 1 or len(model_timesteps) != len(timesteps):
            raise ValueError(
                f"a flow-matching schedule of {len(timesteps)} steps needs {len(timesteps) + 1} sigmas and "
                f"{len(timesteps)} model timesteps, got {len(sigmas)} and {len(model_timesteps)}."
            )
        self.sigmas = sigmas.detach().to(torch.float32).cpu()
        self.timesteps = timesteps.detach().cpu()
        self.model_timesteps = model_timesteps.detach().cpu()
        self.stochastic = stochastic

    def step(self, velocity, position, x, generator=None):
        sigma = self.sigmas[position].to(x.device)
        sigma_next = self.sigmas[position + 1].to(x.device)
        sample = x.to(torch.float32)  # as the scheduler: the update in float32, the result in the prediction's dtype
        if self.stochastic:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            out = (1.0 - sigma_next) * (sample - sigma * velocity) + sigma_next * noise
        else:
            out = sample + (sigma_next - sigma) * velocity
        return out.to(velocity.dtype)


def is_flow_matching(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a flow-matching scheduler (``FlowMatch*``): its trajectories are Euler steps of a
    velocity over sigmas, not DDIM steps of a noise prediction."""
    return type(scheduler).__name__.startswith("FlowMatch")


def is_flux_pipeline(pipeline: Any) -> bool:
    """Whether ``pipeline`` samples as ``FluxPipeline``: a ``FluxTransformer2DModel`` denoiser on packed latents,
    sigmas ``linspace(1, 1/n, n)`` shifted by the image size, timesteps divided by 1000."""
    from diffusers import FluxTransformer2DModel

    return isinstance(getattr(pipeline, "transformer", None), FluxTransformer2DModel)


def latent_size(pipeline: Any, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The (unpacked) latent ``(rows, columns)`` a transformer pipeline samples for an image of ``height x width``
    pixels (default: the pipeline's own default size, ``default_sample_size * vae_scale_factor``).

    Flux rounds down to an even number of rows and columns (its latents are packed in 2 x 2 patches), as
    ``FluxPipeline.prepare_latents`` does; SD3 divides by the VAE's scale factor."""
    scale = pipeline.vae_scale_factor
    default = pipeline.default_sample_size * scale
    height, width = int(height or default), int(width or default)
    if is_flux_pipeline(pipeline):
        return 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
    return height // scale, width // scale


def _image_tokens(pipeline: Any, rows: int, columns: int) -> int:
    patch = 2 if is_flux_pipeline(pipeline) else pipeline.transformer.config.patch_size
    return (rows // patch) * (columns // patch)


def resolution_shift(config: Any, image_seq_len: int) -> float:
    """``mu`` of resolution-dependent shifting: the line through ``(base_image_seq_len, base_shift)`` and
    ``(max_image_seq_len, max_shift)`` of the scheduler config, at ``image_seq_len`` image tokens."""
    lo_len, hi_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (hi - lo) / (hi_len - lo_len)
    return image_seq_len * slope + (lo - slope * lo_len)


def trajectory_sampler(
    source: Any,
    num_inference_steps: int,
    *,
    eta: float = 0.0,
    height: int | None = None,
    width: int | None = None,
) -> TrajectorySampler:
    """The teacher's trajectory for ``num_inference_steps`` steps, as ``source`` samples it.

    Args:
        source: a diffusers pipeline (its scheduler, and for flow matching the way its ``__call__`` sets the
            schedule) or a scheduler alone (enough for DDIM and for static-shift flow matching, as SD3's).
        num_inference_steps (`int`): steps of the trajectory.
        eta (`float`, defaults to `0.0`): DDIM eta; flow-matching trajectories take none (their scheduler's
            ``stochastic_sampling`` decides).
        height (`int`, *optional*): image height in pixels, which sets Flux's (and any dynamically shifted)
            schedule; default: the pipeline's default size.
        width (`int`, *optional*): image width in pixels (default: the pipeline's).

    Raises:
        ValueError: ``eta`` with a flow-matching scheduler, or a scheduler with resolution-dependent shifting
            given without its pipeline.
    """
    scheduler = getattr(source, "scheduler", None)
    pipeline = source if scheduler is not None else None
    scheduler = scheduler if scheduler is not None else source
    if not is_flow_matching(scheduler):
        return DDIMSampler(scheduler, num_inference_steps, eta)
    if eta:
        raise ValueError(
            f"`eta` ({eta}) is DDIM's; {type(scheduler).__name__} trajectories are Euler steps (set "
            f"`stochastic_sampling` in the scheduler config for noisy ones), so leave eta at 0."
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        euler = copy.deepcopy(scheduler)
    else:  # another flow-matching solver: the Euler trajectory of the same sigmas
        euler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    flux = pipeline is not None and is_flux_pipeline(pipeline)
    kwargs: dict[str, Any] = {}
    if flux or euler.config.get("use_dynamic_shifting", False):
        if pipeline is None:
            raise ValueError(
                f"{type(scheduler).__name__} shifts its sigmas by the image size (use_dynamic_shifting=True), which "
                f"a scheduler alone does not know: pass the pipeline instead (with height/width if not its default)."
            )
        kwargs["mu"] = resolution_shift(euler.config, _image_tokens(pipeline, *latent_size(pipeline, height, width)))
    if flux and not euler.config.get("use_flow_sigmas", False):
        # FluxPipeline passes its own sigmas, 1 down to 1/n.
        euler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), **kwargs)
    else:
        euler.set_timesteps(num_inference_steps, **kwargs)
    timesteps = euler.timesteps
    if flux:
        # FluxPipeline: `timestep = t.expand(batch).to(latents.dtype)`, then `transformer(timestep=timestep / 1000)`.
        model_timesteps = timesteps.to(pipeline.transformer.dtype) / 1000
    else:
        model_timesteps = timesteps
    return FlowMatchEulerSampler(
        euler.sigmas, timesteps, model_timesteps, stochastic=bool(euler.config.get("stochastic_sampling", False))
    )
