"""Integer export: integer layers (``IntegerLinear``, ``IntegerConv2d``), their kernels, the timestep plumbing, and the
merge from a trained QALoRA model.  Saving and loading through diffusers lives in
`diffusers_qalora.integrations.diffusers`; the public entry point is ``diffusers_qalora.export_quantized``.

Everything here is plain torch except [`convert_qalora_to_integer`], which reads QALoRA (PEFT) layers and is imported
on first use.
"""

from .backends import (
    BACKENDS,
    IntegerKernelWarning,
    onednn_status,
    register_kernel,
    registered_kernel,
    unregister_kernel,
)
from .context import attach_integer_context, set_integer_backend
from .functional import dequantize_weight, lookup_act_qparams, quantize_activation_uint8, unpack_weight_codes
from .layout import LAYOUT_KINDS, IntegerLayout
from .modules import IntegerConv2d, IntegerLayer, IntegerLinear, integer_layers

__all__ = [
    "BACKENDS",
    "LAYOUT_KINDS",
    "IntegerConv2d",
    "IntegerKernelWarning",
    "IntegerLayer",
    "IntegerLayout",
    "IntegerLinear",
    "attach_integer_context",
    "convert_qalora_to_integer",
    "dequantize_weight",
    "integer_layers",
    "lookup_act_qparams",
    "onednn_status",
    "quantize_activation_uint8",
    "register_kernel",
    "registered_kernel",
    "set_integer_backend",
    "unpack_weight_codes",
    "unregister_kernel",
]


def __getattr__(name: str):
    if name == "convert_qalora_to_integer":  # needs the PEFT tuner: imported on first use
        from .merge import convert_qalora_to_integer

        return convert_qalora_to_integer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
