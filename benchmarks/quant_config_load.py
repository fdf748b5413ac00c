"""Load time of an SD1.5-shaped UNet with ``from_pretrained(..., quantization_config=QALoraQuantConfig(...))``.

Builds ``UNet2DConditionModel(cross_attention_dim=768)`` (the SD1.5 UNet's shape) with random weights (seed 0),
saves it once to a temporary folder, then times ``UNet2DConditionModel.from_pretrained`` of that folder in a fresh
subprocess per load (so each starts cold in memory and is measured alone), for:

* ``float``: no quantization config (the reference);
* ``default``: ``QALoraQuantConfig()``, i.e. min-max weight step sizes and a frozen adapter;
* ``previous_default``: ``QALoraQuantConfig(weight_init="mse", trainable_adapter=True)``, what ``QALoraQuantConfig()``
  did before (MSE search of every weight step size, trainable adapter).

``float`` and ``default`` run interleaved over ``--repeats`` rounds, then ``previous_default`` once, each with
``--threads`` torch threads; wall time and CPU time (user + system of the loading process) are recorded.  The
``previous_default`` load is stopped after ``--previous-timeout`` seconds of wall time; it then counts as "not finished"
and its CPU time so far is a lower bound of its cost (on a shared machine its MSE search can take hours of wall time).

    python benchmarks/quant_config_load.py --threads 1     # writes benchmarks/results/quant_config_load.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "float": None,
    "default": {},
    "previous_default": {"weight_init": "mse", "trainable_adapter": True},
}


def _load_once(folder: str, variant: str, threads: int) -> dict:
    """Runs in the child process: one timed from_pretrained."""
    import torch

    torch.set_num_threads(threads)
    from diffusers import UNet2DConditionModel

    import diffusers_qalora as dq

    kwargs = VARIANTS[variant]
    extra = {} if kwargs is None else {"quantization_config": dq.QALoraQuantConfig(**kwargs)}
    start, cpu_start = time.perf_counter(), time.process_time()
    model = UNet2DConditionModel.from_pretrained(folder, **extra)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    layers = sum(1 for name, _ in model.named_modules() if name.endswith(".qal_weight_quantizer"))
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "finished": True,
        "parameters": sum(p.numel() for p in model.parameters()),
        "qalora_layers": layers,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _run_with_timeout(folder: str, threads: int, env: dict, timeout: float) -> dict:
    """The previous_default load in a child process, stopped after ``timeout`` s: then its CPU time so far."""
    command = [sys.executable, __file__, "--threads", str(threads), "--child", folder, "previous_default"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
        return json.loads(stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        # The CPU time includes the child's imports and the reading of the checkpoint (a few seconds).
        return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu, "finished": False}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--previous-timeout",
        type=float,
        default=3600.0,
        help="stop the previous_default load after this many seconds of wall time",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_load_once(args.child[0], args.child[1], args.threads)))
        return {}

    import diffusers
    import peft
    import torch

    import diffusers_qalora as dq

    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        UNet2DConditionModel(cross_attention_dim=768).save_pretrained(folder)
        for _ in range(args.repeats):
            for name in ("float", "default"):
                command = [sys.executable, __file__, "--threads", str(args.threads), "--child", folder, name]
                out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(name, runs[name][-1], flush=True)
        runs["previous_default"].append(_run_with_timeout(folder, args.threads, env, args.previous_timeout))
        print("previous_default", runs["previous_default"][-1], flush=True)
        n_params = runs["float"][0]["parameters"]

    summary = {}
    for name, rs in runs.items():
        finished = all(r["finished"] for r in rs)
        entry = {
            "finished": finished,
            "seconds": [round(r["seconds"], 2) for r in rs],
            "median_seconds": round(statistics.median(r["seconds"] for r in rs), 2),
            "cpu_seconds": [round(r["cpu_seconds"], 2) for r in rs],
            "median_cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in rs), 2),
        }
        if finished:
            entry.update(
                qalora_layers=rs[0]["qalora_layers"],
                trainable_parameters=rs[0]["trainable_parameters"],
                peak_rss_gib=round(max(r["peak_rss_gib"] for r in rs), 2),
            )
        summary[name] = entry
    previous, default = summary["previous_default"], summary["default"]
    ratio = round(previous["median_cpu_seconds"] / default["median_cpu_seconds"], 1)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "model": "UNet2DConditionModel(cross_attention_dim=768) (SD1.5 UNet shape), random weights, seed 0, fp32, "
        "saved as safetensors",
        "unet_parameters": n_params,
        "variants": {
            name: ("no quantization_config" if kw is None else f"QALoraQuantConfig(**{kw})")
            for name, kw in VARIANTS.items()
        },
        "results": summary,
        # CPU time, not wall time: on a shared machine it is what the load itself cost.  A lower bound when the
        # previous_default load did not finish.
        "cpu_speedup_default_vs_previous": ratio,
        "cpu_speedup_is_lower_bound": not previous["finished"],
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "diffusers_qalora": dq.__version__,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_config_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "quant_config_load.md").write_text(_markdown(result))
    print(json.dumps(result, indent=2))
    return result


def _markdown(r: dict) -> str:
    def row(name: str, s: dict) -> str:
        if not s["finished"]:
            return (
                f"| `{name}` | {r['variants'][name]} | not finished: stopped after {s['seconds'][0]} s | "
                f"> {s['cpu_seconds'][0]} (so far) | | | |"
            )
        return (
            f"| `{name}` | {r['variants'][name]} | {s['median_seconds']} ({', '.join(map(str, s['seconds']))}) | "
            f"{s['median_cpu_seconds']} ({', '.join(map(str, s['cpu_seconds']))}) | {s['qalora_layers']} | "
            f"{s['trainable_parameters']:,} | {s['peak_rss_gib']} |"
        )

    rows = "\n".join(row(name, s) for name, s in r["results"].items())
    bound = "at least " if r["cpu_speedup_is_lower_bound"] else ""
    return f"""# Loading an SD1.5-shaped UNet with `QALoraQuantConfig`

Command: `{r["command"]}`

Model: {r["model"]}, {r["unet_parameters"]:,} parameters. Each load runs in a fresh process with {r["threads"]} torch \
thread(s); `float` and `default` interleaved over {r["repeats"]} rounds, then `previous_default` once, on a shared \
machine ({r["machine"]["cpu_count"]} CPUs, many other jobs): wall times are inflated by the other work, CPU times (user \
+ system of the loading process) are the cost of the load itself.

| variant | config | wall s: median (runs) | CPU s: median (runs) | QALoRA layers | trainable parameters | peak RSS (GiB) |
| --- | --- | --- | --- | --- | --- | --- |
{rows}

`QALoraQuantConfig()` now costs {bound}{r["cpu_speedup_default_vs_previous"]}x less CPU time to load than its previous \
default (the MSE search of every weight step size inside `from_pretrained`, with a trainable adapter), and injects \
the adapter frozen: train it with `QALoraQuantConfig(trainable_adapter=True)` or \
`set_qalora_adapter(model, "default", trainable=True)`.
Versions: {", ".join(f"{k} {v}" for k, v in r["versions"].items())}.
"""


if __name__ == "__main__":
    main()
