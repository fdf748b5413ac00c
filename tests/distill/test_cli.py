"""examples/distill.py's command line: bad input fails before any work, with a clear message."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_qalora.distill import load_prompts
from diffusers_qalora.distill.cli import build_parser, granularity_fields, main, validate_args


def _fails(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert match in str(info.value)
    assert not any(tmp_path.iterdir()), "a failed call must not write anything"


def test_missing_model_path_fails_before_work(tmp_path, monkeypatch):
    _fails(["--pretrained_model_name_or_path", "./no/such/pipeline"], "does not exist", tmp_path, monkeypatch)


def test_folder_without_model_index_fails(tmp_path, monkeypatch):
    folder = tmp_path / "notapipe"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="model_index.json"):
        main(["--pretrained_model_name_or_path", str(folder)])


def test_missing_or_empty_prompt_file_fails(tmp_path, monkeypatch):
    _fails(["--prompt_file", "missing.txt"], "does not exist", tmp_path, monkeypatch)
    empty = tmp_path.parent / f"{tmp_path.name}-empty.txt"
    empty.write_text("# only a comment\n\n")
    _fails(["--prompt_file", str(empty)], "holds no prompt", tmp_path, monkeypatch)


def test_bits_and_methods_validated():
    with pytest.raises(ValueError, match="--weight_bits"):
        validate_args(build_parser().parse_args(["--weight_bits", "9"]))
    with pytest.raises(SystemExit, match="--methods"):
        validate_args(build_parser().parse_args(["--methods", "fp", "magic"]))


def test_act_granularity_flags_validated():
    with pytest.raises(SystemExit, match="--act_group_size"):
        validate_args(build_parser().parse_args(["--act_granularity", "group"]))
    with pytest.raises(SystemExit, match="only used with --act_granularity group"):
        validate_args(build_parser().parse_args(["--act_granularity", "token", "--act_group_size", "32"]))
    validate_args(build_parser().parse_args(["--act_granularity", "group", "--act_group_size", "32"]))
    with pytest.raises(SystemExit, match="--weight_group_size"):
        validate_args(build_parser().parse_args(["--weight_granularity", "group"]))
    with pytest.raises(SystemExit, match="only used with --weight_granularity group"):
        validate_args(build_parser().parse_args(["--weight_group_size", "32"]))
    args = build_parser().parse_args(["--weight_granularity", "group", "--weight_group_size", "16"])
    assert granularity_fields(args) == {"weight_granularity": "group", "weight_group_size": 16}
    assert granularity_fields(build_parser().parse_args([])) == {}  # the defaults add nothing to the job's config


def test_default_prompts_ship_with_the_package():
    prompts = load_prompts()
    assert len(prompts) >= 8 and all(p.strip() == p and p for p in prompts)


def test_cpu_launch_of_several_processes_says_it_runs_one(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process without an MPI hostfile: the script says so and
    names the launch that starts two."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(root / "examples" / "distill.py"),
        "--weight_bits",
        "9",
    ]  # fails in validation, right after the warning: no work is done
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "--weight_bits" in proc.stderr
    assert "starts ONE process" in proc.stderr
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_8bit_adam_without_bitsandbytes_fails_before_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    _fails(["--use_8bit_adam"], "needs bitsandbytes", tmp_path, monkeypatch)


def test_tensorboard_gradient_checkpointing_and_bf16(tmp_path):
    """The training options of diffusers' scripts on a tiny SD pipeline: tensorboard events are written, and a bf16
    autocast run with gradient checkpointing (and dynamic per-group activations) trains to a finite loss and an
    adapter that loads.  In a subprocess:
    Accelerate keeps one state per process, so a bf16 run would make later in-process runs bf16 too."""
    from tiny_models import make_sd15_unet, make_tiny_sd_pipeline

    import diffusers_qalora as dq

    root = Path(__file__).resolve().parents[2]
    make_tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [
        sys.executable,
        str(root / "examples" / "distill.py"),
        "--pretrained_model_name_or_path",
        str(tmp_path / "pipe"),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "3",
        "--num_inference_steps",
        "3",
        "--train_batch_size",
        "1",
        "--calibration_samples",
        "1",
        "--rank",
        "2",
        "--report_to",
        "tensorboard",
        "--gradient_checkpointing",
        "--mixed_precision",
        "bf16",
        "--act_granularity",
        "group",
        "--act_group_size",
        "8",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["steps"] == 3
    assert all(math.isfinite(v) for v in results["loss_history"])
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no tensorboard event file"
    unet = make_sd15_unet()
    dq.load_qalora_adapter(unet, out / "adapter")
    assert unet.peft_config["default"].act_granularity == "group"


def test_learning_rate_defaults_agree_across_api_config_and_cli():
    # One set of defaults (diffusers_qalora.quant.scale_aware) for the three ways to start a distillation.
    import inspect

    from diffusers_qalora import get_qalora_param_groups
    from diffusers_qalora.distill import DistillConfig

    api = inspect.signature(get_qalora_param_groups).parameters
    args = build_parser().parse_args([])
    config = DistillConfig()
    for api_name, cli_name in (
        ("lora_lr", "learning_rate"),
        ("weight_step_lr", "weight_step_lr"),
        ("act_step_lr", "act_step_lr"),
    ):
        assert api[api_name].default == getattr(config, api_name) == getattr(args, cli_name), api_name
