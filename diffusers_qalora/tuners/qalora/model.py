"""`QALoraModel`: the PEFT tuner that injects QALoRA layers, and the model-level helpers built on it."""

from __future__ import annotations

import copy
import dataclasses
import enum
import re
import warnings
import weakref
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from ...quant import attach_timestep_context, detach_timestep_context, set_kernel_preference
from .config import QALoraConfig, QALoraPeftType
from .layer import QALoraLayer, dispatch_qalora, unsupported_reason


@dataclasses.dataclass
class _Patterns:
    """The fields PEFT's ``check_target_module_exists`` reads, for matching one set of patterns with PEFT's rule
    (exact name or ``.``-suffix for a set, ``re.fullmatch`` for a string) without the config's other fields."""

    target_modules: set[str] | str
    exclude_modules: None = None
    target_parameters: None = None


def _matches(patterns: set[str] | str | None, name: str) -> bool:
    return patterns is not None and bool(check_target_module_exists(_Patterns(patterns), name))


def eligible_module_names(model: nn.Module, config: QALoraConfig) -> list[str]:
    """Names of the modules ``config`` wraps in ``model``.

    With ``target_modules=None`` that is every ``nn.Linear`` and ``nn.Conv2d`` with groups = 1 (others are skipped);
    explicit targets must all match a supported module, otherwise a ``ValueError`` names the offenders.
    """
    names = []
    explicit = config.target_modules is not None
    matched_patterns: set[str] = set()
    adapter_prefixes: list[str] = []  # internals of existing tuner layers (base_layer, lora_A.<name>, ...)
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in adapter_prefixes):
            continue
        if isinstance(module, BaseTunerLayer):
            adapter_prefixes.append(name + ".")
        if _matches(config.exclude_modules, name):
            continue
        if isinstance(module, BaseTunerLayer) and not isinstance(module, QALoraLayer):
            if explicit and not _matches(config.target_modules, name):
                continue
            raise ValueError(
                f"`{name}` already carries a {type(module).__module__}.{type(module).__name__} adapter; QALoRA must "
                f"be applied before other adapters (e.g. a style LoRA), or the module excluded with "
                f"`exclude_modules`."
            )
        if isinstance(module, QALoraLayer):
            # A second QALoRA adapter goes onto the existing wrapper (its base layer is a supported module).
            module = module.get_base_layer()
        if explicit:
            if not _matches(config.target_modules, name):
                continue
            if isinstance(config.target_modules, set):
                matched_patterns.update(p for p in config.target_modules if _matches({p}, name))
            reason = unsupported_reason(module)
            if reason is not None:
                raise ValueError(
                    f"`target_modules` selects `{name}`, a {reason}. Remove it from `target_modules` (or add it to "
                    f"`exclude_modules`)."
                )
        elif unsupported_reason(module) is not None:
            continue
        names.append(name)
    if explicit and isinstance(config.target_modules, set):
        missing = sorted(config.target_modules - matched_patterns)
        if missing:
            raise ValueError(
                f"`target_modules` {missing} match no module of {type(model).__name__}; check the names with "
                f"`[n for n, _ in model.named_modules()]`."
            )
    if not names:
        raise ValueError(
            f"QALoRA found no module to wrap in {type(model).__name__} (target_modules={config.target_modules!r})."
        )
    return names


class QALoraModel(BaseTuner):
    """PEFT tuner for QALoRA (EfficientDM).  Usually reached through [get_qalora_model][diffusers_qalora.get_qalora_model], ``peft.get_peft_model``,
    ``PeftModel.from_pretrained`` or diffusers' ``model.add_adapter`` once ``diffusers_qalora`` is imported.

    Every wrapped layer shares one [TimestepContext][diffusers_qalora.TimestepContext], fed by a forward pre-hook on the wrapped denoiser.
    """

    prefix: str = "qal_"
    tuner_layer_cls = QALoraLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: QALoraConfig, model_config: dict) -> QALoraConfig:
        # PEFT's default looks up `model_config["model_type"]`, which diffusers configs do not have: resolve the
        # targets from the model itself, validating them before anything is replaced.
        if peft_config.target_modules is None:
            peft_config.target_modules = set(eligible_module_names(self.model, peft_config))
            names = sorted(peft_config.target_modules)
        else:
            names = eligible_module_names(self.model, peft_config)
        if peft_config.quantize_attention:
            from .attention import check_attention_targets

            check_attention_targets(self.model, names)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: QALoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        eight_bit = peft_config.is_eight_bit(current_key)
        if isinstance(target, QALoraLayer):
            target.update_layer(adapter_name, peft_config, eight_bit, current_key)
            return
        new_module = dispatch_qalora(target, adapter_name, peft_config, eight_bit, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # PEFT calls `_post_injection_hook` only for the first adapter (in `BaseTuner.__init__`), not from
        # `PeftModel.add_adapter` / `load_adapter`: attach the timestep context after every injection.
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        attach_timestep_context(model, self.peft_config[adapter_name].timestep_argument)
        attach_save_record(model)
        if hasattr(type(model), "_hf_peft_config_loaded"):
            # diffusers' PeftAdapterMixin verbs (set_adapter, disable_adapters, delete_adapters, ...) check this flag,
            # which only its own add_adapter / load_lora_adapter set: without it they say "No adapter loaded".
            model._hf_peft_config_loaded = True
        config = self.peft_config[adapter_name]
        if config.quantize_attention:
            # The q/k/v step sizes live on the projections; the processor that applies them is stateless and asks
            # the kernels' dispatch with the attention module, which takes this adapter's kernel preference.
            from .attention import quantized_attention_modules, set_qalora_attn_processor

            set_qalora_attn_processor(model)
            for module in quantized_attention_modules(model).values():
                set_kernel_preference(module, config.kernel_preference, recurse=False)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # PEFT's default strips the adapter name only where it is the last or second-to-last key component; the
        # quantizer dicts nest deeper (``qal_act_quantizer.<adapter>.step.values.0``), which would bake the adapter
        # name into the file and break loading under another name.  Strip it right after the ``qal_*`` attribute.
        # Used for both saving and loading (PEFT inverts it), so the two stay symmetric.
        pattern = r"(^|\.)(qal_[A-Za-z_]+)\." + re.escape(adapter_name) + r"(?=\.|$)"
        new_key, count = re.subn(pattern, r"\1\2", key)
        return new_key if count else super()._remove_adapter_name_from_key(key, adapter_name)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        # PEFT's `merge_and_unload` writes the merged weight into plain layers and drops the activation quantizers:
        # a W4A4 model would silently become W4 with float activations.  Refuse before touching anything.  (Not in
        # `_check_merge_allowed`: `merge_adapter` calls that too, and an in-place merge that keeps the activation
        # quantizer is valid.)
        if merge:
            raise ValueError(
                "merge_and_unload() is not supported for QALoRA: plain layers cannot hold the activation quantizers, "
                "so the result would be a weight-only model with float activations. Use "
                "diffusers_qalora.export_quantized(model) for a standalone quantized model (integer layers), "
                "merge_adapter() to merge in place while keeping the quantizers, or unload() to get the "
                "full-precision model back. Nothing was changed."
            )
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        detach_timestep_context(model)
        # Imported here: the processors import diffusers, whose import registers the backend, which imports this module.
        from .attention import restore_attention_processors

        restore_attention_processors(model)
        return model


def qalora_layers(model: nn.Module) -> dict[str, QALoraLayer]:
    """All QALoRA layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QALoraLayer)}


# -- what `save_pretrained` of a diffusers model carrying QALoRA records, and how `from_pretrained` rebuilds it -------
# A diffusers model saves its own `state_dict()`, so a model with QALoRA layers writes wrapped names
# (``conv_in.base_layer.weight``, ``conv_in.qal_A.default``, ...).  For `from_pretrained` to map them back, config.json
# must say which adapters to inject before the weights load: the model's ``config.quantization_config`` is a
# `QALoraSaveRecord`, whose ``to_dict()`` (called by diffusers when it writes config.json) describes the adapters the
# model carries *at that moment*; the ``"qalora"`` diffusers backend reads it back (``QALoraQuantConfig.adapters``).

ADAPTER_RECORD_VERSION = 1


class QALoraSaveRecord:
    """The ``quantization_config`` of a diffusers model carrying QALoRA: a live view of its PEFT adapters.

    ``to_dict()`` is ``None`` once the model has no QALoRA layer left (config.json then says
    ``"quantization_config": null`` and the folder loads as a plain model).  The record holds the model weakly; a
    deep copy of the model gets a record of the copy.
    """

    quant_method = "qalora"

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    def to_dict(self) -> dict[str, Any] | None:
        model = self._model()
        if model is None or not qalora_layers(model):
            return None
        return {"quant_method": "qalora", "adapters": adapter_record(model)}

    def __deepcopy__(self, memo: dict) -> QALoraSaveRecord:
        model = self._model()
        return QALoraSaveRecord(memo.get(id(model), model)) if model is not None else self

    def __repr__(self) -> str:
        model = self._model()
        return f"QALoraSaveRecord({type(model).__name__ if model is not None else 'released'})"


def attach_save_record(model: nn.Module) -> None:
    """Make ``model.config.quantization_config`` a [`QALoraSaveRecord`] (diffusers models only; a model that already
    carries another quantization config keeps it)."""
    config = getattr(model, "config", None)
    if not hasattr(model, "register_to_config") or not hasattr(config, "get"):
        return
    current = config.get("quantization_config")
    # A record read back from config.json (`from_pretrained` of a saved QALoRA model) is replaced by a live one.
    recorded = current.get("adapters") if isinstance(current, dict) else getattr(current, "adapters", None)
    if (
        current is None
        or recorded is not None
        or (isinstance(current, QALoraSaveRecord) and current._model() is not model)
    ):
        model.register_to_config(quantization_config=QALoraSaveRecord(model))


def _json_ready(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, set):
        return sorted(_json_ready(v) for v in value)
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _tuner_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _default_scaling(layer: QALoraLayer, adapter: str) -> float:
    return 0.0 if layer.eight_bit.get(adapter) else layer.lora_alpha[adapter] / layer.r[adapter]


def adapter_record(model: nn.Module) -> dict[str, Any]:
    """The PEFT adapters of ``model`` as JSON: every adapter's config (QALoRA and others, in injection order), the
    active adapters, disabled layers, non-default scalings (``set_scale`` / ``set_adapters`` weights) and merged
    adapters.  [`rebuild_adapters`] and [`finish_rebuild`] invert it."""
    configs = getattr(model, "peft_config", None) or {}
    layers = _tuner_layers(model)
    active: list[str] = []
    scaling: dict[str, dict[str, float]] = {}
    merged: dict[str, list[str]] = {}
    for name, layer in layers.items():
        active += [a for a in layer.active_adapters if a not in active and a in configs]
        for adapter, value in (getattr(layer, "scaling", None) or {}).items():
            if isinstance(layer, QALoraLayer) and value == _default_scaling(layer, adapter):
                continue
            scaling.setdefault(name, {})[adapter] = float(value)
        if layer.merged_adapters:
            merged[name] = list(layer.merged_adapters)
    return {
        "version": ADAPTER_RECORD_VERSION,
        "configs": {name: _json_ready(config.to_dict()) for name, config in configs.items()},
        "order": list(configs),  # injection order (config.json is written with sorted keys)
        "active": active,
        "disabled": [name for name, layer in layers.items() if layer.disable_adapters],
        "scaling": scaling,
        "merged": merged,
    }


def validate_adapter_record(record: Any, where: str) -> dict[str, Any]:
    """Check the shape of an [`adapter_record`] read from ``where`` (a ``ValueError`` naming the problem)."""
    expected = {"version", "configs", "order", "active", "disabled", "scaling", "merged"}
    if not isinstance(record, dict) or set(record) != expected:
        raise ValueError(
            f"{where} must be a dict with keys {sorted(expected)} (written by save_pretrained of a model carrying "
            f"QALoRA), got {sorted(record) if isinstance(record, dict) else type(record).__name__}."
        )
    if record["version"] != ADAPTER_RECORD_VERSION:
        raise ValueError(
            f"{where}: version {record['version']!r} is not supported (this diffusers_qalora reads "
            f"{ADAPTER_RECORD_VERSION}); upgrade diffusers_qalora."
        )
    configs = record["configs"]
    if (
        not isinstance(configs, dict)
        or not configs
        or not all(isinstance(c, dict) and "peft_type" in c for c in configs.values())
    ):
        raise ValueError(f"{where}: `configs` must map adapter names to PEFT config dicts with a `peft_type`.")
    if sorted(record["order"]) != sorted(configs):
        raise ValueError(
            f"{where}: `order` {record['order']} does not list the adapters of `configs` "
            f"{sorted(configs)}; restore the config.json that save_pretrained wrote."
        )
    unknown = sorted(set(record["active"]) - set(configs))
    if unknown:
        raise ValueError(
            f"{where}: active adapters {unknown} have no config; restore the config.json that save_pretrained wrote."
        )
    return record


def adapter_keys(model: nn.Module, base_keys: set[str]) -> set[str]:
    """The state-dict keys of ``model`` that belong to adapters: those that are not a key of the model without
    adapters (``base_keys``) once every ``.base_layer`` is removed."""
    return {k for k in model.state_dict() if k.replace(".base_layer", "") not in base_keys}


def rebuild_adapters(model: nn.Module, record: dict[str, Any]) -> None:
    """Inject the adapters of ``record`` into ``model`` (before its weights load, on the meta device) in their
    original order, so that the model's state-dict keys are the saved ones."""
    from peft import PeftConfig, inject_adapter_in_model

    for name in record["order"]:
        kwargs = copy.deepcopy(record["configs"][name])
        if kwargs.get("peft_type") == QALoraPeftType.QALORA:
            kwargs = QALoraConfig.check_kwargs(**kwargs)  # drops the fields older versions recorded
        config = PeftConfig.from_peft_type(**kwargs)
        recorded_init = getattr(config, "weight_init", None)
        if recorded_init is not None:
            config.weight_init = "minmax"  # the step sizes are loaded from the file; no search on meta tensors
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, model, adapter_name=name)
        if recorded_init is not None:
            model.peft_config[name].weight_init = recorded_init


def finish_rebuild(model: nn.Module, record: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load the adapter ``tensors`` (read from ``where``) into the rebuilt adapters and restore the recorded active
    adapters, disabled layers, scalings and merges."""
    from peft.functional import set_adapter

    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(
            f"{where}: adapter tensors {result.unexpected_keys[:3]} fit no adapter that config.json "
            f"lists; restore the config.json that save_pretrained wrote."
        )
    left = [
        f"{n}.{k}"
        for n, layer in _tuner_layers(model).items()
        for k, t in [*layer.named_parameters(), *layer.named_buffers()]
        if t.is_meta
    ]
    if left:
        raise ValueError(
            f"{where} lacks adapter tensors, e.g. {left[:3]}: the file is truncated or not the one "
            f"this config.json belongs to. Save the pipeline again."
        )
    layers = _tuner_layers(model)
    if record["active"]:
        set_adapter(model, record["active"], inference_mode=True)
    for name in record["disabled"]:
        layers[name].enable_adapters(False)
    for name, values in record["scaling"].items():
        layers[name].scaling.update(values)
    for name, adapters in record["merged"].items():
        layer = layers[name]
        if isinstance(layer, QALoraLayer):
            layer.merge(adapter_names=list(adapters))
        else:  # other adapters merge into the base weight, which was saved merged
            layer.merged_adapters = list(adapters)


def active_qalora_adapter(model: nn.Module, adapter_name: str | None = None) -> str:
    """The QALoRA adapter that model-level operations (export, saving, optimizer groups) act on.

    With ``adapter_name``, check that some QALoRA layer of ``model`` has it and return it; without, return the one
    adapter active in ``model``'s QALoRA layers.  Raises a ``ValueError`` naming the adapters found otherwise.
    """
    layers = qalora_layers(model).values()
    if adapter_name is not None:
        if not any(adapter_name in layer.qal_weight_quantizer for layer in layers):
            names = sorted({a for layer in layers for a in layer.qal_weight_quantizer})
            raise ValueError(f"no QALoRA adapter named {adapter_name!r}; the model has {names}.")
        return adapter_name
    active = {layer.active_qalora_adapter() for layer in layers} - {None}
    if len(active) != 1:
        raise ValueError(
            f"expected exactly one active QALoRA adapter, found {sorted(active)}; pass `adapter_name` or call "
            f"set_qalora_adapter(model, name) first."
        )
    return active.pop()
