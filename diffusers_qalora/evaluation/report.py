"""Scoring sampled digits against the full-precision model and real digits, and tabulating methods over seeds."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .metrics import class_accuracy, digits_fid, paired_mse
from .sampling import sample_class_conditional


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def score_samples(
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.nn.Module,
    reference_images: torch.Tensor,
    fp_images: torch.Tensor | None = None,
) -> dict[str, float]:
    """Digits-FID against ``reference_images``, class accuracy, and the paired x0-MSE against ``fp_images`` (the
    full-precision samples from the same noise and labels) when given."""
    scores = {
        "fid": digits_fid(images, reference_images, classifier),
        "accuracy": class_accuracy(images, labels, classifier),
    }
    if fp_images is not None:
        scores["x0_mse"] = paired_mse(images, fp_images)
    return scores


def evaluate_seeds(
    pipeline: Any,
    classifier: torch.nn.Module,
    reference_images: torch.Tensor,
    seeds: Sequence[int],
    num_samples: int,
    num_inference_steps: int = 20,
    fp_samples: Mapping[int, torch.Tensor] | None = None,
    batch_size: int = 250,
    show_progress: bool = True,
    distributed: bool = False,
) -> dict[str, Any]:
    """Sample ``num_samples`` per seed with the pipeline's current model state and score each seed.

    With ``distributed=True`` and several processes (Accelerate's state), every process must call this: each
    samples its contiguous share of the images, the shares are all-gathered, and every process scores the whole set
    on its own (the metrics never synchronise), so all return the same summary, equal to the one-process result.

    Returns ``{"per_seed": [...], "samples": {seed: images}, "<metric>_mean": ..., "<metric>_std": ...}``.
    """
    shard = None
    if distributed:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:
            shard = (state.process_index, state.num_processes)
    per_seed, samples = [], {}
    for seed in seeds:
        images, labels = sample_class_conditional(
            pipeline,
            num_samples,
            seed,
            num_inference_steps=num_inference_steps,
            batch_size=batch_size,
            show_progress=show_progress,
            shard=shard,
        )
        if shard is not None:
            from accelerate.utils import gather_object

            shares = gather_object([(images, labels)])
            images, labels = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
        fp = None if fp_samples is None else fp_samples.get(seed)
        scores = score_samples(images, labels, classifier, reference_images, fp)
        per_seed.append({"seed": seed, **scores})
        samples[seed] = images
    summary: dict[str, Any] = {"per_seed": per_seed, "samples": samples}
    for key in per_seed[0]:
        if key == "seed":
            continue
        summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std([s[key] for s in per_seed])
    return summary


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What a benchmark result needs to say about where it ran."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "cpu": cpu,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def format_metric(mean: float, std: float | None, digits: int = 2) -> str:
    """``mean ± std``, or the value alone when there is no spread to report (``std=None``: a single seed)."""
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def fid_ratio_to_fp(row: Mapping[str, Any], fp_row: Mapping[str, Any]) -> tuple[float, float | None] | None:
    """FID / FP-FID taken per seed (both rows sample the same noise per seed, so most of the FID's seed-to-seed
    noise cancels), then its mean and standard deviation over seeds (``None`` for one seed).  ``None`` when the rows
    do not hold per-seed FIDs of the same seeds."""
    fid = {s["seed"]: s["fid"] for s in row.get("per_seed", ()) if "seed" in s and "fid" in s}
    fp = {s["seed"]: s["fid"] for s in fp_row.get("per_seed", ()) if "seed" in s and "fid" in s}
    if not fid or set(fid) != set(fp):
        return None
    mean, std = mean_std([fid[k] / fp[k] for k in sorted(fid)])
    return mean, (std if len(fid) > 1 else None)


def results_markdown(rows: Sequence[Mapping[str, Any]], title: str, command: str, notes: str = "") -> str:
    """A Markdown table of method rows holding ``fid_mean/std``, ``accuracy_mean/std`` and optionally ``x0_mse``;
    with a row of method ``"FP"`` among them, also each method's FID / FP per seed (see `fid_ratio_to_fp`)."""
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    if notes:
        lines += [notes, ""]
    fp_row = next((r for r in rows if r.get("method") == "FP"), None)
    lines += [
        "| method | bits (W/A) | digits-FID | FID / FP | accuracy (%) | x0-MSE vs FP | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one_seed = len(r.get("per_seed", ())) == 1  # no spread over seeds to report

        def spread(key: str, scale: float = 1.0, r=r, one_seed=one_seed) -> float | None:
            return None if one_seed else scale * r[key]

        mse = format_metric(r["x0_mse_mean"], spread("x0_mse_std"), 5) if "x0_mse_mean" in r else "—"
        acc = format_metric(100 * r["accuracy_mean"], spread("accuracy_std", 100), 1)
        ratio = None if fp_row is None else fid_ratio_to_fp(r, fp_row)
        rel = "—" if ratio is None else format_metric(*ratio, 3)
        secs = f"{r['seconds']:.0f}" if "seconds" in r else ""
        lines.append(
            f"| {r['method']} | {r.get('bits', 'fp32')} | {format_metric(r['fid_mean'], spread('fid_std'))} "
            f"| {rel} | {acc} | {mse} | {secs} |"
        )
    return "\n".join(lines) + "\n"


def write_results(directory: str | os.PathLike, name: str, payload: Mapping[str, Any], markdown: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown, encoding="utf-8")
    return out
