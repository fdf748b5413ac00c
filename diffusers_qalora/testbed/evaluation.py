"""Evaluation on the embedded digits DDPM: the full-precision model and the PTQ baselines at several bit widths.

``examples/evaluate.py`` is a thin command line over `run_ptq_evaluation`; the distillation job reuses the helpers.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ..evaluation.baselines import add_calibrated_adapter, baseline_config
from ..evaluation.plots import plot_step_sizes, save_image_grid
from ..evaluation.report import evaluate_seeds, machine_info, results_markdown
from ..quant import TemporalActQuantizer
from ..tuners.qalora.api import (
    adapters_disabled,
    copy_activation_calibration,
    get_qalora_model,
    set_qalora_adapter,
    timestep_table,
)
from ..tuners.qalora.model import qalora_layers
from .loading import Testbed, load_testbed

PTQ_METHODS = ("fp", "naive_ptq", "timestep_ptq")
METHOD_LABELS = {
    "fp": "FP",
    "naive_ptq": "naive PTQ",
    "timestep_ptq": "per-timestep PTQ",
    "distilled": "QALoRA distilled",
}


def calibration_run(testbed: Testbed, num_samples: int, steps: int) -> Callable[[], None]:
    """A callable sampling ``num_samples`` balanced full-precision trajectories of ``steps`` DDIM steps."""
    labels = torch.arange(num_samples) % 10

    def run() -> None:
        generator = torch.Generator().manual_seed(1234)
        testbed.pipeline(labels, num_inference_steps=steps, generator=generator, output_type="pt")

    return run


def step_size_table(model: torch.nn.Module, adapter: str, limit: int = 6) -> dict[str, tuple[list[float], list[float]]]:
    """Per-timestep activation step sizes of ``limit`` evenly chosen layers: ``name -> (timesteps, steps)``."""
    table = {}
    for name, layer in qalora_layers(model).items():
        if adapter not in layer.qal_act_quantizer:
            continue
        quantizer = layer.qal_act_quantizer[adapter]
        if isinstance(quantizer, TemporalActQuantizer) and len(quantizer.step) > 1:
            table[name] = (quantizer.timesteps.tolist(), quantizer.step.stacked().detach().tolist())
    if len(table) > limit:
        keys = list(table)
        table = {k: table[k] for k in (keys[round(i * (len(keys) - 1) / (limit - 1))] for i in range(limit))}
    return table


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss``), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def public(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without its sample tensors (for JSON)."""
    return {k: v for k, v in summary.items() if k != "samples"}


class MethodEvaluator:
    """Samples and scores the testbed pipeline in its current state; keeps the FP samples for paired scores.

    With ``distributed=True`` every process of the run must call it: each samples its share, all score the gathered
    set (see [`evaluate_seeds`]); the main process alone writes the sample grids."""

    def __init__(
        self,
        testbed: Testbed,
        out: Path,
        samples: int,
        seeds: Sequence[int],
        steps: int,
        save_grids: bool = True,
        distributed: bool = False,
    ) -> None:
        self.testbed, self.out, self.samples, self.seeds, self.steps = testbed, out, samples, tuple(seeds), steps
        self.save_grids, self.distributed = save_grids, distributed
        self.fp_samples: dict[int, torch.Tensor] | None = None

    def __call__(self, name: str) -> dict[str, Any]:
        start = time.perf_counter()
        summary = evaluate_seeds(
            self.testbed.pipeline,
            self.testbed.classifier,
            self.testbed.reference_images,
            self.seeds,
            self.samples,
            self.steps,
            fp_samples=self.fp_samples,
            show_progress=False,
            distributed=self.distributed,
        )
        summary["seconds"] = time.perf_counter() - start
        if self.save_grids and (not self.distributed or PartialState().is_main_process):
            save_image_grid(summary["samples"][self.seeds[0]][:100], self.out / f"grid_{name}.png", nrow=10)
        return summary

    def fp(self) -> dict[str, Any]:
        with adapters_disabled(self.testbed.unet):
            summary = self("fp")
        self.fp_samples = summary["samples"]
        return summary


def add_ptq_baselines(
    unet: torch.nn.Module,
    testbed: Testbed,
    weight_bits: int,
    act_bits: int,
    table: list[float],
    calibration_samples: int,
    suffix: str = "",
) -> tuple[str, str]:
    """Add the per-timestep and naive PTQ adapters (one calibration run serves both); returns their names."""
    per_t, naive = f"timestep_ptq{suffix}", f"naive_ptq{suffix}"
    add_calibrated_adapter(
        unet,
        baseline_config("timestep_ptq", weight_bits, act_bits, table),
        per_t,
        calibration_run(testbed, calibration_samples, len(table)),
    )
    get_qalora_model(unet, baseline_config("naive_ptq", weight_bits, act_bits, table), naive)
    copy_activation_calibration(unet, per_t, naive)
    return per_t, naive


def run_ptq_evaluation(
    output_dir: str | Path,
    bits: Sequence[tuple[int, int]] = ((8, 8), (4, 8), (4, 4)),
    methods: Sequence[str] = PTQ_METHODS,
    samples: int = 1000,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 20,
    table_steps: int = 100,
    calibration_samples: int = 64,
    command: str = "",
    testbed: Testbed | None = None,
) -> dict[str, Any]:
    """FP and PTQ baselines at each ``(weight_bits, act_bits)``; writes ``results.json``, ``results.md``, grids and
    step-size plots into ``output_dir``."""
    bad = [m for m in methods if m not in PTQ_METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {PTQ_METHODS}.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    testbed = testbed or load_testbed()
    unet = testbed.unet
    table = timestep_table(testbed.pipeline.scheduler, table_steps)
    evaluate = MethodEvaluator(testbed, out, samples, seeds, steps)
    rows = []
    tasks = [("fp", None)] + [(m, b) for b in bits for m in methods if m != "fp"]
    bar = tqdm(tasks, desc="evaluate", dynamic_ncols=True)
    for method, wa in bar:
        bar.set_postfix(method=method, bits="fp32" if wa is None else f"W{wa[0]}A{wa[1]}")
        if method == "fp":
            summary = evaluate.fp()
            if "fp" in methods:
                rows.append({"method": "FP", "bits": "fp32", **public(summary)})
            continue
        suffix = f"_w{wa[0]}a{wa[1]}"
        if f"timestep_ptq{suffix}" not in (getattr(unet, "peft_config", None) or {}):
            add_ptq_baselines(unet, testbed, wa[0], wa[1], table, calibration_samples, suffix)
        name = f"{method}{suffix}"
        set_qalora_adapter(unet, name)
        rows.append({"method": METHOD_LABELS[method], "bits": f"W{wa[0]}A{wa[1]}", **public(evaluate(name))})
        if method == "timestep_ptq":
            plot_step_sizes(
                step_size_table(unet, name),
                out / f"step_sizes_{name}.png",
                title=f"Calibrated activation step size per timestep, W{wa[0]}A{wa[1]}",
            )
    results = {
        "command": command,
        "machine": machine_info(),
        "protocol": {
            "samples_per_seed": samples,
            "seeds": list(seeds),
            "ddim_steps": steps,
            "eta": 0.0,
            "table_steps": table_steps,
            "calibration_samples": calibration_samples,
        },
        "rows": rows,
        "peak_rss_mb": peak_rss_mb(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    notes = (
        f"{samples} samples per seed, seeds {list(seeds)}, {steps} DDIM steps (eta 0), mean ± std over seeds. "
        f"Step sizes per timestep interpolated from the {table_steps}-step table. x0-MSE: each sample against the "
        f"FP sample from the same noise and label."
    )
    (out / "results.md").write_text(
        results_markdown(rows, "PTQ baselines on the embedded digits DDPM", command, notes), encoding="utf-8"
    )
    return results
