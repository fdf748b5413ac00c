"""QALoRA as a PEFT tuner: config, layers, model."""

from .config import DEFAULT_EIGHT_BIT_ROOTS, QALoraConfig, QALoraPeftType
from .layer import Conv2d, Linear, QALoraLayer
from .model import QALoraModel, attach_timestep_context, eligible_module_names, qalora_layers

__all__ = [
    "DEFAULT_EIGHT_BIT_ROOTS",
    "Conv2d",
    "Linear",
    "QALoraConfig",
    "QALoraLayer",
    "QALoraModel",
    "QALoraPeftType",
    "attach_timestep_context",
    "eligible_module_names",
    "qalora_layers",
]
