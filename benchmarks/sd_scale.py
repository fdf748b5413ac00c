"""Cost of one data-free distillation step at Stable Diffusion scale: QALoRA against full fine-tuning and plain LoRA.

Random weights in the shapes of real denoisers (built from configs, nothing downloaded):

* ``sd15``: diffusers' ``UNet2DConditionModel`` with SD1.5's configuration (860M parameters), 77 x 768 context;
* ``sdxl``: SDXL's UNet with **one transformer layer per block instead of (1, 2, 10)** (the rest as SDXL:
  channels, heads, 77 x 2048 context, text/time embeddings);
* ``flux``: ``FluxTransformer2DModel`` with Flux.1-dev's widths but **1 of 19 double-stream and 2 of 38
  single-stream blocks** and **128 text tokens instead of 512**;
* ``embedded``: the package's embedded default model and the default job's adapter (batch 8, 1 x 16 x 16, MSE
  weight init), to check that the default run got no slower.

One process holds one base model and three variants that share its weights, measured interleaved (the order
rotates every round), so their ratios come from the same conditions on a shared machine.  Each timed step follows an
untimed step of the same variant and setting (``--steady``, the default): switching between variants of different
memory footprints otherwise costs the next step fresh memory that no training step pays (up to 2x on one step).

* ``qalora``: the student of `DataFreeDistiller` (W4A4, r = 32, every LoRA layer, temporal activation steps,
  AdamW over `get_qalora_param_groups`); ``qalora_ref`` (``--with_reference``) is the same with the reference
  composition of the weight fake-quantization (the code before the fused path), and ``qalora_dense`` the fused weight
  path with the layer's op kept apart, so the LoRA gradients always go through the weight gradient (the code before
  `qalora_conv2d` / `qalora_linear`), and ``qalora_eager_fq`` the same as ``qalora`` with `fake_quantize` in the
  activation quantizers (LSQ fake quantization) in its eager composition instead of its one-pass compiled path (the code before
  that path), for before/after numbers;
* ``full_ft``: the same model with adapters off and every base weight trainable (no quantization);
* ``lora``: a plain PEFT LoRA of the same rank on the same layers (a second model sharing the weight storage).

A step is split into the teacher pass (no gradient, adapters off), the student forward, the backward and the
optimizer step (AdamW; not measured for ``full_ft``, whose Adam state would not fit next to the others).  Peak memory
is the peak resident set size during one step (fwd + bwd + optimizer) above the size before it, sampled every 2 ms,
after freeing the fused path's buffer pool and returning freed memory to the OS (``malloc_trim``) so each variant
starts from the same state.  Weights use the min-max step init (the MSE search would take ~17 CPU-minutes).

    python benchmarks/sd_scale.py --model sd15 --latent 16 --repeats 3 --with_reference --profile
    python benchmarks/sd_scale.py --model sd15 --latent 32 --repeats 2
    python benchmarks/sd_scale.py --model sd15 --latent 16 --settings gc bf16 --repeats 1
    python benchmarks/sd_scale.py --model sdxl --latent 16 --repeats 1
    python benchmarks/sd_scale.py --model flux --latent 16 --repeats 1

The same command runs on CUDA when a GPU is present (``--device cuda``; peak memory then from
``torch.cuda.max_memory_allocated``).  Results: ``benchmarks/results/sd_scale/<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import diffusers_qalora  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_qalora import QALoraConfig, get_qalora_model
from diffusers_qalora.evaluation.report import machine_info
from diffusers_qalora.quant import (
    WeightQuantizer,
    clear_workspace,
    fake_quantize,
    fused_compile,
    lowrank_gradients_cheaper,
    set_fake_quantize_resolver,
)
from diffusers_qalora.tuners.qalora.api import adapters_disabled, calibrate_activations, get_qalora_param_groups
from diffusers_qalora.tuners.qalora.layer import QALoraLayer
from diffusers_qalora.tuners.qalora.model import qalora_layers

RESULTS = Path(__file__).resolve().parent / "results" / "sd_scale"
VARIANTS = ("qalora", "full_ft", "lora")


# -- models ----------------------------------------------------------------------------------------------------------
def build(model: str):
    """(base model, input factory(latent, device), timestep value, timestep table or None, QALoRA overrides)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    if model == "embedded":
        # The embedded default model with the default job's adapter (examples/distill.py): batch 8, 1 x 16 x 16.
        from diffusers_qalora.distill.embedded import EmbeddedJobConfig, timestep_table
        from diffusers_qalora.testbed import load_testbed

        testbed = load_testbed()
        job = EmbeddedJobConfig()
        table = timestep_table(testbed.pipeline.scheduler, job.table_steps)

        def inputs(latent, device):
            return dict(
                sample=torch.randn(job.distill.batch_size, 1, latent, latent, device=device),
                class_labels=torch.arange(job.distill.batch_size, device=device) % 10,
            )

        return testbed.unet, inputs, float(table[len(table) // 2]), table, {"weight_init": "mse"}
    if model == "sd15":
        base = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # otherwise the defaults are SD1.5's

        def inputs(latent, device):
            return dict(
                sample=torch.randn(1, 4, latent, latent, device=device),
                encoder_hidden_states=torch.randn(1, 77, 768, device=device),
            )

        return base, inputs, 500.0, None, {}
    if model == "sdxl":
        base = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=1,
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )

        def inputs(latent, device):
            return dict(
                sample=torch.randn(1, 4, latent, latent, device=device),
                encoder_hidden_states=torch.randn(1, 77, 2048, device=device),
                added_cond_kwargs={
                    "text_embeds": torch.randn(1, 1280, device=device),
                    "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=device),
                },
            )

        return base, inputs, 500.0, None, {}
    if model == "flux":
        base = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
        )

        def inputs(latent, device):
            side = latent // 2  # 2 x 2 patches of a 16-channel latent
            tokens, text = side * side, 128
            ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
            return dict(
                hidden_states=torch.randn(1, tokens, 64, device=device),
                encoder_hidden_states=torch.randn(1, text, 4096, device=device),
                pooled_projections=torch.randn(1, 768, device=device),
                guidance=torch.tensor([3.5], device=device),
                img_ids=torch.cat([torch.zeros(tokens, 1), ids.float()], 1).to(device),
                txt_ids=torch.zeros(text, 3, device=device),
            )

        return base, inputs, 0.5, [i / 100 for i in range(1, 101)], {}
    raise ValueError(f"unknown model {model!r}")


def output(model, kwargs, t):
    out = model(timestep=t, **kwargs, return_dict=False)
    return out[0]


# -- memory ----------------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: freed memory may stay in the process
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakSampler:
    """Peak RSS (CPU) or peak allocated memory (CUDA) inside a ``with`` block, above the level at its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_bytes())
                time.sleep(0.002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        self.above_start = self.peak - self.start


# -- variants --------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.args = args
        self.device = torch.device(args.device)
        base, self.make_inputs, self.t_value, table, overrides = build(args.model)
        twin_state = base.state_dict()
        with torch.device("meta"):
            twin = type(base).from_config(base.config)
        twin.load_state_dict(twin_state, assign=True)  # the LoRA model shares every weight's storage
        del twin_state
        base.to(self.device).train()
        twin.to(self.device).train()
        self.num_params = sum(p.numel() for p in base.parameters())
        qcfg = QALoraConfig(
            r=32, lora_alpha=32, weight_bits=4, act_bits=4, timesteps=table, **{"weight_init": "minmax", **overrides}
        )
        t0 = time.perf_counter()
        get_qalora_model(base, qcfg)
        self.inject_seconds = time.perf_counter() - t0
        self.unet = base
        self.inputs = self.make_inputs(args.latent, self.device)
        self.t = torch.tensor([self.t_value], device=self.device)
        calibrate_activations(base, lambda: output(base, self.inputs, self.t), method="minmax")
        layers = qalora_layers(base)
        lora_targets = [name for name, layer in layers.items() if "default" in layer.qal_A]
        self.lora_layers = len(lora_targets)
        self.qalora_layers = len(layers)
        inject_adapter_in_model(LoraConfig(r=32, lora_alpha=32, target_modules=lora_targets), twin)
        for name, p in twin.named_parameters():
            p.requires_grad_("lora_" in name)
        self.twin = twin
        self.qalora_params = [p for p in base.parameters() if p.requires_grad]
        self.trainable_tensors = len(self.qalora_params)
        self.trainable_values = sum(p.numel() for p in self.qalora_params)
        self.base_params = [p for n, p in base.named_parameters() if ".qal_" not in f".{n}"]
        # Full fine-tuning's weight gradients are computed as usual but dropped as soon as each is accumulated, so
        # that its 4 bytes per parameter do not sit next to the QALoRA buffers in this one process; its peak memory
        # is reported with those bytes added back.
        for p in self.base_params:
            p.requires_grad_(True)
            p.register_post_accumulate_grad_hook(_drop_grad)
            p.requires_grad_(False)
        groups = get_qalora_param_groups(base, 1e-4, 1e-5, 1e-4, "lr", 0.0)
        self.scale_aware = groups
        # AdamW as DataFreeDistiller builds it (fused: one kernel for all tensors).
        self.opt = {
            "qalora": torch.optim.AdamW(groups.param_groups, fused=True),
            "qalora_ref": None,
            "qalora_dense": None,
            "qalora_eager_fq": None,
            "lora": torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-4, fused=True),
        }
        self.opt["qalora_ref"] = self.opt["qalora_dense"] = self.opt["qalora_eager_fq"] = self.opt["qalora"]
        self.bf16 = False

    def use(self, setting: str) -> None:
        """``plain``, ``gc`` (gradient checkpointing), ``bf16`` (autocast) or ``gc_bf16``, for both models."""
        for model in (self.unet, self.twin):
            if "gc" in setting:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()
        self.bf16 = "bf16" in setting

    def autocast(self):
        dtype = torch.bfloat16 if self.bf16 else None
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def teacher(self) -> tuple[torch.Tensor, float]:
        self.sync()
        start = time.perf_counter()
        with torch.no_grad(), adapters_disabled(self.unet), self.autocast():
            target = output(self.unet, self.inputs, self.t).float()
        self.sync()
        return target, time.perf_counter() - start

    def student_step(self, variant: str, target: torch.Tensor) -> dict[str, float]:
        model = self.twin if variant == "lora" else self.unet
        QALoraLayer.fused_weight_path = variant != "qalora_ref"
        QALoraLayer.fused_layer_op = variant not in ("qalora_ref", "qalora_dense")
        resolver = set_fake_quantize_resolver(_eager_fake_quantize_resolver) if variant == "qalora_eager_fq" else None
        if variant == "full_ft":
            for p in self.base_params:
                p.requires_grad_(True)
        times = {}
        try:
            ctx = adapters_disabled(self.unet) if variant == "full_ft" else _null()
            with ctx:
                self.sync()
                start = time.perf_counter()
                with self.autocast():
                    pred = output(model, self.inputs, self.t).float()
                loss = F.mse_loss(pred, target)
                self.sync()
                times["forward"] = time.perf_counter() - start
                start = time.perf_counter()
                loss.backward()
                self.sync()
                times["backward"] = time.perf_counter() - start
            opt = self.opt.get(variant)
            if opt is not None:
                start = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.sync()
                times["optimizer"] = time.perf_counter() - start
            else:
                for p in self.base_params:
                    p.grad = None
        finally:
            QALoraLayer.fused_weight_path = True
            QALoraLayer.fused_layer_op = True
            if variant == "qalora_eager_fq":
                set_fake_quantize_resolver(resolver)
            if variant == "full_ft":
                for p in self.base_params:
                    p.requires_grad_(False)
                    p.grad = None
        times["fwd_bwd"] = times["forward"] + times["backward"]
        return times


def _eager_fake_quantize(*args) -> torch.Tensor:
    """`fake_quantize` in its eager composition: the fused-path mode is ``"never"`` for this call only (the layers'
    weight path, outside it, keeps its mode; the backward pass follows the choice the forward made)."""
    with fused_compile("never"):
        return fake_quantize(*args)


def _eager_fake_quantize_resolver(module, x):
    # Weight quantizers keep `fake_quantize` itself: a LoRA layer takes its fused weight path only then.
    return fake_quantize if isinstance(module, WeightQuantizer) else _eager_fake_quantize


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def temporal_values_study(bench: Bench, target: torch.Tensor, repeats: int = 5) -> dict:
    """Optimizer cost of the activation step-size tables at this model's shape, two designs (issue 16):

    (a) today's `TemporalValues`: one 0-d parameter per timestep entry; an entry a step does not use gets no
        gradient (``None``), so AdamW skips it: exact freezing for free, per-entry Adam step counts;
    (b) one ``(T,)`` parameter per table, with a dense gradient that is zero except at the used entries, and AdamW
        made exact by restoring the unused entries' values and moments after each step (without the restore, AdamW's
        momentum and weight decay would move them).  Adam's step count (bias correction) is then per table, not per
        entry: a rarely used entry gets the bias correction of the whole table, which changes its updates.

    Both optimizers (fused AdamW, as `DataFreeDistiller` builds it) see the same gradients (those of one real
    student step) and the same LoRA / weight-step parameters; the times are medians over ``repeats`` interleaved
    steps (``step()`` + ``zero_grad``).
    """
    import io

    from diffusers_qalora.quant import TemporalActQuantizer

    model = bench.unet
    opt_a = torch.optim.AdamW(bench.scale_aware.param_groups, fused=True)
    # One real step's gradients, kept (an optimizer step does not modify them).
    pred = output(model, bench.inputs, bench.t).float()
    F.mse_loss(pred, target).backward()
    grads = {p: p.grad for g in opt_a.param_groups for p in g["params"] if p.grad is not None}
    quantizers = [m for m in model.modules() if isinstance(m, TemporalActQuantizer)]
    tables = [tv for q in quantizers for tv in (q.step, q.zero_point) if tv is not None]
    entry_params = {p for tv in tables for p in tv.values}
    other = [p for g in opt_a.param_groups for p in g["params"] if p not in entry_params]
    # (b): one (T,) tensor per table, its gradient scattered from the per-entry gradients.
    dense = []
    for tv in tables:
        param = torch.nn.Parameter(torch.stack([p.detach() for p in tv.values]))
        grad = torch.zeros_like(param)
        used = torch.zeros(len(tv), dtype=torch.bool)
        for i, p in enumerate(tv.values):
            if p in grads:
                grad[i] = grads[p]
                used[i] = True
        dense.append((param, grad, used))
    opt_b = torch.optim.AdamW(
        [{"params": other, "lr": 1e-4}, {"params": [d[0] for d in dense], "lr": 1e-4, "weight_decay": 0.0}], fused=True
    )

    def step_a():
        for p, g in grads.items():
            p.grad = g
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)

    def step_b():
        for p in other:
            p.grad = grads.get(p)
        kept = []
        for param, grad, used in dense:
            param.grad = grad
            state = opt_b.state.get(param)
            idle = ~used
            kept.append(
                (
                    param.detach()[idle].clone(),
                    None if not state else state["exp_avg"][idle].clone(),
                    None if not state else state["exp_avg_sq"][idle].clone(),
                )
            )
        opt_b.step()
        with torch.no_grad():
            for (param, _, used), (value, m, v) in zip(dense, kept):
                idle = ~used
                param[idle] = value
                state = opt_b.state[param]
                if m is not None:
                    state["exp_avg"][idle] = m
                    state["exp_avg_sq"][idle] = v
                else:  # first step: the moments of unused entries start at zero
                    state["exp_avg"][idle] = 0.0
                    state["exp_avg_sq"][idle] = 0.0
        opt_b.zero_grad(set_to_none=True)

    times = {"a_per_entry_parameters": [], "b_one_tensor_per_table_masked": []}
    for rep in range(repeats + 1):
        for name, fn in (("a_per_entry_parameters", step_a), ("b_one_tensor_per_table_masked", step_b)):
            start = time.perf_counter()
            fn()
            if rep:  # the first round builds the optimizer state
                times[name].append(time.perf_counter() - start)
    # Checkpoint size of the optimizer state once every entry has been used (a full 100-step trajectory).
    for tv in tables:
        for p in tv.values:
            p.grad = torch.ones_like(p)
    opt_a.step()
    opt_a.zero_grad(set_to_none=True)

    def saved(opt):
        buf = io.BytesIO()
        start = time.perf_counter()
        torch.save(opt.state_dict(), buf)
        elapsed = time.perf_counter() - start
        tensors = sum(
            sum(isinstance(v, torch.Tensor) for v in st.values()) for st in opt.state_dict()["state"].values()
        )
        return {"seconds": elapsed, "bytes": buf.tell(), "tensors": tensors}

    return {
        "tables": len(tables),
        "entries": sum(len(tv) for tv in tables),
        "parameters_a": sum(1 for g in opt_a.param_groups for _ in g["params"]),
        "parameters_b": len(other) + len(dense),
        "state_dict_keys_per_table": 2,  # "timesteps" and "values" in both designs
        "optimizer_step_seconds": {k: statistics.median(v) for k, v in times.items()},
        "optimizer_checkpoint_after_full_trajectory": {
            "a_per_entry_parameters": saved(opt_a),
            "b_one_tensor_per_table_masked": saved(opt_b),
        },
    }


def mac_floor(bench: Bench, r: int = 32) -> dict[str, float]:
    """Multiply-adds of one step, counted from the layer shapes of one forward pass: full fine-tuning does ``3 P N``
    per layer (forward, input gradient, weight gradient; ``N`` weights, ``P`` output positions x batch), QALoRA the
    same plus ``r N`` per LoRA layer for ``B @ A`` and, for the two LoRA gradients, the cheaper of ``2 r N`` (through
    the masked weight gradient: ``qalora_dense``) and ``2 r P (K + C_out)`` (through the activations, ``K = N /
    C_out``; `quant.lora_op.lowrank_gradients_cheaper`), the correction for clipped weights left out.  Their ratio is
    what ``fwd+bwd / full FT`` comes to at equal arithmetic rates (attention's own products, the same in both, are
    left out).  The weight gradient itself stays in QALoRA's count: LSQ's step-size gradient needs all of it."""
    lora_weights = {
        m.base_layer.weight.data_ptr()
        for m in bench.twin.modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    }
    counts: list[tuple[int, int, int, bool]] = []

    def hook(module, inputs, out):
        n = out.shape[0] * out.shape[2] * out.shape[3] if out.dim() == 4 else out.numel() // out.shape[-1]
        w = module.weight
        counts.append((w.numel(), n, w.shape[0], w.data_ptr() in lora_weights))

    handles = [
        m.register_forward_hook(hook)
        for name, m in bench.twin.named_modules()
        if type(m) in (torch.nn.Conv2d, torch.nn.Linear) and ".lora_" not in f".{name}"
    ]
    try:
        with torch.no_grad():
            output(bench.twin, bench.inputs, bench.t)
    finally:
        for h in handles:
            h.remove()
    full = sum(3 * n * w for w, n, _, _ in counts)
    dense = sum(3 * r * w for w, _, _, lora in counts if lora)
    extra = 0
    for w, n, out, lora in counts:
        if lora:
            per_output = w // out
            cheaper = lowrank_gradients_cheaper(n, out, per_output)
            extra += r * w + (2 * r * n * (per_output + out) if cheaper else 2 * r * w)
    return {
        "full_ft_gmac": full / 1e9,
        "qalora_extra_gmac": extra / 1e9,
        "ratio": (full + extra) / full,
        "qalora_dense_extra_gmac": dense / 1e9,
        "dense_ratio": (full + dense) / full,
    }


def profile_step(bench: Bench, variant: str, target: torch.Tensor, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        bench.student_step(variant, target)
    sort = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


SETTINGS = ("plain", "gc", "bf16", "gc_bf16")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("sd15", "sdxl", "flux", "embedded"), default="sd15")
    p.add_argument("--latent", type=int, default=16, help="latent height = width")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--settings",
        nargs="+",
        default=["plain"],
        choices=SETTINGS,
        help="gradient checkpointing (gc) and/or bf16 autocast, interleaved in the same run",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS + ("qalora_ref", "qalora_dense", "qalora_eager_fq"),
    )
    p.add_argument("--with_reference", action="store_true", help="also time qalora_ref (the pre-fusion path)")
    p.add_argument(
        "--steady",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time each step right after an untimed step of the same case (training's steady state); --no-steady "
        "times it right after whichever case ran before (the interleaving of results before this flag)",
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of one student step")
    p.add_argument("--profile_setting", default="plain", choices=SETTINGS)
    p.add_argument(
        "--temporal_values_study",
        action="store_true",
        help="optimizer cost of per-entry vs per-table activation step parameters (issue 16)",
    )
    p.add_argument("--tag", default=None)
    p.add_argument("--render", type=Path, default=None, help="only rewrite <tag>.md from this <tag>.json")
    p.add_argument(
        "--mac_floor_into",
        type=Path,
        default=None,
        help="only count the multiply-add floor of --model/--latent and add it to this result JSON (and its .md)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.render is not None or args.mac_floor_into is not None:
        path = args.render or args.mac_floor_into
        result = json.loads(path.read_text(encoding="utf-8"))
        if args.mac_floor_into is not None:
            torch.set_num_threads(args.threads)
            result["mac_floor"] = mac_floor(Bench(args))
            result["mac_floor_command"] = "python benchmarks/sd_scale.py " + " ".join(argv)
            path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        path.with_suffix(".md").write_text(markdown(result, path.stem), encoding="utf-8")
        return result
    torch.set_num_threads(args.threads)
    variants = list(args.variants) + (
        ["qalora_ref"] if args.with_reference and "qalora_ref" not in args.variants else []
    )
    tag = args.tag or "_".join(
        [args.model, f"{args.latent}x{args.latent}"]
        + [s for s in args.settings if s != "plain"]
        + ([args.device] if args.device != "cpu" else [])
    )
    cases = [(v, st) for st in args.settings for v in variants]
    load_before = os.getloadavg()
    t_build = time.perf_counter()
    bench = Bench(args)
    build_seconds = time.perf_counter() - t_build
    device = bench.device
    # Warm-up step per case (first-touch allocations, compilation), measured for peak memory.
    memory = {}
    for variant, setting in cases:
        bench.use(setting)
        target, _ = bench.teacher()
        clear_workspace()
        trim()
        with PeakSampler(device) as peak:
            bench.student_step(variant, target)
        memory[(variant, setting)] = peak.above_start + (4 * bench.num_params if variant == "full_ft" else 0)
        print(f"warm-up {variant} {setting}: step peak +{peak.above_start / 2**30:.2f} GiB", flush=True)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {c: [] for c in cases}
    teacher_times: dict[str, list[float]] = {st: [] for st in args.settings}
    pool_cold = False
    for rep in range(args.repeats):
        shift = rep % len(cases)
        for variant, setting in cases[shift:] + cases[:shift]:
            bench.use(setting)
            if variant == "qalora_ref":
                # The reference path allocates its own buffers: free the pool so both do not sit in memory at once,
                # and re-fill it (untimed) before the next fused step, which would otherwise pay the page faults.
                clear_workspace()
                trim()
                pool_cold = True
            elif variant == "qalora" and pool_cold:
                bench.student_step(variant, bench.teacher()[0])
                pool_cold = False
            if args.steady:
                # An untimed step of the same case first: the timed one then sees the memory and buffers of the step
                # before it, as every step of a training run after the first does.
                bench.student_step(variant, bench.teacher()[0])
            target, t_teacher = bench.teacher()
            teacher_times[setting].append(t_teacher)
            times = bench.student_step(variant, target)
            runs[(variant, setting)].append(times)
            print(
                f"round {rep} {variant} {setting}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()), flush=True
            )
    # Ratios per round (same conditions), then the median over rounds.
    summary = []
    for variant, setting in cases:
        case_runs = runs[(variant, setting)]
        med = {k: statistics.median(r[k] for r in case_runs) for k in case_runs[0]}
        row = {
            "variant": variant,
            "setting": setting,
            "median_seconds": med,
            "peak_memory_above_start_bytes": memory[(variant, setting)],
        }
        for ref in ("full_ft", "lora"):
            if (ref, setting) in runs and variant != ref:
                ratios = [a["fwd_bwd"] / b["fwd_bwd"] for a, b in zip(case_runs, runs[(ref, setting)])]
                row[f"fwd_bwd_ratio_to_{ref}"] = statistics.median(ratios)
        if "optimizer" in med:
            step = med["fwd_bwd"] + med["optimizer"] + statistics.median(teacher_times[setting])
            row["optimizer_share_of_step"] = med["optimizer"] / step
        summary.append(row)
    result = {
        "command": "python benchmarks/sd_scale.py " + " ".join(argv),
        "model": args.model,
        "latent": args.latent,
        "batch": 8 if args.model == "embedded" else 1,
        "repeats": args.repeats,
        "steady": args.steady,
        "threads": args.threads,
        "device": str(device),
        "settings": args.settings,
        "seed": 0,
        "parameters": bench.num_params,
        "qalora_layers": bench.qalora_layers,
        "lora_layers": bench.lora_layers,
        "qalora_trainable_tensors": bench.trainable_tensors,
        "qalora_trainable_values": bench.trainable_values,
        "build_seconds": build_seconds,
        "teacher_seconds_median": {st: statistics.median(v) for st, v in teacher_times.items()},
        "runs": [{"variant": v, "setting": st, "steps": r} for (v, st), r in runs.items()],
        "summary": summary,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "machine": machine_info(),
    }
    result["mac_floor"] = mac_floor(bench)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")  # before the extras
    if args.temporal_values_study:
        bench.use(args.settings[-1])  # the gradients of one step in the last setting measured (gc needs less memory)
        target, _ = bench.teacher()
        result["temporal_values_study"] = temporal_values_study(bench, target)
        print(json.dumps(result["temporal_values_study"], indent=1), flush=True)
    if args.profile:
        bench.use(args.profile_setting)
        result["profile_setting"] = args.profile_setting
        target, _ = bench.teacher()
        result["profile"] = {}
        for v in [v for v in variants if v.startswith("qalora") or v == "full_ft"]:
            if v == "qalora_ref":
                clear_workspace()
                trim()
            elif v == "qalora":
                bench.student_step(v, target)  # pool filled, as in a real run after its first step
            result["profile"][v] = profile_step(bench, v, target)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{tag}.md").write_text(markdown(result, tag), encoding="utf-8")
    print(markdown(result, tag))
    return result


def markdown(result: dict, tag: str) -> str:
    gib = 2**30
    lines = [
        f"# Distillation step at scale: {tag}",
        "",
        f"Command: `{result['command']}`  ",
        f"{result['model']}: {result['parameters'] / 1e6:.0f}M parameters, {result['qalora_layers']} QALoRA layers "
        f"({result['lora_layers']} with LoRA r=32), {result['qalora_trainable_tensors']} trainable tensors "
        f"({result['qalora_trainable_values'] / 1e6:.1f}M values); latent {result['latent']}x{result['latent']}, "
        f"batch {result['batch']}, {result['threads']} thread(s), {result['device']}; "
        f"{result['repeats']} interleaved rounds (medians; ratios are medians of per-round ratios, within a setting)"
        + (
            ", each timed step right after an untimed step of the same case (steady state). "
            if result.get("steady")
            else ". "
        )
        + f"Load average before/after: {result['load_average_before'][0]:.1f} / {result['load_average_after'][0]:.1f} "
        f"on {result['cpu_count']} CPUs.  Settings: plain = fp32, gc = gradient checkpointing, "
        "bf16 = bf16 autocast of teacher and student.",
        "",
        "Teacher pass (no gradient): "
        + ", ".join(f"{st} {t:.2f} s" for st, t in result["teacher_seconds_median"].items())
        + ".",
        "",
        "| variant | setting | student forward (s) | backward (s) | fwd+bwd (s) | optimizer step (s) |"
        " fwd+bwd / full FT | fwd+bwd / LoRA | optimizer share of step | step peak memory (GiB above start) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        variant = row["variant"]
        med = row["median_seconds"]
        opt = f"{med['optimizer']:.3f}" if "optimizer" in med else "—"
        share = f"{100 * row['optimizer_share_of_step']:.1f}%" if "optimizer_share_of_step" in row else "—"
        ft = f"{row['fwd_bwd_ratio_to_full_ft']:.2f}" if "fwd_bwd_ratio_to_full_ft" in row else "—"
        lo = f"{row['fwd_bwd_ratio_to_lora']:.2f}" if "fwd_bwd_ratio_to_lora" in row else "—"
        lines.append(
            f"| {variant} | {row['setting']} | {med['forward']:.2f} | {med['backward']:.2f} | {med['fwd_bwd']:.2f} | {opt} | "
            f"{ft} | {lo} | {share} | {row['peak_memory_above_start_bytes'] / gib:.2f} |"
        )
    floor = result.get("mac_floor")
    if floor:
        lines += [
            "",
            f"Multiply-add floor (`mac_floor`): full fine-tuning {floor['full_ft_gmac']:.1f} GMAC per step, QALoRA "
            f"{floor['qalora_extra_gmac']:.1f} GMAC more (`r N` for `B @ A`, and per layer the cheaper way to the "
            f"LoRA gradients): a multiply-add ratio of **{floor['ratio']:.2f}x**, what the QALoRA step costs against "
            "full fine-tuning at equal arithmetic rates"
            + (
                f" ({floor['dense_ratio']:.2f}x with both LoRA gradients through the weight gradient, `3 r N`: "
                "`qalora_dense`)"
                if "dense_ratio" in floor
                else ""
            )
            + ".  It is an estimate, not a strict bound on the time ratio: the rates differ.  Full fine-tuning "
            "runs PyTorch's convolutions, whose cost at few positions is the weight (oneDNN reorders it on every "
            "call and writes the weight gradient into fresh pages; the smallest take PyTorch's slow native kernel), "
            "while QALoRA's layer, where its fused path runs (CPU weights of 2^18 elements or more), runs those "
            "convolutions as matrix products over the unfolded input, with its weight gradient in a pooled buffer "
            "(`quant.lora_op.conv_as_matmul`); its LoRA products are dense matrix products.",
        ]
    lines += [
        "",
        "Optimizer share = optimizer / (teacher + fwd + bwd + optimizer).  full_ft has no optimizer "
        "step here (its AdamW state would not fit next to the other variants); its peak memory adds its weight "
        "gradients (4 bytes per parameter) to what was measured, as they are dropped right after they are "
        "computed in this run.",
    ]
    study = result.get("temporal_values_study")
    if study:
        opt, ckpt = study["optimizer_step_seconds"], study["optimizer_checkpoint_after_full_trajectory"]
        lines += [
            "",
            "## Activation step-size tables: one parameter per entry (a) or one per table (b)",
            "",
            f"{study['tables']} tables, {study['entries']} entries; optimizer parameters (a) {study['parameters_a']}, "
            f"(b) {study['parameters_b']}.  Same gradients (one real step), AdamW `step()` + `zero_grad`, median of "
            "interleaved steps; (b) restores the unused entries' values and moments after each step.",
            "",
            "| design | optimizer step (s) | optimizer state tensors after a full trajectory | its checkpoint (MB) |"
            " torch.save (s) |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, label in (
            ("a_per_entry_parameters", "(a) one 0-d parameter per entry (today)"),
            ("b_one_tensor_per_table_masked", "(b) one (T,) tensor per table, masked"),
        ):
            c = ckpt[key]
            lines.append(f"| {label} | {opt[key]:.3f} | {c['tensors']} | {c['bytes'] / 1e6:.1f} | {c['seconds']:.2f} |")
    for variant, table in result.get("profile", {}).items():
        lines += [
            "",
            f"## Profile of one `{variant}` student step ({result.get('profile_setting', 'plain')})",
            "",
            "```",
            table,
            "```",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
