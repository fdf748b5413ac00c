"""The default distillation job on 1 and on 2 CPU processes: time, memory per process and adapter quality.

    python benchmarks/distill_scaling.py                      # 1600 steps, 500 samples x seeds 0 1 2
    python benchmarks/distill_scaling.py --max_train_steps 8 --eval_samples 20 --eval_seeds 0 1 \
        --job_args "--num_inference_steps 4 --calibration_samples 2" --output_dir /tmp/scaling   # a smoke run

Both runs see the same trajectories per optimizer step in total: 16 on one process (the default batch), 8 on each of
two.  Each run is ``accelerate launch`` of ``examples/distill.py`` with 1 torch thread per process
(``OMP_NUM_THREADS=1``); the two processes use ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu``.  The runs
go one after the other in this process, so they share the machine's load of the moment; the load average before
and after each is recorded.  Writes ``benchmarks/results/distill_scaling/scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from diffusers_qalora.evaluation.report import fid_ratio_to_fp, format_metric, machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "distill_scaling"
METHODS = ("FP", "per-timestep PTQ", "QALoRA distilled")


def launch_command(processes: int) -> list[str]:
    head = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(processes),
    ]
    return head + (["--multi_gpu"] if processes > 1 else []) + ["examples/distill.py"]


def start(processes: int, batch_total: int, args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen, dict]:
    if batch_total % processes:
        raise SystemExit(f"--batch_total {batch_total} is not a multiple of {processes} processes.")
    job_args = [
        "--train_batch_size",
        str(batch_total // processes),
        "--max_train_steps",
        str(args.max_train_steps),
        "--eval_samples",
        str(args.eval_samples),
        "--eval_seeds",
        *map(str, args.eval_seeds),
        "--output_dir",
        os.path.relpath(out.resolve(), ROOT),
        *shlex.split(args.job_args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT)}
    command = launch_command(processes) + job_args
    return subprocess.Popen(command, cwd=ROOT, env=env), {
        "processes": processes,
        "batch_total": batch_total,
        "command": command,
        "out": out,
        "load_before": os.getloadavg(),
        "start": time.perf_counter(),
    }


def finish(proc: subprocess.Popen, info: dict) -> dict[str, Any]:
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(info['command'])} failed with exit code {proc.returncode}.")
    wall = time.perf_counter() - info["start"]
    load_before, load_after = info["load_before"], os.getloadavg()
    processes, batch_total, command, out = info["processes"], info["batch_total"], info["command"], info["out"]
    job = json.loads((out / "results.json").read_text(encoding="utf-8"))
    fp_row = job["methods"]["FP"]
    quality = {}
    for method in (m for m in METHODS if m in job["methods"]):
        row = job["methods"][method]
        entry = {"fid": (row["fid_mean"], row["fid_std"]), "fid_per_seed": [s["fid"] for s in row["per_seed"]]}
        if method != "FP":
            entry["fid_over_fp"] = fid_ratio_to_fp(row, fp_row)
            entry["x0_mse"] = (row["x0_mse_mean"], row["x0_mse_std"])
            entry["x0_mse_per_seed"] = [s["x0_mse"] for s in row["per_seed"]]
        quality[method] = entry
    training = job["training"]
    return {
        "processes": processes,
        "train_batch_size_per_process": batch_total // processes,
        "command": "ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch "
        + " ".join(command[3:]).replace(str(ROOT) + "/", ""),
        "wall_seconds": wall,
        "job_seconds": job["job_seconds"],
        "phase_seconds": job["phase_seconds"],
        "train_seconds": training["train_seconds"],
        "train_cpu_seconds_per_process": training["train_cpu_seconds_per_process"],
        "train_steps": training["steps"],
        "steps_per_second": training["steps_per_second"],
        "trajectories_per_second": training["steps_per_second"] * batch_total / len_table(job),
        "peak_rss_mb_per_process": job["peak_rss_mb_per_process"],
        "load_average_before": load_before,
        "load_average_after": load_after,
        "quality": quality,
    }


def len_table(job: dict[str, Any]) -> int:
    """Optimizer steps per trajectory (one per DDIM step of the teacher trajectory)."""
    return job["config"]["distill"]["num_inference_steps"]


def markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [
        "# The default distillation job on 1 and 2 CPU processes",
        "",
        f"Command: `{report['benchmark_command']}`. {report['protocol']}",
        "",
        "| processes x threads | batch per process | wall (launch to exit) | training (wall) | steps/s (wall) |"
        " training CPU s per step, per process | calibration | evaluation (all methods) | peak RSS per process |"
        " load average before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        steps = r["train_steps"]
        evaluation = sum(v for k, v in r["phase_seconds"].items() if k.startswith("evaluation"))
        lines.append(
            f"| {r['processes']} x 1 | {r['train_batch_size_per_process']} | {r['wall_seconds'] / 60:.1f} min | "
            f"{r['train_seconds'] / 60:.1f} min | {r['steps_per_second']:.3f} | "
            f"{' / '.join(f'{c / steps:.2f}' for c in r['train_cpu_seconds_per_process'])} | "
            f"{r['phase_seconds']['calibration']:.0f} s | "
            f"{evaluation:.0f} s | {' / '.join(f'{m / 1024:.2f} GB' for m in r['peak_rss_mb_per_process'])} | "
            f"{r['load_average_before'][0]:.1f} / {r['load_average_after'][0]:.1f} |"
        )
    lines += ["", "| processes | method | digits-FID | FID / FP (per seed) | x0-MSE vs FP |", "|---|---|---|---|---|"]
    for r in runs:
        for method, q in r["quality"].items():
            ratio = q.get("fid_over_fp")
            x0 = q.get("x0_mse")
            lines.append(
                f"| {r['processes']} | {method} | {format_metric(*q['fid'])} | "
                f"{'—' if ratio is None else format_metric(ratio[0], ratio[1], 3)} | "
                f"{'—' if x0 is None else format_metric(x0[0], x0[1], 5)} |"
            )
    lines += ["", notes(report), ""]
    return "\n".join(lines)


def notes(report: dict[str, Any]) -> str:
    """What the table says about contention and scaling, from the measured numbers."""
    runs = {r["processes"]: r for r in report["runs"]}
    order = (
        " (the runs ran at the same time, each also loading the other)."
        if report.get("concurrent")
        else " (the runs ran one after the other)."
    )
    busiest = max(max(r["load_average_before"][0], r["load_average_after"][0]) for r in report["runs"])
    if busiest > report["cpu_count"]:
        text = (
            "The machine was shared with other jobs (see the load averages): wall times are inflated, by an amount "
            "that varies over time" + order
        )
    else:
        text = (
            f"The load average stayed at or below {busiest:.1f} on {report['cpu_count']} cores: wall times are "
            "those of a machine without other heavy jobs" + order
        )
    if 1 in runs and 2 in runs:
        one = runs[1]["train_cpu_seconds_per_process"][0] / runs[1]["train_steps"]
        two = max(runs[2]["train_cpu_seconds_per_process"]) / runs[2]["train_steps"]
        text += (
            f" CPU time is what an idle machine would show: a training step costs {one:.2f} CPU s on one process "
            f"and {two:.2f} CPU s on each of two (half the batch each, plus DDP's gradient all-reduce), so on two "
            f"free cores two processes would train {one / two:.2f}x as fast as one."
        )
    return text + (
        " Two processes draw other trajectories than one (each process seeds its own noise), so their "
        "adapters differ by the training noise."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_train_steps", type=int, default=1600)
    p.add_argument("--batch_total", type=int, default=16, help="trajectories per optimizer step, all processes")
    p.add_argument("--eval_samples", type=int, default=500)
    p.add_argument("--eval_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--output_dir", type=Path, default=RESULTS)
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="start the runs together, so that they share the same machine load (wall times then include "
        "each other's load; compare CPU seconds per step)",
    )
    p.add_argument("--render", type=Path, default=None, help="only rewrite scaling.md from this scaling.json")
    p.add_argument("--job_args", default="", help="more options of examples/distill.py, e.g. for a smoke run")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.render is not None:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        (args.render.parent / "scaling.md").write_text(markdown(report), encoding="utf-8")
        return
    args.output_dir.mkdir(parents=True, exist_ok=True)
    runs, started = [], []
    for processes in args.processes:
        work = args.output_dir / f"run_{processes}proc"
        shutil.rmtree(work, ignore_errors=True)
        started.append(start(processes, args.batch_total, args, work))
        if not args.concurrent:
            runs.append(finish(*started.pop()))
    runs += [finish(*s) for s in started]
    for processes in args.processes:
        work = args.output_dir / f"run_{processes}proc"
        shutil.copy(work / "report.md", args.output_dir / f"report_{processes}proc.md")
        shutil.rmtree(work)  # the adapter, checkpoints and grids stay out of the repository
    seeds = args.eval_seeds
    report = {
        "benchmark_command": "python benchmarks/distill_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "protocol": (
            f"{args.max_train_steps} optimizer steps of {args.batch_total} trajectories in total (split "
            f"evenly over the processes), W4A4, rank 32; evaluation {args.eval_samples} samples x seeds "
            f"{seeds}, 20 DDIM steps, split over the processes; mean ± std over seeds"
            + (f"; job options `{args.job_args}`." if args.job_args else ".")
        ),
        "seeds": seeds,
        "eval_samples_per_seed": args.eval_samples,
        "cpu_count": os.cpu_count(),
        "machine": machine_info(threads=1),
        "runs": runs,
        "concurrent": args.concurrent,
    }
    (args.output_dir / "scaling.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report)
    (args.output_dir / "scaling.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
