"""diffusers-qalora: data-free low-bit quantization of diffusion models (EfficientDM QALoRA, temporal LSQ,
Winograd), as a PEFT / diffusers plug-in.

Importing the package registers the ``"QALORA"`` PEFT type (idempotent), so ``peft.get_peft_model`` and
``PeftModel.from_pretrained`` work for QALoRA adapters.
"""

from .export import IntegerConv2d, IntegerLinear, set_integer_backend
from .integrations import register as _register
from .integrations.adapters import load_qalora_adapter, save_qalora_adapter
from .integrations.diffusers import QALoraAttnProcessor, QALoraQuantConfig, QALoraQuantMethod, export_quantized
from .integrations.hub import push_qalora_adapter, push_quantized_model
from .kernels import install as _install_kernels
from .quant import PerChannel, PerGroup, PerTensor, TimestepContext
from .tuners.qalora import QALoraConfig, QALoraModel, QALoraPeftType
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
from .winograd import (
    DirectQuantConv2d,
    WinogradConfig,
    WinogradConv2d,
    WinogradReport,
    apply_winograd,
    load_winograd,
    save_winograd,
    tune_scales_,
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
    "copy_activation_calibration",
    "get_qalora_model",
    "get_qalora_param_groups",
    "load_qalora_adapter",
    "remove_qalora",
    "save_qalora_adapter",
    "set_qalora_adapter",
    "timestep_table",
    # integer export and the diffusers backend
    "IntegerConv2d",
    "IntegerLinear",
    "QALoraQuantConfig",
    "QALoraQuantMethod",
    "export_quantized",
    # quantized attention (QALoraConfig(quantize_attention=True))
    "QALoraAttnProcessor",
    "set_integer_backend",
    # sharing on the Hub
    "push_qalora_adapter",
    "push_quantized_model",
    # Winograd convolution
    "DirectQuantConv2d",
    "WinogradConfig",
    "WinogradConv2d",
    "WinogradReport",
    "apply_winograd",
    "load_winograd",
    "save_winograd",
    "tune_scales_",
]

_register()
_install_kernels()
