"""Figures: image grids and per-timestep step-size curves.

Figures are drawn on matplotlib's Agg canvas directly (no `pyplot`), so importing or calling these functions never
changes the user's matplotlib backend and works on machines without a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["make_image_grid", "plot_step_sizes", "save_image_grid"]


def make_image_grid(images: torch.Tensor, nrow: int = 10, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one array.

    Args:
        images (`torch.Tensor`): `(N, C, H, W)` images in `[0, 1]` with `C` 1 or 3.
        nrow (`int`, *optional*, defaults to `10`): images per row.
        padding (`int`, *optional*, defaults to `1`): pixels between images.
        pad_value (`float`, *optional*, defaults to `1.0`): value of the padding (white).

    Returns:
        `np.ndarray`: `(rows, cols)` (grey) or `(rows, cols, 3)` uint8 array.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}.")
    if nrow < 1:
        raise ValueError(f"`nrow` must be a positive integer, got {nrow!r}.")
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), float(pad_value))
    x = images.detach().float().cpu().clamp(0, 1)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int = 10, scale: int = 2, padding: int = 1
) -> Path:
    """Save images as one PNG grid.

    Args:
        images (`torch.Tensor`): `(N, C, H, W)` images in `[0, 1]` with `C` 1 or 3.
        path (`str` or `os.PathLike`): output PNG file; its folder is created.
        nrow (`int`, *optional*, defaults to `10`): images per row.
        scale (`int`, *optional*, defaults to `2`): nearest-neighbour upscaling, so 16x16 digits stay visible.
        padding (`int`, *optional*, defaults to `1`): pixels between images (before scaling).

    Returns:
        `pathlib.Path`: the written file.
    """
    from PIL import Image

    if scale < 1:
        raise ValueError(f"`scale` must be a positive integer, got {scale!r}.")
    array = make_image_grid(images, nrow=nrow, padding=padding)
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path


def plot_step_sizes(
    table: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    title: str = "Activation step size per timestep",
    ylabel: str = "step size",
    log_y: bool = False,
) -> Path:
    """Plot per-timestep activation step sizes of chosen layers, one line per layer.

    Args:
        table (`Mapping[str, tuple[Sequence[float], Sequence[float]]]`):
            Layer name -> `(timesteps, step_sizes)` of the same length.
        path (`str` or `os.PathLike`): output image file (PNG, SVG or PDF by suffix); its folder is created.
        title (`str`, *optional*): figure title.
        ylabel (`str`, *optional*, defaults to `"step size"`): y-axis label.
        log_y (`bool`, *optional*, defaults to `False`): logarithmic y axis, for layers of very different ranges.

    Returns:
        `pathlib.Path`: the written file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not table:
        raise ValueError("`table` must hold at least one layer, got an empty mapping.")
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (timesteps, values) in table.items():
        t = np.asarray(timesteps, dtype=np.float64).reshape(-1)
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if t.shape != v.shape:
            raise ValueError(f"Layer {name!r}: got {t.size} timesteps but {v.size} step sizes.")
        order = np.argsort(t)
        ax.plot(t[order], v[order], marker="o", markersize=2.5, linewidth=1.2, label=name)
    ax.set_xlabel("timestep")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
