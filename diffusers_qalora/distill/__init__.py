"""Data-free distillation of QALoRA students from their own full-precision weights, on Accelerate."""

from .conditioning import (
    ClassLabelConditioning,
    Conditioning,
    FluxPromptConditioning,
    PromptConditioning,
    SD3PromptConditioning,
    UnconditionalConditioning,
    load_prompts,
)
from .trainer import DataFreeDistiller, DistillConfig, NonFiniteLossError

__all__ = [
    "ClassLabelConditioning",
    "Conditioning",
    "DataFreeDistiller",
    "DistillConfig",
    "FluxPromptConditioning",
    "NonFiniteLossError",
    "PromptConditioning",
    "SD3PromptConditioning",
    "UnconditionalConditioning",
    "load_prompts",
]
