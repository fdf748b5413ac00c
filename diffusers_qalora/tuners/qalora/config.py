"""`QALoraConfig`: the PEFT configuration of EfficientDM's quantization-aware LoRA.

Not to be confused with PEFT's ``LoraConfig(use_qalora=True)``, which implements QA-LoRA (Xu et al., group-pooled
adapters for GPTQ LLMs), a different method.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from ...quant import INIT_METHODS, validate_bits, validate_timestep_table
from ...quant.kernel_preference import KernelPreference, validate_kernel_preference


class QALoraPeftType(str, enum.Enum):
    """PEFT type of this plug-in.  A ``str`` enum of its own, so PEFT's closed ``PeftType`` is left untouched; the
    JSON string ``"QALORA"`` hashes and compares equal to this member, which is all PEFT's lookups need."""

    QALORA = "QALORA"


# Top-level modules that embed the input, the timestep or the conditioning, or produce the output.  EfficientDM keeps
# such layers at 8 bits without LoRA; the names cover diffusers' UNets and DiT-style transformers.
DEFAULT_EIGHT_BIT_ROOTS = (
    "conv_in",
    "conv_out",
    "proj_out",
    "time_embedding",
    "add_embedding",
    "class_embedding",
    "encoder_hid_proj",
    "pos_embed",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "norm_out",
)


ACT_GRANULARITIES = ("tensor", "token", "group")

# Fields that older adapter_config.json files hold and this config no longer has (dropped when such a file is read).
OBSOLETE_FIELDS = ("layers_to_transform", "layers_pattern")


def _check_granularity(config: QALoraConfig, prefix: str, choices: tuple[str, ...]) -> None:
    """``<prefix>_granularity`` is one of ``choices``; ``"group"`` needs a positive ``<prefix>_group_size``."""
    granularity, size = getattr(config, f"{prefix}_granularity"), getattr(config, f"{prefix}_group_size")
    if granularity not in choices:
        raise ValueError(f"`{prefix}_granularity` must be one of {choices}, got {granularity!r}.")
    bad_size = isinstance(size, bool) or not isinstance(size, int) or size < 1
    if granularity == "group" and bad_size:
        raise ValueError(
            f"`{prefix}_group_size` must be a positive integer when {prefix}_granularity='group' (e.g. 32), got "
            f"{size!r}."
        )


@dataclass
class QALoraConfig(PeftConfig):
    """Configuration for [QALoraModel][diffusers_qalora.QALoraModel]: LoRA merged into the weight *before* fake quantization (EfficientDM).

    A wrapped layer computes ``op(Q_a(x; t), Q_w(W0 + scaling * B @ A))`` where ``Q_w`` is an LSQ weight quantizer and
    ``Q_a`` a temporal activation quantizer with one step size per calibrated timestep.

    Args:
        r (`int`, defaults to `32`): LoRA rank (the paper uses 32 everywhere).
        lora_alpha (`float`, defaults to `32`): LoRA scaling numerator; ``scaling = lora_alpha / r`` (1 in the paper).
        weight_bits (`int`, defaults to `4`): bit width of the weights, 2..8.
        act_bits (`int`, defaults to `4`): bit width of the layer inputs, 2..8.
        target_modules (`list[str] | str`, *optional*): module names (or a regex) to wrap; by default every
            ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) of the denoiser.
        exclude_modules (`list[str] | str`, *optional*): module names (or a regex) never to wrap.
        eight_bit_modules (`list[str]`, *optional*): modules (names or name prefixes) quantized at ``special_bits``
            with a single static activation step size and no LoRA.  By default the input, embedding and output layers
            (see ``DEFAULT_EIGHT_BIT_ROOTS``); ``[]`` treats every layer alike.
        special_bits (`int`, defaults to `8`): weight and activation bits of those modules.
        weight_granularity (`"channel" | "group"`, defaults to `"channel"`): one weight step per output channel, or
            per output channel and group of ``weight_group_size`` input channels.
        weight_group_size (`int`, *optional*): group size for ``weight_granularity="group"``.
        weight_symmetric (`bool`, defaults to `True`): signed weight codes without zero point (integer-kernel friendly).
        weight_init (`"minmax" | "mse" | "lp"`, defaults to `"mse"`): weight step-size initialisation.
        act_symmetric (`bool`, defaults to `False`): signed activation codes; by default unsigned with a zero point.
        act_init (`"minmax" | "mse" | "lp"`, defaults to `"lp"`): activation calibration search (LAPQ's p = 2.4).
        act_granularity (`"tensor" | "token" | "group"`, defaults to `"tensor"`): the step sizes of the layer inputs.
            ``"tensor"`` is EfficientDM's: one calibrated, learned step size per tensor and timestep (temporal LSQ).
            ``"token"`` computes a min-max step size per token at every call (a row of a linear layer's input, a
            pixel of a convolution's), ``"group"`` one per token and group of ``act_group_size`` channels
            (SVDQuant's 4-bit activations); both are dynamic (`DynamicActQuantizer`): nothing to calibrate or learn,
            the step sizes follow every input, at the cost of one reduction per call.  The ``eight_bit_modules`` are
            then quantized per token.
        act_group_size (`int`, *optional*): channels per activation group for ``act_granularity="group"`` (e.g. 64);
            it must divide the input channels of every wrapped layer outside ``eight_bit_modules``.
        timesteps (`list[float]`, *optional*): the timestep table, strictly increasing, in the units the denoiser
            receives.  By default the 100 values ``0, 10, ..., 990`` (a 100-step DDIM schedule over 1000 training
            timesteps); pass ``diffusers_qalora.timestep_table(scheduler, 100)`` to match a pipeline's scheduler exactly, and values in
            [0, 1] for Flux-style denoisers.
        temporal_activations (`bool`, defaults to `True`): one activation step size per table entry (TALSQ);
            `False` gives one step size shared by all timesteps.
        lsq_grad_scale (`bool`, defaults to `False`): LSQ's gradient scale on step sizes.
        quantize_attention (`bool`, defaults to `False`): also quantize the attention's query, key and value (the
            outputs of the ``to_q``/``to_k``/``to_v`` layers of diffusers' ``Attention`` modules) with temporal step
            sizes held on those layers (``qal_out_quantizer``), calibrated and trained like the input step sizes.
            Injection installs the matching processor on those modules: `QALoraAttnProcessor` (UNet attention),
            `QALoraJointAttnProcessor` (SD3's joint attention), `QALoraFluxAttnProcessor` (Flux's attention).
            Integer export keeps them on the integer projections (the processors stay).
        attention_bits (`int`, *optional*): bit width of q, k, v and the softmax output; defaults to ``act_bits``.
            Signed or unsigned as ``act_symmetric`` says; the softmax output is always unsigned.
        quantize_attention_probs (`bool`, defaults to `False`): also quantize the softmax output (the attention
            probabilities), with a temporal step size held on the ``to_v`` layer (``qal_prob_quantizer``).  Needs
            ``quantize_attention``.
        timestep_argument (`str`, defaults to `"timestep"`): name of the denoiser's timestep argument.
        kernel_preference (`"auto" | "torch" | "triton"`, defaults to `"auto"`): the implementation the adapter's
            fake-quantizers (and its quantized attention) run, written on them at injection (see
            [KernelPreference][diffusers_qalora.KernelPreference]): ``"auto"`` picks the Triton kernels on CUDA when
            ``triton`` imports and the torch code elsewhere.  Change it later with
            [set_kernel_preference][diffusers_qalora.set_kernel_preference].
        init_weights (`bool`, defaults to `True`): ``B = 0`` so the model starts exactly at its PTQ state; `False`
            draws ``B`` at random (tests only).
        modules_to_save (`list[str]`, *optional*): extra modules trained and saved in full, as in PEFT.
    """

    r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; scaling = lora_alpha / r."})
    weight_bits: int = field(default=4, metadata={"help": "Weight bit width, 2..8."})
    act_bits: int = field(default=4, metadata={"help": "Activation bit width, 2..8."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to wrap; default: every Linear and Conv2d (groups=1)."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never to wrap."})
    eight_bit_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules kept at `special_bits` without LoRA; default: input, embedding and output layers."},
    )
    special_bits: int = field(default=8, metadata={"help": "Bits of the eight_bit_modules."})
    weight_granularity: Literal["channel", "group"] = field(
        default="channel", metadata={"help": "Weight step granularity: 'channel' or 'group'."}
    )
    weight_group_size: int | None = field(default=None, metadata={"help": "Input channels per weight group."})
    weight_symmetric: bool = field(default=True, metadata={"help": "Signed weight codes without zero point."})
    weight_init: str = field(default="mse", metadata={"help": "Weight step init: 'minmax', 'mse' or 'lp'."})
    act_symmetric: bool = field(default=False, metadata={"help": "Signed activation codes without zero point."})
    act_init: str = field(default="lp", metadata={"help": "Activation calibration: 'minmax', 'mse' or 'lp'."})
    act_granularity: Literal["tensor", "token", "group"] = field(
        default="tensor",
        metadata={"help": "Input step sizes: 'tensor' (temporal, learned), 'token' or 'group' (dynamic, min-max)."},
    )
    act_group_size: int | None = field(default=None, metadata={"help": "Channels per activation group."})
    timesteps: list[float] | None = field(
        default=None, metadata={"help": "Strictly increasing timestep table; default 0, 10, ..., 990."}
    )
    temporal_activations: bool = field(default=True, metadata={"help": "One activation step per timestep entry."})
    lsq_grad_scale: bool = field(default=False, metadata={"help": "Apply LSQ's gradient scale to step sizes."})
    quantize_attention: bool = field(
        default=False,
        metadata={"help": "Quantize the attention's q, k, v (outputs of to_q/to_k/to_v) with temporal step sizes."},
    )
    attention_bits: int | None = field(
        default=None, metadata={"help": "Bits of q, k, v and the softmax output; default act_bits."}
    )
    quantize_attention_probs: bool = field(
        default=False, metadata={"help": "Also quantize the softmax output (needs quantize_attention)."}
    )
    timestep_argument: str = field(default="timestep", metadata={"help": "The denoiser's timestep argument."})
    kernel_preference: KernelPreference = field(
        default=KernelPreference.AUTO,
        metadata={"help": "Implementation of the fake-quantizers: 'auto', 'torch' or 'triton'."},
    )
    init_weights: bool = field(default=True, metadata={"help": "B = 0 at init (exact PTQ start)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})
    bias: str = field(default="none", metadata={"help": "Bias training: only 'none' is supported."})
    version: int = field(default=1, metadata={"help": "Config format version."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = QALoraPeftType.QALORA
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"`r` must be a positive integer (e.g. 32), got {self.r!r}.")
        if not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be positive, got {self.lora_alpha!r}.")
        validate_bits(self.weight_bits, "weight_bits")
        validate_bits(self.act_bits, "act_bits")
        validate_bits(self.special_bits, "special_bits")
        self.kernel_preference = validate_kernel_preference(self.kernel_preference)
        if self.attention_bits is not None:
            validate_bits(self.attention_bits, "attention_bits")
        if self.quantize_attention_probs and not self.quantize_attention:
            raise ValueError(
                "`quantize_attention_probs=True` needs `quantize_attention=True` (the softmax output is quantized by "
                "the attention processor that quantize_attention installs)."
            )
        _check_granularity(self, "weight", ("channel", "group"))
        _check_granularity(self, "act", ACT_GRANULARITIES)
        if self.act_granularity != "group" and self.act_group_size is not None:
            raise ValueError(
                f"`act_group_size` ({self.act_group_size!r}) is only used with act_granularity='group'; drop it or set "
                f"act_granularity='group'."
            )
        for name in ("weight_init", "act_init"):
            if getattr(self, name) not in INIT_METHODS:
                raise ValueError(f"`{name}` must be one of {INIT_METHODS}, got {getattr(self, name)!r}.")
        if self.bias != "none":
            raise ValueError(f"`bias` must be 'none' for QALoRA (biases stay frozen), got {self.bias!r}.")
        if self.timesteps is not None:
            self.timesteps = list(validate_timestep_table(self.timesteps, "timesteps"))
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list | tuple):
            self.exclude_modules = set(self.exclude_modules)
        if self.eight_bit_modules is not None:
            self.eight_bit_modules = list(self.eight_bit_modules)

    @classmethod
    def check_kwargs(cls, **kwargs):
        # adapter_config.json files written by earlier versions carry two always-null fields copied from PEFT's LoRA
        # config, which QALoRA never used; PEFT itself would drop them with a warning to upgrade PEFT.
        for name in OBSOLETE_FIELDS:
            kwargs.pop(name, None)
        return super().check_kwargs(**kwargs)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def timestep_table(self) -> list[float]:
        """The configured table, or the default ``0, 10, ..., 990``."""
        return list(self.timesteps) if self.timesteps is not None else [float(t) for t in range(0, 1000, 10)]

    def is_eight_bit(self, module_name: str) -> bool:
        """Whether ``module_name`` is one of the ``eight_bit_modules`` (an exact name or a dotted prefix of it)."""
        roots = DEFAULT_EIGHT_BIT_ROOTS if self.eight_bit_modules is None else self.eight_bit_modules
        return any(module_name == r or module_name.startswith(r + ".") for r in roots)
