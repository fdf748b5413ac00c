"""Temporal step sizes: the timestep table, interpolation, per-sample lookup, the hook, calibration and training."""

from __future__ import annotations

import bisect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffusers_qalora.quant import (
    TemporalActQuantizer,
    TemporalValues,
    TimestepContext,
    TimestepHook,
    WeightQuantizer,
    fake_quantize,
    install_timestep_hook,
    interpolation_indices,
    minmax_qparams,
    timesteps_to_tensor,
    validate_timestep_table,
)
from diffusers_qalora.quant.primitives import lsq_grad_scale

SETTINGS = settings(max_examples=100, deadline=None)

TABLE = [1.0, 11.0, 21.0, 51.0, 101.0, 501.0, 999.0]
VALUES = [0.5, 0.7, 0.2, 1.1, 2.0, 3.5, 0.9]


def ref_interp(table, values, t):
    """Linear interpolation with clamped ends, written independently of the library."""
    if t <= table[0]:
        return values[0]
    if t >= table[-1]:
        return values[-1]
    i = bisect.bisect_right(table, t) - 1
    if table[i] == t:
        return values[i]
    w = (t - table[i]) / (table[i + 1] - table[i])
    return values[i] * (1 - w) + values[i + 1] * w


def make_values(table=TABLE, values=VALUES):
    tv = TemporalValues(table)
    tv.fill_(values)
    return tv


def make_quantizer(table=TABLE, steps=VALUES, zps=None, bits=4, symmetric=False, context=None):
    q = TemporalActQuantizer(table, bits=bits, symmetric=symmetric, name="test.act")
    q.step.fill_(steps)
    if not symmetric:
        q.zero_point.fill_(zps if zps is not None else [float(i % 7) for i in range(len(table))])
    q.calibrated.fill_(True)
    q.context = context if context is not None else TimestepContext()
    return q


# -- the table ---------------------------------------------------------------------------------------------------


def test_validate_timestep_table():
    assert validate_timestep_table([0, 10, 20]) == (0.0, 10.0, 20.0)
    assert validate_timestep_table(torch.tensor([1, 5])) == (1.0, 5.0)
    assert validate_timestep_table([7]) == (7.0,)
    for bad in ([], [3, 1, 2], [1, 1, 2], [0, 10, 5], torch.tensor([[1.0, 2.0]]), torch.tensor(3.0), ["a"], [None]):
        with pytest.raises(ValueError, match="`timesteps`"):
            validate_timestep_table(bad)
    with pytest.raises(ValueError, match="`table`"):
        validate_timestep_table([], name="table")


@pytest.mark.parametrize("bad", [[], [10, 5], [1, 2, 2]])
def test_empty_or_unsorted_table_raises_in_modules(bad):
    with pytest.raises(ValueError, match="timesteps"):
        TemporalValues(bad)
    with pytest.raises(ValueError, match="timesteps"):
        TemporalActQuantizer(bad, bits=4)


def test_timesteps_to_tensor():
    for value, expected in [
        (torch.tensor(5), [5.0]),
        (torch.tensor(7.5), [7.5]),
        (torch.tensor([1, 2, 3]), [1.0, 2.0, 3.0]),
        (torch.tensor([4.0]), [4.0]),
        (12, [12.0]),
        (12.5, [12.5]),
    ]:
        t = timesteps_to_tensor(value)
        assert t.dtype == torch.float32 and t.dim() == 1
        assert t.tolist() == expected
    for bad in (torch.zeros(2, 3), torch.zeros(1, 1), True, "5", None, [1, 2]):
        with pytest.raises(ValueError, match="`timestep`"):
            timesteps_to_tensor(bad)


# -- interpolation ------------------------------------------------------------------------------------------------


def test_interpolation_exact_between_and_clamped():
    tv = make_values()
    at_entries = tv.lookup(torch.tensor(TABLE))
    assert torch.equal(at_entries, torch.tensor(VALUES))
    cases = {6.0: 0.6, 16.0: 0.45, 36.0: 0.65, 750.0: 2.2, -5.0: 0.5, 0.0: 0.5, 1000.0: 0.9, 5000.0: 0.9}
    out = tv.lookup(torch.tensor(list(cases)))
    torch.testing.assert_close(out, torch.tensor(list(cases.values())), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(st.lists(st.floats(-100, 1200, allow_nan=False), min_size=1, max_size=9))
def test_interpolation_matches_reference(ts):
    tv = make_values()
    out = tv.lookup(torch.tensor(ts))
    t32 = torch.tensor(ts).tolist()  # the lookup sees float32 timesteps
    expected = torch.tensor([ref_interp(TABLE, VALUES, t) for t in t32])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(st.lists(st.floats(-10, 1100, allow_nan=False), min_size=1, max_size=6))
def test_interpolation_indices_properties(ts):
    table = torch.tensor(TABLE)
    t = torch.tensor(ts)
    lo, hi, w = interpolation_indices(table, t)
    assert bool(((w >= 0) & (w <= 1)).all())
    assert bool((hi >= lo).all() and (hi - lo <= 1).all())
    tc = t.clamp(TABLE[0], TABLE[-1])
    assert bool((table[lo] <= tc).all() and (table[hi] >= tc).all())
    exact = torch.isin(tc, table)
    assert bool((lo[exact] == hi[exact]).all() and (w[exact] == 0).all())


def test_single_entry_table_is_static():
    tv = make_values([500.0], [0.25])
    assert tv.lookup(torch.tensor([0.0, 499.0, 500.0, 999.0])).tolist() == [0.25] * 4


def test_lookup_gradient_reaches_only_the_neighbours():
    tv = make_values()
    tv.lookup(torch.tensor([16.0])).sum().backward()
    grads = [None if p.grad is None else float(p.grad) for p in tv.values]
    assert grads == [None, 0.5, 0.5, None, None, None, None]
    tv.zero_grad(set_to_none=True)
    tv.lookup(torch.tensor([51.0])).sum().backward()
    assert [p.grad is not None for p in tv.values] == [False, False, False, True, False, False, False]
    assert float(tv.values[3].grad) == 1.0


def test_fill_validates_length():
    with pytest.raises(ValueError, match="expected 7 values"):
        make_values().fill_([1.0, 2.0])


# -- per-sample lookup in the quantizer ----------------------------------------------------------------------------


def expected_per_sample(q, x, ts):
    outs = []
    for i, t in enumerate(ts):
        s = torch.tensor(ref_interp(TABLE, VALUES, t))
        z = None
        if q.zero_point is not None:
            zs = [float(p.detach()) for p in q.zero_point.values]
            z = torch.tensor(ref_interp(TABLE, zs, t))
        outs.append(fake_quantize(x[i], s, z, q.qmin, q.qmax))
    return torch.stack(outs)


@pytest.mark.parametrize("symmetric", [True, False])
def test_each_sample_gets_its_own_step(symmetric):
    q = make_quantizer(symmetric=symmetric)
    ts = [1.0, 51.0, 999.0, 21.0, 300.0]
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 4
    q.context.set(torch.tensor(ts))
    out = q(x)
    torch.testing.assert_close(out, expected_per_sample(q, x, ts), rtol=1e-6, atol=1e-6)
    # each sample equals a batch of one at its own timestep
    for i, t in enumerate(ts):
        q.context.set(t)
        assert torch.equal(out[i : i + 1], q(x[i : i + 1]))


def test_per_sample_steps_get_their_own_gradients():
    q = make_quantizer()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)) * 3
    q.context.set(torch.tensor([11.0, 501.0]))
    q(x).pow(2).sum().backward()
    has_grad = [p.grad is not None for p in q.step.values]
    assert has_grad == [False, True, False, False, False, True, False]
    # the gradient of entry 1 depends only on sample 0
    q2 = make_quantizer()
    q2.context.set(11.0)
    q2(x[:1]).pow(2).sum().backward()
    torch.testing.assert_close(q.step.values[1].grad, q2.step.values[1].grad)


def test_cfg_duplicated_batches():
    q = make_quantizer()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=gen) * 3
    x2 = torch.cat([x, x])  # classifier-free guidance: [uncond, cond]
    # a single timestep (what diffusers UNet pipelines pass): every sample uses it
    q.context.set(torch.tensor(51.0))
    single = q(x2)
    assert torch.equal(single[:3], single[3:])
    q.context.set(torch.tensor([51.0]))
    assert torch.equal(q(x2), single)
    # one timestep per sample, duplicated (what SD3 / Flux pipelines pass: t.expand(2B))
    ts = torch.tensor([11.0, 300.0, 999.0])
    q.context.set(torch.cat([ts, ts]))
    per_sample = q(x2)
    assert torch.equal(per_sample[:3], per_sample[3:])
    torch.testing.assert_close(per_sample[:3], expected_per_sample(q, x, ts.tolist()), rtol=1e-6, atol=1e-6)
    # B equal timesteps for 2B samples
    q.context.set(torch.full((3,), 51.0))
    assert torch.equal(q(x2), single)


def test_batch_multiple_of_timesteps_repeats_each_timestep_over_consecutive_samples():
    # Layers that fold extra dims into the batch ((B, F) -> B * F, b-major) see k timesteps for k * m samples.
    ctx = TimestepContext()
    ctx.set(torch.tensor([10.0, 20.0]))
    assert ctx.per_sample(6).tolist() == [10.0, 10.0, 10.0, 20.0, 20.0, 20.0]
    assert ctx.per_sample(2).tolist() == [10.0, 20.0]
    ctx.set(5)
    assert ctx.per_sample(4).tolist() == [5.0] * 4
    q = make_quantizer(context=ctx)
    ctx.set(torch.tensor([11.0, 501.0]))
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(3)) * 3
    torch.testing.assert_close(q(x), expected_per_sample(q, x, [11.0, 11.0, 501.0, 501.0]), rtol=1e-6, atol=1e-6)


def test_wrong_timestep_shapes_raise():
    ctx = TimestepContext()
    with pytest.raises(ValueError, match="`timestep`"):
        ctx.set(torch.zeros(2, 2))
    ctx.set(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="test.act"):
        make_quantizer(context=ctx)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="3 timesteps"):
        ctx.per_sample(5, "somewhere")


def test_uncalibrated_or_contextless_forward_raises():
    q = TemporalActQuantizer(TABLE, bits=4, name="blk.act")
    q.context = TimestepContext()
    q.context.set(11)
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(torch.randn(2, 3))
    q.calibrated.fill_(True)
    q.context = None
    with pytest.raises(RuntimeError, match="TimestepContext"):
        q(torch.randn(2, 3))
    q.context = TimestepContext()
    with pytest.raises(RuntimeError, match="no timestep is set"):
        q(torch.randn(2, 3))
    q.context.set(11)
    q(torch.randn(2, 3))
    q.enabled = False
    x = torch.randn(2, 3)
    assert q(x) is x


def test_empty_batch_and_low_precision():
    q = make_quantizer()
    q.context.set(21.0)
    assert q(torch.randn(0, 4)).shape == (0, 4)
    x = (torch.randn(2, 16) * 3).to(torch.bfloat16)
    out = q(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, q(x.float()).to(torch.bfloat16))


def test_state_dict_round_trip():
    q = make_quantizer()
    fresh = TemporalActQuantizer(TABLE, bits=4, name="x")
    fresh.load_state_dict(q.state_dict())
    fresh.context = q.context
    q.context.set(torch.tensor([1.0, 77.0]))
    x = torch.randn(2, 5)
    assert bool(fresh.calibrated)
    assert torch.equal(fresh(x), q(x))


# -- the hook --------------------------------------------------------------------------------------------------


class TinyDenoiser(nn.Module):
    def __init__(self, context):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = make_quantizer(context=context)
        self.seen = []

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        self.seen.append(self.act.context.timesteps.clone())
        return self.lin(self.act(sample))


@pytest.mark.parametrize(
    "value,expected",
    [
        (torch.tensor(51), [51.0]),
        (torch.tensor([11, 21]), [11.0, 21.0]),
        (torch.tensor([999.0]), [999.0]),
        (101, [101.0]),
        (101.5, [101.5]),
    ],
)
def test_hook_reads_timestep_positionally_or_by_keyword(value, expected):
    ctx = TimestepContext()
    model = TinyDenoiser(ctx)
    handle = install_timestep_hook(model, ctx)
    x = torch.randn(2, 4)
    model(x, value)
    model(x, value, None)
    model(x, timestep=value)
    model(sample=x, timestep=value, encoder_hidden_states=None)
    assert [t.tolist() for t in model.seen] == [expected] * 4
    # a later call with another timestep overrides the context: looked up by value, no counter
    model(x, 1)
    assert model.seen[-1].tolist() == [1.0]
    handle.remove()
    ctx.set(7)
    model(x, 500)
    assert model.seen[-1].tolist() == [7.0]


def test_hook_errors():
    ctx = TimestepContext()
    model = TinyDenoiser(ctx)
    install_timestep_hook(model, ctx)
    with pytest.raises(ValueError, match="`timestep`"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="`timestep`"):
        model(torch.randn(2, 4), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="no `t` argument"):
        install_timestep_hook(model, ctx, argument="t")


def test_hook_custom_argument_name():
    class Other(nn.Module):
        def forward(self, x, t):
            return x

    ctx = TimestepContext()
    hook = TimestepHook(ctx, Other().forward, argument="t")
    assert hook.position == 1
    m = Other()
    install_timestep_hook(m, ctx, argument="t")
    m(torch.zeros(1), 3)
    assert ctx.timesteps.tolist() == [3.0]
    m(torch.zeros(1), t=torch.tensor(4))
    assert ctx.timesteps.tolist() == [4.0]


# -- calibration ---------------------------------------------------------------------------------------------------


def test_calibration_fills_unseen_entries_by_interpolation():
    table = [0.0, 10.0, 20.0, 30.0, 40.0]
    q = TemporalActQuantizer(table, bits=4, name="calib")
    q.context = TimestepContext()
    with pytest.raises(RuntimeError, match="not calibrated"):
        q.context.set(0)
        q(torch.randn(1, 8))
    q.start_calibration("minmax")
    low = torch.linspace(-1.0, 2.0, 64).reshape(1, 64)
    high = torch.linspace(-3.0, 10.0, 64).reshape(1, 64)
    q.context.set(0)
    assert torch.equal(q(low), low)  # observed, passed through
    q.context.set(torch.tensor([40.0]))
    q(high)
    q.finish_calibration()
    assert bool(q.calibrated)
    s0, z0 = minmax_qparams(low.reshape(1, 1, -1), 4, False)
    s4, z4 = minmax_qparams(high.reshape(1, 1, -1), 4, False)
    steps = [float(p.detach()) for p in q.step.values]
    zps = [float(p.detach()) for p in q.zero_point.values]
    expected_steps = [float(s0) + (float(s4) - float(s0)) * k / 4 for k in range(5)]
    expected_zps = [round(float(z0) + (float(z4) - float(z0)) * k / 4) for k in range(5)]
    assert steps == pytest.approx(expected_steps, rel=1e-6)
    assert zps == expected_zps
    assert all(z == round(z) for z in zps)
    q.context.set(20)
    q(torch.randn(3, 8))  # calibrated forward works


def test_calibration_averages_and_assigns_per_sample_to_nearest_entry():
    table = [0.0, 10.0, 20.0]
    q = TemporalActQuantizer(table, bits=8, symmetric=True, name="calib")
    q.context = TimestepContext()
    q.start_calibration("minmax")
    a = torch.linspace(-1, 1, 32)
    b = torch.linspace(-4, 4, 32)
    q.context.set(torch.tensor([1.0, 19.0]))  # nearest entries 0 and 2
    q(torch.stack([a, b]))
    q.context.set(torch.tensor(2.0))  # nearest entry 0 again, with a range of 3
    q(torch.stack([a * 3]))
    q.finish_calibration()
    steps = [float(p.detach()) for p in q.step.values]
    assert steps[0] == pytest.approx((1 / 127 + 3 / 127) / 2, rel=1e-6)
    assert steps[2] == pytest.approx(4 / 127, rel=1e-6)
    assert steps[1] == pytest.approx((steps[0] + steps[2]) / 2, rel=1e-6)


def test_calibration_errors():
    q = TemporalActQuantizer([0.0, 10.0], bits=4, name="calib")
    q.context = TimestepContext()
    with pytest.raises(RuntimeError, match="without start_calibration"):
        q.finish_calibration()
    q.start_calibration()
    with pytest.raises(RuntimeError, match="no input was observed"):
        q.finish_calibration()
    with pytest.raises(ValueError, match="`method`"):
        q.start_calibration("median")


def test_calibration_single_observed_entry_fills_all():
    q = TemporalActQuantizer([0.0, 10.0, 20.0], bits=4, name="calib")
    q.context = TimestepContext()
    q.start_calibration("minmax")
    q.context.set(10)
    q(torch.linspace(-1, 2, 50).reshape(1, -1))
    q.finish_calibration()
    steps = [float(p.detach()) for p in q.step.values]
    assert steps[0] == steps[1] == steps[2] == pytest.approx(3 / 15, rel=1e-6)


# -- frozen inactive timesteps under AdamW ------------------------------------------------------------------------------


class QLinear(nn.Module):
    def __init__(self, context, table):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.weight = nn.Parameter(torch.randn(6, 8, generator=gen) * 0.3)
        self.wq = WeightQuantizer((6, 8), bits=4)
        self.wq.initialize_(self.weight, "minmax")
        self.act = TemporalActQuantizer(table, bits=4, name="qlin.act")
        self.act.context = context
        self.act.step.fill_(torch.linspace(0.05, 0.3, len(table)))
        self.act.zero_point.fill_(torch.arange(len(table)).float() % 5 + 3)
        self.act.calibrated.fill_(True)

    def forward(self, x):
        return F.linear(self.act(x), self.wq(self.weight))


def snapshot(module):
    return [p.detach().clone() for p in module.act.step.values], [
        p.detach().clone() for p in module.act.zero_point.values
    ]


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_training_at_one_timestep_leaves_other_timesteps_bit_identical(impl):
    # fused: what DataFreeDistiller builds
    table = [float(t) for t in range(1, 1000, 100)]  # 10 entries
    ctx = TimestepContext()
    model = QLinear(ctx, table)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **impl)
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(4, 6, generator=gen)

    def train_step(t):
        x = torch.randn(4, 8, generator=gen) * 2  # large enough that some inputs clip: zero points get gradients
        ctx.set(torch.tensor(t))
        opt.zero_grad()  # set_to_none=True (the default): unused entries keep grad None
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()

    # build up momentum and second moments at entry 3 first
    for _ in range(4):
        train_step(table[3])
    steps0, zps0 = snapshot(model)
    assert opt.state[model.act.step.values[3]]["step"] == 4
    assert float(opt.state[model.act.step.values[3]]["exp_avg"]) != 0.0
    # now train at entry 7: only entry 7 moves, entry 3 keeps its state and value despite momentum + weight decay
    for k in range(5):
        train_step(table[7])
        steps, zps = snapshot(model)
        for i in range(len(table)):
            if i == 7:
                continue
            assert torch.equal(steps[i], steps0[i]), (k, i)
            assert torch.equal(zps[i], zps0[i]), (k, i)
    assert not torch.equal(steps[7], steps0[7])
    assert not torch.equal(zps[7], zps0[7])
    assert opt.state[model.act.step.values[3]]["step"] == 4  # entry 3 saw no optimizer step since
    assert model.act.step.values[0] not in opt.state or not opt.state[model.act.step.values[0]]


def test_training_between_entries_moves_only_the_two_neighbours():
    table = [1.0, 101.0, 201.0, 301.0]
    ctx = TimestepContext()
    model = QLinear(ctx, table)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(6)
    ctx.set(1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(3, 8, generator=gen) * 2).pow(2).mean().backward()
        opt.step()
    steps0, zps0 = snapshot(model)
    ctx.set(torch.tensor([150.0]))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(3, 8, generator=gen) * 2).pow(2).mean().backward()
        opt.step()
    steps, zps = snapshot(model)
    assert torch.equal(steps[0], steps0[0]) and torch.equal(steps[3], steps0[3])
    assert torch.equal(zps[0], zps0[0]) and torch.equal(zps[3], zps0[3])
    assert not torch.equal(steps[1], steps0[1]) and not torch.equal(steps[2], steps0[2])


def test_temporal_lsq_grad_scale_uses_elements_per_sample():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(7)) * 3
    grads = []
    for use in (False, True):
        q = make_quantizer()
        q.use_lsq_grad_scale = use
        q.context.set(torch.tensor([11.0, 11.0, 51.0]))
        q(x).pow(2).sum().backward()
        grads.append((q.step.values[1].grad, q.zero_point.values[3].grad))
    g = lsq_grad_scale(20, 15)
    torch.testing.assert_close(grads[1][0], grads[0][0] * g)
    torch.testing.assert_close(grads[1][1], grads[0][1] * g)


@SETTINGS
@given(st.floats(-50, 1100, allow_nan=False), st.booleans())
def test_single_timestep_path_matches_batched_lookup_exactly(t, symmetric):
    """The one-timestep fast path gives the numbers and gradients of ``TemporalValues.lookup``."""
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(8)) * 3
    g = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))
    q = make_quantizer(symmetric=symmetric, zps=[0.0, 3.0, 5.0, 4.0, 8.0, 2.0, 15.0])
    q.context.set(torch.tensor([t, t, t]))
    fast = q(x)
    (fast * g).sum().backward()
    ref = make_quantizer(symmetric=symmetric, zps=[0.0, 3.0, 5.0, 4.0, 8.0, 2.0, 15.0])
    t1 = torch.tensor([t], dtype=torch.float32)
    step, zp = ref.qparams(t1)
    slow = fake_quantize(x, step.reshape(()), None if zp is None else zp.reshape(()), ref.qmin, ref.qmax)
    (slow * g).sum().backward()
    assert torch.equal(fast, slow)
    for a, b in zip(q.parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
