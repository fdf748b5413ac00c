"""The storage layout of one integer layer: which tensors it holds, in which dtype and shape.

An exported layer stores

* ``weight_packed`` (``uint8``): the signed weight codes of the flattened weight ``(C_out, K)`` with
  ``K = C_in * kh * kw``, packed along ``K`` (two 4-bit or four 2-bit codes per byte; 3-, 5-, 6-, 7- and 8-bit codes
  one per byte, two's complement).  ``K`` is zero-padded to a whole number of bytes;
* ``weight_scale`` (``float32``, ``(C_out, G)``): one step size per output channel (``G = 1``) or per output channel
  and group of ``group_size`` input channels (``G = C_in / group_size``);
* ``bias`` (``float32``, ``(C_out,)``), when the layer has one;
* ``act_timesteps``, ``act_scale``, ``act_zero_point`` (``float32``, ``(T,)``): the activation step-size table keyed
  by timestep value (``T = 1`` for a static step), interpolated exactly as the fake-quant model does; absent for
  dynamic activations (``act_granularity`` ``"token"`` or ``"group"``), whose step sizes are computed per call;
* ``out_*`` and ``prob_*`` (``float32``, ``(T,)``), on the ``to_q``/``to_k``/``to_v`` projections of an adapter
  trained with ``quantize_attention``: the step-size tables of the projection's output (the attention's q, k or v)
  and, on ``to_v``, of the softmax output, which the attention processor applies.

The layout is what ``config.json`` records per layer, so that a loader can build the empty modules and check every
tensor of the file against it before loading anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from ..quant import validate_bits

LAYOUT_KINDS = ("linear", "conv2d")
ACT_GRANULARITIES = ("tensor", "token", "group")
TABLE_FIELDS = ("timesteps", "scale", "zero_point")
ACT_TABLE_NAMES = tuple(f"act_{field}" for field in TABLE_FIELDS)
# The step-size tables of the attention's q/k/v (``out_*``, on to_q/to_k/to_v) and softmax output (``prob_*``, on to_v).
ATTENTION_TABLE_NAMES = tuple(f"{table}_{field}" for table in ("out", "prob") for field in TABLE_FIELDS)
_PACKED_BITS = {2: 2, 4: 4}  # bit widths stored several codes per byte; every other width takes a byte


@dataclass(frozen=True)
class IntegerLayout:
    """How one exported layer is stored.

    Args:
        kind (`"linear" | "conv2d"`): the layer type.
        weight_bits (`int`): bit width of the signed weight codes, 2..8.
        act_bits (`int`): bit width of the activation codes, 2..8.
        act_signed (`bool`): signed activation codes without zero point (``act_symmetric=True``); by default the codes
            are unsigned with an integer zero point per timestep.
        group_size (`int`, *optional*): input channels per weight step; `None` for one step per output channel.
        num_timesteps (`int`): entries of the activation step-size table (1 for a static step size).
        act_granularity (`"tensor" | "token" | "group"`, defaults to `"tensor"`): a step-size table
            (``"tensor"``), or dynamic min-max step sizes per token (``"token"``) or per token and group of
            ``act_group_size`` input channels (``"group"``), computed from each input.
        act_group_size (`int`, *optional*): channels per activation group for ``act_granularity="group"``.
        output_bits (`int`, *optional*): on the ``to_q``/``to_k``/``to_v`` projections of an adapter trained with
            ``quantize_attention``: bit width of the projection's output (the attention's q, k or v), quantized by
            the attention processor with the step-size table ``out_timesteps``/``out_scale``/``out_zero_point``.
        output_signed (`bool`): signed output codes without zero point.
        output_timesteps (`int`): entries of that table (0 without one).
        prob_bits (`int`, *optional*): on ``to_v``: bit width of the softmax output (unsigned), with the table
            ``prob_timesteps``/``prob_scale``/``prob_zero_point`` of ``prob_timesteps`` entries.
        prob_timesteps (`int`): entries of that table (0 without one).
    """

    kind: Literal["linear", "conv2d"]
    weight_bits: int
    act_bits: int
    act_signed: bool = False
    group_size: int | None = None
    num_timesteps: int = 1
    act_granularity: Literal["tensor", "token", "group"] = "tensor"
    act_group_size: int | None = None
    output_bits: int | None = None
    output_signed: bool = False
    output_timesteps: int = 0
    prob_bits: int | None = None
    prob_timesteps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"`kind` must be one of {LAYOUT_KINDS}, got {self.kind!r}.")
        validate_bits(self.weight_bits, "weight_bits")
        validate_bits(self.act_bits, "act_bits")
        if not isinstance(self.act_signed, bool):
            raise TypeError(f"`act_signed` must be a bool, got {type(self.act_signed).__name__}.")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"`group_size` must be a positive integer or None, got {self.group_size!r}.")
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(f"`num_timesteps` must be a positive integer, got {self.num_timesteps!r}.")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"`act_granularity` must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}.")
        size = self.act_group_size
        bad_size = isinstance(size, bool) or not isinstance(size, int) or size < 1
        if (self.act_granularity == "group") == (size is None) or (size is not None and bad_size):
            raise ValueError(
                f"`act_group_size` must be a positive integer with act_granularity='group' and None otherwise, got "
                f"{size!r} with {self.act_granularity!r}."
            )

        for prefix in ("output", "prob"):
            bits, entries = getattr(self, f"{prefix}_bits"), getattr(self, f"{prefix}_timesteps")
            if bits is not None:
                validate_bits(bits, f"{prefix}_bits")
            bad = isinstance(entries, bool) or not isinstance(entries, int) or entries < 0
            if bad or (bits is None) != (entries == 0):
                raise ValueError(
                    f"`{prefix}_bits` and `{prefix}_timesteps` go together (a bit width and a table of at least one "
                    f"entry, or None and 0), got {bits!r} and {entries!r}."
                )
        if self.prob_bits is not None and self.output_bits is None:
            raise ValueError("`prob_bits` needs `output_bits`: the softmax output is quantized with q, k and v.")
        if not isinstance(self.output_signed, bool):
            raise TypeError(f"`output_signed` must be a bool, got {type(self.output_signed).__name__}.")

    @property
    def attention_tables(self) -> dict[str, int]:
        """``{"out": entries, "prob": entries}`` of the attention step-size tables this layer stores."""
        tables = {"out": self.output_timesteps, "prob": self.prob_timesteps}
        return {name: entries for name, entries in tables.items() if entries}

    @property
    def dynamic_activations(self) -> bool:
        """Whether the activation step sizes are computed per call (no step-size table)."""
        return self.act_granularity != "tensor"

    # -- derived sizes ---------------------------------------------------------------------------------------------
    @property
    def packed_bits(self) -> int:
        """Bits per stored code: 2 or 4 (packed), else 8."""
        return _PACKED_BITS.get(self.weight_bits, 8)

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.packed_bits

    def num_groups(self, in_channels: int) -> int:
        if self.group_size is None:
            return 1
        if in_channels % self.group_size:
            raise ValueError(
                f"`group_size` ({self.group_size}) must divide the number of input channels ({in_channels})."
            )
        return in_channels // self.group_size

    def packed_width(self, k: int) -> int:
        """Bytes per output channel for ``k`` weight codes."""
        return -(-k // self.codes_per_byte)

    def tensor_shapes(self, out_channels: int, in_channels: int, kernel_elems: int, bias: bool) -> dict[str, tuple]:
        """Expected shape of every stored tensor (``bias`` only when the layer has one)."""
        k = in_channels * kernel_elems
        shapes = {
            "weight_packed": (out_channels, self.packed_width(k)),
            "weight_scale": (out_channels, self.num_groups(in_channels)),
        }
        if self.act_granularity == "group" and in_channels % self.act_group_size:
            raise ValueError(
                f"`act_group_size` ({self.act_group_size}) must divide the number of input channels ({in_channels})."
            )
        if not self.dynamic_activations:
            shapes.update({name: (self.num_timesteps,) for name in ACT_TABLE_NAMES})
        for table, entries in self.attention_tables.items():
            shapes.update({f"{table}_{field}": (entries,) for field in TABLE_FIELDS})
        if bias:
            shapes["bias"] = (out_channels,)
        return shapes

    # -- activation code range in the uint8 domain of the kernels --------------------------------------------------
    @property
    def act_offset(self) -> int:
        """Signed codes ``q`` are stored as ``q + 128`` in ``uint8`` (zero point 128); unsigned codes as they are."""
        return 128 if self.act_signed else 0

    @property
    def act_code_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the activation codes in their own (signed or unsigned) domain."""
        if self.act_signed:
            return -(2 ** (self.act_bits - 1)), 2 ** (self.act_bits - 1) - 1
        return 0, 2**self.act_bits - 1

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Layouts without the newer options read as they did before those options existed.
        if not self.dynamic_activations:
            del data["act_granularity"], data["act_group_size"]
        if self.output_bits is None:
            for name in ("output_bits", "output_signed", "output_timesteps", "prob_bits", "prob_timesteps"):
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "layout") -> IntegerLayout:
        """Rebuild from `to_dict`; unknown or missing keys raise a ``ValueError`` naming ``where``."""
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected a dict, got {type(data).__name__}.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted({"kind", "weight_bits", "act_bits"} - set(data))
        if unknown or missing:
            raise ValueError(f"{where}: unknown keys {unknown} / missing keys {missing} in the layer layout {data!r}.")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
