"""`qalora_linear` / `qalora_conv2d`: one QALoRA layer as one autograd function, the LoRA gradients taken through
the layer's activations where that is cheaper (see `diffusers_qalora/quant/lora_op.py`).

Tolerances:
- the maths of the low-rank gradients is checked in float64 against the dense masked product ``(G * M) A^T`` /
  ``B^T (G * M)``: relative error <= 1e-10 of the largest entry (the two differ only in summation order);
- the op (float32) against the reference composition ``F.conv2d(x, fake_quantize(W0 + scaling * B @ A))``: output and
  input gradient bit-identical (same operations); step and LoRA gradients within 1e-5 of their largest entry (other
  summation orders);
- a convolution lowered to a matrix product over its unfolded input (`conv_as_matmul`): output and input gradient
  within 1e-5 of their largest entry too (the product sums in another order than oneDNN's convolution).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_qalora.quant import fake_quantize, fused_compile, lora_op, qalora_conv2d, qalora_linear
from diffusers_qalora.quant.primitives import clear_workspace


@pytest.fixture(autouse=True)
def eager_passes():
    with fused_compile("eager"):
        yield
    clear_workspace()


# kind, input shape, weight shape, conv (stride, padding, dilation), grouped view, symmetric, scaling
CASES = {
    "linear": ("linear", (3, 5, 16), (24, 16), None, (24, 1, 16), True, 1.0),
    "linear_grouped_asym": ("linear", (4, 16), (12, 16), None, (12, 4, 4), False, 0.5),
    "conv3x3": ("conv", (2, 8, 5, 5), (20, 8, 3, 3), ((1, 1), (1, 1), (1, 1)), (20, 1, 72), True, 2.0),
    "conv_stride_dilation_asym": (
        "conv",
        (2, 6, 7, 7),
        (16, 6, 3, 3),
        ((2, 2), (2, 2), (2, 2)),
        (16, 1, 54),
        False,
        1.0,
    ),
    "conv1x1": ("conv", (1, 12, 3, 3), (24, 12, 1, 1), ((1, 1), (0, 0), (1, 1)), (24, 1, 12), True, 1.0),
}


def make(case, seed=0, dtype=torch.float32, rank=4):
    kind, x_shape, w_shape, conv, grouped, symmetric, scaling = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen, dtype=dtype)
    w0 = torch.randn(w_shape, generator=gen, dtype=dtype) * 0.1
    a = torch.randn((rank, *w_shape[1:]), generator=gen, dtype=dtype) * 0.2
    b = torch.randn((w_shape[0], rank), generator=gen, dtype=dtype) * 0.2
    # Steps small enough that a few percent of the merged weights clip: the correction term is exercised.
    step = torch.rand(grouped[:2] + (1,), generator=gen, dtype=dtype) * 0.01 + 0.03
    zp = None if symmetric else torch.randint(0, 16, grouped[:2] + (1,), generator=gen).to(dtype)
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    return x, w0, a, b, step, zp, qmin, qmax


def reference(case, x, w0, a, b, step, zp, qmin, qmax, grad_scale=0.3):
    kind, _, _, conv, grouped, _, scaling = case
    delta = (b @ a.reshape(a.shape[0], -1)).reshape(w0.shape) * scaling
    with fused_compile("never"):  # the reference is the eager composition, whatever the test's mode
        w = fake_quantize((w0 + delta).reshape(grouped), step, zp, qmin, qmax, grad_scale).reshape(w0.shape)
    return F.linear(x, w) if conv is None else F.conv2d(x, w, None, *conv)


def op(case, x, w0, a, b, step, zp, qmin, qmax, grad_scale=0.3):
    kind, _, _, conv, grouped, _, scaling = case
    if conv is None:
        return qalora_linear(x, w0, a, b, scaling, step, zp, qmin, qmax, grad_scale, grouped)
    stride, padding, dilation = conv
    return qalora_conv2d(
        x, w0, a, b, scaling, step, zp, qmin, qmax, grad_scale, grouped, None, stride, padding, dilation
    )


def clip_mask(case, w0, a, b, step, zp, qmin, qmax):
    scaling, grouped = case[6], case[4]
    v = ((w0 + (b @ a.reshape(a.shape[0], -1)).reshape(w0.shape) * scaling).reshape(grouped)) / step
    codes = torch.round(v) + (0 if zp is None else zp)
    return ((codes < qmin) | (codes > qmax)).reshape(w0.shape[0], -1)


@pytest.mark.parametrize("name", list(CASES))
def test_lowrank_gradients_equal_the_masked_weight_gradient_products_float64(name):
    case = CASES[name]
    x, w0, a, b, step, zp, qmin, qmax = make(case, dtype=torch.float64)
    conv = case[3]
    y = F.linear(x, w0) if conv is None else F.conv2d(x, w0, None, *conv)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if conv is None:
        g = grad_y.reshape(-1, w0.shape[0]).t() @ x.reshape(-1, x.shape[-1])
    else:
        g = torch.nn.grad.conv2d_weight(x, w0.shape, grad_y, *conv)
    g = g.reshape(w0.shape[0], -1)
    outside = clip_mask(case, w0, a, b, step, zp, qmin, qmax)
    assert 0 < int(outside.sum()) < outside.numel() // 4
    clipped = outside.reshape(-1).nonzero().squeeze(1)
    grad_a, grad_b = lora_op._lowrank_lora_gradients(x, grad_y, a, b, conv, clipped, g.reshape(-1)[clipped], g.shape[1])
    masked = g * ~outside
    want_b = masked @ a.reshape(a.shape[0], -1).t()
    want_a = (b.t() @ masked).reshape(a.shape)
    for got, want in ((grad_a, want_a), (grad_b, want_b)):
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-10 * float(want.abs().max())


def run(fn, case, tensors, grad_out=None):
    x, w0, a, b, step, zp, qmin, qmax = tensors
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, step)]
    y = fn(case, leaves[0], w0, leaves[1], leaves[2], leaves[3], zp, qmin, qmax)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * grad_out).sum(), leaves)
    return y.detach(), grads, grad_out


def count_lowrank(monkeypatch):
    calls = []
    original = lora_op._lowrank_lora_gradients
    monkeypatch.setattr(
        lora_op, "_lowrank_lora_gradients", lambda *args: calls.append(1) or original(*args), raising=True
    )
    return calls


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["lowrank", "dense"])
def test_op_matches_the_reference_composition(monkeypatch, name, path):
    case = CASES[name]
    tensors = make(case)
    assert bool(clip_mask(case, *tensors[1:]).any())
    calls = count_lowrank(monkeypatch)
    # Both ways on every case (the choice itself is `test_each_layer_takes_the_cheaper_way`).
    monkeypatch.setattr(lora_op, "lowrank_gradients_cheaper", lambda *args: path == "lowrank")
    y_ref, g_ref, grad_out = run(reference, case, tensors)
    for _ in range(2):  # the second call runs on reused workspace buffers
        y, g, _ = run(op, case, tensors, grad_out)
        assert torch.equal(y, y_ref)
        assert torch.equal(g[0], g_ref[0])  # input gradient
        for got, want in zip(g[1:], g_ref[1:]):
            assert got.shape == want.shape
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert bool(calls) == (path == "lowrank")


def test_each_layer_takes_the_cheaper_way():
    # 1280 outputs, 11520 weights per output (SD1.5's deepest 3x3 conv): 4 positions go through the activations,
    # 4096 through the weight gradient; SD1.5's first 320-channel convs (2880 weights per output) at 16 x 16 latents
    # (256 positions) are just past the break-even point.
    assert lora_op.lowrank_gradients_cheaper(4, 1280, 11520)
    assert not lora_op.lowrank_gradients_cheaper(4096, 1280, 11520)
    assert not lora_op.lowrank_gradients_cheaper(256, 320, 2880)
    assert lora_op.lowrank_gradients_cheaper(64, 640, 5760)


CONV_CASES = [name for name, case in CASES.items() if case[0] == "conv"]


def assert_near(got, want, what):
    assert got.shape == want.shape, what
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), what


@pytest.mark.parametrize("name", CONV_CASES)
@pytest.mark.parametrize("path", ["lowrank", "dense"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_convolution_lowered_to_a_matrix_product_matches_the_reference(monkeypatch, name, path, memory_format):
    case = CASES[name]
    x, *rest = make(case)
    tensors = (x.contiguous(memory_format=memory_format), *rest)
    monkeypatch.setattr(lora_op, "lowrank_gradients_cheaper", lambda *args: path == "lowrank")
    y_ref, g_ref, grad_out = run(reference, case, tensors)
    convs = []
    original_conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *args, **kw: convs.append(args[1].shape) or original_conv2d(*args, **kw))
    monkeypatch.setattr(lora_op, "conv_as_matmul", lambda *args: True)
    for _ in range(2):  # the second call runs on reused workspace buffers (the pooled weight gradient)
        y, g, _ = run(op, case, tensors, grad_out)
        assert y.is_contiguous(memory_format=memory_format)
        assert_near(y, y_ref, "output")
        for what, got, want in zip(("input", "A", "B", "step"), g, g_ref):
            assert_near(got, want, what)
    # Nothing ran as a convolution with the layer's weight (the low-rank path's products are matrix products too).
    assert not any(shape == tensors[1].shape for shape in convs)


def test_small_convolutions_with_large_weights_run_as_matrix_products():
    # SD1.5's 1280-channel 3x3 convolutions at 4 to 64 positions (16x16 and 32x32 latents, batch 1 or 2): lowered;
    # 640 channels at 256 positions and 320 at 1024 (its first blocks), and 1x1 convolutions: oneDNN.
    for positions in (4, 16, 32, 64):
        assert lora_op.conv_as_matmul(positions, 1280, 9)
    assert lora_op.conv_as_matmul(64, 640, 9)
    assert not lora_op.conv_as_matmul(256, 640, 9)
    assert not lora_op.conv_as_matmul(1024, 320, 9)
    assert not lora_op.conv_as_matmul(16, 1280, 1)


def test_a_lowered_layer_pools_its_weight_gradient(monkeypatch):
    from diffusers_qalora.quant.primitives import WORKSPACE

    monkeypatch.setattr(lora_op, "conv_as_matmul", lambda *args: True)
    case = CASES["conv3x3"]
    tensors = make(case)
    run(op, case, tensors)
    pooled = WORKSPACE._free.get(((20, 72), torch.float32, torch.device("cpu")))
    assert pooled is not None and len(pooled) == 1  # G went back to the pool
    run(op, case, tensors)
    assert len(WORKSPACE._free[((20, 72), torch.float32, torch.device("cpu"))]) == 1  # and was taken again


def test_channels_last_input_gives_the_same_gradients(monkeypatch):
    monkeypatch.setattr(lora_op, "lowrank_gradients_cheaper", lambda *args: True)
    case = CASES["conv3x3"]
    tensors = make(case)
    _, g_ref, grad_out = run(op, case, tensors)
    x_cl = tensors[0].contiguous(memory_format=torch.channels_last)
    _, g, _ = run(op, case, (x_cl, *tensors[1:]), grad_out)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_frozen_inputs_get_no_gradient_and_a_trained_base_weight_is_refused():
    case = CASES["linear"]
    x, w0, a, b, step, zp, qmin, qmax = make(case)
    b.requires_grad_()
    y = qalora_linear(x, w0, a, b, 1.0, step, zp, qmin, qmax)
    (grad_b,) = torch.autograd.grad(y.sum(), [b])
    assert grad_b.shape == b.shape
    with pytest.raises(ValueError, match="base weight must be frozen"):
        qalora_linear(x, w0.requires_grad_(), a, b, 1.0, step, zp, qmin, qmax)


# Regimes of `clipped_positions`: many weights per cell and a small LoRA (the extremes hold every candidate); few
# weights per cell (the lists run out, cells are scanned); a large LoRA (the bound passes whole lists); heavy tails.
REGIMES = {
    "wide_cells_small_lora": (512, 0.05, 1.0),
    "narrow_cells": (24, 0.3, 1.0),
    "large_lora": (256, 3.0, 1.0),
    "heavy_tails": (384, 0.2, 6.0),
}


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("view", ["channel", "group", "tensor"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_positions_are_exactly_the_clipped_weights(regime, view, symmetric):
    from diffusers_qalora.quant.primitives import merged_weight_forward

    per_output, lora_scale, tail = REGIMES[regime]
    gen = torch.Generator().manual_seed(hash((regime, view, symmetric)) % 2**31)
    out, rank = 12, 4
    w0 = torch.randn(out, per_output, generator=gen) * 0.1
    outliers = torch.rand(out, per_output, generator=gen) < 0.01
    w0[outliers] *= tail
    a = torch.randn(rank, per_output, generator=gen) * lora_scale / per_output**0.5
    b = torch.randn(out, rank, generator=gen) * 0.1
    grouped = {"channel": (out, 1, per_output), "group": (out, per_output // 8, 8), "tensor": (1, 1, out * per_output)}[
        view
    ]
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    # Steps from a clipping range of 2 standard deviations: the tails clip, as after an MSE init.
    step = (2.0 * w0.reshape(grouped).std(dim=-1, keepdim=True) / (qmax - qmin) * 2).clamp_min(1e-4)
    zp = None if symmetric else torch.full_like(step, 8.0)
    scaling = 0.5
    w_hat, d, inside = merged_weight_forward(w0, a, b, step, zp, scaling, qmin, qmax, grouped)
    got = lora_op.clipped_positions(w0, a, b, scaling, step, zp, qmin, qmax, d, inside)
    v = (w0 + scaling * (b @ a)).reshape(grouped) / step
    codes = torch.round(v) + (0 if zp is None else zp)
    want = ((codes < qmin) | (codes > qmax)).reshape(-1).nonzero().reshape(-1)
    assert want.numel() > 0
    assert torch.equal(got, want)


def test_clear_workspace_frees_the_extremes_lists(monkeypatch):
    monkeypatch.setattr(lora_op, "lowrank_gradients_cheaper", lambda *args: True)
    case = CASES["linear"]
    tensors = make(case)
    run(op, case, tensors)
    assert id(tensors[1]) in lora_op._EXTREMES  # kept while the base weight lives
    clear_workspace()
    assert not lora_op._EXTREMES
    run(op, case, tensors)
    del tensors
    assert not lora_op._EXTREMES  # and dropped with it


@pytest.mark.parametrize("lowered", [False, True])
def test_an_unbatched_convolution_input_is_taken_as_f_conv2d_takes_it(monkeypatch, lowered):
    monkeypatch.setattr(lora_op, "conv_as_matmul", lambda *args: lowered)
    case = CASES["conv3x3"]
    x, *rest = make(case)
    y_ref, g_ref, grad_out = run(reference, case, (x[0], *rest))
    y, g, _ = run(op, case, (x[0], *rest), grad_out)
    assert_near(y, y_ref, "output")
    for what, got, want in zip(("input", "A", "B", "step"), g, g_ref):
        assert_near(got, want, what)
