"""Distillation trainer: it learns, resumes exactly, stops on NaN, and freezes inactive timesteps."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import load_file

import diffusers_qalora as dq
from diffusers_qalora.distill import ClassLabelConditioning, DataFreeDistiller, DistillConfig, NonFiniteLossError
from diffusers_qalora.quant import TemporalActQuantizer

STEPS = 5


def _model_and_scheduler():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=10,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    table = sorted(float(t) for t in scheduler.timesteps)
    model = dq.get_qalora_model(unet, dq.QALoraConfig(r=4, weight_bits=4, act_bits=4, timesteps=table))

    def calib():
        g = torch.Generator().manual_seed(0)
        for t in scheduler.timesteps:
            model(torch.randn(4, 1, 8, 8, generator=g), t, class_labels=torch.arange(4))

    dq.calibrate_activations(model, calib)
    return model, scheduler


def _distiller(model, scheduler, out, conditioning=None, **kw):
    cfg = DistillConfig(num_inference_steps=STEPS, batch_size=2, seed=3, **kw)
    return DataFreeDistiller(model, scheduler, conditioning or ClassLabelConditioning(10), (1, 8, 8), cfg, out)


def _adapter_tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _heldout_error(model, scheduler):
    """MSE between student and teacher predictions on fixed inputs at every table timestep."""
    g = torch.Generator().manual_seed(99)
    err = 0.0
    with torch.no_grad():
        for t in scheduler.timesteps:
            x, y = torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 10
            student = model(x, t, class_labels=y).sample
            with dq.adapters_disabled(model):
                teacher = model(x, t, class_labels=y).sample
            err += torch.mean((student - teacher) ** 2).item()
    return err


def test_distillation_lowers_error_and_only_adapter_changes(tmp_path):
    model, scheduler = _model_and_scheduler()
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    before = _heldout_error(model, scheduler)
    d = _distiller(model, scheduler, tmp_path, max_train_steps=12 * STEPS, lora_lr=1e-4, act_step_lr=1e-4)
    d.train()
    after = _heldout_error(model, scheduler)
    assert after < 0.98 * before, (before, after)
    for k, v in model.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), f"frozen base weight {k} changed"
    assert any(".qal_B." in n and p.abs().sum() > 0 for n, p in model.named_parameters()), "LoRA B never moved"


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    total = 2 * STEPS + 2  # crosses a trajectory boundary
    model, scheduler = _model_and_scheduler()
    ref = _distiller(model, scheduler, tmp_path / "ref", max_train_steps=total)
    ref.train()
    ref.save_adapter()

    class Killed(RuntimeError):
        pass

    model, scheduler = _model_and_scheduler()
    run = _distiller(model, scheduler, tmp_path / "run", max_train_steps=total, checkpointing_steps=4)
    original_save = run.save_checkpoint
    calls = {"n": 0}

    def save_then_die():
        path = original_save()
        calls["n"] += 1
        if calls["n"] == 2:  # killed right after checkpoint-8, mid-way through the second trajectory
            raise Killed
        return path

    run.save_checkpoint = save_then_die
    with pytest.raises(Killed):
        run.train()
    assert (tmp_path / "run" / "checkpoint-8").is_dir()

    model, scheduler = _model_and_scheduler()
    resumed = _distiller(model, scheduler, tmp_path / "run", max_train_steps=total, checkpointing_steps=4)
    resumed.train(resume_from_checkpoint="latest")
    resumed.save_adapter()
    a, b = _adapter_tensors(tmp_path / "ref" / "adapter"), _adapter_tensors(tmp_path / "run" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


class _NaNAfter(ClassLabelConditioning):
    def __init__(self, after):
        super().__init__(10)
        self.calls, self.after = 0, after

    def predict(self, model, x, t, cond):
        out = super().predict(model, x, t, cond)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    model, scheduler = _model_and_scheduler()
    d = _distiller(
        model, scheduler, tmp_path, conditioning=_NaNAfter(after=4), max_train_steps=10, checkpointing_steps=2
    )
    with pytest.raises(NonFiniteLossError, match="checkpoint-4"):
        d.train()
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "model.safetensors").is_file()


def test_training_at_one_timestep_leaves_other_step_sizes_untouched(tmp_path):
    model, scheduler = _model_and_scheduler()
    snapshot = {
        n: q.step.stacked().detach().clone()
        for n, q in model.named_modules()
        if isinstance(q, TemporalActQuantizer) and len(q.step) > 1
    }
    d = _distiller(model, scheduler, tmp_path, max_train_steps=2, act_step_lr=1e-2, weight_decay=0.1)
    d.train()
    visited = {float(t) for t in scheduler.timesteps[:2]}
    moved = 0
    for n, q in model.named_modules():
        if n not in snapshot:
            continue
        now = q.step.stacked().detach()
        for i, t in enumerate(q.timesteps.tolist()):
            if t in visited:
                moved += int(now[i] != snapshot[n][i])
            else:
                assert now[i] == snapshot[n][i], f"{n} entry t={t} moved"
    assert moved > 0


def test_config_validation():
    with pytest.raises(ValueError, match="max_train_steps"):
        DistillConfig(max_train_steps=0)
    with pytest.raises(ValueError, match="eta"):
        DistillConfig(eta=2.0)


def test_full_qat_needs_a_separate_teacher(tmp_path):
    model, scheduler = _model_and_scheduler()
    with pytest.raises(ValueError, match="teacher=copy.deepcopy"):
        _distiller(model, scheduler, tmp_path, train_base_weights=True)
    cfg = DistillConfig(num_inference_steps=STEPS, batch_size=2)
    with pytest.raises(ValueError, match="separate module"):
        DataFreeDistiller(model, scheduler, ClassLabelConditioning(10), (1, 8, 8), cfg, tmp_path, teacher=model)


def test_full_qat_trains_base_weights_against_the_frozen_teacher(tmp_path):
    import copy

    model, scheduler = _model_and_scheduler()
    teacher = copy.deepcopy(model)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "qal_" not in k}
    cfg = DistillConfig(
        num_inference_steps=STEPS,
        batch_size=2,
        seed=3,
        max_train_steps=3 * STEPS,
        train_lora=False,
        train_base_weights=True,
        base_weight_lr=1e-3,
    )
    d = DataFreeDistiller(model, scheduler, ClassLabelConditioning(10), (1, 8, 8), cfg, tmp_path, teacher=teacher)
    d.train()
    after = model.state_dict()
    changed = [k for k, v in base_before.items() if not torch.equal(after[k], v)]
    assert any("base_layer.weight" in k for k in changed), "quantized layers' weights did not train"
    assert any("norm" in k for k in changed), "non-quantized parameters did not train"
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items()), "the teacher changed"
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if ".qal_B." in n), "LoRA trained"
    # the student moved away from the teacher's weights, yet its loss is still measured against the teacher
    g = torch.Generator().manual_seed(5)
    x, y, t = torch.randn(4, 1, 8, 8, generator=g), torch.arange(4), scheduler.timesteps[0]
    with torch.no_grad(), dq.adapters_disabled(model), dq.adapters_disabled(teacher):
        assert not torch.allclose(model(x, t, class_labels=y).sample, teacher(x, t, class_labels=y).sample)
    with pytest.raises(ValueError, match="base weights were trained"):
        d.save_adapter(tmp_path / "adapter")


def test_a_separate_teacher_is_the_one_the_student_is_compared_with(tmp_path):
    import copy

    model, scheduler = _model_and_scheduler()
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher.conv_out.base_layer.bias += 1.0  # the teacher's output is shifted by 1 everywhere
    cfg = DistillConfig(
        num_inference_steps=STEPS,
        batch_size=2,
        seed=3,
        max_train_steps=1,
        lora_lr=1e-12,
        weight_step_lr=1e-12,
        act_step_lr=1e-12,
    )
    history = DataFreeDistiller(
        model, scheduler, ClassLabelConditioning(10), (1, 8, 8), cfg, tmp_path, teacher=teacher
    ).train()["history"]
    assert history[0]["loss"] > 0.5  # ~1 + quantization error; sharing the student's weights would give ~0.01
