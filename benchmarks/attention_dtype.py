"""Scaled dot-product attention in fp32 against bf16 at the attention shapes of an SD1.5 UNet forward pass on CPU.

The exported integer SD1.5-shaped UNet spends about half of its forward pass in float attention
(`benchmarks/results/cpu_inference/`), which the integer layers do not touch.  This measures what running that
attention in bf16 would save: ``F.scaled_dot_product_attention`` on the q/k/v shapes of each attention call of
SD1.5 at 64 x 64 latents, batch 2 (classifier-free guidance), 8 heads; the bf16 timing includes casting q, k, v to
bf16 and the output back to fp32, as an attention processor would.  Calls are interleaved per shape, medians over
repeats; the UNet total weights each shape by its number of calls (16 transformer blocks, each with a self- and a
cross-attention to 77 text tokens).  The relative error is ``||out_bf16 - out_fp32|| / ||out_fp32||``, random
normal q/k/v.

    python benchmarks/attention_dtype.py --threads 1 --repeats 5

Results: ``benchmarks/results/attention_dtype/attention_dtype.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_qalora.evaluation.report import machine_info, write_results

RESULTS = Path(__file__).parent / "results" / "attention_dtype"
BATCH, HEADS, TEXT_TOKENS = 2, 8, 77
# (image tokens, channels, transformer blocks at that size) of SD1.5 at 64 x 64 latents: down + up blocks, mid block.
LEVELS = ((4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1))


def attention_calls() -> list[dict]:
    calls = []
    for tokens, channels, blocks in LEVELS:
        head_dim = channels // HEADS
        calls.append({"kind": "self", "tokens": tokens, "keys": tokens, "head_dim": head_dim, "count": blocks})
        calls.append({"kind": "cross", "tokens": tokens, "keys": TEXT_TOKENS, "head_dim": head_dim, "count": blocks})
    return calls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for call in attention_calls():
        q = torch.randn(BATCH, HEADS, call["tokens"], call["head_dim"], generator=gen)
        k = torch.randn(BATCH, HEADS, call["keys"], call["head_dim"], generator=gen)
        v = torch.randn(BATCH, HEADS, call["keys"], call["head_dim"], generator=gen)

        def fp32(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v)

        def bf16(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()

        reference, low = fp32(), bf16()
        error = float((low - reference).norm() / reference.norm())
        times = {"fp32": [], "bf16": []}
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, fn in (("fp32", fp32), ("bf16", bf16)) if rep % 2 == 0 else (("bf16", bf16), ("fp32", fp32)):
                start = time.perf_counter()
                fn()
                if rep:
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append({**call, "median_s": med, "speedup": med["fp32"] / med["bf16"], "relative_error": error})
        print(call, {k: round(t * 1e3, 2) for k, t in med.items()}, flush=True)
    total = {name: sum(r["median_s"][name] * r["count"] for r in rows) for name in ("fp32", "bf16")}
    payload = {
        "command": "python benchmarks/attention_dtype.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": machine_info(args.threads),
        "batch": BATCH,
        "heads": HEADS,
        "rows": rows,
        "unet_total_s": total,
        "unet_speedup": total["fp32"] / total["bf16"],
    }
    lines = [
        "# Attention in fp32 against bf16 at SD1.5's shapes (CPU)",
        "",
        f"Command: `{payload['command']}`; {args.threads} thread(s), {args.repeats} interleaved repeats (medians), "
        f"batch {BATCH}, {HEADS} heads, seed {args.seed}; {payload['machine'].get('cpu', '')}.",
        "",
        "| attention | image tokens | keys | head dim | calls per forward | fp32 (ms) | bf16 (ms) | speed-up | relative error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['tokens']} | {r['keys']} | {r['head_dim']} | {r['count']} | "
            f"{r['median_s']['fp32'] * 1e3:.1f} | {r['median_s']['bf16'] * 1e3:.1f} | {r['speedup']:.2f}x | "
            f"{r['relative_error']:.4f} |"
        )
    lines += [
        "",
        f"UNet forward total: fp32 {total['fp32']:.2f} s, bf16 {total['bf16']:.2f} s "
        f"(**{payload['unet_speedup']:.2f}x**).",
        "",
    ]
    write_results(RESULTS, "attention_dtype", payload, "\n".join(lines))
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
