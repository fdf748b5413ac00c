"""Integer kernels and their dispatch, by the layer's [KernelPreference][diffusers_qalora.KernelPreference]:

* ``"onednn"`` (CPU): oneDNN's quantized matmul and convolution as exposed by torch
  (``torch.ops.onednn.qlinear_pointwise`` / ``qconv2d_pointwise`` on pre-packed ``int8`` weights): ``uint8``
  activations with a zero point, ``int8`` per-channel weights, ``int32`` accumulation, and a float32 output with the
  ``s_x * s_w`` epilogue and the bias fused;
* ``"torch"``: the dequantized float computation, bit-identical to the fake-quant model (the fallback, and the
  oracle of the tests);
* ``"triton"``: the Triton integer GEMM of `diffusers_qalora.kernels` (CUDA; CPU tensors under the Triton
  interpreter), provided through `set_kernel_provider` (this package stays plain torch and does not import it);
* kernels registered with [register_kernel][diffusers_qalora.export.register_kernel] for other devices.

``"auto"`` picks a registered kernel for the input's device, else what the kernel provider chooses (Triton on CUDA
when ``triton`` imports), else oneDNN on CPU when it is available and exact on this machine, else the torch path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch

from ..quant.kernel_preference import KernelPreference

KERNEL_OPS = ("linear", "conv2d")

# provider(preference, device, op) -> kernel, or None to fall through to the built-in choice; installed by
# `diffusers_qalora.kernels.install`.  For ``"triton"`` it returns a kernel or raises (naming the reason).
_PROVIDER: list[Callable | None] = [None]

# (device type, op) -> kernel(module, x, scale, zero_point) -> output.  ``scale``/``zero_point`` are Python numbers
# (one timestep group per call); the kernel quantizes ``x`` itself so that it can fuse that step.
_KERNELS: dict[tuple[str, str], Callable] = {}


class IntegerKernelWarning(UserWarning):
    """A fast integer kernel is unavailable or inexact here and the layer falls back to the torch path."""


def register_kernel(device_type: str, op: str, kernel: Callable, replace: bool = False) -> None:
    """Register an integer kernel for ``op`` (``"linear"`` or ``"conv2d"``) on ``device_type`` (e.g. ``"cuda"``).

    The kernel is called as ``kernel(module, x, scale, zero_point)`` with the float input ``x`` (one timestep group),
    the activation step size and zero point as Python numbers, and returns the layer output in ``x.dtype``.  It reads
    the layer's integer tensors from ``module`` (``module.int8_weight()``, ``module.weight_scale``, ``module.bias``).
    """
    if op not in KERNEL_OPS:
        raise ValueError(f"`op` must be one of {KERNEL_OPS}, got {op!r}.")
    if not isinstance(device_type, str) or not device_type:
        raise ValueError(f"`device_type` must be a device type such as 'cuda', got {device_type!r}.")
    if not callable(kernel):
        raise TypeError(f"`kernel` must be callable, got {type(kernel).__name__}.")
    key = (device_type, op)
    if key in _KERNELS and not replace and _KERNELS[key] is not kernel:
        raise ValueError(f"a {op} kernel is already registered for {device_type!r}; pass replace=True to override it.")
    _KERNELS[key] = kernel


def unregister_kernel(device_type: str, op: str) -> None:
    """Remove a kernel registered with [register_kernel][diffusers_qalora.export.register_kernel] (no error if there is none)."""
    _KERNELS.pop((device_type, op), None)


def set_kernel_provider(provider: Callable | None) -> Callable | None:
    """Install the provider of the ``"triton"`` preference (and of the CUDA choice of ``"auto"``); return the previous
    one.  ``provider(preference, device, op)`` returns a kernel with the calling convention of [register_kernel][diffusers_qalora.export.register_kernel]
    (a kernel with ``per_sample_qparams = True`` also accepts ``(B,)`` tensors of per-sample step sizes and zero
    points, so a batch of mixed timesteps runs in one call), or ``None``."""
    previous = _PROVIDER[0]
    _PROVIDER[0] = provider
    return previous


# -- oneDNN ----------------------------------------------------------------------------------------------------------
def _onednn_ops_present() -> bool:
    try:
        ops = torch.ops.onednn
        return all(
            hasattr(ops, n) for n in ("qlinear_pointwise", "qlinear_prepack", "qconv2d_pointwise", "qconv_prepack")
        )
    except (AttributeError, RuntimeError):
        return False


@lru_cache(maxsize=1)
def onednn_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether oneDNN's int8 kernels exist here and accumulate exactly.

    The probe multiplies all-255 activations by all-127 weights (and a 4-bit pattern): CPUs without int8 dot-product
    instructions (VNNI/AMX) make oneDNN pre-scale 8-bit weights, which changes the result; such CPUs use the
    torch path instead.
    """
    if not _onednn_ops_present() or not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN's quantized kernels (torch.ops.onednn.qlinear_pointwise)"
    try:
        k, n = 64, 16
        gen = torch.Generator().manual_seed(0)
        x = torch.cat(
            [
                torch.full((4, k), 255, dtype=torch.uint8),
                torch.randint(0, 256, (4, k), generator=gen, dtype=torch.uint8),
            ]
        )
        w = torch.cat(
            [
                torch.full((n // 2, k), 127, dtype=torch.int8),
                torch.randint(-128, 128, (n // 2, k), generator=gen, dtype=torch.int8),
            ]
        )
        scale = torch.ones(n)
        y = linear_onednn(x, 1.0, 3, prepack_linear(w), scale, None, torch.float32)
        expected = ((x.to(torch.int64) - 3) @ w.to(torch.int64).t()).to(torch.float32)
        if not torch.equal(y, expected):
            return False, "oneDNN's int8 matmul is not exact on this CPU (no VNNI/AMX int8 dot product)"
    except RuntimeError as err:  # pragma: no cover - depends on the build
        return False, f"oneDNN's int8 kernels failed a probe: {err}"
    return True, "ok"


def prepack_linear(weight_int8: torch.Tensor) -> torch.Tensor:
    """oneDNN layout of ``int8`` weights ``(N, K)``."""
    return torch.ops.onednn.qlinear_prepack(weight_int8.contiguous(), None)


def prepack_conv2d(
    weight_int8: torch.Tensor,
    scale: torch.Tensor,
    stride,
    padding,
    dilation,
    groups: int,
    input_shape: Sequence[int] | None = None,
):
    """oneDNN layout of ``int8`` conv weights ``(O, C, kh, kw)``; independent of the activation step size.

    ``input_shape`` (``(N, C, H, W)`` of the codes): oneDNN picks the weight layout for that input.  Without it a 1x1
    kernel gets a layout that its run-time kernel does not take, so every call reorders the weight first (at zero
    point 0 with a generic reorder that costs many times the convolution)."""
    return torch.ops.onednn.qconv_prepack(
        weight_int8.contiguous(),
        scale.float().contiguous(),
        1.0,
        0,
        list(stride),
        list(padding),
        list(dilation),
        groups,
        None if input_shape is None else list(input_shape),
    )


def _qlinear(codes, scale, zero_point, packed, w_scale, w_zp, bias, out_dtype) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(
        codes, scale, zero_point, packed, w_scale, w_zp, bias, 1.0, 0, out_dtype, "none", [], ""
    )


def _qconv2d(codes, scale, zero_point, packed, w_scale, w_zp, bias, stride, padding, dilation, groups, out_dtype):
    return torch.ops.onednn.qconv2d_pointwise(
        codes, scale, zero_point, packed, w_scale, w_zp, bias, stride, padding, dilation, groups, 1.0, 0, out_dtype,
        "none", [], "",
    )  # fmt: skip


# Run eagerly under torch.compile: inductor lowers these ops only when the pre-packed weight is a graph constant, and
# a layer that ran before being compiled holds it in its cache (an assertion deep in inductor otherwise).
@torch.compiler.disable
def linear_onednn(codes, scale: float, zero_point: int, packed, w_scale, bias, out_dtype) -> torch.Tensor:
    """``(codes - zero_point) @ W^T * (scale * w_scale) + bias`` with ``int32`` accumulation; ``codes`` ``uint8``
    of shape ``(..., K)``."""
    w_zp = _zeros_int64(w_scale.shape[0], w_scale.device)
    return _qlinear(codes, scale, zero_point, packed, w_scale, w_zp, bias, out_dtype)


@torch.compiler.disable
def conv2d_onednn(
    codes, scale: float, zero_point: int, packed, w_scale, bias, stride, padding, dilation, groups, out_dtype
) -> torch.Tensor:
    """Integer convolution of ``uint8`` codes (channels-last preferred); zero padding pads with the zero point."""
    w_zp = _zeros_int64(w_scale.shape[0], w_scale.device)
    return _qconv2d(
        codes, scale, zero_point, packed, w_scale, w_zp, bias, list(stride), list(padding), list(dilation), groups,
        out_dtype,
    )  # fmt: skip


def onednn_product(packed, w_scale, bias, conv: tuple | None = None) -> Callable[..., torch.Tensor]:
    """``run(codes, scale, zero_point)``: the float32 output of `linear_onednn` (``conv=None``) or of
    `conv2d_onednn` (``conv=(stride, padding, dilation)``, groups 1) on one pre-packed weight, with every argument
    but the activation's step size and zero point bound once.  For callers that run outside any graph (the
    ``torch.compile`` custom op's body): no ``torch.compiler.disable`` wrapper and no argument conversion per call."""
    w_zp = _zeros_int64(w_scale.shape[0], w_scale.device)
    if conv is None:

        def run(codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
            return _qlinear(codes, scale, zero_point, packed, w_scale, w_zp, bias, torch.float32)

        return run
    stride, padding, dilation = (list(v) for v in conv)

    def run(codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        return _qconv2d(
            codes, scale, zero_point, packed, w_scale, w_zp, bias, stride, padding, dilation, 1, torch.float32
        )

    return run


_ZEROS: dict[tuple[int, str], torch.Tensor] = {}


def _zeros_int64(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros(n, dtype=torch.int64, device=device)
    return z


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, IntegerKernelWarning, stacklevel=3)


def resolve_integer_kernel(
    preference: KernelPreference, device: torch.device, op: str, where: str = "an integer layer"
) -> str | Callable:
    """The implementation of one call of ``where`` (a layer name, for the errors): ``"onednn"``, ``"torch"`` or a
    kernel (registered, or from the kernel provider)."""
    if preference is KernelPreference.TORCH:
        return "torch"
    kernel = _KERNELS.get((device.type, op))
    if kernel is not None and preference is KernelPreference.AUTO:
        return kernel
    provider = _PROVIDER[0]
    if preference in (KernelPreference.AUTO, KernelPreference.TRITON):
        provided = None if provider is None else provider(preference, device, op)
        if provided is not None:
            return provided
        if preference is KernelPreference.TRITON:
            raise RuntimeError(
                f"{where}: kernel_preference='triton' needs the kernels of diffusers_qalora.kernels, which install "
                f"themselves when imported; `import diffusers_qalora.kernels` (the tuner and "
                f"`diffusers_qalora.<name>` do) or use kernel_preference='auto'."
            )
    if device.type == "cpu":
        usable, reason = onednn_status()
        if usable:
            return "onednn"
        if preference is KernelPreference.ONEDNN:
            raise RuntimeError(
                f"{where}: kernel_preference='onednn' is unavailable: {reason}. Use 'auto' or 'torch' "
                f"(diffusers_qalora.set_kernel_preference(model, 'auto'))."
            )
        warn_once(f"integer layers run the dequantized torch path: {reason}.")
        return "torch"
    if preference is KernelPreference.ONEDNN:
        raise RuntimeError(
            f"{where}: kernel_preference='onednn' runs on CPU only, but the input is on {device}. Use 'auto' "
            f"(diffusers_qalora.set_kernel_preference(model, 'auto'))."
        )
    warn_once(
        f"no integer kernel is registered for {device.type!r} ({op}); the layers run the dequantized torch path "
        f"there (register one with diffusers_qalora.export.register_kernel)."
    )
    return "torch"
