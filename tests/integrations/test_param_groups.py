"""`get_qalora_param_groups` returns what ``torch.optim`` takes, and the ``scale_aware="grad"`` hooks stay reachable."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_unet2d, output_of, unet2d_inputs

import diffusers_qalora as dq
from diffusers_qalora.tuners.qalora.model import qalora_layers

TIMESTEPS = [0.0, 500.0, 999.0]


def tiny_qalora_model() -> torch.nn.Module:
    config = dq.QALoraConfig(
        r=4,
        lora_alpha=4,
        weight_bits=4,
        act_bits=8,
        weight_init="minmax",
        act_init="minmax",
        timesteps=TIMESTEPS,
        init_weights=False,
    )
    model = dq.get_qalora_model(make_unet2d(), config)
    dq.calibrate_activations(model, lambda: model(**unet2d_inputs(500.0)))
    return model


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    return output_of(model(**unet2d_inputs(500.0))).pow(2).mean()


@pytest.mark.parametrize("scale_aware", ["lr", "grad", "none"])
def test_optimizers_take_the_groups_as_they_are(scale_aware):
    model = tiny_qalora_model()
    groups = dq.get_qalora_param_groups(model, scale_aware=scale_aware)
    assert isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for optimizer in (torch.optim.AdamW(groups), torch.optim.SGD(groups, lr=0.1), torch.optim.Adam(groups)):
        assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
        assert [g["name"] for g in optimizer.param_groups] == [g["name"] for g in groups]
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups)
    a_param = next(layer.qal_A["default"] for layer in qalora_layers(model).values() if "default" in layer.qal_A)
    before = a_param.detach().clone()
    loss_of(model).backward()
    optimizer.step()
    assert not torch.equal(a_param.detach(), before)
    groups.remove_hooks()


def test_grad_mode_hooks_are_reachable_and_scale_the_lora_gradients():
    model = tiny_qalora_model()
    plain = dq.get_qalora_param_groups(model, scale_aware="none")
    lora = plain[0]["params"]
    loss_of(model).backward()
    reference = [p.grad.clone() for p in lora]
    model.zero_grad(set_to_none=True)

    groups = dq.get_qalora_param_groups(model, scale_aware="grad")
    assert len(groups.hooks) == len(lora) > 0
    loss_of(model).backward()
    layers = [layer for layer in qalora_layers(model).values() if layer.qal_A]
    steps = [dq.tuners.qalora.api.mean_weight_step(layer, "default") for layer in layers]
    mean = sum(steps) / len(steps)
    factors = [s / mean for s in steps for _ in range(2)]  # A and B of each layer
    assert len({round(f, 9) for f in factors}) > 1  # the layers' step sizes differ: the check can fail
    for p, ref, factor in zip(lora, reference, factors, strict=True):
        torch.testing.assert_close(p.grad, ref * factor)
    model.zero_grad(set_to_none=True)

    groups.remove_hooks()
    assert groups.hooks == []
    loss_of(model).backward()
    for p, ref in zip(lora, reference, strict=True):
        torch.testing.assert_close(p.grad, ref)


def test_groups_print_names_not_tensors():
    groups = dq.get_qalora_param_groups(tiny_qalora_model(), scale_aware="none")
    text = repr(groups)
    assert "'lora'" in text and "'weight_steps'" in text and "'act_steps'" in text and "tensor" not in text
