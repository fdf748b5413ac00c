"""examples/distill.py on locally built text-to-image pipelines (SD and SDXL style), in one and two processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_sd15_unet, make_sdxl_unet, make_tiny_sd_pipeline, make_tiny_sdxl_pipeline

import diffusers_qalora as dq
from diffusers_qalora.distill.cli import main

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
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
    "--guidance_scale",
    "2.0",
]


def _assert_adapter_loads(adapter_dir: Path, make_unet) -> None:
    unet = make_unet()
    dq.load_qalora_adapter(unet, adapter_dir)
    assert any(".qal_B." in n for n, _ in unet.named_parameters())
    trained = [p for n, p in unet.named_parameters() if ".qal_B." in n]
    assert any(p.abs().sum() > 0 for p in trained), "the saved adapter was never trained"


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_distill_text_to_image_pipeline(tmp_path, kind):
    pipe = make_tiny_sd_pipeline() if kind == "sd" else make_tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "out"
    results = main(
        [
            "--pretrained_model_name_or_path",
            str(tmp_path / "pipe"),
            "--output_dir",
            str(out),
            "--prompt_file",
            str(prompts),
            *ARGS,
        ]
    )
    assert results["training"]["steps"] == 3
    assert all(torch.isfinite(torch.tensor(results["loss_history"])))
    assert (out / "results.json").is_file()
    _assert_adapter_loads(out / "adapter", make_sd15_unet if kind == "sd" else make_sdxl_unet)


def test_same_command_same_adapter(tmp_path):
    """The LoRA factors are drawn when QALoRA is injected: the job seeds that draw, so a rerun is bit-identical."""
    make_tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    adapters = []
    for run in ("a", "b"):
        torch.manual_seed(1000 + len(adapters))  # whatever the caller's RNG state
        main(["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / run), *ARGS])
        adapters.append(load_file(tmp_path / run / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path):
    make_tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    # Accelerate's `--cpu --num_processes 2` starts one process unless MPI is set up; `--multi_gpu` with
    # ACCELERATE_USE_CPU=true starts two torchrun workers that join a gloo (MULTI_CPU) group.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "examples" / "distill.py"),
        "--pretrained_model_name_or_path",
        str(tmp_path / "pipe"),
        "--output_dir",
        str(out),
        *ARGS,
        "--checkpointing_steps",
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "rank1_distill_state.json").is_file(), "each process saves its trajectory state"
    _assert_adapter_loads(out / "adapter", make_sd15_unet)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_adapter(tmp_path):
    """A real SIGKILL of `examples/distill.py` mid-run, then `--resume_from_checkpoint latest` from the command line."""
    make_tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    steps = ["--max_train_steps", "40", "--checkpointing_steps", "2"]
    job = ["--pretrained_model_name_or_path", str(tmp_path / "pipe"), *ARGS[2:], *steps]
    main(["--output_dir", str(tmp_path / "ref"), *job])

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "distill.py"), "--output_dir", str(out), *job],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "adapter").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at < 40

    main(["--output_dir", str(out), *job, "--resume_from_checkpoint", "latest"])
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
