"""QALoRA tuner layers: ``op(Q_a(x; t), Q_w(W0 + scaling * B @ A))`` for ``nn.Linear`` and ``nn.Conv2d``.

The LoRA update is merged into the weight *before* fake quantization, so after training it folds into the integer
weight codes at no cost.  Every per-adapter tensor lives in a dict keyed by adapter name, as PEFT requires, under names
that contain neither ``lora_`` nor ``lora_A``/``lora_B`` (PEFT and diffusers detect LoRA tensors by those substrings).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...quant import (
    DynamicActQuantizer,
    PerChannel,
    PerGroup,
    PerToken,
    TemporalActQuantizer,
    WeightQuantizer,
    fake_quantize,
    fake_quantize_impl,
    fake_quantize_lora_merged,
    fused_path_enabled,
    grouped_view,
    qalora_conv2d,
    qalora_linear,
    set_kernel_preference,
)
from .config import QALoraConfig

# Leaf names of the projections of diffusers' ``Attention`` whose outputs ``quantize_attention`` quantizes.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v")


class QALoraLayer(BaseTunerLayer):
    """Mixin holding the per-adapter state of one wrapped layer."""

    # ``qal_out_quantizer`` (q/k/v of attention) and ``qal_prob_quantizer`` (softmax output) exist only on the
    # ``to_q``/``to_k``/``to_v`` layers of adapters with ``quantize_attention``; `QALoraAttnProcessor` applies them.
    adapter_layer_names = (
        "qal_A",
        "qal_B",
        "qal_weight_quantizer",
        "qal_act_quantizer",
        "qal_out_quantizer",
        "qal_prob_quantizer",
    )
    other_param_names = ("r", "lora_alpha", "scaling", "eight_bit")
    # False runs the reference composition in training too (benchmarks compare the two; same numbers).
    fused_weight_path = True
    # False keeps the fused weight path but with the op separate from it, so the LoRA gradients always go through
    # the weight gradient (benchmarks compare the two; same numbers up to float rounding).
    fused_layer_op = True

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.eight_bit: dict[str, bool] = {}
        self.qal_A = nn.ParameterDict({})
        self.qal_B = nn.ParameterDict({})
        self.qal_weight_quantizer = nn.ModuleDict({})
        self.qal_act_quantizer = nn.ModuleDict({})
        self.qal_out_quantizer = nn.ModuleDict({})
        self.qal_prob_quantizer = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # `merge()` never overwrites W0: it caches ``Q_w(W0 + scaling * B A)`` in this non-persistent buffer, which
        # follows ``.to()`` / ``.half()``, stays out of every state dict, and is simply dropped by `unmerge()`.
        self.register_buffer("qal_merged_weight", None, persistent=False)
        self._calibrating = False
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self.kwargs = kwargs

    # -- shapes, provided by the concrete classes -----------------------------------------------------------------
    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- adapter management --------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: QALoraConfig, eight_bit: bool, name: str = "") -> None:
        """Create the adapter ``adapter_name``: LoRA factors (unless ``eight_bit``), weight and activation quantizers."""
        base = self.get_base_layer()
        weight = base.weight
        device = weight.device
        self.eight_bit[adapter_name] = eight_bit
        if eight_bit:
            self.r[adapter_name] = 0
            self.lora_alpha[adapter_name] = 0.0
            self.scaling[adapter_name] = 0.0
            bits_w = bits_a = config.special_bits
            table = [0.0]  # one static step size for every timestep, as EfficientDM does for these layers
            self.frozen_peft_weight_names[adapter_name] = (
                "qal_weight_quantizer",
                "qal_act_quantizer",
                "qal_out_quantizer",
                "qal_prob_quantizer",
            )
        else:
            r = config.r
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = float(config.lora_alpha)
            self.scaling[adapter_name] = config.lora_alpha / r
            a_shape, b_shape = self._lora_shapes(r)
            a = torch.empty(a_shape, device=device, dtype=torch.float32)
            nn.init.kaiming_uniform_(a.view(r, -1), a=math.sqrt(5))
            b = torch.zeros(b_shape, device=device, dtype=torch.float32)
            if not config.init_weights:
                nn.init.normal_(b, std=0.02)
            self.qal_A[adapter_name] = nn.Parameter(a)
            self.qal_B[adapter_name] = nn.Parameter(b)
            bits_w, bits_a = config.weight_bits, config.act_bits
            table = config.timestep_table() if config.temporal_activations else [0.0]
        granularity = (
            PerGroup(config.weight_group_size)
            if config.weight_granularity == "group" and not eight_bit
            else PerChannel()
        )
        try:
            wq = WeightQuantizer(
                weight.shape,
                bits_w,
                symmetric=config.weight_symmetric,
                granularity=granularity,
                lsq_grad_scale=config.lsq_grad_scale,
            )
        except ValueError as err:
            raise ValueError(f"{name or type(base).__name__}: {err}") from None
        wq.to(device)
        wq.initialize_(weight.detach().float(), config.weight_init)
        self.qal_weight_quantizer[adapter_name] = wq
        self.qal_act_quantizer[adapter_name] = self._input_quantizer(config, table, bits_a, eight_bit, name).to(device)
        self._update_attention_quantizers(adapter_name, config, table, config.special_bits if eight_bit else None, name)
        for quantizers in (
            self.qal_weight_quantizer,
            self.qal_act_quantizer,
            self.qal_out_quantizer,
            self.qal_prob_quantizer,
        ):
            if adapter_name in quantizers:
                set_kernel_preference(quantizers[adapter_name], config.kernel_preference)
        self.set_adapter(self.active_adapters)

    def _input_quantizer(
        self, config: QALoraConfig, table: list[float], bits: int, eight_bit: bool, name: str
    ) -> TemporalActQuantizer | DynamicActQuantizer:
        """The quantizer of the layer input: temporal for ``act_granularity="tensor"``, else dynamic (per token for the
        8-bit layers, whose few or odd channel counts a group size need not divide)."""
        if config.act_granularity == "tensor":
            return TemporalActQuantizer(
                table, bits, symmetric=config.act_symmetric, lsq_grad_scale=config.lsq_grad_scale, name=name
            )
        channel_dim = -1 if isinstance(self.get_base_layer(), nn.Linear) else 1
        if config.act_granularity == "token" or eight_bit:
            granularity = PerToken()
        else:
            granularity = PerGroup(config.act_group_size)
            channels = self.get_base_layer().weight.shape[1]
            if channels % config.act_group_size:
                raise ValueError(
                    f"{name or type(self.get_base_layer()).__name__}: `act_group_size` ({config.act_group_size}) must "
                    f"divide the layer's {channels} input channels; choose a common divisor of the wrapped layers' "
                    f"input channels, or add the layer to `exclude_modules` / `eight_bit_modules`."
                )
        return DynamicActQuantizer(
            bits, symmetric=config.act_symmetric, granularity=granularity, channel_dim=channel_dim, name=name
        )

    def _update_attention_quantizers(
        self, adapter_name: str, config: QALoraConfig, table: list[float], bits: int | None, name: str
    ) -> None:
        """With ``config.quantize_attention``, give a ``to_q``/``to_k``/``to_v`` projection a temporal quantizer of its
        output (and ``to_v`` one of the softmax output if ``quantize_attention_probs``); `QALoraAttnProcessor`
        applies them.  ``bits`` overrides the attention bits (8-bit layers)."""
        role = name.rpartition(".")[2]
        if not config.quantize_attention or role not in ATTENTION_PROJECTIONS:
            return
        device = self.get_base_layer().weight.device
        bits = bits if bits is not None else (config.attention_bits or config.act_bits)
        self.qal_out_quantizer[adapter_name] = TemporalActQuantizer(
            table, bits, symmetric=config.act_symmetric, lsq_grad_scale=config.lsq_grad_scale, name=f"{name}:output"
        ).to(device)
        if config.quantize_attention_probs and role == "to_v":
            # Probabilities lie in [0, 1]: unsigned codes whatever act_symmetric says.
            self.qal_prob_quantizer[adapter_name] = TemporalActQuantizer(
                table, bits, symmetric=False, lsq_grad_scale=config.lsq_grad_scale, name=f"{name}:softmax"
            ).to(device)

    def active_qalora_adapter(self) -> str | None:
        """The QALoRA adapter active in this layer (``None`` if none is; an error if several are)."""
        active = [a for a in self.active_adapters if a in self.qal_weight_quantizer]
        if len(active) > 1:
            raise ValueError(
                f"only one QALoRA adapter can be active per layer (quantization is not additive), got {active}; "
                f"call set_adapter with a single name."
            )
        return active[0] if active else None

    # -- the QALoRA maths ----------------------------------------------------------------------------------------
    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` in the shape of the base weight (zeros for 8-bit layers without LoRA)."""
        weight = self.get_base_layer().weight
        if adapter not in self.qal_A:
            return torch.zeros_like(weight, dtype=torch.float32)
        a, b = self.qal_A[adapter], self.qal_B[adapter]
        return (b @ a.reshape(a.shape[0], -1)).reshape(weight.shape) * self.scaling[adapter]

    def merged_float_weight(self, adapter: str) -> torch.Tensor:
        """``W0 + scaling * B @ A`` (before quantization), in fp32."""
        return self.get_base_layer().weight.float() + self.delta_weight(adapter)

    def quantized_weight(self, adapter: str) -> torch.Tensor:
        """``Q_w(W0 + scaling * B @ A)`` in the dtype of the base weight."""
        weight = self.get_base_layer().weight
        return self.qal_weight_quantizer[adapter](self.merged_float_weight(adapter)).to(weight.dtype)

    def integer_weight(self, adapter: str) -> torch.Tensor:
        """Integer codes of the merged weight (``int32``): what an export stores."""
        return self.qal_weight_quantizer[adapter].quantize(self.merged_float_weight(adapter))

    def _qalora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        adapter = None if self.disable_adapters else self.active_qalora_adapter()
        if adapter is None:
            return base(x, *args, **kwargs)  # W0 is never overwritten, so a merged layer needs no unmerge here
        act_quantizer = self.qal_act_quantizer[adapter]
        if self._calibrating:
            # Calibration observes the full-precision model's own inputs: the layer runs unquantized.
            act_quantizer(x)
            return base(x, *args, **kwargs)
        x_q = act_quantizer(x)
        if self.merged_adapters == [adapter]:
            if self.qal_merged_weight is None:
                # Built at the first forward after merge(), not in merge(): diffusers' fuse_lora merges this layer
                # before a style LoRA wrapping it adds its delta to W0, and the merged weight must include it.
                with torch.no_grad():
                    self.qal_merged_weight = self.quantized_weight(adapter)
            return self._op(x_q, self.qal_merged_weight)
        args = self._fused_weight_args(adapter)
        if args is None:
            return self._op(x_q, self.quantized_weight(adapter))
        if self._layer_op_applies(x_q, args):
            y = self._fused_op(x_q, args)
            if y is not None:
                return y
        return self._op(x_q, fake_quantize_lora_merged(**args).to(args["w0"].dtype))

    def _fused_weight_args(self, adapter: str) -> dict | None:
        """The arguments of the fused weight path (`fake_quantize_lora_merged`) when this forward pass takes it: with
        gradients on a LoRA layer whose weight quantizer runs the torch reference, where `fused_path_enabled` says
        so (SD-scale weights on CPU: same numbers, one compiled pass over the weight each way, no weight-sized
        allocation per step); ``None`` for the composition itself (small weights, and the Triton kernel on CUDA)."""
        wq = self.qal_weight_quantizer[adapter]
        weight = self.get_base_layer().weight
        if (
            not self.fused_weight_path
            or adapter not in self.qal_A
            or not torch.is_grad_enabled()
            or not fused_path_enabled(weight.numel(), weight.device)
            or fake_quantize_impl(wq, weight) is not fake_quantize
        ):
            return None
        return {
            "w0": weight,
            "a": self.qal_A[adapter],
            "b": self.qal_B[adapter],
            "scaling": self.scaling[adapter],
            "step": wq.step,
            "zero_point": wq.zero_point,
            "qmin": wq.qmin,
            "qmax": wq.qmax,
            "grad_scale": wq.grad_scale,
            "grouped_shape": grouped_view(weight, wq.granularity).shape,
        }

    def _layer_op_applies(self, x: torch.Tensor, args: dict) -> bool:
        """Whether the layer runs as one autograd function (`quant.qalora_linear` / `qalora_conv2d`: the LoRA
        gradients through the activations where that is cheaper) on the fused weight path: a float32 layer whose base
        weight and bias are frozen, outside autocast."""
        bias = self.get_base_layer().bias
        return (
            self.fused_layer_op
            and args["w0"].dtype == torch.float32
            and not args["w0"].requires_grad
            and (bias is None or not bias.requires_grad)
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _fused_op(self, x: torch.Tensor, args: dict) -> torch.Tensor | None:
        raise NotImplementedError

    # -- merge / unmerge / scale (PEFT and diffusers hooks) -------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Freeze ``Q_w(W0 + scaling * B A)`` so that forward passes skip the fake quantization of the weight (the
        activation quantizer stays active).

        Quantization is not additive, so only one adapter can be merged.  Unlike PEFT's LoRA, the base weight W0 is
        left untouched: the merged weight is built at the next forward pass (so that it includes whatever a style LoRA
        wrapping this layer merges into W0 in the same ``fuse_lora``) into the non-persistent buffer
        ``qal_merged_weight``, which follows ``.to()`` / ``.half()`` and never enters a state dict; [`unmerge`] just
        drops it.  A merged model cannot
        be unloaded into plain layers (``merge_and_unload``); `export_quantized` is the way to a standalone model.
        """
        # Other adapters named here (a style LoRA around this layer) are merged by their own layers, possibly into W0:
        # drop the merged weight so that the next forward pass rebuilds it from the W0 they leave.
        self.qal_merged_weight = None
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.qal_weight_quantizer]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged_adapters:
            raise ValueError(
                f"QALoRA can merge one adapter at a time (quantization is not additive); got {adapter_names} with "
                f"{self.merged_adapters} already merged."
            )
        adapter = adapter_names[0]
        if safe_merge:
            with torch.no_grad():
                if not torch.isfinite(self.quantized_weight(adapter)).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {adapter!r} seems to be broken.")
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Drop the merged weight: the layer computes ``Q_w(W0 + scaling * B A)`` on the fly again."""
        self.qal_merged_weight = None
        self.merged_adapters.clear()

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names`` on this layer.

        QALoRA is the quantization of the layer, not one more additive adapter: a call that names no QALoRA adapter
        of this layer (diffusers' ``add_adapter(cfg, adapter_name="style")`` calls ``set_adapter("style")``, and
        ``set_adapters(["style"])`` does the same) keeps the active QALoRA adapter active, with its trainable state
        unchanged.  Naming two QALoRA adapters is an error, raised before anything changes.  Switch QALoRA adapters
        by naming one, turn QALoRA off with ``disable_adapters()`` / `adapters_disabled` or remove it.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        ours = [n for n in names if n in self.qal_weight_quantizer]
        if len(ours) > 1:
            raise ValueError(
                f"only one QALoRA adapter can be active per layer (quantization is not additive), got {ours}; name a "
                f"single QALoRA adapter (other adapters such as a style LoRA may be named with it)."
            )
        kept = []
        if not ours and names:
            kept = [a for a in self.active_adapters if a in self.qal_weight_quantizer][:1]
        kept_params = [p for a in kept for p in self._adapter_parameters(a)]
        grad_state = [p.requires_grad for p in kept_params]
        super().set_adapter(kept + names, inference_mode=inference_mode)
        for p, requires_grad in zip(kept_params, grad_state):
            p.requires_grad_(requires_grad)

    def _adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        found = []
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter not in container:
                continue
            item = container[adapter]
            if isinstance(item, nn.Parameter):
                found.append(item)
            elif isinstance(item, nn.Module):
                found += list(item.parameters())
        return found

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` from this layer (unmerging it first if it is the merged one)."""
        if adapter_name in self.merged_adapters:
            self.unmerge()
        super().delete_adapter(adapter_name)

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.qal_A:
            self.scaling[adapter] = scale * self.lora_alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        for adapter in self.active_adapters:
            if adapter in self.qal_A:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        for adapter in self.active_adapters:
            if adapter in self.qal_A:
                if scale is None or scale == 0:
                    self.scaling[adapter] = self.lora_alpha[adapter] / self.r[adapter]
                else:
                    self.scaling[adapter] /= scale


class _QALoraModule(nn.Module, QALoraLayer):
    """What `Linear` and `Conv2d` share: the construction (the base layer's ``base_attributes`` mirrored, so that
    code inspecting the layer keeps working, e.g. SDXL pipelines read ``add_embedding.linear_1.in_features``), the
    forward pass and the repr."""

    base_attributes: tuple[str, ...] = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: QALoraConfig,
        eight_bit: bool = False,
        name: str = "",
        **kwargs,
    ) -> None:
        super().__init__()
        QALoraLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        for attr in self.base_attributes:
            setattr(self, attr, getattr(base, attr))
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, eight_bit, name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._qalora_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "qalora." + super().__repr__()


class Linear(_QALoraModule):
    """QALoRA wrapper of ``nn.Linear``: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``."""

    base_attributes = ("in_features", "out_features")

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.get_base_layer()
        return (r, base.in_features), (base.out_features, r)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.get_base_layer().bias)

    def _fused_op(self, x: torch.Tensor, args: dict) -> torch.Tensor:
        return qalora_linear(x, bias=self.get_base_layer().bias, **args)


class Conv2d(_QALoraModule):
    """QALoRA wrapper of ``nn.Conv2d`` (groups = 1): ``A`` carries the full kernel ``(r, in, kh, kw)`` and ``B`` is
    a 1x1 ``(out, r)``, so ``B @ A`` has the base kernel's shape (PEFT's conv-LoRA convention)."""

    base_attributes = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")

    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.get_base_layer()
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.get_base_layer()._conv_forward(x, weight, self.get_base_layer().bias)

    def _fused_op(self, x: torch.Tensor, args: dict) -> torch.Tensor | None:
        base = self.get_base_layer()
        if isinstance(base.padding, str):
            return None  # "same" / "valid": the composition
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = (0, 0)
        return qalora_conv2d(x, bias=base.bias, stride=base.stride, padding=padding, dilation=base.dilation, **args)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be wrapped, or ``None`` if it can."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (QALoRA supports groups=1 only)"
        return None
    return f"{type(module).__name__} (QALoRA supports torch.nn.Linear and torch.nn.Conv2d)"


def dispatch_qalora(
    target: nn.Module, adapter_name: str, config: QALoraConfig, eight_bit: bool, name: str
) -> nn.Module:
    """Build the wrapper for ``target`` (an unwrapped base layer), or raise a ``ValueError`` naming it."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    reason = unsupported_reason(base)
    if reason is not None:
        raise ValueError(f"cannot apply QALoRA to module `{name}`: {reason}. Remove it from `target_modules`.")
    cls = Linear if isinstance(base, nn.Linear) else Conv2d
    return cls(target, adapter_name, config, eight_bit=eight_bit, name=name)
