"""Winograd W8A8 on the embedded digits DDPM: FP vs direct W8A8 conv vs Winograd F(4,3) / F(6,3), standard vs tuned.

    python examples/winograd_tune.py                        # the committed results: 1000 samples x 3 seeds, DDIM-20
    python examples/winograd_tune.py --samples 200 --seeds 0 --tune_steps 20 --output_dir /tmp/wino   # a quick look

Every method quantizes the same convolutions (every 3x3 stride-1 conv whose input channels the group size divides):

* ``direct``: direct convolution, int8 weights per output channel, int8 inputs with a dynamic step per sample;
* ``f43_position`` / ``f63_position``: Winograd-domain weights ``U`` per (position, output channel, group of 32 input
  channels), inputs ``V`` per (position, tile, group), float output transform: the transform scales are invisible
  (nothing to tune);
* ``*_int_standard``: as above plus the paper's integer output transform (``M`` re-quantized to int8 per
  (tile, output channel) across the positions), with the standard (Lavin-Gray) transform scales;
* ``*_int_tuned``: the same, scales tuned data-free per layer (``tune_steps`` Adam steps, -SQNR against the FP direct
  conv) on inputs captured from ``--calibration_samples`` FP trajectories (seed 1234, never an evaluation seed).

Each method writes ``methods/<key>.json`` (and its sample grid) as soon as it is done, so methods can run in separate
processes (``--methods``) and ``--report_only`` assembles ``winograd_embedded.{json,md}`` and the per-layer SQNR plot
from what is there.  The full-precision samples (for the paired x0-MSE) are cached in ``--cache_dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffusers_qalora.evaluation.plots import save_image_grid
from diffusers_qalora.evaluation.report import evaluate_seeds, fid_ratio_to_fp, format_metric, machine_info
from diffusers_qalora.testbed import ClassConditionalDDIMPipeline, load_testbed
from diffusers_qalora.winograd import WinogradConfig, apply_winograd

ROOT = Path(__file__).resolve().parents[1]
METHODS: dict[str, dict[str, Any]] = {
    "fp": {"label": "FP (fp32)"},
    "direct": {"label": "direct W8A8 conv", "config": {"algorithm": "direct"}},
    "f43_position": {"label": "F(4,3) per-position, float output transform", "config": {"tile": 4}},
    "f43_int_standard": {
        "label": "F(4,3) int output transform, standard scales",
        "config": {"tile": 4, "output_bits": 8, "scale_init": "lavin"},
    },
    "f43_int_tuned": {
        "label": "F(4,3) int output transform, tuned scales",
        "config": {"tile": 4, "output_bits": 8, "scale_init": "lavin"},
        "tuned": True,
    },
    "f63_position": {"label": "F(6,3) per-position, float output transform", "config": {"tile": 6}},
    "f63_int_standard": {
        "label": "F(6,3) int output transform, standard scales",
        "config": {"tile": 6, "output_bits": 8, "scale_init": "lavin"},
    },
    "f63_int_tuned": {
        "label": "F(6,3) int output transform, tuned scales",
        "config": {"tile": 6, "output_bits": 8, "scale_init": "lavin"},
        "tuned": True,
    },
    "f43_int_balanced": {
        "label": "F(4,3) int output transform, balanced (closed-form) scales",
        "config": {"tile": 4, "output_bits": 8, "scale_init": "balanced"},
    },
    "f63_int_balanced": {
        "label": "F(6,3) int output transform, balanced (closed-form) scales",
        "config": {"tile": 6, "output_bits": 8, "scale_init": "balanced"},
    },
}
DEFAULT_METHODS = [
    "fp",
    "direct",
    "f43_position",
    "f43_int_standard",
    "f43_int_tuned",
    "f63_position",
    "f63_int_standard",
    "f63_int_tuned",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--samples", type=int, default=1000, help="samples per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (eta 0)")
    p.add_argument("--batch_size", type=int, default=125)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--group_size", type=int, default=32)
    p.add_argument("--tune_steps", type=int, default=200)
    p.add_argument("--tune_lr", type=float, default=0.05)
    p.add_argument("--tune_samples", type=int, default=32)
    p.add_argument("--calibration_samples", type=int, default=64, help="FP trajectories whose inputs are captured")
    p.add_argument("--output_dir", type=Path, default=ROOT / "benchmarks" / "results" / "winograd_embedded")
    p.add_argument("--cache_dir", type=Path, default=Path("/tmp/winograd_tune_cache"))
    p.add_argument("--report_only", action="store_true", help="only assemble the report from methods/*.json")
    return p.parse_args(argv)


def _calibration_run(pipeline: ClassConditionalDDIMPipeline, num_samples: int, steps: int):
    labels = torch.arange(num_samples) % 10

    def run() -> None:
        pipeline.set_progress_bar_config(disable=True)
        for start in range(0, num_samples, 32):
            pipeline(
                labels[start : start + 32],
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(1234 + start),
                output_type="pt",
            )

    return run


def _fp_samples(args, testbed) -> dict[int, torch.Tensor]:
    key = f"fp_{args.samples}x{'-'.join(map(str, args.seeds))}_{args.steps}.safetensors"
    path = args.cache_dir / key
    if not path.is_file():
        raise SystemExit(f"no cached FP samples at {path}: run the `fp` method first (same --samples/--seeds/--steps).")
    return {int(k): v for k, v in load_file(str(path)).items()}


def _target_names(testbed, group_size: int) -> list[str]:
    """The convs a W8 Winograd config with this group size replaces: every method quantizes this same set."""
    probe = copy.deepcopy(testbed.unet)
    return list(apply_winograd(probe, WinogradConfig(bits=8, group_size=group_size)).replaced)


def run_method(key: str, args, testbed, command: str) -> dict[str, Any]:
    spec = METHODS[key]
    out = args.output_dir
    start = time.perf_counter()
    record: dict[str, Any] = {"method": key, "label": spec["label"]}
    fp_samples = None
    if key == "fp":
        pipeline = testbed.pipeline
    else:
        fp_samples = _fp_samples(args, testbed)
        unet = copy.deepcopy(testbed.unet)
        overrides = dict(spec["config"])
        names = _target_names(testbed, args.group_size)
        cfg = WinogradConfig(
            bits=8,
            group_size=args.group_size,
            target_modules=names,
            tune_lr=args.tune_lr,
            tune_samples=args.tune_samples,
            tune_steps=args.tune_steps if spec.get("tuned") else 0,
            **overrides,
        )
        pipeline = ClassConditionalDDIMPipeline(unet=unet, scheduler=copy.deepcopy(testbed.pipeline.scheduler))
        t0 = time.perf_counter()
        report = apply_winograd(
            unet, cfg, calibration_run=_calibration_run(pipeline, args.calibration_samples, args.steps)
        )
        record["apply_seconds"] = time.perf_counter() - t0
        record["report"] = report.to_dict()
        print(report.summary(), flush=True)
    summary = evaluate_seeds(
        pipeline,
        testbed.classifier,
        testbed.reference_images,
        args.seeds,
        args.samples,
        args.steps,
        fp_samples=fp_samples,
        batch_size=args.batch_size,
        show_progress=False,
    )
    if key == "fp":
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        name = f"fp_{args.samples}x{'-'.join(map(str, args.seeds))}_{args.steps}.safetensors"
        save_file({str(s): v.contiguous() for s, v in summary["samples"].items()}, str(args.cache_dir / name))
    save_image_grid(summary["samples"][args.seeds[0]][:100], out / f"grid_{key}.png", nrow=10)
    record.update({k: v for k, v in summary.items() if k != "samples"})
    record["seconds"] = time.perf_counter() - start
    record["command"] = command
    record["machine"] = machine_info(torch.get_num_threads())
    (out / "methods").mkdir(parents=True, exist_ok=True)
    (out / "methods" / f"{key}.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    print(
        f"{key}: FID {record['fid_mean']:.2f} acc {record['accuracy_mean']:.3f} ({record['seconds']:.0f} s)", flush=True
    )
    return record


def plot_sqnr(records: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Per-layer SQNR before / after tuning (captured inputs) for F(4,3) and F(6,3), with the other schemes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("f43", "F(4,3)"), ("f63", "F(6,3)")]
    if not any(f"{p}_int_tuned" in records for p, _ in panels):
        return None
    fig = Figure(figsize=(11, 7.5))
    FigureCanvasAgg(fig)
    for row, (prefix, title) in enumerate(panels):
        ax = fig.add_subplot(2, 1, row + 1)
        tuned = records.get(f"{prefix}_int_tuned", {}).get("report", {}).get("replaced", {})
        names = list(tuned) or list(_first_report(records))
        x = list(range(len(names)))
        if tuned:
            ax.plot(
                x,
                [tuned[n]["sqnr_before"] for n in names],
                "o-",
                color="tab:red",
                label="int output transform, standard scales",
            )
            ax.plot(
                x,
                [tuned[n]["sqnr_after"] for n in names],
                "s-",
                color="tab:green",
                label="int output transform, tuned scales",
            )
        for key, style, label in (
            (f"{prefix}_int_balanced", "^--", "int output transform, balanced scales"),
            (f"{prefix}_position", "d-", "per-position, float output transform"),
            ("direct", "x:", "direct W8A8 conv"),
        ):
            layers = records.get(key, {}).get("report", {}).get("replaced", {})
            if layers:
                ax.plot(
                    x,
                    [layers[n]["sqnr_before"] if n in layers else float("nan") for n in names],
                    style,
                    label=label,
                    alpha=0.8,
                )
        ax.set_xticks(x)
        ax.set_xticklabels([n.replace("resnets.", "r").replace("_blocks.", "") for n in names], rotation=70, fontsize=6)
        ax.set_ylabel("layer SQNR vs FP conv (dB)")
        ax.set_title(f"{title}, W8A8, group 32: per-layer SQNR on captured trajectory inputs")
        ax.grid(True, alpha=0.3)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.3 * (high - low))  # room for the legend above the curves
        ax.legend(fontsize="x-small", loc="upper center", ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _layer_sqnr(rec: dict[str, Any], which: str) -> str:
    layers = rec.get("report", {}).get("replaced", {})
    vals = [v[which] for v in layers.values() if v.get(which) is not None]
    if not vals:
        return "—"
    return f"{sum(vals) / len(vals):.1f} [{min(vals):.1f}, {max(vals):.1f}]"


def assemble(args, command: str) -> None:
    out = args.output_dir
    records = {}
    for key in METHODS:
        path = out / "methods" / f"{key}.json"
        if path.is_file():
            records[key] = json.loads(path.read_text(encoding="utf-8"))
    if "fp" not in records:
        raise SystemExit(f"no {out / 'methods' / 'fp.json'}: run the fp method first.")
    fp = records["fp"]
    commands = list(dict.fromkeys(rec["command"] for rec in records.values()))
    lines = [
        "# Winograd W8A8 on the embedded digits DDPM",
        "",
        "Commands (methods may run in separate processes; this table: `" + command + "`):",
        "",
        *[f"- `{c}`" for c in commands],
        "",
        f"{len(fp['per_seed'])} seeds x {args.samples} samples per method, DDIM {args.steps} steps (eta 0), "
        f"torch threads {fp['machine']['torch_threads']}, {fp['machine']['cpu']}. The same {len(_first_report(records))} "
        "convolutions are quantized in every method (3x3 stride-1 convs whose input channels group 32 divides; "
        "`conv_in` has 1 input channel and stays FP). Weights and activations int8 (symmetric); Winograd groups of 32 "
        "input channels. ± is the standard deviation over the seeds; FID / FP is the mean of the per-seed ratios "
        "(each seed's FP samples start from the same noise and labels). x0-MSE: each sample against the FP sample "
        "from the same noise and label. Layer SQNR: mean "
        f"[min, max] over the layers, on inputs captured from {args.calibration_samples} FP trajectories (standard -> "
        f"tuned for the tuned rows; {args.tune_steps} tuning steps per layer, Adam lr {args.tune_lr}).",
        "",
        "| method | digits-FID | FID / FP (per seed) | accuracy (%) | x0-MSE vs FP | layer SQNR (dB) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, rec in records.items():
        paired = fid_ratio_to_fp(rec, fp)  # per seed: same noise and labels as the FP samples
        ratio = "—" if paired is None else format_metric(*paired, 3)
        mse = format_metric(rec["x0_mse_mean"], rec["x0_mse_std"], 5) if "x0_mse_mean" in rec else "—"
        sq = _layer_sqnr(rec, "sqnr_before")
        if METHODS[key].get("tuned"):
            sq = f"{sq} -> {_layer_sqnr(rec, 'sqnr_after')}"
        lines.append(
            f"| {rec['label']} | {format_metric(rec['fid_mean'], rec['fid_std'])} | {ratio} "
            f"| {format_metric(100 * rec['accuracy_mean'], 100 * rec['accuracy_std'], 1)} | {mse} | {sq} "
            f"| {rec['seconds']:.0f} |"
        )
    plot = plot_sqnr(records, out / "winograd_layer_sqnr.png")
    if plot is not None:
        lines += [
            "",
            f"Per-layer SQNR: `{plot.name}`. Sample grids (seed {args.seeds[0]}, first 100): `grid_<method>.png`.",
        ]
    (out / "winograd_embedded.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    payload = {
        "command": command,
        "method_commands": commands,
        "seeds": args.seeds,
        "samples_per_seed": args.samples,
        "ddim_steps": args.steps,
        "torch_threads": fp["machine"]["torch_threads"],
        "machine": fp["machine"],
        "methods": records,
    }
    (out / "winograd_embedded.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(lines))


def _first_report(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for rec in records.values():
        if "report" in rec:
            return rec["report"]["replaced"]
    return {}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        testbed = load_testbed()
        for key in args.methods:
            run_method(key, args, testbed, command)
    assemble(args, command)


if __name__ == "__main__":
    main()
