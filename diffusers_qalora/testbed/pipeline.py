"""A class-conditional DDIM pipeline for `UNet2DModel`s with a class embedding (and the embedded DiT)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["ClassConditionalDDIMPipeline"]

_OUTPUT_TYPES = ("pt", "np", "pil")


class ClassConditionalDDIMPipeline(DiffusionPipeline):
    """Sample class-conditional images from a `UNet2DModel` with `num_class_embeds` set.

    The embedded DiT ([`~diffusers_qalora.testbed.ClassConditionalTransformer`]) has the same call signature and
    config fields (`num_class_embeds`, `sample_size`, `in_channels`), so it goes in the `unet` slot as well.

    The name says DDIM because that is the scheduler the testbed ships, but any scheduler of the DDIM / DDPM family
    works (`DDIMScheduler`, `DDPMScheduler`, `DPMSolverMultistepScheduler`, ...); the model input goes through
    `scheduler.scale_model_input`, so schedulers that scale it (`EulerDiscreteScheduler`) work as well.

    The UNet is called as `self.unet(x, t, class_labels=labels)` with `t` the scheduler's timestep, so a forward
    pre-hook registered on the UNet reads the timestep of every call from its second positional argument.

    Args:
        unet (`UNet2DModel` or `ClassConditionalTransformer`):
            A class-conditional denoiser (`num_class_embeds` set) that predicts what the scheduler expects.
        scheduler (`SchedulerMixin`):
            The sampling scheduler.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _prepare_labels(self, class_labels: int | Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
        num_classes = self.unet.config.num_class_embeds
        if num_classes is None:
            raise ValueError(
                "`unet.config.num_class_embeds` is None: ClassConditionalDDIMPipeline needs a class-conditional UNet."
            )
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("`class_labels` must hold at least one label, got an empty sequence.")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"`class_labels` must lie in [0, {num_classes - 1}], got values from {int(labels.min())} "
                f"to {int(labels.max())}."
            )
        return labels.to(device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 20,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label.

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`):
                Class of each image; the batch size is the number of labels.
            num_inference_steps (`int`, *optional*, defaults to `20`):
                Number of denoising steps.
            eta (`float`, *optional*, defaults to `0.0`):
                DDIM's eta (`0` is deterministic DDIM, `1` is DDPM-like). Passed only to schedulers whose `step`
                accepts it.
            generator (`torch.Generator`, *optional*):
                Generator of the initial noise (when `latents` is not given) and of the noise that stochastic
                schedulers add; a seeded generator makes sampling deterministic.
            latents (`torch.Tensor`, *optional*):
                Initial noise `(B, C, H, W)` with unit variance; sampled from `generator` when not given. It is
                scaled by `scheduler.init_noise_sigma`.
            output_type (`str`, *optional*, defaults to `"pt"`):
                `"pt"` for a `(B, C, H, W)` float tensor, `"np"` for a `(B, H, W, C)` float array, `"pil"` for a
                list of PIL images. Float outputs are in `[0, 1]`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an `ImagePipelineOutput` instead of a one-element tuple.

        Returns:
            `pipelines.ImagePipelineOutput` or `tuple`: the images.

        Example:

        ```py
        >>> from diffusers_qalora.testbed import load_testbed
        >>> import torch

        >>> pipe = load_testbed().pipeline
        >>> images = pipe([0, 1, 2], generator=torch.Generator().manual_seed(0)).images  # (3, 1, 16, 16)
        ```
        """
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        device = self._execution_device
        labels = self._prepare_labels(class_labels, device)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (labels.shape[0], self.unet.config.in_channels, *size)
        if latents is None:
            x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            x = latents.to(device=device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Only pass what the scheduler's step accepts: DDPMScheduler has no `eta`, Euler-type ones no `generator`.
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs = {}
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            model_output = self.unet(model_input, t, class_labels=labels).sample
            x = self.scheduler.step(model_output, t, x, **step_kwargs).prev_sample

        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
