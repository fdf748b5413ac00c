"""Time the main job as a user runs it: ``accelerate launch examples/distill.py`` with no argument.

    python benchmarks/distill_default_run.py

Runs the command in a child process (only ``--output_dir`` is added, so the run writes under
``benchmarks/results/distill_default_run/``), measures its wall time and the peak resident memory of its largest
process (``RUSAGE_CHILDREN``: Accelerate's launcher and the training process), records the load average of the shared
machine before and after, and writes ``timing.json`` and ``timing.md`` next to the job's own report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diffusers_qalora.evaluation.report import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "distill_default_run"
KEEP = ("report.md", "results.json", "grid_fp.png", "grid_distilled.png", "step_sizes_distilled.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", type=Path, default=RESULTS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        raise SystemExit("`accelerate` is not on PATH: install accelerate (pip install accelerate).")
    run_dir = args.output_dir / "run"
    # Paths relative to the checkout (the command runs there), so the job's report names no machine's folders.
    run_arg = os.path.relpath(run_dir.resolve(), ROOT)
    command = [accelerate, "launch", "examples/distill.py", "--output_dir", run_arg]
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    job = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    for name in KEEP:  # the small files; the adapter and logs stay out of the repository
        shutil.copy(run_dir / name, args.output_dir / name)
    shutil.rmtree(run_dir)
    timing = {
        "command": "accelerate launch examples/distill.py",
        "benchmark_command": "python benchmarks/distill_default_run.py",
        "wall_seconds": wall,
        "train_seconds": job["training"]["train_seconds"],
        "peak_rss_mb_largest_process": peak_mb,
        "num_processes": job["num_processes"],
        "torch_threads_in_job": job["machine"]["torch_threads"],
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "machine": machine_info(),
        "limits": {"wall_seconds": 15 * 60, "peak_rss_mb": 4096},
    }
    (args.output_dir / "timing.json").write_text(json.dumps(timing, indent=2) + "\n", encoding="utf-8")
    ok = wall <= 900 and peak_mb <= 4096
    md = [
        "# The default main job, timed",
        "",
        f"Command: `{timing['benchmark_command']}` (runs `{timing['command']}` with `--output_dir`).",
        "",
        "| wall time | of which training | peak RSS (largest process) | processes x torch threads | CPU cores |"
        " load average before / after | within 15 min and 4 GB |",
        "|---|---|---|---|---|---|---|",
        f"| {wall / 60:.1f} min | {timing['train_seconds'] / 60:.1f} min | {peak_mb / 1024:.2f} GB | "
        f"{timing['num_processes']} x {timing['torch_threads_in_job']} | {timing['cpu_count']} | "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} | {'yes' if ok else 'no'} |",
        "",
        "The job's own report (500 samples, seed 0; one seed, so no spread): [report.md](report.md).",
    ]
    (args.output_dir / "timing.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
