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
ALGORITHMS = ("winograd", "direct")
TUNE_LOSSES = ("sqnr", "mse")
QALORA_WEIGHTS = ("quantized", "float")
QALORA_ACTS = ("keep", "drop")


@dataclass
class WinogradConfig:
    """Configuration of [WinogradConv2d][diffusers_qalora.WinogradConv2d] (tile size, quantization, learnable transform scales) and of the model-level
    replacement pass [apply_winograd][diffusers_qalora.apply_winograd] (which modules, data-free scale tuning, composition with QALoRA).

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
            (see `balanced_multipliers`), a data-free closed form that equalises the per-position ranges and is
            within a fraction of a dB of tuned scales on random layers; ``"lavin"`` = the standard (published)
            matrices, the paper's starting point.  Both give the same full-precision result.
        weight_init (`str`, defaults to `"minmax"`):
            Step size of ``U``: ``"minmax"`` = absmax / qmax; ``"mse"`` = the absmax step times the clipping ratio
            that minimises the MSE (searched with `lp_search_qparams`, p=2).
        points (`tuple[str, ...]`, *optional*, defaults to `None`):
            Interpolation points as strings (``"0"``, ``"-1/2"``, ``"inf"``); ``None`` = the defaults of
            `DEFAULT_POINTS` for ``tile``.
        algorithm (`str`, defaults to `"winograd"`):
            ``"winograd"`` replaces convs by [WinogradConv2d][diffusers_qalora.WinogradConv2d]; ``"direct"`` is the comparison baseline of
            [apply_winograd][diffusers_qalora.apply_winograd]: the same convs become [DirectQuantConv2d][diffusers_qalora.DirectQuantConv2d] (direct convolution, ``bits``-bit weights
            per output channel, ``bits``-bit inputs with one dynamic step per sample, no Winograd transform).
        target_modules (`tuple[str, ...] | str`, *optional*, defaults to `None`):
            Modules [apply_winograd][diffusers_qalora.apply_winograd] replaces: names (a name matches itself and any ``"<prefix>.<name>"``) or one
            regular expression (full match).  ``None`` = every eligible convolution; named modules that are not
            eligible raise a ``ValueError`` that says why.
        exclude_modules (`tuple[str, ...] | str`, *optional*, defaults to `None`):
            Modules never replaced (same matching rules).
        tune_steps (`int`, defaults to `0`):
            Adam steps of data-free scale tuning per replaced layer ([tune_scales_][diffusers_qalora.tune_scales_]); ``0`` = no tuning.  Tuning
            only runs where the scales are visible (see `scales_are_visible`).
        tune_lr (`float`, defaults to `0.05`):
            Adam learning rate on the log scales.
        tune_loss (`str`, defaults to `"sqnr"`):
            ``"sqnr"`` (Pan et al.'s objective, ``-SQNR`` in dB) or ``"mse"``, against the FP direct convolution.
        tune_batch_size (`int`, defaults to `8`):
            Inputs per tuning step.
        tune_samples (`int`, defaults to `32`):
            Inputs kept per layer when they are captured from ``calibration_run`` (a uniform random subset of all
            calls, so it spans the trajectory's timesteps); the per-layer SQNR is measured on all of them.
            Memory: ``tune_samples * C * H * W * 4`` bytes per layer during [apply_winograd][diffusers_qalora.apply_winograd].
        tune_input_size (`int`, defaults to `16`):
            Side of the random N(0, 1) inputs used when no ``calibration_run`` is given.
        tune_seed (`int`, defaults to `0`):
            Seed of the random inputs, the captured subsets and the minibatches.
        qalora_weight (`str`, defaults to `"quantized"`):
            Spatial weight of a replaced QALoRA ``Conv2d``: ``"quantized"`` = ``Q_w(W0 + scaling B A)``, the weight the
            distilled student computes with (what QALoRA's ``merge`` writes); ``"float"`` = ``W0 + scaling B A``
            before weight quantization (``merged_float_weight``).  The Winograd layer then quantizes ``G w G^T``.
        qalora_act (`str`, defaults to `"keep"`):
            ``"keep"`` moves a replaced QALoRA layer's (timestep-keyed) activation quantizer into the Winograd layer
            as its ``input_quantizer``, applied to the spatial input before the input transform, so the student's
            activation quantization is unchanged; ``"drop"`` discards it (the input is then quantized only in the
            Winograd domain).
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
    algorithm: Literal["winograd", "direct"] = field(
        default="winograd",
        metadata={"help": "'winograd', or 'direct' for the direct-conv W/A quantized comparison baseline."},
    )
    target_modules: tuple[str, ...] | str | None = field(
        default=None, metadata={"help": "Modules to replace (names or one regex); None = every eligible conv."}
    )
    exclude_modules: tuple[str, ...] | str | None = field(
        default=None, metadata={"help": "Modules never to replace (names or one regex)."}
    )
    tune_steps: int = field(default=0, metadata={"help": "Scale-tuning steps per layer; 0 = no tuning."})
    tune_lr: float = field(default=0.05, metadata={"help": "Adam learning rate on the log transform scales."})
    tune_loss: Literal["sqnr", "mse"] = field(
        default="sqnr", metadata={"help": "Tuning loss against the FP direct conv: 'sqnr' or 'mse'."}
    )
    tune_batch_size: int = field(default=8, metadata={"help": "Inputs per tuning step."})
    tune_samples: int = field(default=32, metadata={"help": "Captured inputs kept per layer for tuning."})
    tune_input_size: int = field(default=16, metadata={"help": "Side of random tuning inputs (no calibration run)."})
    tune_seed: int = field(default=0, metadata={"help": "Seed of tuning inputs and minibatches."})
    qalora_weight: Literal["quantized", "float"] = field(
        default="quantized",
        metadata={"help": "QALoRA conv weight: 'quantized' Q_w(W0 + BA) (the student's) or 'float' W0 + BA."},
    )
    qalora_act: Literal["keep", "drop"] = field(
        default="keep", metadata={"help": "Keep ('keep') or drop a QALoRA conv's activation quantizer."}
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
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {self.algorithm!r}.")
        if self.algorithm == "direct" and self.bits is None:
            raise ValueError("`algorithm='direct'` is the quantized baseline: it needs `bits`.")
        self.target_modules = _module_patterns(self.target_modules, "target_modules")
        self.exclude_modules = _module_patterns(self.exclude_modules, "exclude_modules")
        for name in ("tune_steps", "tune_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        for name in ("tune_batch_size", "tune_samples", "tune_input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(self.tune_lr, bool) or not isinstance(self.tune_lr, int | float) or not self.tune_lr > 0:
            raise ValueError(f"`tune_lr` must be a positive number, got {self.tune_lr!r}.")
        if self.tune_loss not in TUNE_LOSSES:
            raise ValueError(f"`tune_loss` must be one of {TUNE_LOSSES}, got {self.tune_loss!r}.")
        if self.qalora_weight not in QALORA_WEIGHTS:
            raise ValueError(f"`qalora_weight` must be one of {QALORA_WEIGHTS}, got {self.qalora_weight!r}.")
        if self.qalora_act not in QALORA_ACTS:
            raise ValueError(f"`qalora_act` must be one of {QALORA_ACTS}, got {self.qalora_act!r}.")
        if self.version != 1:
            raise ValueError(f"`version` must be 1, got {self.version!r}.")

    @property
    def resolved_points(self) -> tuple[str, ...]:
        """The interpolation points in use (the defaults when ``points`` is ``None``)."""
        return self.points if self.points is not None else DEFAULT_POINTS[self.tile]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `from_dict` inverts it."""
        out = dataclasses.asdict(self)
        for key in ("points", "target_modules", "exclude_modules"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WinogradConfig:
        """Rebuild a config from `to_dict`'s output; unknown keys raise a ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"`data` must be a dict, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown WinogradConfig keys {unknown}; valid keys are {sorted(names)}.")
        kwargs = dict(data)
        for key in ("points", "target_modules", "exclude_modules"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def _module_patterns(value: Any, name: str) -> tuple[str, ...] | str | None:
    """``None``, one regex string, or a tuple of module names (from any iterable of strings)."""
    if value is None or isinstance(value, str):
        return value
    try:
        names = tuple(value)
    except TypeError:
        raise ValueError(f"`{name}` must be None, a regex string or a list of module names, got {value!r}.") from None
    if not all(isinstance(v, str) and v for v in names):
        raise ValueError(f"`{name}` must hold non-empty module-name strings, got {value!r}.")
    return names
