"""The main job on the embedded default model: PTQ baselines, data-free distillation and their evaluation.

``examples/distill.py`` (no arguments) and the benchmarks call [`run_embedded_job`]; it writes an output folder with
the adapter, ``results.json``, a Markdown report, sample grids and step-size plots.
"""

from __future__ import annotations

import copy
import json
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

from ..evaluation.baselines import add_calibrated_adapter, baseline_config
from ..evaluation.plots import plot_step_sizes, save_image_grid
from ..evaluation.report import evaluate_seeds, machine_info, results_markdown
from ..quant import TemporalActQuantizer
from ..testbed import Testbed, load_testbed
from ..tuners.qalora.api import adapters_disabled, set_qalora_adapter
from ..tuners.qalora.config import QALoraConfig
from ..tuners.qalora.model import qalora_layers
from .conditioning import ClassLabelConditioning
from .trainer import DataFreeDistiller, DistillConfig

METHODS = ("fp", "naive_ptq", "timestep_ptq", "distilled")


@dataclass
class EmbeddedJobConfig:
    """What the embedded-model job runs.

    Args:
        weight_bits / act_bits (`int`): 4/4 by default (W4A4).
        rank (`int`): LoRA rank of the distilled adapter.
        distill (`DistillConfig`): the distillation hyper-parameters.
        table_steps (`int`): DDIM steps whose timesteps form the activation step-size table (and the trajectories).
        calibration_samples (`int`): trajectories sampled for activation calibration.
        eval_samples / eval_seeds / eval_steps: evaluation protocol (DDIM, eta 0).
        methods (`tuple[str, ...]`): any of ``fp``, ``naive_ptq``, ``timestep_ptq``, ``distilled``.
        qalora_overrides (`dict`): extra ``QALoraConfig`` fields of the distilled adapter (ablations).
    """

    weight_bits: int = 4
    act_bits: int = 4
    rank: int = 32
    distill: DistillConfig = field(default_factory=DistillConfig)
    table_steps: int = 100
    calibration_samples: int = 64
    eval_samples: int = 500
    eval_seeds: tuple[int, ...] = (0,)
    eval_steps: int = 20
    methods: tuple[str, ...] = METHODS
    qalora_overrides: dict[str, Any] = field(default_factory=dict)
    save_grids: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {METHODS}.")


def timestep_table(scheduler: Any, num_inference_steps: int) -> list[float]:
    """The sorted timesteps a scheduler visits in ``num_inference_steps`` steps: the table of the temporal step sizes."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps)
    return sorted({float(t) for t in scheduler.timesteps.tolist()})


def _calibration_run(testbed: Testbed, num_samples: int, steps: int):
    labels = torch.arange(num_samples) % 10

    def run() -> None:
        generator = torch.Generator().manual_seed(1234)
        testbed.pipeline(labels, num_inference_steps=steps, generator=generator, output_type="pt")

    return run


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def step_size_table(model: torch.nn.Module, adapter: str, layers: Sequence[str] | None = None,
                    limit: int = 6) -> dict[str, tuple[list[float], list[float]]]:
    """Per-timestep activation step sizes of some layers (for plots): ``name -> (timesteps, steps)``."""
    table = {}
    for name, layer in qalora_layers(model).items():
        if adapter not in layer.qal_act_quantizer:
            continue
        quantizer = layer.qal_act_quantizer[adapter]
        if not isinstance(quantizer, TemporalActQuantizer) or len(quantizer.step) < 2:
            continue
        if layers is not None and name not in layers:
            continue
        table[name] = (quantizer.timesteps.tolist(), quantizer.step.stacked().detach().tolist())
    if layers is None and len(table) > limit:
        keys = list(table)
        picks = [keys[round(i * (len(keys) - 1) / (limit - 1))] for i in range(limit)]
        table = {k: table[k] for k in picks}
    return table


def run_embedded_job(
    config: EmbeddedJobConfig,
    output_dir: str | Path,
    command: str = "",
    resume_from_checkpoint: str | None = None,
    mixed_precision: str | None = None,
    report_to: str | None = None,
    testbed: Testbed | None = None,
) -> dict[str, Any]:
    """Run the job; returns (and writes as ``results.json``) the scores of every method."""
    out = Path(output_dir)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main = accelerator.is_main_process
    testbed = testbed or load_testbed(device=accelerator.device)
    unet, pipeline = testbed.unet, testbed.pipeline
    table = timestep_table(pipeline.scheduler, config.table_steps)
    calibrate = _calibration_run(testbed, config.calibration_samples, config.table_steps)
    bits = f"W{config.weight_bits}A{config.act_bits}"
    results: dict[str, Any] = {
        "command": command,
        "config": _jsonable(asdict(config)),
        "machine": machine_info(),
        "eval_protocol": {"samples_per_seed": config.eval_samples, "seeds": list(config.eval_seeds),
                          "ddim_steps": config.eval_steps, "eta": 0.0, "table_steps": config.table_steps},
        "methods": {},
    }
    rows = []

    def evaluate(name: str, fp_samples=None) -> dict[str, Any]:
        start = time.perf_counter()
        summary = evaluate_seeds(pipeline, testbed.classifier, testbed.reference_images, config.eval_seeds,
                                 config.eval_samples, config.eval_steps, fp_samples=fp_samples,
                                 show_progress=False)
        summary["seconds"] = time.perf_counter() - start
        if config.save_grids:
            save_image_grid(summary["samples"][config.eval_seeds[0]][:100], out / f"grid_{name}.png", nrow=10)
        return summary

    if main:
        out.mkdir(parents=True, exist_ok=True)
    # Every process builds the same adapters (deterministic calibration), so DDP sees identical models; only the
    # main process samples and scores.
    labels = {"naive_ptq": "naive PTQ", "timestep_ptq": "per-timestep PTQ"}
    baselines = [k for k in ("naive_ptq", "timestep_ptq") if k in config.methods]
    for kind in baselines:
        add_calibrated_adapter(unet, baseline_config(kind, config.weight_bits, config.act_bits, table), kind, calibrate)
    if "distilled" in config.methods:
        cfg = QALoraConfig(r=config.rank, lora_alpha=config.rank, weight_bits=config.weight_bits,
                           act_bits=config.act_bits, timesteps=table, **config.qalora_overrides)
        add_calibrated_adapter(unet, cfg, "distilled", calibrate)
    if main:
        # The FP samples are always drawn: every quantized method is scored against them (paired x0-MSE).
        with adapters_disabled(unet):
            fp = evaluate("fp")
        if "fp" in config.methods:
            rows.append({"method": "FP", "bits": "fp32", **_public(fp)})
        for kind in baselines:
            set_qalora_adapter(unet, kind)
            rows.append({"method": labels[kind], "bits": bits, **_public(evaluate(kind, fp["samples"]))})
    if "distilled" in config.methods:
        set_qalora_adapter(unet, "distilled", trainable=True)
        distiller = DataFreeDistiller(unet, pipeline.scheduler, ClassLabelConditioning(10), (1, 16, 16),
                                      config.distill, out, accelerator=accelerator)
        train = distiller.train(resume_from_checkpoint=resume_from_checkpoint)
        distiller.save_adapter(out / "adapter")
        if main:
            set_qalora_adapter(unet, "distilled")
            summary = evaluate("distilled", fp["samples"])
            rows.append({"method": "QALoRA distilled", "bits": bits, **_public(summary),
                         "train_seconds": train["train_seconds"], "train_steps": train["steps"]})
            results["training"] = {k: v for k, v in train.items() if k != "history"}
            results["training"]["loss_history"] = [h["loss"] for h in train["history"]]
            plot_step_sizes(step_size_table(unet, "distilled"), out / "step_sizes_distilled.png",
                            title="Distilled activation step size per timestep (selected layers)")
    if main and "timestep_ptq" in config.methods:
        plot_step_sizes(step_size_table(unet, "timestep_ptq"), out / "step_sizes_timestep_ptq.png",
                        title="Calibrated activation step size per timestep (selected layers)")
    if main:
        results["methods"] = {r["method"]: r for r in rows}
        results["peak_rss_mb"] = _peak_rss_mb()
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        (out / "report.md").write_text(
            results_markdown(rows, f"Embedded digits DDPM, {bits}", command,
                             notes=f"{config.eval_samples} samples x seeds {list(config.eval_seeds)}, "
                                   f"{config.eval_steps} DDIM steps (eta 0); step sizes interpolated from the "
                                   f"{config.table_steps}-step table. x0-MSE: each sample against the FP sample from "
                                   f"the same noise and label."),
            encoding="utf-8",
        )
    accelerator.wait_for_everyone()
    return results


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "samples"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
