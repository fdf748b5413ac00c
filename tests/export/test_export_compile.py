"""Integer layers under ``torch.compile``: the traced path (activation quantization as tensor operations, the product
as the ``diffusers_qalora::integer_product`` custom op) against the int64 oracle, whole exported models against their
eager run, one product per layer for any batch of timesteps, and the guards."""

from __future__ import annotations

import pytest
import torch
from export_fixtures import make_sd15_unet, make_unet2d, qalora, sd15_inputs, unet2d_inputs
from test_export_layers import _int_oracle, _layer, _x, needs_onednn
from tiny_models import relative_error

import diffusers_qalora as dq
from diffusers_qalora.export import integer_layers
from diffusers_qalora.export.compiled import integer_product, layer_key
from diffusers_qalora.export.modules import IntegerLayer
from diffusers_qalora.quant import set_kernel_preference

pytestmark = needs_onednn

# The traced routes: differing zero points (conv: codes padded with each sample's zero point), one shared zero point
# (signed codes; one table entry), weight groups, a stride and a reflect padding; and one without a traced route (4-bit
# codes cannot hold these zero points: the padding has no code), which runs the eager layer inside the graph.
CASES = [
    ("linear", {}, True),
    ("linear", {"signed": True, "bias": False}, True),
    ("conv2d", {}, True),
    ("conv2d", {"weight_bits": 8, "act_bits": 8, "num_timesteps": 1}, True),
    ("conv2d", {"group_size": 8, "conv_kwargs": {"stride": 2}}, True),
    ("conv2d", {"conv_kwargs": {"padding_mode": "reflect"}, "signed": True}, True),
    ("conv2d", {"act_bits": 4}, False),
]
SHARED = torch.tensor([300.0])
MIXED = torch.tensor([999.0, 10.0, 999.0, 640.0])


def _record_calls(monkeypatch, method: str) -> list[str]:
    """The names of the integer layers whose ``method`` runs, in call order (for the test's duration)."""
    calls = []
    original = getattr(IntegerLayer, method)

    def recording(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IntegerLayer, method, recording)
    return calls


def _compiled(module, **kwargs):
    torch.compiler.reset()
    return torch.compile(module, dynamic=False, **kwargs)


@pytest.mark.parametrize("kind, kwargs, traced", CASES)
def test_compiled_layer_matches_the_int64_oracle(kind, kwargs, traced):
    """One graph (``fullgraph``) where the layer has a traced route; the oracle of every sample at its own timestep,
    shared or mixed; the default rounding (``x * (1 / s)``) at most one code from the exact one, which does not show at
    this tolerance here."""
    layer, codes, w_scale, b, context = _layer(kind, **kwargs)
    assert (layer._compiled_route("cpu") is not None) == traced
    compiled = _compiled(layer, fullgraph=traced)
    x = _x(kind, batch=4)
    for timesteps in (SHARED, MIXED, MIXED - 0.25):
        context.set(timesteps)
        per_sample = timesteps.expand(4) if timesteps.numel() == 1 else timesteps
        expected = torch.cat(
            [_int_oracle(layer, codes, w_scale, b, x[i : i + 1], float(t)) for i, t in enumerate(per_sample)]
        )
        tol = {"rtol": 1e-5, "atol": 2e-6 * float(expected.abs().max())}
        for exact in (True, False):
            layer.exact_activation_rounding = exact  # a guarded attribute: the graph is traced again
            with torch.no_grad():
                got = compiled(x)
            assert got.shape == expected.shape and got.dtype == x.dtype
            torch.testing.assert_close(got.double(), expected, **tol)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("linear", {}),
        ("linear", {"signed": True}),
        ("conv2d", {}),
        ("conv2d", {"signed": True}),
        ("conv2d", {"conv_kwargs": {"stride": 2}, "bias": False}),
    ],
)
def test_a_batch_at_one_step_size_skips_the_epilogue(kind, kwargs, monkeypatch):
    """A batch whose samples share their step size and zero point (one timestep, or timesteps at the same table
    entry) is dequantized in oneDNN's own output stage, without the per-row epilogue's pass, whether the table's zero
    points differ (unsigned codes; a convolution's codes then come padded with the zero point) or not (signed);
    samples at different step sizes take the epilogue.  Both match the int64 oracle."""
    layer, codes, w_scale, b, context = _layer(kind, **kwargs)
    assert (layer._shared_zero_point() is None) != kwargs.get("signed", False)
    epilogues = _record_calls(monkeypatch, "_per_sample_epilogue")
    compiled = _compiled(layer, fullgraph=True)
    x = _x(kind, batch=4)
    for timesteps, runs_epilogue in ((SHARED, False), (torch.tensor([300.0] * 4), False), (MIXED, True)):
        context.set(timesteps)
        per_sample = timesteps.expand(4) if timesteps.numel() == 1 else timesteps
        expected = torch.cat(
            [_int_oracle(layer, codes, w_scale, b, x[i : i + 1], float(t)) for i, t in enumerate(per_sample)]
        )
        epilogues.clear()
        with torch.no_grad():
            got = compiled(x)
        assert bool(epilogues) == runs_epilogue
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6 * float(expected.abs().max()))


def test_batch_qparams_need_one_step_and_one_zero_point():
    """The oneDNN output-stage route needs every sample at the same step size *and* zero point, and one weight pack."""
    layer, *_ = _layer("linear")
    s = torch.full((4,), 0.0123)
    z = torch.tensor([3.0, 3.0, 3.0, 3.0])
    assert layer._batch_qparams(s, s * z, None, 1) == (float(s[0]), 3)
    assert layer._batch_qparams(s, s * z, 128, 1) == (float(s[0]), 128)  # the table's common zero point
    assert layer._batch_qparams(s, s * torch.tensor([3.0, 3.0, 4.0, 3.0]), None, 1) is None
    assert layer._batch_qparams(s * torch.tensor([1.0, 1.0, 1.0, 2.0]), s * z, 128, 1) is None
    assert layer._batch_qparams(s, s * z, None, 2) is None  # weight groups: one call per pack, summed
    assert layer._batch_qparams(s, s * 300.0, None, 1) is None  # not a uint8 zero point


def test_a_new_process_numbering_layers_alike_does_not_reuse_another_layers_graph(monkeypatch):
    """Layer keys are graph constants, so they enter Inductor's on-disk cache key; the op's output shape comes from the
    layer the key names.  A later process numbers its layers from the same counter: here the counter restarts, and a
    stride-2 convolution gets the number a stride-1 convolution's compiled graph was cached under.  The key's geometry
    keeps the two graphs apart (a counter alone made the second run assert the first layer's output shape)."""
    import itertools

    from diffusers_qalora.export import compiled as compiled_module

    x = _x("conv2d", batch=4)
    for conv_kwargs in ({}, {"stride": 2}):
        monkeypatch.setattr(compiled_module, "_KEYS", itertools.count(10_000))
        layer, codes, w_scale, b, context = _layer("conv2d", conv_kwargs=conv_kwargs)
        context.set(MIXED)
        expected = torch.cat(
            [_int_oracle(layer, codes, w_scale, b, x[i : i + 1], float(t)) for i, t in enumerate(MIXED)]
        )
        with torch.no_grad():
            got = _compiled(layer, fullgraph=True)(x)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6 * float(expected.abs().max()))
        del layer


def test_the_custom_op_passes_opcheck():
    """The fake (meta) implementation agrees with the real one: shapes, strides, dtype (what the compiler relies on)."""
    for kind, kwargs in (("conv2d", {}), ("conv2d", {"conv_kwargs": {"stride": 2}}), ("linear", {})):
        layer, *_, context = _layer(kind, **kwargs)
        context.set(MIXED)
        key, zero_point, padded = layer._compiled_route("cpu")
        if kind == "linear":
            codes = torch.randint(0, 256, (4 * 7, layer.in_features), dtype=torch.uint8)
        else:
            size = 9 + 2 * layer.padding[0] * padded
            codes = torch.randint(0, 256, (4, layer.in_channels, size, size), dtype=torch.uint8)
            codes = codes.contiguous(memory_format=torch.channels_last)
        scale = torch.rand(4) + 0.01
        torch.library.opcheck(integer_product, (codes, scale, scale * 3, key, zero_point, padded))


TIMESTEPS = (500.0, torch.tensor([999.0, 10.0, 500.0, 640.0]))
MODELS = {
    "unet2d": (make_unet2d, unet2d_inputs, TIMESTEPS),
    "cross-attention unet": (make_sd15_unet, sd15_inputs, (500.0, torch.tensor([999.0, 10.0]))),
}


def _exported(name: str = "unet2d", reference_outputs: bool = False):
    """The exported W8A8 tiny model; with ``reference_outputs`` also its fp32 and fake-quant outputs at its
    timesteps."""
    factory, inputs_fn, timesteps = MODELS[name]
    fake = qalora(factory(), inputs_fn, weight_bits=8, act_bits=8, random_lora=False)
    outputs = []
    if reference_outputs:
        with torch.no_grad():
            fp32 = factory()
            outputs = [(fp32(**inputs_fn(t)).sample, fake(**inputs_fn(t)).sample.clone()) for t in timesteps]
    model = dq.export_quantized(fake).eval()
    return (model, outputs) if reference_outputs else model


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_is_one_graph_and_matches_eager(name, monkeypatch):
    """A whole exported UNet compiles without a graph break; shared and mixed timesteps both run one integer product per
    layer (no per-timestep loop) and stay as close to the fake-quant model as the eager integer model does."""
    _, inputs_fn, timesteps = MODELS[name]
    model, references = _exported(name, reference_outputs=True)
    n_layers = len(integer_layers(model))
    compiled = _compiled(model, fullgraph=True)
    calls = _record_calls(monkeypatch, "_compiled_product")
    with torch.no_grad():
        for timestep, (fp32, fake) in zip(timesteps, references):
            inputs = inputs_fn(timestep)
            eager = model(**inputs).sample
            calls.clear()
            got = compiled(**inputs).sample
            assert len(calls) == n_layers and len(set(calls)) == n_layers
            assert got.is_contiguous()
            # docs/export.md: a float rounding difference can move an activation across a rounding boundary, and that
            # propagates, in the eager integer model as in the compiled one.  The compiled model must be no farther
            # from the fake-quant model than the eager integer model is (to 1.25x), and within half the quantization
            # error of it.
            assert relative_error(got, fake) < 1.25 * relative_error(eager, fake)
            assert relative_error(got, fake) < 0.5 * relative_error(fake, fp32)


def test_compiled_model_without_a_traced_path_runs_its_eager_layers(monkeypatch):
    """The "torch" preference (and any route without the oneDNN product) keeps each integer layer eager inside the
    compiled model (the fake-quant numbers; only the float layers around them are compiled)."""
    model, references = _exported(reference_outputs=True)
    set_kernel_preference(model, "torch")
    compiled = _compiled(model)
    calls = []
    original = IntegerLayer._forward_eager
    monkeypatch.setattr(IntegerLayer, "_forward_eager", lambda self, x: calls.append(1) or original(self, x))
    inputs = unet2d_inputs(TIMESTEPS[1])
    fp32, fake = references[1]
    with torch.no_grad():
        got = compiled(**inputs).sample
    assert len(calls) == len(integer_layers(model))
    # Inductor's float kernels (GroupNorm, SiLU, attention) round differently from eager ones, and a rounding flip
    # propagates (docs/export.md): within half the quantization error.
    assert relative_error(got, fake) < 0.5 * relative_error(fake, fp32)


def test_tables_changed_after_compiling_are_refused():
    """A compiled graph bakes the layer's zero-point route in: a table change that alters it is an error naming the
    layer and the fix, not a silently wrong product."""
    layer, *_, context = _layer("conv2d", signed=True)  # signed codes: one shared zero point
    compiled = _compiled(layer)
    context.set(MIXED)
    x = _x("conv2d", batch=4)
    with torch.no_grad():
        compiled(x)
        layer.act_zero_point.copy_(torch.tensor([0.0, 3.0, -2.0, 1.0]))
        with pytest.raises(RuntimeError, match="changed after torch.compile.*compile the model again"):
            compiled(x)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_weights_and_bias_changed_after_compiling_are_used(kind):
    """The op binds each layer's packed weight and bias once (a runner per layer state): new codes loaded after
    compiling, codes, steps and a bias written in place and a bias replaced must each reach the next call, at a shared timestep (the
    bound oneDNN product) and at mixed ones (the epilogue)."""
    layer, codes, w_scale, b, context = _layer(kind)
    compiled = _compiled(layer, fullgraph=True)
    x = _x(kind, batch=4)
    gen = torch.Generator().manual_seed(5)

    def check():
        for timesteps in (SHARED, MIXED):
            context.set(timesteps)
            per_sample = timesteps.expand(4) if timesteps.numel() == 1 else timesteps
            expected = torch.cat(
                [
                    _int_oracle(layer, codes, w_scale, layer.bias.clone(), x[i : i + 1], float(t))
                    for i, t in enumerate(per_sample)
                ]
            )
            with torch.no_grad():
                got = compiled(x)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6 * float(expected.abs().max()))

    check()
    codes = torch.randint(-8, 8, codes.shape, generator=gen)
    tables = (layer.act_timesteps.clone(), layer.act_scale.clone(), layer.act_zero_point.clone())
    layer.load_codes_(codes, w_scale, b, *tables)
    check()
    other, codes, other_scale, *_ = _layer(kind, seed=1)
    with torch.no_grad():  # codes, then steps, written in place
        layer.weight_packed.copy_(other.weight_packed)
        check()
        layer.weight_scale.copy_(other_scale)
        w_scale = other_scale
        check()
    with torch.no_grad():
        layer.bias.add_(1.0)
    check()
    layer.bias = torch.randn(layer.bias.shape, generator=gen)
    check()


def test_a_deleted_layer_is_freed_without_the_cycle_collector():
    """The runner a layer caches must not hold the layer: a deleted layer (and its packed weights) goes at once, and
    the op then names the missing layer instead of running a stale one."""
    import gc
    import weakref

    layer, *_, context = _layer("linear")
    context.set(MIXED)
    key, zero_point, padded = layer._compiled_route("cpu")
    codes = torch.randint(0, 256, (4 * 7, layer.in_features), dtype=torch.uint8)
    scale = torch.rand(4) + 0.01
    for step in (scale, scale[:1].expand(4).contiguous()):  # the epilogue and the bound oneDNN product
        assert integer_product(codes, step, step * 3, key, zero_point, padded).shape == (28, layer.out_features)
    assert layer._derived["compiled_runner"] is not None
    alive = weakref.ref(layer)
    gc.disable()
    try:
        del layer
        assert alive() is None
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="no longer exists; compile the model again"):
        integer_product(codes, scale, scale * 3, key, zero_point, padded)


def test_layer_keys_follow_the_layer_not_its_copy():
    import copy

    layer, *_ = _layer("linear")
    twin = copy.deepcopy(layer)
    assert layer_key(layer) != layer_key(twin)
    assert layer_key(layer) == layer_key(layer)


def test_default_compile_follows_the_batch_size():
    """``torch.compile(model)`` with its default (dynamic on recompilation) settings: a new batch size traces again
    with symbolic shapes, and each batch stays as close to the fake-quant model as in the static case."""
    fake = qalora(make_unet2d(), unet2d_inputs, weight_bits=8, act_bits=8, random_lora=False)
    fp32 = make_unet2d()
    batches = {b: unet2d_inputs(torch.arange(b).float() * 150, batch=b) for b in (4, 2, 3)}
    with torch.no_grad():
        references = {b: (fp32(**x).sample, fake(**x).sample.clone()) for b, x in batches.items()}
    model = dq.export_quantized(fake).eval()
    torch.compiler.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        for b, x in batches.items():
            reference_fp32, reference_fake = references[b]
            got = compiled(**x).sample
            assert got.shape == reference_fake.shape
            assert relative_error(got, reference_fake) < 0.5 * relative_error(reference_fake, reference_fp32), b


def test_compiled_model_with_bf16_attention_is_one_graph():
    """The exported model with its float attention in bf16 (``QALoraAttnProcessor(compute_dtype=torch.bfloat16)``, the
    CPU speed option of docs/export.md) compiles as one graph and stays within half the quantization error."""
    model, references = _exported("cross-attention unet", reference_outputs=True)
    model.set_attn_processor(dq.QALoraAttnProcessor(compute_dtype=torch.bfloat16))
    compiled = _compiled(model, fullgraph=True)
    _, inputs_fn, timesteps = MODELS["cross-attention unet"]
    with torch.no_grad():
        for timestep, (fp32, fake) in zip(timesteps, references):
            got = compiled(**inputs_fn(timestep)).sample
            assert got.dtype == torch.float32
            assert relative_error(got, fake) < 0.5 * relative_error(fake, fp32)
