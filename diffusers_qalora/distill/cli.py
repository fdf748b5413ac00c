"""Command line of ``examples/distill.py`` (kept in the package so that it is tested and importable)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ..integrations.adapters import looks_like_local_path
from ..quant.scale_aware import DEFAULT_ACT_STEP_LR, DEFAULT_LORA_LR, DEFAULT_WEIGHT_STEP_LR, SCALE_AWARE_MODES
from ..tuners.qalora.config import ACT_GRANULARITIES
from .distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, release_process_group
from .trainer import DistillConfig


def granularity_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``QALoraConfig`` fields that the granularity flags set (only those that differ from the defaults)."""
    fields = {}
    if args.act_granularity != "tensor":
        fields.update(act_granularity=args.act_granularity, act_group_size=args.act_group_size)
    if args.weight_granularity != "channel":
        fields.update(weight_granularity=args.weight_granularity, weight_group_size=args.weight_group_size)
    return fields


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Data-free QALoRA distillation (EfficientDM). With no arguments: the embedded digits DDPM at W4A4.",
    )
    p.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="diffusers pipeline folder or Hub id (SD1.5, SDXL, SD3, Flux, or a class-conditional / unconditional "
        "UNet pipeline); default: the embedded digits DDPM",
    )
    p.add_argument(
        "--model",
        choices=("unet", "dit"),
        default="unet",
        help="embedded model: the digits UNet or the digits DiT (an SD3-style transformer)",
    )
    p.add_argument("--output_dir", default="outputs/distill")
    p.add_argument("--weight_bits", type=int, default=4)
    p.add_argument("--act_bits", type=int, default=4)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank r")
    p.add_argument(
        "--num_inference_steps",
        type=int,
        default=100,
        help="steps of each teacher trajectory (DDIM, or Euler for SD3/Flux), also the timestep table",
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta of the teacher trajectories (UNet pipelines)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="SD3/Flux: image size in pixels the trajectories are sampled at (default: the pipeline's, e.g. 1024)",
    )
    p.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="SD3/Flux: T5 prompt tokens (default: the pipeline's, 256 for SD3, 512 for Flux)",
    )
    p.add_argument(
        "--quantize_attention",
        action="store_true",
        help="pipelines: also quantize q, k, v of the attention (UNet, SD3 joint and Flux attention processors)",
    )
    p.add_argument(
        "--act_granularity",
        choices=ACT_GRANULARITIES,
        default="tensor",
        help="step sizes of the layer inputs: 'tensor' (EfficientDM's temporal, learned), 'token' or 'group' "
        "(dynamic min-max per token, or per token and group of --act_group_size channels)",
    )
    p.add_argument("--act_group_size", type=int, default=None, help="channels per group for --act_granularity group")
    p.add_argument(
        "--weight_granularity",
        choices=("channel", "group"),
        default="channel",
        help="weight step sizes: one per output channel, or per output channel and group of --weight_group_size "
        "input channels",
    )
    p.add_argument("--weight_group_size", type=int, default=None, help="input channels per weight group")
    p.add_argument("--train_batch_size", type=int, default=None, help="trajectories per process (default 16 / 1)")
    p.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (default 1600 / 500)")
    p.add_argument(
        "--learning_rate", type=float, default=DEFAULT_LORA_LR, help="LoRA learning rate (scale-aware reference)"
    )
    p.add_argument("--weight_step_lr", type=float, default=DEFAULT_WEIGHT_STEP_LR)
    p.add_argument("--act_step_lr", type=float, default=DEFAULT_ACT_STEP_LR)
    p.add_argument("--scale_aware", choices=SCALE_AWARE_MODES, default="lr")
    p.add_argument("--lr_schedule", choices=("linear", "constant", "cosine"), default="linear")
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance (SD/SDXL 7.5, SD3 7.0); Flux: the guidance embedding (3.5)",
    )
    p.add_argument("--prompt_file", default=None, help="one prompt per line; default: the shipped prompt list")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--max_grad_norm", type=float, default=None)
    p.add_argument("--checkpointing_steps", type=int, default=None)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    p.add_argument("--report_to", default=None, help="an Accelerate tracker, e.g. tensorboard")
    p.add_argument(
        "--ddp_timeout",
        type=float,
        default=DEFAULT_COLLECTIVE_TIMEOUT_S,
        help="several processes: seconds a process waits for the others in one collective before it stops "
        "with an error naming the phase (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration_samples", type=int, default=None, help="trajectories for activation calibration")
    p.add_argument("--eval_samples", type=int, default=500, help="embedded model: samples per seed")
    p.add_argument("--eval_seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval_steps", type=int, default=20)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="embedded model: any of fp naive_ptq timestep_ptq distilled (default: all)",
    )
    p.add_argument(
        "--push_to_hub",
        action="store_true",
        help="push the distilled adapter, with a model card, results.json and the sample grid",
    )
    p.add_argument("--hub_model_id", default=None, help="the repo to push to (default: the --output_dir folder name)")
    p.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    return p


def hub_repo_id(args: argparse.Namespace) -> str:
    """The repo ``--push_to_hub`` pushes to: ``--hub_model_id``, else the output folder's name (diffusers' rule)."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def validate_args(args: argparse.Namespace) -> None:
    """Fail before any work: model path, prompt file, bits, numbers."""
    from ..quant import validate_bits

    validate_bits(args.weight_bits, "--weight_bits")
    validate_bits(args.act_bits, "--act_bits")
    for name in (
        "rank",
        "num_inference_steps",
        "train_batch_size",
        "max_train_steps",
        "eval_samples",
        "eval_steps",
        "resolution",
        "max_sequence_length",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name} must be a positive integer, got {value}.")
    if args.act_granularity == "group" and (args.act_group_size is None or args.act_group_size < 1):
        raise SystemExit("error: --act_granularity group needs --act_group_size, a positive integer (e.g. 32).")
    if args.act_granularity != "group" and args.act_group_size is not None:
        raise SystemExit("error: --act_group_size is only used with --act_granularity group (drop it or add that).")
    if args.weight_granularity == "group" and (args.weight_group_size is None or args.weight_group_size < 1):
        raise SystemExit("error: --weight_granularity group needs --weight_group_size, a positive integer (e.g. 32).")
    if args.weight_granularity != "group" and args.weight_group_size is not None:
        raise SystemExit(
            "error: --weight_group_size is only used with --weight_granularity group (drop it or add that)."
        )
    if not args.ddp_timeout > 0:
        raise SystemExit(f"error: --ddp_timeout must be a positive number of seconds, got {args.ddp_timeout}.")
    model = args.pretrained_model_name_or_path
    if model is None:
        for option in ("resolution", "max_sequence_length", "quantize_attention"):
            if getattr(args, option) not in (None, False):
                raise SystemExit(
                    f"error: --{option} applies to pipelines (--pretrained_model_name_or_path); the embedded job "
                    f"runs at its model's size with the quantizers the comparison defines (drop --{option})."
                )
    if model is not None and args.model != "unet":
        raise SystemExit(
            f"error: --model {args.model} chooses an embedded model; it cannot be combined with "
            f"--pretrained_model_name_or_path (drop one of them)."
        )
    if model is not None:
        path = Path(model).expanduser()
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise SystemExit(
                    f"error: --pretrained_model_name_or_path {model} is not a diffusers pipeline folder "
                    f"(no model_index.json)."
                )
        elif looks_like_local_path(model):
            raise SystemExit(
                f"error: --pretrained_model_name_or_path {model} does not exist; pass a pipeline folder "
                f"or a Hub id like 'org/name'."
            )
    if args.prompt_file is not None:
        from .conditioning import load_prompts

        try:
            load_prompts(args.prompt_file)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: --prompt_file: {err}") from None
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit(
            "error: --use_8bit_adam needs bitsandbytes: pip install 'diffusers-qalora[bitsandbytes]' "
            "(or drop --use_8bit_adam)."
        )
    if args.report_to is not None:
        needs = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}
        module = needs.get(args.report_to)
        if module is not None and importlib.util.find_spec(module) is None:
            raise SystemExit(f"error: --report_to {args.report_to} needs the `{module}` package: pip install {module}.")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(hub_repo_id(args))
        except HFValidationError as err:
            raise SystemExit(
                f"error: --hub_model_id {hub_repo_id(args)!r} is not a valid Hub repo id ({err}); "
                f"pass --hub_model_id org/name."
            ) from None
    elif args.hub_model_id is not None or args.hub_token is not None:
        raise SystemExit("error: --hub_model_id / --hub_token are used only with --push_to_hub; add it.")
    if args.methods is not None:
        from .embedded import METHODS

        bad = [m for m in args.methods if m not in METHODS]
        if bad:
            raise SystemExit(f"error: --methods {bad} unknown; choose from {list(METHODS)}.")


def _distill_config(args: argparse.Namespace, batch_size: int, steps: int) -> DistillConfig:
    return DistillConfig(
        num_inference_steps=args.num_inference_steps,
        eta=args.eta,
        batch_size=batch_size,
        max_train_steps=steps,
        lora_lr=args.learning_rate,
        weight_step_lr=args.weight_step_lr,
        act_step_lr=args.act_step_lr,
        scale_aware=args.scale_aware,
        lr_schedule=args.lr_schedule,
        seed=args.seed,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        gradient_checkpointing=args.gradient_checkpointing,
        use_8bit_adam=args.use_8bit_adam,
        max_grad_norm=args.max_grad_norm,
    )


def _requested_cpu_processes() -> int | None:
    """The ``--num_processes`` of an ``accelerate launch --cpu`` that started this process, if it asked for several.

    Accelerate's ``--cpu`` launcher starts a single process unless an MPI hostfile is configured, and says nothing
    about it; the launcher's command line (the parent process) is the only place the request survives."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true") or "WORLD_SIZE" in os.environ:
        return None
    try:
        import psutil

        parent = psutil.Process().parent()
        cmdline = parent.cmdline() if parent is not None else []
    except Exception:  # no psutil or no permission: nothing to warn about
        return None
    if "--cpu" not in cmdline or "--mpirun_hostfile" in cmdline:
        return None
    for flag, value in zip(cmdline, cmdline[1:]):
        if flag == "--num_processes" and value.isdigit() and int(value) > 1:
            return int(value)
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    requested = _requested_cpu_processes()
    if requested:
        print(
            f"warning: `accelerate launch --cpu --num_processes {requested}` starts ONE process (Accelerate needs an "
            f"MPI hostfile for several CPU processes). For {requested} CPU processes run\n"
            f"  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {requested} "
            f"examples/distill.py ...\nThis run uses one process.",
            file=sys.stderr,
        )
    validate_args(args)
    command = "accelerate launch examples/distill.py " + shlex.join(argv)
    if args.pretrained_model_name_or_path is None:
        from .embedded import METHODS, EmbeddedJobConfig, run_embedded_job

        job = EmbeddedJobConfig(
            weight_bits=args.weight_bits,
            act_bits=args.act_bits,
            rank=args.rank,
            distill=_distill_config(args, args.train_batch_size or 16, args.max_train_steps or 1600),
            table_steps=args.num_inference_steps,
            calibration_samples=args.calibration_samples or 64,
            eval_samples=args.eval_samples,
            eval_seeds=tuple(args.eval_seeds),
            eval_steps=args.eval_steps,
            methods=tuple(args.methods or METHODS),
            qalora_overrides=granularity_fields(args),
            model=args.model,
        )
        results = run_embedded_job(
            job,
            args.output_dir,
            command,
            args.resume_from_checkpoint,
            args.mixed_precision,
            args.report_to,
            collective_timeout=args.ddp_timeout,
        )
        from accelerate import PartialState

        if results.get("methods") and PartialState().is_main_process:
            print(
                json.dumps(
                    {
                        k: {m: v.get(m) for m in ("fid_mean", "accuracy_mean", "x0_mse_mean")}
                        for k, v in results["methods"].items()
                    },
                    indent=2,
                )
            )
    else:
        from .pipelines import run_pipeline_job

        results = run_pipeline_job(
            args, _distill_config(args, args.train_batch_size or 1, args.max_train_steps or 500), command
        )
    if args.push_to_hub:
        push_distilled_adapter(args)
    release_process_group()
    return results


def push_distilled_adapter(args: argparse.Namespace) -> None:
    """Push ``<output_dir>/adapter`` (what the job saved) from the main process: the base denoiser is loaded afresh
    with the saved adapter, so the repo holds exactly the files of the run, plus a model card, ``results.json`` and
    the distilled sample grid when the job wrote one."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    from ..integrations.adapters import load_qalora_adapter
    from ..integrations.hub import CardInfo, push_qalora_adapter

    out = Path(args.output_dir)
    model = args.pretrained_model_name_or_path
    if model is None:
        from ..testbed import load_testbed

        denoiser, base_model, subfolder = load_testbed(model=args.model).unet, None, None
    else:
        from diffusers import AutoModel

        # The job records which component it distilled: "unet", or "transformer" for SD3 / Flux.
        name = json.loads((out / "results.json").read_text(encoding="utf-8")).get("denoiser", "unet")
        denoiser = AutoModel.from_pretrained(model, subfolder=name)
        # A local folder has no Hub id for the card to name.
        base_model, subfolder = (None, None) if Path(model).expanduser().exists() else (model, name)
    load_qalora_adapter(denoiser, out / "adapter")
    grid = out / "grid_distilled.png"
    # The embedded job's results.json holds a metrics table for the card; a pipeline job measures no metrics, so its
    # card gets the distillation settings alone.
    scored = model is None and "methods" in json.loads((out / "results.json").read_text(encoding="utf-8"))
    defaults = (16, 1600) if model is None else (1, 500)
    card = CardInfo(
        base_model=base_model,
        base_model_subfolder=subfolder,
        results=out if scored else None,
        distill_config=_distill_config(args, args.train_batch_size or defaults[0], args.max_train_steps or defaults[1]),
        sample_grid=grid if grid.is_file() else None,
    )
    info = push_qalora_adapter(denoiser, hub_repo_id(args), token=args.hub_token, card=card)
    print(f"pushed the adapter to {info.commit_url}")
