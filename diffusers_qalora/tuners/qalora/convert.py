"""From a (distilled) QALoRA model to integer layers: the LoRA update is merged into the integer weight codes.

Each QALoRA ``Linear``/``Conv2d`` (the 8-bit first and last layers included) becomes an [IntegerLinear][diffusers_qalora.IntegerLinear] /
[IntegerConv2d][diffusers_qalora.IntegerConv2d] holding ``Q_w(W0 + scaling * B @ A)`` as codes, the weight step sizes, the bias and the activation
step-size table (none for dynamic activations) and, on the attention projections of an adapter trained with
``quantize_attention``, the attention's step-size tables.  The QALoRA tensors (LoRA factors, quantizer parameters, the
original float weight) are gone.
"""

from __future__ import annotations

import copy

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...export.context import attach_integer_context
from ...export.layout import IntegerLayout
from ...export.modules import IntegerConv2d, IntegerLayer, IntegerLinear
from ...quant import DynamicActQuantizer, PerChannel, PerGroup, PerTensor, set_kernel_preference
from ...quant.kernel_preference import validate_kernel_preference
from .layer import QALoraLayer
from .model import active_qalora_adapter, qalora_layers

__all__ = ["convert_qalora_to_integer"]


def _weight_scale(layer: QALoraLayer, adapter: str, name: str) -> tuple[torch.Tensor, int | None]:
    wq = layer.qal_weight_quantizer[adapter]
    weight = layer.get_base_layer().weight
    step = wq.step.detach().float()  # (C_out or 1, G, 1)
    gran = wq.granularity
    if isinstance(gran, PerTensor):
        return step.reshape(1, 1).expand(weight.shape[0], 1).contiguous(), None
    if isinstance(gran, PerChannel):
        return step.reshape(weight.shape[0], 1), None
    if isinstance(gran, PerGroup):
        return step.reshape(weight.shape[0], -1), gran.group_size
    raise NotImplementedError(f"`{name}`: weight granularity {gran!r} cannot be exported.")  # pragma: no cover


def _check_layer(layer: QALoraLayer, adapter: str, name: str) -> None:
    if adapter not in layer.qal_weight_quantizer:
        raise ValueError(f"`{name}` has no QALoRA adapter {adapter!r}; every quantized layer needs the same adapter.")
    if layer.merged:
        raise ValueError(f"`{name}` has a merged adapter; call `model.unmerge_adapter()` (or unmerge()) before export.")
    wq = layer.qal_weight_quantizer[adapter]
    if not wq.symmetric:
        raise NotImplementedError(
            f"`{name}`: asymmetric weights (weight_symmetric=False) have no integer kernel; export needs "
            f"QALoraConfig(weight_symmetric=True), the default."
        )
    for quantizers in (layer.qal_out_quantizer, layer.qal_prob_quantizer):
        if adapter in quantizers and not bool(quantizers[adapter].calibrated):
            raise ValueError(
                f"`{name}`: the attention step sizes of adapter {adapter!r} are not calibrated; run "
                f"diffusers_qalora.calibrate_activations(model, ...) before export."
            )
    aq = layer.qal_act_quantizer[adapter]
    if not bool(aq.calibrated):
        raise ValueError(
            f"`{name}`: activation step sizes are not calibrated; run diffusers_qalora.calibrate_activations(model, "
            f"...) (or load a calibrated adapter) before export."
        )
    if not aq.enabled:
        raise ValueError(f"`{name}`: its activation quantizer is disabled; integer layers need quantized inputs.")
    base = layer.get_base_layer()
    if isinstance(base, nn.Conv2d) and base.groups != 1:  # pragma: no cover - the tuner refuses these already
        raise NotImplementedError(f"`{name}`: Conv2d with groups={base.groups} cannot be exported.")


def _attention_layout(layer: QALoraLayer, adapter: str) -> dict:
    """The layout fields of the attention step sizes a ``to_q``/``to_k``/``to_v`` projection carries."""
    fields = {}
    if adapter in layer.qal_out_quantizer:
        q = layer.qal_out_quantizer[adapter]
        fields.update(output_bits=q.bits, output_signed=q.symmetric, output_timesteps=len(q.step))
    if adapter in layer.qal_prob_quantizer:
        q = layer.qal_prob_quantizer[adapter]
        fields.update(prob_bits=q.bits, prob_timesteps=len(q.step))
    return fields


@torch.no_grad()
def _build_integer_layer(layer: QALoraLayer, adapter: str, name: str) -> IntegerLayer:
    _check_layer(layer, adapter, name)
    base = layer.get_base_layer()
    wq = layer.qal_weight_quantizer[adapter]
    aq = layer.qal_act_quantizer[adapter]
    weight_scale, group_size = _weight_scale(layer, adapter, name)
    dynamic = isinstance(aq, DynamicActQuantizer)
    layout = IntegerLayout(
        kind="linear" if isinstance(base, nn.Linear) else "conv2d",
        weight_bits=wq.bits,
        act_bits=aq.bits,
        act_signed=aq.symmetric,
        group_size=group_size,
        num_timesteps=1 if dynamic else len(aq.step),
        act_granularity=("token" if aq.group_size is None else "group") if dynamic else "tensor",
        act_group_size=aq.group_size if dynamic else None,
        **_attention_layout(layer, adapter),
    )
    device = base.weight.device
    if isinstance(base, nn.Linear):
        new = IntegerLinear.from_linear(base, layout, device=device)
    else:
        new = IntegerConv2d.from_conv2d(base, layout, device=device)
    new.name = name
    codes = layer.integer_weight(adapter)
    for table, quantizers in (("out", layer.qal_out_quantizer), ("prob", layer.qal_prob_quantizer)):
        if adapter in quantizers:
            q = quantizers[adapter]
            zero_point = q.zero_point.stacked() if q.zero_point is not None else torch.zeros(len(q.step))
            new.load_attention_table_(table, q.timesteps, q.step.stacked(), zero_point)
    if dynamic:
        new.load_codes_(codes, weight_scale, base.bias)
        return new
    zero_point = aq.zero_point.stacked() if aq.zero_point is not None else torch.zeros(len(aq.step))
    new.load_codes_(
        codes,
        weight_scale,
        base.bias,
        aq.timesteps,
        aq.step.stacked().detach(),
        zero_point.detach(),
    )
    return new


def convert_qalora_to_integer(
    model: nn.Module,
    adapter_name: str | None = None,
    kernel_preference: str = "auto",
    inplace: bool = True,
) -> tuple[nn.Module, dict[str, IntegerLayout]]:
    """Replace every QALoRA layer of ``model`` by an integer layer; return the model and the layout of each layer.

    All integer layers are built (and every layer checked) before the first one is swapped in, so an error leaves the
    model as it was.  The model's timestep hook stays in place and now feeds the integer layers.

    Args:
        model (`torch.nn.Module`): a QALoRA model (from `get_qalora_model`, `peft.get_peft_model` or
            `load_qalora_adapter`) with calibrated activation step sizes.
        adapter_name (`str`, *optional*): the adapter to export; by default the active one.
        kernel_preference (`str`, defaults to `"auto"`): the integer layers' implementation (``"auto"``,
            ``"torch"``, ``"triton"`` or ``"onednn"``; see [KernelPreference][diffusers_qalora.KernelPreference]).
        inplace (`bool`, defaults to `True`): convert ``model`` itself; `False` converts a deep copy.
    """
    kernel_preference = validate_kernel_preference(kernel_preference, integer_layers=True)
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    layers = qalora_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no QALoRA layer to export; build it with diffusers_qalora.get_qalora_model "
            f"(and calibrate / distill it) first."
        )
    others = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and not isinstance(m, QALoraLayer)]
    if others:
        raise ValueError(
            f"{len(others)} module(s) carry another adapter (e.g. `{others[0]}`); a float adapter cannot run inside "
            f"integer layers. Fuse it before QALoRA training, or remove it (`model.unload_lora()` / "
            f"`delete_adapters`) before export."
        )
    adapter = active_qalora_adapter(model, adapter_name)
    if not inplace:
        model = copy.deepcopy(model)
        layers = qalora_layers(model)
    built = {name: _build_integer_layer(layer, adapter, name) for name, layer in layers.items()}
    for name, new in built.items():  # before the first swap: "onednn" on a CUDA model raises here
        try:
            set_kernel_preference(new, kernel_preference)
        except ValueError as err:
            raise ValueError(f"{name}: {err} Nothing was changed.") from None
    timestep_argument = _timestep_argument(model, adapter)
    for name, new in built.items():
        model.set_submodule(name, new)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    attach_integer_context(model, timestep_argument)
    return model, {name: new.layout for name, new in built.items()}


def _timestep_argument(model: nn.Module, adapter: str) -> str:
    config = (getattr(model, "peft_config", None) or {}).get(adapter)
    return getattr(config, "timestep_argument", "timestep")
