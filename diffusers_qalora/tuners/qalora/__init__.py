"""QALoRA as a PEFT tuner: config, layers, model."""

from ...kernels import install as install_kernels
from .config import DEFAULT_EIGHT_BIT_ROOTS, QALoraConfig, QALoraPeftType
from .layer import Conv2d, Linear, QALoraLayer
from .model import QALoraModel, attach_timestep_context, eligible_module_names, qalora_layers
from .registration import register_peft_method

__all__ = [
    "Conv2d",
    "Linear",
    "QALoraConfig",
    "QALoraLayer",
    "QALoraModel",
    "QALoraPeftType",
    "qalora_layers",
]

# The fused Triton implementations of the quantizers on CUDA (kernels fill the hooks of `quant`; no triton import).
install_kernels()
# As PEFT's own tuners register in their package __init__ (`register_peft_method(name="lora", ...)`); idempotent.
register_peft_method()
