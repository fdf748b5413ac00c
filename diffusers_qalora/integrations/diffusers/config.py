"""`QALoraQuantConfig`: the diffusers quantization config of the ``"qalora"`` backend."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ...export import BACKENDS, IntegerLayout
from ...quant import INIT_METHODS, validate_bits, validate_timestep_table
from ...tuners.qalora.config import QALoraConfig
from ...winograd.serialization import validate_winograd_record


class QALoraQuantMethod(str, enum.Enum):
    """``quant_method`` of this backend: a ``str`` enum of our own (diffusers reads ``.value``; its lookups compare
    strings), so diffusers' closed ``QuantizationMethod`` enum stays untouched."""

    QALORA = "qalora"


def _copy_names(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        names = [str(v) for v in value]
    except TypeError:
        raise TypeError(f"`{name}` must be a list of module names, got {type(value).__name__}.") from None
    return names


@dataclass(repr=False)
class QALoraQuantConfig(QuantizationConfigMixin):
    """Quantization config of the ``"qalora"`` backend for ``ModelMixin.from_pretrained(..., quantization_config=)``.

    Passed to ``from_pretrained`` of a float checkpoint, it quantizes on load (PTQ initialisation): QALoRA is
    injected with weight step sizes from the weights, ready for `calibrate_activations`, distillation and
    `export_quantized`.  An exported model's ``config.json`` carries this config with ``layers`` filled in, so
    ``from_pretrained`` of that folder needs no argument and builds the integer layers directly.

    Args:
        weight_bits (`int`, defaults to `4`): bit width of the weights, 2..8.
        act_bits (`int`, defaults to `8`): bit width of the layer inputs, 2..8.
        special_bits (`int`, defaults to `8`): bits of the first/last layers (input, embeddings, output).
        weight_granularity (`"channel" | "group"`, defaults to `"channel"`): weight step granularity.
        weight_group_size (`int`, *optional*): input channels per weight group (``weight_granularity="group"``).
        weight_init (`"minmax" | "mse" | "lp"`, defaults to `"mse"`): weight step-size initialisation.
        act_symmetric (`bool`, defaults to `False`): signed activation codes without zero point.
        act_init (`"minmax" | "mse" | "lp"`, defaults to `"lp"`): activation calibration search.
        timesteps (`list[float]`, *optional*): the timestep table (default ``0, 10, ..., 990``).
        r (`int`, defaults to `32`): LoRA rank of the injected QALoRA adapter.
        lora_alpha (`float`, defaults to `32.0`): LoRA alpha.
        target_modules (`list[str]`, *optional*): modules to quantize; default every ``Linear`` and ``Conv2d``.
        modules_to_not_convert (`list[str]`, *optional*): modules kept in float.
        eight_bit_modules (`list[str]`, *optional*): modules at ``special_bits`` (default: first/last layers).
        timestep_argument (`str`, defaults to `"timestep"`): the denoiser's timestep argument (read by the hook).
        backend (`"auto" | "onednn" | "triton" | "reference"`, defaults to `"auto"`): compute path of the integer layers.
        layers (`dict[str, dict]`, *optional*): the [IntegerLayout][diffusers_qalora.export.IntegerLayout] of every integer layer of an exported model;
            written by `export_quantized`, never set by hand.
        winograd (`dict`, *optional*): the record of the model's Winograd layers (what `save_winograd` writes as
            ``winograd_config.json``), taken by ``save_pretrained`` of an exported model that has any, so that
            ``from_pretrained`` rebuilds them; never set by hand.
        version (`int`, defaults to `1`): format version.
    """

    quant_method: QALoraQuantMethod = field(
        default=QALoraQuantMethod.QALORA, metadata={"help": "Always 'qalora' (the backend key)."}
    )
    weight_bits: int = field(default=4, metadata={"help": "Weight bit width, 2..8."})
    act_bits: int = field(default=8, metadata={"help": "Activation bit width, 2..8."})
    special_bits: int = field(default=8, metadata={"help": "Bits of the first/last layers."})
    weight_granularity: str = field(default="channel", metadata={"help": "'channel' or 'group'."})
    weight_group_size: int | None = field(default=None, metadata={"help": "Input channels per weight group."})
    weight_init: str = field(default="mse", metadata={"help": "Weight step init: 'minmax', 'mse' or 'lp'."})
    act_symmetric: bool = field(default=False, metadata={"help": "Signed activation codes without zero point."})
    act_init: str = field(default="lp", metadata={"help": "Activation calibration: 'minmax', 'mse' or 'lp'."})
    timesteps: list[float] | None = field(default=None, metadata={"help": "Timestep table (strictly increasing)."})
    r: int = field(default=32, metadata={"help": "LoRA rank of the injected adapter."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to quantize."})
    modules_to_not_convert: list[str] | None = field(default=None, metadata={"help": "Modules kept in float."})
    eight_bit_modules: list[str] | None = field(default=None, metadata={"help": "Modules at special_bits."})
    timestep_argument: str = field(default="timestep", metadata={"help": "The denoiser's timestep argument."})
    backend: str = field(default="auto", metadata={"help": "Integer compute path: 'auto', 'onednn', 'triton', 'reference'."})
    layers: dict[str, dict] | None = field(default=None, metadata={"help": "Layout of each exported integer layer."})
    winograd: dict[str, Any] | None = field(default=None, metadata={"help": "Record of the Winograd layers."})
    version: int = field(default=1, metadata={"help": "Config format version."})

    def __post_init__(self) -> None:
        if self.quant_method != QALoraQuantMethod.QALORA.value:
            raise ValueError(f"`quant_method` must be 'qalora' for QALoraQuantConfig, got {self.quant_method!r}.")
        self.quant_method = QALoraQuantMethod.QALORA
        for name in ("weight_bits", "act_bits", "special_bits"):
            validate_bits(getattr(self, name), name)
        if self.weight_granularity not in ("channel", "group"):
            raise ValueError(f"`weight_granularity` must be 'channel' or 'group', got {self.weight_granularity!r}.")
        if self.weight_granularity == "group" and (
            isinstance(self.weight_group_size, bool) or not isinstance(self.weight_group_size, int)
            or self.weight_group_size < 1
        ):
            raise ValueError(
                f"`weight_group_size` must be a positive integer when weight_granularity='group', "
                f"got {self.weight_group_size!r}."
            )
        for name in ("weight_init", "act_init"):
            if getattr(self, name) not in INIT_METHODS:
                raise ValueError(f"`{name}` must be one of {INIT_METHODS}, got {getattr(self, name)!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}.")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if self.version != 1:
            raise ValueError(
                f"`version` {self.version!r} is not supported by this diffusers_qalora (it reads version 1); "
                f"upgrade diffusers_qalora."
            )
        if self.timesteps is not None:
            self.timesteps = list(validate_timestep_table(self.timesteps, "timesteps"))
        # Copies: the caller's lists are never modified.
        self.target_modules = _copy_names(self.target_modules, "target_modules")
        self.modules_to_not_convert = _copy_names(self.modules_to_not_convert, "modules_to_not_convert")
        self.eight_bit_modules = _copy_names(self.eight_bit_modules, "eight_bit_modules")
        if self.layers is not None:
            self.layers = self._validated_layers(self.layers)
        if self.winograd is not None:
            if self.layers is None:
                raise ValueError("`winograd` describes the Winograd layers of an exported model; it needs `layers`.")
            self.winograd = validate_winograd_record(self.winograd, "quantization_config.winograd")

    def _validated_layers(self, layers: Any) -> dict[str, dict]:
        if not isinstance(layers, dict) or not layers:
            raise ValueError("`layers` must be a non-empty dict {module name: layout} written by export_quantized.")
        out = {}
        for name, spec in layers.items():
            layout = spec if isinstance(spec, IntegerLayout) else IntegerLayout.from_dict(spec, f"layers[{name!r}]")
            if layout.weight_bits not in (self.weight_bits, self.special_bits) or layout.act_bits not in (
                self.act_bits, self.special_bits
            ):
                raise ValueError(
                    f"quantization_config disagrees with itself: layer `{name}` is W{layout.weight_bits}A"
                    f"{layout.act_bits} but the config says weight_bits={self.weight_bits}, act_bits={self.act_bits}, "
                    f"special_bits={self.special_bits}. Restore the config.json that save_pretrained wrote."
                )
            out[str(name)] = layout.to_dict()
        return out

    # -- views -----------------------------------------------------------------------------------------------------
    @property
    def is_exported(self) -> bool:
        """Whether this config describes an exported integer model (``layers`` is set)."""
        return self.layers is not None

    def layouts(self) -> dict[str, IntegerLayout]:
        """``layers`` as [IntegerLayout][diffusers_qalora.export.IntegerLayout] objects."""
        return {name: IntegerLayout.from_dict(spec, f"layers[{name!r}]") for name, spec in (self.layers or {}).items()}

    def to_qalora_config(self) -> QALoraConfig:
        """The [QALoraConfig][diffusers_qalora.QALoraConfig] used for PTQ initialisation on load."""
        return QALoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, weight_bits=self.weight_bits, act_bits=self.act_bits,
            special_bits=self.special_bits, weight_granularity=self.weight_granularity,
            weight_group_size=self.weight_group_size, weight_init=self.weight_init, act_symmetric=self.act_symmetric,
            act_init=self.act_init, timesteps=None if self.timesteps is None else list(self.timesteps),
            target_modules=None if self.target_modules is None else list(self.target_modules),
            exclude_modules=None if self.modules_to_not_convert is None else list(self.modules_to_not_convert),
            eight_bit_modules=None if self.eight_bit_modules is None else list(self.eight_bit_modules),
            timestep_argument=self.timestep_argument,
        )

    @classmethod
    def from_qalora_config(cls, config: QALoraConfig, **overrides: Any) -> QALoraQuantConfig:
        """The backend config matching a QALoRA adapter's config (used by `export_quantized`)."""
        if not isinstance(config, QALoraConfig):
            raise TypeError(f"`config` must be a QALoraConfig, got {type(config).__name__}.")

        def names(v):
            return None if v is None or isinstance(v, str) else sorted(v)

        kwargs = {
            "weight_bits": config.weight_bits, "act_bits": config.act_bits, "special_bits": config.special_bits,
            "weight_granularity": config.weight_granularity, "weight_group_size": config.weight_group_size,
            "weight_init": config.weight_init, "act_symmetric": config.act_symmetric, "act_init": config.act_init,
            "timesteps": None if config.timesteps is None else list(config.timesteps), "r": config.r,
            "lora_alpha": float(config.lora_alpha), "target_modules": names(config.target_modules),
            "modules_to_not_convert": names(config.exclude_modules),
            "eight_bit_modules": None if config.eight_bit_modules is None else list(config.eight_bit_modules),
            "timestep_argument": config.timestep_argument,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- serialisation ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Rebuild from `to_dict` (what ``config.json`` holds); unknown keys are an error naming them."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"a QALoRA quantization_config must be a dict, got {type(config_dict).__name__}.")
        unknown = sorted(set(config_dict) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"quantization_config has keys this diffusers_qalora does not know: {unknown}; it was written by a "
                f"newer diffusers_qalora (upgrade it) or edited by hand."
            )
        return super().from_dict(dict(config_dict), return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``quant_method`` as the string ``"qalora"``); `from_dict` inverts it."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else _plain(value)
        return out

    def __repr__(self) -> str:
        diff = self.to_diff_dict()
        if "layers" in diff:
            diff["layers"] = f"<{len(self.layers)} integer layers>"
        if "winograd" in diff:
            diff["winograd"] = f"<{len(self.winograd['modules'])} Winograd layers>"
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in diff.items())})"

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults (plus ``quant_method``); used by ``repr``."""
        default = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or v != default.get(k)}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
