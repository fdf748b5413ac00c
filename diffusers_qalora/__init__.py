"""diffusers-qalora: data-free low-bit quantization of diffusion models (EfficientDM QALoRA, temporal LSQ,
Winograd), as a PEFT / diffusers plug-in.

Importing the package registers the ``"QALORA"`` PEFT type (idempotent), so ``peft.get_peft_model`` and
``PeftModel.from_pretrained`` work for QALoRA adapters.
"""

from .integrations import register as _register
from .integrations.adapters import load_qalora_adapter, save_qalora_adapter
from .quant import PerChannel, PerGroup, PerTensor, TimestepContext
from .tuners.qalora import QALoraConfig, QALoraModel, QALoraPeftType
from .tuners.qalora.api import (
    adapters_disabled,
    calibrate_activations,
    calibrating,
    get_qalora_model,
    get_qalora_param_groups,
    remove_qalora,
    set_qalora_adapter,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QALoraConfig",
    "QALoraModel",
    "QALoraPeftType",
    "TimestepContext",
    "__version__",
    "adapters_disabled",
    "calibrate_activations",
    "calibrating",
    "get_qalora_model",
    "get_qalora_param_groups",
    "load_qalora_adapter",
    "remove_qalora",
    "save_qalora_adapter",
    "set_qalora_adapter",
]

_register()
