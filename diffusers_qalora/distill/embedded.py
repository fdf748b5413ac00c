"""The main job on the embedded default model: PTQ baselines, data-free distillation and their evaluation.

``examples/distill.py`` (no arguments) and the benchmarks call `run_embedded_job`; it writes an output folder with
the adapter, ``results.json``, a Markdown report, sample grids and step-size plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType, gather_object, set_seed

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
from .distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, broadcast_module_state, distributed_phase, make_accelerator
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
        model (`str`): the embedded denoiser, ``"unet"`` (the digits DDPM) or ``"dit"`` (the digits DiT).
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
    model: str = "unet"

    def __post_init__(self) -> None:
        if self.model not in ("unet", "dit"):
            raise ValueError(f"model must be 'unet' or 'dit', got {self.model!r}.")
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
    collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
) -> dict[str, Any]:
    """Run the job; returns (and writes as ``results.json``) the scores of every method.

    On several processes (``accelerate launch --num_processes N``) every process runs every phase: calibration is
    replicated (then the main process's adapters are broadcast, so all hold the same bits), evaluation and training
    are split across the processes, and files are written by the main process while the others wait at a barrier.
    Every process returns the same scores."""
    job_start = time.perf_counter()
    phase_seconds: dict[str, float] = {}
    out = Path(output_dir)
    accelerator = make_accelerator(out, mixed_precision, report_to, collective_timeout)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # The evaluation reads the model's own parameters, which a sharding engine leaves as shards.
        raise SystemExit(
            f"error: the embedded model (a few MB) trains on one process or several with DDP, not with "
            f"{accelerator.distributed_type.value}; launch without --use_fsdp / --use_deepspeed (sharding is for "
            f"pipelines too large for one device: --pretrained_model_name_or_path)."
        )
    # As diffusers' training scripts do: the LoRA factors are drawn at injection, so without a seed two runs of the
    # same command train from different starting points (and end up a few FID points apart).
    set_seed(config.distill.seed)
    main = accelerator.is_main_process
    with distributed_phase("set-up", phase_seconds):
        if main:
            out.mkdir(parents=True, exist_ok=True)
        testbed = testbed or load_testbed(device=accelerator.device, model=config.model)
        accelerator.wait_for_everyone()
    unet = testbed.unet
    table = timestep_table(testbed.pipeline.scheduler, config.table_steps)
    bits = f"W{config.weight_bits}A{config.act_bits}"
    results: dict[str, Any] = {
        "command": command,
        "config": _jsonable(asdict(config)),
        "machine": machine_info(),
        "num_processes": accelerator.num_processes,
        "eval_protocol": {
            "samples_per_seed": config.eval_samples,
            "seeds": list(config.eval_seeds),
            "ddim_steps": config.eval_steps,
            "eta": 0.0,
            "table_steps": config.table_steps,
        },
    }
    # Calibration observes the full-precision model, so one calibrated run serves every adapter: the per-timestep
    # table is measured once, then averaged (naive PTQ) or copied (distilled).  Every process calibrates (it is
    # deterministic and cheaper than idling); the broadcast then makes the adapters bit-identical across processes
    # whatever the hardware, so the shares of the evaluation and DDP's replicas all use the same model.
    with distributed_phase("calibration", phase_seconds):
        add_ptq_baselines(unet, testbed, config.weight_bits, config.act_bits, table, config.calibration_samples)
        if "distilled" in config.methods:
            cfg = QALoraConfig(
                r=config.rank,
                lora_alpha=config.rank,
                weight_bits=config.weight_bits,
                act_bits=config.act_bits,
                timesteps=table,
                **config.qalora_overrides,
            )
            get_qalora_model(unet, cfg, "distilled")
            copy_activation_calibration(unet, "timestep_ptq", "distilled")
        broadcast_module_state(unet, only="qal_")

    def plot_steps(adapter: str, kind: str) -> None:
        with distributed_phase(f"plot {kind.lower()} step sizes", phase_seconds):
            table = step_size_table(unet, adapter)
            if main and table:  # dynamic activation quantizers (act_granularity "token"/"group") have no table
                plot_step_sizes(
                    table,
                    out / f"step_sizes_{adapter}.png",
                    title=f"{kind} activation step size per timestep (selected layers)",
                )
            accelerator.wait_for_everyone()

    rows = []
    evaluate = MethodEvaluator(
        testbed, out, config.eval_samples, config.eval_seeds, config.eval_steps, config.save_grids, distributed=True
    )
    with distributed_phase("evaluation: FP", phase_seconds):
        fp = evaluate.fp()  # always drawn: every quantized method is scored against these samples
    if "fp" in config.methods:
        rows.append({"method": "FP", "bits": "fp32", **public(fp)})
    for kind in ("naive_ptq", "timestep_ptq"):
        if kind in config.methods:
            with distributed_phase(f"evaluation: {kind}", phase_seconds):
                set_qalora_adapter(unet, kind)
                rows.append({"method": METHOD_LABELS[kind], "bits": bits, **public(evaluate(kind))})
    plot_steps("timestep_ptq", "Calibrated")
    if "distilled" in config.methods:
        set_qalora_adapter(unet, "distilled", trainable=True)
        distiller = DataFreeDistiller(
            unet,
            testbed.pipeline.scheduler,
            ClassLabelConditioning(10),
            (1, 16, 16),
            config.distill,
            out,
            accelerator=accelerator,
        )
        start = time.perf_counter()
        train = distiller.train(resume_from_checkpoint=resume_from_checkpoint)
        phase_seconds["training"] = time.perf_counter() - start
        start = time.perf_counter()
        distiller.save_adapter(out / "adapter")
        phase_seconds["save adapter"] = time.perf_counter() - start
        with distributed_phase("evaluation: distilled", phase_seconds):
            set_qalora_adapter(unet, "distilled")
            rows.append(
                {
                    "method": METHOD_LABELS["distilled"],
                    "bits": bits,
                    **public(evaluate("distilled")),
                    "train_seconds": train["train_seconds"],
                    "train_steps": train["steps"],
                }
            )
        results["training"] = {k: v for k, v in train.items() if k != "history"}
        results["training"]["loss_history"] = [h["loss"] for h in train["history"]]
        plot_steps("distilled", "Distilled")
    results["methods"] = {r["method"]: r for r in rows}
    with distributed_phase("write results"):
        results["phase_seconds"] = phase_seconds
        results["job_seconds"] = time.perf_counter() - job_start  # from the Accelerator to the results (no imports)
        results["peak_rss_mb_per_process"] = gather_object([peak_rss_mb()])
        if "training" in results:
            results["training"]["train_cpu_seconds_per_process"] = gather_object([train["train_cpu_seconds"]])
        results["peak_rss_mb"] = results["peak_rss_mb_per_process"][0]
        if main:
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
            notes = (
                f"{config.eval_samples} samples x seeds {list(config.eval_seeds)}, {config.eval_steps} DDIM "
                f"steps (eta 0); step sizes interpolated from the {config.table_steps}-step table. x0-MSE: each "
                f"sample against the FP sample from the same noise and label."
            )
            title = {"unet": "Embedded digits DDPM", "dit": "Embedded digits DiT"}[testbed.model_name]
            (out / "report.md").write_text(results_markdown(rows, f"{title}, {bits}", command, notes), encoding="utf-8")
        accelerator.wait_for_everyone()
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
