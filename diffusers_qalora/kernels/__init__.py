"""Triton kernels, their torch references, and the dispatch between them.

* fused fake quantization with LSQ gradients ([fused_fake_quantize][diffusers_qalora.kernels.fused_fake_quantize], [fake_quantize_by_index][diffusers_qalora.kernels.fake_quantize_by_index]), used by the
  quantizers of `diffusers_qalora.quant` during training and calibration-free inference on CUDA;
* integer GEMM / implicit-GEMM convolution with a fused dequantize epilogue ([int8_linear][diffusers_qalora.kernels.int8_linear], [int8_conv2d][diffusers_qalora.kernels.int8_conv2d]), used
  by the exported integer layers on CUDA (backend ``"triton"``);
* dispatch ([resolve_kernel_preference][diffusers_qalora.kernels.resolve_kernel_preference], following each module's
  [KernelPreference][diffusers_qalora.KernelPreference]): Triton on CUDA when ``triton`` imports, the torch reference
  elsewhere.

Importing this package does not import ``triton``; the kernels are built the first time one runs.  `install`
(called when this package is imported) connects the dispatch to the quantizers, the integer layers and the Winograd
convolution.
"""

from .dispatch import (
    resolve_kernel_preference,
    resolved_kernel,
    triton_import_error,
    triton_unavailable_reason,
)
from .fake_quant import fake_quantize_by_index, fake_quantize_reference, fused_fake_quantize
from .int_gemm import (
    PackedWeight,
    int8_conv2d,
    int8_conv2d_reference,
    int8_linear,
    int8_linear_reference,
    quantize_activation_codes,
    quantize_activation_codes_reference,
)

__all__ = [
    "PackedWeight",
    "QuantSpec",
    "WinogradPackedWeight",
    "fake_quantize_by_index",
    "fake_quantize_reference",
    "fused_fake_quantize",
    "int8_conv2d",
    "int8_conv2d_reference",
    "int8_linear",
    "int8_linear_reference",
    "pack_winograd_weight",
    "quantize_activation_codes",
    "quantize_activation_codes_reference",
    "quantized_attention",
    "quantized_attention_reference",
    "resolve_kernel_preference",
    "resolved_kernel",
    "winograd_int_conv2d",
    "winograd_int_conv2d_reference",
]


def install() -> None:
    """Connect the dispatch to `diffusers_qalora.quant` (the fake-quantizer modules ask it which implementation to
    run) and to `diffusers_qalora.export` (the ``"triton"`` backend of the integer layers).  Idempotent; imports
    nothing heavy."""
    from ..export.backends import set_kernel_provider
    from ..quant.quantizers import set_fake_quantize_resolver
    from ..winograd.conv import set_winograd_kernel_provider
    from .dispatch import fake_quantize_resolver
    from .integer_layers import integer_kernel_provider
    from .winograd import WinogradKernels

    set_fake_quantize_resolver(fake_quantize_resolver)
    set_kernel_provider(integer_kernel_provider)
    set_winograd_kernel_provider(WinogradKernels())


# Quantized attention and the integer Winograd convolution (`attention.py`, `winograd.py`).
from .attention import QuantSpec, quantized_attention, quantized_attention_reference  # noqa: E402
from .winograd import (  # noqa: E402
    WinogradPackedWeight,
    pack_winograd_weight,
    winograd_int_conv2d,
    winograd_int_conv2d_reference,
)

install()
