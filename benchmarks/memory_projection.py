"""Project the peak memory of a distillation step at full resolution from the measured SD-scale runs.

    python benchmarks/memory_projection.py

Reads the ``benchmarks/results/sd_scale/sd15_*.json`` runs (written by ``sd_scale.py``) and writes
``benchmarks/results/sd_scale/memory_projection.{json,md}``.

The model (bytes; ``P`` parameters, ``Q`` of them in QALoRA layers with LoRA, ``L`` LoRA values, ``A`` activations):

* weights: ``4 P`` (fp32), every method;
* QALoRA: the fused path holds ``x_hat`` and the step derivative, ``8 Q``, from each layer's forward to its backward
  (with gradient checkpointing, only one block's worth), and the pooled weight gradients of its linear layers, ``4 G``
  with ``G`` the sum over their distinct weight shapes (fp32 only: under bf16 autocast the layer's op is not used;
  convolutions are lowered to matrix products, and pool theirs, only at small latents, not at these resolutions); LoRA
  state ``16 L`` (value, gradient, AdamW's two moments; ``10 L`` with 8-bit Adam);
* full fine-tuning: gradients ``4 P`` and AdamW's moments ``8 P`` (``2 P`` with 8-bit Adam);
* plain LoRA: ``16 L``;
* bf16 autocast: each op keeps the bf16 copy of the weight it used for its backward pass: ``+2 Q``;
* activations ``A``: the measured step peak of plain LoRA minus its LoRA state, fitted as ``a0 + a1 * pixels`` from
  two latent sizes (proportional to the pixels when one size was measured) and extrapolated (attention runs through ``scaled_dot_product_attention``, whose memory is
  linear in the tokens).  For SDXL and Flux, ``a1`` is scaled by the ratio of their quantized parameters to SD1.5's
  (activations per pixel grow with width and depth about as parameters do) -- an estimate, not a measurement.

Parameter counts come from the configurations (built on the meta device, nothing allocated).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

try:
    import diffusers_qalora  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_qalora.tuners.qalora.config import QALoraConfig

RESULTS = Path(__file__).resolve().parent / "results" / "sd_scale"
GIB = 2**30


def counts(model: torch.nn.Module, r: int = 32) -> dict[str, int]:
    """Parameters, parameters in LoRA layers, LoRA values (the default QALoRA targets), and the elements of the
    pooled weight gradients (one per distinct linear weight shape)."""
    cfg = QALoraConfig(r=r)
    total = sum(p.numel() for p in model.parameters())
    quantized = lora = 0
    linear_shapes = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) and getattr(mod, "groups", 1) == 1:
            if cfg.is_eight_bit(name):
                continue
            quantized += mod.weight.numel()
            lora += r * (mod.weight[0].numel() + mod.weight.shape[0])
            if isinstance(mod, torch.nn.Linear):
                linear_shapes.add(tuple(mod.weight.shape))
    pooled = sum(rows * cols for rows, cols in linear_shapes)
    return {"parameters": total, "quantized": quantized, "lora_values": lora, "pooled_gradient": pooled}


def models() -> dict[str, dict]:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        sdxl = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        flux = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
        )
    return {
        "SD1.5, 512 px (64x64 latent)": {**counts(sd15), "pixels": 64 * 64},
        "SDXL, 1024 px (128x128 latent)": {**counts(sdxl), "pixels": 128 * 128},
        # Flux packs 2 x 2 latent pixels per token: 64 x 64 tokens; 512 text tokens add to the activations.
        "Flux.1-dev, 1024 px (128x128 latent)": {**counts(flux), "pixels": 128 * 128},
    }


def main() -> dict:
    runs = {}
    for path in sorted(RESULTS.glob("sd15_*.json")):
        run = json.loads(path.read_text())
        if not run.get("steady"):
            continue  # the runs before steady-state timing (loaded machine, cold interleaving) are history
        for row in run["summary"]:
            runs[(run["latent"], row["setting"], row["variant"])] = (row["peak_memory_above_start_bytes"], run)
    lora_state = 16 * next(iter(runs.values()))[1]["qalora_trainable_values"] if runs else 0  # + the step sizes
    projections = {}
    for setting in ("plain", "gc"):
        sizes = sorted(latent for (latent, st, v) in runs if st == setting and v == "lora")
        if not sizes:
            continue
        act = {s: max(runs[(s, setting, "lora")][0] - lora_state, 0) for s in sizes}
        if len(sizes) > 1:
            lo, hi = sizes[0], sizes[-1]
            a1 = (act[hi] - act[lo]) / (hi * hi - lo * lo)
            a0 = act[lo] - a1 * lo * lo
        else:  # one size: activations proportional to the pixels
            a0, a1 = 0.0, act[sizes[0]] / sizes[0] ** 2
        projections[setting] = {"a0": a0, "a1": a1, "from_latents": sizes}
    basis = "plain" if "plain" in projections else "gc" if "gc" in projections else None
    # Without a measured SD1.5 run the table holds the parameter side only (exact byte counts, no activations).
    plain = projections[basis] if basis else {"a0": 0.0, "a1": 0.0, "from_latents": []}
    sd15_quantized = None
    rows = []
    for name, m in models().items():
        if sd15_quantized is None:
            sd15_quantized = m["quantized"]
        scale = m["quantized"] / sd15_quantized
        activations = max(plain["a0"], 0) + plain["a1"] * scale * m["pixels"]
        p, q, lora, pooled = m["parameters"], m["quantized"], m["lora_values"], m["pooled_gradient"]
        est = {
            "QALoRA": 4 * p + 8 * q + 4 * pooled + 16 * lora + activations,
            "QALoRA + 8-bit Adam": 4 * p + 8 * q + 4 * pooled + 10 * lora + activations,
            "QALoRA + bf16 autocast": 4 * p + 10 * q + 16 * lora + activations / 2,
            "full fine-tuning (AdamW)": 16 * p + activations,
            "full fine-tuning (8-bit Adam)": 10 * p + activations,
            "plain LoRA": 4 * p + 16 * lora + activations,
        }
        rows.append({"model": name, **m, "activations_bytes": activations, "peak_bytes": est})
    result = {
        "activation_fit": projections,
        "sd15_measured_peak_above_start": {f"{lat}x{lat} {st} {v}": peak for (lat, st, v), (peak, _) in runs.items()},
        "projections": rows,
    }
    lines = [
        "| model | params | in LoRA layers | LoRA values | activations (est.) | "
        + " | ".join(rows[0]["peak_bytes"])
        + " |",
        "|---|" + "---:|" * (4 + len(rows[0]["peak_bytes"])),
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e9:.2f} B | {r['quantized'] / 1e9:.2f} B | "
            f"{r['lora_values'] / 1e6:.0f} M | {r['activations_bytes'] / GIB:.1f} GiB | "
            + " | ".join(f"{v / GIB:.1f} GiB" for v in r["peak_bytes"].values())
            + " |"
        )
    note = (
        f"Activations from the SD1.5 runs with setting `{basis}` at latents {plain['from_latents']} "
        f"({'fitted a0 + a1 * pixels' if len(plain['from_latents']) > 1 else 'proportional to the pixels'})."
    )
    if basis is None:
        note = (
            "No SD1.5 run with a JSON result was found: parameter side only (weights, buffers, optimizer), "
            "activations not included."
        )
    if basis == "gc":
        note += (
            " Only checkpointed runs were measured: the activation column (and every column built on it) is "
            "what gradient checkpointing keeps, which understates a step without it."
        )
    lines = [note, ""] + lines
    result["activations_from_setting"] = basis
    (RESULTS / "memory_projection.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "memory_projection.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
