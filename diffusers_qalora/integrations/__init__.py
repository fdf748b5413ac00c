"""Thin integrations with PEFT, diffusers and the Hub.  Registration happens in [`register`], called once on import
of ``diffusers_qalora``."""

from .peft import register_peft_method

__all__ = ["register", "register_peft_method"]


def register() -> None:
    """Register the QALoRA PEFT type (idempotent)."""
    register_peft_method()
