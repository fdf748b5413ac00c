"""Digits-FID of the exported integer model against the fake-quant model it came from (same noise, same labels).

On the embedded digits DDPM: a QALoRA model (PTQ with per-timestep activation step sizes calibrated on the FP
model's own trajectories, or a distilled adapter given with ``--adapter``) samples ``--num-samples`` images with DDIM;
then ``export_quantized`` turns it into integer layers and the same noise and labels are sampled again, with the
oneDNN integer path and with the dequantized reference path.  Reported per model: digits-FID, class accuracy, the
paired x0-MSE against the FP samples, and the paired MSE between the integer and the fake-quant samples.  The
reference path is the fake-quant model bit for bit, so its samples (and FID) must be identical; the integer path
differs by float32 rounding only, so its FID must sit within the seed-to-seed noise of FID.  ``--compile`` also
samples with the integer model under ``torch.compile`` (Inductor: the activation quantization fused, oneDNN as a custom
op), which must sit there too.
Results go to ``benchmarks/results/export_fid.{json,md}``.

    python benchmarks/export_fid.py                                # W4A8, 1000 samples, DDIM 20 steps, seed 0
    python benchmarks/export_fid.py --bits 8 8 --num-samples 500 --seeds 0 1
    python benchmarks/export_fid.py --adapter out/distilled         # a distilled adapter instead of PTQ
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import diffusers_qalora as dq
from diffusers_qalora.evaluation import paired_mse, sample_class_conditional
from diffusers_qalora.evaluation.baselines import add_calibrated_adapter, baseline_config
from diffusers_qalora.evaluation.report import machine_info, mean_std, score_samples, write_results
from diffusers_qalora.export import integer_layers
from diffusers_qalora.testbed import load_testbed

RESULTS = Path(__file__).resolve().parent / "results"


def render_markdown(payload: dict) -> str:
    rows, pairs = payload["rows"], payload["pairs"]
    seeds = payload["seeds"]
    lines = [
        "# Digits-FID: exported integer model vs the fake-quant model",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"{payload['bits']}, {payload['source']}; {payload['num_samples']} samples per seed, seeds {seeds}, DDIM "
        f"{payload['steps']} steps, {payload['machine']['torch_threads']} thread(s). Every model samples the same noise "
        "and labels (paired). Mean ± standard deviation over the seeds.",
        ""
        if payload["testbed_weights_final"]
        else "\n**The embedded model's weights were not final when this ran** "
        "(`testbed.json` has no fp_evaluation with >= 1000 samples): the numbers check the export, not the model.\n",
        "| model | digits-FID | FID per seed | accuracy (%) | x0-MSE vs FP |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        per_seed = ", ".join(f"{x['fid']:.2f}" for x in payload["per_seed"][name])
        lines.append(
            f"| {name} | {r['fid']['mean']:.2f} ± {r['fid']['std']:.2f} | {per_seed} | "
            f"{100 * r['accuracy']['mean']:.1f} | {r['x0_mse']['mean']:.2e} |"
        )
    fmt = ", ".join
    lines += [
        "",
        f"- FID(integer) - FID(fake-quant), per seed: {fmt(f'{d:+.2f}' for d in pairs['fid_difference_integer_minus_fake_quant'])}"
        f" (the FP model's FID moves by {abs(payload['per_seed']['fp32'][0]['fid'] - payload['per_seed']['fp32'][-1]['fid']):.1f}"
        " between these seeds)",
        f"- paired MSE, integer vs fake-quant samples: {fmt(f'{v:.2e}' for v in pairs['integer_vs_fake_quant_mse'])}; "
        f"fake-quant vs FP: {fmt(f'{v:.2e}' for v in pairs['fake_quant_vs_fp_mse'])} (images in [0, 1]; largest single "
        f"pixel difference integer vs fake-quant: {fmt(f'{v:.2f}' for v in pairs['integer_vs_fake_quant_max_abs'])})",
        f"- reference path samples identical to the fake-quant samples: {pairs['reference_identical_to_fake_quant']}",
    ]
    if "fid_difference_compiled_minus_fake_quant" in pairs:
        lines += [
            "- FID(integer, torch.compile) - FID(fake-quant), per seed: "
            f"{fmt(f'{d:+.2f}' for d in pairs['fid_difference_compiled_minus_fake_quant'])}; paired MSE compiled vs "
            f"fake-quant samples: {fmt(f'{v:.2e}' for v in pairs['compiled_vs_fake_quant_mse'])}",
        ]
    lines += [
        f"- export took {payload['export_seconds']} s; the whole run {payload['total_seconds']} s",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", nargs=2, type=int, default=[4, 8], metavar=("W", "A"))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--adapter", type=Path, default=None, help="a distilled QALoRA adapter folder (else PTQ)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--compile", action="store_true", help="also sample with the integer model under torch.compile (Inductor)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path, default=None, help="only re-render the Markdown of a results JSON")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        (args.from_json.with_suffix(".md")).write_text(render_markdown(payload))
        return 0
    torch.set_num_threads(args.threads)
    started = time.time()

    tb = load_testbed()
    fp_eval = tb.config.get("fp_evaluation", {})
    weights_final = fp_eval.get("num_samples", 0) >= 1000
    pipe = tb.pipeline
    unet = tb.unet

    def sample(seed):
        return sample_class_conditional(
            pipe,
            args.num_samples,
            seed,
            num_inference_steps=args.steps,
            batch_size=args.batch_size,
            show_progress=False,
        )

    fp = {seed: sample(seed) for seed in args.seeds}
    wb, ab = args.bits
    if args.adapter is not None:
        dq.load_qalora_adapter(unet, args.adapter)
        source = f"adapter {args.adapter}"
    else:
        pipe.scheduler.set_timesteps(args.steps)
        table = sorted(float(t) for t in pipe.scheduler.timesteps)
        config = baseline_config("timestep_ptq", wb, ab, timesteps=table)

        def calibrate():
            sample_class_conditional(
                pipe,
                args.calibration_samples,
                12345,
                num_inference_steps=args.steps,
                batch_size=args.calibration_samples,
                show_progress=False,
            )

        add_calibrated_adapter(unet, config, "ptq", calibrate)
        source = f"PTQ (per-timestep activation steps calibrated on {args.calibration_samples} FP trajectories)"

    rows, per_seed = {}, {}

    def score(name, samples):
        per_seed[name] = []
        for seed, (images, labels) in samples.items():
            s = score_samples(images, labels, tb.classifier, tb.reference_images, fp[seed][0])
            per_seed[name].append({"seed": seed, **s})
        rows[name] = {k: mean_std([r[k] for r in per_seed[name]]) for k in ("fid", "accuracy", "x0_mse")}

    score("fp32", fp)
    fake = {seed: sample(seed) for seed in args.seeds}
    score("fake-quant", fake)
    export_started = time.time()
    dq.export_quantized(unet)
    export_seconds = time.time() - export_started
    integer = {seed: sample(seed) for seed in args.seeds}
    score("integer (oneDNN)", integer)
    if args.compile:  # the fast CPU path: quantization fused by Inductor, oneDNN as a custom op
        pipe.unet = torch.compile(unet, dynamic=False)
        compiled = {seed: sample(seed) for seed in args.seeds}
        pipe.unet = unet
        score("integer (oneDNN, torch.compile)", compiled)
    for layer in integer_layers(unet).values():
        layer.exact_activation_rounding = True
    score("integer (oneDNN, exact rounding)", {seed: sample(seed) for seed in args.seeds})
    for layer in integer_layers(unet).values():
        layer.exact_activation_rounding = False
    dq.set_kernel_preference(unet, "torch")
    reference = {seed: sample(seed) for seed in args.seeds}
    score("integer (reference path)", reference)

    pairs = {
        "integer_vs_fake_quant_mse": [paired_mse(integer[s][0], fake[s][0]) for s in args.seeds],
        "integer_vs_fake_quant_max_abs": [float((integer[s][0] - fake[s][0]).abs().max()) for s in args.seeds],
        "reference_identical_to_fake_quant": all(torch.equal(reference[s][0], fake[s][0]) for s in args.seeds),
        "fake_quant_vs_fp_mse": [paired_mse(fake[s][0], fp[s][0]) for s in args.seeds],
        "fid_difference_integer_minus_fake_quant": [
            a["fid"] - b["fid"] for a, b in zip(per_seed["integer (oneDNN)"], per_seed["fake-quant"])
        ],
    }
    if args.compile:
        pairs["compiled_vs_fake_quant_mse"] = [paired_mse(compiled[s][0], fake[s][0]) for s in args.seeds]
        pairs["fid_difference_compiled_minus_fake_quant"] = [
            a["fid"] - b["fid"] for a, b in zip(per_seed["integer (oneDNN, torch.compile)"], per_seed["fake-quant"])
        ]
    command = "python " + " ".join([Path(sys.argv[0]).as_posix().split("/main/")[-1], *sys.argv[1:]])
    payload = {
        "command": command,
        "machine": machine_info(args.threads),
        "bits": f"W{wb}A{ab}",
        "source": source,
        "num_samples": args.num_samples,
        "steps": args.steps,
        "seeds": args.seeds,
        "testbed_weights_final": weights_final,
        "testbed_fp_evaluation": fp_eval,
        "rows": {k: {m: {"mean": v[0], "std": v[1]} for m, v in r.items()} for k, r in rows.items()},
        "per_seed": per_seed,
        "pairs": pairs,
        "export_seconds": round(export_seconds, 2),
        "total_seconds": round(time.time() - started, 1),
    }
    text = render_markdown(payload)
    write_results(args.out, "export_fid", payload, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
