"""Integrations with PEFT, diffusers and the Hub: adapter files, the diffusers quantization backend, Hub sharing.

Registration is automatic (see `diffusers_qalora._registration`); [register][diffusers_qalora.integrations.register]
does it explicitly.
"""

from ..tuners.qalora.registration import register_peft_method
from ..versions import check_dependency_versions

__all__ = [
    "register",
]


def register() -> None:
    """Register the QALoRA PEFT type and the ``"qalora"`` diffusers quantization backend (idempotent).

    Raises:
        ImportError: PEFT, diffusers, huggingface_hub or safetensors is older than this package supports; the
            message names the ``pip install -U`` command.
    """
    from .diffusers.registry import register_diffusers_backend

    check_dependency_versions()
    register_peft_method()
    register_diffusers_backend()
