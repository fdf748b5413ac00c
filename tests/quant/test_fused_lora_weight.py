"""The fused QALoRA weight path `fake_quantize_lora_merged` against the reference composition
``fake_quantize(W0 + (B @ A) * scaling)`` it replaces in training.

Tolerances: the output and the gradients of ``A``, ``B`` and ``W0`` must be bit-identical (same operations in the
same order); the step gradient is a sum over each step's cell that the eager pass computes in the reference's order
(bit-identical) and the compiled pass in another order, so it gets ``rtol=1e-5`` / ``atol=1e-6 * max|grad|``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_qalora.quant import fake_quantize, fake_quantize_lora_merged, fused_compile, set_fused_compile
from diffusers_qalora.quant.primitives import WORKSPACE, clear_workspace


def reference(w0, a, b, scaling, step, zp, qmin, qmax, grad_scale, grouped):
    delta = (b @ a.reshape(a.shape[0], -1)).reshape(w0.shape) * scaling
    merged = (w0.float() + delta).reshape(grouped)
    with fused_compile("never"):  # the reference is the eager composition, whatever the test's mode
        return fake_quantize(merged, step, zp, qmin, qmax, grad_scale).reshape(w0.shape)


CASES = [
    # weight shape, grouped view, symmetric, scaling
    ((24, 8, 3, 3), (24, 1, 72), True, 1.0),
    ((16, 12), (16, 3, 4), False, 0.5),
    ((10, 6), (1, 1, 60), True, 2.0),
]


def make(shape, grouped, symmetric, seed=0, w0_grad=False):
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=gen) * 0.1).requires_grad_(w0_grad)
    rank = 4
    a = (torch.randn((rank, *shape[1:]), generator=gen) * 0.2).requires_grad_()
    b = (torch.randn((shape[0], rank), generator=gen) * 0.2).requires_grad_()
    # Small steps so that some merged values clip (both regions of the LSQ gradient are exercised).
    step = (torch.rand(grouped[:2] + (1,), generator=gen) * 0.02 + 0.01).requires_grad_()
    zp = None if symmetric else torch.randint(0, 16, grouped[:2] + (1,), generator=gen).float()
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    return w0, a, b, step, zp, qmin, qmax


def run(fn, tensors, scaling, grouped, grad_out):
    w0, a, b, step, zp, qmin, qmax = tensors
    for t in (w0, a, b, step):
        t.grad = None
    y = fn(w0, a, b, scaling, step, zp, qmin, qmax, 0.3, grouped)
    (y * grad_out).sum().backward()
    grads = [None if t.grad is None else t.grad.clone() for t in (w0, a, b, step)]
    return y.detach().clone(), grads


@pytest.fixture(params=["eager", "always"])
def compile_mode(request):
    with fused_compile(request.param):
        yield request.param
    clear_workspace()


@pytest.mark.parametrize("shape,grouped,symmetric,scaling", CASES)
@pytest.mark.parametrize("w0_grad", [False, True])
def test_fused_matches_the_reference_composition(compile_mode, shape, grouped, symmetric, scaling, w0_grad):
    tensors = make(shape, grouped, symmetric, w0_grad=w0_grad)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    y_ref, g_ref = run(reference, tensors, scaling, grouped, grad_out)
    # Both regions are present: some elements clip, most do not.
    v = (tensors[0] + (tensors[2] @ tensors[1].reshape(4, -1)).reshape(shape) * scaling).reshape(grouped)
    zp = 0 if tensors[4] is None else tensors[4]
    codes = torch.round(v / tensors[3]) + zp
    assert bool(((codes < tensors[5]) | (codes > tensors[6])).any()) and bool(
        ((codes >= tensors[5]) & (codes <= tensors[6])).any()
    )
    for _ in range(2):  # the second call runs on reused buffers
        y, g = run(fake_quantize_lora_merged, tensors, scaling, grouped, grad_out)
        assert torch.equal(y, y_ref)
        for name, got, want in zip(("w0", "a", "b"), g[:3], g_ref[:3]):
            if want is None:
                assert got is None, name
            else:
                assert torch.equal(got, want), name
        tol = 1e-6 * float(g_ref[3].abs().max())
        if compile_mode == "eager":
            assert torch.equal(g[3], g_ref[3])
        torch.testing.assert_close(g[3], g_ref[3], rtol=1e-5, atol=tol)


def test_buffers_are_reused_between_steps_and_a_stale_graph_fails_loudly():
    clear_workspace()
    tensors = make((32, 16), (32, 1, 16), True)
    grad_out = torch.ones(32, 16)
    run(fake_quantize_lora_merged, tensors, 1.0, (32, 1, 16), grad_out)
    held = WORKSPACE.nbytes()
    assert held >= 32 * 16 * (4 + 4)  # x_hat and d x_hat / d s went back to the pool
    run(fake_quantize_lora_merged, tensors, 1.0, (32, 1, 16), grad_out)
    assert WORKSPACE.nbytes() == held  # the second step took them and gave them back: nothing new allocated
    # A graph kept alive past its backward (retain_graph) must not silently read buffers reused since.
    w0, a, b, step, zp, qmin, qmax = tensors
    y = fake_quantize_lora_merged(w0, a, b, 1.0, step, zp, qmin, qmax, 1.0, (32, 1, 16))
    loss = (y * grad_out).sum()
    loss.backward(retain_graph=True)
    run(fake_quantize_lora_merged, tensors, 1.0, (32, 1, 16), grad_out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    clear_workspace()
    assert WORKSPACE.nbytes() == 0


def test_no_grad_gives_the_reference_values():
    tensors = make((16, 12), (16, 3, 4), False)
    w0, a, b, step, zp, qmin, qmax = tensors
    with torch.no_grad():
        got = fake_quantize_lora_merged(w0, a, b, 0.5, step, zp, qmin, qmax, 1.0, (16, 3, 4))
        want = reference(w0, a, b, 0.5, step, zp, qmin, qmax, 1.0, (16, 3, 4))
    assert torch.equal(got, want)


def test_a_trained_zero_point_is_refused():
    w0, a, b, step, zp, qmin, qmax = make((16, 12), (16, 3, 4), False)
    with pytest.raises(ValueError, match="zero point"):
        fake_quantize_lora_merged(w0, a, b, 1.0, step, zp.requires_grad_(), qmin, qmax, 1.0, (16, 3, 4))


def test_bad_compile_mode():
    with pytest.raises(ValueError, match="must be one of"):
        set_fused_compile("sometimes")


def test_auto_mode_takes_the_fused_path_for_sd_scale_cpu_weights_only():
    from diffusers_qalora.quant.primitives import COMPILE_MIN_NUMEL, fused_path_enabled

    previous = set_fused_compile("auto")
    try:
        cpu = torch.device("cpu")
        assert fused_path_enabled(COMPILE_MIN_NUMEL, cpu)
        assert not fused_path_enabled(COMPILE_MIN_NUMEL - 1, cpu)
        assert not fused_path_enabled(COMPILE_MIN_NUMEL, torch.device("cuda"))  # the Triton kernel's place
        set_fused_compile("never")
        assert not fused_path_enabled(COMPILE_MIN_NUMEL, cpu)
        set_fused_compile("eager")
        assert fused_path_enabled(1, cpu)
    finally:
        set_fused_compile(previous)


@pytest.mark.parametrize("layer_op", [False, True])
def test_under_gradient_checkpointing_the_first_forward_passes_buffers_come_back(layer_op):
    # Checkpointing drops what the first forward pass saved, unread; its pooled buffers must come back to the pool
    # (not be freed), so that the recomputed forward pass and every later step reuse the same buffers.
    from torch.utils.checkpoint import checkpoint

    from diffusers_qalora.quant import qalora_linear

    clear_workspace()
    w0, a, b, step, zp, qmin, qmax = make((32, 16), (32, 1, 16), True)
    x = torch.randn(4, 16)

    def layer(x, a, b, step):
        if layer_op:
            return qalora_linear(x, w0, a, b, 1.0, step, zp, qmin, qmax, 1.0, (32, 1, 16))
        return F.linear(x, fake_quantize_lora_merged(w0, a, b, 1.0, step, zp, qmin, qmax, 1.0, (32, 1, 16)))

    def pooled():
        return {id(t) for stack in WORKSPACE._free.values() for t in stack}

    seen = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, step)]
        checkpoint(layer, *leaves, use_reentrant=False).square().sum().backward()
        seen.append(pooled())
    assert seen[0] and seen[0] == seen[1] == seen[2]
    clear_workspace()


@pytest.mark.parametrize("layer_op", [False, True])
def test_a_buffer_saved_for_backward_is_not_lent_again(layer_op):
    # The pool takes a buffer back when its alias dies: one saved for a pending backward pass must stay lent, even with
    # more forward passes of the same shape in between (they would otherwise overwrite it).
    from diffusers_qalora.quant import qalora_linear

    clear_workspace()
    w0, _, _, step, zp, qmin, qmax = make((32, 16), (32, 1, 16), True)

    def leaves(seed):
        gen = torch.Generator().manual_seed(seed)
        x, a, b = (
            torch.randn(4, 16, generator=gen),
            torch.randn(4, 16, generator=gen),
            torch.randn(32, 4, generator=gen),
        )
        return [t.detach().clone().requires_grad_() for t in (x, a * 0.2, b * 0.2, step)]

    def forward(leaf):
        x, a, b, s = leaf
        if layer_op:
            return qalora_linear(x, w0, a, b, 1.0, s, zp, qmin, qmax, 1.0, (32, 1, 16))
        return F.linear(x, fake_quantize_lora_merged(w0, a, b, 1.0, s, zp, qmin, qmax, 1.0, (32, 1, 16)))

    want = []
    for seed in (1, 2):
        leaf = leaves(seed)
        forward(leaf).square().sum().backward()
        want.append([t.grad for t in leaf])
    first, second = leaves(1), leaves(2)
    pending = [forward(first), forward(second)]
    forward(leaves(3))  # a third forward pass, dropped: its buffers come back to the pool at once
    for y in pending:
        y.square().sum().backward()
    for leaf, grads in zip((first, second), want):
        for t, g in zip(leaf, grads):
            assert torch.equal(t.grad, g)
    clear_workspace()
