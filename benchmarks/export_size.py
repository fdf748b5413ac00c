"""On-disk size of exported integer models against fp32, and a bit-exact save -> load check.

Cases:

* ``embedded``: the embedded digits UNet (``diffusers_qalora.testbed``), W4A8 and W8A8;
* ``sd15``: an SD1.5-shaped ``UNet2DConditionModel`` (SD1.5's config: 320/640/1280/1280 channels, two layers per
  block, cross attention to 768-d text, 4 latent channels; about 860M parameters) with random weights, W4A8.

Each integer model is built the way a user builds it: ``get_qalora_model`` with the default 100-entry timestep table
(min-max weight steps: the initialisation does not change the size), activation calibration on a few forward passes,
``export_quantized``, ``save_pretrained``.  The fp32 size is the ``save_pretrained`` file of the same model before
quantization.  Then ``from_pretrained`` of the integer folder (no extra argument) must give the same tensors, bit for
bit, and the same output on a test input.  Results go to ``benchmarks/results/export_size.{json,md}``.

    python benchmarks/export_size.py                       # both cases (sd15 needs ~6 GB RAM and ~4 GB disk)
    python benchmarks/export_size.py --cases embedded
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import diffusers_qalora as dq
from diffusers_qalora.evaluation.report import machine_info
from diffusers_qalora.export import integer_layers

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 0.17

SD15_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


def build(case: str) -> tuple[nn.Module, type, callable]:
    """The fp32 model, its class, and an input factory ``inputs(timestep, seed)``."""
    if case == "embedded":
        from diffusers import UNet2DModel

        from diffusers_qalora.testbed import load_testbed

        def inputs(t, seed=0, batch=8):
            g = torch.Generator().manual_seed(seed)
            return {
                "sample": torch.randn(batch, 1, 16, 16, generator=g),
                "timestep": torch.full((batch,), float(t)),
                "class_labels": torch.arange(batch) % 10,
            }

        return load_testbed(verify=False).unet, UNet2DModel, inputs
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD15_CONFIG).eval()

    def inputs(t, seed=0, batch=1):  # an 8 x 8 latent keeps the calibration passes cheap on a CPU
        g = torch.Generator().manual_seed(seed)
        return {
            "sample": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": torch.full((batch,), float(t)),
            "encoder_hidden_states": torch.randn(batch, 77, 768, generator=g),
        }

    return model, UNet2DConditionModel, inputs


def folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def weights_bytes(folder: Path) -> int:
    return sum(size for name, size in folder_bytes(folder).items() if name.endswith(".safetensors"))


def breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes of the integer model's tensors by kind."""
    out = {"weight_codes": 0, "weight_scales": 0, "bias": 0, "activation_tables": 0, "float_tensors": 0}
    integer = set()
    for name, layer in integer_layers(model).items():
        prefix = f"{name}." if name else ""
        for tensor_name, t in layer.state_dict().items():
            integer.add(prefix + tensor_name)
            size = t.numel() * t.element_size()
            key = {"weight_packed": "weight_codes", "weight_scale": "weight_scales", "bias": "bias"}.get(
                tensor_name, "activation_tables"
            )
            out[key] += size
    out["float_tensors"] = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in integer)
    return out


def run_case(case: str, bits: tuple[int, int], workdir: Path, calibration_timesteps: list[float]) -> dict:
    t0 = time.time()
    model, cls, inputs = build(case)
    num_params = sum(p.numel() for p in model.parameters())
    fp_dir = workdir / f"{case}-fp32"
    model.save_pretrained(fp_dir)
    fp32_bytes = weights_bytes(fp_dir)
    shutil.rmtree(fp_dir)  # the SD1.5-shaped fp32 file is 3.4 GB
    cfg = dq.QALoraConfig(r=4, weight_bits=bits[0], act_bits=bits[1], weight_init="minmax", act_init="minmax")
    model = dq.get_qalora_model(model, cfg)

    def calibrate(qalora_model=model):
        for t in calibration_timesteps:
            qalora_model(**inputs(t, seed=1))

    dq.calibrate_activations(model, calibrate)
    model = dq.export_quantized(model)
    gc.collect()
    int_dir = workdir / f"{case}-w{bits[0]}a{bits[1]}"
    model.save_pretrained(int_dir)
    int_bytes = weights_bytes(int_dir)
    probe = inputs(500.0, seed=2)
    with torch.no_grad():
        expected = model(**probe).sample
    state = model.state_dict()
    parts = breakdown(model)
    layers = integer_layers(model)
    counts = {
        "integer_layers": len(layers),
        "eight_bit_layers": sum(1 for m in layers.values() if m.layout.weight_bits == 8),
        "timestep_table_entries": max(m.layout.num_timesteps for m in layers.values()),
    }
    del model
    gc.collect()
    loaded = cls.from_pretrained(int_dir)  # no quantization_config argument
    now = loaded.state_dict()
    same_tensors = now.keys() == state.keys() and all(
        now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in state.items()
    )
    with torch.no_grad():
        same_output = torch.equal(loaded(**probe).sample, expected)
    config_json = json.loads((int_dir / "config.json").read_text())
    result = {
        "case": case,
        "bits": f"W{bits[0]}A{bits[1]}",
        "parameters": num_params,
        "fp32_bytes": fp32_bytes,
        "integer_bytes": int_bytes,
        "ratio": round(int_bytes / fp32_bytes, 4),
        "target_ratio_w4": TARGET_RATIO,
        "meets_target": int_bytes / fp32_bytes <= TARGET_RATIO,
        "tensor_bytes_by_kind": parts,
        "safetensors_overhead_bytes": int_bytes - sum(parts.values()),
        "config_json_bytes": len(json.dumps(config_json)),
        **counts,
        "reload_tensors_bit_exact": same_tensors,
        "reload_output_bit_exact": same_output,
        "files": folder_bytes(int_dir),
        "seconds": round(time.time() - t0, 1),
    }
    del loaded
    shutil.rmtree(int_dir)
    gc.collect()
    return result


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# Integer export: size on disk and save -> load",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['machine']['cpu']}, torch {meta['machine']['torch']}. Sizes are the `.safetensors` files written by "
        "`save_pretrained` (fp32: the same model before quantization).",
        "",
        "| model | params | bits | fp32 MB | integer MB | ratio | target <= 0.17 | save -> load bit-exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        exact = "yes" if r["reload_tensors_bit_exact"] and r["reload_output_bit_exact"] else "NO"
        target = ("yes" if r["meets_target"] else "NO") if r["bits"].startswith("W4") else "(W4 only)"
        lines.append(
            f"| {r['case']} | {r['parameters'] / 1e6:.1f}M | {r['bits']} | {r['fp32_bytes'] / 2**20:.2f} | "
            f"{r['integer_bytes'] / 2**20:.2f} | {r['ratio']:.4f} | {target} | {exact} |"
        )
    lines += [
        "",
        "Bytes by kind (integer model):",
        "",
        "| model | bits | codes | weight scales | bias | activation tables | float tensors | safetensors header |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["tensor_bytes_by_kind"]
        lines.append(
            f"| {r['case']} | {r['bits']} | {p['weight_codes']} | {p['weight_scales']} | {p['bias']} | "
            f"{p['activation_tables']} | {p['float_tensors']} | {r['safetensors_overhead_bytes']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["embedded", "sd15"], choices=["embedded", "sd15"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split("/main/")[-1], *sys.argv[1:]]),
        "machine": machine_info(args.threads),
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="export-size-") as tmp:
        for case in args.cases:
            plans = [(4, 8), (8, 8)] if case == "embedded" else [(4, 8)]
            for bits in plans:
                timesteps = [0.0, 500.0, 990.0] if case == "embedded" else [500.0]
                r = run_case(case, bits, Path(tmp), timesteps)
                results.append(r)
                print(
                    json.dumps(
                        {
                            k: r[k]
                            for k in (
                                "case",
                                "bits",
                                "fp32_bytes",
                                "integer_bytes",
                                "ratio",
                                "reload_tensors_bit_exact",
                                "reload_output_bit_exact",
                            )
                        }
                    ),
                    flush=True,
                )
    meta["total_seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_size.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (args.out / "export_size.md").write_text(markdown(meta, results))
    print(f"wrote {args.out / 'export_size.json'} and .md ({meta['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
