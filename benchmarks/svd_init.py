"""QALoRA's LoRA initialised from the SVD of the weight-quantization residual, against the default ``B = 0``.

    python benchmarks/svd_init.py          # both embedded models, W4A4 per-group activations, 1000 samples x 3 seeds

SVDQuant keeps a 16-bit low-rank branch ``L`` beside the quantized residual ``Q(W - L)``. QALoRA's LoRA sits inside the
weight quantizer (``Q(W0 + s B A)``), so the nearest analogue is to start ``s B A`` at the rank-``r`` SVD of the
quantization residual ``E = W0 - Q(W0)`` (``+E_r``: pre-compensate the rounding error) or of its negative
(``-E_r``), instead of ``B = 0``. This measures, per layer, the weight error ``||Q(W0 + s B A) - W0|| / ||W0||`` of
each start, and the sampled quality (digits-FID / FP, paired x0-MSE) of the PTQ model each start gives, before any
training. Results: ``benchmarks/results/svd_init/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import diffusers_qalora as dq
from diffusers_qalora.evaluation.baselines import baseline_config
from diffusers_qalora.evaluation.report import fid_ratio_to_fp, format_metric, machine_info, write_results
from diffusers_qalora.testbed import load_testbed
from diffusers_qalora.testbed.evaluation import MethodEvaluator, peak_rss_mb, public
from diffusers_qalora.tuners.qalora import qalora_layers
from diffusers_qalora.tuners.qalora.api import set_qalora_adapter, timestep_table

RESULTS = Path(__file__).parent / "results" / "svd_init"
STARTS = ("B = 0", "+E_r", "-E_r")


@torch.no_grad()
def set_start(model: torch.nn.Module, adapter: str, start: str) -> list[float]:
    """Set the LoRA factors of every LoRA layer of ``adapter`` to ``start``; return the per-layer weight errors."""
    errors = []
    for layer in qalora_layers(model).values():
        if adapter not in layer.qal_A:
            continue
        a, b = layer.qal_A[adapter], layer.qal_B[adapter]
        w0 = layer.get_base_layer().weight.float()
        if start == "B = 0":
            b.zero_()
        else:
            residual = (w0 - layer.qal_weight_quantizer[adapter](w0)).reshape(w0.shape[0], -1)
            u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
            r = a.shape[0]
            root = s[:r].sqrt()
            sign = 1.0 if start == "+E_r" else -1.0
            b.copy_((sign * u[:, :r] * root / layer.scaling[adapter]).float())
            a.copy_((root[:, None] * vh[:r]).reshape(a.shape).float())
        errors.append(float((layer.quantized_weight(adapter).float() - w0).norm() / w0.norm()))
    return errors


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--output_dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/svd_init.py", *map(shlex.quote, argv)])
    results: dict[str, Any] = {
        "command": command,
        "machine": machine_info(1),
        "protocol": {"samples_per_seed": args.samples, "seeds": list(args.seeds), "ddim_steps": args.steps, "eta": 0.0},
        "setting": {"bits": "W4A4", "act_granularity": "group", "act_group_size": 32, "rank": args.rank},
        "models": {},
    }
    for model_name in args.models:
        testbed = load_testbed(model=model_name)
        unet = testbed.unet
        table = timestep_table(testbed.pipeline.scheduler, 100)
        config = baseline_config(
            "timestep_ptq",
            4,
            4,
            table,
            r=args.rank,
            lora_alpha=args.rank,
            weight_init="mse",
            act_granularity="group",
            act_group_size=32,
        )
        dq.get_qalora_model(unet, config, "ptq")
        set_qalora_adapter(unet, "ptq")
        evaluate = MethodEvaluator(testbed, out, args.samples, args.seeds, args.steps, save_grids=False)
        fp = public(evaluate.fp())
        rows = []
        for start in STARTS:
            errors = set_start(unet, "ptq", start)
            summary = public(evaluate(f"{model_name}_{start}"))
            rows.append(
                {
                    "start": start,
                    "weight_error_mean": statistics.fmean(errors),
                    "weight_error_per_layer": errors,
                    "fid_over_fp": fid_ratio_to_fp(summary, fp),
                    **summary,
                }
            )
            print(
                model_name,
                start,
                f"weight error {statistics.fmean(errors):.4f}",
                f"x0-MSE {summary['x0_mse_mean']:.6f}",
            )
        results["models"][model_name] = {"fp": fp, "rows": rows}
    results["peak_rss_mb"] = peak_rss_mb()
    write_results(out, "results", results, markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    proto = results["protocol"]
    lines = [
        "# QALoRA's LoRA started at the SVD of the quantization residual (PTQ, no training)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"W4A4, per-group activations (32 channels), MSE-initialised weight steps, rank {results['setting']['rank']}; "
        f"{proto['samples_per_seed']} samples x seeds {proto['seeds']}, {proto['ddim_steps']} DDIM steps (eta 0); "
        "mean ± std over seeds. Weight error: `||Q(W0 + s B A) - W0|| / ||W0||`, mean over the LoRA layers.",
        "",
        "| model | LoRA start | weight error | FID / FP | x0-MSE vs FP |",
        "|---|---|---|---|---|",
    ]
    for model_name, entry in results["models"].items():
        for r in entry["rows"]:
            lines.append(
                f"| {model_name} | {r['start']} | {r['weight_error_mean']:.4f} | {format_metric(*r['fid_over_fp'], 3)} "
                f"| {format_metric(r['x0_mse_mean'], r['x0_mse_std'], 6)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
