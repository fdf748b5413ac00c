"""Temporal step sizes: one activation step size (and zero point) per calibrated timestep *value*.

The denoiser's ``timestep`` argument is read by a forward pre-hook (`TimestepHook`) into a shared
[TimestepContext][diffusers_qalora.TimestepContext]; every temporal quantizer looks its step size up by value, never by counting calls.  A timestep
between two table entries gets the linear interpolation of their step sizes; one outside the table gets the nearest
end.  A batch whose samples sit at different timesteps gets each sample's own step size.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence

import torch
from torch import nn


def validate_timestep_table(values: Sequence[float] | torch.Tensor, name: str = "timesteps") -> tuple[float, ...]:
    """Return the table as a tuple of floats; raise a ``ValueError`` unless it is non-empty and strictly increasing."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(
                f"`{name}` must be a 1-D sequence of timesteps, got a tensor of shape {tuple(values.shape)}."
            )
        values = values.tolist()
    try:
        table = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:  # float("a") raises ValueError, float(None) TypeError
        raise ValueError(f"`{name}` must be a sequence of numbers, got {values!r}.") from err
    if not table:
        raise ValueError(f"`{name}` must hold at least one timestep, got an empty table.")
    if any(b <= a for a, b in zip(table, table[1:])):
        raise ValueError(
            f"`{name}` must be strictly increasing, got {list(table)[:8]}{'...' if len(table) > 8 else ''}; "
            f"pass e.g. sorted(set(scheduler.timesteps.tolist()))."
        )
    return table


def timesteps_to_tensor(timestep: torch.Tensor | float | int) -> torch.Tensor:
    """Normalise a denoiser ``timestep`` argument (tensor of 0 or 1 dims, int or float) to a 1-D float32 tensor."""
    if isinstance(timestep, torch.Tensor):
        if timestep.dim() > 1:
            raise ValueError(
                f"`timestep` must be a scalar or a 1-D tensor with one value per sample, got shape {tuple(timestep.shape)}."
            )
        return timestep.detach().reshape(-1).to(torch.float32)
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise ValueError(f"`timestep` must be a tensor, int or float, got {type(timestep).__name__}.")
    return torch.tensor([float(timestep)], dtype=torch.float32)


class TimestepContext:
    """The timesteps of the denoiser call in progress, shared by all temporal quantizers of one model.

    It is deliberately not cleared after the forward pass: gradient checkpointing re-runs layers during the backward
    pass, which must see the same timesteps.
    """

    def __init__(self) -> None:
        self.timesteps: torch.Tensor | None = None

    def set(self, timestep: torch.Tensor | float | int) -> None:
        self.timesteps = timesteps_to_tensor(timestep)

    def clear(self) -> None:
        self.timesteps = None

    def per_sample(self, batch_size: int, where: str = "layer") -> torch.Tensor:
        """Timesteps for a batch of ``batch_size`` samples.

        A single timestep is broadcast; ``k`` timesteps for ``k * m`` samples are repeated ``m`` times each
        (layers that fold extra dims into the batch).  Anything else is an error naming ``where``.
        """
        t = self.timesteps
        if t is None:
            raise RuntimeError(
                f"{where}: no timestep is set. Temporal quantizers read the denoiser's `timestep` argument through "
                f"the forward pre-hook installed by get_qalora_model / install_timestep_hook; call the denoiser "
                f"(not a sub-module) or set the context with `context.set(t)`."
            )
        if t.numel() == 1 or t.numel() == batch_size:
            return t.expand(batch_size) if t.numel() == 1 else t
        if batch_size % t.numel() == 0:
            return t.repeat_interleave(batch_size // t.numel())
        raise ValueError(
            f"{where}: the denoiser was called with {t.numel()} timesteps but this layer sees a batch of {batch_size}; "
            f"pass one timestep per sample or a single timestep."
        )


class TimestepHook:
    """Forward pre-hook (``with_kwargs=True``) that reads the denoiser's timestep argument into a context."""

    def __init__(self, context: TimestepContext, forward: callable, argument: str = "timestep") -> None:
        params = [p for p in inspect.signature(forward).parameters.values() if p.name != "self"]
        names = [p.name for p in params]
        if argument not in names:
            raise ValueError(
                f"the model's forward has no `{argument}` argument (it takes {names}); pass the name of its timestep "
                f"argument as `timestep_argument`."
            )
        self.context = context
        self.argument = argument
        self.position = names.index(argument)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.argument in kwargs:
            value = kwargs[self.argument]
        elif len(args) > self.position:
            value = args[self.position]
        else:
            raise ValueError(f"{type(module).__name__} was called without its `{self.argument}` argument.")
        self.context.set(value)


def install_timestep_hook(
    model: nn.Module, context: TimestepContext, argument: str = "timestep"
) -> torch.utils.hooks.RemovableHandle:
    """Register a `TimestepHook` on ``model`` and return its handle."""
    hook = TimestepHook(context, model.forward, argument)
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def interpolation_indices(table: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each value of ``t``: the lower and upper table indices and the weight of the upper one.

    Values outside the table clamp to its ends; a value equal to an entry gets ``lo == hi`` and weight 0, so only that
    entry takes part (and receives a gradient).
    """
    t = t.to(table.dtype).clamp(table[0], table[-1])
    hi = torch.searchsorted(table, t).clamp(max=table.numel() - 1)
    exact = table[hi] == t
    lo = torch.where(exact, hi, hi - 1).clamp(min=0)
    span = (table[hi] - table[lo]).clamp_min(1e-12)
    w = torch.where(exact, torch.zeros_like(t), (t - table[lo]) / span)
    return lo, torch.where(exact, lo, hi), w


class TemporalValues(nn.Module):
    """A table of scalar parameters keyed by timestep value, read with `interpolation_indices`.

    Each entry is its own 0-d ``nn.Parameter`` (``v0``, ``v1``, ...), and a lookup only puts the entries it uses into
    the graph.  The others get no gradient at all (``grad is None``), so optimizers skip them: no momentum drift, no
    weight decay.  In a state dict the entries are stored as one ``(T,)`` tensor named ``values`` (one tensor per
    table instead of ``T``), and split again on loading.
    """

    def __init__(self, timesteps: Sequence[float], init: float = 1.0) -> None:
        super().__init__()
        table = validate_timestep_table(timesteps)
        self.register_buffer("timesteps", torch.tensor(table, dtype=torch.float32))
        self._size = len(table)
        for i in range(self._size):
            self.register_parameter(f"v{i}", nn.Parameter(torch.tensor(float(init))))

    @property
    def values(self) -> tuple[nn.Parameter, ...]:
        """The entries, in table order."""
        return tuple(self._parameters[f"v{i}"] for i in range(self._size))

    def __len__(self) -> int:
        return self._size

    def stacked(self) -> torch.Tensor:
        """All entries as one ``(T,)`` tensor (every entry in the graph)."""
        return torch.stack(self.values)

    def fill_(self, values: torch.Tensor | Sequence[float]) -> None:
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape != (len(self),):
            raise ValueError(f"expected {len(self)} values, got shape {tuple(values.shape)}.")
        with torch.no_grad():
            for p, v in zip(self.values, values):
                p.copy_(v)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "timesteps"] = self.timesteps if keep_vars else self.timesteps.detach()
        destination[prefix + "values"] = torch.stack([p if keep_vars else p.detach() for p in self.values])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "values"
        if key in state_dict:
            stacked = state_dict.pop(key)
            if tuple(stacked.shape) != (self._size,):
                error_msgs.append(
                    f"size mismatch for {key}: the checkpoint holds {tuple(stacked.shape)} step sizes, the model's "
                    f"timestep table has {self._size} entries."
                )
                return
            for i in range(self._size):
                state_dict[f"{prefix}v{i}"] = stacked[i]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def lookup(self, t: torch.Tensor) -> torch.Tensor:
        """Interpolated values at timesteps ``t`` (1-D), shape ``(len(t),)``."""
        table = self.timesteps
        lo, hi, w = interpolation_indices(table, t.to(table.device))
        used = torch.unique(torch.cat([lo, hi]))
        vals = torch.stack([self.values[i] for i in used.tolist()])
        lo_pos, hi_pos = torch.searchsorted(used, lo), torch.searchsorted(used, hi)
        w = w.to(vals.dtype)
        return vals[lo_pos] * (1.0 - w) + vals[hi_pos] * w
