"""The recipe that trains the embedded default model: a class-conditional DDPM and a digits classifier.

Run it from the repository root (a few minutes to a quarter of an hour on 2 CPU cores):

```bash
python -m diffusers_qalora.testbed.recipe --out diffusers_qalora/testbed/weights
```

It writes `unet.safetensors`, `classifier.safetensors` and `testbed.json` (configurations, split seed,
hyper-parameters, sha256 of the weight files, held-out accuracy, FP quality and timings). Everything is seeded; on
the same machine, torch version and thread count a rerun gives the same files.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..utils import atomic_write
from .data import DEFAULT_SPLIT_SEED, DigitsSplit, load_digits_split, to_model_range
from .loading import sha256_file
from .models import (
    DEFAULT_CLASSIFIER_CONFIG,
    DEFAULT_SCHEDULER_CONFIG,
    DEFAULT_UNET_CONFIG,
    DigitsClassifier,
    build_ddim_scheduler,
    build_ddpm_scheduler,
    build_unet,
)

__all__ = ["RECIPE_VERSION", "RecipeConfig", "main", "run_recipe", "train_classifier", "train_ddpm"]

logger = logging.getLogger(__name__)

# Bump when a change to the recipe changes the weights it produces; stored in testbed.json and in the safetensors
# metadata.
RECIPE_VERSION = "1"


@dataclass
class RecipeConfig:
    """Hyper-parameters of the testbed recipe.

    Args:
        seed (`int`, defaults to `0`): global seed of model initialisation, data order, noise and timesteps.
        split_seed (`int`, defaults to `0`): seed of the stratified train / held-out split.
        num_threads (`int`, defaults to `2`): torch CPU threads. On a machine shared with other jobs, `1` can be
            several times faster than `2` (oversubscribed threads wait on each other); the thread count also changes
            float rounding, so `testbed.json` records the value the shipped weights were trained with.
        classifier_epochs (`int`, defaults to `40`): classifier epochs over the train split.
        classifier_lr (`float`, defaults to `2e-3`): classifier peak learning rate (AdamW, cosine decay).
        classifier_batch_size (`int`, defaults to `128`): classifier batch size.
        classifier_max_shift (`int`, defaults to `2`): largest random shift (pixels at 16x16) of the augmentation.
        ddpm_steps (`int`, defaults to `2000`): DDPM optimisation steps.
        ddpm_lr (`float`, defaults to `1e-3`): DDPM peak learning rate (AdamW).
        ddpm_warmup_steps (`int`, defaults to `100`): linear warm-up steps of the DDPM learning rate.
        ddpm_min_lr_ratio (`float`, defaults to `0.05`): final / peak learning rate of the cosine decay.
        ddpm_batch_size (`int`, defaults to `128`): DDPM batch size.
        ddpm_weight_decay (`float`, defaults to `0.0`): AdamW weight decay of the DDPM.
        ddpm_grad_clip (`float`, defaults to `1.0`): gradient-norm clipping of the DDPM.
        ema_decay (`float`, defaults to `0.999`): EMA decay of the shipped DDPM weights (`0` disables the EMA).
        eval_samples (`int`, defaults to `1000`): samples of the final FP evaluation (`0` skips it).
        eval_steps (`int`, defaults to `20`): DDIM steps of the final evaluation.
        eval_seed (`int`, defaults to `0`): seed of the final evaluation.
    """

    seed: int = field(default=0, metadata={"help": "Global seed of initialisation, data order, noise and timesteps."})
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={"help": "Seed of the train / held-out split."})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads."})
    classifier_epochs: int = field(default=40, metadata={"help": "Classifier epochs over the train split."})
    classifier_lr: float = field(default=2e-3, metadata={"help": "Classifier peak learning rate."})
    classifier_batch_size: int = field(default=128, metadata={"help": "Classifier batch size."})
    classifier_max_shift: int = field(default=2, metadata={"help": "Largest random shift of the augmentation."})
    ddpm_steps: int = field(default=2000, metadata={"help": "DDPM optimisation steps."})
    ddpm_lr: float = field(default=1e-3, metadata={"help": "DDPM peak learning rate."})
    ddpm_warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps of the DDPM learning rate."})
    ddpm_min_lr_ratio: float = field(default=0.05, metadata={"help": "Final / peak DDPM learning rate."})
    ddpm_batch_size: int = field(default=128, metadata={"help": "DDPM batch size."})
    ddpm_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the DDPM."})
    ddpm_grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clipping of the DDPM."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the shipped DDPM weights (0: off)."})
    eval_samples: int = field(default=1000, metadata={"help": "Samples of the final FP evaluation (0: skip)."})
    eval_steps: int = field(default=20, metadata={"help": "DDIM steps of the final evaluation."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the final evaluation."})


def _cosine_lr(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in each direction, filling with background (-1).

    Digits are not mirror-symmetric, so shifts are the only augmentation: a flipped 2 or 7 is not a digit.
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches: one fresh permutation per epoch, the last short batch dropped."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def evaluate_classifier(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of `classifier` on `[0, 1]` images."""
    classifier.eval()
    predictions = classifier(to_model_range(images)).argmax(dim=1)
    return float((predictions == labels).double().mean())


def train_classifier(split: DigitsSplit, config: RecipeConfig) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train the digits classifier on the train split (random shifts), and measure it on the held-out split.

    Args:
        split ([DigitsSplit][diffusers_qalora.testbed.DigitsSplit]): the data; only `train_*` is trained on.
        config (`RecipeConfig`): hyper-parameters.

    Returns:
        `tuple[DigitsClassifier, dict]`: the classifier in eval mode and a summary (accuracies, time).
    """
    start_time = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    model = DigitsClassifier(**DEFAULT_CLASSIFIER_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.classifier_lr, weight_decay=1e-4)
    x_train = to_model_range(split.train_images)
    y_train = split.train_labels
    steps_per_epoch = len(y_train) // config.classifier_batch_size
    total = config.classifier_epochs * steps_per_epoch
    batches = _epoch_batches(len(y_train), config.classifier_batch_size, generator)
    model.train()
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = config.classifier_lr * _cosine_lr(step, total, steps_per_epoch, 0.0)
        idx = next(batches)
        x = _random_shift(x_train[idx], config.classifier_max_shift, generator)
        loss = F.cross_entropy(model(x), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    summary = {
        "train_accuracy": evaluate_classifier(model, split.train_images, split.train_labels),
        "heldout_accuracy": evaluate_classifier(model, split.heldout_images, split.heldout_labels),
        "steps": total,
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    logger.info("classifier: %s", summary)
    return model, summary


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train_ddpm(split: DigitsSplit, config: RecipeConfig, log_every: int = 100) -> tuple[nn.Module, dict[str, Any]]:
    """Train the class-conditional UNet with the epsilon-prediction DDPM loss on the train split.

    Args:
        split ([DigitsSplit][diffusers_qalora.testbed.DigitsSplit]): the data; only `train_*` is trained on.
        config (`RecipeConfig`): hyper-parameters.
        log_every (`int`, *optional*, defaults to `100`): steps between loss log lines.

    Returns:
        `tuple[UNet2DModel, dict]`: the shipped UNet (the EMA weights when `ema_decay > 0`) in eval mode, and a
        summary (final loss, time).
    """
    return train_denoiser(
        lambda: build_unet(DEFAULT_UNET_CONFIG),
        split,
        seed=config.seed,
        steps=config.ddpm_steps,
        batch_size=config.ddpm_batch_size,
        lr=config.ddpm_lr,
        weight_decay=config.ddpm_weight_decay,
        warmup_steps=config.ddpm_warmup_steps,
        min_lr_ratio=config.ddpm_min_lr_ratio,
        grad_clip=config.ddpm_grad_clip,
        ema_decay=config.ema_decay,
        log_every=log_every,
        log_name="ddpm",
    )


def train_denoiser(
    build: Callable[[], nn.Module],
    split: DigitsSplit,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    min_lr_ratio: float,
    grad_clip: float,
    ema_decay: float,
    log_every: int = 100,
    log_name: str = "denoiser",
) -> tuple[nn.Module, dict[str, Any]]:
    """The epsilon-prediction DDPM training loop shared by the UNet and the DiT recipes: AdamW with a cosine schedule
    after a linear warm-up, optional gradient clipping and an EMA copy.  ``build()`` is called after seeding, so the
    same seed gives the same initial weights, batches, noise and timesteps.

    Returns:
        `tuple[nn.Module, dict]`: the shipped model (the EMA weights when ``ema_decay > 0``) in eval mode, and a
        summary (final loss, time).
    """
    start_time = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 2)
    model = build()
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay > 0 else None
    noise_scheduler = build_ddpm_scheduler(DEFAULT_SCHEDULER_CONFIG)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    x_train = to_model_range(split.train_images)
    y_train = split.train_labels
    batches = _epoch_batches(len(y_train), batch_size, generator)
    model.train()
    running = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, warmup_steps, min_lr_ratio)
        idx = next(batches)
        x0, labels = x_train[idx], y_train[idx]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps, class_labels=labels).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if ema is not None:
            # Warm-up of the decay: early on the EMA would otherwise be dominated by the random initialisation.
            _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            logger.info(
                "%s step %d/%d loss %.4f (%.0f s)", log_name, step + 1, steps, running, time.perf_counter() - start_time
            )
    shipped = ema if ema is not None else model
    shipped.eval()
    return shipped, {"final_loss_ema": round(running, 5), "seconds": round(time.perf_counter() - start_time, 1)}


def _evaluate_fp(unet: nn.Module, classifier: nn.Module, split: DigitsSplit, config: RecipeConfig) -> dict[str, Any]:
    """Digits-FID and class accuracy of FP samples (the numbers quantized models are compared with)."""
    return evaluate_denoiser(
        unet, classifier, split, config.eval_samples, config.eval_seed, config.eval_steps, with_reference_fid=True
    )


def evaluate_denoiser(
    model: nn.Module,
    classifier: nn.Module,
    split: DigitsSplit,
    num_samples: int,
    seed: int,
    num_inference_steps: int,
    with_reference_fid: bool = False,
) -> dict[str, Any]:
    """Digits-FID against the held-out digits and class accuracy of ``num_samples`` DDIM samples (eta 0) of a
    class-conditional denoiser, as the recipes record them; ``with_reference_fid`` adds the FID of the train split
    against the held-out one (the floor of the metric)."""
    from ..evaluation import class_accuracy, digits_fid, sample_class_conditional
    from .pipeline import ClassConditionalDDIMPipeline

    start_time = time.perf_counter()
    pipe = ClassConditionalDDIMPipeline(unet=model, scheduler=build_ddim_scheduler(DEFAULT_SCHEDULER_CONFIG))
    images, labels = sample_class_conditional(
        pipe, num_samples, seed=seed, num_inference_steps=num_inference_steps, show_progress=False
    )
    result = {
        "num_samples": num_samples,
        "num_inference_steps": num_inference_steps,
        "eta": 0.0,
        "seed": seed,
        "digits_fid": round(digits_fid(images, split.heldout_images, classifier), 3),
        "class_accuracy": round(class_accuracy(images, labels, classifier), 4),
    }
    if with_reference_fid:
        result["reference_fid_train_vs_heldout"] = round(
            digits_fid(split.train_images, split.heldout_images, classifier), 3
        )
    result["seconds"] = round(time.perf_counter() - start_time, 1)
    return result


def _save_safetensors(module: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def run_recipe(out_dir: str | os.PathLike, config: RecipeConfig | None = None) -> dict[str, Any]:
    """Train both models and write the testbed files into `out_dir`.

    Args:
        out_dir (`str` or `os.PathLike`): output folder (created).
        config (`RecipeConfig`, *optional*): hyper-parameters; defaults to `RecipeConfig()`.

    Returns:
        `dict`: the content written to `testbed.json`.
    """
    config = config if config is not None else RecipeConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.num_threads)
    total_start = time.perf_counter()

    split = load_digits_split(config.split_seed)
    classifier, classifier_summary = train_classifier(split, config)
    unet, ddpm_summary = train_ddpm(split, config)
    evaluation = _evaluate_fp(unet, classifier, split, config) if config.eval_samples > 0 else None

    # Weights go to temporary names first and are renamed only once everything is written, so an interrupted run
    # never leaves a testbed.json that disagrees with the weights beside it.
    files = {"unet": out_dir / "unet.safetensors", "classifier": out_dir / "classifier.safetensors"}
    base_meta = {"recipe_version": RECIPE_VERSION, "format": "pt", "split_seed": str(config.split_seed)}
    tmp_files = {}
    for component, module, model_config in (
        ("unet", unet, dict(unet.config)),
        ("classifier", classifier, classifier.config),
    ):
        tmp = files[component].with_name(f".{files[component].name}.tmp")
        meta = {**base_meta, "component": component, "config": json.dumps(_jsonable(model_config), sort_keys=True)}
        _save_safetensors(module, tmp, meta)
        tmp_files[component] = tmp

    num_params = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "classifier": sum(p.numel() for p in classifier.parameters()),
    }
    record = {
        "recipe_version": RECIPE_VERSION,
        "unet_config": _jsonable(dict(unet.config)),
        "scheduler_config": dict(DEFAULT_SCHEDULER_CONFIG),
        "sampling_scheduler": "DDIMScheduler",
        "classifier_config": dict(classifier.config),
        "split": {"seed": split.seed, "train_size": len(split.train_labels), "heldout_size": len(split.heldout_labels)},
        "hyperparameters": asdict(config),
        "num_parameters": num_params,
        "dtype": "float32",
        "files": {
            component: {"name": path.name, "sha256": sha256_file(tmp_files[component])}
            for component, path in files.items()
        },
        "classifier_heldout_accuracy": classifier_summary["heldout_accuracy"],
        "classifier_train_accuracy": classifier_summary["train_accuracy"],
        "fp_evaluation": evaluation,
        "timing_seconds": {
            "classifier": classifier_summary["seconds"],
            "ddpm": ddpm_summary["seconds"],
            "evaluation": evaluation["seconds"] if evaluation else 0.0,
            "total": round(time.perf_counter() - total_start, 1),
        },
        "ddpm_final_loss_ema": ddpm_summary["final_loss_ema"],
        "environment": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "num_threads": config.num_threads,
        },
    }
    for component, path in files.items():
        os.replace(tmp_files[component], path)
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    atomic_write(out_dir / "testbed.json", lambda tmp: Path(tmp).write_text(text))
    return record


def _jsonable(value: Any) -> Any:
    """Turn configs (FrozenDict, tuples) into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; see `--help`."""
    defaults = RecipeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="diffusers_qalora/testbed/weights", help="output folder")
    for name, f in RecipeConfig.__dataclass_fields__.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)), default=None, help=f.metadata["help"]
        )
    args = parser.parse_args(argv)
    overrides = {
        name: getattr(args, name) for name in RecipeConfig.__dataclass_fields__ if getattr(args, name) is not None
    }
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = run_recipe(args.out, RecipeConfig(**overrides))
    print(
        json.dumps(
            {
                k: record[k]
                for k in ("num_parameters", "classifier_heldout_accuracy", "fp_evaluation", "timing_seconds")
            },
            indent=2,
        )
    )
    return record


if __name__ == "__main__":
    main()
