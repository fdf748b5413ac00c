"""`QALoraDiffusersQuantizer`: the diffusers quantizer of the ``"qalora"`` backend.

Two ways in through ``ModelMixin.from_pretrained``:

* **an exported folder** (``config.json`` carries ``quantization_config`` with ``layers``): the model skeleton (on
  the meta device) gets empty integer layers where the config says so, every integer tensor of the checkpoint is
  checked against them before anything is loaded, the tensors are loaded as they are (codes stay integers, scales
  stay float32 whatever ``torch_dtype`` says), a checksum recorded at save time is verified, and the timestep hook is
  installed;
* **a float checkpoint plus** ``quantization_config=QALoraQuantConfig(...)``: the weights load as usual, then QALoRA
  layers are injected with min-max weight step sizes (by default; ``weight_init`` says) and the adapter frozen
  (``trainable_adapter=True`` for distillation), ready for ``calibrate_activations`` and ``export_quantized``.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from safetensors import safe_open
from torch import nn

from ...export import IntegerConv2d, IntegerLinear, attach_integer_context, integer_layers
from ...export.layout import ACT_TABLE_NAMES, ATTENTION_TABLE_NAMES
from ...quant import KernelPreference, set_kernel_preference
from ...quant.checksum import streamed_tensor_checksum, tensor_checksum
from ...tuners.qalora.attention import set_qalora_attn_processor
from ...tuners.qalora.model import adapter_keys, finish_rebuild, rebuild_adapters
from ...winograd import winograd_modules
from ...winograd.serialization import build_winograd_layers, winograd_record
from .config import QALoraQuantConfig

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "qalora_integer_checksum"  # over the integer layers' tensors, checked after loading
STATE_CHECKSUM_KEY = "qalora_state_checksum"  # over every tensor of the checkpoint as stored, checked before loading
FORMAT_KEY = "qalora_format"
FORMAT_VERSION = "1"
_TENSOR_NAMES = ("weight_packed", "weight_scale", "bias", *ACT_TABLE_NAMES, *ATTENTION_TABLE_NAMES)
_EXPECTED_DTYPES = {"weight_packed": torch.uint8}


def integer_state_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    return tensor_checksum(tensors)


def _integer_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in integer_layers(model).items():
        for tensor_name in _TENSOR_NAMES:
            t = getattr(layer, tensor_name)
            if t is not None:
                out[f"{name}.{tensor_name}" if name else tensor_name] = t
    return out


class QALoraDiffusersQuantizer(DiffusersQuantizer):
    """diffusers quantizer for [QALoraQuantConfig][diffusers_qalora.QALoraQuantConfig] (see the module docstring)."""

    requires_calibration = False
    required_packages = None
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: QALoraQuantConfig, **kwargs) -> None:
        if not isinstance(quantization_config, QALoraQuantConfig):
            raise TypeError(
                f"`quantization_config` must be a QALoraQuantConfig, got {type(quantization_config).__name__}."
            )
        super().__init__(quantization_config, **kwargs)
        self._layouts = quantization_config.layouts() if self.pre_quantized else {}
        self._files: list[str] = []
        self._expected_checksum: str | None = None
        self._model: nn.Module | None = None
        # The model this quantizer belongs to once it is exported or loaded: save_pretrained records its Winograd
        # layers (a weak reference, so the quantizer does not keep the model alive).
        self._owner: weakref.ref[nn.Module] | None = None
        self._winograd_state: dict[str, dict[str, torch.Tensor]] = {}  # Winograd layer -> its tensors, while loading
        self._winograd_device: dict[str, Any] = {}
        self._torch_dtype: torch.dtype | None = None
        # A float model saved with its PEFT adapters (`quantization_config.adapters`): the adapters are injected
        # before the weights load, and their tensors collected here and loaded once all are in.
        self._adapter_keys: set[str] = set()
        self._adapter_tensors: dict[str, torch.Tensor] = {}
        self._bit_viewed: set[str] = set()

    @property
    def rebuilds_adapters(self) -> bool:
        """Whether this quantizer loads a float model carrying QALoRA adapters (not an exported one)."""
        return self.pre_quantized and self.quantization_config.adapters is not None

    # -- environment and dtype -----------------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs) -> None:
        config = self.quantization_config
        if not self.pre_quantized and config.adapters is not None:
            raise ValueError(
                "this QALoraQuantConfig records the adapters of a saved QALoRA model (`adapters` is set); it is read "
                "from that folder's config.json. Load the folder without `quantization_config`."
            )
        if self.pre_quantized and not config.is_exported and config.adapters is None:
            raise ValueError(
                "config.json has a 'qalora' quantization_config without `layers`: it does not describe an exported "
                "integer model. Export the model with diffusers_qalora.export_quantized(model) and save it again."
            )
        if not self.pre_quantized and config.is_exported:
            raise ValueError(
                "this QALoraQuantConfig describes an exported integer model (`layers` is set) but the checkpoint is a "
                "float one. Load the exported folder without `quantization_config`, or pass a fresh "
                "QALoraQuantConfig(weight_bits=..., act_bits=...) to quantize this float checkpoint."
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values() and self.pre_quantized:
            raise NotImplementedError(
                "integer QALoRA layers cannot be offloaded to disk; use a device_map without 'disk'."
            )

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        # Float layers follow `torch_dtype` as with every backend; integer layers keep integer codes and float32 scales.
        self._torch_dtype = torch_dtype
        return torch_dtype

    # -- loading an exported model ---------------------------------------------------------------------------------
    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        if self.pre_quantized:
            self._files = [str(f) for f in checkpoint_files or [] if isinstance(f, str)]
            checksums, state_checksums = set(), set()
            for path in [] if self.rebuilds_adapters else self._files:
                if not path.endswith(".safetensors"):
                    raise ValueError(
                        f"{path}: an exported QALoRA model is stored as safetensors only; re-save it with "
                        f"save_pretrained(..., safe_serialization=True)."
                    )
                try:
                    with safe_open(path, framework="pt") as f:
                        metadata = f.metadata() or {}
                except Exception as err:  # safetensors raises its own error type for a damaged header
                    raise OSError(
                        f"{path} is not a readable safetensors file ({err}); it is truncated or damaged. Download or "
                        f"save the model again."
                    ) from err
                if metadata.get(CHECKSUM_KEY):
                    checksums.add(metadata[CHECKSUM_KEY])
                if metadata.get(STATE_CHECKSUM_KEY):
                    state_checksums.add(metadata[STATE_CHECKSUM_KEY])
            self._expected_checksum = checksums.pop() if len(checksums) == 1 else None
            if len(state_checksums) > 1:
                raise ValueError(
                    f"the shards {self._where()} come from different saves (their checksums differ). Download or save "
                    f"the model again."
                )
            if state_checksums:
                self._verify_state_checksum(state_checksums.pop())
        return loaded_keys

    def _verify_state_checksum(self, expected: str) -> None:
        # Every tensor as stored (float ones too, before any dtype cast), read one at a time: a flipped byte in any
        # tensor is caught before the model is touched.
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(safe_open(path, framework="pt")) for path in self._files]
            owner = {name: handle for handle in handles for name in handle.keys()}  # noqa: SIM118 (not a dict)
            try:
                actual = streamed_tensor_checksum(sorted(owner), lambda name: owner[name].get_tensor(name))
            except Exception as err:  # safetensors raises its own error types for data cut short
                raise OSError(
                    f"{self._where()} cannot be read whole ({err}); it is truncated or damaged. Download "
                    f"or save the model again."
                ) from err
        if actual != expected:
            raise ValueError(
                f"corrupt checkpoint ({self._where()}): the checksum of its tensors differs from the one recorded by "
                f"save_pretrained. Download or save the model again."
            )

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        if not self.pre_quantized:
            return model
        if self.rebuilds_adapters:
            base_keys = set(model.state_dict())
            rebuild_adapters(model, self.quantization_config.adapters)
            self._adapter_keys = adapter_keys(model, base_keys)
            return model
        self._model = model  # read by the per-shard checks in maybe_update_state_dict; dropped after loading
        replacements = {}
        for name, layout in self._layouts.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"config.json's quantization_config lists integer layer `{name}`, which {type(model).__name__} "
                    f"(built from the same config.json) does not have. The config and the model disagree: restore the "
                    f"config.json that save_pretrained wrote."
                ) from None
            if layout.kind == "linear" and isinstance(module, nn.Linear):
                new = IntegerLinear.from_linear(module, layout, device="meta")
            elif layout.kind == "conv2d" and isinstance(module, nn.Conv2d) and module.groups == 1:
                new = IntegerConv2d.from_conv2d(module, layout, device="meta")
            else:
                raise ValueError(
                    f"config.json's quantization_config says `{name}` is an integer {layout.kind} layer, but the model "
                    f"has a {type(module).__name__} there. Restore the config.json that save_pretrained wrote."
                )
            new.name = name
            set_kernel_preference(new, self.quantization_config.kernel_preference)
            replacements[name] = new
        winograd = []
        if self.quantization_config.winograd is not None:
            # Their tensors arrive through create_quantized_param and are loaded with the layers' own load_state_dict
            # once all are in (a temporal step-size table is one tensor on disk but one parameter per timestep).
            winograd = build_winograd_layers(
                model, self.quantization_config.winograd, "config.json's quantization_config.winograd", device="cpu"
            )
            self._winograd_state = {name: {} for name, _ in winograd}
            if self.quantization_config.kernel_preference is not KernelPreference.ONEDNN:  # integer layers only
                for _, layer in winograd:
                    set_kernel_preference(layer, self.quantization_config.kernel_preference)
        for name, new in [*replacements.items(), *winograd]:
            model.set_submodule(name, new)
        # Projections that carry the attention's step sizes: their attention modules run the QALoRA processors,
        # which diffusers' constructor did not install (processors are not saved).
        set_qalora_attn_processor(model)
        return model

    def _where(self) -> str:
        return ", ".join(self._files) or "the checkpoint"

    def _check_tensor(self, model: nn.Module, key: str, value: torch.Tensor) -> None:
        module_name, _, tensor_name = key.rpartition(".")
        layout = self._layouts[module_name]
        expected = getattr(model.get_submodule(module_name), tensor_name)
        if expected is None:
            raise ValueError(
                f"{self._where()}: `{key}` is a bias, but config.json describes `{module_name}` without one."
            )
        if tuple(value.shape) != tuple(expected.shape):
            raise ValueError(
                f"{self._where()}: `{key}` has shape {tuple(value.shape)}, but config.json's quantization_config "
                f"describes `{module_name}` as {layout.kind} W{layout.weight_bits}A{layout.act_bits} "
                f"(group_size={layout.group_size}, {layout.num_timesteps} timesteps), which needs shape "
                f"{tuple(expected.shape)}. The config and the tensors disagree: restore the config.json that "
                f"save_pretrained wrote next to this file, or export the model again."
            )
        want = _EXPECTED_DTYPES.get(tensor_name)
        if want is not None and value.dtype != want:
            raise ValueError(f"{self._where()}: `{key}` must be {want}, got {value.dtype}; the file is not an export.")
        if want is None and not value.is_floating_point():
            raise ValueError(f"{self._where()}: `{key}` must be a float tensor, got {value.dtype}.")

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Runs on each shard before any of its tensors is loaded: check them all first.
        if not self.pre_quantized:
            return state_dict
        for key, value in state_dict.items():
            if self._owns(key):
                self._check_tensor(self._model, key, value)
        if self._torch_dtype in (None, torch.float32):
            return state_dict
        # Adapter tensors keep their saved dtype too (QALoRA's are float32 whatever the base weights are).
        self._bit_viewed |= {k for k, v in state_dict.items() if k in self._adapter_keys and v.dtype == torch.float32}
        # diffusers casts every floating tensor of the checkpoint to `torch_dtype` before handing it to
        # `create_quantized_param`; the float32 scales of the integer layers must not be rounded to that dtype.  They
        # travel as their int32 bit patterns (not floating, so not cast) and are viewed back as float32 on arrival.
        return {
            key: value.view(torch.int32)
            if (self._owns(key) or key in self._adapter_keys) and value.dtype == torch.float32
            else value
            for key, value in state_dict.items()
        }

    def _owns(self, key: str) -> bool:
        module_name, _, tensor_name = key.rpartition(".")
        return tensor_name in _TENSOR_NAMES and module_name in self._layouts

    def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
        ours = sorted(k for k in missing_keys if k in self._adapter_keys)
        if ours:
            raise ValueError(
                f"{self._where()} lacks {len(ours)} adapter tensor(s) that config.json's quantization_config.adapters "
                f"describes, e.g. {ours[:3]}. The file is truncated or not the one this config.json belongs to: save "
                f"the pipeline again."
            )
        if self.pre_quantized:
            ours = sorted(k for k in missing_keys if self._owns(k))
            if ours:
                raise ValueError(
                    f"{self._where()} lacks {len(ours)} tensor(s) of the integer layers that config.json lists, "
                    f"e.g. {ours[:3]}. The file is truncated or not the export this config.json belongs to: "
                    f"download or save the model again."
                )
        return missing_keys

    def _winograd_owner(self, key: str) -> str | None:
        return next((name for name in self._winograd_state if key.startswith(name + ".")), None)

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        return self.pre_quantized and (
            self._owns(param_name) or self._winograd_owner(param_name) is not None or param_name in self._adapter_keys
        )

    def check_quantized_param_shape(self, param_name, current_param, loaded_param) -> bool:
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            raise ValueError(
                f"{self._where()}: `{param_name}` has shape {tuple(loaded_param.shape)}, expected "
                f"{tuple(current_param.shape)} from config.json's quantization_config; restore the config.json that "
                f"save_pretrained wrote."
            )
        return True

    def create_quantized_param(
        self, model, param_value, param_name, target_device, state_dict=None, unexpected_keys=None, **kwargs
    ) -> None:
        if param_name in self._adapter_keys:
            if param_name in self._bit_viewed:
                param_value = param_value.view(torch.float32)  # see maybe_update_state_dict
            device = target_device if target_device is not None else "cpu"
            self._adapter_tensors[param_name] = param_value.to(device)
            return
        owner = self._winograd_owner(param_name)
        if owner is not None:
            self._winograd_state[owner][param_name[len(owner) + 1 :]] = param_value
            self._winograd_device[owner] = target_device
            return
        module_name, _, tensor_name = param_name.rpartition(".")
        if tensor_name != "weight_packed" and param_value.dtype == torch.int32:
            param_value = param_value.view(torch.float32)  # see maybe_update_state_dict
        self._check_tensor(model, param_name, param_value)
        module = model.get_submodule(module_name)
        dtype = torch.uint8 if tensor_name == "weight_packed" else torch.float32
        device = target_device if target_device is not None else "cpu"
        module._buffers[tensor_name] = param_value.to(device=device, dtype=dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.rebuilds_adapters:
            finish_rebuild(model, config.adapters, self._adapter_tensors, self._where())
            self._adapter_tensors, self._bit_viewed = {}, set()
            # A float model with adapters, as before saving: `.half()` / `.to(dtype)` stay allowed.
            model.is_quantized = False
            return model
        if not self.pre_quantized:
            from ...tuners.qalora.api import get_qalora_model

            return get_qalora_model(model, config.to_qalora_config())
        left = [
            f"{n}.{b}"
            for n, layer in integer_layers(model).items()
            for b, t in layer._buffers.items()
            if t is not None and t.device.type == "meta"
        ]
        if left:
            raise ValueError(f"{self._where()}: integer tensors {left[:3]} were not loaded; save the model again.")
        if self._expected_checksum is not None:
            actual = integer_state_checksum(_integer_tensors(model))
            if actual != self._expected_checksum:
                raise ValueError(
                    f"corrupt checkpoint ({self._where()}): the checksum of the integer tensors differs from the one "
                    f"recorded by save_pretrained. Download or save the model again."
                )
        winograd = winograd_modules(model)
        for name, state in self._winograd_state.items():
            layer = winograd[name]
            try:
                layer.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"{self._where()}: the tensors of Winograd layer `{name}` do not fit the layer that "
                    f"config.json describes ({err}); save the model again."
                ) from None
            device = self._winograd_device.get(name)
            if device is not None:
                layer.to(device)
        self._winograd_state, self._winograd_device = {}, {}
        context = attach_integer_context(model, config.timestep_argument)
        for layer in integer_layers(model).values():
            layer._derived.clear()
        for layer in winograd.values():
            if layer.input_quantizer is not None:
                layer.input_quantizer.context = context
            layer.clear_cache()
        self._model = None
        self._owner = weakref.ref(model)
        return model

    # -- saving --------------------------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, state_dict: dict[str, Any], safe_serialization: bool = False):
        if not self.quantization_config.is_exported:
            return state_dict, {}
        tensors = {k: v for k, v in state_dict.items() if self._owns(k)}
        metadata = {FORMAT_KEY: FORMAT_VERSION, CHECKSUM_KEY: integer_state_checksum(tensors)}
        if safe_serialization:  # what a .safetensors file stores: every tensor as it is in the state dict
            metadata[STATE_CHECKSUM_KEY] = tensor_checksum(state_dict)
        return state_dict, metadata

    @property
    def is_serializable(self) -> bool:
        if self.quantization_config.adapters is not None:
            return True  # a float model with its adapters, described by its live quantization_config record
        if not self.quantization_config.is_exported:
            logger.warning(
                "A QALoRA model that is not exported yet cannot be saved with save_pretrained: call "
                "diffusers_qalora.export_quantized(model) first (or save the adapter with save_qalora_adapter)."
            )
            return False
        # save_pretrained asks this before it writes config.json: record the Winograd layers the model has at that
        # moment, so that from_pretrained rebuilds them.
        model = self._owner() if self._owner is not None else None
        if model is not None:
            self.quantization_config.winograd = winograd_record(model)
        return True

    @property
    def supports_safetensors_serialization(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return not self.quantization_config.is_exported

    @property
    def is_compileable(self) -> bool:
        return False

    def _dequantize(self, model):
        raise NotImplementedError(
            "an exported QALoRA model keeps only integer codes; its float weights are gone. Load the float checkpoint "
            "and the QALoRA adapter instead."
        )


def mark_exported(model: nn.Module, config: QALoraQuantConfig) -> None:
    """Make an exported diffusers model look as if ``from_pretrained`` had quantized it: ``is_quantized``,
    ``hf_quantizer`` and ``config.quantization_config``, so that ``save_pretrained`` writes the integer tensors and
    the config, and ``.to(dtype)`` refuses to cast it."""
    quantizer = QALoraDiffusersQuantizer(config, pre_quantized=True)
    model.register_to_config(quantization_config=config)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.hf_quantizer = quantizer
    quantizer._owner = weakref.ref(model)
