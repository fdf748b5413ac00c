"""Integer-GEMM convolutions for measuring speed: int8 Winograd F(m, 3) and int8 im2col, both on ``torch._int_mm``.

Nothing in the package uses them: they are kept as the torch int8 baselines that `benchmarks/winograd_speed.py` and
the Winograd section of `benchmarks/gpu_kernels.py` measure the Winograd layers and kernels against.

Both take and return float ``(N, C, H, W)`` tensors and include every step a drop-in layer pays for (dynamic input
quantization, layout changes, dequantization); weights are transformed and quantized once, at construction.

**`Int8WinogradConv2d`** (numerically the ``"int"`` mode of a [WinogradConv2d][diffusers_qalora.WinogradConv2d] with ``act_granularity="position"``
and a float output transform):

1. cut the (channels-last) input into overlapping ``n x n`` tiles: ``d: (n^2, P, C)`` with ``P`` tiles;
2. input transform as one GEMM with the Kronecker matrix ``B^T (x) B^T``: ``V = (n^2 x n^2) @ d``;
3. quantize ``V`` to int8 with one dynamic step per (position, tile, group of input channels);
4. per Winograd position ``xi`` (and channel group): ``torch._int_mm(V_q[xi] (P, C), U_q[xi] (C, K))`` with int32
   accumulation; ``U = G w G^T`` is int8 with one step per (position, output channel, group);
5. dequantize (``acc * s_V * s_U``, summed over groups) and apply the output transform as one GEMM with
   ``A^T (x) A^T`` ``(m^2 x n^2)``; untile and crop.

**`Int8Im2colConv2d`**: int8 input (one dynamic step per tensor), int8 weight (one step per output channel),
``cols: (N H W, 9 C)`` gathered from the padded channels-last int8 input, one ``torch._int_mm`` with the
``(9 C, K)`` weight, then dequantize.

``torch._int_mm`` runs on CPU (and CUDA); on CPU the fastest integer convolution in PyTorch is still oneDNN's
(``torch.ao.nn.quantized.Conv2d``), which `benchmarks/winograd_speed.py` measures beside these two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import _normalize_padding, winograd_ineligibility
from .functional import conv_output_size, weight_transform
from .transforms import WinogradTransforms, winograd_transforms

_QMAX = 127


def _groups(channels: int, group_size: int | None) -> int:
    g = channels if group_size is None else group_size
    if channels % g:
        raise ValueError(f"`group_size` ({g}) must divide the number of input channels ({channels}).")
    return channels // g


def _quantize_int8(x: torch.Tensor, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    step = (x.abs().amax(dim=dim, keepdim=True) / _QMAX).clamp_min(1e-30)
    return torch.round(x / step).clamp_(-_QMAX, _QMAX).to(torch.int8), step


class Int8WinogradConv2d(nn.Module):
    """int8 Winograd F(m, 3) convolution on ``torch._int_mm`` (see the module docstring).

    Args:
        weight (`torch.Tensor`): ``(K, C, 3, 3)``.
        bias (`torch.Tensor`, *optional*): ``(K,)``.
        tile (`int`, defaults to `4`): ``m``.
        padding (`int | tuple[int, int] | str`, defaults to `1`).
        group_size (`int`, *optional*): input channels per quantization group (``None`` = one group: a single
            ``_int_mm`` per Winograd position).
        transforms (`WinogradTransforms`, *optional*): defaults to the standard F(m, 3) matrices (diagonal scales are
            invisible to this per-position quantization).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        tile: int = 4,
        padding: int | tuple[int, int] | str = 1,
        group_size: int | None = None,
        transforms: WinogradTransforms | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3):
            raise ValueError(f"`weight` must be (K, C, 3, 3), got {tuple(weight.shape)}.")
        t = transforms if transforms is not None else winograd_transforms(tile)
        self.m, self.n = t.m, t.n
        k, c = weight.shape[:2]
        self.in_channels, self.out_channels = c, k
        self.groups = _groups(c, group_size)
        self.group_size = c // self.groups
        _, self._pad = _normalize_padding(padding)
        with torch.no_grad():
            u = weight_transform(weight.detach().to(torch.float64), t.G)  # (n^2, K, C)
            ug = u.reshape(self.n**2, k, self.groups, self.group_size)
            step_u = (ug.abs().amax(dim=-1, keepdim=True) / _QMAX).clamp_min(1e-30)
            codes = torch.round(ug / step_u).clamp_(-_QMAX, _QMAX).to(torch.int8).reshape(self.n**2, k, c)
        self.register_buffer("codes_u", codes.transpose(1, 2).contiguous())  # (n^2, C, K)
        self.register_buffer("step_u", step_u.squeeze(-1).transpose(1, 2).float().contiguous())  # (n^2, G, K)
        self.register_buffer("kron_b", torch.kron(t.BT, t.BT).float())  # (n^2, n^2)
        self.register_buffer("kron_a", torch.kron(t.AT, t.AT).float())  # (m^2, n^2)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, tile: int = 4, group_size: int | None = None) -> Int8WinogradConv2d:
        """From an eligible ``nn.Conv2d``."""
        reason = winograd_ineligibility(conv)
        if reason is not None:
            raise ValueError(f"cannot build an Int8WinogradConv2d from {conv!r}: {reason}.")
        return cls(conv.weight, conv.bias, tile, conv.padding, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, c, h, w = x.shape
        m, n = self.m, self.n
        out_h, out_w = conv_output_size(h, w, self._pad)
        th, tw = -(-out_h // m), -(-out_w // m)
        ph, pw = self._pad
        xl = x.float().permute(0, 2, 3, 1)  # channels-last view (N, H, W, C)
        xl = F.pad(xl, (0, 0, pw, pw + tw * m - out_w, ph, ph + th * m - out_h))
        tiles = xl.unfold(1, n, m).unfold(2, n, m)  # (N, Th, Tw, C, n, n) view
        p = batch * th * tw
        d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(n * n, p * c)  # one copy
        v = (self.kron_b @ d).view(n * n, p, self.groups, self.group_size)
        codes_v, step_v = _quantize_int8(v, -1)  # (n^2, P, G, g) int8, (n^2, P, G, 1)
        codes_v = codes_v.view(n * n, p, c)
        step_v = step_v.view(n * n, p, self.groups)
        k = self.out_channels
        acc = torch.empty(p, k, dtype=torch.int32, device=x.device)
        prod = torch.empty(n * n, p, k, dtype=torch.float32, device=x.device)
        g = self.group_size
        for xi in range(n * n):
            for j in range(self.groups):
                cols = slice(j * g, (j + 1) * g)
                torch._int_mm(codes_v[xi, :, cols], self.codes_u[xi, cols], out=acc)
                scaled = acc.float().mul_(step_v[xi, :, j : j + 1]).mul_(self.step_u[xi, j])
                if j == 0:
                    prod[xi] = scaled
                else:
                    prod[xi] += scaled
        y = (self.kron_a @ prod.view(n * n, p * k)).view(m, m, batch, th, tw, k)
        y = y.permute(2, 5, 3, 0, 4, 1).reshape(batch, k, th * m, tw * m)[:, :, :out_h, :out_w]
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y.contiguous().to(x.dtype)


class Int8Im2colConv2d(nn.Module):
    """int8 im2col convolution (3x3, stride 1) on one ``torch._int_mm`` (see the module docstring)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int | tuple[int, int] | str = 1
    ) -> None:
        super().__init__()
        if weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3):
            raise ValueError(f"`weight` must be (K, C, 3, 3), got {tuple(weight.shape)}.")
        k, c = weight.shape[:2]
        self.in_channels, self.out_channels = c, k
        _, self._pad = _normalize_padding(padding)
        with torch.no_grad():
            flat = weight.detach().float().reshape(k, c * 9)  # (K, C*9) in (c, kh, kw) order
            codes, step = _quantize_int8(flat, -1)
        self.register_buffer("codes_w", codes.t().contiguous())  # (C*9, K)
        self.register_buffer("step_w", step.view(1, k))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> Int8Im2colConv2d:
        """From an eligible ``nn.Conv2d``."""
        reason = winograd_ineligibility(conv)
        if reason is not None:
            raise ValueError(f"cannot build an Int8Im2colConv2d from {conv!r}: {reason}.")
        return cls(conv.weight, conv.bias, conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, c, h, w = x.shape
        out_h, out_w = conv_output_size(h, w, self._pad)
        ph, pw = self._pad
        codes, step = _quantize_int8(x.float().permute(0, 2, 3, 1), (1, 2, 3))  # channels-last int8
        codes = F.pad(codes, (0, 0, pw, pw, ph, ph))
        cols = codes.unfold(1, 3, 1).unfold(2, 3, 1).reshape(batch * out_h * out_w, c * 9)  # one int8 copy
        acc = torch._int_mm(cols, self.codes_w)  # (N*Ho*Wo, K) int32
        scale = step.view(batch, 1, 1) * self.step_w  # (N, 1, K)
        y = acc.view(batch, out_h * out_w, self.out_channels).float().mul_(scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        y = y.view(batch, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
        return y.contiguous().to(x.dtype)
