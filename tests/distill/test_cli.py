"""examples/distill.py's command line: bad input fails before any work, with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_qalora.distill import load_prompts
from diffusers_qalora.distill.cli import build_parser, main, validate_args


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


def test_default_prompts_ship_with_the_package():
    prompts = load_prompts()
    assert len(prompts) >= 8 and all(p.strip() == p and p for p in prompts)


def test_cpu_launch_of_several_processes_says_it_runs_one(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process without an MPI hostfile: the script says so and
    names the launch that starts two."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(root / "examples" / "distill.py"),
           "--weight_bits", "9"]  # fails in validation, right after the warning: no work is done
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "--weight_bits" in proc.stderr
    assert "starts ONE process" in proc.stderr
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in proc.stderr
    assert not any(tmp_path.iterdir())
