"""`QALoraAttnProcessor`: diffusers' attention with quantized query, key, value (and softmax output).

The processor holds no state.  The step sizes live on the QALoRA layers of the attention module, so PEFT saves,
loads, freezes and trains them with the rest of the adapter:

* ``attn.to_q.qal_out_quantizer[adapter]``, ``attn.to_k...``, ``attn.to_v...``: temporal quantizers of the projected
  query, key and value (applied per tensor, after the head split and any ``norm_q``/``norm_k``);
* ``attn.to_v.qal_prob_quantizer[adapter]``: temporal quantizer of the softmax output (unsigned codes).

They exist for adapters built with ``QALoraConfig(quantize_attention=True)`` (and ``quantize_attention_probs=True``);
injection installs this processor on every attention module that has them.  An operand without an active quantizer
(another adapter active, adapters disabled for the teacher pass, a quantizer switched off) is left as it is, so with
no quantizer at all the processor computes exactly what ``AttnProcessor2_0`` computes.

Three paths:

* **inference** (no gradient needed): [quantized_attention][diffusers_qalora.kernels.quantized_attention] with the step sizes at
  each sample's timestep: the fused Triton kernel on CUDA, the torch reference elsewhere (chosen once per attention
  module, see `diffusers_qalora.kernels.dispatch`);
* **training** (a gradient is needed): the quantizer modules (LSQ gradients for the values and the step sizes), then
  ``F.scaled_dot_product_attention``, or an explicit softmax when the softmax output is quantized;
* **calibration** (inside `diffusers_qalora.calibrating`): the quantizers observe the full-precision q, k, v (and
  softmax output) and pass them through.

Supported: diffusers' ``Attention`` run by ``AttnProcessor2_0``/``AttnProcessor``, i.e. the self- and cross-attention
of ``UNet2DModel`` and ``UNet2DConditionModel`` (SD1.5, SDXL), with ``attention_mask``, ``encoder_hidden_states``,
``group_norm``, ``spatial_norm``, ``norm_cross``, ``norm_q``/``norm_k``, residual connection and output rescaling.
Refused with an error: added key/value projections (SD3's ``JointAttnProcessor2_0``, ``AttnAddedKVProcessor``),
Flux's ``FluxAttention`` (``FluxAttnProcessor``), causal attention and grouped key/value heads.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from ...kernels.attention import QuantSpec, quantized_attention
from ...quant import TemporalActQuantizer
from .layer import ATTENTION_PROJECTIONS, QALoraLayer

__all__ = [
    "AttentionQuantizers",
    "QALoraAttnProcessor",
    "attention_quantizers",
    "check_attention_targets",
    "quantized_attention_modules",
    "restore_attention_processors",
    "set_qalora_attn_processor",
]


class AttentionQuantizers(NamedTuple):
    """The active quantizers of one attention module (``None`` where an operand is not quantized)."""

    query: TemporalActQuantizer | None
    key: TemporalActQuantizer | None
    value: TemporalActQuantizer | None
    probs: TemporalActQuantizer | None

    def any(self) -> bool:
        return any(q is not None for q in self)


def _active(layer: nn.Module | None, attribute: str) -> TemporalActQuantizer | None:
    if not isinstance(layer, QALoraLayer) or layer.disable_adapters:
        return None
    adapter = layer.active_qalora_adapter()
    quantizers = getattr(layer, attribute)
    if adapter is None or adapter not in quantizers:
        return None
    quantizer = quantizers[adapter]
    return quantizer if quantizer.enabled or quantizer.is_calibrating else None


def attention_quantizers(attn: nn.Module) -> AttentionQuantizers:
    """The quantizers that apply to ``attn`` now: those of the active QALoRA adapter of its projections."""
    return AttentionQuantizers(
        _active(getattr(attn, "to_q", None), "qal_out_quantizer"),
        _active(getattr(attn, "to_k", None), "qal_out_quantizer"),
        _active(getattr(attn, "to_v", None), "qal_out_quantizer"),
        _active(getattr(attn, "to_v", None), "qal_prob_quantizer"),
    )


def _quant_spec(quantizer: TemporalActQuantizer | None, batch: int) -> QuantSpec | None:
    """Step sizes and zero points of ``quantizer`` at the timestep of each of ``batch`` samples."""
    if quantizer is None:
        return None
    if not bool(quantizer.calibrated):
        raise RuntimeError(
            f"{quantizer.name or 'attention quantizer'}: step sizes are not calibrated. Run "
            f"`diffusers_qalora.calibrate_activations(model, ...)` (or load a calibrated adapter) before the quantized "
            f"forward pass."
        )
    step, zero_point = quantizer.batch_qparams(batch)  # the cheap lookup for one shared timestep, as forward
    step = step.detach().float().reshape(-1)
    zero_point = None if zero_point is None else zero_point.detach().float().reshape(-1)
    return QuantSpec(step, zero_point, quantizer.qmin, quantizer.qmax)


def _check_module(attn: nn.Module) -> None:
    if not isinstance(attn, Attention):
        raise TypeError(
            f"QALoraAttnProcessor runs diffusers' `Attention` modules (UNet2DModel / UNet2DConditionModel attention), "
            f"got {type(attn).__name__}; keep that model's own processor."
        )
    if attn.added_kv_proj_dim is not None:
        raise NotImplementedError(
            "QALoraAttnProcessor does not support attention with added key/value projections (SD3's joint attention, "
            "AttnAddedKVProcessor); quantize_attention supports UNet2DModel / UNet2DConditionModel attention."
        )
    if attn.is_causal:
        raise NotImplementedError("QALoraAttnProcessor does not support causal attention (`is_causal=True`).")


class QALoraAttnProcessor:
    r"""Attention processor with quantized q, k, v (and optionally softmax output) for diffusers' ``Attention``.

    Stateless: the temporal step sizes are read from the QALoRA layers ``attn.to_q``/``to_k``/``to_v`` (see the module
    docstring).  Injecting an adapter with ``QALoraConfig(quantize_attention=True)`` installs it; it can also be set
    by hand, on every attention module at once (modules without quantizers compute what ``AttnProcessor2_0`` does).

    Example:

    ```py
    >>> import diffusers_qalora as dq
    >>> unet = dq.get_qalora_model(unet, dq.QALoraConfig(weight_bits=4, act_bits=8, quantize_attention=True))
    >>> unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"]
    QALoraAttnProcessor()
    >>> unet.set_attn_processor(dq.QALoraAttnProcessor())     # the same, by hand
    ```
    """

    def __repr__(self) -> str:
        return "QALoraAttnProcessor()"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        _check_module(attn)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        if query.shape[-1] != inner_dim:
            raise NotImplementedError(
                f"QALoraAttnProcessor needs as many key/value heads as query heads (query width {query.shape[-1]}, key "
                f"width {inner_dim})."
            )
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attention(attn, query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def attention(
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The attention of ``(B, H, N, D)`` heads with ``attn``'s quantizers and scale; see the module docstring."""
        quantizers = attention_quantizers(attn)
        scale = attn.scale
        if not quantizers.any():
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
            )
        active = [q for q in quantizers if q is not None]
        calibrating = any(q.is_calibrating for q in active)
        needs_grad = torch.is_grad_enabled() and (
            query.requires_grad or key.requires_grad or value.requires_grad
            or any(q.step.values[0].requires_grad for q in active)  # PEFT freezes a quantizer as a whole
        )
        if calibrating or needs_grad:
            return _differentiable_attention(quantizers, query, key, value, attention_mask, scale)
        from ...kernels.dispatch import module_choice

        batch = query.shape[0]
        return quantized_attention(
            query, key, value,
            query_quant=_quant_spec(quantizers.query, batch),
            key_quant=_quant_spec(quantizers.key, batch),
            value_quant=_quant_spec(quantizers.value, batch),
            probs_quant=_quant_spec(quantizers.probs, batch),
            attn_mask=attention_mask,
            scale=scale,
            backend=module_choice(attn, query.device),
        )


def _differentiable_attention(
    quantizers: AttentionQuantizers,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The torch path with the quantizer modules: LSQ gradients in training, observation in calibration."""
    q = query if quantizers.query is None else quantizers.query(query)
    k = key if quantizers.key is None else quantizers.key(key)
    v = value if quantizers.value is None else quantizers.value(value)
    if quantizers.probs is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                              scale=scale)
    # The softmax output must exist to be quantized: explicit attention (memory grows with queries x keys).
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    probs = quantizers.probs(scores.softmax(dim=-1))
    return torch.matmul(probs.to(v.dtype), v)


# -- installation --------------------------------------------------------------------------------------------------
_SUPPORTED_PROCESSORS = (AttnProcessor2_0, AttnProcessor, QALoraAttnProcessor)


def _attention_parents(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """``{attention module name: module}`` for the ``to_q``/``to_k``/``to_v`` among ``names``."""
    parents = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        if leaf in ATTENTION_PROJECTIONS:
            parents[parent_name] = model.get_submodule(parent_name) if parent_name else model
    return parents


def check_attention_targets(model: nn.Module, module_names: Iterable[str]) -> None:
    """Raise a ``ValueError`` unless every module owning one of the ``to_q``/``to_k``/``to_v`` in ``module_names`` (the
    layers an adapter with ``quantize_attention`` wraps) is a diffusers ``Attention`` that `QALoraAttnProcessor` can
    run.  Called before anything is injected."""
    parents = _attention_parents(model, module_names)
    if not parents:
        raise ValueError(
            f"`quantize_attention=True` but no `to_q`/`to_k`/`to_v` projection of {type(model).__name__} is wrapped; "
            f"add them to `target_modules` or set quantize_attention=False."
        )
    for name, module in parents.items():
        where = f"`{name}` ({type(module).__name__}"
        if not isinstance(module, Attention):
            raise ValueError(
                f"`quantize_attention=True` supports diffusers' `Attention` (UNet2DModel / UNet2DConditionModel); "
                f"{where}) is not one. Set quantize_attention=False for this model, or exclude its projections with "
                f"`exclude_modules`."
            )
        processor = module.processor
        if module.added_kv_proj_dim is not None or not isinstance(processor, _SUPPORTED_PROCESSORS):
            raise ValueError(
                f"`quantize_attention=True` supports attention run by AttnProcessor2_0 / AttnProcessor (UNet "
                f"self- and cross-attention); {where}) runs {type(processor).__name__}"
                f"{' with added key/value projections' if module.added_kv_proj_dim is not None else ''}. Set "
                f"quantize_attention=False for this model, or exclude its projections with `exclude_modules`."
            )
        if module.is_causal:
            raise ValueError(f"`quantize_attention=True` does not support causal attention ({where}).")


def quantized_attention_modules(model: nn.Module) -> dict[str, Attention]:
    """Attention modules of ``model`` whose projections carry attention quantizers (of any adapter)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        layers = [getattr(module, leaf, None) for leaf in ATTENTION_PROJECTIONS]
        if any(isinstance(layer, QALoraLayer) and len(layer.qal_out_quantizer) for layer in layers):
            found[name] = module
    return found


def set_qalora_attn_processor(model: nn.Module) -> nn.Module:
    """Install a [QALoraAttnProcessor][diffusers_qalora.QALoraAttnProcessor] on every attention module of ``model`` that has attention quantizers
    (idempotent); other modules keep their processor.  Returns ``model``."""
    modules = quantized_attention_modules(model)
    for name, module in modules.items():
        if not isinstance(module.processor, _SUPPORTED_PROCESSORS):
            raise ValueError(
                f"`{name}` runs {type(module.processor).__name__}; QALoraAttnProcessor replaces only "
                f"AttnProcessor2_0 / AttnProcessor. Reset it with `model.set_default_attn_processor()` first."
            )
    for module in modules.values():
        if not isinstance(module.processor, QALoraAttnProcessor):
            module.set_processor(QALoraAttnProcessor())
    return model


def restore_attention_processors(model: nn.Module) -> nn.Module:
    """Give every attention module running a [QALoraAttnProcessor][diffusers_qalora.QALoraAttnProcessor] whose projections no longer carry attention
    quantizers diffusers' default processor back (``AttnProcessor2_0``, or ``AttnProcessor`` without ``scale_qk``)."""
    quantized = set(quantized_attention_modules(model).values())
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, QALoraAttnProcessor) and (
            module not in quantized
        ):
            module.set_processor(AttnProcessor2_0() if module.scale_qk else AttnProcessor())
    return model
