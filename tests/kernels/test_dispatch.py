"""Dispatch between the Triton kernels and the torch references: the rules, the overrides, the errors, and that
``import diffusers_qalora`` neither imports the kernel modules nor fixes the interpreter switch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import diffusers_qalora  # noqa: F401  (installs the dispatch hooks)
from diffusers_qalora import KernelPreference, set_kernel_preference
from diffusers_qalora.export import IntegerLayout, IntegerLinear
from diffusers_qalora.export.backends import resolve_integer_kernel
from diffusers_qalora.kernels import _build as build
from diffusers_qalora.kernels import dispatch, resolve_kernel_preference, resolved_kernel
from diffusers_qalora.kernels.fake_quant import fused_fake_quantize
from diffusers_qalora.kernels.integer_layers import triton_integer_conv2d, triton_integer_linear
from diffusers_qalora.quant import (
    TemporalActQuantizer,
    TimestepContext,
    WeightQuantizer,
    fake_quantize,
    fake_quantize_impl,
)
from diffusers_qalora.quant.kernel_preference import kernel_preference_of
from diffusers_qalora.quant.quantizers import set_fake_quantize_resolver

CPU = torch.device("cpu")
AUTO, TORCH, TRITON, ONEDNN = KernelPreference


def _weight_quantizer() -> WeightQuantizer:
    wq = WeightQuantizer((6, 4), bits=4)
    wq.initialize_(torch.randn(6, 4), "minmax")
    return wq


def test_auto_is_torch_on_cpu_and_the_choice_is_cached_on_the_module():
    wq = _weight_quantizer()
    assert resolved_kernel(wq) is None  # nothing resolved before the first call
    assert fake_quantize_impl(wq, torch.zeros(1)) is fake_quantize
    assert resolved_kernel(wq) == "torch"
    assert resolve_kernel_preference("auto", "cpu") == "torch"


def test_auto_is_triton_on_cuda_when_triton_imports(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    assert resolve_kernel_preference("auto", "cuda") == "triton"
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not installed")
    assert resolve_kernel_preference("auto", "cuda") == "torch"


def test_the_preference_is_one_str_enum():
    assert [p.value for p in KernelPreference] == ["auto", "torch", "triton", "onednn"]
    assert KernelPreference("torch") is TORCH and TORCH == "torch" and f"{TORCH}" == "torch"


def test_set_kernel_preference_walks_the_model_and_is_re_resolved(triton_on_cpu):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    aq = TemporalActQuantizer([0.0], bits=8)
    wq = _weight_quantizer()
    model.add_module("aq", aq)
    model.add_module("wq", wq)
    assert fake_quantize_impl(wq, torch.zeros(1)) is fake_quantize  # "auto" on CPU
    assert set_kernel_preference(model, "triton") is model
    assert kernel_preference_of(aq) is TRITON and kernel_preference_of(wq) is TRITON
    assert fake_quantize_impl(aq, torch.zeros(1)) is fused_fake_quantize  # re-resolved after the change
    assert fake_quantize_impl(wq, torch.zeros(1)) is fused_fake_quantize
    set_kernel_preference(wq, "torch")
    assert fake_quantize_impl(wq, torch.zeros(1)) is fake_quantize
    assert fake_quantize_impl(aq, torch.zeros(1)) is fused_fake_quantize
    set_kernel_preference(model, "auto")  # "auto" leaves nothing behind on the modules
    assert all(kernel_preference_of(m) is AUTO for m in model.modules())
    assert fake_quantize_impl(wq, torch.zeros(1)) is fake_quantize


def test_recurse_false_sets_the_module_alone():
    model = torch.nn.Sequential(_weight_quantizer())
    set_kernel_preference(model, "torch", recurse=False)
    assert kernel_preference_of(model) is TORCH and kernel_preference_of(model[0]) is AUTO


def test_invalid_preferences_are_rejected_and_change_nothing():
    model = torch.nn.Sequential(_weight_quantizer())
    with pytest.raises(ValueError, match="must be one of"):
        set_kernel_preference(model, "cuda")
    with pytest.raises(ValueError, match="'reference' is now 'torch'"):
        set_kernel_preference(model, "reference")  # the old name is read from saved files only
    with pytest.raises(TypeError, match="torch.nn.Module"):
        set_kernel_preference("model", "torch")
    with pytest.raises(ValueError, match="has none .*export_quantized"):
        set_kernel_preference(model, "onednn")  # fake-quant modules have no oneDNN path
    assert all(kernel_preference_of(m) is AUTO for m in model.modules())
    with pytest.raises(ValueError, match="kernel_preference='onednn'"):
        resolve_kernel_preference("onednn", "cpu")


def test_requesting_triton_where_it_cannot_run_names_the_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not installed (pip install ...)")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        resolve_kernel_preference("triton", "cuda")
    monkeypatch.undo()
    if dispatch.triton_import_error() is None:
        # Kernels built (or to be built) without the interpreter cannot take CPU tensors.
        monkeypatch.setitem(build._state, "interpreted", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_kernel_preference("triton", "cpu")
    with pytest.raises(RuntimeError, match="not 'meta'|meta"):
        resolve_kernel_preference("triton", "meta")


def test_a_failed_triton_request_leaves_the_quantizer_usable(monkeypatch):
    wq = _weight_quantizer()
    w = torch.randn(6, 4)
    expected = wq(w)
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not installed")
    set_kernel_preference(wq, "triton")
    with pytest.raises(RuntimeError, match="kernel_preference='triton'"):
        wq(w)
    set_kernel_preference(wq, "auto")
    assert torch.equal(wq(w), expected)


def test_without_resolver_the_quantizers_run_fake_quantize():
    previous = set_fake_quantize_resolver(None)
    try:
        wq = set_kernel_preference(_weight_quantizer(), "triton")
        assert fake_quantize_impl(wq, torch.zeros(1)) is fake_quantize
    finally:
        set_fake_quantize_resolver(previous)


def _integer_linear() -> IntegerLinear:
    layer = IntegerLinear(8, 4, True, IntegerLayout("linear", 8, 8))
    layer.load_codes_(
        torch.randint(-8, 8, (4, 8)),
        torch.full((4, 1), 0.1),
        torch.zeros(4),
        torch.zeros(1),
        torch.ones(1),
        torch.zeros(1),
    )
    layer.context = TimestepContext()
    return layer


@pytest.mark.filterwarnings("ignore::diffusers_qalora.export.IntegerKernelWarning")
def test_integer_layers_triton_and_auto():
    cuda = torch.device("cuda")
    assert resolve_integer_kernel(TRITON, cuda, "linear") is triton_integer_linear
    assert resolve_integer_kernel(TRITON, cuda, "conv2d") is triton_integer_conv2d
    assert resolve_integer_kernel(AUTO, cuda, "linear") in (triton_integer_linear, "torch")
    assert resolve_integer_kernel(AUTO, CPU, "linear") in ("onednn", "torch")  # auto keeps oneDNN on CPU
    assert resolve_integer_kernel(TORCH, cuda, "linear") == "torch"
    with pytest.raises(RuntimeError, match="`up.0`: kernel_preference='onednn' runs on CPU only"):
        resolve_integer_kernel(ONEDNN, cuda, "linear", "`up.0`")


def test_integer_layers_take_every_preference(triton_on_cpu):
    model = torch.nn.Sequential(_integer_linear(), _weight_quantizer())
    layer = model[0]
    x = torch.randn(3, 8)
    layer.context.set(torch.zeros(3))
    set_kernel_preference(model, "torch")
    expected = layer(x)
    assert "kernel_preference='torch'" in repr(layer)
    set_kernel_preference(model, "triton")
    assert kernel_preference_of(layer) is TRITON and kernel_preference_of(model[1]) is TRITON
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    set_kernel_preference(model, "onednn")  # the integer layer only; the quantizer keeps its setting
    assert kernel_preference_of(layer) is ONEDNN and kernel_preference_of(model[1]) is TRITON
    set_kernel_preference(model, "auto")
    assert kernel_preference_of(layer) is AUTO


def test_onednn_refuses_modules_off_the_cpu():
    class OnCuda(torch.nn.Module):  # a module with a oneDNN path and a tensor on a GPU (none is needed to test it)
        kernel_preferences = tuple(KernelPreference)

        def buffers(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device("cuda", 0))

    model = torch.nn.Sequential(_integer_linear().to("meta"), OnCuda())
    with pytest.raises(ValueError, match="`1` is on cuda:0, but oneDNN's int8 kernels run on CPU"):
        set_kernel_preference(model, "onednn")
    assert kernel_preference_of(model[0]) is AUTO  # nothing was changed
    set_kernel_preference(model[0], "onednn")  # meta (a model being loaded) is fine
    assert kernel_preference_of(model[0]) is ONEDNN


SUBPROCESS = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import diffusers_qalora, peft                  # peft imports triton (the hard case for a late switch)
    from diffusers_qalora.kernels import fused_fake_quantize
    built = [m for m in sys.modules if m.startswith("diffusers_qalora.kernels._") and m.endswith("_triton")]
    assert not built, built                        # no kernel module imported, nothing decorated
    assert "triton" in sys.modules                 # imported before the interpreter was asked for
    os.environ["TRITON_INTERPRET"] = "1"
    from diffusers_qalora.kernels import PackedWeight, int8_linear, int8_linear_reference
    x = torch.linspace(-3, 3, 11)
    step = torch.tensor(0.5, requires_grad=True)
    out = fused_fake_quantize(x, step, None, -4, 3)
    out.sum().backward()                           # the backward kernel reduces rows
    codes = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
    weight = PackedWeight.from_codes(torch.randint(-8, 8, (6, 40)), 4, torch.full((6, 1), 0.1))
    y = int8_linear(codes, torch.ones(1), torch.zeros(1), weight, kernel_preference="triton")
    expected = torch.clamp(torch.round(x / 0.5), -4, 3) * 0.5
    assert torch.equal(out.detach(), expected), (out, expected)
    v = x / 0.5
    inside = (torch.round(v) >= -4) & (torch.round(v) <= 3)
    assert torch.allclose(step.grad, torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), -4, 3)).sum())
    assert torch.allclose(y, int8_linear_reference(codes, torch.ones(1), torch.zeros(1), weight))
    print("ok")
    """
)


def test_import_does_not_build_kernels_and_a_late_interpreter_switch_works():
    pytest.importorskip("triton")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SUBPROCESS], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
