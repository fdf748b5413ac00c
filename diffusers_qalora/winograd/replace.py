"""The model-level pass: replace every eligible convolution by a [WinogradConv2d][diffusers_qalora.WinogradConv2d] (or by the direct-convolution
baseline), tune the transform scales data-free, and report what was replaced and skipped.

Composition with QALoRA (a QALoRA ``Conv2d`` wraps an ``nn.Conv2d`` as ``base_layer``; recognised by its
interface, so this module does not import the tuner):

* the Winograd layer computes with the student's weight: ``Q_w(W0 + scaling B A)`` (``qalora_weight="quantized"``,
  what QALoRA's ``merge`` writes) or ``W0 + scaling B A`` (``"float"``); it then quantizes ``G w G^T`` itself;
* the QALoRA layer's activation quantizer (one step size per timestep, looked up through the model's timestep
  pre-hook) becomes the Winograd layer's ``input_quantizer`` (``qalora_act="keep"``): the spatial input is quantized
  exactly as the student was trained to see it, and then re-quantized per Winograd position and tile for the integer
  Hadamard stage.  ``"drop"`` removes it (only the Winograd-domain quantization remains).

The replaced QALoRA layers are no longer PEFT layers: ``adapters_disabled`` and adapter switching do not reach them,
and their state is saved by [save_winograd][diffusers_qalora.save_winograd], not by the adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..quant.kernel_preference import kernel_preference_of, set_kernel_preference
from .config import WinogradConfig
from .conv import _CONV_TYPES, WinogradConv2d, WinogradPrecisionWarning, WinogradWarning, winograd_ineligibility
from .direct import DirectQuantConv2d
from .tuning import scales_are_visible, sqnr_db, tune_scales_

REPLACEMENT_TYPES = (WinogradConv2d, DirectQuantConv2d)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# -- report --------------------------------------------------------------------------------------------------------


@dataclass
class LayerRecord:
    """What [apply_winograd][diffusers_qalora.apply_winograd] did to one module.

    Args:
        name (`str`): module name.
        in_channels, out_channels (`int`).
        source (`str`): ``"Conv2d"`` or ``"QALoRA Conv2d"`` (adapter ``adapter``).
        adapter (`str | None`): the QALoRA adapter whose weight was used.
        input_quantizer (`bool`): whether the layer got an ``input_quantizer``.
        sqnr_before, sqnr_after (`float | None`): SQNR (dB) of the quantized layer against its FP direct conv on the
            tuning inputs before and after tuning (equal when not tuned; ``None`` when not measured).
        tuned (`bool`): whether the scales were tuned.
        reverted (`bool`): whether tuning was undone because it lowered the SQNR.
        note (`str`): why a layer was not tuned, if it was asked to be.
        seconds (`float`): time spent measuring and tuning the layer.
    """

    name: str
    in_channels: int
    out_channels: int
    source: str = "Conv2d"
    adapter: str | None = None
    input_quantizer: bool = False
    sqnr_before: float | None = None
    sqnr_after: float | None = None
    tuned: bool = False
    reverted: bool = False
    note: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class WinogradReport:
    """The result of [apply_winograd][diffusers_qalora.apply_winograd] (or [load_winograd][diffusers_qalora.load_winograd]).

    Args:
        config ([WinogradConfig][diffusers_qalora.WinogradConfig]): the configuration used.
        replaced (`dict[str, LayerRecord]`): replaced modules by name, in model order.
        skipped (`dict[str, str]`): convolutions (and adapter-wrapped convolutions) left alone, with the reason.
        inputs (`str`): where the tuning / measurement inputs came from: ``"captured"`` (``calibration_run``),
            ``"random"`` or ``"none"``.
        seconds (`float`): wall time of the whole call.
    """

    config: WinogradConfig
    replaced: dict[str, LayerRecord] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    inputs: str = "none"
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "config": self.config.to_dict(),
            "replaced": {k: v.to_dict() for k, v in self.replaced.items()},
            "skipped": dict(self.skipped),
            "inputs": self.inputs,
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        """A short human-readable table."""
        kind = "direct" if self.config.algorithm == "direct" else f"F({self.config.tile},3)"
        lines = [f"{kind}: replaced {len(self.replaced)} module(s), skipped {len(self.skipped)}"]
        for name, rec in self.replaced.items():
            sq = ""
            if rec.sqnr_before is not None:
                sq = f"  SQNR {rec.sqnr_before:.1f} dB"
                if rec.tuned:
                    sq += f" -> {rec.sqnr_after:.1f} dB" + (" (reverted)" if rec.reverted else "")
            lines.append(f"  + {name} [{rec.in_channels}->{rec.out_channels}, {rec.source}]{sq}")
        for name, reason in self.skipped.items():
            lines.append(f"  - {name}: {reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# -- selection -----------------------------------------------------------------------------------------------------


def _matches(patterns: tuple[str, ...] | str | None, name: str) -> bool:
    # PEFT's rule (``check_target_module_exists``), which the QALoRA tuner calls; this package stays free of Hugging
    # Face imports, so it is restated here and tests/winograd checks that both agree.
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _qalora_base(module: nn.Module) -> nn.Module | None:
    """The wrapped layer of a QALoRA layer (recognised by its interface), else ``None``."""
    if all(
        hasattr(module, a)
        for a in ("get_base_layer", "merged_float_weight", "qal_act_quantizer", "active_qalora_adapter")
    ):
        return module.get_base_layer()
    return None


def _other_adapter_base(module: nn.Module) -> nn.Module | None:
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) and not isinstance(module, _CONV_TYPES) else None


@dataclass
class _Plan:
    name: str
    module: nn.Module
    conv: nn.Module
    qalora: bool


def _group_reason(config: WinogradConfig, conv: nn.Module) -> str | None:
    grouped = config.algorithm == "winograd" and config.bits is not None and config.group_size is not None
    if grouped and conv.in_channels % config.group_size:
        return f"group_size={config.group_size} does not divide in_channels={conv.in_channels}"
    return None


def _plan(model: nn.Module, config: WinogradConfig) -> tuple[list[_Plan], dict[str, str]]:
    """Which modules to replace and which convolutions to skip (and why); raises on explicit bad targets."""
    explicit = isinstance(config.target_modules, tuple)
    plans: list[_Plan] = []
    skipped: dict[str, str] = {}
    errors: list[str] = []
    matched: set[str] = set()
    inside: list[str] = []  # subtrees of wrappers and replacements: their children are not candidates
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        targeted = config.target_modules is None or _matches(config.target_modules, name)
        if explicit and targeted:
            matched.update(p for p in config.target_modules if name == p or name.endswith("." + p))
        if isinstance(module, REPLACEMENT_TYPES):
            inside.append(name + ".")
            skipped[name] = f"already a {type(module).__name__}"
            continue
        qbase = _qalora_base(module)
        other = _other_adapter_base(module) if qbase is None else None
        if qbase is not None or other is not None:
            inside.append(name + ".")
        conv = qbase if qbase is not None else (other if other is not None else module)
        if not isinstance(conv, _CONV_TYPES):
            if explicit and targeted:
                errors.append(f"`{name}` is a {type(module).__name__}, not a convolution")
            continue
        if _matches(config.exclude_modules, name):
            skipped[name] = "excluded by `exclude_modules`"
            continue
        if not targeted:
            skipped[name] = "not in `target_modules`"
            continue
        if other is not None:
            reason = f"wrapped by a {type(module).__name__} adapter layer (merge and unload that adapter first)"
        else:
            reason = winograd_ineligibility(conv) or _group_reason(config, conv)
        if reason is not None:
            if explicit:
                errors.append(f"`{name}` cannot be replaced: {reason}")
            skipped[name] = reason
            continue
        plans.append(_Plan(name, module, conv, qbase is not None))
    if explicit:
        missing = sorted(set(config.target_modules) - matched)
        if missing:
            errors.append(
                f"`target_modules` {missing} match no module of {type(model).__name__} (check the names with "
                "`[n for n, _ in model.named_modules()]`)"
            )
    if errors:
        raise ValueError("apply_winograd: " + "; ".join(errors) + ". Nothing was changed.")
    return plans, skipped


# -- building the replacements ---------------------------------------------------------------------------------------


def _qalora_parts(plan: _Plan, config: WinogradConfig) -> tuple[torch.Tensor, nn.Module | None, str | None]:
    """``(spatial weight, input quantizer or None, adapter)`` of a QALoRA layer."""
    layer = plan.module
    adapter = None if getattr(layer, "disable_adapters", False) else layer.active_qalora_adapter()
    base = plan.conv
    if adapter is None:
        return base.weight.detach(), None, None
    with torch.no_grad():  # a merged QALoRA layer keeps W0 as its base weight, so both work merged or not
        if config.qalora_weight == "quantized":
            weight = layer.quantized_weight(adapter)
        else:
            weight = layer.merged_float_weight(adapter)
    quantizer = None
    if config.qalora_act == "keep":
        quantizer = layer.qal_act_quantizer[adapter]
        if not bool(getattr(quantizer, "calibrated", True)):
            raise ValueError(
                f"apply_winograd: the activation quantizer of the QALoRA layer `{plan.name}` is not calibrated; run "
                "`diffusers_qalora.calibrate_activations` first, or pass `qalora_act='drop'`. Nothing was changed."
            )
    return weight.detach().to(base.weight.dtype), quantizer, adapter


def _build(plan: _Plan, config: WinogradConfig) -> tuple[nn.Module, LayerRecord]:
    conv = plan.conv
    record = LayerRecord(plan.name, conv.in_channels, conv.out_channels)
    layer_cls = DirectQuantConv2d if config.algorithm == "direct" else WinogradConv2d
    layer = layer_cls.from_conv2d(conv, config=config)
    if plan.qalora:
        weight, quantizer, adapter = _qalora_parts(plan, config)
        record.source, record.adapter = "QALoRA Conv2d", adapter
        layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if quantizer is not None:
            layer.input_quantizer = quantizer
            record.input_quantizer = True
        if adapter is not None:  # the kernels the adapter's config asked for (`QALoraConfig.kernel_preference`)
            set_kernel_preference(layer, kernel_preference_of(plan.module.qal_weight_quantizer[adapter]), recurse=False)
    return layer, record


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    old = model.get_submodule(name)
    model.set_submodule(name, new)
    return old


# -- capturing inputs ------------------------------------------------------------------------------------------------


class _InputRecorder:
    """Keeps a uniform random subset of ``capacity`` samples of every input batch it sees (reservoir sampling)."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.generator = generator
        self.samples: list[torch.Tensor] = []
        self.seen = 0
        self.shape: tuple[int, ...] | None = None
        self.other_shapes = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach()
        for sample in x:
            if self.shape is None:
                self.shape = tuple(sample.shape)
            if tuple(sample.shape) != self.shape:
                self.other_shapes += 1
                continue
            self.seen += 1
            if len(self.samples) < self.capacity:
                self.samples.append(sample.float().cpu().clone())
            else:
                j = int(torch.randint(self.seen, (1,), generator=self.generator))
                if j < self.capacity:
                    self.samples[j] = sample.float().cpu().clone()

    def tensor(self) -> torch.Tensor | None:
        return torch.stack(self.samples) if self.samples else None


def _capture_inputs(
    layers: dict[str, nn.Module], run: Callable[[], Any], config: WinogradConfig
) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(config.tune_seed)
    recorders = {name: _InputRecorder(config.tune_samples, generator) for name in layers}
    try:
        for name, layer in layers.items():
            layer._capture = recorders[name]
        with torch.no_grad():
            run()
    finally:
        for layer in layers.values():
            layer._capture = None
    return {name: rec.tensor() for name, rec in recorders.items()}


# -- measuring and tuning --------------------------------------------------------------------------------------------


def _measure(layer: nn.Module, x: torch.Tensor, batch: int = 64) -> float:
    """SQNR (dB) of ``layer.forward_core`` against its FP direct conv over all of ``x`` (in chunks)."""
    sig = err = 0.0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb = x[start : start + batch].to(layer.weight.device)
            ref = layer.reference_forward(xb).double()
            out = layer.forward_core(xb).double()
            sig += float(ref.pow(2).sum())
            err += float((ref - out).pow(2).sum())
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(sig / err) if sig > 0 else -math.inf


def _random_inputs(layer: nn.Module, config: WinogradConfig, count: int, generator: torch.Generator) -> torch.Tensor:
    size = config.tune_input_size
    dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
    return torch.randn(count, layer.in_channels, size, size, generator=generator, dtype=dtype)


def _tune_layer(
    layer: nn.Module,
    record: LayerRecord,
    inputs: torch.Tensor | None,
    config: WinogradConfig,
    generator: torch.Generator,
    random_source: bool,
) -> None:
    start = time.perf_counter()
    if inputs is None and random_source:
        inputs = _random_inputs(layer, config, max(config.tune_batch_size, 8), generator)
    if inputs is None:
        record.note = "no input reached this layer during `calibration_run`"
        return
    device = layer.weight.device
    record.sqnr_before = record.sqnr_after = _measure(layer, inputs)
    wants_tuning = config.tune_steps > 0 and isinstance(layer, WinogradConv2d)
    if wants_tuning and not scales_are_visible(layer):
        record.note = "scales are invisible (per-position groups, float output transform): nothing to tune"
        wants_tuning = False
    if wants_tuning:
        batch = min(config.tune_batch_size, inputs.shape[0]) if not random_source else config.tune_batch_size

        def draw() -> torch.Tensor:
            if random_source:
                return _random_inputs(layer, config, batch, generator).to(device)
            idx = torch.randperm(inputs.shape[0], generator=generator)[:batch]
            return inputs[idx].to(device)

        initial = {k: v.detach().clone() for k, v in layer.scales.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WinogradWarning)
            tune_scales_(
                layer,
                steps=config.tune_steps,
                lr=config.tune_lr,
                inputs=draw,
                loss=config.tune_loss,
                eval_inputs=inputs[:1].to(device),
                keep_best=False,
            )
        after = _measure(layer, inputs)
        if after < record.sqnr_before:  # keep the better of the two, judged on all the inputs
            layer.scales.load_state_dict(initial)
            layer.clear_cache()
            record.reverted = True
            after = record.sqnr_before
        record.tuned = True
        record.sqnr_after = after
    record.seconds = time.perf_counter() - start


# -- the public entry point --------------------------------------------------------------------------------------------


def apply_winograd(
    model: nn.Module,
    config: WinogradConfig | None = None,
    calibration_run: Callable[[], Any] | None = None,
) -> WinogradReport:
    """Replace every eligible convolution of ``model`` in place by a [WinogradConv2d][diffusers_qalora.WinogradConv2d] and report what happened.

    Eligible: 3x3, stride 1, dilation 1, groups 1, zero padding (see `winograd_ineligibility`), and ``group_size``
    dividing ``in_channels``; a QALoRA ``Conv2d`` is eligible when its base layer is (see the module docstring for the
    composition).  Everything else is left alone and listed in ``report.skipped`` with the reason.  Naming an
    ineligible module in ``config.target_modules`` raises a ``ValueError`` that says why, before anything changes.

    With ``config.algorithm="direct"`` the same modules become [DirectQuantConv2d][diffusers_qalora.DirectQuantConv2d] instead: the W/A-quantized
    direct-convolution baseline.

    **Data-free tuning** (``config.tune_steps > 0``): each replaced layer's transform scales are tuned with
    [tune_scales_][diffusers_qalora.tune_scales_] against the layer's own FP direct convolution.  Inputs: when ``calibration_run`` is given, it is
    called once (e.g. ``lambda: pipe(labels, num_inference_steps=20)``: a few full-precision trajectories) while every
    replaced layer computes its FP direct convolution and records a random subset of ``config.tune_samples`` of its
    real inputs; otherwise N(0, 1) inputs of side ``config.tune_input_size``.  The per-layer SQNR before and after
    tuning is measured on those inputs (also when ``tune_steps=0`` but ``calibration_run`` is given).

    Args:
        model (`torch.nn.Module`): e.g. ``pipe.unet``; modified in place.
        config ([WinogradConfig][diffusers_qalora.WinogradConfig], *optional*): defaults to ``WinogradConfig()`` (F(4,3), 8 bits).  Copied.
        calibration_run (`Callable[[], Any]`, *optional*): runs the model on representative inputs (see above).

    Returns:
        [WinogradReport][diffusers_qalora.WinogradReport]: replaced modules (with their SQNR) and skipped convolutions (with the reason).

    Raises:
        TypeError: wrong argument types.
        ValueError: explicit targets that do not exist or cannot be replaced, an uncalibrated QALoRA activation
            quantizer, or no eligible convolution at all.  The model is unchanged; likewise if ``calibration_run``
            or tuning raises (the original modules are put back).

    Example:

    ```py
    >>> import diffusers_qalora as dq
    >>> report = dq.apply_winograd(pipe.unet, dq.WinogradConfig(tile=4, bits=8, group_size=32))
    >>> print(report.summary())
    ```
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (e.g. pipe.unet), got {type(model).__name__}.")
    if isinstance(model, _CONV_TYPES):
        raise TypeError("`model` is a single convolution; use `WinogradConv2d.from_conv2d(conv, ...)` instead.")
    config = WinogradConfig() if config is None else config
    if not isinstance(config, WinogradConfig):
        raise TypeError(f"`config` must be a WinogradConfig, got {type(config).__name__}.")
    if calibration_run is not None and not callable(calibration_run):
        raise TypeError(f"`calibration_run` must be a callable, got {type(calibration_run).__name__}.")
    config = copy.deepcopy(config)

    plans, skipped = _plan(model, config)
    if not plans:
        raise ValueError(
            f"apply_winograd found no eligible convolution in {type(model).__name__} "
            f"(skipped: {dict(list(skipped.items())[:5])})."
        )
    built = [_build(plan, config) for plan in plans]  # may raise: nothing has changed yet
    if config.algorithm == "winograd" and config.tile == 6 and config.bits is None:
        low = sorted({str(layer.weight.dtype) for layer, _ in built if layer.weight.dtype in _LOW_PRECISION})
        if low:
            warnings.warn(
                f"F(6,3) Winograd with weights in {', '.join(low)} loses precision (about 42 dB SQNR in fp16 against "
                "~100 dB in fp32); use tile=4, or keep these layers in float32.",
                WinogradPrecisionWarning,
                stacklevel=2,
            )
    report = WinogradReport(config=config, skipped=skipped)
    originals: list[tuple[str, nn.Module]] = []
    try:
        for plan, (layer, record) in zip(plans, built):
            originals.append((plan.name, _swap(model, plan.name, layer)))
            report.replaced[plan.name] = record
        layers = {plan.name: layer for plan, (layer, _) in zip(plans, built)}
        measure = calibration_run is not None or config.tune_steps > 0
        if measure:
            generator = torch.Generator().manual_seed(config.tune_seed)
            captured: dict[str, torch.Tensor | None] = {}
            if calibration_run is not None:
                captured = _capture_inputs(layers, calibration_run, config)
                report.inputs = "captured"
            else:
                report.inputs = "random"
            for name, layer in layers.items():
                _tune_layer(
                    layer,
                    report.replaced[name],
                    captured.get(name),
                    config,
                    generator,
                    random_source=calibration_run is None,
                )
    except BaseException:
        for name, old in reversed(originals):
            _swap(model, name, old)
        raise
    report.seconds = time.perf_counter() - start
    return report


def winograd_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The [WinogradConv2d][diffusers_qalora.WinogradConv2d] and [DirectQuantConv2d][diffusers_qalora.DirectQuantConv2d] modules of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, REPLACEMENT_TYPES)}


def set_quant_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set ``quant_mode`` (``"fp"``, ``"int"``; ``"fake"`` for Winograd layers) on every replaced layer of ``model``."""
    layers = winograd_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Winograd (or direct baseline) layer; call apply_winograd.")
    for layer in layers.values():
        layer.quant_mode = mode if not (mode == "fake" and isinstance(layer, DirectQuantConv2d)) else "int"
    return model


__all__ = [
    "REPLACEMENT_TYPES",
    "LayerRecord",
    "WinogradReport",
    "apply_winograd",
    "set_quant_mode",
    "sqnr_db",
    "winograd_modules",
]
