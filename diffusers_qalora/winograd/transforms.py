"""Winograd / Cook-Toom transforms F(m, r) built from interpolation points, exactly.

The 1-D minimal filtering algorithm F(m, r) computes ``m`` outputs of an ``r``-tap **cross-correlation**
(what ``torch.nn.functional.conv2d`` computes, so no kernel flip is needed) from a tile of ``n = m + r - 1`` inputs:

    y = A^T [ (G g) ⊙ (B^T d) ],        y_i = sum_k d_{i+k} g_k,   i = 0..m-1,

with ``A^T: (m, n)``, ``G: (n, r)`` and ``B^T: (n, n)``.  Nested over two dimensions, for an ``n x n`` tile ``d`` and
an ``r x r`` kernel ``g``:  ``Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A``.

**Construction (Cook-Toom).**  Pick ``n`` distinct points ``p_0..p_{n-1}``, at most one of which is the point at
infinity.  ``V_k`` is the ``(n, k)`` Vandermonde matrix whose row for a finite point ``p`` is ``(1, p, ..., p^{k-1})``
and whose row for infinity is ``(0, ..., 0, 1)`` (it picks the leading coefficient).  Linear convolution of an
``m``-vector ``a`` with an ``r``-vector ``b`` is ``c = V_n^{-1} [ (V_m a) ⊙ (V_r b) ]`` (evaluate, multiply pointwise,
interpolate); transposing that bilinear map over ``a`` gives the correlation above with

    A^T = V_m^T S_A,        G = S_G V_r,        B^T = S_B V_n^{-T},

for any diagonal ``S_A, S_B, S_G`` with ``S_A S_B S_G = I`` (diagonal factors commute with the Hadamard product).
This factorisation (Vincent et al., 2017) is what makes the learnable scales of Pan et al. (CVPR 2025) natural:
only ``S_B`` and ``S_G`` are free, ``S_A = (S_B S_G)^{-1}``.

**Scalings** (the ``scaling`` argument of `winograd_transforms`):

* ``"unit"``: ``S_A = S_B = S_G = I``.
* ``"cook_toom"``: the Lagrange scaling, ``S_G[i] = 1 / prod_{j != i, p_j finite} (p_i - p_j)`` for a finite point,
  ``S_B = S_G^{-1}``, ``S_A = I`` (1 at infinity everywhere).  ``G`` then evaluates the Lagrange basis.
* ``"lavin"`` (default): ``"cook_toom"`` with the sign conventions of the published Lavin-Gray matrices: the entry
  at the point 0 is made positive, and for F(2, 3) on its default points the infinity row of ``A^T`` and ``B^T`` is
  negated.  On the default points this reproduces the published F(2,3), F(4,3) and NNPACK F(6,3) matrices exactly.

All matrices are computed in exact rational arithmetic (``fractions.Fraction``) and converted once to float64, so
every float64 entry is the correctly rounded value of the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

# ``None`` stands for the point at infinity.
Point = Fraction | None
PointLike = int | float | str | Fraction | None

DEFAULT_POINTS: dict[int, tuple[str, ...]] = {
    2: ("0", "1", "-1", "inf"),
    4: ("0", "1", "-1", "2", "-2", "inf"),
    6: ("0", "1", "-1", "2", "-2", "1/2", "-1/2", "inf"),
}
"""Default interpolation points per output tile size ``m`` (for ``r = 3``): Lavin-Gray's, and NNPACK's for F(6,3)."""

SCALINGS = ("lavin", "cook_toom", "unit")

_Matrix = tuple[tuple[Fraction, ...], ...]


def parse_point(point: PointLike) -> Point:
    """Turn ``0``, ``-2``, ``0.5``, ``"1/2"``, ``Fraction(1, 2)``, ``"inf"``, ``math.inf`` or ``None`` into an exact point.

    Returns:
        `Fraction | None`: the point, ``None`` for infinity.  Floats are converted exactly (``0.1`` is the binary
        fraction nearest to 1/10); pass ``"1/10"`` for the rational number.
    """
    if point is None:
        return None
    if isinstance(point, bool):
        raise TypeError(f"an interpolation point must be a number or a string, got {point!r}.")
    if isinstance(point, str):
        text = point.strip().lower()
        if text in ("inf", "+inf", "infinity", "∞"):
            return None
        try:
            return Fraction(text)
        except (ValueError, ZeroDivisionError) as err:
            raise ValueError(
                f"cannot parse the interpolation point {point!r}; use e.g. '0', '-2', '1/2' or 'inf'."
            ) from err
    if isinstance(point, float):
        if math.isnan(point):
            raise ValueError("an interpolation point cannot be NaN.")
        if math.isinf(point):
            if point < 0:
                raise ValueError("the point at infinity is written 'inf' (there is no separate -inf).")
            return None
        return Fraction(point)
    if isinstance(point, int | Fraction):
        return Fraction(point)
    raise TypeError(f"an interpolation point must be a number or a string, got {type(point).__name__}.")


def format_point(point: Point) -> str:
    """Inverse of `parse_point` for exact points: ``"0"``, ``"-1/2"``, ``"inf"``."""
    return "inf" if point is None else str(point)


def _check_points(points: Sequence[Point], m: int, r: int) -> None:
    n = m + r - 1
    if len(points) != n:
        raise ValueError(f"F({m}, {r}) needs n = m + r - 1 = {n} interpolation points, got {len(points)}.")
    if sum(p is None for p in points) > 1:
        raise ValueError("at most one interpolation point may be infinity.")
    finite = [p for p in points if p is not None]
    if len(set(finite)) != len(finite):
        raise ValueError(f"interpolation points must be distinct, got {[format_point(p) for p in points]}.")


def _vandermonde(points: Sequence[Point], cols: int) -> list[list[Fraction]]:
    rows = []
    for p in points:
        if p is None:
            rows.append([Fraction(0)] * (cols - 1) + [Fraction(1)])
        else:
            rows.append([p**j for j in range(cols)])
    return rows


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact Gauss-Jordan inverse of a square rational matrix."""
    size = len(matrix)
    aug = [list(row) + [Fraction(int(i == j)) for j in range(size)] for i, row in enumerate(matrix)]
    for col in range(size):
        pivot = next((i for i in range(col, size) if aug[i][col] != 0), None)
        if pivot is None:  # cannot happen for distinct points; kept as an internal invariant
            raise ArithmeticError("singular Vandermonde matrix")
        aug[col], aug[pivot] = aug[pivot], aug[col]
        inv_p = 1 / aug[col][col]
        aug[col] = [v * inv_p for v in aug[col]]
        for i in range(size):
            if i != col and aug[i][col] != 0:
                factor = aug[i][col]
                aug[i] = [a - factor * b for a, b in zip(aug[i], aug[col])]
    return [row[size:] for row in aug]


def _transpose(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    return [list(col) for col in zip(*matrix)]


def lagrange_denominators(points: Sequence[PointLike]) -> tuple[Fraction, ...]:
    """``prod_{j != i, p_j finite} (p_i - p_j)`` for each finite point, and 1 for the point at infinity."""
    pts = [parse_point(p) for p in points]
    out = []
    for i, p in enumerate(pts):
        den = Fraction(1)
        if p is not None:
            for j, q in enumerate(pts):
                if j != i and q is not None:
                    den *= p - q
        out.append(den)
    return tuple(out)


def _scalings(
    points: tuple[Point, ...], m: int, r: int, scaling: str
) -> tuple[list[Fraction], list[Fraction], list[Fraction]]:
    n = len(points)
    one = [Fraction(1)] * n
    if scaling == "unit":
        return list(one), list(one), list(one)
    den = lagrange_denominators(points)
    s_a, s_b, s_g = list(one), list(den), [1 / d for d in den]
    if scaling == "cook_toom":
        return s_a, s_b, s_g
    # "lavin": the published sign conventions.
    for i, p in enumerate(points):
        if p == 0 and s_g[i] < 0:
            s_g[i], s_b[i] = -s_g[i], -s_b[i]
    if r == 3 and m == 2 and points == tuple(parse_point(p) for p in DEFAULT_POINTS[2]):
        # Lavin & Gray's F(2,3) uses the row (0, 1, 0, -1) for infinity in B^T and (0, 1, -1, -1) in A^T.
        s_a[-1], s_b[-1] = -s_a[-1], -s_b[-1]
    return s_a, s_b, s_g


def _to_tensor(matrix: Sequence[Sequence[Fraction]]) -> torch.Tensor:
    return torch.tensor([[float(v) for v in row] for row in matrix], dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class WinogradTransforms:
    """The matrices of one F(m, r) algorithm and their Vandermonde factorisation.

    Invariants (checked by the tests):
    ``AT = VmT * scale_a[None, :]``, ``G = scale_g[:, None] * Vr``, ``BT = scale_b[:, None] * VnInvT`` and
    ``scale_a * scale_b * scale_g == 1``.

    Args:
        m (`int`): outputs per tile.
        r (`int`): filter taps.
        points (`tuple[Fraction | None, ...]`): the ``n = m + r - 1`` interpolation points (``None`` = infinity).
        AT (`torch.Tensor`): ``(m, n)`` float64 output transform ``A^T``.
        G (`torch.Tensor`): ``(n, r)`` float64 filter transform.
        BT (`torch.Tensor`): ``(n, n)`` float64 input transform ``B^T``.
        VmT, Vr, VnInvT (`torch.Tensor`): the unscaled factors ``V_m^T (m, n)``, ``V_r (n, r)``, ``V_n^{-T} (n, n)``.
        scale_a, scale_b, scale_g (`torch.Tensor`): ``(n,)`` float64 diagonals of ``S_A``, ``S_B``, ``S_G``.
        exact (`dict[str, tuple] | None`): the exact rational ``"AT"``, ``"G"``, ``"BT"`` when the scalings are
            rational (always, for `winograd_transforms`); ``None`` after a float rescaling.
    """

    m: int
    r: int
    points: tuple[Point, ...]
    AT: torch.Tensor
    G: torch.Tensor
    BT: torch.Tensor
    VmT: torch.Tensor
    Vr: torch.Tensor
    VnInvT: torch.Tensor
    scale_a: torch.Tensor
    scale_b: torch.Tensor
    scale_g: torch.Tensor
    exact: dict[str, _Matrix] | None = None

    @property
    def n(self) -> int:
        """Input tile size ``m + r - 1``."""
        return self.m + self.r - 1

    def rescaled(self, mult_b: torch.Tensor, mult_g: torch.Tensor) -> WinogradTransforms:
        """Multiply ``S_B`` by ``mult_b`` and ``S_G`` by ``mult_g`` (``(n,)``, nonzero) and divide ``S_A`` by their
        product, so the algorithm stays exact.  Computed in float64; ``exact`` is dropped."""
        mult_b = torch.as_tensor(mult_b, dtype=torch.float64).reshape(-1)
        mult_g = torch.as_tensor(mult_g, dtype=torch.float64).reshape(-1)
        if mult_b.shape != (self.n,) or mult_g.shape != (self.n,):
            raise ValueError(
                f"scale multipliers must have shape ({self.n},), got {tuple(mult_b.shape)} and {tuple(mult_g.shape)}."
            )
        if bool((mult_b == 0).any()) or bool((mult_g == 0).any()):
            raise ValueError("scale multipliers must be nonzero.")
        s_a = self.scale_a / (mult_b * mult_g)
        s_b = self.scale_b * mult_b
        s_g = self.scale_g * mult_g
        return WinogradTransforms(
            m=self.m,
            r=self.r,
            points=self.points,
            AT=self.VmT * s_a[None, :],
            G=s_g[:, None] * self.Vr,
            BT=s_b[:, None] * self.VnInvT,
            VmT=self.VmT,
            Vr=self.Vr,
            VnInvT=self.VnInvT,
            scale_a=s_a,
            scale_b=s_b,
            scale_g=s_g,
            exact=None,
        )

    def __repr__(self) -> str:
        pts = ", ".join(format_point(p) for p in self.points)
        return f"WinogradTransforms(F({self.m}, {self.r}), points=({pts}))"


def winograd_transforms(
    m: int,
    r: int = 3,
    points: Sequence[PointLike] | None = None,
    scaling: Literal["lavin", "cook_toom", "unit"] = "lavin",
) -> WinogradTransforms:
    """Build the F(m, r) transforms ``A^T, G, B^T`` from interpolation points.

    Args:
        m (`int`): outputs per tile (``>= 1``).
        r (`int`, defaults to `3`): filter taps (``>= 1``).
        points (`Sequence`, *optional*): ``m + r - 1`` distinct points, at most one infinity (``"inf"``); see
            `parse_point` for accepted forms.  Defaults to `DEFAULT_POINTS```[m]`` for ``r = 3``.
        scaling (`str`, defaults to `"lavin"`): the diagonal scalings, one of ``"lavin"``, ``"cook_toom"``,
            ``"unit"`` (see the module docstring).

    Returns:
        `WinogradTransforms` with float64 CPU tensors.

    Example:

    ```py
    >>> t = winograd_transforms(2)
    >>> t.BT
    tensor([[ 1.,  0., -1.,  0.],
            [ 0.,  1.,  1.,  0.],
            [ 0., -1.,  1.,  0.],
            [ 0.,  1.,  0., -1.]], dtype=torch.float64)
    ```
    """
    for name, value in (("m", m), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if scaling not in SCALINGS:
        raise ValueError(f"`scaling` must be one of {SCALINGS}, got {scaling!r}.")
    if points is None:
        if r != 3 or m not in DEFAULT_POINTS:
            raise ValueError(
                f"there are default points only for F(2,3), F(4,3) and F(6,3); pass `points` for F({m}, {r})."
            )
        points = DEFAULT_POINTS[m]
    pts = tuple(parse_point(p) for p in points)
    _check_points(pts, m, r)
    n = m + r - 1

    vm_t = _transpose(_vandermonde(pts, m))  # (m, n)
    vr = _vandermonde(pts, r)  # (n, r)
    vn_inv_t = _transpose(_inverse(_vandermonde(pts, n)))  # (n, n)
    s_a, s_b, s_g = _scalings(pts, m, r, scaling)

    at = tuple(tuple(vm_t[i][j] * s_a[j] for j in range(n)) for i in range(m))
    g = tuple(tuple(s_g[i] * vr[i][k] for k in range(r)) for i in range(n))
    bt = tuple(tuple(s_b[i] * vn_inv_t[i][j] for j in range(n)) for i in range(n))
    return WinogradTransforms(
        m=m,
        r=r,
        points=pts,
        AT=_to_tensor(at),
        G=_to_tensor(g),
        BT=_to_tensor(bt),
        VmT=_to_tensor(vm_t),
        Vr=_to_tensor(vr),
        VnInvT=_to_tensor(vn_inv_t),
        scale_a=torch.tensor([float(v) for v in s_a], dtype=torch.float64),
        scale_b=torch.tensor([float(v) for v in s_b], dtype=torch.float64),
        scale_g=torch.tensor([float(v) for v in s_g], dtype=torch.float64),
        exact={"AT": at, "G": g, "BT": bt},
    )


def balanced_multipliers(transforms: WinogradTransforms) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free scale multipliers that equalise the row norms of ``B^T`` and ``G``.

    ``mult_b[i] = 1 / ||B^T_i||_2`` and ``mult_g[i] = 1 / ||G_i||_2``, each normalised to a geometric mean of 1 (a
    global gain is invisible to absmax quantizers).  For white inputs and weights this equalises the expected
    standard deviation of every Winograd position of ``V = B^T d B``, ``U = G g G^T`` and their product, which is
    what a quantizer whose group spans several positions wants.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``(mult_b, mult_g)``, positive float64 ``(n,)`` tensors to pass to
        `WinogradTransforms.rescaled`.
    """
    mult_b = 1.0 / transforms.BT.norm(dim=1)
    mult_g = 1.0 / transforms.G.norm(dim=1)
    mult_b = mult_b / mult_b.log().mean().exp()
    mult_g = mult_g / mult_g.log().mean().exp()
    return mult_b, mult_g


def winograd_correlate_1d(d: torch.Tensor, g: torch.Tensor, transforms: WinogradTransforms) -> torch.Tensor:
    """The 1-D algorithm ``y = A^T [ (G g) ⊙ (B^T d) ]`` over the last dimension.

    Args:
        d (`torch.Tensor`): ``(..., n)`` input tiles.
        g (`torch.Tensor`): ``(..., r)`` filters (broadcast against ``d``).
        transforms (`WinogradTransforms`): the algorithm.

    Returns:
        `torch.Tensor`: ``(..., m)`` with ``y_i = sum_k d_{i+k} g_k`` (cross-correlation), in the dtype of ``d``.
    """
    at, g_mat, bt = (t.to(device=d.device, dtype=d.dtype) for t in (transforms.AT, transforms.G, transforms.BT))
    return ((g @ g_mat.T) * (d @ bt.T)) @ at.T
