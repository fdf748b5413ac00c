"""``torch.compile`` support of the integer layers.

Under ``torch.compile`` an integer layer traces its activation quantization as plain tensor operations (the step-size
lookup at each sample's timestep, ``round(x / s_b) + z_b``, the clamp and the ``uint8`` cast), so that Inductor fuses
them into the operation that produces the activation (GroupNorm + SiLU, the attention output, a residual add), and
calls its integer product through one custom op, ``diffusers_qalora::integer_product``, which the compiler treats as
opaque.  The op reads the layer's pre-packed oneDNN weights at run time from a registry of layers keyed by a string
(oneDNN's packed weights cannot be traced), so the weights are never copied into the graph.

Every batch takes the per-sample path: one timestep or many, the step sizes are a per-row scale, so a batch whose
samples sit at different timesteps costs what a batch with one shared timestep costs.  At run time the op looks at
the batch: samples that share one step size and zero point (one timestep) go to oneDNN with that step size, zero point
and the bias, which it applies in its own output stage; others get the per-row epilogue, one pass over the output.
"""

from __future__ import annotations

import itertools
import weakref

import torch

__all__ = ["integer_product", "layer_key"]

_LAYERS: dict[str, weakref.ref] = {}
_KEYS = itertools.count()
_KEY_ATTR = "_compile_key"


def layer_key(layer: torch.nn.Module) -> str:
    """The registry key of ``layer`` (assigned on first use; a copy of a layer gets a key of its own).

    The key is a constant of the compiled graph, so it is part of Inductor's on-disk cache key, while the op's output
    shape comes from the layer it names.  A counter alone repeats across processes (``IntegerConv2d:7`` of one run is
    another layer in the next), and a cached graph would then assert the other layer's output shape: the key carries
    the layer's geometry (`_product_geometry`), everything that shape depends on."""
    key = layer.__dict__.get(_KEY_ATTR)
    if key is None or _LAYERS.get(key, lambda: None)() is not layer:
        geometry = ",".join(str(v) for v in layer._product_geometry())
        key = f"{type(layer).__name__}({geometry}):{next(_KEYS)}"
        _LAYERS[key] = weakref.ref(layer, lambda _, key=key: _LAYERS.pop(key, None))
        layer.__dict__[_KEY_ATTR] = key
    return key


def _layer(key: str) -> torch.nn.Module:
    layer = _LAYERS.get(key, lambda: None)()
    if layer is None:
        raise RuntimeError(
            f"the integer layer {key!r} of a compiled graph no longer exists; compile the model again "
            f"(torch.compile on the model you run)."
        )
    return layer


def _integer_product(
    codes: torch.Tensor,
    scale: torch.Tensor,
    scaled_zero_point: torch.Tensor,
    layer: str,
    zero_point: int,
    padded: bool,
) -> torch.Tensor:
    return _layer(layer)._compiled_product(codes, scale, scaled_zero_point, zero_point, padded)


def _integer_product_fake(codes, scale, scaled_zero_point, layer, zero_point, padded):
    return _layer(layer)._compiled_product_like(codes, padded)


# Defined with `torch.library.Library` rather than `torch.library.custom_op`: the op is inference-only (its inputs are
# codes and step sizes, nothing to differentiate), and the decorator's autograd and aliasing layers cost about as much
# Python per call as the layer's own work; a plain kernel registration leaves the dispatcher and the body.
_LIBRARY = torch.library.Library("diffusers_qalora", "FRAGMENT")
_LIBRARY.define(
    "integer_product(Tensor codes, Tensor scale, Tensor scaled_zero_point, str layer, int zero_point, bool padded) "
    "-> Tensor"
)
_LIBRARY.impl("integer_product", _integer_product, "CompositeExplicitAutograd")
torch.library.register_fake("diffusers_qalora::integer_product", _integer_product_fake, lib=_LIBRARY)

integer_product = torch.ops.diffusers_qalora.integer_product
integer_product.__doc__ = """The integer product of the layer registered as ``layer`` on ``uint8`` ``codes`` (a linear
layer's ``(B * T, K)``, a convolution's ``(B, C, H, W)`` channels-last, already padded when ``padded``), with the
per-sample epilogue ``s_b * acc + bias - s_b * z_b * M`` (``scale``: ``s_b``, ``scaled_zero_point``: ``s_b * z_b``,
``(B,)`` each).  ``zero_point`` is the zero point the graph was traced with (the one every timestep shares, or 0): the
layer refuses a call whose tables have changed since."""
