"""Convolutions as matrix products over the unfolded input against oneDNN, on SD1.5's convolutions (issue 18).

The QALoRA op runs a convolution with few output positions and a large weight as a linear layer over its unfolded
input (`diffusers_qalora.quant.conv_as_matmul`).  This measures, for every 3x3 and 1x1 convolution of an SD1.5-shaped
``UNet2DConditionModel`` at the given latents (batch 1), one forward and backward pass (input and weight gradients)
both ways, interleaved, one thread:

* ``onednn``: ``F.conv2d`` and ``aten.convolution_backward``, as full fine-tuning runs them;
* ``matmul``: ``F.unfold``, the product with the weight viewed as a matrix, the weight gradient into a reused buffer
  and the input gradient folded back, as the QALoRA op runs a lowered layer.

Per latent it sums the model's convolutions (each counted as often as it occurs) with each way, and with the way
`conv_as_matmul` picks: the rule's saving, and what full fine-tuning itself would save with the same lowering, which
is the share of the QALoRA step's lead over full fine-tuning (`benchmarks/results/sd_scale/`) that comes from
PyTorch's convolutions rather than from QALoRA's own work.

    python benchmarks/conv_lowering.py --latents 16 32 --repeats 5

Results: ``benchmarks/results/conv_lowering.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_qalora.evaluation.report import machine_info
from diffusers_qalora.quant import conv_as_matmul

RESULTS = Path(__file__).resolve().parent / "results"


def sd15_convolutions(latents: list[int]) -> dict[int, Counter]:
    """Per latent: ``(input shape, weight shape, stride, padding) -> count`` over the UNet's convolutions."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD1.5's configuration
    seen: list[tuple] = []

    def record(module, inputs, _out):
        seen.append((tuple(inputs[0].shape), tuple(module.weight.shape), tuple(module.stride), tuple(module.padding)))

    hooks = [m.register_forward_hook(record) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    found: dict[int, Counter] = {}
    for latent in latents:
        seen.clear()
        with torch.device("meta"), torch.no_grad():
            unet(torch.zeros(1, 4, latent, latent), torch.tensor([500.0]), torch.zeros(1, 77, 768))
        found[latent] = Counter(seen)
    for hook in hooks:
        hook.remove()
    return found


def onednn(x, w, grad_y, stride, padding):
    y = F.conv2d(x, w, None, stride, padding)
    grads = torch.ops.aten.convolution_backward(
        grad_y, x, w, None, stride, padding, [1, 1], False, [0, 0], 1, [True, True, False]
    )
    return y, grads[0], grads[1]


def matmul(x, w, grad_y, stride, padding, pool: dict):
    n, _, height, width = x.shape
    kernel = w.shape[2:]
    cols = F.unfold(x, kernel, 1, padding, stride)  # (N, C kh kw, P)
    patches = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    w2 = w.view(w.shape[0], -1)
    y = F.linear(patches, w2).view(n, *grad_y.shape[2:], -1).permute(0, 3, 1, 2).contiguous()
    g2 = grad_y.permute(0, 2, 3, 1).reshape(-1, w.shape[0])
    grad_w = pool.get(w.shape)
    if grad_w is None:
        grad_w = pool[w.shape] = torch.empty_like(w2)
    torch.mm(g2.t(), patches, out=grad_w)
    grad_cols = g2.mm(w2).view(n, -1, cols.shape[1]).transpose(1, 2)
    grad_x = F.fold(grad_cols, (height, width), kernel, 1, padding, stride)
    return y, grad_x, grad_w.view(w.shape)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, nargs="+", default=[16, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=RESULTS / "conv_lowering")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    rows, totals = [], {}
    for latent, convs in sd15_convolutions(args.latents).items():
        total = {"onednn": 0.0, "matmul": 0.0, "rule": 0.0}
        for (x_shape, w_shape, stride, padding), count in sorted(convs.items()):
            x = torch.randn(x_shape, generator=gen)
            w = torch.randn(w_shape, generator=gen) * 0.02
            y_ref = F.conv2d(x, w, None, stride, padding)
            grad_y = torch.randn(y_ref.shape, generator=gen)
            pool: dict = {}
            ways = {
                "onednn": (onednn, (x, w, grad_y, stride, padding)),
                "matmul": (matmul, (x, w, grad_y, stride, padding, pool)),
            }
            ref, got = (fn(*fn_args) for fn, fn_args in ways.values())
            error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, (fn, fn_args) in ways.items():
                    start = time.perf_counter()
                    fn(*fn_args)
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(t) for name, t in times.items()}
            positions = y_ref.shape[0] * y_ref.shape[2] * y_ref.shape[3]
            lowered = conv_as_matmul(positions, w_shape[0], w_shape[2] * w_shape[3])
            total["onednn"] += count * median["onednn"]
            total["matmul"] += count * median["matmul"]
            total["rule"] += count * median["matmul" if lowered else "onednn"]
            rows.append(
                {
                    "latent": latent,
                    "input": list(x_shape),
                    "weight": list(w_shape),
                    "stride": list(stride),
                    "positions": positions,
                    "count": count,
                    "onednn_ms": 1e3 * median["onednn"],
                    "matmul_ms": 1e3 * median["matmul"],
                    "speedup": median["onednn"] / median["matmul"],
                    "lowered_by_rule": lowered,
                    "max_rel_error": error,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        totals[latent] = total
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "seed": args.seed,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": machine_info(),
        "rows": rows,
        "totals_s": {str(k): v for k, v in totals.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    args.output.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    return result


def markdown(result: dict) -> str:
    lines = [
        "# SD1.5's convolutions: matrix products over the unfolded input against oneDNN",
        "",
        f"Command: `{result['command']}`  ",
        f"One forward and backward pass (input and weight gradients) per convolution, batch 1, "
        f"{result['threads']} thread(s), medians of {result['repeats']} interleaved repeats.  `rule`: "
        "`conv_as_matmul` lowers it.  Error: largest difference of output and gradients, relative to the largest "
        "entry.",
        "",
        "| latent | input | weight | stride | positions | count | oneDNN (ms) | matmul (ms) | speed-up | rule | error |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['latent']} | {'x'.join(map(str, r['input']))} | {'x'.join(map(str, r['weight']))} | "
            f"{r['stride'][0]} | {r['positions']} | {r['count']} | {r['onednn_ms']:.2f} | {r['matmul_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {'lowered' if r['lowered_by_rule'] else '-'} | {r['max_rel_error']:.1e} |"
        )
    lines += [
        "",
        "Whole model (every convolution as often as it occurs, fwd + bwd):",
        "",
        "| latent | all oneDNN (s) | all matmul (s) | the rule's choice (s) | saved by the rule (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for latent, t in result["totals_s"].items():
        lines.append(
            f"| {latent} | {t['onednn']:.3f} | {t['matmul']:.3f} | {t['rule']:.3f} | {t['onednn'] - t['rule']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
