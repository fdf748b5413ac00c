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

Supported, each by its own processor (the quantized attention is the same function in all three):

* `QALoraAttnProcessor`: diffusers' ``Attention`` run by ``AttnProcessor2_0``/``AttnProcessor``, i.e. the self- and
  cross-attention of ``UNet2DModel`` and ``UNet2DConditionModel`` (SD1.5, SDXL), with ``attention_mask``,
  ``encoder_hidden_states``, ``group_norm``, ``spatial_norm``, ``norm_cross``, ``norm_q``/``norm_k``, residual
  connection and output rescaling;
* `QALoraJointAttnProcessor`: SD3's joint attention (``Attention`` run by ``JointAttnProcessor2_0``: image tokens
  and context tokens, from the ``add_q_proj``/``add_k_proj``/``add_v_proj`` projections, in one softmax), SD3.5's
  ``qk_norm`` and its second (image-only) attention included;
* `QALoraFluxAttnProcessor`: Flux's ``FluxAttention`` run by ``FluxAttnProcessor`` (double-stream blocks with
  context tokens first, single-stream blocks, rotary embeddings, ``attention_mask``).

In the joint and Flux attention, the quantized ``q``, ``k``, ``v`` are the tensors that enter the product: image and
context tokens concatenated (and, in Flux, after the rotary embedding), one step size per tensor and timestep held
by ``to_q``/``to_k``/``to_v`` as in the UNet; the context projections themselves are ordinary QALoRA layers.
Refused with an error: other processors (``AttnAddedKVProcessor``, IP-Adapter processors, fused QKV projections),
causal attention and grouped key/value heads.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
from torch import nn

from ...export.modules import IntegerLayer
from ...kernels.attention import QuantSpec, quantized_attention
from ...quant import TemporalActQuantizer
from .layer import ATTENTION_PROJECTIONS, QALoraLayer

__all__ = [
    "AttentionQuantizers",
    "QALoraAttnProcessor",
    "QALoraFluxAttnProcessor",
    "QALoraJointAttnProcessor",
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


def _qalora_projection(layer: nn.Module | None) -> nn.Module | None:
    """The QALoRA layer of a projection, also under a style LoRA that wraps it (else the layer itself)."""
    while (
        layer is not None
        and not isinstance(layer, QALoraLayer)
        and isinstance(getattr(layer, "base_layer", None), nn.Module)
    ):
        layer = layer.base_layer
    return layer


# The step-size table of an exported integer projection that holds each attribute's quantizer.
_EXPORTED_TABLES = {"qal_out_quantizer": "out", "qal_prob_quantizer": "prob"}


def _active(layer: nn.Module | None, attribute: str) -> TemporalActQuantizer | None:
    layer = _qalora_projection(layer)
    if isinstance(layer, IntegerLayer):  # an exported model: the tables stored with the integer projection
        return layer.attention_quantizer(_EXPORTED_TABLES[attribute])
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

    Args:
        compute_dtype (`torch.dtype`, *optional*):
            Dtype in which the float (unquantized) attention ``softmax(q k^T) v`` runs, its result cast back: e.g.
            ``torch.bfloat16`` for an exported integer model on a CPU with bf16 matrix units, where it halves the
            attention's time (see docs/export.md). Attention with active quantizers keeps its own arithmetic.
            ``None`` (default): the dtype of the query, as ``AttnProcessor2_0``.
    """

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"`compute_dtype` must be torch.float32, torch.bfloat16, torch.float16 or None, got {compute_dtype!r}."
            )
        self.compute_dtype = compute_dtype

    def __repr__(self) -> str:
        return (
            "QALoraAttnProcessor()"
            if self.compute_dtype is None
            else f"QALoraAttnProcessor(compute_dtype={self.compute_dtype})"
        )

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

        compute_dtype = self.compute_dtype
        if compute_dtype is not None and compute_dtype != query.dtype and not attention_quantizers(attn).any():
            # a boolean mask stays boolean (True = attend); an additive float mask follows q, k, v
            cast = [
                t.to(compute_dtype) if t is not None and t.is_floating_point() else t
                for t in (query, key, value, attention_mask)
            ]
            hidden_states = self.attention(attn, *cast)
        else:
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
        return quantized_module_attention(attn, query, key, value, attention_mask, attn.scale)


def quantized_module_attention(
    attn: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` of ``(B, H, N, D)`` heads with the active quantizers of ``attn``'s
    ``to_q``/``to_k``/``to_v`` (the three paths of the module docstring); plain SDPA when none is active."""
    quantizers = attention_quantizers(attn)
    if not quantizers.any():
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
        )
    active = [q for q in quantizers if q is not None]
    calibrating = any(q.is_calibrating for q in active)
    needs_grad = torch.is_grad_enabled() and (
        query.requires_grad
        or key.requires_grad
        or value.requires_grad
        or any(q.step.values[0].requires_grad for q in active)  # PEFT freezes a quantizer as a whole
    )
    if calibrating or needs_grad:
        return _differentiable_attention(quantizers, query, key, value, attention_mask, scale)
    from ...kernels.dispatch import module_choice

    batch = query.shape[0]
    return quantized_attention(
        query,
        key,
        value,
        query_quant=_quant_spec(quantizers.query, batch),
        key_quant=_quant_spec(quantizers.key, batch),
        value_quant=_quant_spec(quantizers.value, batch),
        probs_quant=_quant_spec(quantizers.probs, batch),
        attn_mask=attention_mask,
        scale=scale,
        kernel_preference=module_choice(attn, query.device),
    )


class QALoraJointAttnProcessor:
    r"""SD3's joint attention (what ``JointAttnProcessor2_0`` computes) with quantized q, k, v (and softmax output).

    Image tokens (``to_q``/``to_k``/``to_v``) and context tokens (``add_q_proj``/``add_k_proj``/``add_v_proj``) are
    projected, split into heads and normalised (``norm_q``/``norm_k``, ``norm_added_q``/``norm_added_k``), then
    concatenated, image first; the concatenated q, k, v are quantized with the step sizes held by ``to_q``/``to_k``/
    ``to_v`` at each sample's timestep. The output is split back: ``to_out`` for the image tokens, ``to_add_out`` for
    the context tokens unless ``context_pre_only``. Stateless, like [`QALoraAttnProcessor`]; injection installs it on
    every ``JointAttnProcessor2_0`` module whose projections carry attention quantizers.
    """

    def __repr__(self) -> str:
        return "QALoraJointAttnProcessor()"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(attn, Attention) or attn.is_causal:
            raise TypeError(
                f"QALoraJointAttnProcessor runs the non-causal `Attention` modules of SD3-style transformers, got "
                f"{type(attn).__name__}{' (causal)' if isinstance(attn, Attention) else ''}."
            )
        batch_size, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = _head_dim(query, key, attn.heads, "QALoraJointAttnProcessor")
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context = [
                projection(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query, key, value = (torch.cat([t, c], dim=2) for t, c in zip((query, key, value), context))

        # JointAttnProcessor2_0 passes no mask and SDPA's default scale.
        hidden_states = quantized_module_attention(attn, query, key, value, None, head_dim**-0.5)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class QALoraFluxAttnProcessor:
    r"""Flux's attention (what ``FluxAttnProcessor`` computes) with quantized q, k, v (and softmax output).

    Double-stream blocks: context tokens (``add_*_proj``, ``norm_added_*``) come first, image tokens second; single-
    stream blocks attend over the tokens they are given. The rotary embedding is applied to q and k, and the
    quantized q, k, v are the tensors that then enter the product, with the step sizes held by ``to_q``/``to_k``/
    ``to_v`` at each sample's timestep (Flux's timestep argument lies in [0, 1]: the adapter's timestep table must be
    in those units). The attention itself runs on this project's kernels (the fused Triton kernel on CUDA, the torch
    reference elsewhere), not through ``dispatch_attention_fn``, so a diffusers attention backend set on the module is
    not used. Stateless; injection installs it on every ``FluxAttention`` whose projections carry attention
    quantizers.
    """

    def __repr__(self) -> str:
        return "QALoraFluxAttnProcessor()"

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        flux_attention, _ = _flux_classes()
        if not isinstance(attn, flux_attention) or getattr(attn, "fused_projections", False):
            raise TypeError(
                f"QALoraFluxAttnProcessor runs Flux's `FluxAttention` with separate to_q/to_k/to_v projections, got "
                f"{type(attn).__name__}{' with fused projections (unfuse_projections() first)' if isinstance(attn, flux_attention) else ''}."
            )
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        _head_dim(query, key, attn.heads, "QALoraFluxAttnProcessor")
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))  # (B, N, H, D)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            context = [
                projection(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ]
            context[0], context[1] = attn.norm_added_q(context[0]), attn.norm_added_k(context[1])
            query, key, value = (torch.cat([c, t], dim=1) for c, t in zip(context, (query, key, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = quantized_module_attention(
            attn,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask,
            attn.head_dim**-0.5,
        )
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            context_tokens = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states[:, :context_tokens], hidden_states[:, context_tokens:]
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _head_dim(query: torch.Tensor, key: torch.Tensor, heads: int, processor: str) -> int:
    if query.shape[-1] != key.shape[-1]:
        raise NotImplementedError(
            f"{processor} needs as many key/value heads as query heads (query width {query.shape[-1]}, key width "
            f"{key.shape[-1]})."
        )
    return key.shape[-1] // heads


@functools.cache
def _flux_classes() -> tuple[type, type]:
    """Flux's attention module and default processor (imported on first use: most models are not Flux)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    return FluxAttention, FluxAttnProcessor


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
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
        )
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
_JOINT_PROCESSORS = (JointAttnProcessor2_0, QALoraJointAttnProcessor)


def _is_attention_module(module: nn.Module) -> bool:
    return isinstance(module, (Attention, _flux_classes()[0]))


def _quantized_processor_for(module: nn.Module) -> type | None:
    """The QALoRA processor class that replaces ``module``'s current processor, or ``None`` when none can."""
    flux_attention, flux_processor = _flux_classes()
    processor = getattr(module, "processor", None)
    if isinstance(module, flux_attention):
        if isinstance(processor, (flux_processor, QALoraFluxAttnProcessor)) and not getattr(
            module, "fused_projections", False
        ):
            return QALoraFluxAttnProcessor
        return None
    if not isinstance(module, Attention) or module.is_causal:
        return None
    if isinstance(processor, _JOINT_PROCESSORS):
        return QALoraJointAttnProcessor
    if isinstance(processor, _SUPPORTED_PROCESSORS) and module.added_kv_proj_dim is None:
        return QALoraAttnProcessor
    return None


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
    layers an adapter with ``quantize_attention`` wraps) is an attention module a QALoRA processor can run: diffusers'
    ``Attention`` with ``AttnProcessor2_0``/``AttnProcessor`` (UNets) or ``JointAttnProcessor2_0`` (SD3), or Flux's
    ``FluxAttention`` with ``FluxAttnProcessor``.  Called before anything is injected."""
    parents = _attention_parents(model, module_names)
    if not parents:
        raise ValueError(
            f"`quantize_attention=True` but no `to_q`/`to_k`/`to_v` projection of {type(model).__name__} is wrapped; "
            f"add them to `target_modules` or set quantize_attention=False."
        )
    for name, module in parents.items():
        where = f"`{name}` ({type(module).__name__}"
        if not _is_attention_module(module):
            raise ValueError(
                f"`quantize_attention=True` supports diffusers' `Attention` (UNets, SD3) and Flux's `FluxAttention`; "
                f"{where}) is neither. Set quantize_attention=False for this model, or exclude its projections with "
                f"`exclude_modules`."
            )
        if getattr(module, "is_causal", False):
            raise ValueError(f"`quantize_attention=True` does not support causal attention ({where}).")
        if _quantized_processor_for(module) is None:
            processor = getattr(module, "processor", None)
            detail = ""
            if getattr(module, "added_kv_proj_dim", None) is not None and isinstance(processor, AttnProcessor2_0):
                detail = " with added key/value projections"
            elif getattr(module, "fused_projections", False):
                detail = " with fused QKV projections (call unfuse_qkv_projections() first)"
            raise ValueError(
                f"`quantize_attention=True` supports attention run by AttnProcessor2_0 / AttnProcessor (UNet self- "
                f"and cross-attention), JointAttnProcessor2_0 (SD3) and FluxAttnProcessor (Flux); {where}) runs "
                f"{type(processor).__name__}{detail}. Reset it with `set_default_attn_processor()` (or "
                f"`quantize_attention=False`, or exclude its projections with `exclude_modules`)."
            )


def quantized_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules of ``model`` whose projections carry attention quantizers (of any adapter)."""
    found = {}
    for name, module in model.named_modules():
        if not _is_attention_module(module):
            continue
        layers = [_qalora_projection(getattr(module, leaf, None)) for leaf in ATTENTION_PROJECTIONS]
        if any(
            (isinstance(layer, QALoraLayer) and len(layer.qal_out_quantizer))
            or (isinstance(layer, IntegerLayer) and layer.out_timesteps is not None)
            for layer in layers
        ):
            found[name] = module
    return found


def set_qalora_attn_processor(model: nn.Module) -> nn.Module:
    """Install the QALoRA processor on every attention module of ``model`` that has attention quantizers
    (idempotent): [`QALoraAttnProcessor`] for UNet attention, [`QALoraJointAttnProcessor`] for SD3's joint attention,
    [`QALoraFluxAttnProcessor`] for Flux; other modules keep their processor.  Returns ``model``."""
    modules = quantized_attention_modules(model)
    chosen = {}
    for name, module in modules.items():
        processor_cls = _quantized_processor_for(module)
        if processor_cls is None:
            raise ValueError(
                f"`{name}` runs {type(module.processor).__name__}; the QALoRA processors replace only "
                f"AttnProcessor2_0 / AttnProcessor, JointAttnProcessor2_0 and FluxAttnProcessor. Reset it with "
                f"`model.set_default_attn_processor()` first."
            )
        chosen[name] = processor_cls
    for name, module in modules.items():
        if not isinstance(module.processor, chosen[name]):
            module.set_processor(chosen[name]())
    return model


_QALORA_PROCESSORS = (QALoraAttnProcessor, QALoraJointAttnProcessor, QALoraFluxAttnProcessor)


def restore_attention_processors(model: nn.Module) -> nn.Module:
    """Give every attention module running a QALoRA processor whose projections no longer carry attention quantizers
    diffusers' processor for it back: ``AttnProcessor2_0`` (or ``AttnProcessor`` without ``scale_qk``),
    ``JointAttnProcessor2_0`` or ``FluxAttnProcessor``."""
    quantized = set(quantized_attention_modules(model).values())
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if not isinstance(processor, _QALORA_PROCESSORS) or module in quantized:
            continue
        if isinstance(processor, QALoraFluxAttnProcessor):
            module.set_processor(_flux_classes()[1]())
        elif isinstance(processor, QALoraJointAttnProcessor):
            module.set_processor(JointAttnProcessor2_0())
        else:
            module.set_processor(AttnProcessor2_0() if module.scale_qk else AttnProcessor())
    return model
