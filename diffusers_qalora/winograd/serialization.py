"""Saving and loading the Winograd layers of a model: safetensors tensors plus a JSON record of what was replaced.

A folder written by [save_winograd][diffusers_qalora.save_winograd] holds

* ``winograd.safetensors``: every tensor of every replaced layer, keyed ``<module name>.<key>`` exactly as in
  ``model.state_dict()`` (weight, bias, the transform scales ``scales.log_b`` / ``scales.log_g`` and, for layers that
  came from QALoRA, the input quantizer's per-timestep step sizes);
* ``winograd_config.json``: the format version, the denoiser's timestep argument and, per replaced module, its
  class, shape, padding, [WinogradConfig][diffusers_qalora.WinogradConfig] and input quantizer description.

[load_winograd][diffusers_qalora.load_winograd] rebuilds those modules on a model of the same architecture (a fresh full-precision model, or one
carrying the same QALoRA adapter) and loads the tensors; nothing is unpickled.  The layers also keep all their state
in ``state_dict()``, so ``model.load_state_dict(other.state_dict())`` works between two models that went through
[apply_winograd][diffusers_qalora.apply_winograd] with the same configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..quant import DynamicActQuantizer, PerGroup, PerToken, TemporalActQuantizer, attach_timestep_context
from ..quant.checksum import tensor_checksum
from ..utils import CHECKSUM_KEY, atomic_write, read_checked_safetensors
from .config import WinogradConfig
from .conv import WinogradConv2d, winograd_ineligibility
from .direct import DirectQuantConv2d
from .replace import LayerRecord, WinogradReport, _qalora_base, _swap, winograd_modules

WEIGHTS_NAME = "winograd.safetensors"
CONFIG_NAME = "winograd_config.json"
FORMAT = "diffusers_qalora.winograd"
FORMAT_VERSION = 1
_CLASSES = {"WinogradConv2d": WinogradConv2d, "DirectQuantConv2d": DirectQuantConv2d}


def _describe_quantizer(name: str, quantizer: nn.Module | None) -> dict[str, Any] | None:
    if quantizer is None:
        return None
    if isinstance(quantizer, DynamicActQuantizer):  # no state: its settings rebuild it
        return {
            "type": "DynamicActQuantizer",
            "bits": quantizer.bits,
            "symmetric": quantizer.symmetric,
            "group_size": quantizer.group_size,
            "channel_dim": quantizer.channel_dim,
        }
    if not isinstance(quantizer, TemporalActQuantizer):
        raise ValueError(
            f"cannot save the input quantizer of `{name}`: only TemporalActQuantizer and DynamicActQuantizer are "
            f"supported, got {type(quantizer).__name__}."
        )
    return {
        "type": "TemporalActQuantizer",
        "bits": quantizer.bits,
        "symmetric": quantizer.symmetric,
        "timesteps": quantizer.timesteps.tolist(),
    }


def _timestep_argument(model: nn.Module) -> str:
    for cfg in (getattr(model, "peft_config", None) or {}).values():
        arg = getattr(cfg, "timestep_argument", None)
        if isinstance(arg, str):
            return arg
    return "timestep"


def winograd_record(model: nn.Module) -> dict[str, Any] | None:
    """The JSON-serialisable record of the replaced layers (what ``winograd_config.json`` holds), or ``None`` when
    ``model`` has none.  `build_winograd_layers` rebuilds the layers from it.

    Raises:
        ValueError: a layer has an input quantizer that cannot be described.
    """
    layers = winograd_modules(model)
    if not layers:
        return None
    modules = []
    for name, layer in layers.items():
        padding = layer.padding
        modules.append(
            {
                "name": name,
                "class": type(layer).__name__,
                "in_channels": layer.in_channels,
                "out_channels": layer.out_channels,
                "padding": list(padding) if isinstance(padding, tuple) else padding,
                "bias": layer.bias is not None,
                "dtype": str(layer.weight.dtype).removeprefix("torch."),
                "config": layer.config.to_dict(),
                "input_quantizer": _describe_quantizer(name, layer.input_quantizer),
            }
        )
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "timestep_argument": _timestep_argument(model),
        "modules": modules,
    }


def winograd_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (``<module>.<key>`` -> CPU tensor) and the JSON-serialisable record of the replaced layers.

    Raises:
        ValueError: the model has no replaced layer, or one has an input quantizer that cannot be described.
    """
    record = winograd_record(model)
    if record is None:
        raise ValueError(f"{type(model).__name__} has no WinogradConv2d / DirectQuantConv2d; call apply_winograd.")
    tensors = {
        f"{name}.{key}": value.detach().to("cpu").contiguous().clone()
        for name, layer in winograd_modules(model).items()
        for key, value in layer.state_dict().items()
    }
    return tensors, record


def save_winograd(model: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write ``winograd.safetensors`` and ``winograd_config.json`` into ``save_directory`` (atomically).

    Returns:
        `pathlib.Path`: the folder.
    """
    tensors, record = winograd_state_dict(model)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "producer": FORMAT, CHECKSUM_KEY: tensor_checksum(tensors)}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata))
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return out


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}; save one with `save_winograd(model, path)`.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}): it is truncated or damaged; save the Winograd layers "
            f"again with `save_winograd(model, path)`."
        ) from None
    return validate_winograd_record(record, str(path))


def validate_winograd_record(record: Any, where: str) -> dict[str, Any]:
    """Check the format, version and module list of a record written by `winograd_record`; ``where`` names its
    source in the error."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where} is not a Winograd record (format {found!r}, expected {FORMAT!r}).")
    if record.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where} has format version {record.get('version')!r}; this library reads {FORMAT_VERSION}.")
    if not record.get("modules"):
        raise ValueError(f"{where} lists no module.")
    return record


def _target_conv(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the saved module `{name}` does not exist in {type(model).__name__}.") from None
    if isinstance(module, WinogradConv2d | DirectQuantConv2d):
        return module
    base = _qalora_base(module)
    conv = base if base is not None else module
    reason = winograd_ineligibility(conv)
    if reason is not None:
        raise ValueError(f"the saved module `{name}` cannot hold a Winograd layer in this model: {reason}.")
    return conv


def build_winograd_layers(
    model: nn.Module, record: dict[str, Any], where: str, device: torch.device | str | None = None
) -> list[tuple[str, nn.Module]]:
    """Build (without swapping them in) the layers that ``record`` lists, checked against ``model``'s convs; their
    tensors are uninitialised (on ``device``, by default each conv's device).  ``where`` names the record in errors."""
    built = []
    for entry in record["modules"]:
        name = entry["name"]
        conv = _target_conv(model, name)
        if (conv.in_channels, conv.out_channels) != (entry["in_channels"], entry["out_channels"]):
            raise ValueError(
                f"`{name}` is {conv.in_channels}->{conv.out_channels} channels in this model but "
                f"{entry['in_channels']}->{entry['out_channels']} in {where}."
            )
        cls = _CLASSES.get(entry["class"])
        if cls is None:
            raise ValueError(f"`{name}`: unknown layer class {entry['class']!r} in {where}.")
        padding = entry["padding"]
        padding = tuple(padding) if isinstance(padding, list) else padding
        layer = cls(
            entry["in_channels"],
            entry["out_channels"],
            padding=padding,
            bias=entry["bias"],
            config=WinogradConfig.from_dict(entry["config"]),
            dtype=getattr(torch, entry["dtype"]),
            device=conv.weight.device if device is None else device,
        )
        described = entry.get("input_quantizer")
        if described is not None:
            kind = described.get("type")
            if kind == "DynamicActQuantizer":
                size = described.get("group_size")
                layer.input_quantizer = DynamicActQuantizer(
                    described["bits"],
                    symmetric=described["symmetric"],
                    granularity=PerToken() if size is None else PerGroup(size),
                    channel_dim=described["channel_dim"],
                    name=name,
                )
            elif kind == "TemporalActQuantizer":
                layer.input_quantizer = TemporalActQuantizer(
                    described["timesteps"], described["bits"], symmetric=described["symmetric"], name=name
                )
            else:
                raise ValueError(f"`{name}`: unknown input quantizer {kind!r} in {where}.")
            if device is not None:
                layer.input_quantizer.to(device)
        built.append((name, layer))
    return built


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``winograd.safetensors`` (safetensors: never unpickles), checksum verified when the file has one
    (files saved before it existed have none)."""
    fix = "save the Winograd layers again with `save_winograd(model, path)` (or copy the folder again)"
    return read_checked_safetensors(path, "Winograd", fix)


def load_winograd(model: nn.Module, load_directory: str | os.PathLike) -> WinogradReport:
    """Rebuild the Winograd layers saved by [save_winograd][diffusers_qalora.save_winograd] in ``model`` (same architecture) and load their state.

    Every module is built and loaded before the first one is swapped in, so a failure leaves the model unchanged.
    Layers with an input quantizer read the model's timestep through the QALoRA tuner's timestep pre-hook when the
    model has one, else through a pre-hook installed here.

    Returns:
        [WinogradReport][diffusers_qalora.WinogradReport]: the loaded modules (no SQNR measured) and the configuration of the first one.
    """
    directory = Path(load_directory)
    record = _read_record(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}.")
    tensors = _read_weights(weights)
    built = build_winograd_layers(model, record, str(directory), device="cpu")
    records: dict[str, LayerRecord] = {}
    for name, layer in built:
        prefix = name + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            layer.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"`{name}`: the saved tensors do not fit the layer: {err}") from None
        layer.to(_target_conv(model, name).weight.device)
        records[name] = LayerRecord(
            name,
            layer.in_channels,
            layer.out_channels,
            source="saved",
            input_quantizer=layer.input_quantizer is not None,
        )
    if any(layer.input_quantizer is not None for _, layer in built):
        # The model's one timestep context (the QALoRA tuner's if it has one already).
        attach_timestep_context(
            model,
            record.get("timestep_argument", "timestep"),
            [layer.input_quantizer for _, layer in built if layer.input_quantizer is not None],
        )
    for name, layer in built:
        _swap(model, name, layer)
    return WinogradReport(config=built[0][1].config, replaced=records, inputs="none")
