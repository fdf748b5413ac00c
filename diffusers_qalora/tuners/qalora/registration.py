"""Registration of the QALoRA method with PEFT (run when this tuner package is imported, as PEFT's own tuners do).

PEFT's public ``register_peft_method`` only accepts names that are already members of its closed ``PeftType`` enum,
so a third-party method cannot use it without mutating that enum.  Instead we write the three lookup tables that
``register_peft_method`` itself fills (type -> prefix, config class, tuner class), keyed by our own ``str`` enum
member ``QALoraPeftType.QALORA``; JSON configs saying ``"peft_type": "QALORA"`` then resolve to our classes.
"""

from __future__ import annotations

from .config import QALoraConfig, QALoraPeftType
from .model import QALoraModel


def register_peft_method() -> None:
    """Make ``"QALORA"`` known to PEFT: ``get_peft_model``, ``inject_adapter_in_model``, ``PeftModel.from_pretrained``
    and ``PeftConfig.from_pretrained`` then work for QALoRA.  Idempotent; raises if another method owns the name or
    the prefix."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    key = QALoraPeftType.QALORA
    owner = PEFT_TYPE_TO_TUNER_MAPPING.get(key)
    if owner is QALoraModel:
        return
    if owner is not None:
        raise RuntimeError(f"PEFT already has a method called {key.value!r} ({owner.__module__}.{owner.__name__}).")
    for other, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == QALoraModel.prefix:
            raise RuntimeError(f"PEFT method {other!r} already uses the prefix {prefix!r}.")
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = QALoraModel.prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = QALoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[key] = QALoraModel
