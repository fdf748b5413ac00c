"""Group-wise quantization of the Winograd domain: weights ``U``, activations ``V`` and the Hadamard-stage output ``M``.

All quantizers are symmetric with signed codes in ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]`` and an absmax step
``s = max|x| / qmax`` over their group (so the codes stay in ``[-qmax, qmax]``):

* ``U: (n^2, K, C)`` (weight, computed offline in float64): one step per (Winograd position, output channel,
  group of ``g`` input channels), i.e. step shape ``(n^2, K, C/g, 1)`` on the grouped view ``(n^2, K, C/g, g)``;
* ``V: (n^2, C, P)`` (input-transform output, **dynamic**: recomputed from each batch, no calibration): one step per
  (position, group of ``g`` input channels, tile) - step ``(n^2, C/g, 1, P)`` - or, with the ``"tile"``
  granularity, per (group, tile) shared by all positions - step ``(1, C/g, 1, P)``;
* ``M: (n^2, K, P)`` (optional, dynamic): one step per (output channel, tile) over all positions - ``(1, K, P)``.

The Hadamard stage is ``M[xi, k, t] = sum_j sU[xi, k, j] sV[xi, j, t] sum_{c in group j} qU[xi, k, c] qV[xi, c, t]``.
`hadamard_fake` computes it with fake-quantized floats (differentiable: STE for the values, LSQ gradients for the
steps, which are functions of the transform scales); `hadamard_int` computes the inner sums on integer codes
(exactly: see `exact_accumulator_dtype`) and applies the two steps per group in floating point.
"""

from __future__ import annotations

import torch

from ..quant import fake_quantize, lp_search_qparams, qrange, quantize

_MIN_STEP = 1e-30  # step of an all-zero group (its codes are 0 whatever the step)


def _absmax_inplace(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``max|x|`` over ``dims`` (kept) as ``max(max x, -min x)``: two fast reductions, no ``|x|`` temporary."""
    return torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())


def absmax_step(x: torch.Tensor, dims: int | tuple[int, ...], qmax: int) -> torch.Tensor:
    """Differentiable absmax step ``max|x| / qmax`` over ``dims`` (kept as size 1)."""
    return (x.abs().amax(dim=dims, keepdim=True) / qmax).clamp_min(_MIN_STEP)


def channel_groups(channels: int, group_size: int | None) -> tuple[int, int]:
    """``(number of groups, group size)`` of ``channels`` input channels; ``group_size=None`` is one group."""
    g = channels if group_size is None else group_size
    if channels % g:
        raise ValueError(f"`group_size` ({g}) must divide the number of input channels ({channels}).")
    return channels // g, g


def weight_qparams(
    u: torch.Tensor, bits: int, group_size: int | None, method: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped view and step of the Winograd-domain weight.

    Args:
        u (`torch.Tensor`): ``(n^2, K, C)``, ideally float64.
        bits (`int`): code width.
        group_size (`int`, *optional*): input channels per group (``None`` = all).
        method (`str`, defaults to `"minmax"`): ``"minmax"`` (absmax) or ``"mse"`` (absmax times the MSE-optimal
            clipping ratio found by `lp_search_qparams`; the ratio is a constant, the absmax stays differentiable).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``u`` viewed as ``(n^2, K, G, g)`` and its step ``(n^2, K, G, 1)``.
    """
    n2, k, c = u.shape
    groups, g = channel_groups(c, group_size)
    ug = u.reshape(n2, k, groups, g)
    _, qmax = qrange(bits, True)
    step = absmax_step(ug, -1, qmax)
    if method == "mse":
        searched, _ = lp_search_qparams(ug.detach(), bits, True, p=2.0)
        ratio = (searched.to(step.dtype) / step.detach()).clamp(max=1.0)
        step = (step * ratio).clamp_min(_MIN_STEP)
    elif method != "minmax":
        raise ValueError(f"`weight_init` must be 'minmax' or 'mse', got {method!r}.")
    return ug, step


def act_step(v: torch.Tensor, bits: int, group_size: int | None, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped view ``(n^2, G, g, P)`` of ``V: (n^2, C, P)`` and its dynamic absmax step.

    The step is ``(n^2, G, 1, P)`` for ``granularity="position"`` and ``(1, G, 1, P)`` for ``"tile"``.
    """
    n2, c, p = v.shape
    groups, g = channel_groups(c, group_size)
    vg = v.reshape(n2, groups, g, p)
    _, qmax = qrange(bits, True)
    if granularity == "position":
        dims: tuple[int, ...] = (2,)
    elif granularity == "tile":
        dims = (0, 2)
    else:
        raise ValueError(f"`act_granularity` must be 'position' or 'tile', got {granularity!r}.")
    return vg, absmax_step(vg, dims, qmax)


def hadamard_fake(
    u64: torch.Tensor,
    v: torch.Tensor,
    bits: int,
    group_size: int | None,
    act_granularity: str = "position",
    weight_init: str = "minmax",
) -> torch.Tensor:
    """Fake-quantized Hadamard stage ``M = Q(U) @ Q(V)``: ``(n^2, K, C) x (n^2, C, P) -> (n^2, K, P)``.

    ``U`` is quantized in its own (float64) dtype and cast to the dtype of ``v``.  Differentiable w.r.t. ``u64`` and
    ``v`` (and through their steps) with the STE / LSQ gradients of `fake_quantize`.
    """
    qmin, qmax = qrange(bits, True)
    ug, su = weight_qparams(u64, bits, group_size, weight_init)
    u_hat = fake_quantize(ug, su, None, qmin, qmax).reshape(u64.shape).to(v.dtype)
    vg, sv = act_step(v, bits, group_size, act_granularity)
    v_hat = fake_quantize(vg, sv, None, qmin, qmax).reshape(v.shape)
    return torch.matmul(u_hat, v_hat)


def exact_accumulator_dtype(group_size: int, bits: int, dtype: torch.dtype) -> torch.dtype:
    """The float dtype in which a sum of ``group_size`` products of ``bits``-bit codes is exact.

    Codes satisfy ``|q| <= 2^(b-1)``, so ``|sum| <= g * 2^(2b-2)``; every integer up to ``2^24`` (float32) or
    ``2^53`` (float64) is representable and so are all partial sums.  Returns ``dtype`` when it is exact, else float64.
    """
    bound = group_size * 4 ** (bits - 1)
    if dtype == torch.float32 and bound <= 2**24:
        return torch.float32
    if bound > 2**53:  # unreachable for bits <= 8 and any realistic channel count
        raise ValueError(f"a group of {group_size} {bits}-bit products cannot be accumulated exactly in float64.")
    return torch.float64


def quantize_weight_codes(
    u64: torch.Tensor, bits: int, group_size: int | None, weight_init: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline weight quantization: int32 codes ``(G, n^2, K, g)`` (group-major for the GEMM loop) and float64 steps
    ``(G, n^2, K, 1)``."""
    with torch.no_grad():
        ug, su = weight_qparams(u64, bits, group_size, weight_init)
        qmin, qmax = qrange(bits, True)
        codes = quantize(ug, su, None, qmin, qmax)
        return codes.permute(2, 0, 1, 3).contiguous(), su.permute(2, 0, 1, 3).contiguous()


def hadamard_int(
    codes_u: torch.Tensor,
    step_u: torch.Tensor,
    v: torch.Tensor,
    bits: int,
    group_size: int | None,
    act_granularity: str = "position",
) -> torch.Tensor:
    """Integer Hadamard stage: quantize ``V`` dynamically, multiply codes group by group with exact integer
    accumulation, scale each group's sum by ``sU * sV`` and add the groups in the dtype of ``v``.

    Args:
        codes_u (`torch.Tensor`): ``(G, n^2, K, g)`` integer weight codes from `quantize_weight_codes`.
        step_u (`torch.Tensor`): ``(G, n^2, K, 1)`` weight steps.
        v (`torch.Tensor`): ``(n^2, C, P)`` input-transform output (float32 or float64).
        bits, group_size, act_granularity: as for `hadamard_fake`.

    Returns:
        `torch.Tensor`: ``M: (n^2, K, P)`` in the dtype of ``v``.  Not differentiable.
    """
    with torch.no_grad():
        groups, n2, k, g = codes_u.shape
        qmin, qmax = qrange(bits, True)
        n2v, c, p = v.shape
        if c != groups * g:
            raise ValueError(f"`v` has {c} channels but the weight codes {groups} groups of {g}.")
        vg = v.reshape(n2v, groups, g, p)
        dims = (2,) if act_granularity == "position" else (0, 2)
        if act_granularity not in ("position", "tile"):
            raise ValueError(f"`act_granularity` must be 'position' or 'tile', got {act_granularity!r}.")
        # the absmax step of `act_step` and the codes of `quantize`, computed in place (inference is memory-bound)
        sv = _absmax_inplace(vg, dims).div_(qmax).clamp_min_(_MIN_STEP)
        acc_dtype = exact_accumulator_dtype(g, bits, v.dtype)
        cv = torch.div(vg, sv).round_().clamp_(qmin, qmax).to(acc_dtype)  # integer-valued codes
        cu = codes_u.to(acc_dtype)
        su = step_u.to(v.dtype)
        out = None
        for j in range(groups):  # loop over channel groups only; tiles and positions are batched
            acc = torch.matmul(cu[j], cv[:, j]).to(v.dtype)  # (n^2, K, g) @ (n^2, g, P): exact integer sums
            acc.mul_(su[j]).mul_(sv[:, j])
            out = acc if out is None else out.add_(acc)
        return out


def quantize_output(m_prod: torch.Tensor, bits: int, fake: bool) -> torch.Tensor:
    """Re-quantize ``M: (n^2, K, P)`` with one dynamic step per (output channel, tile) spanning all positions.

    ``fake=True`` uses `fake_quantize` (differentiable); ``False`` returns ``codes * step`` without gradient.
    """
    qmin, qmax = qrange(bits, True)
    if fake:
        step = absmax_step(m_prod, 0, qmax)  # (1, K, P)
        return fake_quantize(m_prod, step, None, qmin, qmax)
    with torch.no_grad():
        step = _absmax_inplace(m_prod, (0,)).div_(qmax).clamp_min_(_MIN_STEP)
        return torch.div(m_prod, step).round_().clamp_(qmin, qmax).mul_(step)
