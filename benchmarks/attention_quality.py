"""What quantizing the attention costs in quality: per-timestep PTQ of the embedded digits DDPM at W8A8, with the
attention's q, k, v (and the softmax output) quantized by `QALoraAttnProcessor` or left in float.

    python benchmarks/attention_quality.py        # 1000 samples x seeds 0 1 2, DDIM 20 steps, 1 thread

Every variant is the per-timestep PTQ adapter of the PTQ baselines (min-max weight steps, one activation step per
timestep of the 100-step table, calibrated on 64 FP trajectories), with ``quantize_attention`` /
``quantize_attention_probs`` / ``attention_bits`` set as the variant says; each is calibrated on the same
trajectories.  No training: this isolates the error the attention quantizers add.  Writes
``benchmarks/results/attention_quality/{results.json,report.md}`` and a sample grid per variant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from diffusers_qalora.evaluation.baselines import add_calibrated_adapter, baseline_config
from diffusers_qalora.evaluation.report import machine_info, results_markdown
from diffusers_qalora.testbed import load_testbed
from diffusers_qalora.testbed.evaluation import MethodEvaluator, calibration_run, peak_rss_mb, public
from diffusers_qalora.tuners.qalora.api import set_qalora_adapter, timestep_table

RESULTS = Path(__file__).parent / "results" / "attention_quality"

# name -> (label, QALoraConfig overrides); weights and linear/conv activations are W8A8 in every variant.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "float_attention": ("attention in float (q, k, v, softmax unquantized)", {}),
    "qkv8": ("q, k, v 8-bit", {"quantize_attention": True}),
    "qkv8_probs8": ("q, k, v and softmax output 8-bit", {"quantize_attention": True, "quantize_attention_probs": True}),
    "qkv4_probs4": (
        "q, k, v and softmax output 4-bit",
        {"quantize_attention": True, "quantize_attention_probs": True, "attention_bits": 4},
    ),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calibration_samples", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--output_dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/attention_quality.py", *map(shlex.quote, argv)])
    testbed = load_testbed()
    unet = testbed.unet
    table = timestep_table(testbed.pipeline.scheduler, 100)
    evaluate = MethodEvaluator(testbed, out, args.samples, args.seeds, 20)
    rows = [{"method": "FP", "variant": "fp", "bits": "fp32", **public(evaluate.fp())}]
    calibrate = calibration_run(testbed, args.calibration_samples, len(table))
    for name in args.variants:
        label, overrides = VARIANTS[name]
        config = baseline_config("timestep_ptq", 8, 8, table, **overrides)
        add_calibrated_adapter(unet, config, name, calibrate)
        set_qalora_adapter(unet, name)
        rows.append(
            {"method": label, "variant": name, "bits": "W8A8", "overrides": overrides, **public(evaluate(name))}
        )
    results = {
        "command": command,
        "machine": machine_info(threads=1),
        "torch_threads": 1,
        "eval_protocol": {
            "samples_per_seed": args.samples,
            "seeds": args.seeds,
            "ddim_steps": 20,
            "eta": 0.0,
            "table_steps": 100,
            "calibration_samples": args.calibration_samples,
        },
        "rows": rows,
        "peak_rss_mb": peak_rss_mb(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    notes = (
        f"{args.samples} samples x seeds {args.seeds}, 20 DDIM steps (eta 0), 1 torch thread. Every quantized "
        f"row is per-timestep PTQ at W8A8 (no training), calibrated on {args.calibration_samples} FP "
        "trajectories; the rows differ only in how the attention is quantized. x0-MSE: each sample against the "
        "FP sample from the same noise and label; FID / FP per seed."
    )
    report = results_markdown(rows, "Quantized attention on the embedded digits DDPM (W8A8 PTQ)", command, notes)
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    return results


if __name__ == "__main__":
    main()
