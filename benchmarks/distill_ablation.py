"""Ablation of the distillation at W4A4 on the embedded digits DDPM, every trained variant at the same budget.

    python benchmarks/distill_ablation.py --budget_seconds 600 --samples 1000 --seeds 0 1 2

Variants (EfficientDM's ablation, plus the two baselines the issue names):

* ``timestep_ptq``: per-timestep calibrated PTQ, no training;
* ``qalora``: QALoRA distillation with one learned activation step size per layer and one learning rate;
* ``qalora_scale_aware``: + scale-aware LoRA learning rates;
* ``qalora_scale_aware_temporal``: + one learned activation step size per timestep (the full method);
* ``full_qat``: LSQ quantization-aware training of every weight (no LoRA), per-timestep activation steps, against a
  separate frozen full-precision teacher.

Equal budget: each trained variant first times a few optimizer steps, then trains for as many steps as fit in
``--budget_seconds`` of *process CPU time* at one torch thread.  CPU time, not wall time, because the machine is
shared: a neighbour's load lengthens wall time but hardly the CPU time of a single-threaded process.  The wall time and
the CPU time actually used are reported.  Each variant runs in its own process, so its peak memory (``ru_maxrss``,
model + calibration + training) is its own.  The full-precision samples are drawn once and every variant is scored
against them.

Writes ``benchmarks/results/distill_ablation_w4a4/{results.json, report.md, grid_<variant>.png}``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffusers_qalora.distill import ClassLabelConditioning, DataFreeDistiller, DistillConfig
from diffusers_qalora.evaluation.report import machine_info, results_markdown
from diffusers_qalora.testbed import load_testbed
from diffusers_qalora.testbed.evaluation import MethodEvaluator, add_ptq_baselines, peak_rss_mb, public
from diffusers_qalora.tuners.qalora.api import (
    copy_activation_calibration,
    get_qalora_model,
    set_qalora_adapter,
    timestep_table,
)
from diffusers_qalora.tuners.qalora.config import QALoraConfig

RESULTS = Path(__file__).parent / "results" / "distill_ablation_w4a4"
SAMPLE_SHAPE = (1, 16, 16)
PROBE_STEPS = 12  # timed after PROBE_WARMUP steps
PROBE_WARMUP = 3

# variant -> (label, QALoraConfig overrides, DistillConfig overrides); None: no training
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]] | None] = {
    "timestep_ptq": None,
    "qalora": ("QALoRA alone (one act step, one LR)", {"temporal_activations": False}, {"scale_aware": "none"}),
    "qalora_scale_aware": ("+ scale-aware LoRA LR", {"temporal_activations": False}, {"scale_aware": "lr"}),
    "qalora_scale_aware_temporal": ("+ temporal act steps (full EfficientDM)", {}, {"scale_aware": "lr"}),
    "full_qat": (
        "full QAT (LSQ on all weights, no LoRA)",
        {"r": 1, "lora_alpha": 1},
        {"scale_aware": "none", "train_lora": False, "train_base_weights": True},
    ),
}
LABELS = {"timestep_ptq": "per-timestep PTQ (no training)"} | {k: v[0] for k, v in VARIANTS.items() if v}


def _build_student(testbed, name: str, args) -> tuple[torch.nn.Module | None, DistillConfig | None]:
    """Calibrate the PTQ adapters, add the variant's adapter (calibrated from the per-timestep table) and activate it."""
    unet = testbed.unet
    table = timestep_table(testbed.pipeline.scheduler, 100)
    per_t, _ = add_ptq_baselines(unet, testbed, 4, 4, table, args.calibration_samples)
    if VARIANTS[name] is None:
        set_qalora_adapter(unet, per_t)
        return None, None
    _, qalora_overrides, distill_overrides = VARIANTS[name]
    cfg = QALoraConfig(
        **({"r": 32, "lora_alpha": 32, "weight_bits": 4, "act_bits": 4, "timesteps": table} | qalora_overrides)
    )
    torch.manual_seed(args.train_seed)  # the LoRA factors are drawn at injection: same start for every variant
    get_qalora_model(unet, cfg, name)
    copy_activation_calibration(unet, per_t, name)
    set_qalora_adapter(unet, name, trainable=True)
    teacher = copy.deepcopy(unet) if distill_overrides.get("train_base_weights") else None
    distill = DistillConfig(batch_size=args.batch_size, seed=args.train_seed, **distill_overrides)
    return teacher, distill


def _distiller(testbed, distill: DistillConfig, out: Path, teacher) -> DataFreeDistiller:
    return DataFreeDistiller(
        testbed.unet,
        testbed.pipeline.scheduler,
        ClassLabelConditioning(10),
        SAMPLE_SHAPE,
        distill,
        out,
        teacher=teacher,
    )


def _seconds_per_step(testbed, distill: DistillConfig, teacher) -> float:
    """Process CPU seconds per optimizer step, timed on a throw-away copy of the student."""
    probe = copy.deepcopy(testbed)
    config = dataclasses.replace(distill, max_train_steps=PROBE_WARMUP + PROBE_STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        d = DataFreeDistiller(
            probe.unet,
            probe.pipeline.scheduler,
            ClassLabelConditioning(10),
            SAMPLE_SHAPE,
            config,
            tmp,
            teacher=copy.deepcopy(teacher) if teacher is not None else None,
        )
        stamps: list[float] = []
        d.history = _StampedList(stamps)
        d.train()
    return (stamps[-1] - stamps[PROBE_WARMUP - 1]) / PROBE_STEPS


class _StampedList(list):
    """A history list that records the process CPU time at each appended step."""

    def __init__(self, stamps: list[float]) -> None:
        super().__init__()
        self.stamps = stamps

    def append(self, item) -> None:
        self.stamps.append(time.process_time())
        super().append(item)


def run_variant(name: str, args, out: Path) -> dict[str, Any]:
    """One variant in this process: calibrate, (time, train,) sample and score; returns its row."""
    torch.set_num_threads(1)
    testbed = load_testbed()
    teacher, distill = _build_student(testbed, name, args)
    row: dict[str, Any] = {"method": LABELS[name], "variant": name, "bits": "W4A4"}
    if distill is not None:
        per_step = _seconds_per_step(testbed, distill, teacher)
        steps = max(1, int(args.budget_seconds / per_step))
        distill = dataclasses.replace(distill, max_train_steps=steps)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            summary = _distiller(testbed, distill, Path(tmp), teacher).train()
        row.update(
            train_steps=steps,
            probe_cpu_seconds_per_step=per_step,
            train_cpu_seconds=time.process_time() - cpu0,
            train_wall_seconds=time.perf_counter() - wall0,
            final_loss=summary["final_loss"],
        )
        set_qalora_adapter(testbed.unet, name)
    row["peak_rss_mb"] = peak_rss_mb()  # model, calibration and training (before sampling)
    del teacher
    evaluate = MethodEvaluator(testbed, out, args.samples, args.seeds, 20)
    fp = load_file(str(out / "fp_samples.safetensors"))
    evaluate.fp_samples = {int(k): v for k, v in fp.items()}
    row.update(public(evaluate(name)))
    return row


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget_seconds", type=float, default=600.0, help="process CPU seconds of training per variant")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--calibration_samples", type=int, default=64)
    p.add_argument("--train_seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--output_dir", type=Path, default=RESULTS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    out = args.output_dir
    if args.variant is not None:
        row = run_variant(args.variant, args, out)
        (out / "variants" / f"{args.variant}.json").write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
        return

    torch.set_num_threads(1)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/distill_ablation.py " + shlex.join(argv)
    testbed = load_testbed()
    evaluate = MethodEvaluator(testbed, out, args.samples, args.seeds, 20)
    fp = evaluate.fp()
    save_file({str(k): v.contiguous() for k, v in fp["samples"].items()}, str(out / "fp_samples.safetensors"))
    rows = [{"method": "FP", "variant": "fp", "bits": "fp32", **public(fp)}]
    for name in args.variants:  # one after the other, so no two variants compete for the CPU
        child = [sys.executable, __file__, *argv, "--variant", name]
        start = time.perf_counter()
        subprocess.run(child, check=True)
        row = json.loads((out / "variants" / f"{name}.json").read_text(encoding="utf-8"))
        row["process_wall_seconds"] = time.perf_counter() - start
        rows.append(row)
    (out / "fp_samples.safetensors").unlink()
    results = {
        "command": command,
        "machine": machine_info(),
        "torch_threads": 1,
        "budget": {
            "process_cpu_seconds": args.budget_seconds,
            "batch_size": args.batch_size,
            "train_seed": args.train_seed,
            "trajectory_ddim_steps": 100,
        },
        "eval_protocol": {"samples_per_seed": args.samples, "seeds": args.seeds, "ddim_steps": 20, "eta": 0.0},
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table_rows = [
        {k: v for k, v in r.items() if k != "seconds"}
        | ({"seconds": r["train_wall_seconds"]} if "train_wall_seconds" in r else {})
        for r in rows
    ]
    notes = (
        f"{args.samples} samples x seeds {args.seeds}, 20 DDIM steps (eta 0). Each trained variant: as many "
        f"optimizer steps (batch {args.batch_size}, 100-step teacher trajectories) as fit in "
        f"{args.budget_seconds:.0f} s of process CPU time at 1 torch thread; 'seconds' is its training wall time. "
        "Peak RSS and steps per variant are in results.json and the table below."
    )
    extra = [
        "",
        "| method | train steps | CPU s / step | train CPU s | train wall s | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        if "train_steps" in r:
            extra.append(
                f"| {r['method']} | {r['train_steps']} | {r['probe_cpu_seconds_per_step']:.3f} | "
                f"{r['train_cpu_seconds']:.0f} | {r['train_wall_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
            )
        else:
            extra.append(f"| {r['method']} | — | — | — | — | {r['peak_rss_mb']:.0f} |")
    report = results_markdown(table_rows, "Distillation ablation, embedded digits DDPM, W4A4", command, notes)
    (out / "report.md").write_text(report + "\n".join(extra) + "\n", encoding="utf-8")
    print((out / "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
