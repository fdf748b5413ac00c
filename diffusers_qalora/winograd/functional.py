"""Functional (stateless) stages of a 2-D Winograd convolution F(m x m, r x r), vectorised over tiles.

For an input ``x: (N, C, H, W)``, weight ``w: (K, C, r, r)`` and zero padding ``(p_h, p_w)`` the output is
``(N, K, H_o, W_o)`` with ``H_o = H + 2 p_h - r + 1``.  The stages are

1. tiling (`tile_input`): ``T_h = ceil(H_o / m)`` tile rows; pad ``p_h`` rows on top and
   ``p_h + T_h m - H_o`` at the bottom (so the padded height is ``(T_h - 1) m + n``), likewise for the width, and cut
   overlapping ``n x n`` tiles with stride ``m``: ``d: (N, C, T_h, T_w, n, n)``;
2. input transform (`input_transform`): ``V = B^T d B``, laid out as ``(n^2, C, P)`` with ``P = N T_h T_w`` tiles;
3. weight transform (`weight_transform`): ``U = G w G^T``, laid out as ``(n^2, K, C)``;
4. Hadamard stage: ``n^2`` independent GEMMs over channels, ``M[xi] = U[xi] @ V[xi]``: ``(n^2, K, P)``;
5. output transform (`output_transform`): ``Y = A^T M A`` per tile, untiled to ``(N, K, T_h m, T_w m)`` and cropped
   to ``(H_o, W_o)``.

Winograd positions ``(xi, nu)`` are flattened row-major as ``xi * n + nu``; tiles as ``(N, T_h, T_w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .transforms import WinogradTransforms


@dataclass(frozen=True)
class TileGrid:
    """Geometry of the tiling of one input batch.

    Args:
        batch (`int`): ``N``.
        tiles_h, tiles_w (`int`): ``T_h``, ``T_w``.
        out_h, out_w (`int`): ``H_o``, ``W_o`` (before cropping the grid is ``T_h m x T_w m``).
    """

    batch: int
    tiles_h: int
    tiles_w: int
    out_h: int
    out_w: int

    @property
    def num_tiles(self) -> int:
        """``P = N T_h T_w``."""
        return self.batch * self.tiles_h * self.tiles_w


def conv_output_size(height: int, width: int, padding: tuple[int, int], r: int = 3) -> tuple[int, int]:
    """``(H + 2 p_h - r + 1, W + 2 p_w - r + 1)``; raises a ``ValueError`` when it is not positive."""
    out_h, out_w = height + 2 * padding[0] - r + 1, width + 2 * padding[1] - r + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"input of spatial size {height}x{width} with padding {tuple(padding)} is smaller than the {r}x{r} kernel."
        )
    return out_h, out_w


def tile_input(x: torch.Tensor, m: int, r: int, padding: tuple[int, int]) -> tuple[torch.Tensor, TileGrid]:
    """Zero-pad ``x: (N, C, H, W)`` and cut overlapping tiles ``(N, C, T_h, T_w, n, n)`` (a strided view)."""
    n = m + r - 1
    batch, _, height, width = x.shape
    out_h, out_w = conv_output_size(height, width, padding, r)
    tiles_h, tiles_w = math.ceil(out_h / m), math.ceil(out_w / m)
    ph, pw = padding
    x = F.pad(x, (pw, pw + tiles_w * m - out_w, ph, ph + tiles_h * m - out_h))
    tiles = x.unfold(2, n, m).unfold(3, n, m)
    return tiles, TileGrid(batch, tiles_h, tiles_w, out_h, out_w)


def input_transform(tiles: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """``V = B^T d B`` for tiles ``(N, C, T_h, T_w, n, n)``, returned as ``(n^2, C, P)``.

    Computed as one GEMM with the Kronecker matrix ``B^T (x) B^T`` ``(n^2, n^2)`` on the tiles laid out position-major
    ``(n^2, C P)``: ``V[(a, b)] = sum_{i, j} B^T[a, i] B^T[b, j] d[i, j]``.  (Batched ``n x n`` matmuls over every tile
    are several times slower on CPU.)
    """
    n = bt.shape[0]
    channels = tiles.shape[1]
    d = tiles.permute(4, 5, 1, 0, 2, 3).reshape(n * n, -1)  # (n^2, C * P), one copy
    return (torch.kron(bt, bt) @ d).view(n * n, channels, -1)


def weight_transform(weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``U = G w G^T`` for ``w: (K, C, r, r)``, returned as ``(n^2, K, C)``."""
    n = g.shape[0]
    k, c = weight.shape[:2]
    u = g @ weight @ g.T  # (K, C, n, n)
    return u.permute(2, 3, 0, 1).reshape(n * n, k, c)


def output_transform(m_prod: torch.Tensor, at: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """``Y = A^T M A`` for ``M: (n^2, K, P)``; returns the cropped output ``(N, K, H_o, W_o)``.

    One GEMM with ``A^T (x) A^T`` ``(m^2, n^2)``, then untiling.
    """
    m, n = at.shape
    k = m_prod.shape[1]
    y = torch.kron(at, at) @ m_prod.reshape(n * n, -1)  # (m^2, K * P)
    y = y.view(m, m, k, grid.batch, grid.tiles_h, grid.tiles_w).permute(3, 2, 4, 0, 5, 1)
    y = y.reshape(grid.batch, k, grid.tiles_h * m, grid.tiles_w * m)
    return y[:, :, : grid.out_h, : grid.out_w]


def winograd_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: tuple[int, int] = (1, 1),
    transforms: WinogradTransforms | None = None,
) -> torch.Tensor:
    """Full-precision Winograd convolution, equal to ``F.conv2d(x, weight, bias, padding=padding)`` up to rounding.

    Args:
        x (`torch.Tensor`): ``(N, C, H, W)``.
        weight (`torch.Tensor`): ``(K, C, r, r)``.
        bias (`torch.Tensor`, *optional*): ``(K,)``.
        padding (`tuple[int, int]`, defaults to `(1, 1)`): zero padding ``(p_h, p_w)``.
        transforms (`WinogradTransforms`, *optional*): defaults to F(4, 3) with the standard matrices.

    Returns:
        `torch.Tensor`: ``(N, K, H_o, W_o)`` in the dtype of ``x``.  The weight transform runs in float64.
    """
    if transforms is None:
        from .transforms import winograd_transforms

        transforms = winograd_transforms(4)
    if weight.shape[-2:] != (transforms.r, transforms.r):
        raise ValueError(f"weight kernel {tuple(weight.shape[-2:])} does not match F({transforms.m}, {transforms.r}).")
    dev, dt = x.device, x.dtype
    tiles, grid = tile_input(x, transforms.m, transforms.r, padding)
    v = input_transform(tiles, transforms.BT.to(dev, dt))
    u = weight_transform(weight.to(torch.float64), transforms.G.to(dev)).to(dt)
    y = output_transform(torch.matmul(u, v), transforms.AT.to(dev, dt), grid)
    if bias is not None:
        y = y + bias.to(dt).view(1, -1, 1, 1)
    return y
