"""Winograd convolution F(m, 3): exact transforms, a drop-in `WinogradConv2d`, group-wise full quantization and
data-free tuning of the learnable transform scales (Pan et al., *Data-Free Group-Wise Fully Quantized Winograd
Convolution via Learnable Scales*, CVPR 2025).

Imports only ``torch``, ``safetensors`` and `diffusers_qalora.quant` (QALoRA layers are recognised by their interface).
"""

from .config import WinogradConfig
from .conv import (
    WinogradConv2d,
    WinogradPrecisionWarning,
    WinogradScales,
    WinogradWarning,
    winograd_ineligibility,
)
from .direct import DirectQuantConv2d
from .functional import winograd_conv2d
from .replace import LayerRecord, WinogradReport, apply_winograd, set_quant_mode, winograd_modules
from .serialization import load_winograd, save_winograd, winograd_state_dict
from .transforms import (
    DEFAULT_POINTS,
    WinogradTransforms,
    balanced_multipliers,
    lagrange_denominators,
    parse_point,
    winograd_correlate_1d,
    winograd_transforms,
)
from .tuning import ScaleTuningResult, scales_are_visible, sqnr_db, tune_scales_

__all__ = [
    "DirectQuantConv2d",
    "ScaleTuningResult",
    "WinogradConfig",
    "WinogradConv2d",
    "WinogradPrecisionWarning",
    "WinogradReport",
    "WinogradWarning",
    "apply_winograd",
    "load_winograd",
    "save_winograd",
    "set_quant_mode",
    "tune_scales_",
]
