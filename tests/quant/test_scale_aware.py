"""Scale-aware LoRA optimization: per-layer learning rates or gradient multipliers from the mean weight step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_qalora.quant import SCALE_AWARE_MODES, ScaleAwareEntry, scale_aware_param_groups

STEPS = [0.1, 0.2, 0.6]  # mean 0.3


def make_entries(steps=STEPS, n_params=2):
    gen = torch.Generator().manual_seed(0)
    return [
        ScaleAwareEntry(f"layer{i}", [nn.Parameter(torch.randn(3, 4, generator=gen)) for _ in range(n_params)], s)
        for i, s in enumerate(steps)
    ]


def test_modes_constant():
    assert set(SCALE_AWARE_MODES) == {"lr", "grad", "none"}


def test_lr_mode_scales_learning_rate_by_relative_step():
    entries = make_entries()
    groups = scale_aware_param_groups(entries, lora_lr=1e-3, mode="lr", weight_decay=0.01)
    assert groups.hooks == []
    assert len(groups.param_groups) == 3
    mean = sum(STEPS) / len(STEPS)
    for e, g in zip(entries, groups.param_groups):
        assert g["lr"] == pytest.approx(1e-3 * e.mean_step / mean)
        assert g["params"] == list(e.params)
        assert g["weight_decay"] == 0.01
        assert g["mean_step"] == e.mean_step
        assert e.name in g["name"]
    lrs = [g["lr"] for g in groups.param_groups]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 2e-3])
    # the average layer keeps lora_lr
    assert sum(lrs) / 3 == pytest.approx(1e-3)
    # an optimizer accepts the groups and uses their learning rates
    opt = torch.optim.AdamW(groups.param_groups, lr=123.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs)


def test_lr_mode_update_size_with_sgd():
    entries = make_entries()
    before = [[p.detach().clone() for p in e.params] for e in entries]
    groups = scale_aware_param_groups(entries, lora_lr=0.1, mode="lr")
    opt = torch.optim.SGD(groups.param_groups, lr=1.0)
    sum(p.sum() for e in entries for p in e.params).backward()  # every gradient is 1
    opt.step()
    for e, b in zip(entries, before):
        for p, p0 in zip(e.params, b):
            torch.testing.assert_close(p0 - p.detach(), torch.full_like(p0, 0.1 * e.mean_step / 0.3))


def test_grad_mode_multiplies_gradients_and_hooks_are_removable():
    entries = make_entries()
    groups = scale_aware_param_groups(entries, lora_lr=0.05, mode="grad", weight_decay=0.0)
    assert len(groups.param_groups) == 1
    g = groups.param_groups[0]
    assert g["lr"] == 0.05 and g["weight_decay"] == 0.0
    assert g["params"] == [p for e in entries for p in e.params]
    assert len(groups.hooks) == 6
    upstream = torch.randn(3, 4)
    (sum((p * upstream).sum() for e in entries for p in e.params)).backward()
    for e in entries:
        for p in e.params:
            torch.testing.assert_close(p.grad, upstream * (e.mean_step / 0.3))
    groups.remove_hooks()
    assert groups.hooks == []
    for e in entries:
        for p in e.params:
            p.grad = None
    (sum((p * upstream).sum() for e in entries for p in e.params)).backward()
    for e in entries:
        for p in e.params:
            torch.testing.assert_close(p.grad, upstream)


def test_grad_mode_equals_lr_mode_under_sgd():
    a, b = make_entries(), make_entries()
    ga = scale_aware_param_groups(a, lora_lr=0.1, mode="lr")
    gb = scale_aware_param_groups(b, lora_lr=0.1, mode="grad")
    opt_a, opt_b = torch.optim.SGD(ga.param_groups), torch.optim.SGD(gb.param_groups)
    target = torch.randn(3, 4)
    for opt, entries in ((opt_a, a), (opt_b, b)):
        for _ in range(3):
            opt.zero_grad()
            sum(((p - target) ** 2).sum() for e in entries for p in e.params).backward()
            opt.step()
    for ea, eb in zip(a, b):
        for pa, pb in zip(ea.params, eb.params):
            torch.testing.assert_close(pa, pb)
    gb.remove_hooks()


def test_none_mode_is_one_plain_group():
    entries = make_entries()
    groups = scale_aware_param_groups(entries, lora_lr=2e-4, mode="none", weight_decay=0.1)
    assert groups.hooks == []
    assert len(groups.param_groups) == 1
    g = groups.param_groups[0]
    assert g["lr"] == 2e-4 and g["weight_decay"] == 0.1
    assert g["params"] == [p for e in entries for p in e.params]
    upstream = torch.randn(3, 4)
    (entries[2].params[0] * upstream).sum().backward()
    torch.testing.assert_close(entries[2].params[0].grad, upstream)


def test_entries_without_params_are_dropped_from_mean():
    entries = make_entries()
    entries.append(ScaleAwareEntry("empty", [], 100.0))
    groups = scale_aware_param_groups(entries, lora_lr=1.0, mode="lr")
    assert len(groups.param_groups) == 3
    assert [g["lr"] for g in groups.param_groups] == pytest.approx([1 / 3, 2 / 3, 2.0])
    assert scale_aware_param_groups([ScaleAwareEntry("e", [], 1.0)], 1.0).param_groups == []


@pytest.mark.parametrize("bad", ["LR", "gradient", "", None, "scale"])
def test_bad_mode_raises(bad):
    with pytest.raises(ValueError, match=r"`scale_aware`.*'lr', 'grad', 'none'"):
        scale_aware_param_groups(make_entries(), lora_lr=1e-3, mode=bad)


def test_bad_values_raise():
    with pytest.raises(ValueError, match="`lora_lr`"):
        scale_aware_param_groups(make_entries(), lora_lr=0.0)
    with pytest.raises(ValueError, match="layer1"):
        scale_aware_param_groups(make_entries([0.1, 0.0, 0.2]), lora_lr=1e-3)
    with pytest.raises(ValueError, match="mean weight step"):
        scale_aware_param_groups(make_entries([0.1, -1.0]), lora_lr=1e-3)
