"""The fused fake-quant kernels (run by the Triton interpreter on CPU) against the torch reference
(`diffusers_qalora.quant.fake_quantize`), and training through them against training through the torch path.

Tolerances: the forward output and the input gradient are bit-identical (same division, rounding and
multiplication per element).  The step-size and zero-point gradients are sums over many elements, which the kernel
adds in another order (block sums, then a sum over blocks): they agree to ``1e-5`` of the sum of the absolute terms.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import diffusers_qalora as dq  # noqa: E402
from diffusers_qalora.kernels import (  # noqa: E402
    fake_quantize_by_index,
    fake_quantize_reference,
    fused_fake_quantize,
)
from diffusers_qalora.kernels.fake_quant import param_layout  # noqa: E402
from diffusers_qalora.quant import TemporalActQuantizer, TimestepContext, WeightQuantizer  # noqa: E402
from diffusers_qalora.quant.granularity import PerGroup  # noqa: E402

# (name, x shape, step shape): every granularity the quantizers produce, plus per-channel in the middle of a tensor.
GRANULARITIES = [
    ("tensor", (3, 5, 7), ()),
    ("channel (grouped weight view)", (6, 1, 37), (6, 1, 1)),
    ("group", (5, 3, 12), (5, 3, 1)),
    ("timestep (per sample)", (3, 4, 5, 5), (3, 1, 1, 1)),
    ("channel of an activation", (2, 6, 3, 3), (1, 6, 1, 1)),
]


def _case(x_shape, step_shape, asymmetric, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(x_shape, generator=g) * 3).to(dtype)
    step = 0.2 + torch.rand(step_shape, generator=g)
    if asymmetric:
        zp = torch.randint(0, 9, step_shape, generator=g).float() + 0.3  # rounded in the forward pass
        return x, step, zp, 0, 15
    return x, step, None, -8, 7


def _grads(fn, x, step, zp, qmin, qmax, grad_scale, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, step) + ((zp,) if zp is not None else ())]
    out = fn(leaves[0], leaves[1], leaves[2] if zp is not None else None, qmin, qmax, grad_scale)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def _sum_abs_terms(x, step, zp, qmin, qmax, grad_out):
    """Scale of the step / zero-point gradient sums: sum |d x_hat / d s * grad| over the elements (upper bound)."""
    v = x.float() / step
    z = 0 if zp is None else torch.round(zp)
    c = torch.clamp(torch.round(v), qmin - z, qmax - z)
    return float(((c - v).abs() + c.abs() + step).mul(grad_out.float().abs()).sum()) + 1e-6


@pytest.mark.parametrize("name, x_shape, step_shape", GRANULARITIES, ids=[g[0] for g in GRANULARITIES])
@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_matches_the_torch_reference(name, x_shape, step_shape, asymmetric, dtype):
    x, step, zp, qmin, qmax = _case(x_shape, step_shape, asymmetric, dtype)
    grad_out = torch.randn(x_shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out_k, grads_k = _grads(fused_fake_quantize, x, step, zp, qmin, qmax, 0.25, grad_out)
    out_r, grads_r = _grads(fake_quantize_reference, x, step, zp, qmin, qmax, 0.25, grad_out)
    assert out_k.dtype == dtype and out_k.shape == x.shape
    assert torch.equal(out_k, out_r)
    assert torch.equal(grads_k[0], grads_r[0])  # straight-through input gradient, exact
    bound = 1e-5 * _sum_abs_terms(x, step, zp, qmin, qmax, grad_out)
    for gk, gr in zip(grads_k[1:], grads_r[1:]):
        assert gk.shape == gr.shape
        torch.testing.assert_close(gk, gr, rtol=0, atol=bound)
    # Both the clipping range and its outside are exercised (otherwise the LSQ branches are untested).
    codes = torch.round(x.float() / step) + (0 if zp is None else torch.round(zp))
    clipped = (codes < qmin) | (codes > qmax)
    assert clipped.any() and not clipped.all()


def test_independent_formulas_half_even_ties_and_clipping():
    """Against the LSQ formulas written out here: ties round to even, both clip sides, zero point only outside."""
    step = torch.tensor(0.5, requires_grad=True)
    zp = torch.tensor(2.0, requires_grad=True)
    x = torch.tensor([-10.0, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 3.3, 10.0], requires_grad=True)
    out = fused_fake_quantize(x, step, zp, 0, 7)  # codes in [0 - 2, 7 - 2] = [-2, 5]
    # x / s = -20, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 6.6, 20 -> round half even -2, -2, 0, 0, 2, 2, 7, 20 -> clamp
    codes = torch.tensor([-2.0, -2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 5.0, 5.0])
    assert torch.equal(out.detach(), codes * 0.5)
    out.backward(torch.ones_like(out))
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 0.0])
    assert torch.equal(x.grad, inside)
    v = x.detach() / 0.5
    expected_step = torch.where(inside.bool(), torch.round(v) - v, codes).sum()
    torch.testing.assert_close(step.grad, expected_step, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zp.grad, torch.tensor(-0.5 * 3), rtol=0, atol=0)


@pytest.mark.parametrize("numel", [0, 1, 9001], ids=["empty", "single", "several-blocks"])
def test_edges_zero_size_single_element_and_blocks(numel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(numel, generator=g) * 4
    step = torch.tensor(0.3)
    zp = torch.tensor(7.0)
    out_k, grads_k = _grads(fused_fake_quantize, x, step, zp, 0, 15, 1.0, torch.ones_like(x))
    out_r, grads_r = _grads(fake_quantize_reference, x, step, zp, 0, 15, 1.0, torch.ones_like(x))
    assert torch.equal(out_k, out_r) and torch.equal(grads_k[0], grads_r[0])
    bound = 1e-5 * _sum_abs_terms(x, step, zp, 0, 15, torch.ones_like(x))
    for gk, gr in zip(grads_k[1:], grads_r[1:]):
        torch.testing.assert_close(gk, gr, rtol=0, atol=bound)


def test_inference_path_and_layouts_the_kernel_does_not_cover():
    x, step, zp, qmin, qmax = _case((4, 3, 5), (4, 3, 1), True, torch.float32)
    with torch.no_grad():
        assert torch.equal(
            fused_fake_quantize(x, step, zp, qmin, qmax), fake_quantize_reference(x, step, zp, qmin, qmax)
        )
    # Step dims that are not adjacent in x: the torch reference runs (same numbers by construction).
    assert param_layout((4, 3, 5), (4, 1, 5)) is None
    step2 = 0.2 + torch.rand(4, 1, 5)
    assert torch.equal(fused_fake_quantize(x, step2, None, -8, 7), fake_quantize_reference(x, step2, None, -8, 7))
    assert param_layout((2, 3), ()) == (1, 6) and param_layout((2, 3, 4), (3, 1)) == (3, 4)
    assert param_layout((2, 3), (1, 1, 3)) == (3, 1) and param_layout((2, 3), (2, 2, 3)) is None


def test_by_index_gathers_each_samples_step_from_the_table():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 4, generator=g) * 2
    table = torch.tensor([0.05, 0.1, 0.2, 0.4])
    zps = torch.tensor([100.0, 120.0, 128.0, 140.0])
    index = torch.tensor([3, 1, 3, 0, 1])  # entry 2 unused
    grad_out = torch.randn(x.shape, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, table, zps)]
    out = fake_quantize_by_index(leaves[0], leaves[1], leaves[2], index, 0, 255, 0.5)
    out.backward(grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (x, table, zps)]
    view = (-1, 1, 1, 1)
    ref = fake_quantize_reference(
        ref_leaves[0], ref_leaves[1][index].view(view), ref_leaves[2][index].view(view), 0, 255, 0.5
    )
    ref.backward(grad_out)
    assert torch.equal(out, ref) and torch.equal(leaves[0].grad, ref_leaves[0].grad)
    for got, want in zip(leaves[1:], ref_leaves[1:]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
        assert got.grad[2] == 0  # no sample used entry 2
    with pytest.raises(ValueError, match="one table position per sample"):
        fake_quantize_by_index(x, table, zps, index[:3], 0, 255)
    with pytest.raises(IndexError, match="must lie in"):
        fake_quantize_by_index(x, table, zps, torch.tensor([0, 1, 2, 3, 4]), 0, 255)


# -- the quantizer modules through the dispatch ---------------------------------------------------------------------
def _weight_run(backend: str, granularity=None):
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    wq = WeightQuantizer(w.shape, bits=4, granularity=granularity, lsq_grad_scale=True)
    wq.initialize_(w, "minmax")
    w = w.requires_grad_()
    dq.set_kernel_preference(wq, backend)
    out = wq(w)
    out.pow(2).sum().backward()
    return out.detach(), w.grad, wq.step.grad


@pytest.mark.parametrize("granularity", [None, PerGroup(4)], ids=["channel", "group"])
def test_weight_quantizer_runs_the_kernel_with_the_same_numbers(granularity):
    out_t, gx_t, gs_t = _weight_run("torch", granularity)
    out_k, gx_k, gs_k = _weight_run("triton", granularity)
    assert torch.equal(out_k, out_t) and torch.equal(gx_k, gx_t)
    torch.testing.assert_close(gs_k, gs_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("timesteps", [[500.0], [100.0, 500.0, 900.0, 250.0]], ids=["one", "mixed"])
def test_temporal_quantizer_runs_the_kernel_with_the_same_numbers(dtype, timesteps):
    def run(backend):
        aq = TemporalActQuantizer([0.0, 500.0, 1000.0], bits=8)
        aq.step.fill_(torch.tensor([0.02, 0.05, 0.08]))
        aq.zero_point.fill_(torch.tensor([100.0, 128.0, 140.0]))
        aq.calibrated.fill_(True)
        aq.context = TimestepContext()
        aq.context.set(torch.tensor(timesteps))
        x = (torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(3)) * 4).to(dtype).requires_grad_()
        dq.set_kernel_preference(aq, backend)
        out = aq(x)
        (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        params = [p.grad for p in list(aq.step.values) + list(aq.zero_point.values)]
        return out.detach(), x.grad, params

    out_t, gx_t, gp_t = run("torch")
    out_k, gx_k, gp_k = run("triton")
    assert out_k.dtype == dtype
    assert torch.equal(out_k, out_t) and torch.equal(gx_k, gx_t)
    for a, b in zip(gp_k, gp_t):
        assert (a is None) == (b is None)  # entries no sample used get no gradient on either path
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- training through the kernels gives the same adapter ------------------------------------------------------------
TABLE = [1.0, 334.0, 667.0, 999.0]


def _tiny_qalora_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=4,
        norm_num_groups=4,
        attention_head_dim=8,
    )
    # The convolutions and attention projections of the down path plus the output conv (the interpreter runs about
    # 30 kernels per layer and step, so the whole UNet would take minutes).
    targets = [
        "conv_in",
        "conv_out",
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.0.resnets.0.conv2",
        "down_blocks.1.resnets.0.conv1",
        "down_blocks.1.attentions.0.to_q",
        "down_blocks.1.attentions.0.to_v",
    ]
    model = dq.get_qalora_model(
        unet,
        dq.QALoraConfig(
            r=2,
            weight_bits=4,
            act_bits=4,
            timesteps=TABLE,
            target_modules=targets,
            weight_init="minmax",
            act_init="minmax",
            init_weights=False,
        ),
    )
    gen = torch.Generator().manual_seed(1)
    dq.calibrate_activations(
        model, lambda: [model(torch.randn(2, 1, 8, 8, generator=gen), t, class_labels=torch.arange(2)) for t in TABLE]
    )
    return model


def _distill(backend: str, steps: int = 2) -> dict[str, torch.Tensor]:
    """A few data-free distillation steps (student vs its own full-precision teacher, SUM-MSE, the project's
    scale-aware parameter groups), with the quantizers forced to ``backend``.  Plain SGD: an update proportional to
    the gradient shows any gradient difference (Adam's normalised first steps would hide a wrong scale)."""
    model = _tiny_qalora_unet()
    groups = dq.get_qalora_param_groups(model, lora_lr=1e-1, weight_step_lr=1e-4, act_step_lr=1e-4)
    optimizer = torch.optim.SGD(groups.param_groups)
    gen = torch.Generator().manual_seed(2)
    dq.set_kernel_preference(model, backend)
    for i in range(steps):
        x = torch.randn(2, 1, 8, 8, generator=gen)
        t = torch.tensor([TABLE[3 - i], TABLE[i]])  # a batch of mixed timesteps
        labels = torch.tensor([i % 4, (i + 1) % 4])
        with torch.no_grad(), dq.adapters_disabled(model):
            target = model(x, t, class_labels=labels).sample
        loss = (model(x, t, class_labels=labels).sample - target).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".qal_" in n}


def test_training_through_the_kernels_gives_the_same_adapter():
    before = {n: p.detach().clone() for n, p in _tiny_qalora_unet().named_parameters() if ".qal_" in n}
    torch_adapter = _distill("torch")
    kernel_adapter = _distill("triton")
    assert torch_adapter.keys() == kernel_adapter.keys()
    assert max(float((torch_adapter[n] - before[n]).abs().max()) for n in before) > 1e-2, "the adapter did not move"
    for name in torch_adapter:
        moved = float((torch_adapter[name] - before[name]).abs().max())
        diff = float((kernel_adapter[name] - torch_adapter[name]).abs().max())
        # Only the step-size gradients are summed in another order (relative error ~1e-7 of the sum).
        assert diff <= 1e-4 * moved + 1e-8, (name, diff, moved)
