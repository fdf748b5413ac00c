"""Post-training quantization baselines, built as QALoRA adapters whose LoRA is zero (so they are exactly PTQ):

* ``naive_ptq``: min-max weight step per output channel, one calibrated activation step size for all timesteps;
* ``timestep_ptq``: the same weights, one calibrated (not learned) activation step size per timestep
  (Q-Diffusion-style per-step calibration).

Several baselines live on one model as named adapters; switch with ``set_qalora_adapter`` or disable all adapters
with ``adapters_disabled`` for the full-precision model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..tuners.qalora.api import calibrating, get_qalora_model, set_qalora_adapter
from ..tuners.qalora.config import QALoraConfig

BASELINES = ("naive_ptq", "timestep_ptq")


def baseline_config(
    kind: str, weight_bits: int, act_bits: int, timesteps: Sequence[float] | None = None, **overrides: Any
) -> QALoraConfig:
    """The [QALoraConfig][diffusers_qalora.QALoraConfig] of a PTQ baseline (rank 1, since its LoRA stays zero)."""
    if kind not in BASELINES:
        raise ValueError(f"`kind` must be one of {BASELINES}, got {kind!r}.")
    fields = {
        "r": 1,
        "lora_alpha": 1,
        "weight_bits": weight_bits,
        "act_bits": act_bits,
        "weight_init": "minmax",
        "act_init": "lp",
        "timesteps": list(timesteps) if timesteps is not None else None,
        "temporal_activations": kind == "timestep_ptq",
        "inference_mode": True,
    }
    return QALoraConfig(**{**fields, **overrides})


def add_calibrated_adapter(
    model: nn.Module, config: QALoraConfig, adapter_name: str, calibrate: Callable[[], Any]
) -> nn.Module:
    """Inject ``config`` as ``adapter_name``, make it active and calibrate its activation step sizes by running
    ``calibrate()`` (full-precision trajectories)."""
    get_qalora_model(model, config, adapter_name)
    set_qalora_adapter(model, adapter_name, trainable=not config.inference_mode)
    with calibrating(model):
        calibrate()
    return model
