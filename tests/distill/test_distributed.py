"""The distillation jobs on two CPU processes (gloo), as `accelerate launch` starts them: the embedded default job
runs to completion, resumes from a two-process checkpoint, and a process that fails or stalls ends the launch with
an error naming the phase, within a bounded time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusers_qalora as dq
from diffusers_qalora.distill import trainer
from diffusers_qalora.evaluation.report import evaluate_seeds
from diffusers_qalora.evaluation.sampling import sample_class_conditional
from diffusers_qalora.testbed import load_testbed

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# The embedded default job, as small as it goes: 4-step trajectories, 2 calibration trajectories, 6 samples scored.
TINY = [
    "--num_inference_steps",
    "4",
    "--calibration_samples",
    "2",
    "--eval_samples",
    "6",
    "--eval_steps",
    "2",
    "--train_batch_size",
    "2",
    "--rank",
    "2",
    "--max_train_steps",
    "4",
    "--checkpointing_steps",
    "2",
]
# Every step of the launch (start-up, calibration, evaluation) is seconds; the bound leaves room for a busy CI box.
LAUNCH_TIMEOUT = 600
# How long the launch may take to end once a process failed (torchrun's monitor plus process exit).
END_AFTER_FAULT_S = 60


def _launch(script: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
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
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    return proc, time.time()


def _distill(*args: str):
    return _launch(ROOT / "examples" / "distill.py", *TINY, *args)


def _with_fault(mode: str, rank: int, step: int, stamp: Path, *args: str):
    return _launch(HERE / "fault_injection_launch.py", mode, str(rank), str(step), str(stamp), "--", *TINY, *args)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_process") / "out"
    proc, _ = _distill("--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_embedded_job_on_two_processes_completes_and_its_adapter_loads(two_process_run):
    out = two_process_run
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2
    assert set(results["methods"]) == {"FP", "naive PTQ", "per-timestep PTQ", "QALoRA distilled"}
    assert results["training"]["steps"] == 4
    assert len(results["peak_rss_mb_per_process"]) == 2
    for method in results["methods"].values():
        assert torch.isfinite(torch.tensor(method["fid_mean"]))
    for rank in (0, 1):
        assert (out / "checkpoint-4" / f"rank{rank}_distill_state.json").is_file()
    unet = load_testbed().unet
    dq.load_qalora_adapter(unet, out / "adapter")
    trained = [p for n, p in unet.named_parameters() if ".qal_B." in n]
    assert trained and any(p.abs().sum() > 0 for p in trained), "the saved adapter was never trained"


@pytest.mark.slow
def test_failing_process_ends_the_launch_and_the_run_resumes(two_process_run, tmp_path):
    """Process 1 raises right after checkpoint-2: the launch ends non-zero within a bound, with the phase and the
    error in its output; resuming from that two-process checkpoint gives the uninterrupted run's adapter."""
    out, stamp = tmp_path / "out", tmp_path / "fault_time"
    proc, ended = _with_fault("raise", 1, 2, stamp, "--output_dir", str(out))
    assert proc.returncode != 0
    assert stamp.is_file(), proc.stderr[-4000:]
    assert ended - float(stamp.read_text()) < END_AFTER_FAULT_S
    assert "process 1 of 2" in proc.stderr and "phase 'training'" in proc.stderr, proc.stderr[-4000:]
    assert "InjectedFault: injected fault on process 1 after checkpoint-2" in proc.stderr
    assert not (out / "adapter").exists()

    proc, _ = _distill("--output_dir", str(out), "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr[-4000:]
    reference, resumed = _adapter(two_process_run), _adapter(out)
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_stalled_process_becomes_a_timeout_error_naming_the_phase(tmp_path):
    """Process 1 stops answering after checkpoint-2: process 0 gives up after --ddp_timeout with an error naming the
    phase, and the launch ends."""
    out, stamp = tmp_path / "out", tmp_path / "fault_time"
    timeout = 10
    proc, ended = _with_fault("stall", 1, 2, stamp, "--output_dir", str(out), "--ddp_timeout", str(timeout))
    assert proc.returncode != 0
    assert stamp.is_file(), proc.stderr[-4000:]
    assert ended - float(stamp.read_text()) < timeout + END_AFTER_FAULT_S
    assert "DistributedPhaseError: process 0 of 2" in proc.stderr, proc.stderr[-4000:]
    assert "phase 'training'" in proc.stderr and "--ddp_timeout" in proc.stderr


@pytest.mark.slow
def test_two_process_checkpoint_refuses_a_one_process_resume(two_process_run):
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) but this run has 1.*--num_processes 2"):
        trainer._Progress().load(two_process_run / "checkpoint-4", 0, 1)


def test_sampling_shards_concatenate_to_the_whole_draw():
    testbed = load_testbed()
    images, labels = sample_class_conditional(testbed.pipeline, 5, 3, 2, show_progress=False, batch_size=1)
    shares = [
        sample_class_conditional(testbed.pipeline, 5, 3, 2, show_progress=False, batch_size=1, shard=(i, 3))
        for i in range(3)
    ]
    assert [len(s[1]) for s in shares] == [1, 2, 2]
    torch.testing.assert_close(torch.cat([s[0] for s in shares]), images, rtol=0, atol=0)
    assert torch.equal(torch.cat([s[1] for s in shares]), labels)
    empty, no_labels = sample_class_conditional(testbed.pipeline, 2, 3, 2, show_progress=False, shard=(0, 3))
    assert empty.shape == (0, 1, 16, 16) and no_labels.numel() == 0
    with pytest.raises(ValueError, match="eta=0"):
        sample_class_conditional(testbed.pipeline, 5, 3, 2, eta=1.0, shard=(0, 2))


@pytest.mark.slow
def test_phases_metrics_evaluation_and_broadcast_on_two_processes(tmp_path):
    proc, _ = _launch(HERE / "distributed_checks_launch.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in (0, 1):
        assert "different phases" in seen[r]["mismatch"]
        assert "process 0: 'phase of process 0', process 1: 'phase of process 1'" in seen[r]["mismatch"]
    assert seen[0]["fid_main_only"] > 0
    testbed = load_testbed()
    alone = evaluate_seeds(
        testbed.pipeline, testbed.classifier, testbed.reference_images, [0], 7, 2, show_progress=False
    )
    # Each process sampled its share in one batch (3 and 4 images): the same bits as those shares sampled here.
    shares = [sample_class_conditional(testbed.pipeline, 7, 0, 2, show_progress=False, shard=(i, 2))[0] for i in (0, 1)]
    for r in (0, 1):
        torch.testing.assert_close(seen[r]["samples"], torch.cat(shares), rtol=0, atol=1e-6)
        # Against one batch of 7 only float rounding differs (convolutions sum in another order per batch size).
        torch.testing.assert_close(seen[r]["samples"], alone["samples"][0], rtol=0, atol=1e-3)
        assert seen[r]["fid"] == pytest.approx(alone["fid_mean"], rel=1e-2)
        assert seen[r]["broadcast_count"] == 3
        assert torch.equal(seen[r]["weight_after_broadcast"], torch.zeros(3, 3))
        assert bool(seen[r]["flag_after_broadcast"])


@pytest.mark.slow
def test_fsdp2_sharded_student_and_shared_teacher_match_one_process(tmp_path):
    """torch's FSDP2 on two CPU processes: the student sharded, the teacher the same sharded model with its adapters
    off; the gathered adapter equals one process training on the whole batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script, steps = HERE / "fsdp_cpu_launch.py", "6"
    sharded = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "sharded.pt"),
            steps,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single.pt"), steps],
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    a, b = torch.load(tmp_path / "sharded.pt"), torch.load(tmp_path / "single.pt")
    assert a["before"].keys() == b["before"].keys() == a["after"].keys() == b["after"].keys()
    moved = 0
    for key in a["after"]:
        assert torch.equal(a["before"][key], b["before"][key]), key
        update_sharded = a["after"][key] - a["before"][key]
        update_single = b["after"][key] - b["before"][key]
        # Two processes compute and sum in another order than one, and a float difference that moves a fake-quant
        # rounding decision changes that code's gradient by a step, which the next steps carry on; an update is also a
        # difference of float32 values, exact only to the parameter's ulp.  Tolerance: 1% of the tensor's largest
        # update plus two ulps (1e-8 absolute passed on one machine and failed on another by 0.2% of an update); a
        # gradient left unaveraged (twice the update) still fails.
        ulp = torch.finfo(torch.float32).eps * float(b["after"][key].abs().max())
        atol = 1e-2 * float(update_single.abs().max()) + 2 * ulp
        torch.testing.assert_close(update_sharded, update_single, rtol=1e-3, atol=atol, msg=key)
        moved += int(update_single.abs().max() > 1e-7)
    kinds = {k.split(".qal_")[1].split(".")[0] for k in a["after"]}
    assert {"A", "B", "weight_quantizer", "act_quantizer"} <= kinds
    assert moved > 100, "the test would pass with nothing trained"
    assert any("act_quantizer" in k and (b["after"][k] - b["before"][k]).abs().max() > 1e-7 for k in b["after"]), (
        "no activation step size (the 0-d parameters FSDP2 leaves out) was trained"
    )


def test_sharded_engine_saves_the_adapter_from_the_gathered_state(tmp_path, monkeypatch):
    """Under FSDP / DeepSpeed each process holds a shard: save_adapter writes what `get_state_dict` gathered, not the
    process's own tensors; FSDP2 is refused with the config that works; the embedded job refuses sharding."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from test_trainer import _distiller, _model_and_scheduler

    model, scheduler = _model_and_scheduler()
    d = _distiller(model, scheduler, tmp_path)
    d.save_adapter(tmp_path / "plain")
    gathered = {k: v + 1.0 if ".qal_B." in k else v for k, v in model.state_dict().items()}
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    monkeypatch.setattr(d.accelerator, "get_state_dict", lambda m: gathered)
    d.save_adapter(tmp_path / "sharded")
    plain, sharded = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "sharded"))
    b_keys = [k for k in plain if ".qal_B" in k]
    assert b_keys and plain.keys() == sharded.keys()
    for key in plain:
        expected = plain[key] + 1.0 if key in b_keys else plain[key]
        torch.testing.assert_close(sharded[key], expected, rtol=0, atol=0, msg=key)

    class FSDP2Plugin:
        fsdp_version = 2

    monkeypatch.setattr(d.accelerator.state, "fsdp_plugin", FSDP2Plugin(), raising=False)
    with pytest.raises(ValueError, match="fsdp_version: 1, fsdp_use_orig_params: true"):
        d.train()

    from diffusers_qalora.distill.embedded import EmbeddedJobConfig, run_embedded_job

    with pytest.raises(SystemExit, match="launch without --use_fsdp"):
        run_embedded_job(EmbeddedJobConfig(), tmp_path / "embedded")
    assert not (tmp_path / "embedded").exists()
