"""Winograd convolution F(m, 3): exact transforms, a drop-in `WinogradConv2d`, group-wise full quantization and
data-free tuning of the learnable transform scales (Pan et al., *Data-Free Group-Wise Fully Quantized Winograd
Convolution via Learnable Scales*, CVPR 2025).

Imports only ``torch`` and `diffusers_qalora.quant`.
"""

from .config import WinogradConfig
from .conv import (
    WinogradConv2d,
    WinogradPrecisionWarning,
    WinogradScales,
    WinogradWarning,
    winograd_ineligibility,
)
from .functional import winograd_conv2d
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
    "DEFAULT_POINTS",
    "ScaleTuningResult",
    "WinogradConfig",
    "WinogradConv2d",
    "WinogradPrecisionWarning",
    "WinogradScales",
    "WinogradTransforms",
    "WinogradWarning",
    "balanced_multipliers",
    "lagrange_denominators",
    "parse_point",
    "scales_are_visible",
    "sqnr_db",
    "tune_scales_",
    "winograd_conv2d",
    "winograd_correlate_1d",
    "winograd_ineligibility",
    "winograd_transforms",
]
