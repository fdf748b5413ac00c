"""The diffusers quantization backend ``"qalora"`` (config, quantizer, registration, `export_quantized`) and the
quantized attention processor `QALoraAttnProcessor`."""

from ...tuners.qalora.attention import QALoraAttnProcessor, set_qalora_attn_processor
from .config import QALoraQuantConfig, QALoraQuantMethod
from .export import export_quantized
from .quantizer import CHECKSUM_KEY, QALoraDiffusersQuantizer, integer_state_checksum, mark_exported
from .registry import register_diffusers_backend, unregister_diffusers_backend

__all__ = [
    "CHECKSUM_KEY",
    "QALoraAttnProcessor",
    "QALoraDiffusersQuantizer",
    "QALoraQuantConfig",
    "QALoraQuantMethod",
    "export_quantized",
    "integer_state_checksum",
    "mark_exported",
    "register_diffusers_backend",
    "set_qalora_attn_processor",
    "unregister_diffusers_backend",
]
