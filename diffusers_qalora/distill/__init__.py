"""Data-free distillation of QALoRA students from their own full-precision weights, on Accelerate."""

from .conditioning import (
    ClassLabelConditioning,
    Conditioning,
    PromptConditioning,
    UnconditionalConditioning,
    load_prompts,
)
from .trainer import DataFreeDistiller, DistillConfig, NonFiniteLossError

__all__ = [
    "ClassLabelConditioning",
    "Conditioning",
    "DataFreeDistiller",
    "DistillConfig",
    "NonFiniteLossError",
    "PromptConditioning",
    "UnconditionalConditioning",
    "load_prompts",
]
