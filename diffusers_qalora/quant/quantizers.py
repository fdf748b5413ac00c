"""Fake-quantizer modules: LSQ weight quantizer, temporal (per-timestep) activation quantizer and dynamic (per-token or
per-group) activation quantizer."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .granularity import Granularity, PerChannel, PerGroup, PerToken, check_granularity, grouped_view, step_shape
from .init import INIT_METHODS, init_qparams, qparams_from_range
from .primitives import fake_quantize, qrange, quantize, validate_bits
from .primitives import lsq_grad_scale as lsq_grad_scale_factor
from .temporal import TemporalValues, TimestepContext, install_timestep_hook, interpolation_indices

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# Which implementation of `fake_quantize` a quantizer module runs.  This package is pure torch and never imports the
# kernels: `diffusers_qalora.kernels` installs a resolver here (on `import diffusers_qalora`) that picks, once per
# module and device, its fused Triton kernel or `fake_quantize` itself.  Without a resolver, `fake_quantize` runs.
FakeQuantizeResolver = Callable[[nn.Module, torch.Tensor], Callable[..., torch.Tensor]]
_resolver: list[FakeQuantizeResolver | None] = [None]


def set_fake_quantize_resolver(resolver: FakeQuantizeResolver | None) -> FakeQuantizeResolver | None:
    """Install ``resolver(module, x) -> fn`` (``fn`` with the signature of [fake_quantize][diffusers_qalora.quant.fake_quantize]) and return the previous
    one; ``None`` restores plain [fake_quantize][diffusers_qalora.quant.fake_quantize].

    The fused QALoRA weight path in training (one pass over ``W0 + scaling * B @ A`` each way) computes what
    ``fake_quantize`` itself computes: a weight quantizer whose resolver returns any other function, a wrapper of
    ``fake_quantize`` included, runs that function on the merged weight instead, with the composition's cost (the
    weight-sized temporaries and passes of the unfused path)."""
    previous = _resolver[0]
    _resolver[0] = resolver
    return previous


def fake_quantize_impl(module: nn.Module, x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The implementation of [fake_quantize][diffusers_qalora.quant.fake_quantize] that ``module`` runs for its input ``x``."""
    resolver = _resolver[0]
    return fake_quantize if resolver is None else resolver(module, x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16 cannot hold x / step precisely enough to round to the right code: quantize in fp32 and cast back.
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


class WeightQuantizer(nn.Module):
    """LSQ fake-quantizer for a weight of shape ``(C_out, C_in, *kernel)`` with a learnable step per granularity cell.

    Args:
        weight_shape (`tuple[int, ...]`): shape of the weight it quantizes.
        bits (`int`): 2..8.
        symmetric (`bool`, defaults to `True`): signed codes and no zero point (what integer kernels want);
            `False` gives unsigned codes with a per-cell integer zero point (a frozen buffer).
        granularity (`PerTensor | PerChannel | PerGroup`, defaults to `PerChannel()`): how many step sizes.
        lsq_grad_scale (`bool`, defaults to `False`): multiply the step gradient by LSQ's ``1/sqrt(N * qmax)``.
    """

    def __init__(
        self,
        weight_shape: Sequence[int],
        bits: int,
        symmetric: bool = True,
        granularity: Granularity | None = None,
        lsq_grad_scale: bool = False,
    ) -> None:
        super().__init__()
        self.bits = validate_bits(bits, "weight_bits")
        self.symmetric = bool(symmetric)
        self.granularity = granularity if granularity is not None else PerChannel()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        check_granularity(self.granularity, self.weight_shape)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        shape = step_shape(self.weight_shape, self.granularity)
        self.step = nn.Parameter(torch.ones(shape))
        if self.symmetric:
            self.zero_point = None
        else:
            self.register_buffer("zero_point", torch.zeros(shape))
        elements_per_cell = 1
        for s in self.weight_shape:
            elements_per_cell *= s
        cells = shape[0] * shape[1]
        self.grad_scale = lsq_grad_scale_factor(elements_per_cell // cells, self.qmax) if lsq_grad_scale else 1.0

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}"

    @torch.no_grad()
    def initialize_(self, weight: torch.Tensor, method: str = "mse") -> None:
        """Set the step (and zero point) from ``weight``: ``"minmax"``, ``"mse"`` or ``"lp"`` (p = 2.4) search."""
        if method not in INIT_METHODS:
            raise ValueError(f"`init_method` must be one of {INIT_METHODS}, got {method!r}.")
        step, zp = init_qparams(grouped_view(weight.detach(), self.granularity), self.bits, self.symmetric, method)
        self.step.copy_(step)
        if zp is not None:
            self.zero_point.copy_(zp)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(weight)
        grouped = grouped_view(weight.to(dtype), self.granularity)
        step = self.step.to(dtype)
        zp = None if self.zero_point is None else self.zero_point.to(dtype)
        out = fake_quantize_impl(self, grouped)(grouped, step, zp, self.qmin, self.qmax, self.grad_scale)
        return out.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``weight`` (``int32``, same shape as ``weight``)."""
        grouped = grouped_view(weight.float(), self.granularity)
        return quantize(grouped, self.step.float(), self.zero_point, self.qmin, self.qmax).reshape(weight.shape)


class TemporalActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer with one step size (and zero point) per calibrated timestep (TALSQ).

    The step sizes are looked up by the timesteps in the shared [TimestepContext][diffusers_qalora.TimestepContext] (set by the denoiser's forward
    pre-hook), with linear interpolation between table entries.  A table of a single entry is a plain static
    quantizer used at every timestep.  Until `finish_calibration` (or a loaded state) marks it calibrated, a forward
    raises instead of quantizing with arbitrary step sizes.

    Args:
        timesteps (`Sequence[float]`): strictly increasing timestep values, in the units the denoiser receives.
        bits (`int`): 2..8.
        symmetric (`bool`, defaults to `False`): signed codes without zero point; the default unsigned codes with a
            learnable (integer-rounded) zero point suit post-SiLU/GELU activations.
        lsq_grad_scale (`bool`, defaults to `False`): multiply the step gradient by LSQ's ``1/sqrt(N * qmax)``.
        name (`str`, *optional*): used in error messages.
    """

    def __init__(
        self,
        timesteps: Sequence[float],
        bits: int,
        symmetric: bool = False,
        lsq_grad_scale: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        self.bits = validate_bits(bits, "act_bits")
        self.symmetric = bool(symmetric)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        self.step = TemporalValues(timesteps, init=1.0)
        self.zero_point = None if self.symmetric else TemporalValues(timesteps, init=0.0)
        self.register_buffer("calibrated", torch.tensor(False))
        self.use_lsq_grad_scale = lsq_grad_scale
        self.name = name
        self.context: TimestepContext | None = None
        self.enabled = True
        self._calibrating = False
        self._calib_sum: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, timesteps={len(self.step)}"

    @property
    def timesteps(self) -> torch.Tensor:
        return self.step.timesteps

    def _sample_timesteps(self, batch_size: int) -> torch.Tensor:
        if self.context is None:
            raise RuntimeError(
                f"{self.name or 'TemporalActQuantizer'}: no TimestepContext is attached; build the model with "
                f"get_qalora_model (or attach one with `quantizer.context = context`)."
            )
        return self.context.per_sample(batch_size, self.name or "TemporalActQuantizer")

    def qparams(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step sizes and zero points at timesteps ``t`` (1-D), each of shape ``(len(t),)``."""
        step = self.step.lookup(t)
        zp = None if self.zero_point is None else self.zero_point.lookup(t)
        return step, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibrating:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        if not bool(self.calibrated):
            raise RuntimeError(
                f"{self.name or 'TemporalActQuantizer'}: activation step sizes are not calibrated. Run "
                f"`diffusers_qalora.calibrate_activations(model, ...)` (or load a calibrated adapter) before the "
                f"quantized forward pass."
            )
        t = self._sample_timesteps(x.shape[0])
        if x.shape[0] == 0:
            return x
        dtype = _compute_dtype(x)
        if bool((t == t[0]).all()):
            # One timestep for the whole batch (the usual case, CFG included): a scalar step is cheaper.
            step, zp = self._single_qparams(float(t[0]))
            view = ()
        else:
            step, zp = self.qparams(t)
            view = (-1,) + (1,) * (x.dim() - 1)
        step = step.to(dtype).reshape(view)
        zp = None if zp is None else zp.to(dtype).reshape(view)
        grad_scale = lsq_grad_scale_factor(x[0].numel(), self.qmax) if self.use_lsq_grad_scale else 1.0
        impl = fake_quantize_impl(self, x)
        # An implementation that computes in float32 itself gets float16/bfloat16 inputs as they are (same numbers,
        # two full-size casts fewer).
        x_in = x if getattr(impl, "computes_in_float32", False) else x.to(dtype)
        return impl(x_in, step, zp, self.qmin, self.qmax, grad_scale).to(x.dtype)

    @property
    def is_calibrating(self) -> bool:
        """Whether the quantizer is between `start_calibration` and `finish_calibration` (it then observes its
        inputs and passes them through)."""
        return self._calibrating

    def batch_qparams(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step sizes and zero points at the current timestep of each of ``batch_size`` samples: 0-d tensors when the
        batch shares one timestep (the lookup ``forward`` uses), ``(batch_size,)`` tensors otherwise."""
        t = self._sample_timesteps(batch_size)
        if batch_size and bool((t == t[0]).all()):
            return self._single_qparams(float(t[0]))
        return self.qparams(t)

    def cancel_calibration(self) -> None:
        """Drop what was observed since `start_calibration` and leave the step sizes as they were."""
        self._calibrating = False
        self._calib_sum = None

    def _single_qparams(self, t: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`qparams` at one timestep, as 0-d tensors, without the tensor bookkeeping of a batched lookup.

        This runs once per quantized layer and denoiser call, so it is written in plain Python (the batched lookup
        costs ~0.1 ms of small tensor ops per call).  It gives the same numbers as ``TemporalValues.lookup``: the
        same clamping and neighbours, the weight computed in float32 the same way, and an exact table entry
        returned as is (``v * 1 + v * 0 == v``).
        """
        table = self.step.timesteps
        entries = table.tolist()
        tc = min(max(t, entries[0]), entries[-1])
        hi = min(bisect_left(entries, tc), len(entries) - 1)
        if entries[hi] == tc:
            step = self.step.values[hi]
            zp = None if self.zero_point is None else self.zero_point.values[hi]
            return step, zp
        lo = hi - 1
        tc_ = torch.tensor(tc, dtype=table.dtype, device=table.device)
        w = (tc_ - table[lo]) / (table[hi] - table[lo]).clamp_min(1e-12)

        def blend(values: TemporalValues) -> torch.Tensor:
            a, b = values.values[lo], values.values[hi]
            w_ = w.to(a.dtype)
            return a * (1.0 - w_) + b * w_

        return blend(self.step), None if self.zero_point is None else blend(self.zero_point)

    @torch.no_grad()
    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` at the context's timesteps (``int32``)."""
        t = self._sample_timesteps(x.shape[0])
        step, zp = self.qparams(t)
        view = (-1,) + (1,) * (x.dim() - 1)
        return quantize(x.float(), step.reshape(view), None if zp is None else zp.reshape(view), self.qmin, self.qmax)

    # -- calibration -------------------------------------------------------------------------------------------
    def start_calibration(self, method: str = "lp", max_elements: int = 8192) -> None:
        """Observe inputs (passed through unchanged) and accumulate per-timestep step sizes until
        `finish_calibration`.  Each observed call is assigned to its nearest table entry."""
        if method not in INIT_METHODS:
            raise ValueError(f"`method` must be one of {INIT_METHODS}, got {method!r}.")
        self._calibrating = True
        self._calib_method = method
        self._calib_max_elements = max_elements
        n = len(self.step)
        self._calib_sum = torch.zeros(n, 2, dtype=torch.float64)
        self._calib_count = torch.zeros(n, dtype=torch.float64)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        t = self._sample_timesteps(x.shape[0])
        table = self.step.timesteps
        lo, hi, w = interpolation_indices(table, t.to(table.device))
        nearest = torch.where(w > 0.5, hi, lo)
        for idx in torch.unique(nearest).tolist():
            sample = x[(nearest == idx).to(x.device)].detach().float().reshape(-1)
            if sample.numel() > self._calib_max_elements:
                # A strided subsample keeps the search cheap; the extremes are kept so min-max stays exact.
                stride = -(-sample.numel() // self._calib_max_elements)
                sample = torch.cat([sample[::stride], sample.min().reshape(1), sample.max().reshape(1)])
            step, zp = init_qparams(sample.reshape(1, 1, -1), self.bits, self.symmetric, self._calib_method)
            self._calib_sum[idx, 0] += step.item()
            self._calib_sum[idx, 1] += 0.0 if zp is None else zp.item()
            self._calib_count[idx] += 1

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Average what was observed per entry; entries never observed are interpolated from observed ones."""
        if not self._calibrating:
            raise RuntimeError(f"{self.name or 'TemporalActQuantizer'}: finish_calibration without start_calibration.")
        seen = self._calib_count > 0
        if not bool(seen.any()):
            raise RuntimeError(
                f"{self.name or 'TemporalActQuantizer'}: no input was observed during calibration; is the layer used "
                f"by the model's forward pass?"
            )
        mean = self._calib_sum[seen] / self._calib_count[seen, None]
        table = self.step.timesteps.double()
        seen_t = table[seen.to(table.device)]
        filled = torch.stack([_interp(table, seen_t, mean[:, 0]), _interp(table, seen_t, mean[:, 1])], dim=1).float()
        self.step.fill_(filled[:, 0])
        if self.zero_point is not None:
            self.zero_point.fill_(torch.round(filled[:, 1]))
        self.calibrated.fill_(True)
        self._calibrating = False
        self._calib_sum = None


ActGranularity = PerToken | PerGroup


def dynamic_qparams(
    x: torch.Tensor, bits: int, symmetric: bool, granularity: ActGranularity, channel_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max step sizes (and integer zero points) of ``x`` per token or per token and group of channels.

    ``channel_dim`` is the channel dimension (-1 for a linear layer's input, 1 for a convolution's).  The results
    broadcast against ``x`` viewed by `dynamic_grouped_view` (per token: ``x`` itself, the channel dimension of size
    1).  The formulas are those of `quant.init.qparams_from_range`.
    """
    view, dim = dynamic_grouped_view(x, granularity, channel_dim)
    return _view_qparams(view, dim, bits, symmetric)


@torch.no_grad()
def _view_qparams(view: torch.Tensor, dim: int, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    v = view.float()  # amin and amax: torch.aminmax over the last dim is several times slower on CPU
    lo, hi = v.amin(dim=dim, keepdim=True), v.amax(dim=dim, keepdim=True)
    # The smallest normal float as the least step: a token of tiny values still spans its codes.
    return qparams_from_range(lo, hi, bits, symmetric, eps=torch.finfo(torch.float32).tiny)


def dynamic_grouped_view(x: torch.Tensor, granularity: ActGranularity, channel_dim: int) -> tuple[torch.Tensor, int]:
    """``(view, dim)``: ``x`` with its channel dimension split into ``(groups, group_size)`` for `PerGroup` (unchanged
    for `PerToken`) and the dimension that a step size reduces over."""
    dim = channel_dim % x.dim()
    if isinstance(granularity, PerToken):
        return x, dim
    if not isinstance(granularity, PerGroup):
        raise TypeError(f"activation granularity must be PerToken() or PerGroup(group_size), got {granularity!r}.")
    channels = x.shape[dim]
    if channels % granularity.group_size:
        raise ValueError(
            f"`act_group_size` ({granularity.group_size}) must divide the number of input channels ({channels})."
        )
    shape = (*x.shape[:dim], channels // granularity.group_size, granularity.group_size, *x.shape[dim + 1 :])
    return x.reshape(shape), dim + 1


def dynamic_fake_quantize(
    x: torch.Tensor, bits: int, symmetric: bool, granularity: ActGranularity, channel_dim: int
) -> torch.Tensor:
    """Quantize and dequantize ``x`` with min-max step sizes computed from ``x`` itself per token (or per token and
    group of channels).  The gradient flows straight through to ``x``; the step sizes are constants of each call
    (they have no parameter to learn)."""
    qmin, qmax = qrange(bits, symmetric)
    view, dim = dynamic_grouped_view(x, granularity, channel_dim)
    step, zero_point = _view_qparams(view, dim, bits, symmetric)
    out = fake_quantize(view.to(_compute_dtype(x)), step, zero_point, qmin, qmax)
    return out.reshape(x.shape).to(x.dtype)


class DynamicActQuantizer(nn.Module):
    """Dynamic activation fake-quantizer: min-max step sizes (and zero points) computed from each input per token or
    per token and group of channels, at every call.

    Nothing is calibrated or learned, so the step sizes follow each sample, timestep and token: no timestep table,
    and mixed timesteps in one batch cost nothing extra.  What it costs is a reduction over the input at every call
    (and, in an exported model, a per-token scale in the integer GEMM's epilogue).  It drops in for
    [TemporalActQuantizer][diffusers_qalora.quant.TemporalActQuantizer]: ``calibrated`` is always true and
    calibration passes the inputs through.

    Args:
        bits (`int`): 2..8.
        symmetric (`bool`, defaults to `False`): signed codes over ``[-max|x|, max|x|]``; by default unsigned codes
            over ``[min(x, 0), max(x, 0)]`` with a zero point per token (group).
        granularity (`PerToken | PerGroup`, defaults to `PerToken()`): one step size per token, or per token and
            group of ``group_size`` channels.
        channel_dim (`int`, defaults to `-1`): the channel dimension of the input: -1 for linear layers, 1 for
            convolutions (a token is then a pixel).
        name (`str`, *optional*): used in error messages.
    """

    calibrated = True

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        granularity: ActGranularity | None = None,
        channel_dim: int = -1,
        name: str = "",
    ) -> None:
        super().__init__()
        self.bits = validate_bits(bits, "act_bits")
        self.symmetric = bool(symmetric)
        self.qmin, self.qmax = qrange(self.bits, self.symmetric)
        self.granularity = PerToken() if granularity is None else granularity
        if not isinstance(self.granularity, PerToken | PerGroup):
            raise TypeError(
                f"activation granularity must be PerToken() or PerGroup(group_size), got {self.granularity!r}."
            )
        self.channel_dim = int(channel_dim)
        self.name = name
        self.enabled = True
        self._calibrating = False

    def extra_repr(self) -> str:
        gran = "per-token" if isinstance(self.granularity, PerToken) else f"group={self.granularity.group_size}"
        return f"bits={self.bits}, symmetric={self.symmetric}, dynamic {gran}"

    @property
    def group_size(self) -> int | None:
        return self.granularity.group_size if isinstance(self.granularity, PerGroup) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibrating or not self.enabled or x.numel() == 0:
            return x
        return dynamic_fake_quantize(x, self.bits, self.symmetric, self.granularity, self.channel_dim)

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step sizes and zero points of ``x`` (see `dynamic_qparams`)."""
        return dynamic_qparams(x, self.bits, self.symmetric, self.granularity, self.channel_dim)

    @torch.no_grad()
    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (``int32``, the shape of ``x``)."""
        view, dim = dynamic_grouped_view(x, self.granularity, self.channel_dim)
        step, zero_point = _view_qparams(view, dim, self.bits, self.symmetric)
        return quantize(view.float(), step, zero_point, self.qmin, self.qmax).reshape(x.shape)

    # -- calibration: nothing to calibrate; inputs pass through so the model runs in full precision meanwhile ------
    @property
    def is_calibrating(self) -> bool:
        return self._calibrating

    def start_calibration(self, method: str = "lp", max_elements: int = 8192) -> None:
        self._calibrating = True

    def finish_calibration(self) -> None:
        self._calibrating = False

    def cancel_calibration(self) -> None:
        self._calibrating = False


@torch.no_grad()
def copy_calibration_(
    target: TemporalActQuantizer | DynamicActQuantizer, source: TemporalActQuantizer | DynamicActQuantizer
) -> None:
    """Set ``target``'s step sizes (and zero points) from a calibrated ``source`` of the same bits and symmetry (a
    dynamic ``target`` needs nothing).

    Equal tables are copied; otherwise the source is interpolated at the target's timesteps, except that a
    single-entry target gets the mean over the source's entries (one step size for every timestep).
    """
    if isinstance(target, DynamicActQuantizer):
        return  # it computes its step sizes from each input: nothing to calibrate, whatever the source
    if isinstance(source, DynamicActQuantizer):
        raise ValueError(
            f"cannot calibrate {target.name or 'a temporal quantizer'} from {source.name or 'a dynamic quantizer'}: "
            f"a dynamic quantizer stores no step sizes. Calibrate it with calibrate_activations instead."
        )
    if not bool(source.calibrated):
        raise RuntimeError(f"{source.name or 'source quantizer'} is not calibrated.")
    if (target.bits, target.symmetric) != (source.bits, source.symmetric):
        raise ValueError(
            f"cannot copy calibration between {source.bits}-bit symmetric={source.symmetric} and "
            f"{target.bits}-bit symmetric={target.symmetric} quantizers."
        )
    pairs = [(target.step, source.step)]
    if target.zero_point is not None:
        pairs.append((target.zero_point, source.zero_point))
    for dst, src in pairs:
        values = src.stacked().detach().double()
        if len(dst) == 1:
            new = values.mean().reshape(1)
        elif torch.equal(dst.timesteps, src.timesteps):
            new = values
        else:
            new = _interp(dst.timesteps.double(), src.timesteps.double(), values)
        if dst is target.zero_point:
            new = torch.round(new)
        dst.fill_(new.float())
    target.calibrated.fill_(True)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` in torch: piecewise-linear through ``(xp, fp)``, clamped at the ends."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    lo, hi, w = interpolation_indices(xp, x)
    return fp[lo] * (1 - w) + fp[hi] * w


# The one place a model keeps its timestep context and the pre-hook that fills it (the tuner, the integer export and
# the Winograd loader all go through `attach_timestep_context`, so a model never gets two hooks).
TIMESTEP_CONTEXT_ATTR = "_qalora_timestep_context"
TIMESTEP_HOOK_ATTR = "_qalora_timestep_hook"


def attach_timestep_context(
    model: nn.Module, timestep_argument: str = "timestep", receivers: Iterable[nn.Module] = ()
) -> TimestepContext:
    """The shared [TimestepContext][diffusers_qalora.TimestepContext] of ``model``, fed by a forward pre-hook that
    reads ``timestep_argument`` of ``model.forward``; both are created on the first call and reused afterwards.

    Every [TemporalActQuantizer][diffusers_qalora.quant.TemporalActQuantizer] of ``model`` and each of ``receivers``
    (e.g. integer layers) gets it as ``.context``.
    """
    context = getattr(model, TIMESTEP_CONTEXT_ATTR, None)
    if context is None:
        context = TimestepContext()
        handle = install_timestep_hook(model, context, timestep_argument)
        # object.__setattr__: not an nn.Module attribute (no state dict entry, not moved by .to()).
        object.__setattr__(model, TIMESTEP_CONTEXT_ATTR, context)
        object.__setattr__(model, TIMESTEP_HOOK_ATTR, handle)
    for module in model.modules():
        if isinstance(module, TemporalActQuantizer):
            module.context = context
    for module in receivers:
        module.context = context
    return context


def detach_timestep_context(model: nn.Module) -> None:
    """Remove the pre-hook and the context [attach_timestep_context][diffusers_qalora.quant.attach_timestep_context]
    installed (nothing if there is none)."""
    if getattr(model, TIMESTEP_CONTEXT_ATTR, None) is None:
        return
    getattr(model, TIMESTEP_HOOK_ATTR).remove()
    object.__delattr__(model, TIMESTEP_CONTEXT_ATTR)
    object.__delattr__(model, TIMESTEP_HOOK_ATTR)
