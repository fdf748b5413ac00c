"""diffusers-qalora: data-free low-bit quantization of diffusion models (EfficientDM QALoRA, temporal LSQ,
Winograd), as a PEFT / diffusers plug-in.

The package is imported lazily (PEP 562): ``import diffusers_qalora`` imports neither torch's heavy users nor any
Hugging Face library, and each public name below loads its module on first access.  Importing the package also
arranges for the ``"QALORA"`` PEFT type and the ``"qalora"`` diffusers quantization backend to be registered as soon
as PEFT or diffusers is imported (at once if they already are), so ``PeftModel.from_pretrained`` and
``<model class>.from_pretrained`` of an exported model work after ``import diffusers_qalora``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._registration import install_registration_hook
from ._version import __version__

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the PEFT tuner and its model-level helpers
    "QALoraConfig": "tuners.qalora.config",
    "QALoraModel": "tuners.qalora.model",
    "QALoraPeftType": "tuners.qalora.config",
    "adapters_disabled": "tuners.qalora.api",
    "calibrate_activations": "tuners.qalora.api",
    "calibrating": "tuners.qalora.api",
    "copy_activation_calibration": "tuners.qalora.api",
    "get_qalora_model": "tuners.qalora.api",
    "get_qalora_param_groups": "tuners.qalora.api",
    "remove_qalora": "tuners.qalora.api",
    "set_qalora_adapter": "tuners.qalora.api",
    "timestep_table": "tuners.qalora.api",
    "QALoraAttnProcessor": "tuners.qalora.attention",
    # granularities and the timestep context
    "PerChannel": "quant.granularity",
    "PerGroup": "quant.granularity",
    "PerTensor": "quant.granularity",
    "TimestepContext": "quant.temporal",
    # which implementation runs (Triton kernels, torch, oneDNN)
    "KernelPreference": "quant.kernel_preference",
    "set_kernel_preference": "quant.kernel_preference",
    # saving, loading and sharing
    "load_qalora_adapter": "integrations.adapters",
    "save_qalora_adapter": "integrations.adapters",
    "push_qalora_adapter": "integrations.hub",
    "push_quantized_model": "integrations.hub",
    # integer export and the diffusers backend
    "IntegerConv2d": "export.modules",
    "IntegerLinear": "export.modules",
    "QALoraQuantConfig": "integrations.diffusers.config",
    "QALoraQuantMethod": "integrations.diffusers.config",
    "export_quantized": "integrations.diffusers.export",
    # Winograd convolution
    "DirectQuantConv2d": "winograd.direct",
    "WinogradConfig": "winograd.config",
    "WinogradConv2d": "winograd.conv",
    "WinogradReport": "winograd.replace",
    "apply_winograd": "winograd.replace",
    "load_winograd": "winograd.serialization",
    "save_winograd": "winograd.serialization",
    "tune_scales_": "winograd.tuning",
}

__all__ = [
    "__version__",
    "DirectQuantConv2d",
    "IntegerConv2d",
    "IntegerLinear",
    "KernelPreference",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QALoraAttnProcessor",
    "QALoraConfig",
    "QALoraModel",
    "QALoraPeftType",
    "QALoraQuantConfig",
    "QALoraQuantMethod",
    "TimestepContext",
    "WinogradConfig",
    "WinogradConv2d",
    "WinogradReport",
    "adapters_disabled",
    "apply_winograd",
    "calibrate_activations",
    "calibrating",
    "copy_activation_calibration",
    "export_quantized",
    "get_qalora_model",
    "get_qalora_param_groups",
    "load_qalora_adapter",
    "load_winograd",
    "push_qalora_adapter",
    "push_quantized_model",
    "remove_qalora",
    "save_qalora_adapter",
    "save_winograd",
    "set_kernel_preference",
    "set_qalora_adapter",
    "timestep_table",
    "tune_scales_",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # The kernels connect themselves to the quantizers, integer layers and Winograd convolutions when imported
    # (torch only; triton is imported when a kernel first runs).
    importlib.import_module(f"{__name__}.kernels")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .export.modules import IntegerConv2d, IntegerLinear
    from .integrations.adapters import load_qalora_adapter, save_qalora_adapter
    from .integrations.diffusers.config import QALoraQuantConfig, QALoraQuantMethod
    from .integrations.diffusers.export import export_quantized
    from .integrations.hub import push_qalora_adapter, push_quantized_model
    from .quant.granularity import PerChannel, PerGroup, PerTensor
    from .quant.kernel_preference import KernelPreference, set_kernel_preference
    from .quant.temporal import TimestepContext
    from .tuners.qalora.api import (
        adapters_disabled,
        calibrate_activations,
        calibrating,
        copy_activation_calibration,
        get_qalora_model,
        get_qalora_param_groups,
        remove_qalora,
        set_qalora_adapter,
        timestep_table,
    )
    from .tuners.qalora.attention import QALoraAttnProcessor
    from .tuners.qalora.config import QALoraConfig, QALoraPeftType
    from .tuners.qalora.model import QALoraModel
    from .winograd.config import WinogradConfig
    from .winograd.conv import WinogradConv2d
    from .winograd.direct import DirectQuantConv2d
    from .winograd.replace import WinogradReport, apply_winograd
    from .winograd.serialization import load_winograd, save_winograd
    from .winograd.tuning import tune_scales_

install_registration_hook()
