"""`WinogradConv2d`: a drop-in for a 3x3, stride-1 ``nn.Conv2d``, optionally fully quantized, with learnable scales."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .config import WinogradConfig
from .functional import input_transform, output_transform, tile_input, weight_transform
from .quantized import hadamard_fake, hadamard_int, quantize_output, quantize_weight_codes
from .transforms import WinogradTransforms, balanced_multipliers, winograd_transforms

QUANT_MODES = ("fp", "fake", "int")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class WinogradKernelProvider(Protocol):
    """The fast implementation of the ``"int"`` mode, installed by `diffusers_qalora.kernels` on import (the same
    kind of hook the quantizers of `diffusers_qalora.quant` and the integer layers of `diffusers_qalora.export`
    have), so this package never imports the kernels."""

    def choice(self, module: nn.Module, device: torch.device) -> str:
        """``"triton"`` or ``"torch"`` for ``module`` on ``device``."""

    def pack(self, codes: torch.Tensor, step: torch.Tensor) -> Any:
        """The weight codes and steps packed for ``conv2d``."""

    def conv2d(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The integer Winograd convolution (signature of ``kernels.winograd.winograd_int_conv2d_triton``)."""


_KERNEL_PROVIDER: list[WinogradKernelProvider | None] = [None]


def set_winograd_kernel_provider(provider: WinogradKernelProvider | None) -> WinogradKernelProvider | None:
    """Install the fast ``"int"``-mode implementation of [WinogradConv2d][diffusers_qalora.WinogradConv2d] (``None``:
    the torch path only); return the previous one."""
    previous = _KERNEL_PROVIDER[0]
    _KERNEL_PROVIDER[0] = provider
    return previous


class WinogradWarning(UserWarning):
    """Base class of the warnings of the Winograd package."""


class WinogradPrecisionWarning(WinogradWarning):
    """F(6,3) is run in fp16/bf16: its transforms amplify rounding errors (about 42 dB SQNR in fp16)."""


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def winograd_ineligibility(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot be replaced by a [WinogradConv2d][diffusers_qalora.WinogradConv2d], or ``None`` if it can.

    Eligible: a plain ``nn.Conv2d`` (or a subclass that does not override ``forward``) with a 3x3 kernel,
    stride 1, dilation 1, ``groups=1``, ``padding_mode="zeros"`` and any zero padding (``"same"``/``"valid"`` too),
    that is neither parametrized nor an uninitialised lazy module.

    Returns:
        `str | None`: a human-readable reason, e.g. ``"stride (2, 2) is not 1"``.
    """
    name = type(conv).__name__
    if not isinstance(conv, _CONV_TYPES):
        return f"{name} is not a convolution (expected nn.Conv2d)"
    if getattr(conv, "transposed", False):
        return f"{name} is a transposed convolution"
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is not 2-D (expected nn.Conv2d)"
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{name} overrides forward, so replacing it would drop its behaviour"
    if parametrize.is_parametrized(conv):
        return f"{name} has parametrizations on its weight"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return f"{name} is an uninitialised lazy module (run a forward pass first)"
    if tuple(conv.kernel_size) != (3, 3):
        return f"kernel size {tuple(conv.kernel_size)} is not 3x3"
    if tuple(conv.stride) != (1, 1):
        return f"stride {tuple(conv.stride)} is not 1"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)} is not 1"
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convolutions are not supported)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not 'zeros'"
    return None


def _normalize_padding(padding: Any) -> tuple[int | str | tuple[int, int], tuple[int, int]]:
    """``(padding as nn.Conv2d stores it, (p_h, p_w))`` for an int, a pair, ``"same"`` or ``"valid"`` (3x3 kernel)."""
    if isinstance(padding, str):
        if padding == "same":
            return padding, (1, 1)
        if padding == "valid":
            return padding, (0, 0)
        raise ValueError(f"`padding` must be an int, a pair of ints, 'same' or 'valid', got {padding!r}.")
    pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if len(pad) != 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pad):
        raise ValueError(f"`padding` must be a non-negative int or a pair of them, got {padding!r}.")
    return pad, pad  # type: ignore[return-value]


class WinogradScales(nn.Module):
    """The learnable diagonal scales of the input and weight transforms.

    With base transforms ``(A^T, G, B^T)`` (the standard matrices) and ``theta_B, theta_G`` these parameters,
    the layer uses

        B^T' = diag(exp(theta_B)) B^T,   G' = diag(exp(theta_G)) G,   A^T' = A^T diag(exp(-theta_B - theta_G)),

    i.e. ``S_B`` and ``S_G`` are multiplied by positive factors and ``S_A`` compensates, so the full-precision result
    is unchanged for any values.  The log parametrisation keeps the factors positive (a sign flip is irrelevant).
    A module of its own so that several layers can share one set (assign the same instance).

    Args:
        n (`int`): input tile size ``m + 2``.
        log_b, log_g (`torch.Tensor`, *optional*): initial ``theta_B``, ``theta_G`` (zeros by default).
        device (`torch.device`, *optional*): where to create the parameters (float32).
    """

    def __init__(
        self,
        n: int,
        log_b: torch.Tensor | None = None,
        log_g: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.n = int(n)
        self.log_b = nn.Parameter(torch.zeros(self.n, dtype=torch.float32, device=device))
        self.log_g = nn.Parameter(torch.zeros(self.n, dtype=torch.float32, device=device))
        with torch.no_grad():
            if log_b is not None:
                self.log_b.copy_(torch.as_tensor(log_b).reshape(self.n))
            if log_g is not None:
                self.log_g.copy_(torch.as_tensor(log_g).reshape(self.n))

    def multipliers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(theta_B), exp(theta_G))`` in float64 (differentiable)."""
        return self.log_b.to(torch.float64).exp(), self.log_g.to(torch.float64).exp()

    def extra_repr(self) -> str:
        return f"n={self.n}"


class Conv3x3Layer(nn.Module):
    """What `WinogradConv2d` and `DirectQuantConv2d` share: the ``nn.Conv2d`` attributes of a 3x3 stride-1 layer
    (so code that inspects convolutions keeps working), the checked constructor arguments and the weight and bias
    (allocated, not initialised), and the slots `apply_winograd` and `tune_scales_` use."""

    kernel_size = (3, 3)
    stride = (1, 1)
    dilation = (1, 1)
    groups = 1
    padding_mode = "zeros"
    transposed = False

    def _init_layer(
        self,
        in_channels: int,
        out_channels: int,
        padding: int | tuple[int, int] | str,
        bias: bool,
        config: WinogradConfig,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.padding, self._pad = _normalize_padding(padding)
        self.config = dataclasses.replace(config)  # a private copy: never mutate the caller's config
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self._cache: dict[str, Any] = {}
        self.last_input_shape: tuple[int, ...] | None = None
        self.input_quantizer: nn.Module | None = None
        self._capture: Any = None  # set by apply_winograd while it records the layer's inputs

    @classmethod
    def _sharing_weights_of(cls, conv: nn.Module, config: WinogradConfig) -> Conv3x3Layer:
        """A layer of ``conv``'s shape built on the meta device, then given ``conv``'s weight and bias (shared)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            padding=conv.padding,
            bias=conv.bias is not None,
            config=config,
            device="meta",
            dtype=conv.weight.dtype,
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        return layer

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the full-precision function of this layer (sharing its weight and bias)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            3,
            padding=self.padding,
            bias=self.bias is not None,
            device="meta",
            dtype=self.weight.dtype,
        )
        conv.weight = self.weight
        conv.bias = self.bias
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, C_in, H, W) -> (N, C_out, H + 2 p_h - 2, W + 2 p_w - 2)`` in the dtype of ``x``.

        Applies ``input_quantizer`` (if any), then `forward_core`.
        """
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self._capture is not None:  # recording inputs: behave as the FP direct conv (teacher trajectory)
            self._capture(x)
            return self.reference_forward(x)
        return self.forward_core(x)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        """Check that ``x`` is ``(N, C_in, H, W)`` and record its shape (``last_input_shape``, for tuning)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        self.last_input_shape = tuple(x.shape)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full-precision direct convolution ``F.conv2d`` with this layer's weight, bias and padding."""
        return F.conv2d(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), padding=self._pad
        )


class WinogradConv2d(Conv3x3Layer):
    r"""A 3x3, stride-1 convolution computed with the Winograd algorithm F(m x m, 3 x 3), optionally fully quantized.

    For an input tile ``d: (n, n)`` (``n = m + 2``) of channel ``c`` and the kernel ``w[k, c]``,

        Y[k] = A^T [ sum_c (G w[k, c] G^T) ⊙ (B^T d_c B) ] A,

    computed as ``n^2`` independent GEMMs over channels (one per Winograd position ``(xi, nu)``)
    ``M[xi] = U[xi] @ V[xi]`` with ``U: (n^2, K, C)`` and ``V: (n^2, C, P)`` for ``P`` tiles, then the output transform.
    See `diffusers_qalora.winograd.functional` for the tiling, padding and cropping.

    Three modes (attribute ``quant_mode``):

    * ``"fp"``: full precision in the input dtype (the weight transform in float64, then cast). Equal to
      ``F.conv2d`` up to rounding (1e-10 in float64).
    * ``"fake"``: fake quantization (float values on the integer grid) for training and scale tuning:
      ``U`` (float64, offline) quantized per (position, output channel, channel group), ``V`` quantized
      dynamically per (position or tile, channel group, tile), optionally ``M`` per (output channel, tile);
      differentiable w.r.t. the learnable scales through `fake_quantize`'s STE/LSQ gradients.
    * ``"int"`` (default when ``config.bits`` is set): inference with integer codes and exact integer accumulation
      per group, group steps applied and summed in fp32; the weight codes are cached until the weight or the
      scales change.  Not differentiable.  Agrees with ``"fake"`` up to fp32 summation order.  On CUDA (float32
      compute) it runs the fused Triton kernels of `diffusers_qalora.kernels.winograd` when Triton imports; the
      choice is made once per module from its [KernelPreference][diffusers_qalora.KernelPreference]
      ([set_kernel_preference][diffusers_qalora.set_kernel_preference]).

    The quantized modes compute in float32 (float64 for a float64 input) whatever the input dtype, with autocast
    disabled; the output is cast back to the input dtype.

    Args:
        in_channels (`int`): ``C``.
        out_channels (`int`): ``K``.
        padding (`int | tuple[int, int] | str`, defaults to `1`): zero padding, ``"same"`` or ``"valid"``.
        bias (`bool`, defaults to `True`): whether to learn an additive bias.
        config ([WinogradConfig][diffusers_qalora.WinogradConfig], *optional*): tile, quantization and scale settings; defaults to
            ``WinogradConfig()`` (F(4,3), 8 bits, one group).
        device (`torch.device | str`, *optional*): device of the weight and bias.
        dtype (`torch.dtype`, *optional*): dtype of the weight and bias.

    Attributes:
        weight (`nn.Parameter`): ``(K, C, 3, 3)``, the spatial weight (as in ``nn.Conv2d``).
        bias (`nn.Parameter | None`): ``(K,)``.
        scales (`WinogradScales`): the learnable transform scales.
        quant_mode (`str`): ``"fp"``, ``"fake"`` or ``"int"``.
        last_input_shape (`tuple[int, ...] | None`): shape of the last input seen (used by `tune_scales_`).
        input_quantizer (`nn.Module | None`): optional quantizer applied to the spatial input before everything else
            (e.g. the timestep-keyed activation quantizer of a QALoRA layer, see [apply_winograd][diffusers_qalora.apply_winograd]); ``None`` by
            default.  `forward_core` is the layer without it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int | tuple[int, int] | str = 1,
        bias: bool = True,
        config: WinogradConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = WinogradConfig() if config is None else config
        if not isinstance(config, WinogradConfig):
            raise TypeError(f"`config` must be a WinogradConfig, got {type(config).__name__}.")
        if config.algorithm != "winograd":
            raise ValueError(
                f"a WinogradConv2d needs `algorithm='winograd'`, got {config.algorithm!r} (the 'direct' baseline is "
                "DirectQuantConv2d)."
            )
        self._init_layer(in_channels, out_channels, padding, bias, config, device, dtype)
        if config.bits is not None and config.group_size is not None and in_channels % config.group_size:
            divisors = [d for d in range(1, in_channels + 1) if in_channels % d == 0]
            raise ValueError(
                f"`group_size` ({config.group_size}) must divide in_channels ({in_channels}); "
                f"choose one of {divisors[-8:]} or group_size=None (one group)."
            )
        self.tile = config.tile
        self._base = winograd_transforms(config.tile, 3, config.resolved_points, scaling="lavin")
        scale_device = None if torch.device(device or "cpu").type == "meta" else device
        self.scales = self._initial_scales(config.scale_init, scale_device)
        self._quant_mode = "int" if config.bits is not None else "fp"
        if self.weight.device.type != "meta":
            self.reset_parameters()

    # -- construction ----------------------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Conv2d`` (Kaiming-uniform weight, uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * 9)
            nn.init.uniform_(self.bias, -bound, bound)

    def _initial_scales(self, init: str, device: torch.device | str | None) -> WinogradScales:
        n = self._base.n
        if init == "lavin":
            return WinogradScales(n, device=device)
        if init == "balanced":
            mult_b, mult_g = balanced_multipliers(self._base)
            return WinogradScales(n, mult_b.log().float(), mult_g.log().float(), device=device)
        raise ValueError(f"`scale_init` must be 'lavin' or 'balanced', got {init!r}.")

    def reset_scales_(self, init: Literal["lavin", "balanced"] | None = None) -> WinogradConv2d:
        """Reset the learnable scales in place to ``init`` (default: ``config.scale_init``)."""
        fresh = self._initial_scales(init or self.config.scale_init, self.scales.log_b.device)
        with torch.no_grad():
            self.scales.log_b.copy_(fresh.log_b)
            self.scales.log_g.copy_(fresh.log_g)
        return self

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        tile: int | None = None,
        *,
        config: WinogradConfig | None = None,
        **overrides: Any,
    ) -> WinogradConv2d:
        """Build a [WinogradConv2d][diffusers_qalora.WinogradConv2d] computing the same function as ``conv`` (sharing its weight and bias).

        Args:
            conv (`nn.Conv2d`): an eligible convolution (see `winograd_ineligibility`).
            tile (`int`, *optional*): ``m`` in 2, 4, 6; overrides ``config.tile`` (default 4).
            config ([WinogradConfig][diffusers_qalora.WinogradConfig], *optional*): defaults to ``WinogradConfig()``.
            **overrides: fields of [WinogradConfig][diffusers_qalora.WinogradConfig] replacing those of ``config`` (e.g. ``bits=None``,
                ``group_size=32``).

        Raises:
            ValueError: if ``conv`` is not eligible (the message says why), or ``group_size`` does not divide
                ``conv.in_channels``.

        Example:

        ```py
        >>> conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        >>> wconv = WinogradConv2d.from_conv2d(conv, tile=4, bits=8, group_size=32)
        ```
        """
        reason = winograd_ineligibility(conv)
        if reason is not None:
            raise ValueError(f"cannot replace {conv!r} by a WinogradConv2d: {reason}.")
        if config is not None and not isinstance(config, WinogradConfig):
            raise TypeError(f"`config` must be a WinogradConfig, got {type(config).__name__}.")
        if tile is not None:
            overrides["tile"] = tile
        base = config if config is not None else WinogradConfig()
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(WinogradConfig)})
        if unknown:
            raise TypeError(f"unknown WinogradConfig fields {unknown}.")
        cfg = dataclasses.replace(base, **overrides)
        layer = cls._sharing_weights_of(conv, cfg)
        layer.scales = layer._initial_scales(cfg.scale_init, conv.weight.device)
        return layer

    # -- state -----------------------------------------------------------------------------------------------------

    @property
    def quant_mode(self) -> str:
        """``"fp"``, ``"fake"`` or ``"int"`` (the quantized modes need ``config.bits``)."""
        return self._quant_mode

    @quant_mode.setter
    def quant_mode(self, mode: str) -> None:
        if mode not in QUANT_MODES:
            raise ValueError(f"`quant_mode` must be one of {QUANT_MODES}, got {mode!r}.")
        if mode != "fp" and self.config.bits is None:
            raise ValueError(f"`quant_mode={mode!r}` needs a quantized config (`bits` is None).")
        self._quant_mode = mode

    @property
    def transforms(self) -> WinogradTransforms:
        """The effective transforms (base matrices with the current scales), float64, detached, on CPU."""
        mult_b, mult_g = self.scales.multipliers()
        return self._base.rescaled(mult_b.detach().cpu(), mult_g.detach().cpu())

    def _matrices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A^T, G, B^T)`` in float64 on ``device``, differentiable w.r.t. the scales."""
        mult_b, mult_g = self.scales.multipliers()
        mult_b, mult_g = mult_b.to(device), mult_g.to(device)
        at = self._base.VmT.to(device) * (self._base.scale_a.to(device) / (mult_b * mult_g))[None, :]
        g = (self._base.scale_g.to(device) * mult_g)[:, None] * self._base.Vr.to(device)
        bt = (self._base.scale_b.to(device) * mult_b)[:, None] * self._base.VnInvT.to(device)
        return at, g, bt

    def _cache_key(self, tag: str, device: torch.device, dtype: torch.dtype) -> tuple:
        w, lb, lg = self.weight, self.scales.log_b, self.scales.log_g
        return (
            tag,
            device,
            dtype,
            w.data_ptr(),
            w._version,
            w.dtype,
            lb.data_ptr(),
            lb._version,
            lg.data_ptr(),
            lg._version,
            dataclasses.astuple(self.config),
        )

    def _cached(self, key: tuple, compute: Any) -> Any:
        if self._cache.get("key") != key:
            self._cache = {"key": key, "value": compute()}
        return self._cache["value"]

    def clear_cache(self) -> None:
        """Drop the cached transformed (and quantized) weight."""
        self._cache = {}

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """The (quantized) Winograd convolution of ``x`` without ``input_quantizer``: what tuning optimises."""
        self._check_input(x)
        if self._quant_mode == "fp":
            y = self._forward_fp(x)
        else:
            with torch.autocast(x.device.type, enabled=False):
                y = self._forward_quant(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        return y

    def _forward_fp(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        if self.tile == 6 and dtype in _LOW_PRECISION:
            warnings.warn(
                f"F(6,3) Winograd in {dtype} loses precision (about 42 dB SQNR in fp16 against ~100 dB in fp32); "
                "use tile=4, or run this layer in float32.",
                WinogradPrecisionWarning,
                stacklevel=3,
            )
        at, g, bt = self._matrices(x.device)
        tiles, grid = tile_input(x, self.tile, 3, self._pad)
        v = input_transform(tiles, bt.to(x.dtype))

        def compute_u() -> torch.Tensor:
            return weight_transform(self.weight.to(torch.float64), g).to(x.dtype)

        needs_grad = torch.is_grad_enabled() and (
            self.weight.requires_grad or self.scales.log_b.requires_grad or self.scales.log_g.requires_grad
        )
        u = compute_u() if needs_grad else self._cached(self._cache_key("fp", x.device, x.dtype), compute_u)
        return output_transform(torch.matmul(u, v), at.to(x.dtype), grid)

    def _forward_quant(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        bits = cfg.bits
        assert bits is not None  # internal invariant: the quant_mode setter checks it
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        at, g, bt = self._matrices(x.device)
        if self._quant_mode == "int" and cdtype == torch.float32 and self._kernel_choice(x) == "triton":
            return self._forward_int_triton(x, at, g, bt)
        tiles, grid = tile_input(x.to(cdtype), self.tile, 3, self._pad)
        v = input_transform(tiles, bt.to(cdtype))
        if self._quant_mode == "fake":
            u64 = weight_transform(self.weight.to(torch.float64), g)
            prod = hadamard_fake(u64, v, bits, cfg.group_size, cfg.act_granularity, cfg.weight_init)
        else:

            def compute_codes() -> tuple[torch.Tensor, torch.Tensor]:
                with torch.no_grad():
                    u64 = weight_transform(self.weight.detach().to(torch.float64), g.detach())
                    return quantize_weight_codes(u64, bits, cfg.group_size, cfg.weight_init)

            codes_u, step_u = self._cached(self._cache_key("int", x.device, cdtype), compute_codes)
            prod = hadamard_int(codes_u, step_u, v.detach(), bits, cfg.group_size, cfg.act_granularity)
        if cfg.output_bits is not None:
            prod = quantize_output(prod, cfg.output_bits, fake=self._quant_mode == "fake")
        return output_transform(prod, at.to(cdtype), grid).to(x.dtype)

    def _kernel_choice(self, x: torch.Tensor) -> str:
        """``"triton"`` or ``"torch"`` for the ``"int"`` mode on ``x``'s device: what the installed kernel provider
        (see [set_winograd_kernel_provider][diffusers_qalora.winograd.conv.set_winograd_kernel_provider]) resolves,
        ``"torch"`` without one."""
        provider = _KERNEL_PROVIDER[0]
        return "torch" if provider is None else provider.choice(self, x.device)

    def _forward_int_triton(self, x: torch.Tensor, at: torch.Tensor, g: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
        """The ``"int"`` mode on the fused Triton kernels (`diffusers_qalora.kernels.winograd`): the same codes and
        steps as the torch path, the weight packed once for the GEMM kernel and cached."""
        kernels = _KERNEL_PROVIDER[0]
        cfg = self.config

        def compute_packed() -> tuple[torch.Tensor, torch.Tensor, Any]:
            with torch.no_grad():
                u64 = weight_transform(self.weight.detach().to(torch.float64), g.detach())
                codes_u, step_u = quantize_weight_codes(u64, cfg.bits, cfg.group_size, cfg.weight_init)
                return codes_u, step_u, kernels.pack(codes_u, step_u)

        codes_u, step_u, packed = self._cached(self._cache_key("int-triton", x.device, torch.float32), compute_packed)
        return kernels.conv2d(
            x.detach(),
            codes_u,
            step_u,
            bt.detach().float(),
            at.detach().float(),
            None,
            self._pad,
            bits=cfg.bits,
            group_size=cfg.group_size,
            act_granularity=cfg.act_granularity,
            output_bits=cfg.output_bits,
            packed=packed,
        )

    def extra_repr(self) -> str:
        cfg = self.config
        parts = [f"{self.in_channels}, {self.out_channels}", f"tile={cfg.tile}", f"padding={self.padding}"]
        if self.bias is None:
            parts.append("bias=False")
        if cfg.bits is not None:
            parts += [f"bits={cfg.bits}", f"group_size={cfg.group_size}", f"act_granularity={cfg.act_granularity!r}"]
            if cfg.output_bits is not None:
                parts.append(f"output_bits={cfg.output_bits}")
        parts.append(f"quant_mode={self._quant_mode!r}")
        return ", ".join(parts)
