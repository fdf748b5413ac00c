"""Tests of the model-level pass: replacement and report, explicit targets, tuning, rollback, direct baseline."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from winograd_models import make_tiny_unet, unet_inputs

from diffusers_qalora.winograd import (
    DirectQuantConv2d,
    WinogradConfig,
    WinogradConv2d,
    WinogradPrecisionWarning,
    apply_winograd,
    set_quant_mode,
    sqnr_db,
    winograd_modules,
)

ELIGIBLE = 19  # conv_in, 8 ResNet blocks x 2 convs, the upsampler conv, conv_out
INELIGIBLE = {"down_blocks.0.downsamplers.0.conv": "stride", "down_blocks.1.resnets.0.conv_shortcut": "kernel size"}


def _out(model, batch=3):
    x, t, y = unet_inputs(batch)
    with torch.no_grad():
        return model(x, t, class_labels=y).sample


def _calibration_run(model, batch=4):
    def run():
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for t in (900, 500, 100):
                model(torch.randn(batch, 1, 16, 16, generator=gen), torch.tensor(t), class_labels=torch.arange(batch))

    return run


def test_replacement_counts_and_reasons_on_a_tiny_unet():
    model, ref = make_tiny_unet(), make_tiny_unet()
    conv_out_weight = model.conv_out.weight
    report = apply_winograd(model, WinogradConfig(tile=4, bits=None))
    assert len(report.replaced) == ELIGIBLE and len(winograd_modules(model)) == ELIGIBLE
    assert all(isinstance(m, WinogradConv2d) for m in winograd_modules(model).values())
    assert len(report.skipped) == 6  # the stride-2 downsampler and five 1x1 shortcuts
    for name, reason in INELIGIBLE.items():
        assert reason in report.skipped[name]
        assert type(model.get_submodule(name)) is nn.Conv2d
    assert report.inputs == "none" and all(r.sqnr_before is None for r in report.replaced.values())
    # full-precision Winograd computes the same function, and the weights are shared, not copied
    torch.testing.assert_close(_out(model), _out(ref), atol=1e-4, rtol=1e-4)
    assert model.conv_out.weight is conv_out_weight
    assert "conv_in" in report.summary() and "stride (2, 2)" in str(report)
    assert set(report.to_dict()) == {"config", "replaced", "skipped", "inputs", "seconds"}


def test_group_size_that_does_not_divide_is_skipped_unless_named():
    model = make_tiny_unet()
    report = apply_winograd(model, WinogradConfig(bits=8, group_size=8))
    assert len(report.replaced) == ELIGIBLE - 1
    assert "does not divide in_channels=1" in report.skipped["conv_in"]
    with pytest.raises(ValueError, match="`conv_in` cannot be replaced: group_size=8"):
        apply_winograd(make_tiny_unet(), WinogradConfig(bits=8, group_size=8, target_modules=["conv_in"]))


@pytest.mark.parametrize(
    "target, match",
    [
        (["down_blocks.0.downsamplers.0.conv"], r"downsamplers.0.conv` cannot be replaced: stride \(2, 2\) is not 1"),
        (["conv_shortcut"], "kernel size"),
        (["conv1", "no_such_conv"], r"\['no_such_conv'\] match no module"),
        (["time_embedding.linear_1"], "is a Linear, not a convolution"),
    ],
)
def test_naming_an_ineligible_module_raises_and_changes_nothing(target, match):
    model = make_tiny_unet()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=match):
        apply_winograd(model, WinogradConfig(target_modules=target))
    assert dict(model.named_modules()) == before


def test_targets_by_name_suffix_regex_and_excludes():
    model = make_tiny_unet()
    report = apply_winograd(
        model, WinogradConfig(bits=None, target_modules=["conv1"], exclude_modules=["mid_block.resnets.0.conv1"])
    )
    assert len(report.replaced) == 7 and all(n.endswith("conv1") for n in report.replaced)
    assert report.skipped["mid_block.resnets.0.conv1"] == "excluded by `exclude_modules`"
    assert report.skipped["conv_out"] == "not in `target_modules`"
    model = make_tiny_unet()
    report = apply_winograd(model, WinogradConfig(bits=None, target_modules=r"(up|down)_blocks\..*"))
    assert len(report.replaced) == 13 and "conv_out" not in report.replaced
    assert "stride" in report.skipped["down_blocks.0.downsamplers.0.conv"]  # a regex skips, names raise
    with pytest.raises(ValueError, match="no eligible convolution"):
        apply_winograd(model, WinogradConfig(bits=None, target_modules=r"(up|down)_blocks\..*"))  # already replaced
    with pytest.raises(TypeError, match="single convolution"):
        apply_winograd(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="WinogradConfig"):
        apply_winograd(make_tiny_unet(), {"tile": 4})


def test_tuning_on_captured_inputs_raises_the_sqnr_of_every_layer():
    model = make_tiny_unet()
    cfg = WinogradConfig(
        tile=6,
        bits=8,
        output_bits=8,
        scale_init="lavin",
        tune_steps=12,
        tune_lr=0.1,
        tune_samples=8,
        target_modules=["conv1", "conv2"],
    )
    report = apply_winograd(model, cfg, calibration_run=_calibration_run(model))
    assert report.inputs == "captured" and len(report.replaced) == 16
    gains = [r.sqnr_after - r.sqnr_before for r in report.replaced.values()]
    assert all(r.tuned for r in report.replaced.values())
    assert min(gains) >= 0.0 and sum(gains) / len(gains) > 5.0  # standard F(6,3) scales break the int output
    assert all(layer.quant_mode == "int" for layer in winograd_modules(model).values())
    assert all(layer._capture is None for layer in winograd_modules(model).values())


def test_tuning_with_random_inputs_and_invisible_scales():
    model = make_tiny_unet()
    report = apply_winograd(
        model,
        WinogradConfig(
            tile=4,
            bits=8,
            output_bits=8,
            scale_init="lavin",
            tune_steps=5,
            tune_batch_size=2,
            tune_input_size=8,
            target_modules=["conv2"],
        ),
    )
    assert report.inputs == "random" and all(
        r.tuned and r.sqnr_after >= r.sqnr_before for r in report.replaced.values()
    )
    model = make_tiny_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = apply_winograd(
            model,
            WinogradConfig(tile=4, bits=8, tune_steps=5, target_modules=["conv2"]),
            calibration_run=_calibration_run(model),
        )
    assert all(not r.tuned and "invisible" in r.note for r in report.replaced.values())
    assert all(r.sqnr_before == r.sqnr_after > 10.0 for r in report.replaced.values())


def test_a_failing_calibration_run_puts_the_original_convs_back():
    model = make_tiny_unet()
    before = dict(model.named_modules())

    def run():
        model(*unet_inputs(2)[:2], class_labels=torch.arange(2))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        apply_winograd(model, WinogradConfig(tune_steps=1), calibration_run=run)
    assert dict(model.named_modules()) == before


def test_direct_baseline_replaces_the_same_convs():
    model, ref = make_tiny_unet(), make_tiny_unet()
    wino = apply_winograd(make_tiny_unet(), WinogradConfig(bits=8))
    report = apply_winograd(model, WinogradConfig(algorithm="direct", bits=8), calibration_run=_calibration_run(model))
    assert set(report.replaced) == set(wino.replaced)
    assert all(isinstance(m, DirectQuantConv2d) for m in winograd_modules(model).values())
    assert all(r.sqnr_before > 30.0 and not r.tuned for r in report.replaced.values())
    assert sqnr_db(_out(ref), _out(model)) > 25.0
    set_quant_mode(model, "fp")
    torch.testing.assert_close(_out(model), _out(ref), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs `bits`"):
        WinogradConfig(algorithm="direct", bits=None)


def test_direct_layer_quantization_is_per_channel_and_per_sample():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    layer = DirectQuantConv2d.from_conv2d(conv, config=WinogradConfig(algorithm="direct", bits=4))
    w_hat = layer.quantized_weight()
    for k in range(3):
        assert w_hat[k].unique().numel() <= 15  # 4-bit symmetric codes, one step per output channel
    x = torch.randn(2, 4, 6, 6)
    x[1] *= 100.0  # a loud sample must not coarsen the other one's step
    out = layer(x)
    torch.testing.assert_close(out[:1], layer(x[:1]))
    with pytest.raises(ValueError, match="algorithm='direct'"):
        DirectQuantConv2d(4, 4, config=WinogradConfig())
    with pytest.raises(ValueError, match="DirectQuantConv2d"):
        WinogradConv2d(4, 4, config=WinogradConfig(algorithm="direct"))


def test_f63_in_half_precision_warns_at_apply_time():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1)).half()
    with pytest.warns(WinogradPrecisionWarning, match="float16"):
        apply_winograd(model, WinogradConfig(tile=6, bits=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", WinogradPrecisionWarning)
        apply_winograd(nn.Sequential(nn.Conv2d(4, 4, 3)).half(), WinogradConfig(tile=4, bits=None))
        apply_winograd(nn.Sequential(nn.Conv2d(4, 4, 3)).half(), WinogradConfig(tile=6, bits=8))  # computes in fp32


@settings(max_examples=25, deadline=None)
@given(
    channels=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    size=st.tuples(st.integers(3, 12), st.integers(3, 12)),
    tile=st.sampled_from([2, 4, 6]),
    padding=st.sampled_from([0, 1, 2, "same"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_full_precision_pass_is_exact_in_float64(channels, size, tile, padding, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=padding), nn.Tanh()]
    model = nn.Sequential(*layers).double()
    x = torch.randn(2, channels[0], *size, dtype=torch.float64)
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:  # the input shrank below the kernel ("valid"-style padding): nothing to compare
        return
    report = apply_winograd(model, WinogradConfig(tile=tile, bits=None))
    assert len(report.replaced) == len(channels) - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=0)


def test_pass_config_fields_round_trip_and_validate():
    cfg = WinogradConfig(
        target_modules=["conv1", "conv2"],
        exclude_modules=r".*up_blocks.*",
        tune_steps=3,
        qalora_weight="float",
        algorithm="winograd",
    )
    assert cfg.target_modules == ("conv1", "conv2")
    assert WinogradConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["target_modules"] == ["conv1", "conv2"]
    bad = [
        ({"algorithm": "fft"}, "`algorithm`"),
        ({"target_modules": 3}, "`target_modules`"),
        ({"exclude_modules": ["ok", ""]}, "`exclude_modules`"),
        ({"tune_steps": -1}, "`tune_steps`"),
        ({"tune_batch_size": 0}, "`tune_batch_size`"),
        ({"tune_lr": 0.0}, "`tune_lr`"),
        ({"tune_loss": "l1"}, "`tune_loss`"),
        ({"qalora_weight": "int"}, "`qalora_weight`"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            WinogradConfig(**kwargs)


@pytest.mark.parametrize(
    "patterns",
    [("conv1",), ("resnets.0.conv1", "conv_out"), ("conv",), r".*resnets\.\d+\.conv\d", r"conv_in", ("down_blocks",)],
)
def test_target_matching_follows_peft(patterns):
    # apply_winograd matches `target_modules` / `exclude_modules` with the rule the QALoRA tuner gets from PEFT.
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    from diffusers_qalora.winograd.replace import _matches

    names = [n for n, _ in make_tiny_unet().named_modules() if n] + ["xconv1", "a.conv1.b"]
    peft_config = SimpleNamespace(
        target_modules=patterns if isinstance(patterns, str) else set(patterns),
        exclude_modules=None,
        target_parameters=None,
    )
    assert [n for n in names if _matches(patterns, n)] == [
        n for n in names if check_target_module_exists(peft_config, n)
    ]
