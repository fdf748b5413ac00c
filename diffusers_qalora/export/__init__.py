"""Integer export: integer layers (``IntegerLinear``, ``IntegerConv2d``), their kernels and the timestep plumbing, in
plain torch.  The merge from a trained QALoRA model is the tuner's (`diffusers_qalora.tuners.qalora.convert`); saving
and loading through diffusers lives in `diffusers_qalora.integrations.diffusers`; the public entry point is
``diffusers_qalora.export_quantized``.
"""

from .backends import IntegerKernelWarning, onednn_status, register_kernel, unregister_kernel
from .context import attach_integer_context
from .functional import dequantize_weight, lookup_act_qparams, quantize_activation_uint8, unpack_weight_codes
from .layout import LAYOUT_KINDS, IntegerLayout
from .modules import IntegerConv2d, IntegerLayer, IntegerLinear, integer_layers

__all__ = [
    "IntegerConv2d",
    "IntegerKernelWarning",
    "IntegerLayer",
    "IntegerLayout",
    "IntegerLinear",
    "onednn_status",
    "register_kernel",
    "unregister_kernel",
]
