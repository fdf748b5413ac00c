"""The quantization core: pure torch maths, no Hugging Face imports."""

from .granularity import Granularity, PerChannel, PerGroup, PerTensor, granularity_from_name, grouped_view, step_shape
from .init import INIT_METHODS, init_qparams, lp_search_qparams, minmax_qparams
from .packing import pack_codes, pack_int4, unpack_codes, unpack_int4
from .primitives import (
    clear_workspace,
    dequantize,
    fake_quantize,
    fake_quantize_lora_merged,
    fused_path_enabled,
    qrange,
    quantize,
    round_ste,
    scale_gradient,
    set_fused_compile,
    validate_bits,
)
from .quantizers import TemporalActQuantizer, WeightQuantizer, fake_quantize_impl, set_fake_quantize_resolver
from .scale_aware import SCALE_AWARE_MODES, ScaleAwareEntry, ScaleAwareGroups, scale_aware_param_groups
from .temporal import (
    TemporalValues,
    TimestepContext,
    TimestepHook,
    install_timestep_hook,
    interpolation_indices,
    timesteps_to_tensor,
    validate_timestep_table,
)

__all__ = [
    "INIT_METHODS",
    "SCALE_AWARE_MODES",
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "ScaleAwareEntry",
    "ScaleAwareGroups",
    "TemporalActQuantizer",
    "TemporalValues",
    "TimestepContext",
    "TimestepHook",
    "WeightQuantizer",
    "clear_workspace",
    "dequantize",
    "fake_quantize",
    "fake_quantize_impl",
    "fake_quantize_lora_merged",
    "fused_path_enabled",
    "granularity_from_name",
    "grouped_view",
    "init_qparams",
    "install_timestep_hook",
    "interpolation_indices",
    "lp_search_qparams",
    "minmax_qparams",
    "pack_codes",
    "pack_int4",
    "qrange",
    "quantize",
    "round_ste",
    "scale_aware_param_groups",
    "scale_gradient",
    "set_fake_quantize_resolver",
    "set_fused_compile",
    "step_shape",
    "timesteps_to_tensor",
    "unpack_codes",
    "unpack_int4",
    "validate_bits",
    "validate_timestep_table",
]
