"""Full-precision quality of the two embedded denoisers side by side: the digits UNet and the digits DiT.

    python benchmarks/dit_fp.py        # 1000 samples x seeds 0 1 2, DDIM 20 steps (eta 0), 1 thread

Both are sampled with the same seeded noise and labels (`sample_class_conditional`) and scored with the same
classifier on the same 500 held-out digits (`evaluate_seeds`). Writes
``benchmarks/results/dit_fp/{results.json,report.md}`` and a sample grid per model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from diffusers_qalora.evaluation.report import format_metric, machine_info
from diffusers_qalora.testbed import load_testbed
from diffusers_qalora.testbed.evaluation import MethodEvaluator, peak_rss_mb, public

RESULTS = Path(__file__).parent / "results" / "dit_fp"
LABELS = {"unet": "UNet (UNet2DModel)", "dit": "DiT (SD3Transformer2DModel)"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output_dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/dit_fp.py", *map(shlex.quote, argv)])
    rows = []
    for model in ("unet", "dit"):
        testbed = load_testbed(model=model)
        summary = public(MethodEvaluator(testbed, out / model, args.samples, args.seeds, args.steps).fp())
        rows.append(
            {
                "model": model,
                "num_parameters": sum(p.numel() for p in testbed.unet.parameters()),
                "train_seconds": testbed.config["timing_seconds"]["ddpm" if model == "unet" else "dit"],
                **summary,
            }
        )
    results = {
        "command": command,
        "machine": machine_info(),
        "protocol": {"samples_per_seed": args.samples, "seeds": list(args.seeds), "ddim_steps": args.steps, "eta": 0.0},
        "rows": rows,
        "peak_rss_mb": peak_rss_mb(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    lines = [
        "# Embedded denoisers in full precision: UNet and DiT",
        "",
        f"Command: `{command}`",
        "",
        f"{args.samples} samples per seed, seeds {list(args.seeds)}, {args.steps} DDIM steps (eta 0), the same noise "
        "and labels for both models, mean ± std over seeds. Training time: the recipe's own record (one thread on a "
        "machine shared with other jobs).",
        "",
        "| model | parameters | digits-FID | FID per seed | accuracy (%) | sampling seconds | training seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{s['fid']:.2f}" for s in r["per_seed"])
        lines.append(
            f"| {LABELS[r['model']]} | {r['num_parameters'] / 1e6:.2f}M | {format_metric(r['fid_mean'], r['fid_std'])} "
            f"| {per_seed} | {format_metric(100 * r['accuracy_mean'], 100 * r['accuracy_std'], 1)} "
            f"| {r['seconds']:.0f} | {r['train_seconds']:.0f} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
