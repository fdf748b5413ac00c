"""Tests of the F(m, 3) transforms: published matrices, Vandermonde factorisation, exact 1-D correlation."""

from __future__ import annotations

import math
from fractions import Fraction as Fr

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_qalora.winograd import (
    DEFAULT_POINTS,
    balanced_multipliers,
    lagrange_denominators,
    parse_point,
    winograd_correlate_1d,
    winograd_transforms,
)

SETTINGS = settings(max_examples=30, deadline=None)


def _t(rows) -> torch.Tensor:
    return torch.tensor([[float(Fr(v)) for v in row] for row in rows], dtype=torch.float64)


# Lavin & Gray (2016), F(2,3) and F(4,3); NNPACK / Lavin's improved F(6,3) (points 0, ±1, ±2, ±1/2, inf).
PUBLISHED = {
    2: {
        "BT": [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        "G": [[1, 0, 0], ["1/2", "1/2", "1/2"], ["1/2", "-1/2", "1/2"], [0, 0, 1]],
        "AT": [[1, 1, 1, 0], [0, 1, -1, -1]],
    },
    4: {
        "BT": [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        "G": [
            ["1/4", 0, 0],
            ["-1/6", "-1/6", "-1/6"],
            ["-1/6", "1/6", "-1/6"],
            ["1/24", "1/12", "1/6"],
            ["1/24", "-1/12", "1/6"],
            [0, 0, 1],
        ],
        "AT": [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    },
    6: {
        "BT": [
            [1, 0, "-21/4", 0, "21/4", 0, -1, 0],
            [0, 1, 1, "-17/4", "-17/4", 1, 1, 0],
            [0, -1, 1, "17/4", "-17/4", -1, 1, 0],
            [0, "1/2", "1/4", "-5/2", "-5/4", 2, 1, 0],
            [0, "-1/2", "1/4", "5/2", "-5/4", -2, 1, 0],
            [0, 2, 4, "-5/2", -5, "1/2", 1, 0],
            [0, -2, 4, "5/2", -5, "-1/2", 1, 0],
            [0, -1, 0, "21/4", 0, "-21/4", 0, 1],
        ],
        "G": [
            [1, 0, 0],
            ["-2/9", "-2/9", "-2/9"],
            ["-2/9", "2/9", "-2/9"],
            ["1/90", "1/45", "2/45"],
            ["1/90", "-1/45", "2/45"],
            ["32/45", "16/45", "8/45"],
            ["32/45", "-16/45", "8/45"],
            [0, 0, 1],
        ],
        # row i is p^i over (0, 1, -1, 2, -2, 1/2, -1/2), plus e_6 for infinity in the last row
        "AT": [[Fr(p) ** i for p in ("0", "1", "-1", "2", "-2", "1/2", "-1/2")] + [int(i == 5)] for i in range(6)],
    },
}

# The diagonal scalings of the published matrices in the Vandermonde factorisation (notes/winograd.md section 3).
PUBLISHED_SCALES = {
    2: {"a": [1, 1, 1, -1], "b": [1, 2, 2, -1], "g": [1, "1/2", "1/2", 1]},
    4: {"a": [1] * 6, "b": [4, -6, -6, 24, 24, 1], "g": ["1/4", "-1/6", "-1/6", "1/24", "1/24", 1]},
    6: {
        "a": [1] * 8,
        "b": [1, "-9/2", "-9/2", 90, 90, "45/32", "45/32", 1],
        "g": [1, "-2/9", "-2/9", "1/90", "1/90", "32/45", "32/45", 1],
    },
}


@pytest.mark.parametrize("m", [2, 4, 6])
def test_default_transforms_equal_the_published_matrices_exactly(m):
    t = winograd_transforms(m)
    for name in ("AT", "G", "BT"):
        assert torch.equal(getattr(t, name), _t(PUBLISHED[m][name])), name
    for key in "abg":
        assert torch.equal(getattr(t, f"scale_{key}"), _t([PUBLISHED_SCALES[m][key]])[0]), key


@pytest.mark.parametrize("m", [2, 4, 6])
def test_vandermonde_factorisation(m):
    t = winograd_transforms(m)
    n = m + 2
    pts = [parse_point(p) for p in DEFAULT_POINTS[m]]
    assert t.n == n and t.points == tuple(pts)
    # the unscaled factors are the Vandermonde matrices of the points (infinity row = leading coefficient)
    vand = lambda cols: _t([[p**j for j in range(cols)] if p is not None else [0] * (cols - 1) + [1] for p in pts])  # noqa: E731
    assert torch.equal(t.VmT, vand(m).T)
    assert torch.equal(t.Vr, vand(3))
    torch.testing.assert_close(t.VnInvT @ vand(n).T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(t.AT, t.VmT * t.scale_a[None, :])
    assert torch.equal(t.G, t.scale_g[:, None] * t.Vr)
    assert torch.equal(t.BT, t.scale_b[:, None] * t.VnInvT)
    torch.testing.assert_close(t.scale_a * t.scale_b * t.scale_g, torch.ones(n, dtype=torch.float64))


def _exact_correlation_matrix(t, k: int) -> list[list[Fr]]:
    """``A^T diag(G e_k) B^T`` in exact arithmetic: must be the shift-by-k selection matrix."""
    at, g, bt = t.exact["AT"], t.exact["G"], t.exact["BT"]
    n = len(bt)
    return [[sum(at[i][a] * g[a][k] * bt[a][j] for a in range(n)) for j in range(n)] for i in range(len(at))]


POINT_SETS = [
    (2, None),
    (4, None),
    (6, None),
    (6, ("0", "1", "-1", "2", "-2", "3/2", "-3/2", "inf")),  # Fernandez-Marques et al.'s points
    (3, ("0", "1", "-1", "2", "inf")),
    (2, ("0", "1", "-1", "2")),  # no point at infinity
    (4, ("inf", "1/3", "0", "-1", "3", "1")),  # infinity first, unordered
]


@pytest.mark.parametrize("m, points", POINT_SETS)
@pytest.mark.parametrize("scaling", ["lavin", "cook_toom", "unit"])
def test_1d_algorithm_is_exact_cross_correlation_in_rationals(m, points, scaling):
    t = winograd_transforms(m, 3, points, scaling=scaling)
    for k in range(3):
        mat = _exact_correlation_matrix(t, k)
        for i in range(m):
            for j in range(t.n):
                assert mat[i][j] == (1 if j == i + k else 0)


@SETTINGS
@given(m=st.sampled_from([2, 4, 6]), seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 5))
def test_1d_algorithm_float64(m, seed, batch):
    gen = torch.Generator().manual_seed(seed)
    t = winograd_transforms(m)
    d = torch.randn(batch, t.n, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, 3, generator=gen, dtype=torch.float64)
    ref = torch.stack([(d[:, i : i + 3] * g).sum(-1) for i in range(m)], dim=-1)
    torch.testing.assert_close(winograd_correlate_1d(d, g, t), ref, atol=1e-12, rtol=0)


def test_1d_algorithm_exact_on_small_integers_f23_f43():
    # F(2,3) and F(4,3) use dyadic/small rationals: integer inputs give results within one ulp of the integers.
    for m in (2, 4):
        t = winograd_transforms(m)
        d = torch.arange(-3.0, -3.0 + t.n, dtype=torch.float64)
        g = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)
        ref = torch.stack([(d[i : i + 3] * g).sum() for i in range(m)])
        assert torch.allclose(winograd_correlate_1d(d, g, t), ref, atol=1e-13, rtol=0)


def test_lavin_is_cook_toom_up_to_signs():
    for m in (2, 4, 6):
        a, b = winograd_transforms(m, scaling="lavin"), winograd_transforms(m, scaling="cook_toom")
        for name in ("AT", "G", "BT"):
            assert torch.equal(getattr(a, name).abs(), getattr(b, name).abs())
    assert lagrange_denominators(DEFAULT_POINTS[4]) == (4, -6, -6, 24, 24, 1)


@pytest.mark.parametrize("m", [2, 4, 6])
def test_rescaled_keeps_the_algorithm_exact(m):
    t = winograd_transforms(m)
    gen = torch.Generator().manual_seed(m)
    mult_b = torch.rand(t.n, generator=gen, dtype=torch.float64) * 3 + 0.1
    mult_g = torch.rand(t.n, generator=gen, dtype=torch.float64) * 3 + 0.1
    s = t.rescaled(mult_b, mult_g)
    assert s.exact is None
    torch.testing.assert_close(s.scale_a * s.scale_b * s.scale_g, torch.ones(t.n, dtype=torch.float64))
    d = torch.randn(4, t.n, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(winograd_correlate_1d(d, g, s), winograd_correlate_1d(d, g, t), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="nonzero"):
        t.rescaled(torch.zeros(t.n), torch.ones(t.n))
    with pytest.raises(ValueError, match="shape"):
        t.rescaled(torch.ones(t.n + 1), torch.ones(t.n))


@pytest.mark.parametrize("m", [2, 4, 6])
def test_balanced_multipliers_equalise_row_norms(m):
    t = winograd_transforms(m)
    s = t.rescaled(*balanced_multipliers(t))
    for mat in (s.BT, s.G):
        norms = mat.norm(dim=1)
        torch.testing.assert_close(norms, norms[0].expand_as(norms), rtol=1e-12, atol=0)


def test_parse_point_forms():
    assert parse_point("1/2") == Fr(1, 2)
    assert parse_point(0.5) == Fr(1, 2)
    assert parse_point(-2) == -2
    assert parse_point(Fr(3, 2)) == Fr(3, 2)
    for inf in ("inf", "INF", math.inf, None):
        assert parse_point(inf) is None
    with pytest.raises(ValueError, match="parse"):
        parse_point("half")
    with pytest.raises(ValueError, match="NaN"):
        parse_point(float("nan"))
    with pytest.raises(ValueError, match="infinity"):
        parse_point(-math.inf)
    with pytest.raises(TypeError):
        parse_point(True)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="default points"):
        winograd_transforms(3)
    with pytest.raises(ValueError, match="needs n"):
        winograd_transforms(2, points=("0", "1", "inf"))
    with pytest.raises(ValueError, match="distinct"):
        winograd_transforms(2, points=("0", "1", "1", "inf"))
    with pytest.raises(ValueError, match="at most one"):
        winograd_transforms(2, points=("0", "1", "inf", "inf"))
    with pytest.raises(ValueError, match="scaling"):
        winograd_transforms(2, scaling="lavinn")
    with pytest.raises(ValueError, match="`m`"):
        winograd_transforms(0)
