"""Configuration of a (quantized) Winograd convolution."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..quant import validate_bits
from .transforms import DEFAULT_POINTS, format_point, parse_point

TILES = (2, 4, 6)
ACT_GRANULARITIES = ("position", "tile")
SCALE_INITS = ("lavin", "balanced")
WEIGHT_INITS = ("minmax", "mse")


@dataclass
class WinogradConfig:
    """Configuration of [`WinogradConv2d`]: tile size, quantization and the learnable transform scales.

    Args:
        tile (`int`, defaults to `4`):
            Output tile size ``m`` of F(m, 3): one of ``2``, ``4``, ``6`` (input tiles of ``m + 2``).
        bits (`int`, *optional*, defaults to `8`):
            Bit width of the Winograd-domain weights ``U`` and activations ``V`` (symmetric signed codes).
            ``None`` gives the full-precision Winograd convolution.
        group_size (`int`, *optional*, defaults to `None`):
            Number of consecutive input channels that share one step size, for ``U`` (per Winograd position and
            output channel) and for ``V`` (per Winograd position, or per tile, and per tile).  Must divide the
            layer's ``in_channels``.  ``None`` puts all input channels in one group.  32 matches int8 kernels
            (Q8_0-style blocks); 32 and 64 divide every 3x3 conv of SD-1.5 except ``conv_in``.
        act_granularity (`str`, defaults to `"position"`):
            Which values of ``V = B^T d B`` share a dynamic step: ``"position"`` = one step per (Winograd position,
            tile, group of input channels); ``"tile"`` = one step per (tile, group of input channels), shared by all
            ``n^2`` positions of the tile.  With ``"position"`` and ``output_bits=None`` every quantizer sits inside
            one Winograd position, so the diagonal transform scales are invisible and tuning them changes nothing.
        output_bits (`int`, *optional*, defaults to `None`):
            If set, the Hadamard-stage output ``M`` is re-quantized before the output transform, with one dynamic
            step per (tile, output channel) spanning the ``n^2`` positions (an integer output transform).  This is
            the stage where Pan et al. find the standard scales fail and the learned scales matter most.
            ``None`` keeps the output transform in floating point.
        scale_init (`str`, defaults to `"balanced"`):
            Initial transform scales: ``"balanced"`` = scale ``B^T`` and ``G`` so that all their rows have unit norm
            (see [`balanced_multipliers`]), a data-free closed form that equalises the per-position ranges and is
            within a fraction of a dB of tuned scales on random layers; ``"lavin"`` = the standard (published)
            matrices, the paper's starting point.  Both give the same full-precision result.
        weight_init (`str`, defaults to `"minmax"`):
            Step size of ``U``: ``"minmax"`` = absmax / qmax; ``"mse"`` = the absmax step times the clipping ratio
            that minimises the MSE (searched with `lp_search_qparams`, p=2).
        points (`tuple[str, ...]`, *optional*, defaults to `None`):
            Interpolation points as strings (``"0"``, ``"-1/2"``, ``"inf"``); ``None`` = the defaults of
            [`DEFAULT_POINTS`] for ``tile``.
        version (`int`, defaults to `1`):
            Format version of this config.
    """

    tile: Literal[2, 4, 6] = field(default=4, metadata={"help": "Output tile size m of F(m, 3): 2, 4 or 6."})
    bits: int | None = field(
        default=8, metadata={"help": "Bit width of the Winograd-domain weights and activations; None = full precision."}
    )
    group_size: int | None = field(
        default=None,
        metadata={"help": "Input channels per quantization group; must divide in_channels. None = one group."},
    )
    act_granularity: Literal["position", "tile"] = field(
        default="position",
        metadata={"help": "Steps of V per (position, tile, group) ('position') or per (tile, group) ('tile')."},
    )
    output_bits: int | None = field(
        default=None,
        metadata={"help": "Re-quantize M per (tile, output channel) across positions before the output transform."},
    )
    scale_init: Literal["lavin", "balanced"] = field(
        default="balanced",
        metadata={"help": "Initial transform scales: 'balanced' (unit row norms) or 'lavin' (standard matrices)."},
    )
    weight_init: Literal["minmax", "mse"] = field(
        default="minmax", metadata={"help": "Step size of the Winograd-domain weights: 'minmax' or 'mse' search."}
    )
    points: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Interpolation points as strings ('0', '-1/2', 'inf'); None = defaults."}
    )
    version: int = field(default=1, metadata={"help": "Format version of this config."})

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile not in TILES:
            raise ValueError(f"`tile` must be one of {TILES}, got {self.tile!r}.")
        if self.bits is not None:
            validate_bits(self.bits, "bits")
        if self.output_bits is not None:
            validate_bits(self.output_bits, "output_bits")
            if self.bits is None:
                raise ValueError("`output_bits` needs `bits` to be set (a quantized Hadamard stage).")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"`group_size` must be a positive integer or None, got {self.group_size!r}.")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"`act_granularity` must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}.")
        if self.scale_init not in SCALE_INITS:
            raise ValueError(f"`scale_init` must be one of {SCALE_INITS}, got {self.scale_init!r}.")
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"`weight_init` must be one of {WEIGHT_INITS}, got {self.weight_init!r}.")
        if self.points is not None:
            pts = tuple(self.points)
            if len(pts) != self.tile + 2:
                raise ValueError(
                    f"`points` must hold tile + 2 = {self.tile + 2} points for F({self.tile}, 3), got {len(pts)}."
                )
            # normalise to canonical strings (validates them too)
            self.points = tuple(format_point(parse_point(p)) for p in pts)
        if self.version != 1:
            raise ValueError(f"`version` must be 1, got {self.version!r}.")

    @property
    def resolved_points(self) -> tuple[str, ...]:
        """The interpolation points in use (the defaults when ``points`` is ``None``)."""
        return self.points if self.points is not None else DEFAULT_POINTS[self.tile]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; [`from_dict`] inverts it."""
        out = dataclasses.asdict(self)
        if out["points"] is not None:
            out["points"] = list(out["points"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WinogradConfig:
        """Rebuild a config from [`to_dict`]'s output; unknown keys raise a ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"`data` must be a dict, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown WinogradConfig keys {unknown}; valid keys are {sorted(names)}.")
        kwargs = dict(data)
        if kwargs.get("points") is not None:
            kwargs["points"] = tuple(kwargs["points"])
        return cls(**kwargs)
