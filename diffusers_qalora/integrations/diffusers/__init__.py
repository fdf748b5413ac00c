"""The diffusers quantization backend ``"qalora"``: config, quantizer, registration, `export_quantized`."""

from ...kernels import install as install_kernels
from ...versions import check_dependency_versions
from .config import QALoraQuantConfig, QALoraQuantMethod
from .export import export_quantized
from .quantizer import CHECKSUM_KEY, QALoraDiffusersQuantizer, integer_state_checksum, mark_exported
from .registry import register_diffusers_backend, unregister_diffusers_backend

__all__ = [
    "QALoraDiffusersQuantizer",
    "QALoraQuantConfig",
    "QALoraQuantMethod",
    "export_quantized",
    "register_diffusers_backend",
    "unregister_diffusers_backend",
]

# The integer layers' "triton" backend on CUDA (kernels fill the hook of `export`; no triton import).
install_kernels()
# Like the PEFT tuner, the backend registers when first imported (idempotent); `import diffusers_qalora` arranges
# for it to be imported as soon as diffusers is (see diffusers_qalora._registration).
check_dependency_versions()
register_diffusers_backend()
