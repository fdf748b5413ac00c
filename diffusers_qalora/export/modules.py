"""Integer layers: ``IntegerLinear`` and ``IntegerConv2d``.

Each holds integer weight codes (packed), per-channel or per-group weight step sizes, the bias and the activation
step-size table keyed by timestep (see [IntegerLayout][diffusers_qalora.export.IntegerLayout]).  A call

1. looks the activation step size and zero point up at the current timestep (from the shared [TimestepContext][diffusers_qalora.TimestepContext]
   that the denoiser's forward pre-hook fills; a batch with several timesteps is split by timestep),
2. quantizes the input to ``uint8`` codes,
3. runs the integer product (``int32`` accumulation) with one epilogue ``acc * s_x * s_w + bias``.

The kernel preference ``"torch"`` computes the same layer in float from the dequantized codes (the fake-quant model's
numbers, bit for bit in float32); it is the fallback where no integer kernel applies.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import KernelPreference, PerGroup, PerToken, TemporalActQuantizer, TimestepContext, pack_codes
from ..quant.kernel_preference import kernel_preference_of
from ..quant.quantizers import dynamic_fake_quantize, dynamic_qparams
from .backends import (
    conv2d_onednn,
    linear_onednn,
    onednn_product,
    prepack_conv2d,
    prepack_linear,
    resolve_integer_kernel,
)
from .compiled import integer_product, layer_key
from .functional import (
    dequantize_activation_reference,
    dequantize_weight,
    lookup_act_qparams,
    quantize_activation_uint8,
    quantize_activation_uint8_per_sample,
    unpack_weight_codes,
)
from .layout import ACT_TABLE_NAMES, ATTENTION_TABLE_NAMES, TABLE_FIELDS, IntegerLayout

__all__ = ["IntegerConv2d", "IntegerLayer", "IntegerLinear", "integer_layers"]


@torch.compiler.assume_constant_result
def _compiled_route(layer: IntegerLayer, device_type: str) -> tuple | None:
    # Evaluated once while tracing (tables and kernel choice are fixed for the graph); the op checks it at run time.
    return layer._compiled_route(device_type)


@torch.compiler.disable
def _forward_eager(layer: IntegerLayer, x: torch.Tensor) -> torch.Tensor:
    # Layers without a traced path run eagerly inside a compiled model (a graph break, the same numbers).
    return layer._forward_eager(x)


# The buffers whose state a compiled layer's runner depends on (`IntegerLayer._compiled_product`).
_RUNNER_STATE = ("weight_packed", "weight_scale", "bias", "act_timesteps", "act_scale", "act_zero_point")

# Positions of the denoiser call's timesteps in the layers' dense tables, keyed by the context's timestep tensor (kept
# in the value, so that its id cannot be reused while the entry lives); ``None`` for non-integer timesteps.
_INDICES: dict[tuple, tuple] = {}


class IntegerLayer(nn.Module):
    """Common state and call logic of the integer layers (not used directly).

    Attributes:
        layout ([IntegerLayout][diffusers_qalora.export.IntegerLayout]): bit widths, granularity and table size.
        context ([TimestepContext][diffusers_qalora.TimestepContext]): the timesteps of the denoiser call in progress (shared by all layers).
        exact_activation_rounding (`bool`): quantize activations with the fake-quant model's ``x / s`` formula instead
            of torch's fused quantizer (slower; the fused one differs by one code at rare exact ties).
    """

    op: str = ""
    # Integer layers also have oneDNN kernels (set with `diffusers_qalora.set_kernel_preference`; see
    # `diffusers_qalora.export.backends`).
    kernel_preferences = tuple(KernelPreference)

    def __init__(
        self,
        layout: IntegerLayout,
        out_channels: int,
        in_channels: int,
        kernel_elems: int,
        bias: bool,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layout, IntegerLayout):
            raise TypeError(f"`layout` must be an IntegerLayout, got {type(layout).__name__}.")
        self.layout = layout
        self.k = in_channels * kernel_elems
        shapes = layout.tensor_shapes(out_channels, in_channels, kernel_elems, bias)
        self.register_buffer("weight_packed", torch.empty(shapes["weight_packed"], dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(shapes["weight_scale"], dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(shapes["bias"], dtype=torch.float32, device=device) if bias else None)
        # absent (None) for dynamic activations / without attention quantization
        for name in (*ACT_TABLE_NAMES, *ATTENTION_TABLE_NAMES):
            table = torch.empty(shapes[name], dtype=torch.float32, device=device) if name in shapes else None
            self.register_buffer(name, table)
        self.context: TimestepContext | None = None
        self.exact_activation_rounding = False
        self.name = ""
        self._derived: dict[str, tuple[tuple, object]] = {}
        self._qparams_cache: tuple | None = None

    # -- construction from codes -------------------------------------------------------------------------------------
    def load_codes_(
        self,
        codes: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        act_timesteps: torch.Tensor | None = None,
        act_scale: torch.Tensor | None = None,
        act_zero_point: torch.Tensor | None = None,
    ) -> None:
        """Fill the layer from integer weight codes (any integer dtype, the weight's shape or ``(C_out, K)``) and the
        float tables (``None`` for dynamic activations); every shape and range is checked before anything is
        written."""
        layout = self.layout
        if codes.is_floating_point():
            raise TypeError(f"{self._where()}: `codes` must be an integer tensor, got {codes.dtype}.")
        flat = codes.reshape(codes.shape[0], -1)
        if flat.shape != (self.weight_packed.shape[0], self.k):
            raise ValueError(
                f"{self._where()}: codes of shape {tuple(codes.shape)} do not match the layer "
                f"({self.weight_packed.shape[0]} x {self.k})."
            )
        lo, hi = -(2 ** (layout.weight_bits - 1)), 2 ** (layout.weight_bits - 1) - 1
        if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
            raise ValueError(f"{self._where()}: weight codes must lie in [{lo}, {hi}] for {layout.weight_bits} bits.")
        pad = self.layout.packed_width(self.k) * layout.codes_per_byte - self.k
        flat = F.pad(flat.to(torch.int16), (0, pad)) if pad else flat.to(torch.int16)
        packed = pack_codes(flat, layout.packed_bits, signed=True, dim=-1)
        values = {
            "weight_packed": packed,
            "weight_scale": weight_scale.detach().float().reshape(self.weight_scale.shape),
        }
        tables = dict(zip(ACT_TABLE_NAMES, (act_timesteps, act_scale, act_zero_point)))
        if layout.dynamic_activations:
            if any(t is not None for t in tables.values()):
                raise ValueError(f"{self._where()}: dynamic activations have no step-size table; pass None.")
        else:
            if any(t is None for t in tables.values()):
                raise ValueError(
                    f"{self._where()}: the activation step-size table (timesteps, scales, zero points) is missing."
                )
            values.update({name: t.detach().float().reshape(-1) for name, t in tables.items()})
        if (bias is None) != (self.bias is None):
            raise ValueError(
                f"{self._where()}: bias {'missing' if bias is None else 'given'} for a layer "
                f"{'with' if self.bias is not None else 'without'} bias."
            )
        if bias is not None:
            values["bias"] = bias.detach().float().reshape(self.bias.shape)
        self._store_checked(values, ("weight_scale", "act_scale"), codes.device)
        self._derived.clear()
        self._qparams_cache = None

    def _store_checked(self, values: dict[str, torch.Tensor], steps: tuple[str, ...], fallback_device) -> None:
        """Write ``values`` into the buffers of the same names once every shape matches and the step sizes among
        them (``steps``) are positive; on the layer's device (``fallback_device`` for a meta skeleton)."""
        for name, value in values.items():
            if value.shape != getattr(self, name).shape:
                raise ValueError(
                    f"{self._where()}: `{name}` has shape {tuple(value.shape)}, expected "
                    f"{tuple(getattr(self, name).shape)}."
                )
        if not all(bool((values[name] > 0).all()) for name in steps if name in values):
            raise ValueError(f"{self._where()}: step sizes must be positive.")
        device = self.weight_packed.device if self.weight_packed.device.type != "meta" else fallback_device
        for name, value in values.items():
            self._buffers[name] = value.to(device)

    # -- the attention's step sizes (projections of an adapter trained with quantize_attention) --------------------
    @torch.no_grad()
    def load_attention_table_(
        self, table: str, timesteps: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> None:
        """Fill the step-size table ``table`` (``"out"``: the projection's output, i.e. the attention's q, k or v;
        ``"prob"``: the softmax output) that the layout declares; shapes and signs are checked before writing."""
        names = [f"{table}_{field}" for field in TABLE_FIELDS]
        if table not in ("out", "prob") or getattr(self, names[0]) is None:
            raise ValueError(f"{self._where()}: the layout declares no attention table {table!r}.")
        values = {n: v.detach().float().reshape(-1) for n, v in zip(names, (timesteps, scale, zero_point))}
        self._store_checked(values, (names[1],), timesteps.device)

    def attention_quantizer(self, table: str) -> TemporalActQuantizer | None:
        """The temporal quantizer that step-size table ``table`` (``"out"`` or ``"prob"``) describes, for the
        attention processor (``None`` if this layer has none): a `TemporalActQuantizer` built from the stored table
        (rebuilt when the table changes), reading this layer's timestep context, so it computes exactly what the
        fake-quant model's quantizer did."""
        timesteps = getattr(self, f"{table}_timesteps")
        if timesteps is None:
            return None
        buffers = [getattr(self, f"{table}_{field}") for field in TABLE_FIELDS]
        lay = self.layout
        bits, signed = (lay.output_bits, lay.output_signed) if table == "out" else (lay.prob_bits, False)

        def build():
            quantizer = TemporalActQuantizer(
                timesteps.tolist(), bits, symmetric=signed, name=f"{self._where()}:{table}"
            )
            quantizer.to(timesteps.device)
            quantizer.step.fill_(buffers[1])
            if quantizer.zero_point is not None:
                quantizer.zero_point.fill_(buffers[2])
            quantizer.calibrated.fill_(True)
            quantizer.requires_grad_(False)
            return quantizer

        key = tuple((b.data_ptr(), b._version, str(b.device)) for b in buffers)
        quantizer = self._cached(f"attention_{table}", key, build)
        quantizer.context = self.context
        return quantizer

    # -- helpers -------------------------------------------------------------------------------------------------------
    def _where(self) -> str:
        return self.name or type(self).__name__

    def extra_repr(self) -> str:
        lay = self.layout
        gran = "per-channel" if lay.group_size is None else f"group={lay.group_size}"
        if lay.act_granularity == "token":
            acts = "dynamic per-token activations"
        elif lay.act_granularity == "group":
            acts = f"dynamic activations group={lay.act_group_size}"
        else:
            acts = f"timesteps={lay.num_timesteps}"
        return (
            f"W{lay.weight_bits}A{lay.act_bits}{' signed-act' if lay.act_signed else ''}, {gran}, "
            f"{acts}, kernel_preference={kernel_preference_of(self).value!r}"
        )

    def _cached(self, name: str, key: tuple, build: Callable[[], object]) -> object:
        hit = self._derived.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._derived[name] = (key, value)
        return value

    def _weight_key(self) -> tuple:
        wp, ws = self.weight_packed, self.weight_scale
        return (wp.data_ptr(), wp._version, ws.data_ptr(), ws._version, str(wp.device))

    def int8_weight(self) -> torch.Tensor:
        """The weight codes as ``int8`` ``(C_out, K)`` (4-bit codes unpacked; they are a subset of the int8 range)."""
        return unpack_weight_codes(self.weight_packed, self.layout.packed_bits, self.k)

    def dequantized_weight(self) -> torch.Tensor:
        """``s_w * q_w`` in float32, in the shape of the original weight."""
        return dequantize_weight(self.int8_weight(), self.weight_scale).reshape(self._weight_shape())

    def _weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _product_geometry(self) -> tuple:
        """What the shape of the integer product's output depends on besides its input (see `layer_key`)."""
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        # Integer layers keep float32 scales: refuse a dtype cast before anything is changed.
        device = self.weight_scale.device if self.weight_scale.device.type != "meta" else "cpu"
        probe = fn(torch.zeros((), dtype=torch.float32, device=device))
        if isinstance(probe, torch.Tensor) and probe.dtype != torch.float32:
            raise TypeError(
                f"{self._where()}: an exported integer layer cannot be cast to {probe.dtype} (its codes are integers "
                f"and its scales stay float32). Cast only the float layers, e.g. load with "
                f"`from_pretrained(..., torch_dtype={probe.dtype})`, which leaves the integer layers as they are."
            )
        self._derived.clear()
        self._qparams_cache = None
        return super()._apply(fn, recurse)

    # -- activation step sizes -------------------------------------------------------------------------------------
    def _sample_timesteps(self, batch: int) -> torch.Tensor:
        """The timestep of each of the ``batch`` samples of this call (from the shared context)."""
        context = self.context
        if context is None:
            raise RuntimeError(
                f"{self._where()}: no TimestepContext is attached. Export with diffusers_qalora.export_quantized or "
                f"load with from_pretrained (both install the timestep hook), or call "
                f"diffusers_qalora.export.attach_integer_context(model)."
            )
        if batch == 0:
            return context.timesteps.reshape(-1)[:1].float()
        return context.per_sample(batch, self._where())

    def _timestep_groups(self, timesteps: torch.Tensor) -> list[tuple[torch.Tensor, float, float]]:
        """``[(sample indices, step size, zero point)]``, one entry per distinct timestep (for kernels that take one
        step size per call)."""
        positions: dict[float, list[int]] = {}
        for i, v in enumerate(timesteps.tolist()):
            positions.setdefault(v, []).append(i)
        return [(torch.tensor(idx), *self._qparams_at(v)) for v, idx in positions.items()]

    def _qparams_at(self, t: float) -> tuple[float, float]:
        """Step size and zero point at timestep ``t`` (memoised per table state)."""
        key = tuple((b.data_ptr(), b._version) for b in (self.act_timesteps, self.act_scale, self.act_zero_point))
        memo = self._qparams_cache
        if memo is None or memo[0] != key or len(memo[1]) > 4096:
            memo = self._qparams_cache = (key, {})
        hit = memo[1].get(t)
        if hit is None:
            s, z = lookup_act_qparams(
                self.act_timesteps, self.act_scale, self.act_zero_point, torch.tensor([t], dtype=torch.float32)
            )
            hit = memo[1][t] = (float(s), float(z))
        return hit

    def _table_key(self) -> tuple:
        return tuple((b.data_ptr(), b._version) for b in (self.act_timesteps, self.act_scale, self.act_zero_point))

    def _dense_qparams(self) -> tuple[int, torch.Tensor, torch.Tensor, float, float]:
        """``(first, scale, zero_point, z_min, z_max)``: the step size and zero point at every integer timestep from
        ``first = floor(table[0])`` to ``ceil(table[-1])`` (computed by the same lookup, so the same values), and the
        range of the rounded zero points at any timestep (interpolation stays between the table's extremes)."""

        def build():
            table = self.act_timesteps
            first, last = math.floor(float(table[0])), math.ceil(float(table[-1]))
            grid = torch.arange(first, last + 1, dtype=torch.float32, device=table.device)
            if grid.numel() > 100_000:  # an unusual timestep scale: no dense table, interpolate per call
                grid = grid[:0]
            scale, zero_point = lookup_act_qparams(table, self.act_scale, self.act_zero_point, grid)
            z = torch.round(self.act_zero_point)
            return first, scale, zero_point, float(z.min()), float(z.max())

        return self._cached("dense_qparams", self._table_key(), build)

    def _dense_index(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Positions of integer ``timesteps`` in the dense table (``None`` for fractional ones), computed once per
        denoiser call and shared by the layers."""
        first, dense_scale = self._dense_qparams()[:2]
        source = self.context.timesteps if self.context is not None else None
        key = (
            id(source),
            getattr(source, "_version", None),
            timesteps.shape[0],
            str(timesteps.device),
            first,
            dense_scale.numel(),
        )
        hit = _INDICES.get(key)
        if hit is None or hit[0] is not source:
            if len(_INDICES) > 16:
                _INDICES.clear()
            t = timesteps.to(device=dense_scale.device, dtype=torch.float32)
            index = None
            if dense_scale.numel() and bool((t == torch.round(t)).all()):
                index = (t.long() - first).clamp_(0, dense_scale.numel() - 1)
            hit = _INDICES[key] = (source, index)
        return hit[1]

    def sample_qparams(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step size and zero point of each sample, ``(B,)`` float32 each, with the same operations as the fake-quant
        model's lookup (so the same values).  Integer timesteps (what DDPM/DDIM-style schedulers produce) read a
        dense per-layer table."""
        _, dense_scale, dense_zero_point, _, _ = self._dense_qparams()
        index = self._dense_index(timesteps)
        if index is not None:
            return dense_scale[index], dense_zero_point[index]
        t = timesteps.to(device=self.act_timesteps.device, dtype=torch.float32)
        return lookup_act_qparams(self.act_timesteps, self.act_scale, self.act_zero_point, t)

    def _sample_terms(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(s_b, 1 / s_b, z_b, s_b * z_b)`` per sample for the oneDNN path, ``z_b`` in the ``uint8`` domain: one
        gather from a dense ``(4, T)`` table for integer timesteps."""
        off = self.layout.act_offset

        def build():
            _, scale, zero_point, _, _ = self._dense_qparams()
            z = zero_point + off
            return torch.stack([scale, torch.reciprocal(scale), z, scale * z])

        index = self._dense_index(timesteps)
        if index is not None:
            terms = self._cached("dense_terms", self._table_key(), build)
            return terms.index_select(1, index).unbind(0)
        scale, zero_point = self.sample_qparams(timesteps)
        z = zero_point + off
        return scale, torch.reciprocal(scale), z, scale * z

    # -- forward -------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._forward_compiled(x)
        return self._forward_eager(x)

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout.dynamic_activations:
            return self._forward_dynamic(x)
        timesteps = self._sample_timesteps(x.shape[0])
        values = timesteps.tolist()
        if x.shape[0] == 0 or all(v == values[0] for v in values):
            return self._forward_group(x, *self._qparams_at(values[0]))
        # Samples at different timesteps: their step sizes are a per-sample (per-row) scale.
        impl = resolve_integer_kernel(kernel_preference_of(self), x.device, self.op, self._where())
        view = (-1,) + (1,) * (x.dim() - 1)
        if impl == "torch":
            # One call with per-sample step sizes, as the fake-quant model computes it (bit-identical).
            scale, zero_point = self.sample_qparams(timesteps)
            return self._reference(x, scale.reshape(view).to(x.device), zero_point.reshape(view).to(x.device))
        if impl == "onednn":
            lo, hi = self.layout.act_code_range
            off = self.layout.act_offset
            z_min, z_max = self._dense_qparams()[3:]
            if z_min + off >= 0 and z_max + off <= 255:
                return self._onednn_per_sample(x, self._sample_terms(timesteps), lo + off, hi + off)
            scale, zero_point = self.sample_qparams(timesteps)
            return self._reference(x, scale.reshape(view), zero_point.reshape(view))
        if getattr(impl, "per_sample_qparams", False):
            # The kernel gathers each sample's step size and zero point itself: one call for the whole batch.
            scale, zero_point = self.sample_qparams(timesteps)
            return impl(self, x, scale.to(x.device), zero_point.to(x.device))
        out = None  # a registered kernel that takes one step size per call: one call per distinct timestep
        for index, scale, zero_point in self._timestep_groups(timesteps):
            y = self._forward_group(x.index_select(0, index.to(x.device)), scale, zero_point)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, index.to(y.device), y)
        return out

    def _forward_group(self, x: torch.Tensor, scale: float, zero_point: float) -> torch.Tensor:
        impl = resolve_integer_kernel(kernel_preference_of(self), x.device, self.op, self._where())
        if impl == "torch":
            return self._reference(x, scale, zero_point)
        if impl == "onednn":
            lo, hi = self.layout.act_code_range
            off = self.layout.act_offset
            z = int(zero_point) + off
            if 0 <= z <= 255:
                return self._onednn(x, scale, z, lo + off, hi + off)
            # A zero point outside the uint8 range (a drifted learned one) cannot be expressed in uint8 codes.
            return self._reference(x, scale, zero_point)
        return impl(self, x, scale, zero_point)

    # -- torch.compile ---------------------------------------------------------------------------------------------
    def _compiled_route(self, device_type: str) -> tuple | None:
        """``(key, zero_point, padded)`` of the traced path on ``device_type`` (`diffusers_qalora.export.compiled`),
        or ``None`` where the layer runs its eager forward instead: dynamic activations, a kernel other than oneDNN,
        a zero point outside ``uint8``, or differing zero points with a zero padding no code can fill."""
        if self.layout.dynamic_activations or self.context is None:
            return None
        impl = resolve_integer_kernel(kernel_preference_of(self), torch.device(device_type), self.op, self._where())
        if impl != "onednn":
            return None
        lo, hi = (v + self.layout.act_offset for v in self.layout.act_code_range)
        z_min, z_max = (v + self.layout.act_offset for v in self._dense_qparams()[3:])
        if z_min < 0 or z_max > 255:
            return None
        common = self._shared_zero_point()
        padded = common is None and any(self._traced_padding())
        if padded and not (lo <= z_min and z_max <= hi):
            return None
        return layer_key(self), 0 if common is None else common, padded

    def _traced_padding(self) -> tuple[int, int]:
        return (0, 0)

    def _forward_compiled(self, x: torch.Tensor) -> torch.Tensor:
        """The traced forward: the quantization as tensor operations for the compiler to fuse, the product as one
        custom op; every batch on the per-sample path."""
        route = _compiled_route(self, x.device.type)
        if route is None:
            return _forward_eager(self, x)
        key, zero_point, padded = route
        view = (-1,) + (1,) * (x.dim() - 1)
        timesteps = self._sample_timesteps(x.shape[0])
        scale, act_zero_point = lookup_act_qparams(self.act_timesteps, self.act_scale, self.act_zero_point, timesteps)
        z = act_zero_point + self.layout.act_offset
        lo, hi = (v + self.layout.act_offset for v in self.layout.act_code_range)
        x, padding = self._pad_input(x)
        if padded:  # a zero of the padding quantizes to its sample's own zero point
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        v = x.float()
        v = v / scale.reshape(view) if self.exact_activation_rounding else v * torch.reciprocal(scale).reshape(view)
        codes = torch.clamp(torch.round(v) + z.reshape(view), lo, hi).to(torch.uint8)
        return self._traced_product(x, codes, scale, scale * z, key, zero_point, padded)

    def _traced_product(self, x, codes, scale, scaled_zero_point, key, zero_point, padded) -> torch.Tensor:
        raise NotImplementedError

    def _compiled_product(
        self, codes: torch.Tensor, scale: torch.Tensor, scaled_zero_point: torch.Tensor, zero_point: int, padded: bool
    ) -> torch.Tensor:
        """Run time of `diffusers_qalora::integer_product`: a runner built once per layer state (weights, bias,
        tables, kernel preference, device and the graph's route), so that a call costs its oneDNN product and a few
        Python operations.  A state that no longer gives the route the graph was traced with is refused."""
        buffers = self._buffers
        state = (
            tuple((t.data_ptr(), t._version) for t in map(buffers.get, _RUNNER_STATE) if t is not None),
            kernel_preference_of(self),
            codes.device.type,
            zero_point,
            padded,
        )

        def build():
            route = self._compiled_route(codes.device.type)
            if route is None or route[1:] != (zero_point, padded):
                raise RuntimeError(
                    f"{self._where()}: the layer's activation tables or kernel preference changed after torch.compile "
                    f"traced it; compile the model again (torch.compiler.reset(), then torch.compile)."
                )
            return self._compiled_runner(padded, self._shared_zero_point(), codes.shape)

        return self._cached("compiled_runner", state, build)(codes, scale, scaled_zero_point)

    def _compiled_runner(
        self, padded: bool, common: int | None, input_shape: Sequence[int]
    ) -> Callable[..., torch.Tensor]:
        """``run(codes, scale, scaled_zero_point)``: a batch at one step size and zero point goes straight to the
        bound oneDNN product (`_single_product`), others (and weights in several packs) to
        [`_product_with_epilogue`]; the decision [`_product_per_sample`] makes, taken once per call."""
        product = self._single_product(padded, input_shape)
        # The layer caches this runner: a strong reference back would keep a deleted layer (and its packed weights)
        # alive until the cycle collector runs.
        layer = weakref.proxy(self)

        def run(codes: torch.Tensor, scale: torch.Tensor, scaled_zero_point: torch.Tensor) -> torch.Tensor:
            batch = None if product is None else layer._batch_qparams(scale, scaled_zero_point, common, 1)
            if batch is None:
                return layer._product_with_epilogue(codes, scale, scaled_zero_point, common, padded)
            return product(codes, *batch)

        return run

    def _single_product(self, padded: bool, input_shape: Sequence[int]) -> Callable[..., torch.Tensor] | None:
        """`onednn_product` of the layer's weight (``None`` for a weight in several groups, which takes one product
        per group), for codes of ``input_shape``."""
        raise NotImplementedError

    def _compiled_product_like(self, codes: torch.Tensor, padded: bool) -> torch.Tensor:
        raise NotImplementedError

    def _product_per_sample(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        scaled_zero_point: torch.Tensor,
        common: int | None,
        padded: bool,
        tap_sums: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The product of codes at per-sample step sizes: oneDNN's output stage when the batch shares one step size
        and zero point ([`_batch_qparams`]), else [`_product_with_epilogue`]."""
        raise NotImplementedError

    def _product_with_epilogue(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        scaled_zero_point: torch.Tensor,
        common: int | None,
        padded: bool,
        tap_sums: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """oneDNN at step 1 and zero point ``common`` (or 0), one product per weight pack, then the per-row epilogue
        [`_per_sample_epilogue`]."""
        raise NotImplementedError

    # -- dynamic activations (act_granularity "token" / "group") -----------------------------------------------
    channel_dim: int = -1

    def _act_granularity(self) -> PerToken | PerGroup:
        size = self.layout.act_group_size
        return PerToken() if size is None else PerGroup(size)

    def _forward_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """Step sizes from ``x`` itself per token (group): no timestep lookup, so a batch of mixed timesteps costs the
        same as any other.  oneDNN runs one integer GEMM per kernel tap and channel segment (see
        [`_dynamic_segments`]) with the per-token scales in the epilogue; other preferences run the reference."""
        impl = resolve_integer_kernel(kernel_preference_of(self), x.device, self.op, self._where())
        if impl == "onednn" and x.numel():
            return self._onednn_dynamic(x)
        x, padding = self._pad_input(x)
        lay = self.layout
        x_hat = dynamic_fake_quantize(x, lay.act_bits, lay.act_signed, self._act_granularity(), self.channel_dim)
        return self._float_forward(x_hat, padding)

    def _token_codes(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, s, s * z)`` of a ``(M, C)`` token matrix: ``uint8`` codes ``(M, C)`` (signed codes offset by
        128) and, per token and activation group, the step size and the step times the ``uint8`` zero point
        ``(M, G)``.  The step sizes and the rounding are the fake-quant model's (``x / s`` rounded half to even), so
        the codes are the same."""
        lay = self.layout
        m, channels = tokens.shape
        rows = tokens.float().reshape(-1, lay.act_group_size or channels)
        step, zero_point = dynamic_qparams(rows, lay.act_bits, lay.act_signed, PerToken(), -1)
        qmin, qmax = lay.act_code_range
        off = lay.act_offset
        z = step.new_full((), float(off)) if zero_point is None else zero_point.add_(off)
        codes = torch.div(rows, step).round_().add_(z).clamp_(qmin + off, qmax + off).to(torch.uint8)
        return codes.reshape(m, channels), step.reshape(m, -1), (step * z).reshape(m, -1)

    def _group_weight_sums(self, weight: torch.Tensor) -> torch.Tensor:
        """``sum over the input channels c of activation group g of s_w[o, c] * q_w[o, c, ...]``:
        ``(C_out, G, *kernel)`` float32 (exact integer sums in float64); ``weight`` is ``(C_out, C_in, *kernel)``."""
        channels = self._in_channels()
        act = self.layout.act_group_size or channels
        weight_groups = self.weight_scale.shape[1]
        s_w = self.weight_scale.double().repeat_interleave(channels // weight_groups, dim=1)  # (C_out, C_in)
        scaled = weight.double() * s_w.reshape(*s_w.shape, *([1] * (weight.dim() - 2)))
        return scaled.reshape(weight.shape[0], channels // act, act, *weight.shape[2:]).sum(2).float()

    def _dynamic_segments(self) -> list[tuple[int, int, int, int]]:
        """``[(start, stop, activation group, weight group)]`` over the input channels: the coarsest split on which
        both the activation step (per group) and the weight step (per group) are constant."""
        channels = self._in_channels()
        act = self.layout.act_group_size or channels
        weight = channels // self.weight_scale.shape[1]
        size = math.gcd(act, weight)
        return [(a, a + size, a // act, a // weight) for a in range(0, channels, size)]

    def _float_forward(self, x_hat: torch.Tensor, padding) -> torch.Tensor:
        raise NotImplementedError

    def _onednn_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reference_input(self, x: torch.Tensor, scale, zero_point) -> torch.Tensor:
        """``scale``/``zero_point``: Python numbers, or per-sample tensors shaped to broadcast against ``x``."""
        qmin, qmax = self.layout.act_code_range
        s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        z = torch.as_tensor(zero_point, dtype=torch.float32, device=x.device)
        return dequantize_activation_reference(x, s, z, qmin, qmax)

    def _reference_weight(self) -> torch.Tensor:
        return self._cached("float_weight", self._weight_key(), self.dequantized_weight)

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        return x, None

    def _reference(self, x: torch.Tensor, scale: float, zero_point: float) -> torch.Tensor:
        raise NotImplementedError

    def _onednn(self, x: torch.Tensor, scale: float, zero_point: int, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError

    def _onednn_per_sample(self, x: torch.Tensor, terms: tuple[torch.Tensor, ...], lo: int, hi: int) -> torch.Tensor:
        """The integer path for a batch with one step size ``s_b`` and ``uint8`` zero point ``z_b`` per sample
        (``terms``: [`_sample_terms`]), in one kernel call.

        oneDNN takes one activation step size and zero point per call, so the kernel runs with step 1 and zero point
        ``z``, the zero point all samples share, or 0 when they differ; its float output is
        ``A = s_w * sum (q - z) q_w``.  The per-sample scale and zero point are a per-row epilogue, one pass:
        ``y = s_b * A + (bias - s_b * (z_b - z) * M)`` with ``M = s_w * sum q_w`` over all weight taps.  A
        convolution with zero padding and differing zero points gets its input padded with each sample's ``z_b``
        (the code of 0), so that every tap meets a code and ``M`` is one number per output channel.
        """
        raise NotImplementedError

    def _tap_sums(self) -> torch.Tensor:
        """``M[o] = sum_g s_w[o, g] * sum q_w[o, c, ...]`` over the input channels ``c`` of group ``g`` and all
        kernel taps (float32, ``(C_out,)``; integer sums exact in float64)."""

        def build():
            codes = self.int8_weight().double().reshape(self.weight_scale.shape[0], self._in_channels(), -1).sum(2)
            return sum(
                codes[:, a:b].sum(1) * self.weight_scale[:, g].double() for g, (a, b) in enumerate(self._group_slices())
            ).float()

        return self._cached("tap_sums", self._weight_key(), build)

    def _batch_qparams(
        self, scale: torch.Tensor, scaled_zero_point: torch.Tensor, common: int | None, packs: int
    ) -> tuple[float, int] | None:
        """``(s, z)`` when every sample of the batch has the same step size ``s`` and ``uint8`` zero point ``z`` (one
        timestep, or timesteps at one table entry) and the weight is one pack: oneDNN then applies the whole
        dequantization in its own output stage, ``s * s_w * sum (q - z) q_w + bias`` (the shared-timestep path's
        call), and the per-row epilogue's pass over the output is skipped.  Else ``None``."""
        if packs != 1 or not scale.numel():
            return None
        # Compared as Python floats: a batch's worth of numbers, cheaper than tensor comparisons at every layer.
        steps = scale.tolist()
        s = steps[0]
        if steps.count(s) != len(steps):
            return None
        if common is not None:
            return s, common
        scaled = scaled_zero_point.tolist()
        sz = scaled[0]
        if scaled.count(sz) != len(scaled):
            return None
        # ``s * z`` of an integer ``z <= 255`` in float32: the quotient is within 1e-4 of ``z``.
        z = round(sz / s)
        return (s, z) if 0 <= z <= 255 else None

    def _shared_zero_point(self) -> int | None:
        """The ``uint8`` zero point of every timestep when the table's is constant (signed codes: 128), else ``None``
        (samples at different timesteps are then taken to differ)."""
        z_min, z_max = self._dense_qparams()[3:]
        return int(z_min) + self.layout.act_offset if z_min == z_max else None

    def _per_sample_epilogue(
        self,
        acc: torch.Tensor,
        terms: tuple[torch.Tensor, ...],
        shared: bool,
        channel_view: tuple[int, ...],
        tap_sums: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``s_b * acc + (bias - s_b * z_b * M)`` in place on ``acc`` (``(B, ...)``), one pass; the ``z_b`` term only
        when the kernel ran with zero point 0 (``shared=False``).  ``M`` is [`_tap_sums`] unless ``tap_sums`` gives
        it (a map over output positions)."""
        view = (-1,) + (1,) * (acc.dim() - 1)
        scale, _, _, scaled_zero_point = terms
        s = scale.reshape(view)
        bias = None if self.bias is None else self.bias.reshape(channel_view)
        if shared:
            return acc.mul_(s) if bias is None else torch.addcmul(bias, acc, s, out=acc)
        tap_sums = self._tap_sums().reshape(channel_view) if tap_sums is None else tap_sums
        if bias is None:
            offset = torch.mul(scaled_zero_point.reshape(view), tap_sums).neg_()
        else:
            offset = torch.addcmul(bias, scaled_zero_point.reshape(view), tap_sums, value=-1.0)
        return torch.addcmul(offset, acc, s, out=acc)

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32

    def _group_slices(self) -> list[tuple[int, int]]:
        """``[(start, stop)]`` of the input channels of each weight group."""
        groups = self.weight_scale.shape[1]
        size = self._in_channels() // groups
        return [(g * size, (g + 1) * size) for g in range(groups)]

    def _in_channels(self) -> int:
        raise NotImplementedError


class IntegerLinear(IntegerLayer):
    """Integer replacement of ``nn.Linear``: ``y = s_x * s_w * ((q_x - z_x) @ q_w^T) + b``."""

    op = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        layout: IntegerLayout,
        device: torch.device | str | None = None,
    ) -> None:
        if layout.kind != "linear":
            raise ValueError(f"IntegerLinear needs a 'linear' layout, got {layout.kind!r}.")
        super().__init__(layout, out_features, in_features, 1, bias, device)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: IntegerLayout, device=None) -> IntegerLinear:
        """Empty integer layer with the shape of ``linear`` (on ``device``; ``"meta"`` for a skeleton)."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, layout, device=device)

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def _in_channels(self) -> int:
        return self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()

    def _product_geometry(self) -> tuple:
        return (self.in_features, self.out_features)

    def _reference(self, x, scale, zero_point):
        return self._float_forward(self._reference_input(x, scale, zero_point).to(x.dtype), None)

    def _float_forward(self, x_hat, padding):
        weight = self._reference_weight().to(x_hat.dtype)
        bias = None if self.bias is None else self.bias.to(x_hat.dtype)
        return F.linear(x_hat, weight, bias)

    def _dynamic_prepacked(self):
        """Per channel segment ``(start, stop, activation group, oneDNN's packed weight, step sizes)``, and the
        zero-point weights `_group_weight_sums` transposed to ``(G, C_out)``."""

        def build():
            weight = self.int8_weight()
            segments = [
                (a, b, ag, prepack_linear(weight[:, a:b]), self.weight_scale[:, wg].contiguous())
                for a, b, ag, wg in self._dynamic_segments()
            ]
            return segments, self._group_weight_sums(weight).t().contiguous()

        return self._cached("onednn_dynamic", self._weight_key(), build)

    def _onednn_dynamic(self, x):
        codes, step, scaled_zero = self._token_codes(x.reshape(-1, self.in_features))
        segments, zero_weights = self._dynamic_prepacked()
        # bias - (s * z) @ M: the zero points of all groups in one small matmul, then s * acc per segment
        y = self._zero_point_term(scaled_zero, zero_weights)
        for a, b, ag, w, s_w in segments:
            part = linear_onednn(codes[:, a:b].contiguous(), 1.0, 0, w, s_w, None, torch.float32)
            y.addcmul_(part, step[:, ag : ag + 1])
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _zero_point_term(self, scaled_zero: torch.Tensor, zero_weights: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.mm(scaled_zero, zero_weights).neg_()
        return torch.addmm(self.bias.float(), scaled_zero, zero_weights, alpha=-1.0)

    def _prepacked(self):
        def build():
            weight = self.int8_weight()
            return [
                (prepack_linear(weight[:, a:b]), self.weight_scale[:, g].contiguous())
                for g, (a, b) in enumerate(self._group_slices())
            ]

        return self._cached("onednn", self._weight_key(), build)

    def _onednn(self, x, scale, zero_point, lo, hi):
        codes = quantize_activation_uint8(x, scale, zero_point, lo, hi, self.exact_activation_rounding)
        y = self._product_at_step(codes.reshape(-1, self.in_features), scale, zero_point, self._out_dtype(x))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _product_at_step(self, codes, scale, zero_point, out_dtype):
        """oneDNN's product of codes at one step size and zero point, dequantized with the bias in its output stage
        (weight groups: one call per group, summed)."""
        packed = self._prepacked()
        if len(packed) == 1:
            return linear_onednn(codes, scale, zero_point, packed[0][0], packed[0][1], self.bias, out_dtype)
        y = None
        for g, ((a, b), (w, s)) in enumerate(zip(self._group_slices(), packed)):
            part = linear_onednn(
                codes[:, a:b].contiguous(), scale, zero_point, w, s, self.bias if g == 0 else None, torch.float32
            )
            y = part if y is None else y.add_(part)
        return y.to(out_dtype)

    def _onednn_per_sample(self, x, terms, lo, hi):
        scale, inv_scale, zero_point, scaled_zero_point = terms
        codes = quantize_activation_uint8_per_sample(
            x, scale, zero_point, lo, hi, self.exact_activation_rounding, inv_scale=inv_scale
        )
        y = self._product_per_sample(
            codes.reshape(-1, self.in_features), scale, scaled_zero_point, self._shared_zero_point(), False
        )
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _product_per_sample(self, codes, scale, scaled_zero_point, common, padded, tap_sums=None):
        packed = self._prepacked()
        batch = self._batch_qparams(scale, scaled_zero_point, common, len(packed))
        if batch is not None:
            return self._product_at_step(codes, *batch, torch.float32)
        return self._product_with_epilogue(codes, scale, scaled_zero_point, common, padded)

    def _product_with_epilogue(self, codes, scale, scaled_zero_point, common, padded, tap_sums=None):
        packed = self._prepacked()
        acc = None
        for (a, b), (w, s) in zip(self._group_slices(), packed):
            part = linear_onednn(
                codes if len(packed) == 1 else codes[:, a:b].contiguous(), 1.0, common or 0, w, s, None, torch.float32
            )
            acc = part if acc is None else acc.add_(part)
        acc = acc.reshape(scale.shape[0], -1, self.out_features)
        terms = (scale, None, None, scaled_zero_point)
        return self._per_sample_epilogue(acc, terms, common is not None, (self.out_features,)).reshape(
            -1, self.out_features
        )

    def _single_product(self, padded, input_shape):
        packed = self._prepacked()
        return onednn_product(*packed[0], self.bias) if len(packed) == 1 else None

    def _traced_product(self, x, codes, scale, scaled_zero_point, key, zero_point, padded):
        y = integer_product(codes.reshape(-1, self.in_features), scale, scaled_zero_point, key, zero_point, padded)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _compiled_product_like(self, codes, padded):
        return codes.new_empty((codes.shape[0], self.out_features), dtype=torch.float32)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


class IntegerConv2d(IntegerLayer):
    """Integer replacement of ``nn.Conv2d`` (groups = 1); zero padding pads with the activation zero point, i.e.
    with the value 0, as the float convolution does."""

    op = "conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        layout: IntegerLayout | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if layout is None or layout.kind != "conv2d":
            raise ValueError(f"IntegerConv2d needs a 'conv2d' layout, got {getattr(layout, 'kind', None)!r}.")
        if isinstance(padding, str):
            raise ValueError(f"IntegerConv2d takes explicit padding, got {padding!r}; export resolves 'same'/'valid'.")
        kernel_size = _pair(kernel_size)
        super().__init__(layout, out_channels, in_channels, kernel_size[0] * kernel_size[1], bias, device)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = 1
        self.padding_mode = padding_mode
        # oneDNN computes in channels-last and returns channels-last outputs.  They are kept so by default: turning
        # them back to NCHW costs a transposing copy per layer (more than the GroupNorm that follows loses on
        # channels-last inputs), and the next integer conv wants channels-last codes anyway.  The denoiser's output is
        # made contiguous again by the hook of `attach_integer_context`.
        self.channels_last_output = True
        self._reversed_padding_repeated_twice = [p for p in reversed(self.padding) for _ in range(2)]

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, layout: IntegerLayout, device=None) -> IntegerConv2d:
        """Empty integer layer with the geometry of ``conv`` (groups = 1)."""
        if conv.groups != 1:
            raise ValueError(f"IntegerConv2d supports groups=1 only, got groups={conv.groups}.")
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # "same" with stride 1 (the only stride torch allows for it)
                padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
                if any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
                    raise ValueError(
                        "padding='same' with an even kernel is asymmetric; IntegerConv2d cannot export it."
                    )
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            padding,
            conv.dilation,
            conv.bias is not None,
            conv.padding_mode,
            layout,
            device=device,
        )

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _in_channels(self) -> int:
        return self.in_channels

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, " + super().extra_repr()
        )

    def _product_geometry(self) -> tuple:
        return (self.in_channels, self.out_channels, *self.kernel_size, *self.stride, *self.padding, *self.dilation)

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)

    channel_dim = 1

    def _reference(self, x, scale, zero_point):
        x, padding = self._pad_input(x)
        return self._float_forward(self._reference_input(x, scale, zero_point).to(x.dtype), padding)

    def _float_forward(self, x_hat, padding):
        weight = self._reference_weight().to(x_hat.dtype)
        bias = None if self.bias is None else self.bias.to(x_hat.dtype)
        return F.conv2d(x_hat, weight, bias, self.stride, padding, self.dilation, 1)

    def _dynamic_prepacked(self):
        """Per kernel tap (row-major), per channel segment ``(start, stop, activation group, oneDNN's packed
        (C_out, segment) weight of that tap, step sizes)``; and the zero-point kernel `_group_weight_sums`
        ``(C_out, G, kh, kw)``."""

        def build():
            weight = self.int8_weight().reshape(self._weight_shape())
            segments = [
                [
                    (a, b, ag, prepack_linear(weight[:, a:b, i, j]), self.weight_scale[:, wg].contiguous())
                    for a, b, ag, wg in self._dynamic_segments()
                ]
                for i in range(self.kernel_size[0])
                for j in range(self.kernel_size[1])
            ]
            return segments, self._group_weight_sums(weight)

        return self._cached("onednn_dynamic", self._weight_key(), build)

    def _onednn_dynamic(self, x):
        """A convolution whose input step size changes from pixel to pixel cannot take it out of the sum over the
        kernel window, so it runs as one GEMM per kernel tap (the shifted input against that tap's weights), each
        scaled by its pixels' step sizes; the multiply-adds are the convolution's.  The zero points' part is a
        float convolution of the ``s * z`` map (one channel per activation group) with the weight sums."""
        x, padding = self._pad_input(x)
        n, channels, height, width = x.shape
        codes, step, scaled_zero = self._token_codes(x.permute(0, 2, 3, 1).reshape(-1, channels))
        segments, zero_kernel = self._dynamic_prepacked()
        groups = step.shape[1]
        zero_map = scaled_zero.reshape(n, height, width, groups).permute(0, 3, 1, 2)
        bias = None if self.bias is None else self.bias.float()
        y = F.conv2d(zero_map, zero_kernel.neg(), bias, self.stride, padding, self.dilation)
        _, _, h_out, w_out = y.shape
        y = y.permute(0, 2, 3, 1).reshape(-1, self.out_channels)  # (N * H_out * W_out, C_out), a view
        (ph, pw), (sh, sw), (dh, dw) = padding, self.stride, self.dilation
        # padded pixels get step 0: they add nothing, whatever their code
        codes = F.pad(codes.reshape(n, height, width, channels), (0, 0, pw, pw, ph, ph))
        step = F.pad(step.reshape(n, height, width, groups), (0, 0, pw, pw, ph, ph))
        rows = y.shape[0]
        taps = [(i, j) for i in range(self.kernel_size[0]) for j in range(self.kernel_size[1])]
        for (i, j), tap_segments in zip(taps, segments):
            window = (
                slice(None),
                slice(i * dh, i * dh + (h_out - 1) * sh + 1, sh),
                slice(j * dw, j * dw + (w_out - 1) * sw + 1, sw),
            )
            tap, tap_step = codes[window].reshape(rows, channels), step[window].reshape(rows, groups)
            for a, b, ag, w, s_w in tap_segments:
                part = linear_onednn(tap[:, a:b].contiguous(), 1.0, 0, w, s_w, None, torch.float32)
                y.addcmul_(part, tap_step[:, ag : ag + 1])
        y = y.reshape(n, h_out, w_out, self.out_channels).permute(0, 3, 1, 2)
        if not self.channels_last_output and x.is_contiguous():
            y = y.contiguous()
        return y.to(x.dtype)

    def _conv_padding(self) -> tuple[int, int]:
        return self.padding if self.padding_mode == "zeros" else (0, 0)  # other modes pad the input first

    def _prepacked(self, padding: tuple[int, int] | None = None, input_shape: Sequence[int] | None = None):
        """oneDNN's packed weights for a call with ``padding`` (the layer's own by default), laid out for codes of
        ``input_shape`` when the cache is built (`prepack_conv2d`; batch 1, which serves every batch size): another
        size still runs, with oneDNN reordering the weight where its kernel needs another layout."""
        padding = tuple(self._conv_padding() if padding is None else padding)

        def build():
            weight = self.int8_weight().reshape(self._weight_shape())
            return [
                (
                    prepack_conv2d(
                        weight[:, a:b],
                        self.weight_scale[:, g],
                        self.stride,
                        padding,
                        self.dilation,
                        1,
                        None if input_shape is None else (1, b - a, *input_shape[2:]),
                    ),
                    self.weight_scale[:, g].contiguous(),
                )
                for g, (a, b) in enumerate(self._group_slices())
            ]

        name = "onednn" if padding == tuple(self._conv_padding()) else f"onednn_padding_{padding}"
        return self._cached(name, self._weight_key(), build)

    def _onednn(self, x, scale, zero_point, lo, hi):
        x, padding = self._pad_input(x)
        codes = quantize_activation_uint8(x, scale, zero_point, lo, hi, self.exact_activation_rounding)
        codes = codes.contiguous(memory_format=torch.channels_last)
        y = self._product_at_step(codes, scale, zero_point, padding, self._out_dtype(x))
        if not self.channels_last_output and x.is_contiguous() and not y.is_contiguous():
            y = y.contiguous()
        return y.to(x.dtype)

    def _product_at_step(self, codes, scale, zero_point, padding, out_dtype):
        """oneDNN's product of channels-last codes at one step size and zero point (zero padding pads with it),
        dequantized with the bias in its output stage (weight groups: one call per group, summed)."""
        packed = self._prepacked(padding, codes.shape)
        if len(packed) == 1:
            w, s = packed[0]
            return conv2d_onednn(
                codes, scale, zero_point, w, s, self.bias, self.stride, padding, self.dilation, 1, out_dtype
            )
        y = None
        for g, ((a, b), (w, s)) in enumerate(zip(self._group_slices(), packed)):
            part = conv2d_onednn(
                codes[:, a:b].contiguous(memory_format=torch.channels_last),
                scale,
                zero_point,
                w,
                s,
                self.bias if g == 0 else None,
                self.stride,
                padding,
                self.dilation,
                1,
                torch.float32,
            )
            y = part if y is None else y.add_(part)
        return y.to(out_dtype)

    def _tap_sum_map(self, size: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
        """``M[o, i, j] = sum_g s_w[o, g] * sum q_w[o, c, u, v]`` over the taps of output position ``(i, j)`` that
        fall inside an input of spatial ``size`` (float32, ``(1, C_out, H_out, W_out)``; integer sums exact in
        float64): zero padding that oneDNN fills with the common zero point contributes nothing."""
        size = tuple(int(v) for v in size)

        def build():
            weight = self.int8_weight().reshape(self._weight_shape()).double()
            ones = torch.ones(1, self.in_channels, *size, dtype=torch.float64, device=weight.device)
            return sum(
                F.conv2d(ones[:, a:b], weight[:, a:b], None, self.stride, padding, self.dilation)
                * self.weight_scale[:, g].double().reshape(1, -1, 1, 1)
                for g, (a, b) in enumerate(self._group_slices())
            ).float()

        return self._cached(f"tap_sums_{size}_{tuple(padding)}", self._weight_key(), build)

    def _onednn_per_sample(self, x, terms, lo, hi):
        scale, inv_scale, zero_point, scaled_zero_point = terms
        x, padding = self._pad_input(x)
        common = self._shared_zero_point()
        shared = common is not None
        # Differing zero points: pad each sample with its own z_b (the code of 0), so that M is one number per output
        # channel.  A z_b outside the code range cannot be a code: then oneDNN pads, and a map of M corrects.
        z_min, z_max = (v + self.layout.act_offset for v in self._dense_qparams()[3:])
        pad_codes = not shared and any(padding) and lo <= z_min and z_max <= hi
        codes = quantize_activation_uint8_per_sample(
            x,
            scale,
            zero_point,
            lo,
            hi,
            self.exact_activation_rounding,
            padding if pad_codes else (0, 0),
            inv_scale=inv_scale,
        )
        codes = codes.contiguous(memory_format=torch.channels_last)
        tap_sums = None
        if not shared and not pad_codes and any(padding):
            tap_sums = self._tap_sum_map(x.shape[-2:], padding)
        y = self._product_per_sample(codes, scale, scaled_zero_point, common, pad_codes, tap_sums)
        if not self.channels_last_output and x.is_contiguous() and not y.is_contiguous():
            y = y.contiguous()
        return y.to(x.dtype)

    def _traced_padding(self) -> tuple[int, int]:
        return tuple(self._conv_padding())

    def _product_per_sample(self, codes, scale, scaled_zero_point, common, padded, tap_sums=None):
        padding = (0, 0) if padded else self._conv_padding()
        packed = self._prepacked(padding, codes.shape)
        batch = self._batch_qparams(scale, scaled_zero_point, common, len(packed))
        if batch is not None:
            # Padded codes (``padded``) carry ``z`` already; otherwise oneDNN pads with ``z``: the value 0 either way.
            return self._product_at_step(codes, *batch, padding, torch.float32)
        return self._product_with_epilogue(codes, scale, scaled_zero_point, common, padded, tap_sums)

    def _product_with_epilogue(self, codes, scale, scaled_zero_point, common, padded, tap_sums=None):
        padding = (0, 0) if padded else self._conv_padding()
        packed = self._prepacked(padding, codes.shape)
        acc = None
        for (a, b), (w, s) in zip(self._group_slices(), packed):
            part = conv2d_onednn(
                codes if len(packed) == 1 else codes[:, a:b].contiguous(memory_format=torch.channels_last),
                1.0,
                common or 0,
                w,
                s,
                None,
                self.stride,
                padding,
                self.dilation,
                1,
                torch.float32,
            )
            acc = part if acc is None else acc.add_(part)
        terms = (scale, None, None, scaled_zero_point)
        return self._per_sample_epilogue(acc, terms, common is not None, (1, -1, 1, 1), tap_sums)

    def _single_product(self, padded, input_shape):
        padding = (0, 0) if padded else self._conv_padding()
        packed = self._prepacked(padding, input_shape)
        if len(packed) != 1:
            return None
        return onednn_product(*packed[0], self.bias, (self.stride, padding, self.dilation))

    def _traced_product(self, x, codes, scale, scaled_zero_point, key, zero_point, padded):
        codes = codes.contiguous(memory_format=torch.channels_last)
        return integer_product(codes, scale, scaled_zero_point, key, zero_point, padded).to(x.dtype)

    def _compiled_product(self, codes, scale, scaled_zero_point, zero_point, padded):
        y = super()._compiled_product(codes, scale, scaled_zero_point, zero_point, padded)
        # The traced graph assumed the fake output's (channels-last) strides; oneDNN's can differ on size-1
        # dimensions.  Compared without allocating: an output buffer is made only where they differ.
        n, c, h, w = y.shape
        if y.stride() == (h * w * c, 1, w * c, c):
            return y
        return torch.empty_like(y, memory_format=torch.channels_last).copy_(y)

    def _compiled_product_like(self, codes, padded):
        (ph, pw) = (0, 0) if padded else self._conv_padding()
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        h = (codes.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (codes.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        shape = (codes.shape[0], self.out_channels, h, w)
        return torch.empty(shape, dtype=torch.float32, device=codes.device, memory_format=torch.channels_last)


def integer_layers(model: nn.Module) -> dict[str, IntegerLayer]:
    """All integer layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, IntegerLayer)}
