"""`QALoraQuantConfig`: the diffusers quantization config of the ``"qalora"`` backend."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field, fields
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from peft import PeftConfig

from ...export import IntegerLayout
from ...quant.kernel_preference import KernelPreference, validate_kernel_preference
from ...tuners.qalora.config import QALoraConfig
from ...tuners.qalora.model import validate_adapter_record
from ...winograd.serialization import validate_winograd_record


class QALoraQuantMethod(str, enum.Enum):
    """``quant_method`` of this backend: a ``str`` enum of our own (diffusers reads ``.value``; its lookups compare
    strings), so diffusers' closed ``QuantizationMethod`` enum stays untouched."""

    QALORA = "qalora"


# `QALoraConfig` is the one definition of the method's settings: the backend config takes its fields from it (same
# names, types, help and defaults, except the overrides declared in the class body) and validates them by building a
# `QALoraConfig`.  Every `QALoraConfig` field is either taken or listed here with the reason it is not.
NOT_TAKEN_FROM_QALORA_CONFIG = {
    **{f.name: "PEFT bookkeeping of every PeftConfig" for f in fields(PeftConfig)},
    "exclude_modules": "taken under diffusers' name `modules_to_not_convert`",
    "modules_to_save": "trains and saves whole modules: PEFT training state, not quantization",
    "bias": "always 'none' for QALoRA",
    "version": "each config has its own format version",
}
RENAMED_FIELDS = {"modules_to_not_convert": "exclude_modules"}  # QALoraQuantConfig name -> QALoraConfig name
OLD_KEYS = ("backend",)  # read as `kernel_preference` (with "reference" as "torch") from files of earlier versions
METHOD_FIELDS = tuple(f.name for f in fields(QALoraConfig) if f.name not in NOT_TAKEN_FROM_QALORA_CONFIG)
_NAME_LISTS = ("target_modules", "modules_to_not_convert", "eight_bit_modules")


def _with_qalora_config_fields(cls: type) -> type:
    """Give ``cls`` (before ``@dataclass``) every field of ``METHOD_FIELDS`` and ``modules_to_not_convert``, in
    `QALoraConfig`'s order after ``quant_method``; a field the class body declares itself keeps its own default."""
    own = dict(cls.__dict__.get("__annotations__", {}))
    source = {f.name: f for f in fields(QALoraConfig)}
    annotations = {"quant_method": own.pop("quant_method")}
    for name in (*METHOD_FIELDS, "modules_to_not_convert"):
        if name in own:
            annotations[name] = own.pop(name)
            continue
        f = source[RENAMED_FIELDS.get(name, name)]
        annotations[name] = f.type
        setattr(cls, name, field(default=f.default, metadata=dict(f.metadata)))
    annotations.update(own)
    cls.__annotations__ = annotations
    return cls


def _name_list(value: Any, name: str) -> list[str] | str | None:
    """A copy of a module-name list (sorted when it came as a set); a string is a regex and is kept as it is."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, set | frozenset):
        return sorted(str(v) for v in value)
    try:
        return [str(v) for v in value]
    except TypeError:
        raise TypeError(
            f"`{name}` must be a list of module names or a regex string, got {type(value).__name__}."
        ) from None


@dataclass(repr=False)
@_with_qalora_config_fields
class QALoraQuantConfig(QuantizationConfigMixin):
    """Quantization config of the ``"qalora"`` backend for ``ModelMixin.from_pretrained(..., quantization_config=)``.

    Passed to ``from_pretrained`` of a float checkpoint, it quantizes on load: QALoRA layers are injected with weight
    step sizes from the weights (min-max by default: fast) and the adapter frozen, ready for
    `calibrate_activations` and `export_quantized`.  For distillation, pass ``trainable_adapter=True`` or call
    ``set_qalora_adapter(model, "default", trainable=True)`` after loading.  An exported model's ``config.json``
    carries this config with ``layers`` filled in, so ``from_pretrained`` of that folder needs no argument and builds
    the integer layers directly.

    The method's settings are the fields of [`QALoraConfig`], with the same names, meaning, validation and defaults
    (``r``, ``lora_alpha``, ``weight_bits``, ``target_modules``, ``eight_bit_modules``, ``special_bits``,
    ``weight_granularity``, ``weight_group_size``, ``weight_symmetric``, ``act_symmetric``, ``act_init``,
    ``act_granularity``, ``act_group_size``,
    ``timesteps``, ``temporal_activations``, ``lsq_grad_scale``, ``quantize_attention``, ``attention_bits``,
    ``quantize_attention_probs``, ``timestep_argument``, ``init_weights``), except:

    Args:
        quant_method (`str`, defaults to `"qalora"`): the backend key, always ``"qalora"``.
        act_bits (`int`, defaults to `8`): bit width of the layer inputs, 2..8 (W4A8 by default).
        weight_init (`"minmax" | "mse" | "lp"`, defaults to `"minmax"`): weight step-size initialisation on load;
            ``"mse"`` searches per channel and costs minutes on an SD1.5 UNet (see
            ``benchmarks/results/quant_config_load.md``).
        modules_to_not_convert (`list[str] | str`, *optional*): modules kept in float (``QALoraConfig``'s
            ``exclude_modules``; diffusers' name).
        trainable_adapter (`bool`, defaults to `False`): inject the QALoRA adapter trainable (for distillation)
            instead of frozen.
        kernel_preference (`"auto" | "torch" | "triton" | "onednn"`, defaults to `"auto"`): the implementation of
            the integer layers of an exported model (``"onednn"``: oneDNN's int8 kernels, CPU only), or of the
            fake-quantizers injected on load (``"auto"``, ``"torch"`` or ``"triton"``); see
            [KernelPreference][diffusers_qalora.KernelPreference].  Files written by earlier versions say
            ``"backend": "reference"``, read as ``"torch"``.
        layers (`dict[str, dict]`, *optional*): the [`IntegerLayout`] of every integer layer of an exported model;
            written by `export_quantized`, never set by hand.
        winograd (`dict`, *optional*): the record of the model's Winograd layers (what `save_winograd` writes as
            ``winograd_config.json``), taken by ``save_pretrained`` of an exported model that has any, so that
            ``from_pretrained`` rebuilds them; never set by hand.
        adapters (`dict`, *optional*): the PEFT adapters (QALoRA and others, with their configs, active adapters and
            scalings) of a float model carrying QALoRA, written by ``save_pretrained`` of such a model so that
            ``from_pretrained`` injects them before the weights load; never set by hand.
        version (`int`, defaults to `1`): format version.
    """

    quant_method: QALoraQuantMethod = field(
        default=QALoraQuantMethod.QALORA, metadata={"help": "Always 'qalora' (the backend key)."}
    )
    act_bits: int = field(default=8, metadata={"help": "Activation bit width, 2..8."})
    weight_init: str = field(default="minmax", metadata={"help": "Weight step init: 'minmax', 'mse' or 'lp'."})
    trainable_adapter: bool = field(
        default=False, metadata={"help": "Inject the adapter trainable (distillation) instead of frozen."}
    )
    kernel_preference: KernelPreference = field(
        default=KernelPreference.AUTO,
        metadata={"help": "Implementation: 'auto', 'torch', 'triton', or 'onednn' (integer layers on CPU)."},
    )
    layers: dict[str, dict] | None = field(default=None, metadata={"help": "Layout of each exported integer layer."})
    winograd: dict[str, Any] | None = field(default=None, metadata={"help": "Record of the Winograd layers."})
    adapters: dict[str, Any] | None = field(
        default=None, metadata={"help": "PEFT adapters to rebuild on load (save_pretrained of a QALoRA model)."}
    )
    version: int = field(default=1, metadata={"help": "Config format version."})

    def __post_init__(self) -> None:
        if self.quant_method != QALoraQuantMethod.QALORA.value:
            raise ValueError(f"`quant_method` must be 'qalora' for QALoraQuantConfig, got {self.quant_method!r}.")
        self.quant_method = QALoraQuantMethod.QALORA
        self.kernel_preference = validate_kernel_preference(self.kernel_preference, integer_layers=True)
        if self.kernel_preference is KernelPreference.ONEDNN and self.layers is None:
            raise ValueError(
                "`kernel_preference='onednn'` names the oneDNN kernels of an exported model's integer layers; this "
                "config quantizes a float model on load into fake-quant QALoRA layers, which run 'auto', 'torch' or "
                "'triton'. Pass 'onednn' to export_quantized (or set_kernel_preference) after calibrating."
            )
        if not isinstance(self.trainable_adapter, bool):
            raise ValueError(f"`trainable_adapter` must be True or False, got {self.trainable_adapter!r}.")
        if self.version != 1:
            raise ValueError(
                f"`version` {self.version!r} is not supported by this diffusers_qalora (it reads version 1); "
                f"upgrade diffusers_qalora."
            )
        # Copies: the caller's lists are never modified.
        for name in _NAME_LISTS:
            setattr(self, name, _name_list(getattr(self, name), name))
        # The one validation of the method's settings is QALoraConfig's; keep its normalised timestep table.
        self.timesteps = self.to_qalora_config().timesteps
        if self.layers is not None:
            self.layers = self._validated_layers(self.layers)
        if self.winograd is not None:
            if self.layers is None:
                raise ValueError("`winograd` describes the Winograd layers of an exported model; it needs `layers`.")
            self.winograd = validate_winograd_record(self.winograd, "quantization_config.winograd")
        if self.adapters is not None:
            if self.layers is not None:
                raise ValueError(
                    "quantization_config has both `layers` (an exported model) and `adapters` (a float "
                    "model carrying QALoRA); restore the config.json that save_pretrained wrote."
                )
            self.adapters = validate_adapter_record(self.adapters, "quantization_config.adapters")

    def _validated_layers(self, layers: Any) -> dict[str, dict]:
        if not isinstance(layers, dict) or not layers:
            raise ValueError("`layers` must be a non-empty dict {module name: layout} written by export_quantized.")
        out = {}
        for name, spec in layers.items():
            layout = spec if isinstance(spec, IntegerLayout) else IntegerLayout.from_dict(spec, f"layers[{name!r}]")
            if layout.weight_bits not in (self.weight_bits, self.special_bits) or layout.act_bits not in (
                self.act_bits,
                self.special_bits,
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
        """The [`QALoraConfig`] of the QALoRA adapter injected on load (frozen unless ``trainable_adapter``)."""
        kwargs = {name: copy.deepcopy(getattr(self, name)) for name in METHOD_FIELDS}
        kwargs.update({RENAMED_FIELDS[name]: copy.deepcopy(getattr(self, name)) for name in RENAMED_FIELDS})
        if kwargs["kernel_preference"] is KernelPreference.ONEDNN:  # an exported model's: no fake-quant layer runs it
            kwargs["kernel_preference"] = KernelPreference.AUTO
        return QALoraConfig(**kwargs, inference_mode=not self.trainable_adapter)

    @classmethod
    def from_qalora_config(cls, config: QALoraConfig, **overrides: Any) -> QALoraQuantConfig:
        """The backend config carrying every setting of a QALoRA adapter's config (used by `export_quantized`);
        ``overrides`` set the backend's own fields (``layers``, ``kernel_preference``, ...)."""
        if not isinstance(config, QALoraConfig):
            raise TypeError(f"`config` must be a QALoraConfig, got {type(config).__name__}.")
        kwargs = {name: copy.deepcopy(getattr(config, name)) for name in METHOD_FIELDS}
        kwargs.update({name: copy.deepcopy(getattr(config, source)) for name, source in RENAMED_FIELDS.items()})
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- serialisation ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Rebuild from `to_dict` (what ``config.json`` holds); unknown keys are an error naming them.  The
        ``"backend"`` key of files written by earlier versions is read as ``kernel_preference``."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"a QALoRA quantization_config must be a dict, got {type(config_dict).__name__}.")
        config_dict = dict(config_dict)
        for key in (*OLD_KEYS, "kernel_preference"):
            if key in config_dict:
                where = f"quantization_config.{key}"
                value = validate_kernel_preference(config_dict.pop(key), where, integer_layers=True, saved=True)
                config_dict["kernel_preference"] = value
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
        if "adapters" in diff:
            diff["adapters"] = f"<adapters {sorted(self.adapters['configs'])}>"
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
