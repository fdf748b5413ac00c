"""The quantized attention kernel (Triton, run by the interpreter on CPU) against its torch reference, and the
reference against independent computations (diffusers_qalora.quant's fake quantizer, explicit softmax, SDPA).

Tolerances: the codes are equal by construction (same division, same rounding), so fp32 outputs agree to float
accumulation order (atol 2e-5 on outputs of size ~1); fp16/bf16 outputs to their own rounding (the kernel feeds the
unquantized softmax to the P @ V product in the input dtype, as flash attention does).  With a quantized softmax, a
probability within an ulp of a rounding boundary may take the neighbouring code: at most one element in 200 may then
differ, by at most one softmax step times max |v|.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_qalora.kernels.attention import (
    QuantSpec,
    attention_codes_reference,
    attention_codes_triton,
    quantized_attention,
    quantized_attention_reference,
    quantized_attention_triton,
)
from diffusers_qalora.quant import fake_quantize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(b, h, nq, nk, d, dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, dv, generator=g) * 2
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _spec(b, kind, device, bits=8, seed=0):
    """Per-sample steps that differ between samples; ``kind``: "asym" (unsigned + zero point), "sym", "probs"."""
    g = torch.Generator().manual_seed(100 + seed)
    if kind == "probs":
        step = (1.0 / (2**bits - 1)) * (1 + torch.rand(b, generator=g))
        return QuantSpec(step.to(device), torch.zeros(b).to(device), 0, 2**bits - 1)
    step = (0.02 + 0.03 * torch.rand(b, generator=g)).to(device)
    if kind == "sym":
        return QuantSpec(step, None, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    zp = torch.randint(2 ** (bits - 1) - 10, 2 ** (bits - 1) + 10, (b,), generator=g).float().to(device)
    return QuantSpec(step, zp, 0, 2**bits - 1)


SHAPES = [  # (B, H, N_q, N_k, D, D_v): single element, lengths that do not divide the (at most 64-wide) blocks, 2 query
    # and 2 key blocks, head dims 8..40
    (1, 1, 1, 1, 8, 8),
    (2, 3, 37, 45, 40, 40),
    (1, 2, 70, 100, 16, 8),
    (2, 1, 5, 64, 24, 40),
]
QUANTS = {
    "none": {},
    "qkv_asym": {"query_quant": "asym", "key_quant": "asym", "value_quant": "asym"},
    "qkv_sym_4bit": {"query_quant": ("sym", 4), "key_quant": ("sym", 4), "value_quant": ("sym", 4)},
    "q_only": {"query_quant": "asym"},
    "qkvp": {"query_quant": "asym", "key_quant": "sym", "value_quant": "asym", "probs_quant": "probs"},
}


def _build(quant: dict, b: int, device) -> dict:
    out = {}
    for i, (name, kind) in enumerate(quant.items()):
        kind, bits = (kind, 8) if isinstance(kind, str) else kind
        out[name] = _spec(b, kind, device, bits, seed=i)
    return out


def _compare(got, want, quant, specs, v):
    if "probs_quant" in quant:
        # a probability within an ulp of a code boundary may round the other way: rare, and bounded by one step
        bound = float(specs["probs_quant"].step.max()) * float(v.float().abs().max()) * 1.01 + 1e-5
        diff = (got.float() - want.float()).abs()
        assert float(diff.max()) <= bound
        assert float((diff > 1e-4).float().mean()) <= 1 / 200
    elif got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    elif got.dtype == torch.float16:
        torch.testing.assert_close(got, want, atol=4e-3, rtol=4e-3)
    else:
        torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant", sorted(QUANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(device, shape, quant, dtype):
    b, h, nq, nk, d, dv = shape
    q, k, v = _inputs(*shape, dtype, device)
    specs = _build(QUANTS[quant], b, device)
    mask = None
    if quant == "qkvp":  # a broadcast additive mask, per sample and key, as diffusers' cross-attention passes it
        mask = (torch.randn(b, 1, 1, nk, generator=torch.Generator().manual_seed(3)) * 2).to(device, dtype)
    got = quantized_attention_triton(q, k, v, attn_mask=mask, scale=0.3, **specs)
    want = quantized_attention_reference(q, k, v, attn_mask=mask, scale=0.3, **specs)
    assert got.shape == (b, h, nq, dv) and got.dtype == dtype
    _compare(got, want, QUANTS[quant], specs, v)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_bf16_and_bool_mask(device):
    b, h, nq, nk, d, dv = 2, 2, 19, 21, 16, 16
    q, k, v = _inputs(b, h, nq, nk, d, dv, torch.bfloat16, device, seed=4)
    specs = _build(QUANTS["qkv_asym"], b, device)
    mask = torch.rand(b, 1, nq, nk, generator=torch.Generator().manual_seed(5)) > 0.3
    mask[..., 0] = True  # no fully masked row (softmax of nothing is NaN in both paths)
    mask = mask.to(device)
    got = quantized_attention_triton(q, k, v, attn_mask=mask, **specs)
    want = quantized_attention_reference(q, k, v, attn_mask=mask, **specs)
    _compare(got, want, {}, specs, v)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """diffusers hands the heads over as ``view(B, N, H, D).transpose(1, 2)``: non-contiguous, strides honoured."""
    b, n, h, d = 2, 23, 3, 8
    g = torch.Generator().manual_seed(6)
    flat = [torch.randn(b, n, h * d, generator=g).to(device) for _ in range(3)]
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in flat)
    assert not q.is_contiguous()
    specs = _build(QUANTS["qkvp"], b, device)
    got = quantized_attention_triton(q, k, v, **specs)
    want = quantized_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), **specs)
    _compare(got, want, QUANTS["qkvp"], specs, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 2, 5, 5, 8, 8), (2, 2, 0, 5, 8, 8), (2, 2, 5, 0, 8, 8), (1, 0, 3, 3, 8, 8)])
def test_zero_size(device, shape):
    q, k, v = _inputs(*shape, torch.float32, device)
    specs = _build(QUANTS["qkvp"], shape[0], device)
    got = quantized_attention_triton(q, k, v, **specs)
    want = quantized_attention_reference(q, k, v, **specs)
    assert got.shape == want.shape == (*shape[:3], shape[5])
    assert torch.equal(got, want)
    assert not got.abs().gt(0).any()  # no key: an empty sum


def test_empty_head_dim_routes_to_the_reference():
    """With D = 0 every score is 0: the output is the mean of the (quantized) values, whatever the backend."""
    q, k, v = _inputs(2, 1, 3, 4, 0, 8, torch.float32, "cpu")
    specs = _build(QUANTS["qkv_asym"], 2, "cpu")
    got = quantized_attention(q, k, v, kernel_preference="triton", **specs)
    v_hat = attention_codes_reference(v, specs["value_quant"]) * specs["value_quant"].step.view(-1, 1, 1, 1)
    torch.testing.assert_close(got, v_hat.mean(dim=2, keepdim=True).expand_as(got), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["asym", "sym"])
def test_codes_kernel_is_exact(device, dtype, kind):
    b, h, n, d = 3, 2, 17, 40
    spec = _spec(b, kind, device)
    x = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(7)).to(device) * 3
    # exact ties: x / s = k + 0.5 must round half to even, as torch.round does
    x[:, 0, 0, :20] = (torch.arange(-10, 10).to(device) + 0.5) * spec.step[:, None]
    x = x.to(dtype)
    got = attention_codes_triton(x.transpose(2, 3).contiguous().transpose(2, 3), spec)
    want = attention_codes_reference(x, spec)
    assert got.dtype == torch.float16
    assert torch.equal(got.float(), want)


def _independent(q, k, v, specs, mask, scale):
    """Fake quantization with `diffusers_qalora.quant.fake_quantize` per sample, then explicit softmax attention."""
    b = q.shape[0]

    def fq(x, spec):
        if spec is None:
            return x.float()
        out = []
        for i in range(b):
            zp = None if spec.zero_point is None else spec.zero_point[i]
            out.append(fake_quantize(x[i : i + 1].float(), spec.step[i], zp, spec.qmin, spec.qmax))
        return torch.cat(out)

    qh, kh, vh = fq(q, specs.get("query_quant")), fq(k, specs.get("key_quant")), fq(v, specs.get("value_quant"))
    scores = qh @ kh.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.float()
    probs = fq(scores.softmax(-1), specs.get("probs_quant"))
    return (probs @ vh).to(q.dtype)


@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_reference_matches_independent_computation(quant):
    b, h, nq, nk, d, dv = 2, 2, 9, 13, 8, 8
    q, k, v = _inputs(b, h, nq, nk, d, dv, torch.float32, "cpu", seed=8)
    specs = _build(QUANTS[quant], b, "cpu")
    mask = torch.randn(b, 1, nq, nk, generator=torch.Generator().manual_seed(9))
    got = quantized_attention_reference(q, k, v, attn_mask=mask, scale=0.5, **specs)
    want = _independent(q, k, v, specs, mask, 0.5)
    _compare(got, want, QUANTS[quant], specs, v)
    if quant == "none":
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
        torch.testing.assert_close(got, sdpa, atol=1e-6, rtol=1e-6)


def test_quantization_changes_the_result():
    """The comparisons above are not vacuous: 4-bit q/k/v move the output far from the float attention."""
    q, k, v = _inputs(2, 2, 16, 16, 8, 8, torch.float32, "cpu", seed=10)
    specs = {n: QuantSpec(torch.tensor([0.4, 0.5]), None, -8, 7) for n in ("query_quant", "key_quant", "value_quant")}
    quantized = quantized_attention_reference(q, k, v, **specs)
    assert (quantized - F.scaled_dot_product_attention(q, k, v)).abs().max() > 0.05


def test_dispatch_and_default_scale():
    q, k, v = _inputs(1, 1, 7, 9, 16, 16, torch.float32, "cpu", seed=11)
    specs = _build(QUANTS["qkv_asym"], 1, "cpu")
    torch_out = quantized_attention(q, k, v, kernel_preference="torch", **specs)
    triton_out = quantized_attention(
        q, k, v, kernel_preference="triton", **specs
    )  # the interpreter (tests/kernels/conftest.py)
    torch.testing.assert_close(triton_out, torch_out, atol=2e-5, rtol=1e-5)
    assert torch.equal(torch_out, quantized_attention_reference(q, k, v, scale=1 / math.sqrt(16), **specs))
    f64 = quantized_attention(
        q.double(), k.double(), v.double(), kernel_preference="triton", **specs
    )  # float64: reference
    torch.testing.assert_close(f64.float(), torch_out, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _inputs(2, 1, 4, 4, 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="query_quant.step"):
        quantized_attention_reference(q, k, v, query_quant=QuantSpec(torch.ones(3), None, -128, 127))
    with pytest.raises(ValueError, match="qmin < qmax"):
        quantized_attention_reference(q, k, v, key_quant=QuantSpec(torch.ones(2), None, 5, 5))
    with pytest.raises(ValueError, match="positive"):
        quantized_attention_reference(q, k, v, value_quant=QuantSpec(torch.zeros(2), None, -128, 127))
    with pytest.raises(ValueError, match="head_dim"):
        quantized_attention_triton(q, k[..., :4], v)
    with pytest.raises(ValueError, match="attn_mask"):
        quantized_attention_triton(q, k, v, attn_mask=torch.zeros(3, 1, 4, 4))
    with pytest.raises(TypeError, match="QuantSpec"):
        quantized_attention_reference(q, k, v, probs_quant=(torch.ones(2), None, 0, 255))
    with pytest.raises(ValueError, match="8 bits"):
        quantized_attention_reference(q, k, v, probs_quant=QuantSpec(torch.ones(2), None, 0, 1023))
