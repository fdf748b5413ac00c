"""``torch.compile`` of a QALoRA model (inference at several timesteps, a training step) and of an exported integer
model, on CPU.

The QALoRA model is compiled with the ``"eager"`` (inference) and ``"aot_eager"`` (training step) backends: dynamo
traces the timestep hook and the per-timestep step-size lookups (graph breaks included) and AOTAutograd builds the
backward, which is what can go wrong; inductor gives the same numbers but spends ~2 CPU-minutes compiling even this tiny model, too slow for
the suite (docs/lifecycle.md).  The exported model is compiled with inductor, what users run, before and after an eager call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffusers_qalora as dq

TIMESTEPS = [0.0, 500.0, 999.0]


class TinyDenoiser(nn.Module):
    """A conv and a linear layer with a ``timestep`` argument: the smallest model QALoRA wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.proj = nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(sample).mean((2, 3)))


def qalora_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = dq.get_qalora_model(
        TinyDenoiser(),
        dq.QALoraConfig(r=2, timesteps=TIMESTEPS, weight_init="minmax", act_init="minmax", init_weights=False),
    )
    x = torch.randn(2, 2, 6, 6)
    # Inputs scaled per timestep, so that every timestep gets its own step sizes.
    dq.calibrate_activations(model, lambda: [model(x * (1 + t / 250), torch.full((2,), t)) for t in TIMESTEPS])
    return model, x


def timesteps(t: float) -> torch.Tensor:
    return torch.full((2,), t)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager"])
def test_compiled_qalora_model_follows_the_timestep(backend):
    model, x = qalora_model()
    compiled = torch.compile(model, backend=backend)
    outputs = []
    for t in (0.0, 999.0, 250.0):  # a compiled graph must not bake in the step sizes of the first timestep
        with torch.no_grad():
            out = compiled(x, timesteps(t))
            assert torch.equal(out, model(x, timesteps(t))), t
        outputs.append(out)
    assert not torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("backend", ["aot_eager"])  # AOTAutograd builds the backward graph
def test_compiled_training_step_gives_the_eager_gradients(backend):
    model, x = qalora_model()
    compiled = torch.compile(model, backend=backend)

    def grads(fn) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        fn(x, timesteps(500.0)).pow(2).mean().backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    expected, got = grads(model), grads(compiled)
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None, name  # inactive timesteps stay without gradient
        else:
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert got["proj.qal_A.default"] is not None and got["proj.qal_act_quantizer.default.step.v1"] is not None
    assert got["proj.qal_act_quantizer.default.step.v0"] is None


@pytest.mark.slow
@pytest.mark.parametrize("eager_first", [True, False])
def test_compiled_exported_model_with_inductor(eager_first):
    """Compiled before or after an eager call (the oneDNN weights are read at run time either way); the traced path
    applies each sample's step size in a float epilogue where eager oneDNN folds it into its own, so the outputs agree
    to float32 rounding (a rounding tie could move one code: docs/export.md)."""
    model, x = qalora_model()
    exported = dq.export_quantized(model)
    with torch.no_grad():
        expected = {t: exported(x, timesteps(t)) for t in (0.0, 250.0)}
        compiled = torch.compile(exported)
        if not eager_first:
            torch._dynamo.reset()
            for layer in dq.export.integer_layers(exported).values():
                layer._derived.clear()  # no packed weights cached by the eager calls
        for t, out in expected.items():
            torch.testing.assert_close(compiled(x, timesteps(t)), out, rtol=1e-5, atol=1e-6, msg=str(t))
