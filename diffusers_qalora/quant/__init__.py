"""The quantization core: pure torch maths, no Hugging Face imports."""

from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken, grouped_view, step_shape
from .init import INIT_METHODS, init_qparams, lp_search_qparams, minmax_qparams
from .kernel_preference import KernelPreference, set_kernel_preference
from .lora_op import conv_as_matmul, lowrank_gradients_cheaper, qalora_conv2d, qalora_linear
from .packing import pack_codes, pack_int4, unpack_codes, unpack_int4
from .primitives import (
    clear_workspace,
    dequantize,
    fake_quantize,
    fake_quantize_lora_merged,
    fused_compile,
    fused_path_enabled,
    qrange,
    quantize,
    round_ste,
    scale_gradient,
    set_fused_compile,
    validate_bits,
)
from .quantizers import (
    DynamicActQuantizer,
    TemporalActQuantizer,
    WeightQuantizer,
    attach_timestep_context,
    detach_timestep_context,
    fake_quantize_impl,
    set_fake_quantize_resolver,
)
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
    "DynamicActQuantizer",
    "Granularity",
    "KernelPreference",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "TemporalActQuantizer",
    "TemporalValues",
    "TimestepContext",
    "WeightQuantizer",
    "attach_timestep_context",
    "dequantize",
    "fake_quantize",
    "install_timestep_hook",
    "lp_search_qparams",
    "pack_codes",
    "qrange",
    "quantize",
    "scale_aware_param_groups",
    "set_kernel_preference",
    "unpack_codes",
]
