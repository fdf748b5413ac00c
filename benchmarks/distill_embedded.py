"""Distillation benchmark on the embedded digits DDPM: FP vs naive PTQ vs per-timestep PTQ vs QALoRA distilled.

    python benchmarks/distill_embedded.py --bits W4A4 --samples 1000 --seeds 0 1 2 --threads 1

Writes benchmarks/results/distill_embedded_<bits>/{results.json, report.md, grids, step-size plots, adapter/}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from diffusers_qalora.distill import DistillConfig
from diffusers_qalora.distill.embedded import EmbeddedJobConfig, run_embedded_job

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="W4A4", help="W4A4, W4A8 or W8A8")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps (16 trajectories of 100 DDIM steps)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, a = (int(v) for v in args.bits.upper().removeprefix("W").split("A"))
    job = EmbeddedJobConfig(
        weight_bits=w,
        act_bits=a,
        distill=DistillConfig(batch_size=args.batch_size, max_train_steps=args.steps),
        eval_samples=args.samples,
        eval_seeds=tuple(args.seeds),
    )
    out = RESULTS / f"distill_embedded_{args.bits.lower()}"
    run_embedded_job(job, out, command="python benchmarks/distill_embedded.py " + shlex.join(argv))
    print((out / "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
