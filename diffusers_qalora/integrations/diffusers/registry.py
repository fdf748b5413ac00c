"""Registration of the ``"qalora"`` backend in diffusers' quantizer tables.

diffusers has no public registration API: ``DiffusersAutoQuantizer`` looks backends up in two module-level dicts,
``AUTO_QUANTIZER_MAPPING`` and ``AUTO_QUANTIZATION_CONFIG_MAPPING`` (``diffusers/quantizers/auto.py``), keyed by the
``quant_method`` string.  [register_diffusers_backend][diffusers_qalora.integrations.diffusers.register_diffusers_backend] inserts our two classes there, validated and idempotent.
"""

from __future__ import annotations

from .config import QALoraQuantConfig, QALoraQuantMethod
from .quantizer import QALoraDiffusersQuantizer


def _same_class(a: type, b: type) -> bool:
    # A reloaded module gives a new class object with the same name: treat it as ours.
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def register_diffusers_backend() -> None:
    """Make ``quant_method="qalora"`` known to diffusers (``from_pretrained``, ``PipelineQuantizationConfig``).

    Idempotent.  Raises a ``RuntimeError`` (and changes nothing) if another backend already owns the key.
    """
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    key = QALoraQuantMethod.QALORA.value
    if not issubclass(QALoraDiffusersQuantizer, DiffusersQuantizer) or not issubclass(
        QALoraQuantConfig, QuantizationConfigMixin
    ):  # pragma: no cover - guards against a diffusers that renamed its base classes
        raise RuntimeError("diffusers' quantizer base classes changed; this diffusers version is not supported.")
    tables = (
        (auto.AUTO_QUANTIZER_MAPPING, QALoraDiffusersQuantizer, "quantizer"),
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QALoraQuantConfig, "quantization config"),
    )
    for table, cls, what in tables:  # validate both tables before writing either
        owner = table.get(key)
        if owner is not None and not _same_class(owner, cls):
            raise RuntimeError(
                f"diffusers already has a {what} for quant_method {key!r}: {owner.__module__}.{owner.__qualname__}."
            )
    for table, cls, _ in tables:
        table[key] = cls


def unregister_diffusers_backend() -> None:
    """Remove the ``"qalora"`` entries again (tests)."""
    from diffusers.quantizers import auto

    key = QALoraQuantMethod.QALORA.value
    for table, cls in (
        (auto.AUTO_QUANTIZER_MAPPING, QALoraDiffusersQuantizer),
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QALoraQuantConfig),
    ):
        if key in table and _same_class(table[key], cls):
            del table[key]
