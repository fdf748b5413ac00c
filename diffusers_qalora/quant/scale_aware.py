"""Scale-aware LoRA optimization (EfficientDM, Eq. 8).

Rounding turns a LoRA update ``B A`` into a step function of step ``s_w`` (the layer's weight step size): a layer
whose codes are coarse needs proportionally larger updates before any code moves.  The paper asks for the update
size to be proportional to the layer's mean weight step ``s̄``.

Under Adam the update size is ``lr * m / sqrt(v)``, which does not change when the gradient is multiplied by a
per-layer constant (Adam normalises it away), so the paper's "multiply the gradient by s̄" has almost no effect with
Adam.  The form that survives Adam's normalisation is a per-layer learning rate ``lr_l ∝ s̄_l``; the official code
does this too (``lr = s̄ / 2500``).  Here ``lr_l = lora_lr * s̄_l / mean_l(s̄_l)``, so ``lora_lr`` is the learning
rate of a layer of average step size and stays meaningful across bit widths.  The gradient-multiplier form is kept
as ``mode="grad"`` (useful with SGD, where it is equivalent).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

SCALE_AWARE_MODES = ("lr", "grad", "none")

# The default learning rates of the three parameter groups (LoRA factors, weight step sizes, activation step sizes),
# shared by `get_qalora_param_groups`, `DistillConfig` and the distillation CLI.  They are the rates the committed
# distillation results use; EfficientDM's paper uses 1e-6 for the weight and 5e-4 for the activation step sizes.
DEFAULT_LORA_LR = 1e-4
DEFAULT_WEIGHT_STEP_LR = 1e-5
DEFAULT_ACT_STEP_LR = 1e-4


@dataclass
class ScaleAwareEntry:
    """The LoRA parameters of one layer and its mean weight step size ``s̄``."""

    name: str
    params: Sequence[nn.Parameter]
    mean_step: float


class ScaleAwareGroups(list):
    """A list of optimizer parameter-group dicts, so ``torch.optim.AdamW(groups)`` takes it as it is, plus the
    gradient hooks installed in ``mode="grad"`` (``hooks``; remove them with `remove_hooks` when training is done).

    ``param_groups`` is the list itself, named as on ``torch.optim.Optimizer``.
    """

    def __init__(self, param_groups: Iterable[dict] = (), hooks: Iterable[torch.utils.hooks.RemovableHandle] = ()):
        super().__init__(param_groups)
        self.hooks: list[torch.utils.hooks.RemovableHandle] = list(hooks)

    @property
    def param_groups(self) -> ScaleAwareGroups:
        return self

    def remove_hooks(self) -> None:
        """Remove the ``mode="grad"`` gradient hooks (no-op in the other modes)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()

    def __repr__(self) -> str:
        # The groups hold whole parameters: show their names and sizes, not their values.
        shown = ", ".join(f"{g.get('name', i)!r}: {len(g['params'])} params" for i, g in enumerate(self))
        return f"ScaleAwareGroups([{shown}], hooks={len(self.hooks)})"


def scale_aware_param_groups(
    entries: Iterable[ScaleAwareEntry], lora_lr: float, mode: str = "lr", weight_decay: float = 0.0
) -> ScaleAwareGroups:
    """One parameter group per layer with the scale-aware learning rate (``mode="lr"``), one group with gradient
    hooks multiplying by ``s̄_l / mean(s̄)`` (``mode="grad"``), or one plain group (``mode="none"``).

    Each group carries a ``"name"`` key (and, in ``"lr"`` mode, the layer's ``"mean_step"``) for logging.
    """
    if mode not in SCALE_AWARE_MODES:
        raise ValueError(f"`scale_aware` mode must be one of {SCALE_AWARE_MODES}, got {mode!r}.")
    if not lora_lr > 0:
        raise ValueError(f"`lora_lr` must be positive, got {lora_lr!r}.")
    entries = [e for e in entries if len(e.params)]
    if not entries:
        return ScaleAwareGroups([])
    for e in entries:
        if not e.mean_step > 0:
            raise ValueError(f"layer {e.name!r}: mean weight step must be positive, got {e.mean_step!r}.")
    reference = sum(e.mean_step for e in entries) / len(entries)
    if mode == "none":
        params = [p for e in entries for p in e.params]
        return ScaleAwareGroups([{"params": params, "lr": lora_lr, "weight_decay": weight_decay, "name": "lora"}])
    if mode == "lr":
        groups = [
            {
                "params": list(e.params),
                "lr": lora_lr * e.mean_step / reference,
                "weight_decay": weight_decay,
                "name": f"lora:{e.name}",
                "mean_step": e.mean_step,
            }
            for e in entries
        ]
        return ScaleAwareGroups(groups)
    hooks = []
    for e in entries:
        factor = e.mean_step / reference
        for p in e.params:
            hooks.append(p.register_hook(lambda g, f=factor: g * f))
    params = [p for e in entries for p in e.params]
    return ScaleAwareGroups([{"params": params, "lr": lora_lr, "weight_decay": weight_decay, "name": "lora"}], hooks)
