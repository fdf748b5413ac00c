"""CPU speed and peak memory of exported integer models (W8A8, W4A8) against fp32, side by side in one run.

Cases:

* ``block``: the linear layers of an SD1.5-shaped transformer block (diffusers ``BasicTransformerBlock``: self
  attention, cross attention over 77 x 768 text tokens, GEGLU feed-forward), 4096 tokens, width 320 and 1280.  Each
  linear layer runs on the input it sees in the fp32 block; the time is the sum over the block's linear layers (the
  integer path includes quantizing its input).  The whole block (attention, norms) is timed too, for context.
* ``unet``: the embedded digits UNet (``diffusers_qalora.testbed``) at batch 64, plus a profile of where the time
  goes.

Integer models are built the way a user builds them: ``get_qalora_model`` (min-max weight steps), activation
calibration on a few forward passes, ``export_quantized``.  W4A8 stores int4 codes and runs them on the int8 kernels
after unpacking (once, at the first call).  Timing: ``torch.set_num_threads`` fixed, every variant once per repeat in
rotating order (interleaved), medians over repeats, ratios from the same run.  Peak memory: each variant in a fresh
subprocess, the process's peak RSS (``VmHWM``, reset after the model is built) over one forward pass, next to the bytes
the model's tensors hold.  Results go to ``benchmarks/results/export_speed.{json,md}``.

    python benchmarks/export_speed.py                      # 1 thread, block widths 320 and 1280, UNet batch 64
    python benchmarks/export_speed.py --threads 2 --repeats 5
    python benchmarks/export_speed.py --cases unet --no-memory
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import diffusers_qalora as dq
from diffusers_qalora.evaluation.report import machine_info
from diffusers_qalora.export import IntegerLayer, integer_layers, onednn_status

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"fp32": None, "W8A8": (8, 8), "W4A8": (4, 8)}
TIMESTEP = 500.0
TABLE = [0.0, 250.0, 500.0, 750.0, 999.0]


# -- models ----------------------------------------------------------------------------------------------------------
def build_block(width: int, seed: int = 0) -> nn.Module:
    """SD1.5's transformer block at ``width``: 8 heads, cross attention to 768-d text tokens, GEGLU (4x) FFN."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(seed)
    return BasicTransformerBlock(width, 8, width // 8, cross_attention_dim=768, activation_fn="geglu").eval()


def block_inputs(width: int, tokens: int = 4096, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, tokens, width, generator=g),
        "encoder_hidden_states": torch.randn(1, 77, 768, generator=g),
        "timestep": torch.tensor([TIMESTEP]),
    }


def unet_inputs(batch: int = 64, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 1, 16, 16, generator=g),
        "timestep": torch.full((batch,), TIMESTEP),
        "class_labels": torch.randint(0, 10, (batch,), generator=g),
    }


def build_unet() -> nn.Module:
    from diffusers_qalora.testbed import load_testbed

    return load_testbed(verify=False).unet


def quantize(model: nn.Module, bits: tuple[int, int], calibration: list[dict]) -> nn.Module:
    """PTQ as a user would run it (min-max weights, min-max activation calibration), then export."""
    cfg = dq.QALoraConfig(
        r=4, weight_bits=bits[0], act_bits=bits[1], timesteps=TABLE, weight_init="minmax", act_init="minmax"
    )
    model = dq.get_qalora_model(model, cfg)
    dq.calibrate_activations(model, lambda: [model(**inputs) for inputs in calibration])
    return dq.export_quantized(model)


def calibration_inputs(case: str, width: int) -> list[dict]:
    if case == "block":
        small = block_inputs(width, tokens=256, seed=7)
        return [{**small, "timestep": torch.tensor([t])} for t in TABLE]
    return [{**unet_inputs(8, seed=7), "timestep": torch.full((8,), t)} for t in TABLE]


def build_variant(case: str, width: int, variant: str) -> nn.Module:
    model = build_block(width) if case == "block" else build_unet()
    bits = VARIANTS[variant]
    if bits is not None:
        model = quantize(model, bits, calibration_inputs(case, width))
    return model.eval()


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | IntegerLayer)]


def capture_linear_inputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """The input each linear layer sees in one forward pass of ``model``."""
    seen, handles = {}, []
    for name in linear_names(model):
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].detach())))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return seen


# -- timing ----------------------------------------------------------------------------------------------------------
def interleaved(
    fns: dict[str, callable], repeats: int, warmup: int = 1, budget_s: float = 4.0, max_repeats: int = 41
) -> dict[str, list[float]]:
    """Time every function once per repeat, in rotating order.  Cheap cases get more repeats (up to
    ``max_repeats``, within about ``budget_s`` seconds per function), so that the medians of short timings are not at
    the mercy of a few disturbed runs on a shared machine."""
    slowest = 0.0
    for fn in fns.values():
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            slowest = max(slowest, time.perf_counter() - t0)
    repeats = max(repeats, min(max_repeats, int(budget_s / max(slowest, 1e-6))))
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always runs first
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {
        "repeats": len(next(iter(times.values()))),
        "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "speedup_vs_fp32": {k: round(med["fp32"] / v, 3) for k, v in med.items() if k != "fp32"},
        "min_ms": {k: round(v * 1e3, 3) for k, v in low.items()},
        "speedup_of_min_vs_fp32": {k: round(low["fp32"] / v, 3) for k, v in low.items() if k != "fp32"},
        "all_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in times.items()},
    }


def run_block(width: int, repeats: int) -> dict:
    inputs = block_inputs(width)
    models = {v: build_variant("block", width, v) for v in VARIANTS}
    for m in models.values():
        m.requires_grad_(False)
    captured = capture_linear_inputs(models["fp32"], inputs)
    for name in ("W8A8", "W4A8"):  # the integer blocks need their timestep context set, as in a forward pass
        with torch.no_grad():
            models[name](**inputs)
    shapes = {n: [list(x.shape), list(models["fp32"].get_submodule(n).weight.shape)] for n, x in captured.items()}

    def linears(model):
        layers = [(model.get_submodule(n), x) for n, x in captured.items()]

        def fn():
            with torch.no_grad():
                for layer, x in layers:
                    layer(x)

        return fn

    def whole(model):
        def fn():
            with torch.no_grad():
                model(**inputs)

        return fn

    first_call = {}
    for name in ("W8A8", "W4A8"):
        for layer in integer_layers(models[name]).values():
            layer._derived.clear()  # time the first call: unpack (W4) and oneDNN weight packing included
        t0 = time.perf_counter()
        linears(models[name])()
        first_call[name] = round((time.perf_counter() - t0) * 1e3, 3)
    result = {
        "case": f"block width {width}",
        "tokens": 4096,
        "width": width,
        "linear_layers": shapes,
        "linears": summarize(interleaved({k: linears(m) for k, m in models.items()}, repeats)),
        "whole_block": summarize(interleaved({k: whole(m) for k, m in models.items()}, max(3, repeats // 2))),
        "first_call_ms_incl_weight_packing": first_call,
    }
    del models
    gc.collect()
    return result


CATEGORIES = (  # first match wins
    # torch.compile: Inductor's fused kernels run inside the compiled graph's call; the integer layers' custom op
    # (its Python, the per-sample epilogue) around oneDNN's product
    ("fused kernels (torch.compile)", ("CompiledFxGraph", "cpp_fused", "Torch-Compiled Region")),
    ("integer product op (epilogue, Python)", ("diffusers_qalora::",)),
    ("integer conv/matmul (oneDNN)", ("onednn::",)),
    ("fp32 conv/matmul", ("mkldnn_convolution", "aten::mm", "aten::addmm", "aten::bmm", "aten::convolution")),
    ("activation quantization", ("quantize_per_tensor", "aten::set_", "aten::clamp")),
    ("attention (SDPA)", ("scaled_dot_product",)),
    ("normalization", ("group_norm", "layer_norm")),
    (
        "elementwise (SiLU, GELU, add, mul, ...)",
        (
            "aten::silu",
            "aten::gelu",
            "aten::add",
            "aten::mul",
            "aten::div",
            "aten::sub",
            "aten::exp",
            "aten::sin",
            "aten::cos",
        ),
    ),
    (
        "copies, layout, concat, upsample",
        ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous", "upsample", "aten::_to_copy"),
    ),
)


def profile_table(model: nn.Module, inputs: dict, rows: int = 15) -> dict:
    """Self CPU time of one forward pass: the top ops, and every op grouped into a few categories."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    categories: dict[str, float] = {}
    for e in events:
        name = next((c for c, keys in CATEGORIES if any(k in e.key for k in keys)), "other (Python, dispatch, ...)")
        categories[name] = categories.get(name, 0.0) + e.self_cpu_time_total
    return {
        "total_ms": round(total / 1e3, 3),
        "categories": {
            k: {"ms": round(v / 1e3, 3), "share": round(v / total, 4)}
            for k, v in sorted(categories.items(), key=lambda kv: -kv[1])
        },
        "top_ops": [
            {
                "op": e.key,
                "self_ms": round(e.self_cpu_time_total / 1e3, 3),
                "share": round(e.self_cpu_time_total / total, 4),
                "calls": e.count,
            }
            for e in events[:rows]
        ],
    }


def run_unet(batch: int, repeats: int) -> dict:
    inputs = unet_inputs(batch)
    models = {v: build_variant("unet", 0, v) for v in VARIANTS}
    # The integer convolutions work in channels-last: time the fp32 model in channels-last too, so that the layout
    # alone is not mistaken for the integer speed-up.
    fp32_cl = build_variant("unet", 0, "fp32").to(memory_format=torch.channels_last)
    inputs_cl = {**inputs, "sample": inputs["sample"].contiguous(memory_format=torch.channels_last)}

    def fwd(model, inp=inputs):
        def fn():
            with torch.no_grad():
                model(**inp)

        return fn

    fns = {k: fwd(m) for k, m in models.items()}
    fns["fp32 channels_last"] = fwd(fp32_cl, inputs_cl)
    result = {
        "case": f"embedded UNet batch {batch}",
        "batch": batch,
        "forward": summarize(interleaved(fns, repeats)),
        "profile": {k: profile_table(m, inputs) for k, m in models.items()},
    }
    del models
    gc.collect()
    return result


# -- memory (one subprocess per variant) ---------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, plus the oneDNN-packed int8 weights built at the first call."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for layer in integer_layers(model).values():
        for _, value in layer._derived.values():
            items = value if isinstance(value, list) else [value]
            tensors = [t for item in items for t in (item if isinstance(item, tuple) else (item,))]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def memory_worker(case: str, width: int, variant: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    base = _status_kb("VmRSS")
    model = build_variant(case, width, variant)
    inputs = block_inputs(width) if case == "block" else unet_inputs(64)
    gc.collect()
    try:  # hand what the build freed back to the OS, so that the RSS counts live memory only (glibc)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    with torch.no_grad():
        model(**inputs)
        model(**inputs)
    peak = _status_kb("VmHWM")
    return {
        "process_baseline_mb": round(base / 1024, 1),
        "rss_before_forward_mb": round(before / 1024, 1),
        "peak_rss_forward_mb": round(peak / 1024, 1),
        "forward_increase_mb": round((peak - before) / 1024, 1),
        "model_tensor_mb": round(tensor_bytes(model) / 2**20, 2),
    }


def run_memory(case: str, width: int, threads: int) -> dict:
    out = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--worker", case, str(width), variant, "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            out[variant] = {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
        else:
            out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# -- report ----------------------------------------------------------------------------------------------------------
def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# Integer export: CPU speed and memory",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['machine']['cpu']}, torch {meta['machine']['torch']}, **{meta['threads']} thread(s)**, "
        f"at least {meta['repeats']} interleaved repeats (more for short cases), medians; oneDNN usable: "
        f"{meta['onednn']}. "
        "The build machine is shared with other jobs: absolute times move between runs, ratios are from the same run.",
        "",
        "| case | repeats | fp32 ms | W8A8 ms | W4A8 ms | W8A8 speed-up | W4A8 speed-up | speed-ups of the minima |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for part in ("linears", "whole_block", "forward"):
            if part not in r:
                continue
            s = r[part]
            label = {"linears": "linear layers", "whole_block": "whole block", "forward": "forward"}[part]
            m, sp = s["median_ms"], s["speedup_vs_fp32"]
            lo = s["speedup_of_min_vs_fp32"]
            lines.append(
                f"| {r['case']}: {label} | {s['repeats']} | {m['fp32']:.1f} | {m['W8A8']:.1f} | "
                f"{m['W4A8']:.1f} | **{sp['W8A8']:.2f}x** | **{sp['W4A8']:.2f}x** | "
                f"{lo['W8A8']:.2f}x / {lo['W4A8']:.2f}x |"
            )
            if "fp32 channels_last" in m:
                lines.append(
                    f"| {r['case']}: fp32 in channels_last (layout only) | {s['repeats']} | "
                    f"{m['fp32 channels_last']:.1f} | | | {sp['fp32 channels_last']:.2f}x | | |"
                )
    mem = [r for r in results if "memory" in r]
    if mem:
        lines += [
            "",
            "Peak memory (a fresh process per variant builds the model, returns freed memory to the OS "
            "(`malloc_trim`), resets the peak RSS, then runs two forward passes; the RSS includes the ~0.5 GB "
            "of the Python/torch/diffusers process itself; model tensors include oneDNN's packed int8 weights):",
            "",
            "| case | variant | model tensors MB | RSS before forward MB | peak RSS MB | forward increase MB |",
            "|---|---|---|---|---|---|",
        ]
        for r in mem:
            for variant, m in r["memory"].items():
                if "error" in m:
                    lines.append(f"| {r['case']} | {variant} | error: {m['error']} | | | |")
                else:
                    lines.append(
                        f"| {r['case']} | {variant} | {m['model_tensor_mb']:.1f} | "
                        f"{m['rss_before_forward_mb']:.0f} | {m['peak_rss_forward_mb']:.0f} | "
                        f"{m['forward_increase_mb']:.0f} |"
                    )
    for r in results:
        if "profile" in r:
            heading = f"{r['case']}, one profiled forward each, torch.profiler self CPU time, ms and share"
            lines += profile_markdown(r["profile"], heading)
    return "\n".join(lines) + "\n"


def profile_markdown(prof: dict, heading: str, calls: bool = False) -> list[str]:
    """Markdown lines of a "where the time goes" table (one column per variant of `profile_table` results) and the
    top ops of each variant (with their call counts if ``calls``)."""
    names = list(prof)
    lines = [
        "",
        f"Where the time goes ({heading}):",
        "",
        "| category | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for c in dict.fromkeys(c for v in prof.values() for c in v["categories"]):
        cells = []
        for v in names:
            x = prof[v]["categories"].get(c)
            cells.append(f"{x['ms']:.1f} ({100 * x['share']:.0f}%)" if x else "")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| total (profiled) | " + " | ".join(f"{prof[v]['total_ms']:.1f}" for v in names) + " |")
    lines += ["", "Top ops:", ""]
    for v in names:
        ops = prof[v]["top_ops"][:8]
        top = ", ".join(f"{x['op']} {100 * x['share']:.0f}%" + (f" ({x['calls']})" if calls else "") for x in ops)
        lines.append(f"- {v}: {top}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", nargs="+", default=["block", "unet"], choices=["block", "unet"])
    parser.add_argument("--widths", nargs="+", type=int, default=[320, 1280])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "WIDTH", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        case, width, variant = args.worker
        print(json.dumps(memory_worker(case, int(width), variant, args.threads)))
        return 0
    started = time.time()
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split("/main/")[-1], *sys.argv[1:]]),
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": machine_info(args.threads),
        "onednn": onednn_status()[1],
    }
    results = []
    if "block" in args.cases:
        for width in args.widths:
            r = run_block(width, args.repeats)
            if not args.no_memory:
                r["memory"] = run_memory("block", width, args.threads)
            results.append(r)
            print(json.dumps({k: r[k] for k in ("case", "linears")}, indent=1)[:600], flush=True)
    if "unet" in args.cases:
        r = run_unet(args.batch, args.repeats)
        if not args.no_memory:
            r["memory"] = run_memory("unet", 0, args.threads)
        results.append(r)
        print(json.dumps(r["forward"]["median_ms"]), json.dumps(r["forward"]["speedup_vs_fp32"]), flush=True)
    meta["total_seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (args.out / "export_speed.md").write_text(markdown(meta, results))
    print(f"wrote {args.out / 'export_speed.json'} and .md ({meta['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
