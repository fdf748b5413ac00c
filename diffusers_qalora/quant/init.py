"""Initialisers for step sizes and zero points: min-max and an Lp search over clipping ratios.

Both reduce over the **last** dimension of ``x`` (keeping it as size 1), so a weight in its grouped view
``(C_out, G, E)`` gets one step per group, and a flattened activation ``(1, 1, N)`` gets one per tensor.
"""

from __future__ import annotations

import torch

from .primitives import qrange

_EPS = 1e-8


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, eps: float = _EPS
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step sizes (and integer zero points) that cover ``[lo, hi]`` elementwise (float32 tensors of one shape).

    Symmetric: ``s = max(|lo|, |hi|) / qmax``.  Asymmetric: the range ``[min(lo, 0), max(hi, 0)]`` over
    ``qmax - qmin`` codes, so that 0 is exact, with ``z = round(qmin - min / s)`` clamped to the codes.  Steps are at
    least ``eps`` (an all-zero range then has codes ``z``, i.e. exactly 0).
    """
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        # qmax (not |qmin|) keeps the positive end representable; the extra negative code is harmless.
        return (absmax / qmax).clamp_min(eps), None
    lo = torch.clamp(lo, max=0.0)  # the range always contains 0 so that zero is exact (padding, ReLU)
    hi = torch.clamp(hi, min=0.0)
    step = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero_point = torch.clamp(torch.round(-lo / step) + qmin, qmin, qmax)
    return step, zero_point


def minmax_qparams(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step (and zero point if asymmetric) that map ``[min, max]`` of the last dim of ``x`` onto the code range."""
    x = x.detach().float()
    return qparams_from_range(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), bits, symmetric)


def lp_search_qparams(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    p: float = 2.4,
    num_candidates: int = 80,
    min_ratio: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Search clipping ratios ``r`` in ``[min_ratio, 1]`` applied to the min-max range; keep, per slice of the last
    dim, the one whose quantization error ``sum |x - x_hat|^p`` is smallest.

    ``p = 2.4`` follows LAPQ (Nahshan et al.), as used for activation calibration in EfficientDM; ``p = 2`` is the MSE.
    """
    if num_candidates < 1:
        raise ValueError(f"`num_candidates` must be >= 1, got {num_candidates!r}.")
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"`min_ratio` must be in (0, 1], got {min_ratio!r}.")
    x = x.detach().float()
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    ratios = torch.linspace(1.0, min_ratio, num_candidates, device=x.device)
    # Candidates are evaluated in chunks of a few million elements: vectorised, with bounded memory.
    chunk = max(1, min(num_candidates, 4_000_000 // max(x.numel(), 1)))
    best_err = best_step = best_zp = None
    view = (-1,) + (1,) * x.dim()
    for start in range(0, num_candidates, chunk):
        r = ratios[start : start + chunk].reshape(view)
        step, zp = qparams_from_range(lo * r, hi * r, bits, symmetric)
        zp_ = 0.0 if zp is None else zp
        x_hat = (torch.clamp(torch.round(x / step) + zp_, qmin, qmax) - zp_) * step
        err = (x - x_hat).abs().pow(p).sum(dim=-1, keepdim=True)
        idx = err.argmin(dim=0, keepdim=True)  # first (largest ratio) wins ties, as a sequential scan would
        step = step.expand_as(err).gather(0, idx)[0]
        zp = None if zp is None else zp.expand_as(err).gather(0, idx)[0]
        err = err.gather(0, idx)[0]
        if best_err is None:
            best_err, best_step, best_zp = err, step, zp
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_step = torch.where(better, step, best_step)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_step, best_zp


def init_qparams(
    x: torch.Tensor, bits: int, symmetric: bool, method: str = "mse"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to `minmax_qparams` (``"minmax"``), the MSE search (``"mse"``, p=2) or LAPQ's p=2.4 (``"lp"``)."""
    if method == "minmax":
        return minmax_qparams(x, bits, symmetric)
    if method == "mse":
        return lp_search_qparams(x, bits, symmetric, p=2.0)
    if method == "lp":
        return lp_search_qparams(x, bits, symmetric, p=2.4)
    raise ValueError(f"`init_method` must be one of 'minmax', 'mse' or 'lp', got {method!r}.")


INIT_METHODS = ("minmax", "mse", "lp")
