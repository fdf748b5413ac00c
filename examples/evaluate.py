"""Evaluate the full-precision embedded digits DDPM and its PTQ baselines (naive, per-timestep) at several bit widths.

    python examples/evaluate.py --samples 1000 --seeds 0 1 2 --output_dir benchmarks/results/ptq_baselines

Writes results.json, results.md (mean ± std over seeds), sample grids and step-size plots into --output_dir.
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch

from diffusers_qalora.testbed.evaluation import PTQ_METHODS, run_ptq_evaluation


def parse_bits(text: str) -> tuple[int, int]:
    w, _, a = text.upper().removeprefix("W").partition("A")
    try:
        return int(w), int(a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must look like W8A8 or W4A4, got {text!r}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="outputs/evaluate")
    p.add_argument("--bits", type=parse_bits, nargs="+", default=[(8, 8), (4, 8), (4, 4)], help="e.g. W8A8 W4A4")
    p.add_argument("--methods", nargs="+", choices=PTQ_METHODS, default=list(PTQ_METHODS))
    p.add_argument("--samples", type=int, default=500, help="samples per seed (balanced over the 10 classes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else argv
    results = run_ptq_evaluation(
        args.output_dir,
        args.bits,
        args.methods,
        args.samples,
        args.seeds,
        args.steps,
        command="python examples/evaluate.py " + shlex.join(argv),
    )
    print(Path(args.output_dir, "results.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
