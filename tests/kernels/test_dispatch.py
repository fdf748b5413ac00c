"""Dispatch between the Triton kernels and the torch references: the rules, the overrides, the errors, and that
``import diffusers_qalora`` neither imports the kernel modules nor fixes the interpreter switch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import diffusers_qalora  # noqa: F401  (installs the dispatch hooks)
from diffusers_qalora.export import IntegerLayout, IntegerLinear
from diffusers_qalora.export.backends import resolve_backend
from diffusers_qalora.kernels import _build as build
from diffusers_qalora.kernels import (
    dispatch,
    get_kernel_backend,
    kernel_backend,
    module_kernel_backend,
    resolve_kernel_backend,
    set_kernel_backend,
    set_module_kernel_backend,
)
from diffusers_qalora.kernels.fake_quant import fused_fake_quantize
from diffusers_qalora.kernels.integer_layers import triton_integer_conv2d, triton_integer_linear
from diffusers_qalora.quant import (
    TemporalActQuantizer,
    TimestepContext,
    WeightQuantizer,
    fake_quantize,
    fake_quantize_impl,
)
from diffusers_qalora.quant.quantizers import set_fake_quantize_resolver

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _global_backend_restored():
    previous = dispatch._state["backend"]
    yield
    set_kernel_backend(previous)


def _weight_quantizer() -> WeightQuantizer:
    wq = WeightQuantizer((6, 4), bits=4)
    wq.initialize_(torch.randn(6, 4), "minmax")
    return wq


def test_auto_is_torch_on_cpu_and_the_choice_is_cached_on_the_module():
    set_kernel_backend("auto")
    wq = _weight_quantizer()
    assert module_kernel_backend(wq) is None  # nothing resolved before the first call
    assert fake_quantize_impl(wq, torch.zeros(1)) is fake_quantize
    assert module_kernel_backend(wq) == "torch"
    assert resolve_kernel_backend("auto", "cpu") == "torch"


def test_auto_is_triton_on_cuda_when_triton_imports(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    assert resolve_kernel_backend("auto", "cuda") == "triton"
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not installed")
    assert resolve_kernel_backend("auto", "cuda") == "torch"


def test_global_override_context_manager_and_environment(monkeypatch, triton_on_cpu):
    wq = _weight_quantizer()
    assert get_kernel_backend() == "triton"
    assert fake_quantize_impl(wq, torch.zeros(1)) is fused_fake_quantize
    with kernel_backend("torch"):
        assert fake_quantize_impl(wq, torch.zeros(1)) is fake_quantize  # re-resolved after the change
    assert get_kernel_backend() == "triton"
    set_kernel_backend(None)
    monkeypatch.setenv("QALORA_KERNEL_BACKEND", "torch")
    assert get_kernel_backend() == "torch"
    monkeypatch.setenv("QALORA_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="QALORA_KERNEL_BACKEND"):
        get_kernel_backend()


def test_per_module_setting_beats_the_global_one(triton_on_cpu):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    aq = TemporalActQuantizer([0.0], bits=8)
    wq = _weight_quantizer()
    model.add_module("aq", aq)
    model.add_module("wq", wq)
    set_module_kernel_backend(model, "torch")
    assert fake_quantize_impl(aq, torch.zeros(1)) is fake_quantize
    assert fake_quantize_impl(wq, torch.zeros(1)) is fake_quantize
    set_module_kernel_backend(model, None)  # the global "triton" applies again
    assert fake_quantize_impl(wq, torch.zeros(1)) is fused_fake_quantize
    with pytest.raises(ValueError, match="must be one of"):
        set_module_kernel_backend(model, "cuda")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        set_module_kernel_backend("model", "torch")


def test_invalid_names_are_rejected():
    with pytest.raises(ValueError, match="must be one of"):
        set_kernel_backend("cuda")
    with pytest.raises(ValueError, match="must be one of"), kernel_backend("fast"):
        pass


def test_requesting_triton_where_it_cannot_run_names_the_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not installed (pip install ...)")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        resolve_kernel_backend("triton", "cuda")
    monkeypatch.undo()
    if dispatch.triton_import_error() is None:
        # Kernels built (or to be built) without the interpreter cannot take CPU tensors.
        monkeypatch.setitem(build._state, "interpreted", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_kernel_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match="not 'meta'|meta"):
        resolve_kernel_backend("triton", "meta")


def test_a_failed_triton_request_leaves_the_quantizer_usable(monkeypatch):
    wq = _weight_quantizer()
    w = torch.randn(6, 4)
    expected = wq(w)
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not installed")
    set_kernel_backend("triton")
    with pytest.raises(RuntimeError, match="kernel backend 'triton'"):
        wq(w)
    set_kernel_backend("auto")
    assert torch.equal(wq(w), expected)


def test_without_resolver_the_quantizers_run_fake_quantize():
    previous = set_fake_quantize_resolver(None)
    try:
        with kernel_backend("triton"):
            assert fake_quantize_impl(_weight_quantizer(), torch.zeros(1)) is fake_quantize
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
def test_integer_layers_backend_triton_and_auto():
    assert resolve_backend("triton", torch.device("cuda"), "linear") is triton_integer_linear
    assert resolve_backend("triton", torch.device("cuda"), "conv2d") is triton_integer_conv2d
    assert resolve_backend("auto", torch.device("cuda"), "linear") in (triton_integer_linear, "reference")
    assert resolve_backend("auto", CPU, "linear") in ("onednn", "reference")  # auto keeps oneDNN on CPU
    with kernel_backend("torch"):
        assert resolve_backend("auto", torch.device("cuda"), "linear") == "reference"


def test_integer_layers_follow_the_global_triton_request(triton_on_cpu):
    layer = _integer_linear()
    assert resolve_backend("auto", CPU, "linear") is triton_integer_linear
    set_module_kernel_backend(layer, "torch")
    assert layer.backend == "reference"
    set_module_kernel_backend(layer, "triton")
    assert layer.backend == "triton"
    set_module_kernel_backend(layer, None)
    assert layer.backend == "auto"


SUBPROCESS = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import diffusers_qalora, peft                  # peft imports triton (the hard case for a late switch)
    from diffusers_qalora.kernels import fused_fake_quantize, kernel_backend
    built = [m for m in sys.modules if m.startswith("diffusers_qalora.kernels._") and m.endswith("_triton")]
    assert not built, built                        # no kernel module imported, nothing decorated
    assert "triton" in sys.modules                 # imported before the interpreter was asked for
    os.environ["TRITON_INTERPRET"] = "1"
    from diffusers_qalora.kernels import PackedWeight, int8_linear, int8_linear_reference
    with kernel_backend("triton"):
        x = torch.linspace(-3, 3, 11)
        step = torch.tensor(0.5, requires_grad=True)
        out = fused_fake_quantize(x, step, None, -4, 3)
        out.sum().backward()                       # the backward kernel reduces rows
        codes = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
        weight = PackedWeight.from_codes(torch.randint(-8, 8, (6, 40)), 4, torch.full((6, 1), 0.1))
        y = int8_linear(codes, torch.ones(1), torch.zeros(1), weight)
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
