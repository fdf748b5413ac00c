"""The main job on the embedded default model: PTQ baselines, data-free distillation and their evaluation.

``examples/distill.py`` (no arguments) and the benchmarks call `run_embedded_job`; it writes an output folder with
the adapter, ``results.json``, a Markdown report, sample grids and step-size plots.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from ..evaluation.plots import plot_step_sizes
from ..evaluation.report import machine_info, results_markdown
from ..testbed import Testbed, load_testbed
from ..testbed.evaluation import (
    METHOD_LABELS,
    MethodEvaluator,
    add_ptq_baselines,
    peak_rss_mb,
    public,
    step_size_table,
)
from ..tuners.qalora.api import copy_activation_calibration, get_qalora_model, set_qalora_adapter, timestep_table
from ..tuners.qalora.config import QALoraConfig
from .conditioning import ClassLabelConditioning
from .trainer import DataFreeDistiller, DistillConfig

METHODS = ("fp", "naive_ptq", "timestep_ptq", "distilled")
__all__ = ["METHODS", "EmbeddedJobConfig", "run_embedded_job", "timestep_table"]


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
    # As diffusers' training scripts do: the LoRA factors are drawn at injection, so without a seed two runs of the
    # same command train from different starting points (and end up a few FID points apart).
    set_seed(config.distill.seed)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    testbed = testbed or load_testbed(device=accelerator.device)
    unet = testbed.unet
    table = timestep_table(testbed.pipeline.scheduler, config.table_steps)
    bits = f"W{config.weight_bits}A{config.act_bits}"
    results: dict[str, Any] = {
        "command": command,
        "config": _jsonable(asdict(config)),
        "machine": machine_info(),
        "num_processes": accelerator.num_processes,
        "eval_protocol": {"samples_per_seed": config.eval_samples, "seeds": list(config.eval_seeds),
                          "ddim_steps": config.eval_steps, "eta": 0.0, "table_steps": config.table_steps},
    }
    # Every process builds the same adapters (deterministic calibration), so DDP sees identical models; only the
    # main process samples and scores.  Calibration observes the full-precision model, so one calibrated run serves
    # every adapter: the per-timestep table is measured once, then averaged (naive PTQ) or copied (distilled).
    add_ptq_baselines(unet, testbed, config.weight_bits, config.act_bits, table, config.calibration_samples)
    if "distilled" in config.methods:
        cfg = QALoraConfig(r=config.rank, lora_alpha=config.rank, weight_bits=config.weight_bits,
                           act_bits=config.act_bits, timesteps=table, **config.qalora_overrides)
        get_qalora_model(unet, cfg, "distilled")
        copy_activation_calibration(unet, "timestep_ptq", "distilled")
    rows = []
    evaluate = MethodEvaluator(testbed, out, config.eval_samples, config.eval_seeds, config.eval_steps,
                               config.save_grids)
    if main:
        fp = evaluate.fp()  # always drawn: every quantized method is scored against these samples
        if "fp" in config.methods:
            rows.append({"method": "FP", "bits": "fp32", **public(fp)})
        for kind in ("naive_ptq", "timestep_ptq"):
            if kind in config.methods:
                set_qalora_adapter(unet, kind)
                rows.append({"method": METHOD_LABELS[kind], "bits": bits, **public(evaluate(kind))})
        plot_step_sizes(step_size_table(unet, "timestep_ptq"), out / "step_sizes_timestep_ptq.png",
                        title="Calibrated activation step size per timestep (selected layers)")
    if "distilled" in config.methods:
        set_qalora_adapter(unet, "distilled", trainable=True)
        distiller = DataFreeDistiller(unet, testbed.pipeline.scheduler, ClassLabelConditioning(10), (1, 16, 16),
                                      config.distill, out, accelerator=accelerator)
        train = distiller.train(resume_from_checkpoint=resume_from_checkpoint)
        distiller.save_adapter(out / "adapter")
        if main:
            set_qalora_adapter(unet, "distilled")
            rows.append({"method": METHOD_LABELS["distilled"], "bits": bits, **public(evaluate("distilled")),
                         "train_seconds": train["train_seconds"], "train_steps": train["steps"]})
            results["training"] = {k: v for k, v in train.items() if k != "history"}
            results["training"]["loss_history"] = [h["loss"] for h in train["history"]]
            plot_step_sizes(step_size_table(unet, "distilled"), out / "step_sizes_distilled.png",
                            title="Distilled activation step size per timestep (selected layers)")
    if main:
        results["methods"] = {r["method"]: r for r in rows}
        results["peak_rss_mb"] = peak_rss_mb()
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        notes = (f"{config.eval_samples} samples x seeds {list(config.eval_seeds)}, {config.eval_steps} DDIM steps "
                 f"(eta 0); step sizes interpolated from the {config.table_steps}-step table. x0-MSE: each sample "
                 f"against the FP sample from the same noise and label.")
        (out / "report.md").write_text(results_markdown(rows, f"Embedded digits DDPM, {bits}", command, notes),
                                       encoding="utf-8")
    accelerator.wait_for_everyone()
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
