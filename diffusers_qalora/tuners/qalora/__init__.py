"""QALoRA as a PEFT tuner: config, layers, model."""

from ...versions import check_dependency_versions

# Before anything touches PEFT: a too-old PEFT gives an upgrade message, not a wrong model or an obscure error later.
check_dependency_versions()

from ...kernels import install as install_kernels  # noqa: E402
from .config import DEFAULT_EIGHT_BIT_ROOTS, QALoraConfig, QALoraPeftType  # noqa: E402
from .layer import Conv2d, Linear, QALoraLayer  # noqa: E402
from .model import QALoraModel, attach_timestep_context, eligible_module_names, qalora_layers  # noqa: E402
from .registration import register_peft_method  # noqa: E402

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
