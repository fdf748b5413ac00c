"""examples/distill.py on locally built SD3 and Flux pipelines (flow-matching teacher trajectories), in one and two
processes: the job runs, calibration and training feed the transformer only timesteps of the adapter's table, the
adapter loads into a fresh transformer, a rerun and a resumed run give the same adapter, and training brings the
student closer to its teacher."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _launch
from test_pipelines import ARGS as UNET_ARGS
from tiny_models import (
    make_flux_pipeline_transformer,
    make_sd3_pipeline_transformer,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    make_tiny_sd_pipeline,
)

import diffusers_qalora as dq
from diffusers_qalora.distill import DataFreeDistiller, DistillConfig
from diffusers_qalora.distill.cli import main
from diffusers_qalora.distill.pipelines import conditioning_for, denoiser_name, sample_shape
from diffusers_qalora.quant.temporal import TimestepContext
from diffusers_qalora.tuners.qalora.attention import QALoraFluxAttnProcessor, QALoraJointAttnProcessor
from diffusers_qalora.tuners.qalora.sampling import trajectory_sampler

ROOT = Path(__file__).resolve().parents[2]
# Flux's default image is 128 latent rows; 16 pixels are 8 x 8 latents (16 packed tokens), SD3's own default size.
PIPELINES = {
    "sd3": (make_tiny_sd3_pipeline, make_sd3_pipeline_transformer, QALoraJointAttnProcessor, []),
    "flux": (make_tiny_flux_pipeline, make_flux_pipeline_transformer, QALoraFluxAttnProcessor, ["--resolution", "16"]),
}
ARGS = [*UNET_ARGS, "--max_sequence_length", "8"]  # 3 steps of 3-step trajectories, batch 1, rank 2, guidance 2


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    for kind, (build, *_) in PIPELINES.items():
        build().save_pretrained(root / kind)
    return root


def _job(root: Path, kind: str, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(root / kind),
        "--output_dir",
        str(out),
        "--prompt_file",
        str(root / "prompts.txt"),
        *ARGS,
        *PIPELINES[kind][3],
        *extra,
    ]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_adapter_loads(adapter_dir: Path, make_transformer):
    transformer = make_transformer()
    dq.load_qalora_adapter(transformer, adapter_dir)
    trained = [p for n, p in transformer.named_parameters() if ".qal_B." in n]
    assert trained and any(p.abs().sum() > 0 for p in trained), "the saved adapter was never trained"
    return transformer


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_distill_transformer_pipeline(saved_pipelines, tmp_path, monkeypatch, kind):
    seen: list[float] = []
    original = TimestepContext.set

    def record(self, timestep):  # every call of the QALoRA denoiser, in calibration and in training
        original(self, timestep)
        seen.extend(self.timesteps.tolist())

    monkeypatch.setattr(TimestepContext, "set", record)
    out = tmp_path / "a"
    results = main(_job(saved_pipelines, kind, out, "--checkpointing_steps", "2"))
    monkeypatch.undo()
    assert results["training"]["steps"] == 3 and results["denoiser"] == "transformer"
    assert all(torch.isfinite(torch.tensor(results["loss_history"])))
    assert json.loads((out / "results.json").read_text())["denoiser"] == "transformer"
    transformer = _assert_adapter_loads(out / "adapter", PIPELINES[kind][1])

    # Calibration (the pipeline's own __call__) and the trainer hand the transformer only entries of the table.
    table = json.loads((out / "adapter" / "adapter_config.json").read_text())["timesteps"]
    assert len(table) == 3 and set(seen) <= set(table), (sorted(set(seen)), table)
    assert len(set(seen)) == 3
    if kind == "flux":
        assert max(table) <= 1.0  # FluxPipeline passes t / 1000
    else:
        assert max(table) == 1000.0
    assert transformer.peft_config["default"].timesteps == table

    # The same command gives the same adapter (the LoRA draw and every trajectory are seeded).
    main(_job(saved_pipelines, kind, tmp_path / "b", "--checkpointing_steps", "2"))
    a, b = _adapter(out), _adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Resuming from the checkpoint in the middle of a trajectory reaches the uninterrupted run's adapter.
    resumed = tmp_path / "resumed"
    main(_job(saved_pipelines, kind, resumed, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    c = _adapter(resumed)
    assert a.keys() == c.keys()
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_pipeline_options_are_checked_before_any_work(saved_pipelines, tmp_path):
    with pytest.raises(SystemExit, match="--eta is DDIM's"):
        main(_job(saved_pipelines, "sd3", tmp_path / "a", "--eta", "0.5"))
    with pytest.raises(SystemExit, match="--resolution 18 must be a multiple of 4"):
        main(_job(saved_pipelines, "flux", tmp_path / "b", "--resolution", "18"))
    with pytest.raises(SystemExit, match="--quantize_attention applies to pipelines"):
        main(["--quantize_attention", "--output_dir", str(tmp_path / "c")])
    make_tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    unet_job = ["--pretrained_model_name_or_path", str(tmp_path / "sd"), "--output_dir", str(tmp_path / "d")]
    with pytest.raises(SystemExit, match="--resolution applies to SD3 and Flux pipelines"):
        main([*unet_job, "--resolution", "16"])
    assert not (tmp_path / "d" / "adapter").exists()
    with pytest.raises(ValueError, match="SD3 and Flux pipelines"):
        denoiser_name(SimpleNamespace(unet=None, transformer=torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_quantize_attention_uses_the_transformers_processors(saved_pipelines, tmp_path, monkeypatch, kind):
    processor = PIPELINES[kind][2]
    calls = []
    original = processor.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(processor, "__call__", counting)
    main(_job(saved_pipelines, kind, tmp_path / "out", "--quantize_attention"))
    monkeypatch.undo()
    assert calls, f"{processor.__name__} never ran"
    tensors = _adapter(tmp_path / "out")
    assert any("qal_out_quantizer" in k for k in tensors), "no q/k/v step sizes in the adapter"
    transformer = _assert_adapter_loads(tmp_path / "out" / "adapter", PIPELINES[kind][1])
    assert any(isinstance(p, processor) for p in transformer.attn_processors.values())


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_distillation_brings_the_student_closer_to_its_teacher(tmp_path, kind):
    build = PIPELINES[kind][0]
    pipe = build()
    size = 16
    steps = 3
    conditioning = conditioning_for(
        pipe, None, 2.0, height=size, width=size, max_sequence_length=8
    )  # the shipped prompt list
    sampler = trajectory_sampler(pipe, steps, height=size, width=size)
    table = dq.timestep_table(pipe, steps, height=size, width=size)
    torch.manual_seed(0)
    model = dq.get_qalora_model(pipe.transformer, dq.QALoraConfig(r=4, weight_bits=4, act_bits=4, timesteps=table))
    dq.calibrate_activations(
        model,
        lambda: pipe(
            ["a red square", "a blue circle"],
            num_inference_steps=steps,
            guidance_scale=2.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **conditioning.pipeline_call_kwargs(),
        ),
    )
    shape = sample_shape(pipe, size)
    g = torch.Generator().manual_seed(7)
    held_out = [(torch.randn(4, *shape, generator=g), conditioning.sample(4, g)) for _ in range(3)]

    def errors() -> tuple[float, float]:
        """Along held-out teacher trajectories: the student's prediction error at each step, and the paired MSE of
        the final latents the student and the teacher sample from the same noise."""
        step_error = final_error = 0.0
        with torch.no_grad():
            for noise, cond in held_out:
                x_teacher, x_student = noise, noise
                for i, t in enumerate(sampler.model_timesteps):
                    with dq.adapters_disabled(model):
                        v_teacher = conditioning.predict(model, x_teacher, t, cond)
                    step_error += torch.mean((conditioning.predict(model, x_teacher, t, cond) - v_teacher) ** 2).item()
                    v_student = conditioning.predict(model, x_student, t, cond)
                    x_teacher, x_student = sampler.step(v_teacher, i, x_teacher), sampler.step(v_student, i, x_student)
                final_error += torch.mean((x_student - x_teacher) ** 2).item()
        return step_error, final_error

    before = errors()
    config = DistillConfig(num_inference_steps=steps, batch_size=4, max_train_steps=40, lora_lr=1e-3, seed=1)
    distiller = DataFreeDistiller(model, sampler, conditioning, shape, config, tmp_path)
    assert distiller.train()["steps"] == 40
    after = errors()
    # Measured: SD3 0.68x / 0.61x, Flux 0.84x / 0.82x of the errors before training.
    assert after[0] < 0.9 * before[0] and after[1] < 0.9 * before[1], (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_two_process_cpu_run(saved_pipelines, tmp_path, kind):
    out = tmp_path / "out"
    proc, _ = _launch(ROOT / "examples" / "distill.py", *_job(saved_pipelines, kind, out, "--checkpointing_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "rank1_distill_state.json").is_file(), "each process saves its trajectory state"
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2
    _assert_adapter_loads(out / "adapter", PIPELINES[kind][1])
