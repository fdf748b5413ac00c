"""Seeded, paired sampling from class-conditional pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["balanced_labels", "sample_class_conditional"]


def balanced_labels(num_samples: int, num_classes: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Class labels with every class equally often, in a random order.

    Args:
        num_samples (`int`):
            Number of labels. When it is not a multiple of `num_classes`, the first `num_samples % num_classes`
            classes get one label more.
        num_classes (`int`, *optional*, defaults to `10`):
            Number of classes.
        generator (`torch.Generator`, *optional*):
            Generator of the permutation.

    Returns:
        `torch.Tensor`: `(num_samples,)` int64 labels.
    """
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
    labels = torch.arange(num_samples) % num_classes
    return labels[torch.randperm(num_samples, generator=generator)]


def sample_class_conditional(
    pipeline: Any,
    num_samples: int,
    seed: int,
    num_inference_steps: int = 20,
    eta: float = 0.0,
    batch_size: int = 250,
    labels: Sequence[int] | torch.Tensor | None = None,
    show_progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a class-conditional pipeline with seeded, paired noise.

    One `torch.Generator` seeded with `seed` draws, in this order, the label permutation (when `labels` is not
    given) and the initial noise of all `num_samples` images at once; the pipeline then gets the noise of each batch
    as `latents`. So two models sampled with the same `seed` start from the same noise with the same labels (a paired
    comparison), and the result does not depend on `batch_size` for deterministic schedulers (`eta=0`). With
    `eta > 0` the same generator also draws the per-step noise, which is then paired as well as long as both runs
    use the same `batch_size` and number of steps.

    Args:
        pipeline:
            A pipeline with a `unet` (a class-conditional `UNet2DModel`) whose `__call__` takes
            `(class_labels, num_inference_steps=, eta=, generator=, latents=, output_type="pt")` and returns images in
            `[0, 1]`, such as [ClassConditionalDDIMPipeline][diffusers_qalora.testbed.ClassConditionalDDIMPipeline].
        num_samples (`int`):
            Number of images.
        seed (`int`):
            Seed of the generator.
        num_inference_steps (`int`, *optional*, defaults to `20`):
            Number of denoising steps.
        eta (`float`, *optional*, defaults to `0.0`):
            DDIM eta.
        batch_size (`int`, *optional*, defaults to `250`):
            Images per pipeline call.
        labels (`Sequence[int]` or `torch.Tensor`, *optional*):
            Labels to use instead of balanced ones; must hold `num_samples` labels.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm bar over batches (the pipeline's own per-step bar is disabled during the call).
        shard (`tuple[int, int]`, *optional*):
            ``(index, count)``: sample only the ``index``-th of ``count`` contiguous shares of the `num_samples`
            images (``index * N // count`` to ``(index + 1) * N // count``), with the same labels and noise as the
            unsharded call; concatenated in index order the shares are the unsharded result.  Used to spread
            evaluation over processes; needs ``eta=0`` (with ``eta > 0`` the per-step noise would depend on the
            share).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: images `(N, C, H, W)` float32 in `[0, 1]` on the CPU, and labels
        `(N,)` int64.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"`shard` must be (index, count) with 0 <= index < count, got {shard!r}.")
        if eta != 0.0 and count > 1:
            raise ValueError("`shard` needs `eta=0`: with eta > 0 the per-step noise depends on the share.")
    unet_config = pipeline.unet.config
    num_classes = unet_config.num_class_embeds
    if num_classes is None:
        raise ValueError("`pipeline.unet.config.num_class_embeds` is None: the pipeline is not class-conditional.")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if labels is None:
        labels = balanced_labels(num_samples, num_classes, generator=generator)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).clone()
        if labels.numel() != num_samples:
            raise ValueError(f"`labels` must hold `num_samples`={num_samples} labels, got {labels.numel()}.")
    size = unet_config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    # All noise is drawn up front on the CPU, so the pairing holds whatever the batch size or device.
    noise = torch.randn((num_samples, unet_config.in_channels, *size), generator=generator, dtype=torch.float32)
    first, last = 0, num_samples
    if shard is not None:
        first, last = shard[0] * num_samples // shard[1], (shard[0] + 1) * num_samples // shard[1]
        if first == last:  # more processes than samples: this one has none
            return noise[:0].clone(), labels[:0].clone()

    # The per-step bars of the pipeline would print once per batch; silence them and restore the user's setting.
    previous_config = dict(getattr(pipeline, "_progress_bar_config", {}))
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    chunks = []
    try:
        starts = range(first, last, batch_size)
        for start in tqdm(starts, desc="sampling", unit="batch", disable=not show_progress):
            stop = min(start + batch_size, last)
            out = pipeline(
                labels[start:stop],
                num_inference_steps=num_inference_steps,
                eta=eta,
                generator=generator,
                latents=noise[start:stop],
                output_type="pt",
            )
            chunks.append(out.images.detach().float().cpu())
    finally:
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline._progress_bar_config = previous_config
    return torch.cat(chunks), labels[first:last]
