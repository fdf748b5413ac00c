"""Thin integrations with PEFT, diffusers and the Hub.  Registration happens in [`register`], called once on import
of ``diffusers_qalora``."""

from .diffusers import register_diffusers_backend
from .peft import register_peft_method

__all__ = ["register", "register_diffusers_backend", "register_peft_method"]


def register() -> None:
    """Register the QALoRA PEFT type and the ``"qalora"`` diffusers quantization backend (idempotent)."""
    register_peft_method()
    register_diffusers_backend()
