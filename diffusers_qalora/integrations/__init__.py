"""Thin integrations with PEFT, diffusers and the Hub.  Registration happens in [`register`], called once on import
of ``diffusers_qalora``."""

from .versions import check_dependency_versions

# Before importing anything that needs them: a too-old PEFT or diffusers gives a clear upgrade message, not a silent
# wrong model or an obscure error later.
check_dependency_versions()

from .diffusers import register_diffusers_backend  # noqa: E402
from .peft import register_peft_method  # noqa: E402

__all__ = ["register", "register_diffusers_backend", "register_peft_method"]


def register() -> None:
    """Register the QALoRA PEFT type and the ``"qalora"`` diffusers quantization backend (idempotent).

    Raises:
        ImportError: PEFT, diffusers, huggingface_hub or safetensors is older than this package supports; the
            message names the ``pip install -U`` command.
    """
    check_dependency_versions()
    register_peft_method()
    register_diffusers_backend()
