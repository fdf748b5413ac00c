"""Tests of the data-free tuning of the learnable transform scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_qalora.winograd import (
    ScaleTuningResult,
    WinogradConv2d,
    WinogradWarning,
    scales_are_visible,
    tune_scales_,
)


def _layer(tile=6, c=16, **cfg) -> WinogradConv2d:
    torch.manual_seed(0)
    return WinogradConv2d.from_conv2d(nn.Conv2d(c, c, 3, padding=1), tile, **cfg)


@pytest.mark.parametrize("loss", ["sqnr", "mse"])
def test_tuning_rescues_f63_with_an_integer_output_transform(loss):
    layer = _layer(6, bits=8, group_size=8, output_bits=8, scale_init="lavin")
    weight = layer.weight.detach().clone()
    result = tune_scales_(layer, steps=40, lr=0.1, loss=loss, input_shape=(2, 16, 12, 12))
    assert isinstance(result, ScaleTuningResult) and len(result.history) == 40
    assert result.sqnr_before < 0.0  # the standard F(6,3) scales break an 8-bit output transform
    assert result.sqnr_after > result.sqnr_before + 15.0 and not result.reverted
    assert torch.equal(layer.weight, weight)  # the weights never change
    assert layer.quant_mode == "int" and layer.weight.requires_grad and layer.scales.log_b.grad is None


def test_tuning_improves_f63_tile_granularity():
    layer = _layer(6, bits=8, group_size=8, act_granularity="tile", scale_init="lavin")
    result = tune_scales_(layer, steps=30, lr=0.1, input_shape=(2, 16, 12, 12))
    assert result.sqnr_after > result.sqnr_before + 1.0


def test_tuning_with_given_inputs_tensor_and_callable():
    layer = _layer(4, c=8, bits=8, output_bits=8, scale_init="lavin")
    x = torch.randn(2, 8, 8, 8)
    result = tune_scales_(layer, steps=10, lr=0.1, inputs=x)
    assert result.sqnr_after >= result.sqnr_before
    calls = []

    def source():
        calls.append(1)
        return torch.randn(1, 8, 8, 8)

    layer.reset_scales_("lavin")
    tune_scales_(layer, steps=5, lr=0.1, inputs=source, loss="mse")
    assert len(calls) == 6  # one evaluation batch + one per step


def test_tuning_uses_the_last_input_shape_by_default():
    layer = _layer(4, c=8, bits=8, output_bits=8, scale_init="lavin")
    layer(torch.randn(1, 8, 5, 7))
    assert layer.last_input_shape == (1, 8, 5, 7)
    result = tune_scales_(layer, steps=3)
    assert len(result.history) == 3


def test_tuning_is_skipped_when_scales_are_invisible():
    layer = _layer(6, c=8, bits=8)  # per-position groups, floating-point output transform
    assert not scales_are_visible(layer)
    before = [p.detach().clone() for p in layer.scales.parameters()]
    with pytest.warns(WinogradWarning, match="cannot change"):
        result = tune_scales_(layer, steps=5, input_shape=(1, 8, 8, 8))
    assert result.history == [] and result.sqnr_after == result.sqnr_before
    assert all(torch.equal(a, b) for a, b in zip(before, layer.scales.parameters()))


def test_keep_best_reverts_a_harmful_run():
    layer = _layer(4, c=8, bits=8, output_bits=8, scale_init="balanced")
    before = [p.detach().clone() for p in layer.scales.parameters()]
    result = tune_scales_(layer, steps=5, lr=5.0, input_shape=(1, 8, 8, 8))  # absurd learning rate
    if result.reverted:
        assert all(torch.equal(a, b) for a, b in zip(before, layer.scales.parameters()))
    assert result.sqnr_after >= result.sqnr_before


def test_tuning_argument_errors():
    fp = _layer(4, c=8, bits=None)
    with pytest.raises(ValueError, match="quantized layer"):
        tune_scales_(fp)
    layer = _layer(4, c=8, bits=8, output_bits=8)
    with pytest.raises(TypeError, match="WinogradConv2d"):
        tune_scales_(nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match="`steps`"):
        tune_scales_(layer, steps=-1)
    with pytest.raises(ValueError, match="`lr`"):
        tune_scales_(layer, lr=0.0)
    with pytest.raises(ValueError, match="`loss`"):
        tune_scales_(layer, loss="l1")
    with pytest.raises(ValueError, match="input_shape"):
        tune_scales_(layer, input_shape=(1, 4, 8, 8))
    with pytest.raises(TypeError, match="inputs"):
        tune_scales_(layer, inputs=[1, 2])
