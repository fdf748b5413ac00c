"""Training through the fused weight path gives the adapter of the reference composition.

The embedded default model with the default job's adapter (W4A4, r = 32, 100-entry timestep table, MSE weight init)
is distilled for a few steps twice from the same start: once with the fused path (what training runs:
`fake_quantize_lora_merged`, and `qalora_linear` / `qalora_conv2d`, which take the LoRA gradients of the small-batch
layers through their activations) and once with ``QALoraLayer.fused_weight_path = False`` (the reference composition
``fake_quantize(W0 + B @ A)`` through autograd).  The fused path is forced, with its eager passes.

Tolerance: every adapter tensor within ``rtol=1e-5, atol=1e-6`` of the reference.  The LoRA gradients taken through
the activations are the same sums in another order (float32 rounding, ~1e-7 relative); Adam scales each step to about
``lr = 1e-3`` whatever the gradient's size, so after 3 steps the rounding shows as up to ~3e-7.  ``atol=1e-6`` is a
thousandth of one step; a wrong gradient moves entries by whole steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import diffusers_qalora as dq
from diffusers_qalora.distill.embedded import EmbeddedJobConfig, timestep_table
from diffusers_qalora.quant import clear_workspace, fused_compile
from diffusers_qalora.testbed import load_testbed
from diffusers_qalora.tuners.qalora.api import get_qalora_param_groups
from diffusers_qalora.tuners.qalora.layer import QALoraLayer

STEPS = 3


@pytest.fixture(scope="module")
def embedded_student():
    torch.manual_seed(0)
    testbed = load_testbed()
    job = EmbeddedJobConfig()
    table = timestep_table(testbed.pipeline.scheduler, job.table_steps)
    unet = testbed.unet
    cfg = dq.QALoraConfig(
        r=job.rank, lora_alpha=job.rank, weight_bits=job.weight_bits, act_bits=job.act_bits, timesteps=table
    )
    dq.get_qalora_model(unet, cfg)
    gen = torch.Generator().manual_seed(0)

    def calib():
        for t in table[::10]:
            unet(torch.randn(8, 1, 16, 16, generator=gen), t, class_labels=torch.arange(8))

    dq.calibrate_activations(unet, calib)
    # B = 0 at init: give the LoRA factors a start away from zero so the first steps already use them.
    with torch.no_grad():
        for layer in dq.tuners.qalora.model.qalora_layers(unet).values():
            if "default" in layer.qal_B:
                layer.qal_B["default"].normal_(std=0.02, generator=gen)
    return unet, table


def distill(model, table, fused: bool):
    groups = get_qalora_param_groups(model, 1e-3, 1e-4, 1e-3, "lr", 0.01)
    opt = torch.optim.AdamW(groups.param_groups)
    gen = torch.Generator().manual_seed(1)
    previous = QALoraLayer.fused_weight_path
    # This model's weights are below the size at which "auto" takes the fused path: force it (eager passes).
    QALoraLayer.fused_weight_path = fused
    try:
        with fused_compile("eager"):
            for step in range(STEPS):
                x = torch.randn(8, 1, 16, 16, generator=gen)
                labels = torch.arange(8) % 10
                t = table[len(table) - 1 - 7 * step]
                with torch.no_grad(), dq.adapters_disabled(model):
                    target = model(x, t, class_labels=labels).sample
                loss = F.mse_loss(model(x, t, class_labels=labels).sample, target)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        QALoraLayer.fused_weight_path = previous
        groups.remove_hooks()
        clear_workspace()
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".qal_" in n}


def test_fused_path_trains_the_adapter_of_the_reference_path(embedded_student):
    unet, table = embedded_student
    start = {n: p.detach().clone() for n, p in unet.named_parameters() if ".qal_" in n}
    reference = distill(copy.deepcopy(unet), table, fused=False)
    fused = distill(copy.deepcopy(unet), table, fused=True)
    moved = [n for n in reference if not torch.equal(reference[n], start[n])]
    assert any(".qal_A." in n for n in moved) and any(".qal_weight_quantizer." in n for n in moved)
    assert any(".qal_act_quantizer." in n for n in moved)
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


class OneLayer(torch.nn.Module):
    """A denoiser-shaped wrapper (``forward(x, timestep)``) around one layer, named ``layer``."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, timestep: float) -> torch.Tensor:
        return self.layer(x)


def one_layer_student(layer: torch.nn.Module, calibration_input: torch.Tensor, **config) -> OneLayer:
    torch.manual_seed(0)
    model = OneLayer(layer)
    cfg = dq.QALoraConfig(
        r=4,
        lora_alpha=8,
        weight_bits=4,
        act_bits=8,
        timesteps=[0.0],
        target_modules=["layer"],
        eight_bit_modules=[],
        **config,
    )
    dq.get_qalora_model(model, cfg)
    with torch.no_grad():
        model.layer.qal_B["default"].normal_(std=0.05)
    dq.calibrate_activations(model, lambda: model(calibration_input, 0.0))
    return model


def compare_layer_op_with_the_composition(monkeypatch, model: OneLayer, x: torch.Tensor) -> bool:
    """Run one forward and backward pass through the fused path and through the composition; assert the outputs are
    bit-identical and the gradients within 1e-5 of their largest entry (the LoRA gradients sum in another order), and
    return whether the layer op ran."""
    from diffusers_qalora.quant import lora_op

    calls = []
    original = lora_op._QALoraOp.apply
    monkeypatch.setattr(lora_op._QALoraOp, "apply", lambda *args: calls.append(1) or original(*args))
    results = {}
    try:
        with fused_compile("eager"):
            for fused in (False, True):
                QALoraLayer.fused_weight_path = fused
                model.zero_grad(set_to_none=True)
                y = model(x, 0.0)
                (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                results[fused] = (y.detach(), grads)
    finally:
        QALoraLayer.fused_weight_path = True
        clear_workspace()
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    assert results[True][1].keys() == results[False][1].keys()
    for name, want in results[False][1].items():
        scale = max(float(want.abs().max()), 1e-12)
        torch.testing.assert_close(results[True][1][name], want, rtol=1e-5, atol=1e-6 * scale, msg=name)
    return bool(calls)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": 1, "padding_mode": "circular", "stride": 2},
        {"padding": "same"},  # a string padding keeps the composition
    ],
)
def test_conv_layer_op_matches_the_composition(monkeypatch, conv_kwargs):
    x = torch.randn(2, 8, 6, 6)
    model = one_layer_student(torch.nn.Conv2d(8, 16, 3, **conv_kwargs), x)
    ran = compare_layer_op_with_the_composition(monkeypatch, model, x)
    assert ran == (conv_kwargs.get("padding") != "same")


@pytest.mark.parametrize("tokens", [5, 0])  # an empty batch too
def test_linear_layer_op_with_group_weights_matches_the_composition(monkeypatch, tokens):
    model = one_layer_student(
        torch.nn.Linear(64, 48),
        torch.randn(2, 5, 64),
        weight_granularity="group",
        weight_group_size=16,
        weight_symmetric=False,
    )
    assert compare_layer_op_with_the_composition(monkeypatch, model, torch.randn(2, tokens, 64))
