"""Whole-model integer inference on CPU: fp32 against the project's exported W8A8 / W4A8 models (one timestep shared
by the batch, and a different timestep per sample) and against peer libraries, side by side in one run.

Cases:

* ``unet``: the embedded digits UNet (``diffusers_qalora.testbed``) at batch 64;
* ``sd15``: an SD1.5-shaped ``UNet2DConditionModel`` (diffusers' default config: 320/640/1280/1280 channels, cross
  attention to 77 x 768 text tokens; random weights), 4 x 64 x 64 latents, batch 2 (classifier-free guidance).

Variants: ``fp32`` (eager, the model as diffusers builds it); ``W8A8`` / ``W4A8`` (``get_qalora_model`` with min-max
weight steps, activation calibration, ``export_quantized``: the integer oneDNN path), each timed with a shared timestep
and with mixed timesteps (``... mixed``: every sample at its own timestep); peers where they install and run with
this torch: optimum-quanto (``quantize(weights=qint8, activations=qint8)``, calibrated, frozen), torchao
(``Int8DynamicActivationInt8WeightConfig``) and SDNQ (``sdnq_post_load_quant`` with int8 weights, quantized convs and
the int8 matmul).  A peer that fails is reported with its error, not dropped silently.

``--bf16`` adds the models with their float layers in bf16, as ``from_pretrained(..., torch_dtype=torch.bfloat16)``
loads them: ``bf16`` (the float model cast to bf16, no quantization) and ``W8A8 bf16`` / ``W4A8 bf16`` (the exported
integer models saved and loaded back with that ``torch_dtype``: the integer layers keep their codes and float32
scales and take bf16 inputs; GroupNorm, SiLU, attention and the other float layers run in bf16); their inputs are cast
to bf16.  In the SD1.5-shaped case, ``--sd15-variants bf16`` times the float model in bf16 in a pass of its own.
``--bf16-attention`` adds, in the SD1.5-shaped case, a second build of each integer model whose float
attention runs in bf16 (``QALoraAttnProcessor(compute_dtype=torch.bfloat16)``, ``... bf16-attn``).  ``--compile`` adds
``torch.compile`` (Inductor, static shapes) of fp32 (and bf16) and of each integer model (``... compiled``), compiled
before the timed passes: the integer layers then trace their activation quantization for Inductor to fuse and call
oneDNN through one custom op (docs/export.md#torchcompile).

Timing: ``torch.set_num_threads`` fixed per pass (``--threads 1 2``), every variant once per repeat in rotating order
(interleaved), medians over repeats, ratios to fp32 from the same pass.  Memory: bytes held by each model's tensors
(oneDNN's packed int8 copies included) and the peak RSS increase of one forward pass over the RSS before it
(``VmHWM`` reset per variant).  Profile: torch.profiler self CPU time of one forward per variant, in categories.

The SD1.5-shaped case runs each quantized variant in its own subprocess next to its own fp32 model (one 3.4 GB fp32
model and one integer model alive at a time), so its ratios come from one process per variant.  Peers run on the
embedded UNet only by default (``--sd15-peers`` adds them to the SD1.5 case: each then needs a second fp32-sized
model during its own build).  Results: ``benchmarks/results/cpu_inference.{json,md}``.

    python benchmarks/cpu_inference.py                                   # both cases, 1 and 2 threads
    python benchmarks/cpu_inference.py --cases unet --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from export_speed import _status_kb, interleaved, profile_markdown, profile_table, tensor_bytes
from torch import nn

import diffusers_qalora as dq
from diffusers_qalora.evaluation.report import machine_info
from diffusers_qalora.export import onednn_status

RESULTS = Path(__file__).resolve().parent / "results"
OURS = {"W8A8": (8, 8), "W4A8": (4, 8)}
PEERS = ("quanto W8A8", "torchao W8A8", "SDNQ W8A8")
TABLE = [0.0, 250.0, 500.0, 750.0, 999.0]
SHARED_T = 500.0
COMPILED = " compiled"
BF16_ATTENTION = " bf16-attn"
BF16 = " bf16"


# -- models and inputs -------------------------------------------------------------------------------------------------
def build_float(case: str) -> nn.Module:
    if case == "unet":
        from diffusers_qalora.testbed import load_testbed

        return load_testbed(verify=False).unet.eval()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()  # otherwise diffusers defaults = SD1.5


def inputs(case: str, mixed: bool, batch: int | None = None, size: int | None = None, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if case == "unet":
        batch = batch or 64
        out = {
            "sample": torch.randn(batch, 1, 16, 16, generator=g),
            "class_labels": torch.randint(0, 10, (batch,), generator=g),
        }
    else:
        batch, size = batch or 2, size or 64
        out = {
            "sample": torch.randn(batch, 4, size, size, generator=g),
            "encoder_hidden_states": torch.randn(batch, 77, 768, generator=g),
        }
    if mixed:  # every sample at its own (integer) timestep, as a trainer or batched serving produces
        out["timestep"] = torch.randperm(1000, generator=g)[:batch].float()
    else:
        out["timestep"] = torch.full((batch,), SHARED_T)
    return out


def calibration(case: str) -> list[dict]:
    """A few calibration batches per table timestep (small ones for the SD1.5-shaped model: the ranges, not the
    speed, depend on them)."""
    if case == "unet":
        return [{**inputs("unet", False, batch=8, seed=7), "timestep": torch.full((8,), t)} for t in TABLE]
    return [{**inputs("sd15", False, batch=1, size=32, seed=7), "timestep": torch.full((1,), t)} for t in TABLE[::2]]


def build_ours(case: str, bits: tuple[int, int]) -> nn.Module:
    table = TABLE if case == "unet" else TABLE[::2]
    model = build_float(case)
    cfg = dq.QALoraConfig(
        r=4, weight_bits=bits[0], act_bits=bits[1], timesteps=table, weight_init="minmax", act_init="minmax"
    )
    model = dq.get_qalora_model(model, cfg)
    with torch.no_grad():
        dq.calibrate_activations(model, lambda: [model(**c) for c in calibration(case)])
    model = dq.export_quantized(model)
    gc.collect()
    return model.eval()


def build_peer(case: str, name: str) -> nn.Module:
    model = build_float(case)
    if name == "quanto W8A8":
        from optimum.quanto import Calibration, freeze, qint8, quantize

        quantize(model, weights=qint8, activations=qint8)
        with torch.no_grad(), Calibration():
            for c in calibration(case):
                model(**c)
        freeze(model)
    elif name == "torchao W8A8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    elif name == "SDNQ W8A8":
        from sdnq import sdnq_post_load_quant

        # int8 weights, convs included, int8 matmul with dynamically quantized activations; the small layers of the
        # digits UNet are not skipped (SDNQ skips layers under 16384 weights by default).
        model = sdnq_post_load_quant(
            model,
            weights_dtype="int8",
            quant_conv=True,
            use_quantized_matmul=True,
            use_quantized_matmul_conv=True,
            minimum_allowed_numel=0,
            minimum_allowed_channel_size=0,
            torch_dtype=torch.float32,
        )
    else:
        raise ValueError(name)
    return model.eval()


def cast_inputs(name: str, inp: dict) -> dict:
    """The inputs of variant ``name``: its float tensors in bf16 for the bf16 variants (the timestep stays float32;
    diffusers casts its embedding)."""
    if f"{BF16} " not in f" {name} ":
        return inp
    return {k: v.bfloat16() if k != "timestep" and v.is_floating_point() else v for k, v in inp.items()}


def forward_fn(model: nn.Module, inp: dict):
    def fn():
        with torch.no_grad():
            model(**inp)

    return fn


def output_of(model: nn.Module, inp: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inp).sample.float()


def build_bf16(models: dict[str, nn.Module], case: str) -> None:
    """``bf16`` (the float model in bf16) and each integer model with its float layers in bf16, as a user loads it:
    saved, then ``from_pretrained(..., torch_dtype=torch.bfloat16)``."""
    models["bf16"] = build_float(case).to(torch.bfloat16)
    for name in [n for n in models if n in OURS]:
        with tempfile.TemporaryDirectory() as folder:
            models[name].save_pretrained(folder)
            models[f"{name}{BF16}"] = type(models[name]).from_pretrained(folder, torch_dtype=torch.bfloat16).eval()


def forward_memory(model: nn.Module, inp: dict) -> dict:
    """Model tensor bytes and the peak RSS increase of one forward pass (after a warm-up pass)."""
    fn = forward_fn(model, inp)
    fn()
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    return {
        "model_tensor_mb": round(tensor_bytes(model) / 2**20, 1),
        "forward_peak_increase_mb": round((peak - before) / 1024, 1),
    }


# -- one pass over variants --------------------------------------------------------------------------------------------
def measure(
    case: str,
    models: dict[str, nn.Module],
    threads: list[int],
    repeats: int,
    profile_threads: int,
    budget_s: float,
    profile_mixed: bool = True,
) -> dict:
    shared, mixed = inputs(case, False), inputs(case, True)
    fns = {}
    for name, model in models.items():
        fns[name] = forward_fn(model, cast_inputs(name, shared))
        if _ours(name):
            fns[f"{name} mixed"] = forward_fn(model, cast_inputs(name, mixed))
    reference = output_of(models["fp32"], shared)
    quality = {}
    for name, model in models.items():
        if name != "fp32":
            out = output_of(model, cast_inputs(name, shared))
            quality[name] = round(float((out - reference).norm() / reference.norm()), 4)
    result = {
        "timesteps": {"shared": SHARED_T, "mixed": mixed["timestep"].tolist()},
        "by_threads": {},
        "relative_error_vs_fp32": quality,
    }
    for n in threads:
        torch.set_num_threads(n)
        times = interleaved(fns, repeats, warmup=1, budget_s=budget_s, max_repeats=41)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["by_threads"][str(n)] = {
            "repeats": len(next(iter(times.values()))),
            "median_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
            "speedup_vs_fp32": {k: round(med["fp32"] / v, 3) for k, v in med.items() if k != "fp32"},
            "mixed_over_shared": {k: round(med[f"{k} mixed"] / med[k], 3) for k in models if _ours(k)},
            "all_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in times.items()},
        }
        print(case, n, "threads", json.dumps(result["by_threads"][str(n)]["speedup_vs_fp32"]), flush=True)
    torch.set_num_threads(profile_threads)
    profiled = {"fp32": (models["fp32"], shared)}
    for name in models:
        if _ours(name) or name in (f"fp32{COMPILED}", f"bf16{COMPILED}"):
            profiled[name] = (models[name], cast_inputs(name, shared))
            if profile_mixed and _ours(name):
                profiled[f"{name} mixed"] = (models[name], cast_inputs(name, mixed))
    result["profile"] = {k: profile_table(m, i) for k, (m, i) in profiled.items()}
    result["memory"] = {k: forward_memory(m, cast_inputs(k, shared)) for k, m in models.items()}
    return result


def _ours(name: str) -> bool:
    return name.removesuffix(COMPILED).removesuffix(BF16_ATTENTION).removesuffix(BF16) in OURS


def add_bf16_attention(models: dict[str, nn.Module], case: str) -> None:
    """A second build of each integer model whose float attention runs in bf16
    (``QALoraAttnProcessor(compute_dtype=torch.bfloat16)``)."""
    for name in [n for n in models if n in OURS]:
        model = build_ours(case, OURS[name])
        model.set_attn_processor(dq.QALoraAttnProcessor(compute_dtype=torch.bfloat16))
        models[f"{name}{BF16_ATTENTION}"] = model


def add_compiled(models: dict[str, nn.Module], case: str) -> None:
    """``torch.compile`` (Inductor, static shapes) of fp32 and of the project's integer models, as a user runs them;
    compiled here, outside the timed passes (one call with each input)."""
    for name in [n for n in models if n in ("fp32", "bf16") or _ours(n)]:
        compiled = torch.compile(models[name], dynamic=False)
        t0 = time.time()
        for mixed in (False, True):
            output_of(compiled, cast_inputs(name, inputs(case, mixed)))
        print(f"compiled {name} in {time.time() - t0:.0f} s", flush=True)
        models[f"{name}{COMPILED}"] = compiled


def run_unet(
    threads: list[int], repeats: int, budget_s: float, peers: bool = True, compiled: bool = False, bf16: bool = False
) -> dict:
    models: dict[str, nn.Module] = {"fp32": build_float("unet")}
    errors = {}
    for name, bits in OURS.items():
        models[name] = build_ours("unet", bits)
    if bf16:
        build_bf16(models, "unet")
    if compiled:
        add_compiled(models, "unet")
    for name in PEERS if peers else ():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                models[name] = build_peer("unet", name)
                output_of(models[name], inputs("unet", False, batch=2))
        except Exception as err:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
            models.pop(name, None)
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    result = measure("unet", models, threads, repeats, threads[0], budget_s)
    result["case"] = "embedded UNet, batch 64"
    result["peer_errors"] = errors
    return result


def sd15_worker(
    variant: str, threads: list[int], repeats: int, compiled: bool = False, bf16_attention: bool = False
) -> dict:
    """One quantized variant (built first, while no fp32 model is alive) next to a fresh fp32 model."""
    models: dict[str, nn.Module] = {}
    if variant in OURS:
        models[variant] = build_ours("sd15", OURS[variant])
        if bf16_attention:
            add_bf16_attention(models, "sd15")
    elif variant == "bf16":
        models["bf16"] = build_float("sd15").to(torch.bfloat16)
    else:
        models[variant] = build_peer("sd15", variant)
    gc.collect()
    models = {"fp32": build_float("sd15"), **models}
    if compiled:
        add_compiled(models, "sd15")
    return measure("sd15", models, threads, repeats, threads[0], budget_s=0.0, profile_mixed=False)


def run_sd15(
    variants: list[str], threads: list[int], repeats: int, save=None, compiled: bool = False, bf16_attention=False
) -> dict:
    """Each variant in its own subprocess; ``save(partial)`` after each, so that a long run keeps what it has."""
    out = {"case": "SD1.5-shaped UNet2DConditionModel, 4x64x64 latents, batch 2", "per_variant": {}}
    for variant in variants:
        cmd = [
            sys.executable,
            __file__,
            "--sd15-worker",
            variant,
            "--threads",
            *map(str, threads),
            "--repeats",
            str(repeats),
            *(["--compile"] if compiled else []),
            *(["--bf16-attention"] if bf16_attention else []),
        ]
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["failed"])[-1]
            out["per_variant"][variant] = {"error": tail[:300]}
        else:
            out["per_variant"][variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print("sd15", variant, f"{time.time() - t0:.0f} s", flush=True)
        if save is not None:
            save(out)
    return out


# -- report --------------------------------------------------------------------------------------------------------------
def _speed_rows(label: str, r: dict, threads: str) -> list[str]:
    s = r["by_threads"][threads]
    m, sp = s["median_ms"], s["speedup_vs_fp32"]
    rows = [f"| {label} | {threads} | fp32 | {m['fp32']:.1f} | 1.00x | | {s['repeats']} |"]
    for k in m:
        if k == "fp32":
            continue
        base = k.removesuffix(" mixed")
        mixed_note = f"{s['mixed_over_shared'][base]:.2f}x of shared" if k.endswith(" mixed") else ""
        rows.append(f"| {label} | {threads} | {k} | {m[k]:.1f} | **{sp[k]:.2f}x** | {mixed_note} | {s['repeats']} |")
    return rows


def markdown(meta: dict, results: dict) -> str:
    lines = [
        "# Whole-model integer inference on CPU",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['machine']['cpu']}, torch {meta['machine']['torch']}; oneDNN usable: {meta['onednn']}. Interleaved "
        "repeats, medians; speed-up = fp32 median / variant median from the same pass. The build machine is shared "
        "with other jobs (see the load average in the JSON): absolute times move between runs, ratios are from one "
        "pass. 'mixed' = every sample of the batch at its own timestep.",
        "",
        "| case | threads | variant | median ms | speed-up vs fp32 | mixed vs shared | repeats |",
        "|---|---|---|---|---|---|---|",
    ]
    unet = results.get("unet")
    if unet:
        for n in unet["by_threads"]:
            lines += _speed_rows("embedded UNet b64", unet, n)
    sd = results.get("sd15")
    if sd:
        for variant, r in sd["per_variant"].items():
            if "error" in r:
                lines.append(f"| SD1.5-shaped b2 | | {variant} | error: {r['error']} | | | |")
                continue
            for n in r["by_threads"]:
                lines += _speed_rows(f"SD1.5-shaped b2 ({variant} run)", r, n)
    if unet and unet.get("peer_errors"):
        lines += ["", "Peers that did not run: " + "; ".join(f"{k}: `{v}`" for k, v in unet["peer_errors"].items())]
    lines += [
        "",
        "Memory (model tensors, oneDNN's packed int8 weights included; peak RSS increase of one forward "
        "pass) and output error vs fp32 (relative L2, shared timestep):",
        "",
        "| case | variant | model tensors MB | forward peak increase MB | rel. error vs fp32 |",
        "|---|---|---|---|---|",
    ]
    blocks = ([("embedded UNet b64", unet)] if unet else []) + [
        (f"SD1.5-shaped b2 ({v} run)", r) for v, r in (sd or {}).get("per_variant", {}).items() if "error" not in r
    ]
    for label, r in blocks:
        for k, mem in r["memory"].items():
            err = r["relative_error_vs_fp32"].get(k, 0.0)
            lines.append(
                f"| {label} | {k} | {mem['model_tensor_mb']:.1f} | {mem['forward_peak_increase_mb']:.0f} | {err:.4f} |"
            )
    for label, r in blocks:
        heading = f"{label}, {meta['profile_threads']} thread(s), one profiled forward each, self CPU time ms and share"
        lines += profile_markdown(r["profile"], heading, calls=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7, help="at least this many interleaved repeats")
    parser.add_argument("--cases", nargs="+", default=["unet", "sd15"], choices=["unet", "sd15"])
    parser.add_argument(
        "--budget-s",
        type=float,
        default=6.0,
        help="extra repeats for short cases, within about this many seconds per variant",
    )
    parser.add_argument("--sd15-peers", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd fp32 and integer models")
    parser.add_argument(
        "--bf16-attention",
        action="store_true",
        help="also time each integer model with its float attention in bf16 (SD1.5-shaped case)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also time the float model and the integer models with their float layers in bf16 (embedded UNet)",
    )
    parser.add_argument(
        "--sd15-variants",
        nargs="+",
        default=list(OURS),
        choices=[*OURS, "bf16"],
        help="bf16: the float model cast to bf16 (no quantization), next to its own fp32 model",
    )
    parser.add_argument("--no-peers", action="store_true", help="only fp32 and the project's integer models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sd15-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads[0])
    if args.sd15_worker:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            worker = sd15_worker(args.sd15_worker, args.threads, args.repeats, args.compile, args.bf16_attention)
            print(json.dumps(worker))
        return 0
    started = time.time()
    with open("/proc/loadavg", encoding="utf-8") as f:
        load_before = f.read().split()[:3]
    meta = {
        "command": "python " + " ".join(["benchmarks/cpu_inference.py", *sys.argv[1:]]),
        "threads": args.threads,
        "profile_threads": args.threads[0],
        "repeats": args.repeats,
        "machine": machine_info(args.threads[0]),
        "onednn": onednn_status()[1],
        "seeds": {"weights": 0, "inputs": 1, "calibration": 7},
        "load_average_before": load_before,
    }
    results = {}

    def save(partial_sd15=None) -> None:
        if partial_sd15 is not None:
            results["sd15"] = partial_sd15
        with open("/proc/loadavg", encoding="utf-8") as f:
            meta["load_average_after"] = f.read().split()[:3]
        meta["total_seconds"] = round(time.time() - started, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_inference.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        (args.out / "cpu_inference.md").write_text(markdown(meta, results))
        print(f"wrote {args.out / 'cpu_inference.json'} and .md ({meta['total_seconds']} s)", flush=True)

    if "unet" in args.cases:
        results["unet"] = run_unet(
            args.threads, args.repeats, args.budget_s, peers=not args.no_peers, compiled=args.compile, bf16=args.bf16
        )
        save()
    if "sd15" in args.cases:
        variants = list(args.sd15_variants) + (list(PEERS) if args.sd15_peers else [])
        run_sd15(
            variants,
            args.threads,
            max(3, args.repeats // 2),
            save=save,
            compiled=args.compile,
            bf16_attention=args.bf16_attention,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
