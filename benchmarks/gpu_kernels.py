"""Speed of the Triton kernels on a CUDA GPU, against torch's own kernels, at SD1.5 / SDXL / Flux shapes.

One section function per kernel family, listed in ``SECTIONS``; each receives a [`Bench`] (device, shapes, timer,
result rows) and adds rows.  Sections:

* ``fake_quant``: the fused fake-quant kernels (forward, forward + backward) against the torch path of
  ``diffusers_qalora.quant.fake_quantize``, per tensor, per timestep (a batch whose samples have different step
  sizes) and per channel / per group (weights);
* ``int_gemm``: the integer GEMM (W8A8, W4A8 with packed int4 weights, with and without the activation quantization
  in front) against fp16 / bf16 ``torch.matmul`` and ``torch._int_mm`` (int8 x int8 -> int32, no epilogue);
  the implicit-GEMM integer convolution against fp16 ``F.conv2d``;
* ``unet_step``: one UNet2DConditionModel step (the SD1.5 config, random weights, batch 2, 64 x 64 latents, fp16):
  fp16 vs the fake-quant QALoRA model vs the exported integer model (Triton backend);
* ``attention``: the fused quantized-attention kernel (q/k/v, and q/k/v + softmax, 8-bit) against fp16
  ``F.scaled_dot_product_attention`` and against torch fake quantization + SDPA, at SD1.5 / SDXL / Flux shapes;
* ``winograd``: the fused integer Winograd kernels (F(4,3), F(6,3)) against cuDNN fp16 ``F.conv2d``, int8 im2col +
  ``torch._int_mm`` and the torch int8 Winograd, at the SD1.5 ResNet convolutions.

Timing: CUDA events around ``inner`` calls, every variant once per repeat in rotating order (interleaved), median over
repeats.  TFLOP/s = 2 M N K / time for GEMMs (the integer ones count integer operations).

    python benchmarks/gpu_kernels.py                      # every section; writes benchmarks/results/gpu_kernels.{json,md}
    python benchmarks/gpu_kernels.py --sections int_gemm --repeats 20
    python benchmarks/gpu_kernels.py --dry_run            # every section at tiny shapes on CPU under TRITON_INTERPRET=1,
                                                          # nothing written (checks the script's logic; CI runs it)

Without a CUDA GPU (and without ``--dry_run``) the script stops with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


# -- the harness -----------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What a section needs: where to run, how long to time, which shapes, and where results go.

    Args:
        device (`torch.device`): ``cuda`` for a real run, ``cpu`` for ``--dry_run``.
        dry_run (`bool`): tiny shapes, one repeat, the Triton interpreter on CPU tensors.
        repeats (`int`): timed repeats per variant (median reported).
        inner (`int`): calls per timed repeat.
    """

    device: torch.device
    dry_run: bool
    repeats: int = 10
    inner: int = 10
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kernels(self) -> str:
        """The kernel preference of the kernels under test: ``"triton"`` in a dry run (the interpreted kernels on CPU
        tensors), ``"auto"`` in a real run (Triton on CUDA)."""
        return "triton" if self.dry_run else "auto"

    @property
    def half(self) -> torch.dtype:
        return torch.float16

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time_once(self, fn: Callable[[], Any]) -> float:
        """Milliseconds per call over ``inner`` calls."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(self.inner):
                fn()
            end.record()
            self.sync()
            return start.elapsed_time(end) / self.inner
        t0 = time.perf_counter()
        for _ in range(self.inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / self.inner

    def time(self, variants: dict[str, Callable[[], Any]]) -> dict[str, float]:
        """Median milliseconds per call of each variant, timed interleaved (rotating order per repeat)."""
        names = list(variants)
        if not self.dry_run:
            for name in names:  # warm-up: compilation, autotuning, caches
                variants[name]()
            self.sync()
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(self.repeats):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                samples[name].append(self._time_once(variants[name]))
        return {n: statistics.median(v) for n, v in samples.items()}

    def add(
        self,
        section: str,
        case: str,
        variant: str,
        ms: float,
        flops: float | None = None,
        baseline_ms: float | None = None,
        **extra: Any,
    ) -> None:
        """Record one result row (``flops``: operations of one call, for TFLOP/s)."""
        row = {"section": section, "case": case, "variant": variant, "ms": ms}
        if flops is not None and ms > 0:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
        if baseline_ms is not None and ms > 0:
            row["speedup"] = baseline_ms / ms
        row.update(extra)
        self.rows.append(row)


def _shapes(bench: Bench, full: Sequence[Any], tiny: Sequence[Any]) -> Sequence[Any]:
    return tiny if bench.dry_run else full


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


# -- fake quantization -----------------------------------------------------------------------------------------------
# (model, case, activation shape) at batch 2 (classifier-free guidance), and weight shapes (C_out, C_in, kh, kw).
FAKE_QUANT_ACTS = [
    ("sd1.5", "resnet input 320 x 64 x 64", (2, 320, 64, 64)),
    ("sdxl", "resnet input 640 x 64 x 64", (2, 640, 64, 64)),
    ("flux", "tokens 4608 x 3072", (1, 4608, 3072)),
]
FAKE_QUANT_WEIGHTS = [
    ("sd1.5", "conv 1280 -> 1280, 3 x 3", (1280, 1280, 3, 3)),
    ("flux", "linear 3072 -> 12288", (12288, 3072)),
]
TINY_ACTS = [("tiny", "act", (2, 3, 5, 7))]
TINY_WEIGHTS = [("tiny", "weight", (6, 10, 3, 3))]


def bench_fake_quant(bench: Bench) -> None:
    """Fused fake-quant kernels vs ``quant.fake_quantize`` (torch), forward and forward + backward."""
    for model, case, shape in _shapes(bench, FAKE_QUANT_ACTS, TINY_ACTS):
        for granularity in ("tensor", "timestep"):
            _bench_activation(bench, f"{model}: {case}, per {granularity}, fp16", shape, granularity)
    for model, case, shape in _shapes(bench, FAKE_QUANT_WEIGHTS, TINY_WEIGHTS):
        _bench_weight(bench, f"{model}: {case}, per channel, fp32 (4-bit)", shape)


def _bench_activation(bench: Bench, label: str, shape: tuple[int, ...], granularity: str) -> None:
    from diffusers_qalora.kernels import fused_fake_quantize
    from diffusers_qalora.quant import fake_quantize

    dev = bench.device
    x = torch.randn(shape, device=dev, dtype=bench.half)
    xr = x.detach().requires_grad_()
    grad = torch.ones_like(x)
    # per timestep: every sample has its own (interpolated) step size, as in a batch of mixed timesteps
    n = 1 if granularity == "tensor" else shape[0]
    view = () if granularity == "tensor" else (-1,) + (1,) * (len(shape) - 1)
    step = torch.full((n,), 0.05, device=dev).reshape(view).requires_grad_()
    zp = torch.full((n,), 128.0, device=dev).reshape(view).requires_grad_()

    def torch_forward():  # what the quantizer modules do: float32 compute, cast back
        return fake_quantize(x.float(), step, zp, 0, 255).to(x.dtype)

    def torch_train():
        fake_quantize(xr.float(), step, zp, 0, 255).to(x.dtype).backward(grad)

    def kernel_train():
        fused_fake_quantize(xr, step, zp, 0, 255).backward(grad)

    with torch.no_grad():
        fwd = bench.time({"torch": torch_forward, "triton": lambda: fused_fake_quantize(x, step, zp, 0, 255)})
        # The compiled kernel must give the torch path's numbers (bit-identical, see docs/kernels.md).
        exact = torch.equal(fused_fake_quantize(x, step, zp, 0, 255), torch_forward())
    train = bench.time({"torch": torch_train, "triton": kernel_train})
    for variant, ms in fwd.items():
        bench.add(
            "fake_quant",
            label,
            f"{variant} forward",
            ms,
            baseline_ms=fwd["torch"],
            shape=list(shape),
            **({"equal_to_torch": exact} if variant == "triton" else {}),
        )
    for variant, ms in train.items():
        bench.add("fake_quant", label, f"{variant} forward+backward", ms, baseline_ms=train["torch"], shape=list(shape))


def _bench_weight(bench: Bench, label: str, shape: tuple[int, ...]) -> None:
    from diffusers_qalora.kernels import fused_fake_quantize
    from diffusers_qalora.quant import fake_quantize

    dev = bench.device
    w = torch.randn(shape, device=dev).reshape(shape[0], 1, -1).requires_grad_()  # the grouped view (C_out, 1, K)
    step = torch.full((shape[0], 1, 1), 0.01, device=dev, requires_grad=True)
    grad = torch.ones_like(w)
    train = bench.time(
        {
            "torch": lambda: fake_quantize(w, step, None, -8, 7).backward(grad),
            "triton": lambda: fused_fake_quantize(w, step, None, -8, 7).backward(grad),
        }
    )
    for variant, ms in train.items():
        bench.add("fake_quant", label, f"{variant} forward+backward", ms, baseline_ms=train["torch"], shape=list(shape))


# -- integer GEMM and convolution ------------------------------------------------------------------------------------
# (model, case, M, K, N): tokens x batch 2 for the UNets (CFG), batch 1 for Flux (4096 image + 512 text tokens).
GEMM_SHAPES = [
    ("sd1.5", "attention proj, 64 x 64 tokens, 320", 8192, 320, 320),
    ("sd1.5", "GEGLU in, 64 x 64 tokens, 320 -> 2560", 8192, 320, 2560),
    ("sd1.5", "FF out, 64 x 64 tokens, 1280 -> 320", 8192, 1280, 320),
    ("sd1.5", "attention proj, 16 x 16 tokens, 1280", 512, 1280, 1280),
    ("sdxl", "attention proj, 64 x 64 tokens, 640", 8192, 640, 640),
    ("sdxl", "GEGLU in, 32 x 32 tokens, 1280 -> 10240", 2048, 1280, 10240),
    ("flux", "attention proj, 4608 tokens, 3072", 4608, 3072, 3072),
    ("flux", "MLP in, 3072 -> 12288", 4608, 3072, 12288),
    ("flux", "MLP out, 12288 -> 3072", 4608, 12288, 3072),
]
TINY_GEMMS = [("tiny", "gemm", 24, 40, 36)]
# (model, case, (B, C_in, H, W), C_out): the 3 x 3 ResNet convolutions.
CONV_SHAPES = [
    ("sd1.5", "resnet conv 320, 64 x 64", (2, 320, 64, 64), 320),
    ("sd1.5", "resnet conv 1280, 16 x 16", (2, 1280, 16, 16), 1280),
    ("sdxl", "resnet conv 640, 64 x 64", (2, 640, 64, 64), 640),
]
TINY_CONVS = [("tiny", "conv", (2, 5, 6, 6), 7)]


def bench_int_gemm(bench: Bench) -> None:
    """Integer GEMM (W8A8, W4A8) and implicit-GEMM convolution vs fp16/bf16 matmul, ``torch._int_mm``, F.conv2d."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    for model, case, m, k, n in _shapes(bench, GEMM_SHAPES, TINY_GEMMS):
        _bench_gemm(bench, f"{model}: {case} (M={m}, K={k}, N={n})", m, k, n, gen)
    for model, case, shape, c_out in _shapes(bench, CONV_SHAPES, TINY_CONVS):
        _bench_conv(bench, f"{model}: {case} (x {tuple(shape)}, C_out={c_out})", shape, c_out, gen)


def _bench_gemm(bench: Bench, label: str, m: int, k: int, n: int, gen: torch.Generator) -> None:
    from diffusers_qalora.kernels import PackedWeight, int8_linear, int8_linear_reference, quantize_activation_codes

    dev = bench.device
    x16 = torch.randn(m, k, generator=gen).to(dev, bench.half)
    w16 = torch.randn(n, k, generator=gen).to(dev, bench.half)
    xb, wb = x16.bfloat16(), w16.bfloat16()
    a8 = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).to(dev)
    w_codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    w8 = PackedWeight.from_codes(w_codes.to(dev), 8, torch.full((n, 1), 0.01, device=dev))
    w4 = PackedWeight.from_codes((w_codes // 16).to(dev), 4, torch.full((n, 1), 0.1, device=dev))
    w8t = w_codes.to(dev).t()  # torch._int_mm takes (K, N)
    kernels = bench.kernels
    scale = torch.full((1,), 0.02, device=dev)
    zero_point = torch.zeros(1, device=dev)
    variants: dict[str, Callable[[], Any]] = {
        "torch fp16 matmul": lambda: x16 @ w16.t(),
        "torch bf16 matmul": lambda: xb @ wb.t(),
        "triton W8A8 (int8 codes in)": lambda: int8_linear(a8, scale, zero_point, w8, None, torch.float16, kernels),
        "triton W4A8 (int8 codes in)": lambda: int8_linear(a8, scale, zero_point, w4, None, torch.float16, kernels),
        "triton W8A8 + activation quantization": lambda: int8_linear(
            quantize_activation_codes(x16, scale, zero_point, -128, 127, kernels),
            scale,
            zero_point,
            w8,
            None,
            torch.float16,
            kernels,
        ),
    }
    if dev.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:  # torch._int_mm's shape constraints
        variants["torch._int_mm (no epilogue)"] = lambda: torch._int_mm(a8, w8t)
    times = bench.time(variants)
    errors = {  # the compiled kernels against the float64 reference (exact integer sums)
        "triton W8A8 (int8 codes in)": _relative_error(
            int8_linear(a8, scale, zero_point, w8, None, torch.float32, kernels),
            int8_linear_reference(a8, scale, zero_point, w8, None, torch.float32),
        ),
        "triton W4A8 (int8 codes in)": _relative_error(
            int8_linear(a8, scale, zero_point, w4, None, torch.float32, kernels),
            int8_linear_reference(a8, scale, zero_point, w4, None, torch.float32),
        ),
    }
    for variant, ms in times.items():
        extra = {"max_rel_error_vs_reference": errors[variant]} if variant in errors else {}
        bench.add(
            "int_gemm",
            label,
            variant,
            ms,
            flops=2.0 * m * n * k,
            baseline_ms=times["torch fp16 matmul"],
            shape={"M": m, "K": k, "N": n},
            **extra,
        )


def _bench_conv(bench: Bench, label: str, shape: tuple[int, int, int, int], c_out: int, gen: torch.Generator) -> None:
    from diffusers_qalora.kernels import PackedWeight, int8_conv2d, int8_conv2d_reference

    dev = bench.device
    b, c_in, h, w = shape
    x16 = torch.randn(shape, generator=gen).to(dev, bench.half)
    weight16 = torch.randn(c_out, c_in, 3, 3, generator=gen).to(dev, bench.half)
    codes = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8).to(dev)
    w_codes = torch.randint(-128, 128, (c_out, c_in * 9), generator=gen, dtype=torch.int8).to(dev)
    w8 = PackedWeight.from_codes(w_codes, 8, torch.full((c_out, 1), 0.01, device=dev))
    scale = torch.full((b,), 0.02, device=dev)
    zero_point = torch.zeros(b, device=dev)
    times = bench.time(
        {
            "torch fp16 conv2d": lambda: F.conv2d(x16, weight16, padding=1),
            "triton W8A8 implicit GEMM": lambda: int8_conv2d(
                codes, scale, zero_point, w8, (3, 3), 1, 1, 1, None, torch.float16, bench.kernels
            ),
        }
    )
    error = _relative_error(
        int8_conv2d(codes, scale, zero_point, w8, (3, 3), 1, 1, 1, kernel_preference=bench.kernels),
        int8_conv2d_reference(codes, scale, zero_point, w8, (3, 3), 1, 1, 1),
    )
    for variant, ms in times.items():
        extra = {"max_rel_error_vs_reference": error} if variant.startswith("triton") else {}
        bench.add(
            "int_gemm",
            label,
            variant,
            ms,
            flops=2.0 * b * h * w * c_out * c_in * 9,
            baseline_ms=times["torch fp16 conv2d"],
            shape={"x": list(shape), "C_out": c_out, "kernel": 3},
            **extra,
        )


# -- end-to-end UNet step --------------------------------------------------------------------------------------------
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
UNET_TABLE = [1.0, 251.0, 501.0, 751.0, 981.0]


def bench_unet_step(bench: Bench) -> None:
    """One denoiser call, batch 2 (CFG), 64 x 64 latents, 77 text tokens: fp16 vs fake-quant vs integer (W8A8, W4A8)."""
    import copy

    from diffusers import UNet2DConditionModel

    import diffusers_qalora as dq

    dev = bench.device
    config = TINY_UNET if bench.dry_run else SD15_UNET
    tokens, size = (5, 8) if bench.dry_run else (77, 64)
    torch.manual_seed(0)
    base = UNet2DConditionModel(**config).to(dev, bench.half).eval()
    gen = torch.Generator(device="cpu").manual_seed(1)
    sample = torch.randn(2, 4, size, size, generator=gen).to(dev, bench.half)
    text = torch.randn(2, tokens, config["cross_attention_dim"], generator=gen).to(dev, bench.half)
    t = torch.tensor([501.0, 501.0], device=dev)

    def call(model):
        with torch.no_grad():
            return model(sample, t, encoder_hidden_states=text).sample

    variants: dict[str, Callable[[], Any]] = {"fp16": lambda: call(base)}
    # The dry run quantizes a few layers only: the interpreter runs each kernel in Python.
    targets = (
        ["conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in"] if bench.dry_run else None
    )
    for bits in ((8, 8), (4, 8)):
        qmodel = dq.get_qalora_model(
            copy.deepcopy(base),
            dq.QALoraConfig(
                r=8,
                weight_bits=bits[0],
                act_bits=bits[1],
                timesteps=UNET_TABLE,
                weight_init="minmax",
                act_init="minmax",
                target_modules=targets,
                kernel_preference=bench.kernels,
            ),
        )
        dq.calibrate_activations(
            qmodel,
            lambda qmodel=qmodel: [
                qmodel(sample, torch.full((2,), tt, device=dev), encoder_hidden_states=text) for tt in UNET_TABLE[::2]
            ],
        )
        name = f"W{bits[0]}A{bits[1]}"
        variants[f"fake-quant {name}"] = lambda qmodel=qmodel: call(qmodel)
        integer = dq.export_quantized(copy.deepcopy(qmodel), kernel_preference="triton")
        variants[f"integer {name} (triton)"] = lambda integer=integer: call(integer)
    times = bench.time(variants)
    case = "UNet2DConditionModel (SD1.5 config), batch 2, 64 x 64 latents" if not bench.dry_run else "tiny UNet"
    for variant, ms in times.items():
        bench.add(
            "unet_step",
            case,
            variant,
            ms,
            baseline_ms=times["fp16"],
            shape={"sample": list(sample.shape), "encoder_hidden_states": list(text.shape)},
        )


# -- quantized attention (kernels-attn) ------------------------------------------------------------------------------
# (model, case, B, heads, query tokens, key tokens, head dim): batch 2 for the UNets (CFG), 1 for Flux.
ATTENTION_SHAPES = [
    ("sd1.5", "self-attention 64 x 64 latents", 2, 8, 4096, 4096, 40),
    ("sd1.5", "cross-attention 64 x 64 latents, 77 text tokens", 2, 8, 4096, 77, 40),
    ("sdxl", "self-attention 64 x 64 tokens, 640", 2, 10, 4096, 4096, 64),
    ("sdxl", "self-attention 32 x 32 tokens, 1280", 2, 20, 1024, 1024, 64),
    ("flux", "joint attention 4096 + 512 tokens", 1, 24, 4608, 4608, 128),
]
TINY_ATTENTION = [("tiny", "attention", 2, 2, 37, 45, 40)]


def bench_attention(bench: Bench) -> None:
    """The fused quantized-attention kernel vs ``F.scaled_dot_product_attention`` (fp16) and vs what runs without it
    (q/k/v fake-quantized by torch ops, then SDPA in fp16).  8-bit unsigned codes with a zero point, one step per
    sample; the softmax-quantized variant runs the kernel's two passes (TFLOP/s count the one-pass work)."""
    from diffusers_qalora.kernels.attention import QuantSpec, attention_codes_reference, quantized_attention

    dev = bench.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    for model, case, b, h, nq, nk, d in _shapes(bench, ATTENTION_SHAPES, TINY_ATTENTION):
        q, k, v = (
            torch.randn(b, t, h * d, generator=gen).to(dev, bench.half).view(b, t, h, d).transpose(1, 2)
            for t in (nq, nk, nk)
        )  # diffusers' (B, N, H, D) -> (B, H, N, D) views
        spec = QuantSpec(torch.full((b,), 0.03, device=dev), torch.full((b,), 128.0, device=dev), 0, 255)
        probs = QuantSpec(torch.full((b,), 1 / 255, device=dev), torch.zeros(b, device=dev), 0, 255)
        qkv = {"query_quant": spec, "key_quant": spec, "value_quant": spec}

        def fake(x, spec=spec):  # the torch path: codes, dequantize, cast back to fp16
            return (attention_codes_reference(x, spec) * spec.step.view(-1, 1, 1, 1)).to(x.dtype)

        variants = {
            "torch SDPA fp16": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            "torch fake-quant q/k/v + SDPA fp16": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                fake(q), fake(k), fake(v)
            ),
            "triton fused, no quantization": lambda q=q, k=k, v=v: quantized_attention(
                q, k, v, kernel_preference="triton"
            ),
            "triton fused, q/k/v 8-bit": lambda q=q, k=k, v=v, qkv=qkv: quantized_attention(
                q, k, v, kernel_preference="triton", **qkv
            ),
            "triton fused, q/k/v + softmax 8-bit": lambda q=q, k=k, v=v, qkv=qkv, probs=probs: quantized_attention(
                q, k, v, kernel_preference="triton", probs_quant=probs, **qkv
            ),
        }
        with torch.no_grad():
            times = bench.time(variants)
        flops = 4.0 * b * h * nq * nk * d
        for variant, ms in times.items():
            bench.add(
                "attention",
                f"{model}: {case} (B={b}, H={h}, N_q={nq}, N_k={nk}, D={d})",
                variant,
                ms,
                flops=flops,
                baseline_ms=times["torch SDPA fp16"],
            )


# -- Winograd (kernels-attn) -----------------------------------------------------------------------------------------
# (model, case, (B, C_in, H, W), C_out): the 3 x 3 ResNet convolutions of SD1.5 at 512 x 512 (64 x 64 latents).
WINOGRAD_SHAPES = [
    ("sd1.5", "resnet conv 320, 64 x 64", (2, 320, 64, 64), 320),
    ("sd1.5", "resnet conv 640, 32 x 32", (2, 640, 32, 32), 640),
    ("sd1.5", "resnet conv 1280, 16 x 16", (2, 1280, 16, 16), 1280),
    ("sd1.5", "resnet conv 1280, 8 x 8", (2, 1280, 8, 8), 1280),
]
TINY_WINOGRAD = [("tiny", "conv", (2, 16, 6, 7), 16)]


def bench_winograd(bench: Bench) -> None:
    """The fused integer Winograd kernels (F(4,3) and F(6,3), int8, groups of 32 input channels, per-position steps)
    vs cuDNN fp16 ``F.conv2d``, int8 im2col + ``torch._int_mm`` and the torch int8 Winograd on ``torch._int_mm``
    (`diffusers_qalora.winograd.intmm`).  TFLOP/s count the direct convolution's 2 * 9 * C_in * C_out per pixel."""
    from diffusers_qalora.kernels.winograd import pack_winograd_weight, winograd_int_conv2d_triton
    from diffusers_qalora.winograd import winograd_transforms
    from diffusers_qalora.winograd.functional import weight_transform
    from diffusers_qalora.winograd.intmm import Int8Im2colConv2d, Int8WinogradConv2d
    from diffusers_qalora.winograd.quantized import quantize_weight_codes

    dev = bench.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    for model, case, shape, c_out in _shapes(bench, WINOGRAD_SHAPES, TINY_WINOGRAD):
        b, c_in, h, w = shape
        group = 32 if c_in % 32 == 0 else None
        x16 = torch.randn(shape, generator=gen).to(dev, bench.half)
        weight = torch.randn(c_out, c_in, 3, 3, generator=gen) * 0.05
        bias = torch.zeros(c_out)
        w16 = weight.to(dev, bench.half)
        im2col = Int8Im2colConv2d(weight, bias).to(dev)
        intmm = Int8WinogradConv2d(weight, bias, tile=4, group_size=group).to(dev)
        variants: dict[str, Callable[[], Any]] = {
            "torch fp16 conv2d (cuDNN)": lambda x16=x16, w16=w16: F.conv2d(x16, w16, padding=1),
            "int8 im2col + torch._int_mm": lambda x16=x16, im2col=im2col: im2col(x16),
            "int8 Winograd F(4,3) on torch._int_mm": lambda x16=x16, intmm=intmm: intmm(x16),
        }
        for tile in (4, 6):
            t = winograd_transforms(tile)
            codes_u, step_u = quantize_weight_codes(weight_transform(weight.double(), t.G), 8, group)
            codes_u, step_u = codes_u.to(dev), step_u.to(dev)
            packed = pack_winograd_weight(codes_u, step_u)
            bt, at, bias_dev = t.BT.float().to(dev), t.AT.float().to(dev), bias.to(dev)
            variants[f"triton int8 Winograd F({tile},3)"] = (
                lambda x16=x16, codes_u=codes_u, step_u=step_u, bt=bt, at=at, bias_dev=bias_dev, packed=packed, group=group: (
                    winograd_int_conv2d_triton(
                        x16, codes_u, step_u, bt, at, bias_dev, 1, bits=8, group_size=group, packed=packed
                    )
                )
            )
        with torch.no_grad():
            times = bench.time(variants)
        flops = 2.0 * b * h * w * c_out * c_in * 9
        for variant, ms in times.items():
            bench.add(
                "winograd",
                f"{model}: {case} (x {tuple(shape)}, C_out={c_out}, group={group})",
                variant,
                ms,
                flops=flops,
                baseline_ms=times["torch fp16 conv2d (cuDNN)"],
            )


# -- registry, output, main ------------------------------------------------------------------------------------------
SECTIONS: list[tuple[str, Callable[[Bench], None]]] = [
    ("fake_quant", bench_fake_quant),
    ("int_gemm", bench_int_gemm),
    ("unet_step", bench_unet_step),
    ("attention", bench_attention),
    ("winograd", bench_winograd),
]


def versions() -> dict[str, Any]:
    """Library versions and the GPU this ran on."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed or broken: recorded as missing
        triton_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "capability": list(torch.cuda.get_device_capability(0)) if gpu else None,
    }


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], command: str) -> str:
    """One table per section: case, variant, milliseconds, TFLOP/s, speed-up over the section's baseline."""
    lines = [
        "# Triton kernels on the GPU",
        "",
        f"Command: `{command}`",
        "",
        f"GPU: {info['gpu']} (compute capability {info['capability']}); torch {info['torch']}, "
        f"triton {info['triton']}, CUDA {info['cuda']}.",
        "",
    ]
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [
            f"## {section}",
            "",
            "| case | variant | ms | TFLOP/s | speed-up | check |",
            "|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["section"] == section):
            tflops = f"{r['tflops']:.1f}" if "tflops" in r else "—"
            speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "—"
            check = "—"
            if "equal_to_torch" in r:
                check = "bit-identical" if r["equal_to_torch"] else "DIFFERS"
            elif "max_rel_error_vs_reference" in r:
                check = f"rel. err. {r['max_rel_error_vs_reference']:.1e}"
            lines.append(f"| {r['case']} | {r['variant']} | {r['ms']:.3f} | {tflops} | {speedup} | {check} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [name for name, _ in SECTIONS]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", choices=names, default=names, help="sections to run (default: all)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per variant (median reported)")
    parser.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="tiny shapes on CPU under TRITON_INTERPRET=1 (forces the Triton path); writes nothing",
    )
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.dry_run:
        # Must precede the first kernel build (the kernels are built lazily, at their first call).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
        bench = Bench(torch.device("cpu"), dry_run=True, repeats=1, inner=1)
    else:
        if not torch.cuda.is_available():
            sys.exit(
                "benchmarks/gpu_kernels.py measures CUDA kernels and found no CUDA GPU (torch.cuda.is_available() "
                "is False). Run it on a machine with an NVIDIA GPU and a CUDA build of torch (which brings "
                "triton), or pass --dry_run to check the script on CPU under the Triton interpreter."
            )
        bench = Bench(torch.device("cuda"), dry_run=False, repeats=args.repeats, inner=args.inner)
    # Each section asks for `bench.kernels`: the Triton path on CPU tensors in a dry run, the automatic choice
    # (Triton on CUDA) in a real run.
    for name, section in SECTIONS:
        if name in args.sections:
            print(f"[gpu_kernels] {name}", flush=True)
            section(bench)
    if args.dry_run:
        print(f"[gpu_kernels] dry run: {len(bench.rows)} rows, nothing written")
        return bench.rows
    info = versions()
    command = "python " + " ".join(
        [
            Path(sys.argv[0]).as_posix() if argv is None else "benchmarks/gpu_kernels.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "versions": info,
        "repeats": bench.repeats,
        "inner": bench.inner,
        "sections": args.sections,
        "rows": bench.rows,
    }
    (args.output_dir / "gpu_kernels.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.output_dir / "gpu_kernels.md").write_text(markdown(bench.rows, info, command) + "\n")
    print(markdown(bench.rows, info, command))
    return bench.rows


if __name__ == "__main__":
    main()
