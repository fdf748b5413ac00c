"""The recipe that trains the embedded DiT: a class-conditional SD3-style transformer on the same digits as the UNet.

Run it from the repository root (about 25 minutes of one CPU core plus the final evaluation; the shipped run's wall
time, on a machine shared with other jobs, is in `dit.json`):

```bash
python -m diffusers_qalora.testbed.dit_recipe --out diffusers_qalora/testbed/weights
```

It writes `dit.safetensors` and `dit.json` (configuration, hyper-parameters, sha256, FP quality and timings) next to
the UNet's files. The DiT is trained on the UNet's train split with the UNet's noise schedule and loss (epsilon
prediction, cosine betas), and scored with the UNet's classifier on the same held-out digits, so its numbers and the
UNet's are directly comparable. Everything is seeded; on the same machine, torch version and thread count a rerun
gives the same file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors.torch import load_file
from torch import nn

from ..utils import atomic_write
from .data import DEFAULT_SPLIT_SEED, DigitsSplit, load_digits_split
from .dit import DEFAULT_DIT_CONFIG, build_dit
from .loading import WEIGHTS_DIR, read_testbed_config, sha256_file, verify_weights
from .models import DEFAULT_SCHEDULER_CONFIG, DigitsClassifier
from .recipe import _jsonable, _save_safetensors, evaluate_denoiser, train_denoiser

__all__ = ["DIT_CONFIG_NAME", "DIT_RECIPE_VERSION", "DitRecipeConfig", "main", "run_dit_recipe", "train_dit"]

logger = logging.getLogger(__name__)

# Bump when a change to the recipe changes the weights it produces; stored in dit.json and the safetensors metadata.
DIT_RECIPE_VERSION = "1"
DIT_CONFIG_NAME = "dit.json"


@dataclass
class DitRecipeConfig:
    """Hyper-parameters of the DiT recipe (same loss, schedule and data as the UNet's recipe).

    Args:
        seed (`int`, defaults to `0`): global seed of initialisation, data order, noise and timesteps.
        split_seed (`int`, defaults to `0`): seed of the train / held-out split (must match the UNet testbed's).
        num_threads (`int`, defaults to `1`): torch CPU threads (recorded: the thread count changes float rounding).
        num_layers / attention_head_dim / num_attention_heads (`int`): the transformer's size.
        steps (`int`, defaults to `3000`): optimisation steps.
        lr (`float`, defaults to `1e-3`): peak learning rate (AdamW, linear warm-up, cosine decay).
        warmup_steps (`int`, defaults to `100`): warm-up steps.
        min_lr_ratio (`float`, defaults to `0.05`): final / peak learning rate.
        batch_size (`int`, defaults to `128`): batch size (the UNet's).
        weight_decay (`float`, defaults to `0.0`): AdamW weight decay.
        grad_clip (`float`, defaults to `1.0`): gradient-norm clipping.
        ema_decay (`float`, defaults to `0.999`): EMA decay of the shipped weights (`0` disables the EMA).
        eval_samples / eval_steps / eval_seed: the final FP evaluation (`eval_samples=0` skips it).
    """

    seed: int = field(default=0, metadata={"help": "Global seed of initialisation, data order, noise and timesteps."})
    split_seed: int = field(default=DEFAULT_SPLIT_SEED, metadata={"help": "Seed of the train / held-out split."})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads."})
    num_layers: int = field(default=DEFAULT_DIT_CONFIG["num_layers"], metadata={"help": "Joint transformer blocks."})
    attention_head_dim: int = field(default=DEFAULT_DIT_CONFIG["attention_head_dim"], metadata={"help": "Head width."})
    num_attention_heads: int = field(default=DEFAULT_DIT_CONFIG["num_attention_heads"], metadata={"help": "Heads."})
    steps: int = field(default=3000, metadata={"help": "Optimisation steps."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps of the learning rate."})
    min_lr_ratio: float = field(default=0.05, metadata={"help": "Final / peak learning rate."})
    batch_size: int = field(default=128, metadata={"help": "Batch size."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clipping."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the shipped weights (0: off)."})
    eval_samples: int = field(default=1000, metadata={"help": "Samples of the final FP evaluation (0: skip)."})
    eval_steps: int = field(default=20, metadata={"help": "DDIM steps of the final evaluation."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the final evaluation."})

    def model_config(self) -> dict[str, Any]:
        """Keyword arguments of [`~diffusers_qalora.testbed.ClassConditionalTransformer`]."""
        return {
            **DEFAULT_DIT_CONFIG,
            "num_layers": self.num_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
        }


def train_dit(split: DigitsSplit, config: DitRecipeConfig, log_every: int = 100) -> tuple[nn.Module, dict[str, Any]]:
    """Train the class-conditional transformer with the epsilon-prediction DDPM loss on the train split.

    Returns:
        `tuple[ClassConditionalTransformer, dict]`: the shipped model (the EMA weights when `ema_decay > 0`) in eval
        mode, and a summary (final loss, time).
    """
    return train_denoiser(
        lambda: build_dit(config.model_config()),
        split,
        seed=config.seed,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr_ratio,
        grad_clip=config.grad_clip,
        ema_decay=config.ema_decay,
        log_every=log_every,
        log_name="dit",
    )


def _load_classifier(weights_dir: Path) -> DigitsClassifier:
    """The UNet testbed's classifier (the DiT is scored with the same one)."""
    testbed_config = read_testbed_config(weights_dir)
    verify_weights(weights_dir, testbed_config)
    classifier = DigitsClassifier(**testbed_config["classifier_config"])
    classifier.load_state_dict(load_file(str(weights_dir / testbed_config["files"]["classifier"]["name"])))
    return classifier.eval().requires_grad_(False)


def run_dit_recipe(
    out_dir: str | os.PathLike, config: DitRecipeConfig | None = None, classifier_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Train the DiT and write `dit.safetensors` and `dit.json` into `out_dir`.

    Args:
        out_dir (`str` or `os.PathLike`): output folder (created).
        config ([`DitRecipeConfig`], *optional*): hyper-parameters; defaults to `DitRecipeConfig()`.
        classifier_dir (`str` or `os.PathLike`, *optional*): folder of the UNet testbed whose classifier scores the
            FP evaluation; defaults to the shipped weights.

    Returns:
        `dict`: the content written to `dit.json`.
    """
    config = config if config is not None else DitRecipeConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.num_threads)
    total_start = time.perf_counter()

    split = load_digits_split(config.split_seed)
    model, train_summary = train_dit(split, config)
    evaluation = None
    if config.eval_samples > 0:
        classifier = _load_classifier(Path(classifier_dir) if classifier_dir is not None else WEIGHTS_DIR)
        evaluation = evaluate_denoiser(
            model, classifier, split, config.eval_samples, config.eval_seed, config.eval_steps
        )

    path = out_dir / "dit.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {
        "recipe_version": DIT_RECIPE_VERSION,
        "format": "pt",
        "split_seed": str(config.split_seed),
        "component": "dit",
        "config": json.dumps(_jsonable(dict(model.config)), sort_keys=True),
    }
    _save_safetensors(model, tmp, meta)
    record = {
        "recipe_version": DIT_RECIPE_VERSION,
        "model_class": "ClassConditionalTransformer",
        "transformer_class": "SD3Transformer2DModel",
        "dit_config": _jsonable(dict(model.config)),
        "scheduler_config": dict(DEFAULT_SCHEDULER_CONFIG),
        "sampling_scheduler": "DDIMScheduler",
        "split": {"seed": split.seed, "train_size": len(split.train_labels), "heldout_size": len(split.heldout_labels)},
        "hyperparameters": asdict(config),
        "num_parameters": {"dit": sum(p.numel() for p in model.parameters())},
        "dtype": "float32",
        "files": {"dit": {"name": path.name, "sha256": sha256_file(tmp)}},
        "fp_evaluation": evaluation,
        "timing_seconds": {
            "dit": train_summary["seconds"],
            "evaluation": evaluation["seconds"] if evaluation else 0.0,
            "total": round(time.perf_counter() - total_start, 1),
        },
        "dit_final_loss_ema": train_summary["final_loss_ema"],
        "environment": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "num_threads": config.num_threads,
        },
    }
    os.replace(tmp, path)
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out_dir / DIT_CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; see `--help`."""
    defaults = DitRecipeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="diffusers_qalora/testbed/weights", help="output folder")
    parser.add_argument("--classifier-dir", default=None, help="UNet testbed folder whose classifier scores the DiT")
    for name, f in DitRecipeConfig.__dataclass_fields__.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)), default=None, help=f.metadata["help"]
        )
    args = parser.parse_args(argv)
    overrides = {
        name: getattr(args, name) for name in DitRecipeConfig.__dataclass_fields__ if getattr(args, name) is not None
    }
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = run_dit_recipe(args.out, DitRecipeConfig(**overrides), args.classifier_dir)
    print(json.dumps({k: record[k] for k in ("num_parameters", "fp_evaluation", "timing_seconds")}, indent=2))
    return record


if __name__ == "__main__":
    main()
