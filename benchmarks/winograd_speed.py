"""CPU speed of int8 Winograd F(4,3) against int8 im2col and fp32 ``F.conv2d`` on Stable Diffusion 1.5-shaped convs.

Each case is one 3x3, stride-1, padding-1 convolution with C -> C channels at the resolution SD1.5 runs it for
512x512 images (batch 1, no classifier-free guidance): 320 channels at 64x64, 640 at 32x32, 1280 at 16x16.  Methods,
all taking and returning fp32 NCHW tensors (every quantize / layout / dequantize step is timed):

* ``fp32``: ``F.conv2d`` (oneDNN fp32);
* ``int8 im2col``: ``Int8Im2colConv2d``: dynamic per-tensor int8 input, int8 weight per output channel, channels-last
  column gather, one ``torch._int_mm`` with int32 accumulation;
* ``int8 Winograd F(4,3)`` (and F(6,3)): ``Int8WinogradConv2d``: Kronecker-GEMM input transform, dynamic int8
  ``V`` per (Winograd position, tile), one ``torch._int_mm`` per position over tiles x channels (int32 accumulation),
  dequantize, Kronecker-GEMM output transform; ``g64`` = groups of 64 input channels (one ``_int_mm`` per position
  and group);
* ``oneDNN int8 conv`` (reference): ``torch.ao.nn.quantized.Conv2d`` on the ``x86`` engine, static per-tensor input /
  output scales calibrated once, including ``quantize_per_tensor`` and ``dequantize``.

Timing: torch threads fixed (``--threads``, one block per value), warm-up, then ``--repeats`` rounds in which every
method runs once in a rotating order (interleaved); the median per method is reported, and ratios are taken from the
same run.  The SQNR of each method against a float64 ``conv2d`` on the same input is reported beside it.

    python benchmarks/winograd_speed.py                    # 1 and 2 threads, all cases
    python benchmarks/winograd_speed.py --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_qalora.evaluation.report import machine_info
from diffusers_qalora.winograd import sqnr_db
from diffusers_qalora.winograd.intmm import Int8Im2colConv2d, Int8WinogradConv2d

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [(320, 64), (640, 32), (1280, 16)]  # (channels, side): SD1.5 UNet levels at 512x512


def _onednn_conv(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    torch.backends.quantized.engine = "x86"
    w = conv.weight.detach()
    w_scale = (w.abs().amax(dim=(1, 2, 3)) / 127).clamp_min(1e-12).double()
    qw = torch.quantize_per_channel(w, w_scale, torch.zeros_like(w_scale, dtype=torch.long), 0, torch.qint8)
    qconv = torch.ao.nn.quantized.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    qconv.set_weight_bias(qw, conv.bias.detach())
    lo, hi = float(y.min()), float(y.max())
    qconv.scale = (hi - lo) / 255
    qconv.zero_point = int(round(-lo / qconv.scale))
    x_lo, x_hi = float(x.min()), float(x.max())
    x_scale = (x_hi - x_lo) / 255
    x_zp = int(round(-x_lo / x_scale))

    def run() -> torch.Tensor:
        return qconv(torch.quantize_per_tensor(x, x_scale, x_zp, torch.quint8)).dequantize()

    return run


def methods_for(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    im2col = Int8Im2colConv2d.from_conv2d(conv)
    f43 = Int8WinogradConv2d.from_conv2d(conv, 4)
    f43g = Int8WinogradConv2d.from_conv2d(conv, 4, group_size=64)
    f63 = Int8WinogradConv2d.from_conv2d(conv, 6)
    weight, bias = conv.weight.detach(), conv.bias.detach()
    return {
        "fp32 F.conv2d": lambda: F.conv2d(x, weight, bias, padding=1),
        "int8 im2col (_int_mm)": lambda: im2col(x),
        "int8 Winograd F(4,3) (_int_mm)": lambda: f43(x),
        "int8 Winograd F(4,3) g64 (_int_mm)": lambda: f43g(x),
        "int8 Winograd F(6,3) (_int_mm)": lambda: f63(x),
        "oneDNN int8 conv (torch.ao, reference)": _onednn_conv(conv, x, y),
    }


def time_case(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int) -> dict[str, list[float]]:
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no method always runs first
            for n in order:
                start = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "winograd_speed")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])

    load_before = os.getloadavg()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for channels, side in CASES:
            torch.manual_seed(0)
            conv = nn.Conv2d(channels, channels, 3, padding=1)
            x = torch.randn(args.batch, channels, side, side)
            with torch.no_grad():
                y = conv(x)
                ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            fns = methods_for(conv, x, y)
            with torch.no_grad():
                sqnr = {n: sqnr_db(ref, fn()) for n, fn in fns.items()}
            times = time_case(fns, args.repeats, args.warmup)
            base = statistics.median(times["fp32 F.conv2d"])
            for name in fns:
                med = statistics.median(times[name])
                results.append(
                    {
                        "threads": threads,
                        "channels": channels,
                        "side": side,
                        "batch": args.batch,
                        "method": name,
                        "median_ms": 1e3 * med,
                        "min_ms": 1e3 * min(times[name]),
                        "vs_fp32": base / med,
                        "sqnr_db": sqnr[name],
                    }
                )
                print(
                    f"{threads} thr  {channels:5d}ch {side:3d}px  {name:40s} {1e3 * med:8.2f} ms  "
                    f"x{base / med:5.2f} vs fp32  SQNR {sqnr[name]:6.1f} dB",
                    flush=True,
                )

    payload = {
        "command": command,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "batch": args.batch,
        "threads": args.threads,
        "machine": machine_info(),
        "quantized_engine": torch.backends.quantized.engine,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# int8 Winograd vs int8 im2col vs fp32 conv on CPU (SD1.5-shaped 3x3 convs)",
        "",
        f"Command: `{command}`",
        "",
        f"{payload['machine']['cpu']}, torch {torch.__version__}; batch {args.batch}; median of {args.repeats} "
        "interleaved repeats after a warm-up; `speed vs fp32` = fp32 time / method time in the same run (> 1 is "
        "faster). SQNR against a float64 conv on the same N(0,1) input. The machine (2 cores) is shared: 1-minute "
        f"load average {load_before[0]:.1f} before, {payload['load_average_after'][0]:.1f} after; absolute times are "
        "noisy, the ratios within one block less so.",
        "",
        "| threads | conv | method | median ms | speed vs fp32 | SQNR (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['threads']} | {r['channels']}ch {r['side']}x{r['side']} | {r['method']} "
            f"| {r['median_ms']:.2f} | {r['vs_fp32']:.2f}x | {r['sqnr_db']:.1f} |"
        )
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
