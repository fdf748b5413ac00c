"""Size of a QALoRA adapter folder for an SD1.5-sized UNet (``UNet2DConditionModel()`` defaults, random weights).

Builds the UNet, injects QALoRA (r = 32, W4A4 by default), saves the adapter with ``save_qalora_adapter`` and reports
the size and tensor count of ``adapter_model.safetensors`` next to the fp32 UNet's size.  No calibration is run: the
saved file is the same size either way (it then holds ``calibrated = False`` flags, so loading it and sampling raises
until ``calibrate_activations`` is called).

    python benchmarks/adapter_size.py                      # writes benchmarks/results/adapter_size.{json,md}

Needs about 4 GB of memory and a few minutes on 2 CPU cores (the default MSE search of the weight step sizes
dominates).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _kind(key: str) -> str:
    """Group a saved tensor name by what it holds."""
    if ".qal_A" in key or ".qal_B" in key:
        return "LoRA factors (qal_A, qal_B)"
    if ".qal_weight_quantizer." in key:
        return "weight step sizes"
    if key.endswith(".calibrated"):
        return "calibrated flags"
    if key.endswith(".timesteps"):
        return "timestep tables"
    if ".qal_act_quantizer." in key:
        return "activation step sizes and zero points"
    return "other"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=4)
    parser.add_argument("--weight-init", default=None, help="default: the library default (QALoraConfig.weight_init)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    import diffusers_qalora as dq
    from diffusers_qalora.tuners.qalora import Conv2d, Linear, qalora_layers

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel().eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in unet.parameters())
    fp32_bytes = sum(t.numel() * t.element_size() for t in unet.state_dict().values())

    kwargs = dict(r=args.r, weight_bits=args.weight_bits, act_bits=args.act_bits)
    if args.weight_init is not None:
        kwargs["weight_init"] = args.weight_init
    config = dq.QALoraConfig(**kwargs)
    t0 = time.perf_counter()
    dq.get_qalora_model(unet, config)
    inject_s = time.perf_counter() - t0
    layers = qalora_layers(unet)
    eight_bit = sorted(n for n, m in layers.items() if m.eight_bit["default"])
    lora_params = sum(
        m.qal_A["default"].numel() + m.qal_B["default"].numel() for m in layers.values() if "default" in m.qal_A
    )

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = dq.save_qalora_adapter(unet, tmp)
        save_s = time.perf_counter() - t0
        weights = folder / "adapter_model.safetensors"
        file_bytes = weights.stat().st_size
        config_bytes = (folder / "adapter_config.json").stat().st_size
        with open(weights, "rb") as f:
            header_bytes = 8 + int.from_bytes(f.read(8), "little")
        by_kind: Counter = Counter()
        bytes_by_kind: Counter = Counter()
        calibrated_flags = set()
        with safe_open(weights, "pt") as f:
            keys = list(f.keys())
            for key in keys:
                tensor = f.get_tensor(key)
                by_kind[_kind(key)] += 1
                bytes_by_kind[_kind(key)] += tensor.numel() * tensor.element_size()
                if key.endswith(".calibrated"):
                    calibrated_flags.add(bool(tensor))

    import diffusers
    import peft

    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "model": "UNet2DConditionModel() defaults (SD1.5-sized; cross_attention_dim=1280 where SD1.5 uses 768), "
        "random weights, seed 0",
        "unet_parameters": n_params,
        "unet_fp32_bytes": fp32_bytes,
        "config": {
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "weight_bits": config.weight_bits,
            "act_bits": config.act_bits,
            "weight_init": config.weight_init,
            "timestep_table_entries": len(config.timestep_table()),
            "special_bits": config.special_bits,
        },
        "wrapped_layers": len(layers),
        "wrapped_linear": sum(isinstance(m, Linear) for m in layers.values()),
        "wrapped_conv2d": sum(isinstance(m, Conv2d) for m in layers.values()),
        "eight_bit_layers": eight_bit,
        "lora_parameters": lora_params,
        "adapter_model_safetensors_bytes": file_bytes,
        "adapter_model_safetensors_header_bytes": header_bytes,
        "adapter_config_json_bytes": config_bytes,
        "tensor_count": len(keys),
        "tensors_by_kind": dict(sorted(by_kind.items())),
        "payload_bytes_by_kind": dict(sorted(bytes_by_kind.items())),
        "adapter_to_fp32_unet_ratio": file_bytes / fp32_bytes,
        "calibrated": sorted(calibrated_flags),
        "seconds": {"build_unet": round(build_s, 1), "get_qalora_model": round(inject_s, 1), "save": round(save_s, 1)},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "diffusers_qalora": dq.__version__,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_size.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "adapter_size.md").write_text(_markdown(result))
    print(json.dumps(result, indent=2))
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _markdown(r: dict) -> str:
    c = r["config"]
    rows = "\n".join(
        f"| {kind} | {r['tensors_by_kind'][kind]} | {r['payload_bytes_by_kind'][kind]:,} |"
        for kind in r["tensors_by_kind"]
    )
    return f"""# QALoRA adapter size: SD1.5-sized UNet

Command: `{r["command"]}`

Model: {r["model"]}, {r["unet_parameters"]:,} parameters.
Config: r = {c["r"]}, W{c["weight_bits"]}A{c["act_bits"]}, weight_init = {c["weight_init"]!r}, \
{c["timestep_table_entries"]} timestep-table entries, {len(r["eight_bit_layers"])} layers at {c["special_bits"]} bits \
without LoRA ({", ".join(r["eight_bit_layers"])}).

| | |
| --- | --- |
| wrapped layers | {r["wrapped_layers"]} ({r["wrapped_linear"]} Linear, {r["wrapped_conv2d"]} Conv2d) |
| LoRA parameters | {r["lora_parameters"]:,} |
| `adapter_model.safetensors` | {r["adapter_model_safetensors_bytes"]:,} bytes ({_mib(r["adapter_model_safetensors_bytes"])}) |
| of which the safetensors header | {r["adapter_model_safetensors_header_bytes"]:,} bytes |
| tensors in the file | {r["tensor_count"]:,} |
| `adapter_config.json` | {r["adapter_config_json_bytes"]:,} bytes |
| fp32 UNet (sum of its state-dict tensors) | {r["unet_fp32_bytes"]:,} bytes ({_mib(r["unet_fp32_bytes"])}) |
| adapter / fp32 UNet | {100 * r["adapter_to_fp32_unet_ratio"]:.2f} % |

| tensors by kind | count | payload bytes |
| --- | --- | --- |
{rows}

No calibration was run: the file holds `calibrated = {r["calibrated"]}` flags (same size as a calibrated adapter;
loading it and sampling raises until `calibrate_activations` runs).

Timings ({r["threads"]} threads, shared CPU, indicative only): build {r["seconds"]["build_unet"]} s,
get_qalora_model {r["seconds"]["get_qalora_model"]} s, save {r["seconds"]["save"]} s; peak RSS {r["peak_rss_gib"]} GiB.
Versions: {", ".join(f"{k} {v}" for k, v in r["versions"].items())}.
"""


if __name__ == "__main__":
    main()
