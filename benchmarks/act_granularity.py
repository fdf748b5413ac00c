"""Activation granularity after PTQ, on both embedded denoisers: EfficientDM's per-tensor temporal step sizes against
dynamic per-token and per-group activations, with the CPU cost of each exported integer model.

    python benchmarks/act_granularity.py                    # 1000 samples x seeds 0 1 2, both models, 1 thread
    python benchmarks/act_granularity.py --models dit --samples 200 --seeds 0

Every option is a PTQ adapter (LoRA B = 0, MSE-initialised weight steps: the library default) on the same model:

* ``tensor``: one calibrated step size per tensor and timestep (``act_granularity="tensor"``, EfficientDM's);
* ``token``: a min-max step per token, computed at every call (``act_granularity="token"``);
* ``group G``: a min-max step per token and group of G channels (``act_granularity="group"``);
* ``group G, weights group G``: the same with one weight step per group of G input channels too.

Quality: digits-FID, FID / FP per seed and the paired x0-MSE against the FP samples from the same noise (DDIM 20
steps, eta 0).  Cost: each option exported (`export_quantized`, oneDNN kernels) and timed at batch 64 against the fp32
model, interleaved, 1 thread, medians.  Results: ``benchmarks/results/act_granularity/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from export_speed import interleaved

import diffusers_qalora as dq
from diffusers_qalora.evaluation.baselines import add_calibrated_adapter, baseline_config
from diffusers_qalora.evaluation.report import fid_ratio_to_fp, format_metric, machine_info, write_results
from diffusers_qalora.testbed import load_testbed
from diffusers_qalora.testbed.evaluation import MethodEvaluator, calibration_run, peak_rss_mb, public
from diffusers_qalora.tuners.qalora.api import set_qalora_adapter, timestep_table

RESULTS = Path(__file__).parent / "results" / "act_granularity"
GROUP = 32  # divides every input channel count of both models outside their 8-bit layers
GROUPS_AT: set[tuple[int, int]] = set()  # 8-bit activations with groups too (--groups_at_8bit)


def options(bits: tuple[int, int]) -> dict[str, dict[str, Any]]:
    found = {"tensor": {}, "token": {"act_granularity": "token"}}
    if bits[1] == 4 or bits in GROUPS_AT:
        found[f"group {GROUP}"] = {"act_granularity": "group", "act_group_size": GROUP}
        found[f"group {GROUP}, weights group {GROUP}"] = {
            **found[f"group {GROUP}"],
            "weight_granularity": "group",
            "weight_group_size": GROUP,
        }
    return found


def inference_cost(model_name: str, adapters: dict[str, str], testbed, repeats: int) -> dict[str, Any]:
    """fp32 against each adapter exported to integer layers (oneDNN), batch 64, one shared timestep, interleaved."""
    unet = testbed.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    inputs = {"class_labels": torch.randint(0, 10, (64,), generator=g)}
    shared, mixed = torch.full((64,), 500.0), torch.randperm(1000, generator=g)[:64].float()

    def call(model, t):
        def fn():
            with torch.no_grad():
                model(x, t, **inputs)

        return fn

    fns = {}
    with dq.adapters_disabled(unet):
        fp32 = call(unet, shared)
        fns["fp32"] = fp32
        fp32()
    exported = {}
    for label, adapter in adapters.items():
        exported[label] = dq.export_quantized(unet, adapter_name=adapter, kernel_preference="onednn", inplace=False)
        fns[label] = call(exported[label], shared)
        fns[f"{label}, mixed timesteps"] = call(exported[label], mixed)
    with dq.adapters_disabled(unet):
        times = interleaved(fns, repeats, warmup=1, budget_s=30.0, max_repeats=15)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": 64,
        "repeats": len(times["fp32"]),
        "median_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
        "speedup_vs_fp32": {k: round(med["fp32"] / v, 3) for k, v in med.items() if k != "fp32"},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A4"], choices=["W8A8", "W4A8", "W4A4"])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (at least)")
    p.add_argument("--output_dir", type=Path, default=RESULTS)
    p.add_argument("--groups_at_8bit", action="store_true", help="also the group options at 8-bit activations")
    args = p.parse_args(argv)
    if args.groups_at_8bit:
        GROUPS_AT.update({(8, 8), (4, 8)})
    torch.set_num_threads(1)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/act_granularity.py", *map(shlex.quote, argv)])
    results: dict[str, Any] = {
        "command": command,
        "machine": machine_info(1),
        "protocol": {"samples_per_seed": args.samples, "seeds": list(args.seeds), "ddim_steps": args.steps, "eta": 0.0},
        "models": {},
    }
    for model_name in args.models:
        testbed = load_testbed(model=model_name)
        unet = testbed.unet
        table = timestep_table(testbed.pipeline.scheduler, 100)
        evaluate = MethodEvaluator(testbed, out, args.samples, args.seeds, args.steps, save_grids=False)
        fp = evaluate.fp()
        rows = [{"option": "FP", "bits": "fp32", **public(fp)}]
        adapters = {}
        for bits_name in args.bits:
            bits = (int(bits_name[1]), int(bits_name[3]))
            for label, fields in options(bits).items():
                adapter = f"{bits_name}_{len(adapters)}"
                config = baseline_config("timestep_ptq", *bits, table, weight_init="mse", **fields)
                if "act_granularity" in fields:  # dynamic everywhere (8-bit layers per token): nothing to calibrate
                    dq.get_qalora_model(unet, config, adapter)
                else:
                    add_calibrated_adapter(unet, config, adapter, calibration_run(testbed, 64, len(table)))
                set_qalora_adapter(unet, adapter)
                summary = public(evaluate(adapter))
                ratio = fid_ratio_to_fp(summary, rows[0])
                rows.append({"option": label, "bits": bits_name, **summary, "fid_over_fp": ratio})
                adapters[f"{bits_name} {label}"] = adapter
                print(model_name, bits_name, label, f"FID/FP {ratio[0]:.3f}", f"x0-MSE {summary['x0_mse_mean']:.6f}")
        cost = inference_cost(model_name, adapters, testbed, args.repeats)
        results["models"][model_name] = {"rows": rows, "inference": cost}
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    results["peak_rss_mb"] = peak_rss_mb()
    write_results(out, "results", results, markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    proto = results["protocol"]
    lines = [
        "# Activation granularity after PTQ: per-tensor temporal against dynamic per-token and per-group",
        "",
        f"Command: `{results['command']}`",
        "",
        f"{proto['samples_per_seed']} samples x seeds {proto['seeds']}, {proto['ddim_steps']} DDIM steps (eta 0); "
        "mean ± std over seeds. PTQ adapters (LoRA B = 0) with MSE-initialised weight steps. x0-MSE: each sample "
        "against the FP sample from the same noise and label. Speed: the option exported to integer layers (oneDNN), "
        "batch 64, 1 thread, interleaved with fp32, median.",
        "",
        "| model | bits | activations | digits-FID | FID / FP | x0-MSE vs FP | integer speed vs fp32 "
        "(shared / mixed timesteps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name, entry in results["models"].items():
        speed = entry["inference"]["speedup_vs_fp32"]
        for r in entry["rows"]:
            key = f"{r['bits']} {r['option']}"
            ratio = "1.000" if r["option"] == "FP" else format_metric(*r["fid_over_fp"], 3)
            mse = format_metric(r["x0_mse_mean"], r["x0_mse_std"], 6) if "x0_mse_mean" in r else "—"
            fast = f"{speed[key]:.2f}x / {speed[key + ', mixed timesteps']:.2f}x" if key in speed else "1.00x"
            lines.append(
                f"| {model_name} | {r['bits']} | {r['option']} | {format_metric(r['fid_mean'], r['fid_std'])} "
                f"| {ratio} | {mse} | {fast} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
