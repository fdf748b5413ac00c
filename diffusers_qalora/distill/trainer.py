"""Data-free distillation of a QALoRA student from its own full-precision weights (EfficientDM, Sec. 3.3).

For each trajectory: fresh Gaussian noise and random conditioning; the full-precision teacher (the same model with
its adapters and quantizers switched off, so the weights are held once) samples its own trajectory (DDIM for
diffusion schedulers, Euler steps over the sigmas for flow-matching ones: see ``tuners.qalora.sampling``); at every
step the student sees the same ``x_t``, ``t`` and conditioning, and one optimizer step minimises the MSE between the
two predictions (noise or velocity, after classifier-free guidance when used).  The trajectory always follows the
teacher.
No dataset is read or stored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..integrations.adapters import save_qalora_adapter
from ..quant import clear_workspace
from ..quant.scale_aware import DEFAULT_ACT_STEP_LR, DEFAULT_LORA_LR, DEFAULT_WEIGHT_STEP_LR
from ..tuners.qalora.api import adapters_disabled, get_qalora_param_groups
from ..tuners.qalora.model import active_qalora_adapter
from ..tuners.qalora.sampling import DDIMSampler, TrajectorySampler, trajectory_sampler
from .checkpoint_files import verify_checksum_manifest, write_checksum_manifest
from .conditioning import Conditioning
from .distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, distributed_phase, make_accelerator

logger = logging.getLogger(__name__)

STATE_FILE = "distill_state.safetensors"
STATE_META = "distill_state.json"


class NonFiniteLossError(FloatingPointError):
    """The distillation loss became NaN or infinite."""


@dataclass
class DistillConfig:
    """Hyper-parameters of [DataFreeDistiller][diffusers_qalora.distill.DataFreeDistiller].

    Args:
        num_inference_steps (`int`, defaults to `100`): steps of each teacher trajectory (one optimizer step each).
        eta (`float`, defaults to `0.0`): DDIM eta of the teacher trajectory (EfficientDM trains with 1.0); must be 0
            for flow-matching schedulers, whose trajectories are Euler steps.
        batch_size (`int`, defaults to `8`): trajectories sampled in parallel per process.
        max_train_steps (`int`, defaults to `1000`): optimizer steps in all.
        lora_lr (`float`, defaults to `1e-4`): LoRA learning rate of a layer of average weight step size.
        weight_step_lr (`float`, defaults to `1e-5`): learning rate of the weight step sizes.
        act_step_lr (`float`, defaults to `1e-4`): learning rate of the activation step sizes and zero points.
        scale_aware (`"lr" | "grad" | "none"`, defaults to `"lr"`): scale-aware LoRA optimization.
        weight_decay (`float`, defaults to `0.0`): AdamW weight decay of the LoRA factors.
        lr_schedule (`"linear" | "constant" | "cosine"`, defaults to `"linear"`): decay over ``max_train_steps``.
        train_lora (`bool`, defaults to `True`): train the LoRA factors (off for ablations).
        train_weight_steps (`bool`, defaults to `True`): train the weight step sizes (off for ablations).
        train_act_steps (`bool`, defaults to `True`): train the activation step sizes (off for ablations).
        train_base_weights (`bool`, defaults to `False`): also train every parameter of the base model (weights,
            biases, norms, embeddings) at ``base_weight_lr``: full quantization-aware training, the baseline LoRA
            replaces.  The teacher can then no longer be the student with its adapters switched off, so
            [DataFreeDistiller][diffusers_qalora.distill.DataFreeDistiller] needs a separate frozen ``teacher``.
        base_weight_lr (`float`, defaults to `1e-5`): learning rate of the base parameters (``train_base_weights``).
        seed (`int`, defaults to `0`): seed of the noise and conditioning draws (offset per process).
        checkpointing_steps (`int`, *optional*): save a resumable checkpoint every so many steps.
        checkpoints_total_limit (`int`, *optional*): keep at most this many checkpoints.
        gradient_checkpointing (`bool`, defaults to `False`): trade compute for activation memory.
        use_8bit_adam (`bool`, defaults to `False`): bitsandbytes' AdamW8bit, as diffusers' training scripts.
        max_grad_norm (`float`, *optional*): gradient clipping.
    """

    num_inference_steps: int = 100
    eta: float = 0.0
    batch_size: int = 8
    max_train_steps: int = 1000
    lora_lr: float = DEFAULT_LORA_LR
    weight_step_lr: float = DEFAULT_WEIGHT_STEP_LR
    act_step_lr: float = DEFAULT_ACT_STEP_LR
    scale_aware: str = "lr"
    weight_decay: float = 0.0
    lr_schedule: str = "linear"
    train_lora: bool = True
    train_weight_steps: bool = True
    train_act_steps: bool = True
    train_base_weights: bool = False
    base_weight_lr: float = 1e-5
    seed: int = 0
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    max_grad_norm: float | None = None
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "batch_size", "max_train_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.checkpointing_steps is not None and self.checkpointing_steps < 1:
            raise ValueError(f"`checkpointing_steps` must be a positive integer, got {self.checkpointing_steps!r}.")
        if self.lr_schedule not in ("linear", "constant", "cosine"):
            raise ValueError(f"`lr_schedule` must be 'linear', 'constant' or 'cosine', got {self.lr_schedule!r}.")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"`eta` must be in [0, 1], got {self.eta!r}.")


class _Progress:
    """Position in the stream of trajectories; with the saved ``x_t`` it makes a resumed run exact."""

    def __init__(self) -> None:
        self.global_step = 0
        self.trajectory = 0
        self.position = 0
        self.x: torch.Tensor | None = None
        self.cond: dict[str, torch.Tensor] = {}

    def save(self, directory: Path, rank: int, num_processes: int) -> None:
        tensors = {"x": self.x.detach().cpu().contiguous()} if self.x is not None else {}
        tensors.update({f"cond.{k}": v.detach().cpu().contiguous() for k, v in self.cond.items()})
        save_file(tensors, str(directory / f"rank{rank}_{STATE_FILE}"))
        meta = {
            "global_step": self.global_step,
            "trajectory": self.trajectory,
            "position": self.position,
            "num_processes": num_processes,
        }
        (directory / f"rank{rank}_{STATE_META}").write_text(json.dumps(meta))

    def load(self, directory: Path, rank: int, num_processes: int) -> None:
        # Each process resumes its own trajectory stream, so the checkpoint must come from as many processes.
        written = len(list(directory.glob(f"rank*_{STATE_META}")))
        if written != num_processes:
            raise ValueError(
                f"checkpoint {directory} was written by {written} process(es) but this run has {num_processes}; "
                f"resume it with `accelerate launch --num_processes {written}` (each process continues its own "
                f"trajectories)."
            )
        meta = json.loads((directory / f"rank{rank}_{STATE_META}").read_text())
        self.global_step, self.trajectory, self.position = meta["global_step"], meta["trajectory"], meta["position"]
        tensors = load_file(str(directory / f"rank{rank}_{STATE_FILE}"))
        self.x = tensors.pop("x", None)
        self.cond = {k.removeprefix("cond."): v for k, v in tensors.items()}


def _lr_lambda(schedule: str, total: int):
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return lambda step: max(0.0, 1.0 - step / total)


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class DataFreeDistiller:
    """Distils a QALoRA model (built by ``get_qalora_model`` and calibrated) from its own full-precision teacher.

    Args:
        model (`nn.Module`): the QALoRA denoiser (student; the teacher is the same model with adapters disabled).
        scheduler: the teacher's sampler: a diffusers scheduler (a diffusion scheduler's config builds a DDIM
            trajectory, a flow-matching scheduler an Euler one with its static shift), or a ``TrajectorySampler``
            built for the pipeline (``tuners.qalora.sampling.trajectory_sampler(pipe, n, height=..., width=...)``:
            Flux and resolution-dependent shifts need it).
        conditioning (`Conditioning`): class labels, prompts or none.
        sample_shape (`tuple[int, ...]`): shape of one latent ``(C, H, W)``.
        config (`DistillConfig`): the training hyper-parameters.
        output_dir (`str`): where checkpoints, logs and the adapter go.
        accelerator (`Accelerator`, *optional*): built from ``mixed_precision``/``report_to`` when not given.
        collective_timeout (`float`, *optional*): seconds a collective may wait before it raises (only when the
            Accelerator is built here; see [`~diffusers_qalora.distill.distributed.make_accelerator`]).
        teacher (`nn.Module`, *optional*): a separate frozen full-precision teacher (its adapters, if any, are
            switched off).  Needed only when ``config.train_base_weights`` changes the weights the student shares
            with the default teacher (e.g. ``copy.deepcopy(model)`` before training).
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler: Any,
        conditioning: Conditioning,
        sample_shape: tuple[int, ...],
        config: DistillConfig,
        output_dir: str | os.PathLike,
        accelerator: Accelerator | None = None,
        mixed_precision: str | None = None,
        report_to: str | None = None,
        teacher: nn.Module | None = None,
        collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
    ) -> None:
        if config.train_base_weights and teacher is None:
            raise ValueError(
                "`train_base_weights=True` trains the weights the student shares with its teacher; pass a frozen copy "
                "as `teacher=copy.deepcopy(model)` (made before training) to DataFreeDistiller."
            )
        if teacher is model:
            raise ValueError("`teacher` must be a separate module, not the student itself; omit it to share weights.")
        self.config = config
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if accelerator is None:
            accelerator = make_accelerator(self.output_dir, mixed_precision, report_to, collective_timeout)
        self.accelerator = accelerator
        self.model = model
        self.teacher = teacher
        self.conditioning = conditioning
        self.sample_shape = tuple(sample_shape)
        if isinstance(scheduler, TrajectorySampler):
            if isinstance(scheduler, DDIMSampler) and scheduler.eta != config.eta:
                raise ValueError(
                    f"the DDIM sampler was built with eta={scheduler.eta} but `DistillConfig.eta` is {config.eta}; "
                    f"build it with the config's eta."
                )
            self.sampler = scheduler
        else:
            self.sampler = trajectory_sampler(scheduler, config.num_inference_steps, eta=config.eta)
        if len(self.sampler) != config.num_inference_steps:
            raise ValueError(
                f"the sampler has {len(self.sampler)} steps but `num_inference_steps` is "
                f"{config.num_inference_steps}; build it with the same number of steps."
            )
        # What the denoiser's `timestep` argument receives at each position (Flux: t / 1000).
        self.timesteps = self.sampler.model_timesteps
        self.progress = _Progress()
        self._prepared_model: nn.Module = model  # the engine's wrapper once `train` has prepared it
        self.history: list[dict[str, float]] = []

    # -- set-up --------------------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = get_qalora_param_groups(
            self.model, cfg.lora_lr, cfg.weight_step_lr, cfg.act_step_lr, cfg.scale_aware, cfg.weight_decay
        )
        self._scale_aware = groups
        keep = {"weight_steps": cfg.train_weight_steps, "act_steps": cfg.train_act_steps}
        param_groups = []
        for group in groups:
            name = group["name"]
            enabled = keep.get(name, cfg.train_lora)
            for p in group["params"]:
                p.requires_grad_(enabled)
            if enabled:
                param_groups.append(group)
        if cfg.train_base_weights:
            # Every parameter that is not adapter state (``qal_*`` of any adapter) belongs to the base model.
            base = [
                p for name, p in self.model.named_parameters() if ".qal_" not in f".{name}" and p.is_floating_point()
            ]
            for p in base:
                p.requires_grad_(True)
            param_groups.append({"params": base, "lr": cfg.base_weight_lr, "weight_decay": 0.0, "name": "base_weights"})
        if not param_groups:
            raise ValueError(
                "nothing to train: enable at least one of train_lora, train_weight_steps, train_act_steps."
            )
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError(
                    "`use_8bit_adam` needs bitsandbytes: `pip install diffusers-qalora[bitsandbytes]`."
                ) from err
            return bnb.optim.AdamW8bit(param_groups)
        # The fused implementation updates all tensors in one kernel: at SD1.5 shape (~1,700 LoRA and step-size
        # tensors with gradients per step, 56k parameters in all) it is ~4x faster than the per-tensor loop on CPU.
        params = [p for g in param_groups for p in g["params"]]
        fused = all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
            for p in params
        )
        return torch.optim.AdamW(param_groups, fused=fused or None)

    def _noise_generator(self, *salt: int) -> torch.Generator:
        # Each process, trajectory and step has its own seed: noise does not depend on where a run was resumed.
        rank = self.accelerator.process_index
        seed = hash((self.config.seed, rank) + salt) % (2**63)
        return torch.Generator().manual_seed(seed)

    def _start_trajectory(self) -> None:
        gen = self._noise_generator(self.progress.trajectory, -1)
        batch = self.config.batch_size
        self.progress.x = torch.randn((batch, *self.sample_shape), generator=gen)
        self.progress.cond = self.conditioning.sample(batch, gen)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save a resumable checkpoint ``checkpoint-<step>``.

        Every process writes into a staging folder that the main process renames once all are done, so a run killed
        mid-save leaves no half-written ``checkpoint-N`` for ``resume_from_checkpoint="latest"`` to pick."""
        acc = self.accelerator
        path = self.output_dir / f"checkpoint-{self.progress.global_step}"
        staging = self.output_dir / f".{path.name}.partial"
        if acc.is_main_process and staging.exists():
            shutil.rmtree(staging)  # left by a run killed while saving
        with distributed_phase(f"checkpoint {path.name}"):
            acc.wait_for_everyone()
            acc.save_state(str(staging))
            staging.mkdir(parents=True, exist_ok=True)
            self.progress.save(staging, acc.process_index, acc.num_processes)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_checksum_manifest(staging)
                if path.exists():
                    shutil.rmtree(path)
                staging.rename(path)
                limit = self.config.checkpoints_total_limit
                if limit is not None:
                    for old in _checkpoint_dirs(self.output_dir)[:-limit]:
                        shutil.rmtree(old, ignore_errors=True)
            acc.wait_for_everyone()
        return path

    def resume(self, checkpoint: str) -> Path:
        """Resume from ``checkpoint``: a path or ``"latest"`` (the newest ``checkpoint-N`` of ``output_dir``)."""
        if checkpoint == "latest":
            found = _checkpoint_dirs(self.output_dir)
            if not found:
                logger.warning("no checkpoint in %s; starting a new run", self.output_dir)
                return None
            path = found[-1]
        else:
            path = Path(checkpoint)
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint folder or 'latest'.")
        with distributed_phase(f"resume from {path.name}"):
            verify_checksum_manifest(path)
            self.progress.load(path, self.accelerator.process_index, self.accelerator.num_processes)
            self.accelerator.load_state(str(path))
        return path

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None) -> dict[str, Any]:
        """Run until ``max_train_steps``; return a summary (time, steps, loss history).

        Distributed: every process trains on its own trajectories (``config.batch_size`` each) and DDP averages the
        gradients; the loss in the history is the mean over processes."""
        with distributed_phase("training"):
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint: str | None) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        unwrapped = self.model
        if cfg.gradient_checkpointing:
            if not hasattr(unwrapped, "enable_gradient_checkpointing"):
                raise ValueError(f"{type(unwrapped).__name__} does not support gradient checkpointing.")
            unwrapped.enable_gradient_checkpointing()
        optimizer = self._optimizer()
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.lr_schedule, cfg.max_train_steps))
        self._check_engine()
        with distributed_phase("training: prepare (DDP / FSDP wrap)"):
            model, optimizer, lr_scheduler = acc.prepare(self.model, optimizer, lr_scheduler)
        self._prepared_model = model
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("qalora-distill", config={k: v for k, v in asdict(cfg).items() if k != "extra"})
        last_checkpoint = None
        if resume_from_checkpoint:
            last_checkpoint = self.resume(resume_from_checkpoint)
        device = acc.device
        timesteps = self.timesteps
        bar = tqdm(
            total=cfg.max_train_steps,
            initial=self.progress.global_step,
            disable=not acc.is_local_main_process,
            desc="distill",
            dynamic_ncols=True,
        )
        start, cpu_start, first_step = time.perf_counter(), time.process_time(), self.progress.global_step
        model.train()
        teacher = self.teacher if self.teacher is not None else unwrapped
        if self.teacher is not None:
            self.teacher.requires_grad_(False).eval().to(device)
        while self.progress.global_step < cfg.max_train_steps:
            if self.progress.position == 0 or self.progress.x is None:
                self._start_trajectory()
            p = self.progress
            t = timesteps[p.position]
            x = p.x.to(device)
            cond = {k: v.to(device) for k, v in p.cond.items()}
            t_in = t.to(device)
            with torch.no_grad(), adapters_disabled(teacher), acc.autocast():
                target = self.conditioning.predict(model if teacher is unwrapped else teacher, x, t_in, cond).float()
            with acc.autocast():
                pred = self.conditioning.predict(model, x, t_in, cond).float()
            loss = F.mse_loss(pred, target)
            if not torch.isfinite(loss):
                where = (
                    f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
                )
                raise NonFiniteLossError(
                    f"non-finite distillation loss ({loss.item()}) at step {p.global_step}, timestep {t.item()}; "
                    f"training stopped and {where}. Lower the learning rates (--learning_rate, --act_step_lr) or "
                    f"use fp32 (--mixed_precision no)."
                )
            acc.backward(loss)
            if cfg.max_grad_norm is not None:
                acc.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                step_gen = self._noise_generator(p.trajectory, p.position)
                p.x = self.sampler.step(target.to(x.dtype).cpu(), p.position, x.cpu(), generator=step_gen)
            p.position += 1
            if p.position >= len(timesteps):
                p.position = 0
                p.trajectory += 1
            p.global_step += 1
            loss_value = acc.reduce(loss.detach(), reduction="mean").item()
            self.history.append({"step": p.global_step, "timestep": t.item(), "loss": loss_value})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3e}", t=t.item())
            if p.global_step % cfg.log_every == 0 and acc.log_with:
                acc.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=p.global_step)
            if cfg.checkpointing_steps and p.global_step % cfg.checkpointing_steps == 0:
                last_checkpoint = self.save_checkpoint()
        bar.close()
        elapsed, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        acc.wait_for_everyone()
        self._scale_aware.remove_hooks()
        clear_workspace()  # the fused weight path's buffers, kept between steps (GBs at SD scale)
        if cfg.gradient_checkpointing:
            unwrapped.disable_gradient_checkpointing()
        if acc.log_with:
            acc.end_training()
        return {
            "train_seconds": elapsed,
            "train_cpu_seconds": cpu_seconds,  # this process's CPU time: what the wall time is on an idle machine
            "steps": self.progress.global_step,
            "steps_per_second": (self.progress.global_step - first_step) / elapsed if elapsed > 0 else None,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "history": self.history,
        }

    def _sharded(self) -> bool:
        """Whether the prepared model holds only a shard of its parameters on each process."""
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def _check_engine(self) -> None:
        acc = self.accelerator
        plugin = getattr(acc.state, "fsdp_plugin", None)
        if acc.distributed_type == DistributedType.FSDP and getattr(plugin, "fsdp_version", 1) == 2:
            scalars = [n for n, p in self.model.named_parameters() if p.dim() == 0 and p.requires_grad]
            if scalars:
                raise ValueError(
                    f"FSDP2 (fsdp_version: 2) cannot shard 0-d parameters, and this model trains {len(scalars)} "
                    f"(the per-timestep activation step sizes, e.g. {scalars[0]}). Use FSDP1 in your accelerate "
                    f"config (fsdp_version: 1, fsdp_use_orig_params: true); see docs/distillation.md."
                )

    def save_adapter(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Write the trained (active) adapter (main process only) as ``adapter_name`` ``default`` on disk."""
        if self.config.train_base_weights:
            raise ValueError(
                "the base weights were trained (`train_base_weights=True`), so an adapter alone does not reproduce the "
                "model; save the whole state dict with `safetensors.torch.save_model` instead."
            )
        directory = Path(directory) if directory is not None else self.output_dir / "adapter"
        with distributed_phase("save adapter"):
            # A sharded model holds a shard of each tensor per process: gather the whole first (every process
            # takes part), then the main process writes the adapter from it.
            full = self.accelerator.get_state_dict(self._prepared_model) if self._sharded() else None
            if self.accelerator.is_main_process:
                save_qalora_adapter(
                    self.accelerator.unwrap_model(self.model),
                    directory,
                    active_qalora_adapter(self.model),
                    state_dict=full,
                )
            self.accelerator.wait_for_everyone()
        return directory
