"""The distillation maths, checked step by step against an independent computation:

* the trajectory follows the *teacher*: ``x_{k+1}`` is the DDIM (eta = 0) step of ``x_k`` with the teacher's noise
  prediction, not the student's;
* the loss is the MSE between the student's and the teacher's *classifier-free-guided* noise predictions;
* an optimizer step moves only the activation step sizes of the current timestep (per step, not just overall).

A recording conditioning sees every call of the trainer; before the trainer's own student call of step k (so before
optimizer step k), it computes the expected values with separate conditional / unconditional model calls and its own
guidance formula, and snapshots every step-size table.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import STEPS, _distiller, _model_and_scheduler

import diffusers_qalora as dq
from diffusers_qalora.distill import ClassLabelConditioning
from diffusers_qalora.quant import TemporalActQuantizer

GUIDANCE = 3.0
NULL_CLASS = 9  # labels are drawn from 0..8; 9 is the unconditional embedding of the 10-class test UNet
TRAIN_STEPS = 3


class Recorder(ClassLabelConditioning):
    def __init__(self) -> None:
        super().__init__(NULL_CLASS, guidance_scale=GUIDANCE, null_class=NULL_CLASS)
        self.steps: list[dict] = []

    @staticmethod
    def guided(model, x, t, labels) -> torch.Tensor:
        uncond = model(x, t, class_labels=torch.full_like(labels, NULL_CLASS)).sample
        cond = model(x, t, class_labels=labels).sample
        return uncond + GUIDANCE * (cond - uncond)

    def predict(self, model, x, t, cond):
        if torch.is_grad_enabled():  # the trainer's student call of this step: the optimizer has not stepped yet
            with torch.no_grad():
                labels = cond["class_labels"]
                student = self.guided(model, x, t, labels)
                with dq.adapters_disabled(model):
                    teacher = self.guided(model, x, t, labels)
            tables = {
                n: q.step.stacked().detach().clone()
                for n, q in model.named_modules()
                if isinstance(q, TemporalActQuantizer) and len(q.step) > 1
            }
            self.steps.append(
                {
                    "x": x.detach().clone(),
                    "t": float(t),
                    "student": student,
                    "teacher": teacher,
                    "tables": tables,
                    "timesteps": _tables_timesteps(model),
                }
            )
        return super().predict(model, x, t, cond)


def _tables_timesteps(model) -> dict[str, list[float]]:
    return {
        n: q.timesteps.tolist()
        for n, q in model.named_modules()
        if isinstance(q, TemporalActQuantizer) and len(q.step) > 1
    }


def ddim_step(scheduler, eps: torch.Tensor, t: float, x: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), written out: x0 from (x_t, eps) (clipped as the scheduler is configured), then
    x_{t-Δ} = √ᾱ' x0 + √(1-ᾱ') eps."""
    alphas = scheduler.alphas_cumprod
    prev = int(t) - scheduler.config.num_train_timesteps // STEPS
    a_t = alphas[int(t)]
    a_prev = alphas[prev] if prev >= 0 else torch.tensor(1.0)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    model, scheduler = _model_and_scheduler()
    recorder = Recorder()
    distiller = _distiller(
        model,
        scheduler,
        tmp_path_factory.mktemp("maths"),
        conditioning=recorder,
        max_train_steps=TRAIN_STEPS,
        act_step_lr=1e-2,
        lora_lr=1e-3,
        eta=0.0,
    )
    distiller.train()
    assert len(recorder.steps) == TRAIN_STEPS
    return recorder.steps, distiller, model


def test_the_trajectory_follows_the_teacher(recorded):
    steps, distiller, _ = recorded
    for k in range(TRAIN_STEPS - 1):
        now, nxt = steps[k], steps[k + 1]
        expected = ddim_step(distiller.sampler.ddim, now["teacher"], now["t"], now["x"])
        student_driven = ddim_step(distiller.sampler.ddim, now["student"], now["t"], now["x"])
        gap = (expected - student_driven).abs().max().item()
        assert gap > 1e-3  # the student's and the teacher's predictions differ: a student-driven trajectory shows
        torch.testing.assert_close(nxt["x"], expected, rtol=0, atol=gap / 100)


def test_the_loss_is_the_mse_of_the_guided_predictions(recorded):
    steps, distiller, _ = recorded
    for k, step in enumerate(steps):
        mse = torch.mean((step["student"] - step["teacher"]) ** 2).item()
        assert mse > 0
        assert distiller.history[k]["loss"] == pytest.approx(mse, rel=1e-4), k
        assert distiller.history[k]["timestep"] == int(step["t"])


def test_each_step_moves_only_the_current_timesteps_step_sizes(recorded):
    steps, _, model = recorded
    final = {
        n: q.step.stacked().detach()
        for n, q in model.named_modules()
        if isinstance(q, TemporalActQuantizer) and len(q.step) > 1
    }
    snapshots = [s["tables"] for s in steps] + [final]
    for k, step in enumerate(steps):
        before, after = snapshots[k], snapshots[k + 1]
        moved = 0
        for name, table in before.items():
            for i, t in enumerate(step["timesteps"][name]):
                changed = bool(after[name][i] != table[i])
                if t == step["t"]:
                    moved += changed
                else:
                    assert not changed, f"step {k} (t={step['t']}) moved {name} entry t={t}"
        assert moved > 0, f"step {k} moved no step size of its own timestep"
