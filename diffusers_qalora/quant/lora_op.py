"""One QALoRA layer, ``op(x, Q(W0 + scaling * B @ A))``, as one autograd function.

Seen alone, the weight path `fake_quantize_lora_merged` must hand ``B`` and ``A`` the gradient of the masked weight
gradient ``G * M`` (``M``: the straight-through mask): two rank-``r`` products over all ``N`` weights, ``2 r N``
multiply-adds.  At Stable Diffusion scale that is more than the layer's own backward pass wherever a layer has fewer
output positions ``P`` than ``r`` per weight (the 1280-channel blocks at 16x16 latents see ``P = 4`` to ``64``).  Seen
with the op, the same gradients come from the layer's inputs and output gradient, as plain LoRA takes them:

    G * M = G - G * (1 - M)            with  G = dY^T X  (the weight gradient; clipped entries are few)
    grad B = scaling * ((dY^T (X A^T)) - (G * (1 - M)) A^T)
    grad A = scaling * (((dY B)^T X) - B^T (G * (1 - M)))

``X A^T`` and ``dY B`` are the layer run with ``r`` channels (a convolution with kernel ``A``, a 1x1 convolution
with ``B``), ``2 r P (K + C_out)`` multiply-adds for ``K`` weights per output channel, and the correction is a sparse
product over the clipped entries only.  Those are found without scanning the weight (a scan costs as much as the
products it saves on CPU): only a cell's extreme base weights can clip (`clipped_positions`).  ``G`` itself is still
formed: the weight step size's LSQ gradient ``sum(G * d x_hat / d s)`` needs all of it, as full fine-tuning does.
Each layer takes the cheaper way (`lowrank_gradients_cheaper`); the forward pass and the input and step gradients are
those of the separate weight path.

A convolution with few output positions and a large weight (SD's 1280-channel blocks at small latents) runs as a
linear layer over its unfolded input (`conv_as_matmul`): oneDNN reorders the weight into its blocked layout on every
call, forward and backward, and writes the weight gradient into fresh pages, which there costs more than the
arithmetic.  The weight gradient ``G`` of a linear (or lowered) layer is written into a pooled buffer.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .primitives import (
    _WORKSPACE_CACHES,
    WORKSPACE,
    _code_bounds,
    merged_grouped_shape,
    merged_weight_backward_,
    merged_weight_forward,
    merged_weight_step_grad,
)

__all__ = ["clipped_positions", "conv_as_matmul", "lowrank_gradients_cheaper", "qalora_conv2d", "qalora_linear"]


def lowrank_gradients_cheaper(positions: int, out_features: int, per_output: int) -> bool:
    """Whether the LoRA gradients of a layer with ``positions`` output positions (batch included), ``out_features``
    outputs and ``per_output`` weights per output are cheaper through the layer's activations (``2 r P (K + C_out)``
    multiply-adds, in four small products) than through its weight gradient (``2 r C_out K``, in two large GEMMs).
    The small products run at about half the rate of the large ones on CPU (measured on SD1.5's layers), hence the
    factor 2.  The correction adds ``2 r`` per clipped weight: a few percent of the weights."""
    return 2 * positions * (per_output + out_features) < out_features * per_output


def conv_as_matmul(positions: int, out_channels: int, kernel_numel: int) -> bool:
    """Whether a CPU convolution with ``positions`` output positions (batch included) runs as one matrix product over
    its unfolded input (im2col) instead of through oneDNN (other devices keep their convolution).  oneDNN's cost there
    is the weight, not the arithmetic: it reorders the weight on every call (forward and both backward products) and
    writes the weight gradient into fresh pages; the product reads the weight as it lies and writes the gradient into
    a pooled buffer, for the price of unfolding the input (``positions`` rows of the weight's width) and folding its
    gradient back.  Measured on SD1.5's
    3x3 convolutions (1 thread, forward and backward): 1.7-4.6x faster at 4-64 positions with 1280 output channels,
    1.0-1.1x at 64 with 640, 0.8-0.9x at 256 with 320-640; 1x1 convolutions gain nothing
    (`benchmarks/results/conv_lowering.md`)."""
    return kernel_numel > 1 and 8 * positions <= out_channels


def _conv_output_size(size: tuple[int, int], kernel: tuple[int, int], conv) -> tuple[int, int]:
    stride, padding, dilation = conv
    return tuple((size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def _unfold(x: torch.Tensor, kernel: tuple[int, int], conv) -> torch.Tensor:
    """The convolution's input patches as the rows of a matrix, ``(N * P, C * kh * kw)``, in the weight's order."""
    stride, padding, dilation = conv
    cols = F.unfold(x, kernel, dilation, padding, stride)  # (N, C * kh * kw, P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _conv_weight_gradient(grad_y, x, weight, conv):
    stride, padding, dilation = conv
    return torch.ops.aten.convolution_backward(
        grad_y, x, weight, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False]
    )[1]


class _QALoraOp(torch.autograd.Function):
    """``y = op(x, x_hat)`` with ``x_hat = Q(W0 + scaling * B @ A)``; ``op`` is ``F.linear`` (``conv`` is ``None``)
    or ``F.conv2d`` with ``conv = (stride, padding, dilation)``.  ``W0`` and the bias are frozen."""

    @staticmethod
    def forward(ctx, x, w0, a, b, step, zero_point, bias, scaling, qmin, qmax, grad_scale, grouped_shape, conv):
        w_hat, d_step, inside = merged_weight_forward(w0, a, b, step, zero_point, scaling, qmin, qmax, grouped_shape)
        # A lowered convolution (`conv_as_matmul`) is, from here on, a linear layer over the unfolded input: ``fold``
        # keeps what turns its output and input gradient back into images.
        fold = None
        if conv is not None and x.device.type == "cpu":
            kernel = tuple(w0.shape[2:])
            out_size = _conv_output_size(tuple(x.shape[2:]), kernel, conv)
            positions = x.shape[0] * out_size[0] * out_size[1]
            if conv_as_matmul(positions, w0.shape[0], kernel[0] * kernel[1]):
                channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
                fold = (tuple(x.shape), kernel, conv, out_size, channels_last)
                x, conv = _unfold(x, kernel, conv), None
        if conv is None:
            y = F.linear(x, w_hat.view(w0.shape[0], -1), bias)
        else:
            y = F.conv2d(x, w_hat.view(w0.shape), bias, *conv)
        if fold is not None:
            n, out_size, channels_last = fold[0][0], fold[3], fold[4]
            y = y.view(n, *out_size, -1).permute(0, 3, 1, 2)  # channels-last in memory, as F.conv2d gives it then
            y = y if channels_last else y.contiguous()
        ctx.save_for_backward(x, w0, a, b, step, zero_point, d_step, inside, w_hat)
        ctx.settings = (scaling, grad_scale, conv, qmin, qmax, fold)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w0, a, b, step, zero_point, d_step, inside, w_hat = ctx.saved_tensors
        scaling, grad_scale, conv, qmin, qmax, fold = ctx.settings
        w_shape = w0.shape
        need_x, _, need_a, need_b, need_step = ctx.needs_input_grad[:5]
        out_features, rank = b.shape
        per_output = w_hat.numel() // out_features
        need_lora = need_a or need_b
        need_g = need_lora or need_step
        pooled_g = None
        # The input gradient and the weight gradient G, as the op's own backward pass computes them.
        if conv is None:
            x2 = x.reshape(-1, x.shape[-1])
            if fold is not None:
                grad_y = grad_y.permute(0, 2, 3, 1)  # rows in the order of the unfolded input's
            g2 = grad_y.reshape(-1, out_features)
            grad_x = g2.mm(w_hat.view(out_features, -1)) if need_x else None
            if grad_x is not None:
                grad_x = grad_x.view(x.shape) if fold is None else _fold_input_gradient(grad_x, fold)
            if need_g:  # into a pooled buffer: fresh pages for a weight-sized tensor cost more than the product
                pooled_g = g = WORKSPACE.take((out_features, per_output), torch.float32, x2.device)
                torch.mm(g2.t(), x2, out=g)
            else:
                g = None
        else:
            grad_x, g, _ = torch.ops.aten.convolution_backward(
                grad_y, x, w_hat.view(w_shape), None, *conv, False, [0, 0], 1, [need_x, need_g, False]
            )
            g = None if g is None else g.contiguous()  # a channels-last input gives a channels-last gradient
        WORKSPACE.give(w_hat)
        positions = grad_y.numel() // out_features
        grad_a = grad_b = None
        if need_lora and lowrank_gradients_cheaper(positions, out_features, per_output):
            step_grad = merged_weight_step_grad(g, d_step) if need_step else None
            clipped = clipped_positions(w0, a, b, scaling, step, zero_point, qmin, qmax, d_step, inside)
            values = g.view(-1)[clipped]
            layer_x, layer_grad = (x2, g2) if conv is None else (x, grad_y)  # a copied 2-D input is not copied again
            lora_a = a.reshape(rank, -1) if conv is None else a  # a lowered convolution's kernel, as a matrix
            grad_a, grad_b = _lowrank_lora_gradients(layer_x, layer_grad, lora_a, b, conv, clipped, values, per_output)
            grad_a = grad_a.view(a.shape)
            if scaling != 1.0:
                grad_a.mul_(scaling)
                grad_b.mul_(scaling)
        elif need_g:
            # Dense: one pass masks G in place and sums the step gradient, then the two rank-r products.
            step_grad = merged_weight_backward_(g, d_step, inside)
            if need_lora:
                lora_g = g.view(out_features, per_output)
                if scaling != 1.0:
                    lora_g.mul_(scaling)
                grad_b = lora_g.mm(a.reshape(rank, -1).t())
                grad_a = b.t().mm(lora_g).view(a.shape)
        WORKSPACE.give(d_step, inside, pooled_g)
        grad_step = step_grad.reshape(step.shape) * grad_scale if need_step else None
        return (grad_x, None, grad_a if need_a else None, grad_b if need_b else None, grad_step) + (None,) * 8


def _fold_input_gradient(grad_cols: torch.Tensor, fold) -> torch.Tensor:
    """The input gradient of a lowered convolution from that of its unfolded input, ``(N * P, C * kh * kw)``."""
    x_shape, kernel, (stride, padding, dilation), _, channels_last = fold
    cols = grad_cols.view(x_shape[0], -1, grad_cols.shape[1]).transpose(1, 2)
    grad_x = F.fold(cols, x_shape[2:], kernel, dilation, padding, stride)
    return grad_x.contiguous(memory_format=torch.channels_last) if channels_last else grad_x


# Per base weight: its largest and smallest entries per cell of the grouped view, the only candidates for clipping
# (see `clipped_positions`).  Rebuilt when the weight changes (its version counter) or its view does.
# Keyed by ``id``, holding a weak reference (a tensor cannot be a WeakKeyDictionary key: its ``==`` is elementwise).
_EXTREMES: dict[int, tuple] = {}
_WORKSPACE_CACHES.append(_EXTREMES)  # freed by `clear_workspace()` with the pool
# Share of each cell kept as candidates, each side.  A cell whose candidates run out is scanned whole.
EXTREME_FRACTION = 1 / 32


def _extremes(w0: torch.Tensor, cells: int, per_cell: int):
    key = (cells, per_cell, w0._version)
    hit = _EXTREMES.get(id(w0))
    if hit is not None and hit[0]() is w0 and hit[1] == key:
        return hit[2]
    k = min(per_cell, max(8, math.ceil(EXTREME_FRACTION * per_cell)))
    values = w0.detach().reshape(cells, per_cell)
    top = values.topk(k, dim=1)
    bottom = values.topk(k, dim=1, largest=False)
    lists = (top.values, top.indices.to(torch.int32), bottom.values, bottom.indices.to(torch.int32))
    if hit is None or hit[0]() is not w0:
        weakref.finalize(w0, _EXTREMES.pop, id(w0), None)
    _EXTREMES[id(w0)] = (weakref.ref(w0), key, lists)
    return lists


def clipped_positions(
    w0: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    d_step: torch.Tensor,
    inside: torch.Tensor | None,
) -> torch.Tensor:
    """Flat positions (sorted, ``int64``) of the weights of ``Q(W0 + scaling * B @ A)`` that clip, without scanning
    the weight: only its extreme entries can.

    A weight clips above when ``round((W0 + D) / s) > hi``, which needs ``W0 >= (hi + 1/2) s - |D|``, and
    ``|D| = |scaling B[o] . A[:, i]| <= |scaling| ||B[o]|| max_i ||A[:, i]||`` (Cauchy-Schwarz) bounds it per cell;
    likewise below.  The candidates are the cell's largest (smallest) entries of ``W0`` past that bound, kept sorted
    per cell since ``W0`` is frozen; a cell whose kept entries all pass is scanned whole.  The candidates are then
    checked exactly on ``d = d x_hat / d s`` (``|d| > 1/2`` outside, see `merged_weight_forward`) or ``inside``.
    """
    cells, per_cell = d_step.numel() // d_step.shape[-1], d_step.shape[-1]
    out_features, rank = b.shape
    per_output = w0.numel() // out_features
    # The bound on |scaling * B @ A| per cell (rows: one output, or all; columns: the cell's group, or all).
    b_norm = b.detach().norm(dim=1)
    a_norm = a.detach().reshape(rank, per_output).norm(dim=0)
    rows = b_norm.view(-1, 1) if d_step.shape[0] == out_features else b_norm.max().view(1, 1)
    if per_cell <= per_output and per_output % per_cell == 0:
        cols = a_norm.view(-1, per_cell).amax(dim=1).view(1, -1)
    else:
        cols = a_norm.max().view(1, 1)
    # 0.1% more, and 0.01 of a step less, than the exact bounds: float rounding cannot drop a weight that clips.
    bound = (abs(scaling) * rows * cols * 1.001).expand(d_step.shape[0], d_step.shape[1]).reshape(cells)
    lo, hi = _code_bounds(zero_point, qmin, qmax)
    s = step.detach().reshape(-1)
    hi_t = hi if not torch.is_tensor(hi) else hi.reshape(-1)
    lo_t = lo if not torch.is_tensor(lo) else lo.reshape(-1)
    above = ((hi_t + 0.49) * s).expand(cells) - bound
    below = ((lo_t - 0.49) * s).expand(cells) + bound
    top_v, top_i, bottom_v, bottom_i = _extremes(w0, cells, per_cell)
    k = top_v.shape[1]
    start = torch.arange(cells, device=d_step.device).mul_(per_cell).view(-1, 1)
    found = []
    scan = torch.zeros(cells, dtype=torch.bool, device=d_step.device)
    for index, passes in ((top_i, top_v >= above.view(-1, 1)), (bottom_i, bottom_v <= below.view(-1, 1))):
        if k < per_cell:
            scan |= passes[:, -1]  # the list ran out: the cell may hold more
        found.append((start + index)[passes])
    candidates = torch.cat(found)
    flat_d = d_step.view(-1)
    outside = (flat_d[candidates].abs() > 0.5) if inside is None else ~inside.view(-1)[candidates]
    positions = [candidates[outside]]
    scanned = scan.nonzero().view(-1)
    if scanned.numel():
        if inside is None:
            cell_out = d_step.view(cells, per_cell)[scanned].abs() > 0.5
        else:
            cell_out = ~inside.view(cells, per_cell)[scanned]
        which, offset = cell_out.nonzero(as_tuple=True)
        positions.append(scanned[which] * per_cell + offset)
    # A small cell's two lists may share entries, and a scanned cell repeats its candidates: each weight once.
    return torch.unique(torch.cat(positions))


def _lowrank_lora_gradients(x, grad_y, a, b, conv, clipped, values, per_output):
    """``B^T (G * M)`` and ``(G * M) A^T`` through the layer's activations (see the module docstring), unscaled."""
    out_features, rank = b.shape
    if conv is None:
        x2 = x.reshape(-1, x.shape[-1])  # views when the caller passes its 2-D views
        g2 = grad_y.reshape(-1, out_features)
        grad_b = g2.t().mm(x2.mm(a.t()))
        grad_a = g2.mm(b).t().mm(x2)
    else:
        stride, padding, dilation = conv
        x_a = F.conv2d(x, a, None, stride, padding, dilation)  # the layer with A as its kernel: (N, r, H', W')
        grad_b = _conv_weight_gradient(grad_y, x_a, b.view(out_features, rank, 1, 1), ((1, 1), (0, 0), (1, 1)))
        grad_b = grad_b.view(out_features, rank)
        grad_y_b = F.conv2d(grad_y, b.t().reshape(rank, out_features, 1, 1))
        grad_a = _conv_weight_gradient(grad_y_b, x, a, conv).contiguous()
    # Take back what the clipped entries (zero in G * M) contributed.
    if clipped.numel():
        rows = torch.div(clipped, per_output, rounding_mode="floor")
        cols = clipped - rows * per_output
        a2 = a.reshape(rank, per_output)
        grad_b.index_add_(0, rows, a2[:, cols].t() * values[:, None], alpha=-1)
        grad_a.view(rank, per_output).index_add_(1, cols, (b[rows] * values[:, None]).t(), alpha=-1)
    return grad_a, grad_b


def _prepare(w0, a, b, step, zero_point, grouped_shape, caller):
    grouped_shape = merged_grouped_shape(w0, zero_point, grouped_shape, caller)
    if w0.requires_grad:
        raise ValueError(f"{caller}: the base weight must be frozen (full QAT takes `fake_quantize_lora_merged`).")
    return w0.float().contiguous(), a.float(), b.float(), step.float(), grouped_shape


def qalora_linear(
    x: torch.Tensor,
    w0: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
    grouped_shape: tuple[int, ...] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, fake_quantize_lora_merged(w0, a, b, ...), bias)`` with the LoRA gradients taken the cheaper way.

    Same arguments as [fake_quantize_lora_merged][diffusers_qalora.quant.fake_quantize_lora_merged] (``x`` and
    ``bias`` added), same output and input / step gradients; the LoRA gradients are the same sums, taken through the
    activations where that costs fewer multiply-adds (equal up to float rounding).  ``w0`` and ``bias`` must be
    frozen, ``x`` float32.
    """
    w0, a, b, step, grouped_shape = _prepare(w0, a, b, step, zero_point, grouped_shape, "qalora_linear")
    return _QALoraOp.apply(
        x, w0, a, b, step, zero_point, bias, float(scaling), qmin, qmax, grad_scale, grouped_shape, None
    )


def qalora_conv2d(
    x: torch.Tensor,
    w0: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    step: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
    grouped_shape: tuple[int, ...] | None = None,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """[qalora_linear][diffusers_qalora.quant.qalora_linear] for ``F.conv2d(x, weight, bias, stride, padding,
    dilation)`` (groups = 1, zero padding given as integers: pad ``x`` beforehand for other padding modes)."""
    w0, a, b, step, grouped_shape = _prepare(w0, a, b, step, zero_point, grouped_shape, "qalora_conv2d")
    conv = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)))
    unbatched = x.dim() == 3  # as F.conv2d takes it; the op's backward products need a batch dim
    y = _QALoraOp.apply(
        x.unsqueeze(0) if unbatched else x,
        *(w0, a, b, step, zero_point, bias, float(scaling), qmin, qmax, grad_scale, grouped_shape, conv),
    )
    return y.squeeze(0) if unbatched else y


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(f"qalora_conv2d: expected an int or a pair of ints, got {value!r}.")
    return int(value[0]), int(value[1])
