"""Model-level entry points: inject, calibrate, build optimizer groups, toggle the teacher."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import inject_adapter_in_model
from torch import nn

from ...quant import ScaleAwareEntry, ScaleAwareGroups, TimestepHook, scale_aware_param_groups
from ...quant.quantizers import TIMESTEP_CONTEXT_ATTR, detach_timestep_context
from ...quant.scale_aware import DEFAULT_ACT_STEP_LR, DEFAULT_LORA_LR, DEFAULT_WEIGHT_STEP_LR
from .config import QALoraConfig, QALoraPeftType
from .layer import QALoraLayer
from .model import eligible_module_names, qalora_layers
from .sampling import is_flow_matching, trajectory_sampler


def timestep_table(
    scheduler: Any, num_inference_steps: int, *, height: int | None = None, width: int | None = None
) -> list[float]:
    """The sorted timesteps a pipeline's denoiser receives in ``num_inference_steps`` steps, for
    ``QALoraConfig(timesteps=...)``, in the denoiser's own units: with the table equal to the distillation schedule,
    every trained timestep has its own entry, and shorter schedules of the same spacing are interpolated.

    Args:
        scheduler: the pipeline's scheduler, or the pipeline itself.  Flow-matching pipelines set their schedule in
            ``__call__``: pass the pipeline for Flux (its sigmas depend on the image size and its transformer sees
            ``t / 1000``, so the table lies in ``[0, 1]``) and for any scheduler with ``use_dynamic_shifting``.  SD3's
            static-shift schedule is the same either way.
        num_inference_steps (`int`): the number of sampling steps.
        height (`int`, *optional*): image height in pixels of a flow-matching pipeline (default: its default
            size); the table of Flux depends on the image size.
        width (`int`, *optional*): image width in pixels (default: the pipeline's).

    The scheduler and the pipeline are not modified.
    """
    pipeline_scheduler = getattr(scheduler, "scheduler", None)
    if is_flow_matching(pipeline_scheduler if pipeline_scheduler is not None else scheduler):
        values = trajectory_sampler(scheduler, num_inference_steps, height=height, width=width).model_timesteps
    else:
        scheduler = copy.deepcopy(pipeline_scheduler if pipeline_scheduler is not None else scheduler)
        scheduler.set_timesteps(num_inference_steps)
        values = scheduler.timesteps
    return sorted({float(t) for t in values.tolist()})


def get_qalora_model(model: nn.Module, config: QALoraConfig, adapter_name: str = "default") -> nn.Module:
    """Inject QALoRA into a diffusers denoiser in place and return it (same object, same class).

    The returned model is a drop-in for ``pipe.unet`` / ``pipe.transformer``: ``model.config`` still reads and the
    pipeline still runs.  Weight step sizes are initialised from the weights (``config.weight_init``); activation step
    sizes must be calibrated with [calibrate_activations][diffusers_qalora.calibrate_activations] before the first quantized forward pass.

    Args:
        model (`torch.nn.Module`): the denoiser (``UNet2DModel``, ``UNet2DConditionModel``, ``SD3Transformer2DModel``,
            ``FluxTransformer2DModel``, ...).
        config (`QALoraConfig`): the method's configuration (it is copied, never modified).
        adapter_name (`str`, defaults to `"default"`): the name of the adapter.

    Raises:
        TypeError: for a wrong model or config type.
        ValueError: for targets that do not exist or cannot be wrapped, or an adapter name in use.  On any error the
            model is left as it was.

    Example:

    ```py
    >>> import diffusers_qalora as dq
    >>> unet = dq.get_qalora_model(pipe.unet, dq.QALoraConfig(weight_bits=4, act_bits=4))
    >>> dq.calibrate_activations(unet, lambda: pipe(prompt, num_inference_steps=100))
    ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module (e.g. pipe.unet), got {type(model).__name__}.")
    if not isinstance(config, QALoraConfig):
        raise TypeError(f"`config` must be a diffusers_qalora.QALoraConfig, got {type(config).__name__}.")
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"`adapter_name` {adapter_name!r} is already used by this model; choose another name.")
    config = copy.deepcopy(config)
    TimestepHook(None, model.forward, config.timestep_argument)  # validates the timestep argument up front
    eligible_module_names(model, config)  # validates the targets up front
    return inject_qalora_adapter(model, config, adapter_name)


def inject_qalora_adapter(
    model: nn.Module, config: QALoraConfig, adapter_name: str, state_dict: dict | None = None
) -> nn.Module:
    """``peft.inject_adapter_in_model`` for QALoRA, without validation (see [get_qalora_model][diffusers_qalora.get_qalora_model]
    for the checked entry point); on any error the model is restored as it was."""
    with restore_on_error(model, adapter_name), warnings.catch_warnings():
        # PEFT warns whenever a second adapter is added; several QALoRA adapters on one model are supported.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        return inject_adapter_in_model(config, model, adapter_name, state_dict=state_dict)


@contextmanager
def restore_on_error(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """If the block raises, undo what it did to ``model`` for adapter ``adapter_name``: new QALoRA layers are replaced
    by their base layers, the adapter is deleted from layers that existed before, and ``peft_config``, the timestep
    hook and the attention processors are restored.  The exception is re-raised."""
    before = {name: m for name, m in model.named_modules()}
    had_peft_config = hasattr(model, "peft_config")
    old_peft_config = dict(model.peft_config) if had_peft_config else None
    had_context = getattr(model, TIMESTEP_CONTEXT_ATTR, None) is not None
    had_flag = vars(model).get("_hf_peft_config_loaded")
    try:
        yield
    except BaseException:
        _rollback(model, before, adapter_name, had_peft_config, old_peft_config, had_context)
        if had_flag is None:
            vars(model).pop("_hf_peft_config_loaded", None)
        else:
            model._hf_peft_config_loaded = had_flag
        raise


def _rollback(model, before, adapter_name, had_peft_config, old_peft_config, had_context) -> None:
    for name, module in list(model.named_modules()):
        if not isinstance(module, QALoraLayer):
            continue
        if before.get(name) is module:
            if adapter_name in module.qal_weight_quantizer:
                module.delete_adapter(adapter_name)
            continue
        model.set_submodule(name, module.base_layer)
    from .attention import restore_attention_processors

    restore_attention_processors(model)  # attention modules left without quantizers get their default processor
    if had_peft_config:
        model.peft_config = old_peft_config
    elif hasattr(model, "peft_config"):
        del model.peft_config
    if not had_context:
        detach_timestep_context(model)


def remove_qalora(model: nn.Module) -> nn.Module:
    """Undo [`get_qalora_model`]: put every original layer back, remove the timestep hook and the QALoRA entries of
    ``model.peft_config``.  Other adapters (e.g. a style LoRA added with ``add_adapter``) keep their layers and
    their config entries; a style LoRA that wrapped a QALoRA layer now wraps the original layer.  Merged QALoRA
    layers need no unmerge: their base weight is the original one."""
    configs = getattr(model, "peft_config", None)
    qalora_names = {name for name, config in (configs or {}).items() if _is_qalora_config(config)}
    for name, module in list(model.named_modules()):
        if isinstance(module, QALoraLayer):
            model.set_submodule(name, module.get_base_layer())
    from .attention import restore_attention_processors

    restore_attention_processors(model)  # attention modules left without quantizers get their default processor
    for name in qalora_names:
        del configs[name]
    if configs is not None and not configs and "peft_config" in vars(model):
        del model.peft_config
        if getattr(model, "_hf_peft_config_loaded", False):
            model._hf_peft_config_loaded = False
    detach_timestep_context(model)
    return model


def _is_qalora_config(config: Any) -> bool:
    return isinstance(config, QALoraConfig) or getattr(config, "peft_type", None) == QALoraPeftType.QALORA


def _layer_act_quantizers(layer: QALoraLayer, adapter: str) -> list:
    """The temporal activation quantizers of ``adapter`` in ``layer``: its input quantizer and, on attention
    projections of adapters with ``quantize_attention``, the q/k/v output and softmax quantizers."""
    found = [layer.qal_act_quantizer[adapter]]
    for quantizers in (layer.qal_out_quantizer, layer.qal_prob_quantizer):
        if adapter in quantizers:
            found.append(quantizers[adapter])
    return found


@contextmanager
def calibrating(model: nn.Module, method: str | None = None) -> Iterator[None]:
    """Inside the block, the model runs in full precision and every activation quantizer records its inputs per
    timestep; on a clean exit the step sizes (and zero points) are set from what was seen.  On an exception nothing
    is changed.

    Args:
        method (`str`, *optional*): ``"minmax"``, ``"mse"`` or ``"lp"``; defaults to each adapter's ``act_init``.
    """
    layers = list(qalora_layers(model).values())
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QALoRA layer; call get_qalora_model first.")
    configs = getattr(model, "peft_config", {})
    quantizers = []
    for layer in layers:
        adapter = layer.active_qalora_adapter()
        if adapter is None:
            continue
        chosen = method or getattr(configs.get(adapter), "act_init", "lp")
        for quantizer in _layer_act_quantizers(layer, adapter):
            quantizer.start_calibration(chosen)
            quantizers.append(quantizer)
        layer._calibrating = True
    ok = False
    try:
        with torch.no_grad():
            yield
        ok = True
    finally:
        for layer in layers:
            layer._calibrating = False
        for quantizer in quantizers:
            if ok:
                quantizer.finish_calibration()
            else:
                quantizer.cancel_calibration()


def calibrate_activations(model: nn.Module, run: Callable[[], Any], method: str | None = None) -> nn.Module:
    """Calibrate every activation step size per timestep by running ``run()`` (e.g. a pipeline call that samples a
    few trajectories with the model) in full precision.  See [calibrating][diffusers_qalora.calibrating]."""
    if not callable(run):
        raise TypeError(f"`run` must be a callable that samples with the model, got {type(run).__name__}.")
    with calibrating(model, method):
        run()
    return model


def copy_activation_calibration(model: nn.Module, source: str, target: str) -> nn.Module:
    """Calibrate adapter ``target`` from the calibrated adapter ``source`` of the same model (same activation bits and
    symmetry) without running the model again: calibration observes the full-precision model, so both would see the
    same inputs.  See `diffusers_qalora.quant.quantizers.copy_calibration_` for tables that differ."""
    from ...quant.quantizers import copy_calibration_

    layers = [layer for layer in qalora_layers(model).values() if target in layer.qal_act_quantizer]
    if not layers:
        raise ValueError(f"no QALoRA adapter named {target!r} in {type(model).__name__}.")
    pairs = []
    for layer in layers:
        if source not in layer.qal_act_quantizer:
            raise ValueError(f"adapter {source!r} does not cover layer {layer.qal_act_quantizer[target].name!r}.")
        targets, sources = _layer_act_quantizers(layer, target), _layer_act_quantizers(layer, source)
        if len(targets) > len(sources):
            raise ValueError(
                f"adapter {target!r} quantizes the attention of {targets[1].name!r} but {source!r} does not; "
                f"calibrate {target!r} with calibrate_activations instead."
            )
        pairs += zip(targets, sources)
    for dst, src in pairs:
        copy_calibration_(dst, src)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the full-precision teacher inside the block: every QALoRA layer calls its base layer."""
    layers = list(qalora_layers(model).values())
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, prev in zip(layers, previous):
            layer._disable_adapters = prev


def mean_weight_step(layer: QALoraLayer, adapter: str) -> float:
    """The layer's mean weight step size ``s̄`` (scale-aware optimization)."""
    return float(layer.qal_weight_quantizer[adapter].step.detach().abs().mean())


def get_qalora_param_groups(
    model: nn.Module,
    lora_lr: float = DEFAULT_LORA_LR,
    weight_step_lr: float = DEFAULT_WEIGHT_STEP_LR,
    act_step_lr: float = DEFAULT_ACT_STEP_LR,
    scale_aware: str = "lr",
    weight_decay: float = 0.0,
) -> ScaleAwareGroups:
    """Optimizer parameter groups for the trainable QALoRA state of the active adapter.

    * LoRA factors: per-layer learning rate ``lora_lr * s̄_l / mean(s̄)`` (``scale_aware="lr"``, see
      `diffusers_qalora.quant.scale_aware`), gradient multipliers (``"grad"``) or one rate (``"none"``);
    * weight step sizes: ``weight_step_lr`` (default 1e-5; EfficientDM: 1e-6), no weight decay;
    * activation step sizes and zero points (the q/k/v and softmax ones of ``quantize_attention`` too):
      ``act_step_lr`` (default 1e-4; EfficientDM: 5e-4), no weight decay.  Only the
      current timestep's entries receive a gradient, and optimizers skip parameters whose gradient is ``None``, so
      inactive timesteps stay bit-identical (zero the gradients with ``set_to_none=True``, PyTorch's default).

    Returns:
        [`ScaleAwareGroups`]: a list of parameter-group dicts (each with a ``"name"``), which ``torch.optim`` takes as
        it is: ``torch.optim.AdamW(get_qalora_param_groups(model))``.  With ``scale_aware="grad"`` the gradient
        multipliers are hooks on the LoRA factors, kept in ``groups.hooks``: call ``groups.remove_hooks()`` when
        training is done.
    """
    entries, weight_steps, act_steps = [], [], []
    for name, layer in qalora_layers(model).items():
        adapter = layer.active_qalora_adapter()
        if adapter is None:
            continue
        if adapter in layer.qal_A and layer.qal_A[adapter].requires_grad:
            entries.append(
                ScaleAwareEntry(name, [layer.qal_A[adapter], layer.qal_B[adapter]], mean_weight_step(layer, adapter))
            )
        weight_steps += [p for p in layer.qal_weight_quantizer[adapter].parameters() if p.requires_grad]
        act_steps += [p for q in _layer_act_quantizers(layer, adapter) for p in q.parameters() if p.requires_grad]
    groups = scale_aware_param_groups(entries, lora_lr, scale_aware, weight_decay)
    if weight_steps:
        groups.append({"params": weight_steps, "lr": weight_step_lr, "weight_decay": 0.0, "name": "weight_steps"})
    if act_steps:
        groups.append({"params": act_steps, "lr": act_step_lr, "weight_decay": 0.0, "name": "act_steps"})
    if not groups:
        raise ValueError("no trainable QALoRA parameter found; is an adapter active and not in inference mode?")
    return groups


def set_qalora_adapter(model: nn.Module, adapter_name: str, trainable: bool = False) -> nn.Module:
    """Make ``adapter_name`` the active QALoRA adapter of every layer that has it (frozen unless ``trainable``)."""
    layers = qalora_layers(model)
    if not any(adapter_name in layer.qal_weight_quantizer for layer in layers.values()):
        names = sorted({a for layer in layers.values() for a in layer.qal_weight_quantizer})
        raise ValueError(f"no QALoRA adapter named {adapter_name!r}; the model has {names}.")
    for layer in layers.values():
        layer.set_adapter(adapter_name, inference_mode=not trainable)
    return model
