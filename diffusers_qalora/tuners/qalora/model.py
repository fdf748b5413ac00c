"""`QALoraModel`: the PEFT tuner that injects QALoRA layers, and the model-level helpers built on it."""

from __future__ import annotations

import dataclasses
import re

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from ...quant import attach_timestep_context
from .config import QALoraConfig
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
        if self.peft_config[adapter_name].quantize_attention:
            # The q/k/v step sizes live on the projections; the processor that applies them is stateless.
            from .attention import set_qalora_attn_processor

            set_qalora_attn_processor(model)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # PEFT's default strips the adapter name only where it is the last or second-to-last key component; the
        # quantizer dicts nest deeper (``qal_act_quantizer.<adapter>.step.values.0``), which would bake the adapter
        # name into the file and break loading under another name.  Strip it right after the ``qal_*`` attribute.
        # Used for both saving and loading (PEFT inverts it), so the two stay symmetric.
        pattern = r"(^|\.)(qal_[A-Za-z_]+)\." + re.escape(adapter_name) + r"(?=\.|$)"
        new_key, count = re.subn(pattern, r"\1\2", key)
        return new_key if count else super()._remove_adapter_name_from_key(key, adapter_name)


def qalora_layers(model: nn.Module) -> dict[str, QALoraLayer]:
    """All QALoRA layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QALoraLayer)}


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
