"""Running the distillation jobs on several processes: one Accelerator set-up, named phases, and failures that end
the launch instead of hanging it.

Every job is a sequence of named phases (calibration, evaluation, training, ...).  Each phase is either
*distributed* (every process does its share and the results are gathered) or *main-process-only* (the others wait at
an explicit barrier); `docs/distillation.md` lists which is which.  A phase started with [`distributed_phase`]
first checks that every process entered the same phase, so a process that took another code path is reported at
once, by name, instead of deadlocking two different collectives.  Every collective has a timeout
(``collective_timeout``, ``--ddp_timeout`` on the command line): a process that waits longer raises
[`DistributedPhaseError`] naming the phase, and exits non-zero, which makes ``accelerate launch`` (torchrun) stop
the other processes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
)
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_COLLECTIVE_TIMEOUT_S = 1800
"""Seconds a process waits in one collective (barrier, gather, DDP all-reduce) before it gives up (as transformers'
``ddp_timeout``).  Main-process-only phases are short (writing files, scoring gathered samples), so the default
leaves a wide margin; raise it when one process must wait longer, e.g. over a slow shared filesystem."""

__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT_S",
    "DistributedPhaseError",
    "broadcast_module_state",
    "distributed_phase",
    "make_accelerator",
    "release_process_group",
]


class DistributedPhaseError(RuntimeError):
    """A collective of a distributed phase failed: another process is stuck, failed, or took another code path."""


def make_accelerator(
    output_dir: str | os.PathLike,
    mixed_precision: str | None = None,
    report_to: str | None = None,
    collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
) -> Accelerator:
    """The Accelerator of every distillation job.

    Args:
        output_dir: project and logging folder (trackers write into ``output_dir/logs``).
        mixed_precision: ``"no"``, ``"fp16"``, ``"bf16"`` or ``None`` (Accelerate's default / launch config).
        report_to: an Accelerate tracker, e.g. ``"tensorboard"``.
        collective_timeout: seconds any collective may wait before it raises instead of hanging.
    """
    if not collective_timeout > 0:
        raise ValueError(f"`collective_timeout` must be a positive number of seconds, got {collective_timeout!r}.")
    global _configured_timeout
    _configured_timeout = float(collective_timeout)
    out = Path(output_dir)
    return Accelerator(
        mixed_precision=mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        kwargs_handlers=[
            # Only the current timestep's activation step sizes take part in a step: the others are unused.
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout)),
        ],
    )


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and PartialState().num_processes > 1


def _collective_failure(err: BaseException) -> bool:
    """A failed collective: a timeout, or a peer that went away (gloo and NCCL messages, torch's DistError)."""
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        marker in text
        for marker in (
            "timed out",
            "timeout",
            "connection closed by peer",
            "connection reset by peer",
            "broken pipe",
            "gloo",
            "nccl",
        )
    )


_configured_timeout: float | None = None  # what make_accelerator gave the process group, for the error messages


@contextlib.contextmanager
def distributed_phase(name: str, seconds: dict[str, float] | None = None) -> Iterator[None]:
    """Run a phase of a job that every process runs (``seconds[name]``, when given, receives its wall time).

    With several processes, every process first tells the others which phase it entered (one small all-gather): if
    they differ, all raise [`DistributedPhaseError`] naming each process's phase.  A collective inside the phase
    that times out or loses its peer is re-raised as [`DistributedPhaseError`] naming the phase and the process.
    Any other exception is logged with the phase and the process index and re-raised unchanged (its process then
    exits non-zero and ``accelerate launch`` stops the others).  With one process this is a no-op.
    """
    start = time.perf_counter()
    if not _is_distributed():
        yield
        if seconds is not None:
            seconds[name] = time.perf_counter() - start
        return
    state = PartialState()
    where = f"process {state.process_index} of {state.num_processes}"
    try:
        phases = gather_object([name])
    except Exception as err:
        if _collective_failure(err):
            raise DistributedPhaseError(_collective_message(name, where, err, entering=True)) from err
        raise
    if len(set(phases)) > 1:
        listing = ", ".join(f"process {i}: {p!r}" for i, p in enumerate(phases))
        raise DistributedPhaseError(
            f"{where} entered phase {name!r} while the processes are in different phases ({listing}); every process "
            f"must run the same phases in the same order."
        )
    try:
        yield
        if seconds is not None:
            seconds[name] = time.perf_counter() - start
    except DistributedPhaseError:
        raise
    except Exception as err:
        if _collective_failure(err):
            raise DistributedPhaseError(_collective_message(name, where, err)) from err
        print(f"[{where}] failed in phase {name!r}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise


def _collective_message(name: str, where: str, err: BaseException, entering: bool = False) -> str:
    timeout = _configured_timeout
    limit = f" within {timeout:.0f} s" if timeout else ""
    stage = "at the start of" if entering else "in"
    return (
        f"{where}: a collective {stage} phase {name!r} did not complete{limit} ({type(err).__name__}: {err}). Another "
        f"process failed or is stuck: look for its error above. If this phase legitimately takes longer on one "
        f"process, raise --ddp_timeout (collective_timeout)."
    )


@torch.no_grad()
def broadcast_module_state(module: nn.Module, only: str | None = None) -> int:
    """Copy the main process's parameters and buffers into every other process's ``module`` (in place).

    Args:
        module: the same architecture on every process.
        only: broadcast only the entries whose name contains this substring (e.g. ``"qal_"``: adapter state).

    Returns:
        The number of tensors broadcast (0 with one process)."""
    if not _is_distributed():
        return 0
    tensors = [
        t for n, t in list(module.named_parameters()) + list(module.named_buffers()) if only is None or only in n
    ]
    # One collective per (device, dtype): a thousand small step-size tensors would otherwise cost a thousand.
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.data)
    for (_, dtype), group in groups.items():
        # gloo has no bool broadcast: send the same bytes as uint8.
        views = [t.view(torch.uint8) if dtype == torch.bool else t for t in group]
        flat = torch.cat([v.reshape(-1) for v in views])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for view in views:
            view.copy_(flat[offset : offset + view.numel()].view_as(view))
            offset += view.numel()
    return len(tensors)


def release_process_group() -> None:
    """End a multi-process run cleanly once every phase is done: wait for all processes, then destroy the
    ``torch.distributed`` group (a no-op without one).  A gloo group left to the interpreter's exit can abort a
    finished process ("terminate called without an active exception"), which fails the whole launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
