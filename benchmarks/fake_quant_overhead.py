"""Forward + backward cost of fake quantization (W4A4) relative to the plain layer, at Stable Diffusion 1.5 sizes.

Each case times one training step (forward and backward) of

* the plain layer: ``F.linear(x, W, b)`` / ``F.conv2d(x, W, b)``, gradients to ``x`` and ``W``;
* the fake-quantized layer: the weight through ``WeightQuantizer`` (4-bit symmetric, per output channel, learnable
  step) and the input through ``TemporalActQuantizer`` (4-bit asymmetric, a calibrated 100-entry timestep table, the
  context set to one timestep), gradients to ``x``, ``W``, the weight steps and the active timestep's act step and
  zero point.

The two are measured interleaved (alternating order) in the same process, and the ratio is reported from the same run
as the median over repeats.  Results go to ``benchmarks/results/fake_quant_overhead.{json,md}``.

    python benchmarks/fake_quant_overhead.py                # 2 threads, cold caches, all cases
    python benchmarks/fake_quant_overhead.py --threads 2 1 --cache cold hot --repeats 5
    python benchmarks/fake_quant_overhead.py --threads 1 --quick   # Linear cases only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from diffusers_qalora.quant import PerChannel, TemporalActQuantizer, TimestepContext, WeightQuantizer
except ImportError:  # a checkout without `pip install -e .`: use the package next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffusers_qalora.quant import PerChannel, TemporalActQuantizer, TimestepContext, WeightQuantizer

RESULTS = Path(__file__).resolve().parent / "results"
TABLE = [float(t) for t in range(1, 1000, 10)]  # 100 entries, the DDIM "leading" schedule of 100 steps + offset 1
TIMESTEP = 500.0  # between two entries: the lookup interpolates


@dataclass
class Case:
    name: str
    kind: str  # "linear" | "conv"
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]


CASES = [
    Case("linear 4096x320 -> 320", "linear", (4096, 320), (320, 320)),
    Case("linear 4096x320 -> 1280", "linear", (4096, 320), (1280, 320)),
    Case("linear 1024x1280 -> 320", "linear", (1024, 1280), (320, 1280)),
    Case("conv3x3 320ch 32x32 b2", "conv", (2, 320, 32, 32), (320, 320, 3, 3)),
    Case("conv3x3 640ch 32x32 b1", "conv", (1, 640, 32, 32), (640, 640, 3, 3)),
    Case("conv3x3 1280ch 16x16 b1", "conv", (1, 1280, 16, 16), (1280, 1280, 3, 3)),
]


class FakeQuantLayer(nn.Module):
    """A Linear or 3x3 Conv2d whose weight and input are fake-quantized (W4A4), as a QALoRA layer does."""

    def __init__(
        self, kind: str, weight: torch.Tensor, bias: torch.Tensor, context: TimestepContext, calib: torch.Tensor
    ):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.wq = WeightQuantizer(weight.shape, bits=4, symmetric=True, granularity=PerChannel())
        self.wq.initialize_(weight, "minmax")
        self.aq = TemporalActQuantizer(TABLE, bits=4, symmetric=False, name=f"bench.{kind}")
        self.aq.context = context
        # calibrate on a few timesteps; the other 97 entries are filled by interpolation
        self.aq.start_calibration("lp")
        for t, scale in ((1.0, 0.5), (501.0, 1.0), (991.0, 2.0)):
            context.set(t)
            self.aq(calib * scale)
        self.aq.finish_calibration()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.wq(self.weight)
        x = self.aq(x)
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, padding=1)


def plain_forward(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, b) if kind == "linear" else F.conv2d(x, w, b, padding=1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_FLUSH: torch.Tensor | None = None


def flush_caches() -> None:
    """Write 64 MiB so that the next step starts with cold caches, as a layer inside a network does."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.zeros(16 * 2**20)
    _FLUSH.add_(1.0)


def time_case(case: Case, repeats: int, iters: int, warmup: int, cold: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    fan_in = 1
    for s in case.w_shape[1:]:
        fan_in *= s
    weight = torch.randn(case.w_shape, generator=gen) / fan_in**0.5
    bias = torch.randn(case.w_shape[0], generator=gen) * 0.01
    x0 = torch.randn(case.x_shape, generator=gen)
    context = TimestepContext()
    quant = FakeQuantLayer(case.kind, weight, bias, context, x0)
    context.set(torch.tensor(TIMESTEP))
    w_plain = nn.Parameter(weight.clone())
    b_plain = nn.Parameter(bias.clone())
    x = x0.clone().requires_grad_(True)
    with torch.no_grad():
        grad_out = torch.randn_like(plain_forward(case.kind, x0, weight, bias))

    def step_plain() -> None:
        x.grad = w_plain.grad = b_plain.grad = None
        plain_forward(case.kind, x, w_plain, b_plain).backward(grad_out)

    def step_quant() -> None:
        x.grad = None
        quant.zero_grad(set_to_none=True)
        quant(x).backward(grad_out)

    # the gradients the benchmark claims to exercise do flow
    step_quant()
    active = [p for p in quant.aq.step.values if p.grad is not None]
    active_zp = [p for p in quant.aq.zero_point.values if p.grad is not None]
    assert x.grad is not None and quant.wq.step.grad is not None and quant.weight.grad is not None
    assert len(active) == len(active_zp) == 2, "t=500 sits between two table entries: both receive a gradient"

    def timed(fn) -> tuple[float, float]:
        """Mean wall-clock and process-CPU seconds per call over ``iters`` calls (cache flushes not timed)."""
        wall = cpu = 0.0
        for _ in range(iters):
            if cold:
                flush_caches()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
        return wall / iters, cpu / iters

    for _ in range(warmup):
        step_plain()
        step_quant()
    plain, quant_t, ratios, plain_cpu, quant_cpu = [], [], [], [], []
    for r in range(repeats):
        # alternate the order so that neither side always runs on a warmer cache or a quieter machine
        if r % 2 == 0:
            p, pc = timed(step_plain)
            q, qc = timed(step_quant)
        else:
            q, qc = timed(step_quant)
            p, pc = timed(step_plain)
        plain.append(p)
        quant_t.append(q)
        ratios.append(q / p)
        plain_cpu.append(pc)
        quant_cpu.append(qc)
    plain_med, quant_med = statistics.median(plain), statistics.median(quant_t)
    plain_cpu_med, quant_cpu_med = statistics.median(plain_cpu), statistics.median(quant_cpu)
    return {
        "name": case.name,
        "kind": case.kind,
        "input_shape": list(case.x_shape),
        "weight_shape": list(case.w_shape),
        "plain_ms": [round(1e3 * t, 3) for t in plain],
        "quant_ms": [round(1e3 * t, 3) for t in quant_t],
        "plain_median_ms": round(1e3 * plain_med, 3),
        "quant_median_ms": round(1e3 * quant_med, 3),
        "ratio_of_medians": round(quant_med / plain_med, 3),
        "median_of_ratios": round(statistics.median(ratios), 3),
        "plain_cpu_median_ms": round(1e3 * plain_cpu_med, 3),
        "quant_cpu_median_ms": round(1e3 * quant_cpu_med, 3),
        "cpu_ratio_of_medians": round(quant_cpu_med / plain_cpu_med, 3),
    }


def write_markdown(path: Path, meta: dict, runs: list[dict]) -> None:
    lines = [
        "# Fake-quantization overhead (forward + backward, W4A4)",
        "",
        f"Command: `{meta['command']}`  ",
        f"torch {meta['torch']}, {meta['machine']} ({meta['cpu_count']} logical CPUs), {meta['repeats']} repeats "
        f"(median), target ratio <= {meta['target_ratio']}.",
        "",
        "Plain: `F.linear`/`F.conv2d` with gradients to input, weight and bias.  Fake-quantized: weight through "
        "`WeightQuantizer` (4-bit symmetric, per channel, learnable step), input through `TemporalActQuantizer` "
        "(4-bit asymmetric, calibrated 100-entry table, one timestep between two entries), gradients also to the "
        "weight steps and the two active act steps / zero points.  Ratio = fake-quantized / plain, from the same "
        "interleaved run.  Wall = `time.perf_counter`; CPU = `time.process_time` (all threads), which is less "
        "sensitive to other processes taking the cores.  Cold cache: 64 MiB are written (untimed) before every "
        "step, as the other layers of a network would; hot cache: the same layer back to back, which favours the "
        "plain GEMM (its operands stay cached, while the fake-quant passes evict them).",
        "",
    ]
    for run in runs:
        lines += [
            f"## {run['threads']} thread(s), {run['cache']} cache",
            "",
            f"Load average (1 min) before / after: {run['loadavg_before']:.2f} / {run['loadavg_after']:.2f}.",
            "",
        ]
        if max(run["loadavg_before"], run["loadavg_after"]) > meta["cpu_count"] and run["threads"] > 1:
            lines += [
                f"**The machine was oversubscribed** (load above its {meta['cpu_count']} CPUs, from other processes): "
                f"a multi-threaded op ends only when all {run['threads']} of its threads have had a core, which costs "
                "the many short elementwise ops of fake quantization far more than the few long GEMMs of the plain "
                "layer.  These ratios mostly measure that contention; compare a 1-thread run (`--threads 1`).",
                "",
            ]
        lines += [
            "| case | input | weight | plain wall (ms) | fake-quant wall (ms) | ratio wall | median of ratios "
            "| ratio CPU |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in run["results"]:
            lines.append(
                f"| {r['name']} | {'x'.join(map(str, r['input_shape']))} | {'x'.join(map(str, r['weight_shape']))} "
                f"| {r['plain_median_ms']:.2f} | {r['quant_median_ms']:.2f} | {r['ratio_of_medians']:.2f} "
                f"| {r['median_of_ratios']:.2f} | {r['cpu_ratio_of_medians']:.2f} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads; several values run in turn"
    )
    parser.add_argument(
        "--cache",
        nargs="+",
        choices=["cold", "hot"],
        default=["cold"],
        help="cold: flush caches before every timed step (a layer inside a network); hot: back-to-back steps",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per side (median reported)")
    parser.add_argument("--iters", type=int, default=0, help="iterations per repeat (0: 4 for Linear, 2 for conv)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="Linear cases only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and Markdown results")
    args = parser.parse_args(argv)

    cases = [c for c in CASES if not args.quick or c.kind == "linear"]
    start = time.perf_counter()
    runs = []
    for threads, cache in [(t, c) for t in args.threads for c in args.cache]:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        rows = []
        load_before = os.getloadavg()[0]
        for case in cases:
            iters = args.iters or (4 if case.kind == "linear" else 2)
            row = time_case(case, args.repeats, iters, args.warmup, cold=cache == "cold")
            row["iters"] = iters
            rows.append(row)
            print(
                f"[{threads} thr, {cache}] {row['name']:<26} plain {row['plain_median_ms']:8.2f} ms   fake-quant "
                f"{row['quant_median_ms']:8.2f} ms   ratio {row['ratio_of_medians']:.2f} (median of ratios "
                f"{row['median_of_ratios']:.2f}, CPU time {row['cpu_ratio_of_medians']:.2f})",
                flush=True,
            )
        runs.append(
            {
                "threads": torch.get_num_threads(),
                "cache": cache,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg()[0],
                "results": rows,
            }
        )
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": cpu_model(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "iters": args.iters or "4 (linear) / 2 (conv)",
        "warmup": args.warmup,
        "timestep": TIMESTEP,
        "table_entries": len(TABLE),
        "target_ratio": 1.6,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fake_quant_overhead.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    write_markdown(args.out / "fake_quant_overhead.md", meta, runs)
    print(f"wrote {args.out / 'fake_quant_overhead.json'} and .md ({meta['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
