"""Saving and loading QALoRA adapters (safetensors + ``adapter_config.json``), locally or from the Hub.

The folder is the one ``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained(model, folder)`` reads it
too (after ``import diffusers_qalora``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from ..quant.checksum import tensor_checksum
from ..tuners.qalora.api import inject_qalora_adapter, restore_on_error
from ..tuners.qalora.config import QALoraConfig, QALoraPeftType
from ..tuners.qalora.model import attach_timestep_context, qalora_layers
from ..tuners.qalora.registration import register_peft_method
from ..utils import CHECKSUM_KEY, read_checked_safetensors
from .downloads import hub_file, snapshot_revision

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def unwrap_peft_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _strip_wrappers(key: str) -> str:
    """``a.to_q.base_layer.qal_A`` -> ``a.to_q.qal_A``: a QALoRA layer that another adapter (e.g. a style LoRA added
    later) wraps is saved under the name of the module it replaces, so the file loads into a model without that
    adapter."""
    module, sep, rest = key.partition(".qal_")
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return module + sep + rest


def qalora_adapter_of(model: nn.Module, adapter_name: str) -> tuple[nn.Module, QALoraConfig]:
    """The base model (unwrapped from a ``PeftModel``) and the config of its QALoRA adapter ``adapter_name``."""
    base = unwrap_peft_model(model)
    configs = getattr(base, "peft_config", None) or {}
    config = configs.get(adapter_name)
    if not isinstance(config, QALoraConfig):
        raise ValueError(
            f"{type(base).__name__} has no QALoRA adapter named {adapter_name!r} (adapters: {sorted(configs)})."
        )
    return base, config


def save_qalora_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter ``adapter_name`` of ``model`` to ``save_directory``: ``adapter_model.safetensors`` (LoRA
    factors, step sizes, timestep tables) and ``adapter_config.json``.  Files are written to a temporary folder and
    moved into place, so a failure leaves ``save_directory`` as it was.  ``state_dict``: the model's full state dict
    to read the adapter from instead of its own tensors (a model sharded by FSDP or DeepSpeed holds only a shard;
    ``Accelerator.get_state_dict`` gathers the whole)."""
    base, config = qalora_adapter_of(model, adapter_name)
    state = get_peft_model_state_dict(base, state_dict=state_dict, adapter_name=adapter_name)
    state = {_PEFT_PREFIX + _strip_wrappers(k): v.detach().contiguous().cpu() for k, v in state.items()}
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".tmp-qalora-") as tmp:
        metadata = {"format": "pt", "peft_type": "QALORA", CHECKSUM_KEY: tensor_checksum(state)}
        save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata=metadata)
        config.save_pretrained(tmp)
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            os.replace(os.path.join(tmp, name), target / name)
    return target


def looks_like_local_path(value: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else that does not exist is a mistyped local path."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value


def _resolve(
    path_or_repo: str | os.PathLike,
    filename: str,
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
) -> str:
    local = Path(path_or_repo) / (subfolder or "") / filename
    if Path(path_or_repo).is_dir():
        if not local.is_file():
            raise FileNotFoundError(f"{local} does not exist: {path_or_repo} is not a QALoRA adapter folder.")
        return str(local)
    if isinstance(path_or_repo, os.PathLike) or looks_like_local_path(str(path_or_repo)):
        raise FileNotFoundError(f"{path_or_repo} does not exist; pass an adapter folder or a Hub id like 'org/name'.")
    repo_id = str(path_or_repo)
    if filename == ADAPTER_CONFIG_NAME:

        def hint() -> str:
            return describe_repo_for_adapter(repo_id, revision, token, subfolder)
    else:

        def hint() -> str:
            return (
                f"The upload looks incomplete: push the adapter again (it needs {ADAPTER_CONFIG_NAME} and {filename})."
            )

    return hub_file(repo_id, filename, subfolder=subfolder, revision=revision, token=token, missing_hint=hint)


def describe_repo_for_adapter(
    repo_id: str, revision: str | None, token: str | bool | None, subfolder: str | None
) -> str:
    """Why a repo without ``adapter_config.json`` is not a QALoRA adapter, from its file list (best effort)."""
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except Exception:  # offline, or the listing itself failed: the missing-file message stands alone
        return "It is not a QALoRA adapter repo (written by `push_qalora_adapter` or `save_qalora_adapter`)."
    names = {f.rsplit("/", 1)[-1] for f in files}
    if "pytorch_lora_weights.safetensors" in names:
        return (
            "It holds a diffusers LoRA (pytorch_lora_weights.safetensors), not a QALoRA adapter: load it with "
            f"`pipe.load_lora_weights({repo_id!r})`."
        )
    if "config.json" in names and "model_index.json" not in names:
        return (
            "It holds a model (config.json), not a QALoRA adapter: an exported integer model loads with "
            f"`<diffusers model class>.from_pretrained({repo_id!r})` after `import diffusers_qalora`."
        )
    if subfolder and ADAPTER_CONFIG_NAME in files:
        return "The adapter is at the repo's root: leave `subfolder` unset."
    folders = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith("/" + ADAPTER_CONFIG_NAME)})
    if folders:
        return f"Adapters live in sub-folders {folders}: pass one of them as `subfolder=`."
    shown = ", ".join(sorted(files)[:12]) + (", ..." if len(files) > 12 else "")
    return f"It is not a QALoRA adapter repo (files: {shown})."


def _source(path_or_repo: str | os.PathLike, revision: str | None) -> str:
    """How messages name an adapter: the folder, or the Hub repo and revision."""
    if Path(path_or_repo).is_dir():
        return str(path_or_repo)
    return f"Hub repo {str(path_or_repo)!r} (revision {revision or 'main'!r})"


def read_adapter_config(
    path_or_repo: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> QALoraConfig:
    """Read ``adapter_config.json`` and check that it describes a QALoRA adapter."""
    register_peft_method()
    path = _resolve(path_or_repo, ADAPTER_CONFIG_NAME, subfolder, revision, token)
    return _parse_adapter_config(path, _source(path_or_repo, revision))


def _parse_adapter_config(path: str, source: str) -> QALoraConfig:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} ({source}) is not valid JSON ({err}): it is truncated or damaged; download it again "
            f"or save the adapter again with save_qalora_adapter."
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} ({source}) does not hold a JSON object; it is not an adapter_config.json.")
    if raw.get("peft_type") != QALoraPeftType.QALORA.value:
        raise ValueError(
            f"{source} holds a {raw.get('peft_type')!r} adapter, not a QALoRA one (adapter_config.json has "
            f"peft_type {raw.get('peft_type')!r}, QALoRA adapters have 'QALORA'); load it with diffusers' "
            f"`pipe.load_lora_weights` or `peft.PeftModel.from_pretrained` instead."
        )
    return QALoraConfig.from_pretrained(str(Path(path).parent))


def _fits(key: str, shape: torch.Size, weight_shape: torch.Size) -> bool:
    if ".qal_A" in key:  # (r, C_in, *kernel)
        return shape[1:] == weight_shape[1:]
    if ".qal_B" in key:  # (C_out, r)
        return shape[0] == weight_shape[0]
    if ".qal_weight_quantizer" in key and key.endswith(".step"):  # (C_out or 1, groups, 1)
        return shape[0] in (1, weight_shape[0])
    return True


def _check_against_model(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every adapter tensor must target an existing Linear/Conv2d of matching shape; list all mismatches."""
    modules = dict(model.named_modules())
    problems = []
    for key, tensor in state.items():
        name = key.removeprefix(_PEFT_PREFIX).split(".qal_", 1)[0]
        module = modules.get(name)
        if module is not None and hasattr(module, "base_layer"):
            module = module.base_layer
        if not isinstance(module, nn.Linear | nn.Conv2d):
            problems.append(f"{key}: no Linear/Conv2d named {name!r}")
            continue
        if not _fits(key, tensor.shape, module.weight.shape):
            problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit weight {tuple(module.weight.shape)}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"the adapter {source} does not fit {type(model).__name__} (was it trained on another architecture?):\n"
            f"  {shown}{more}"
        )


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter_model.safetensors``, with its checksum verified (files saved before the checksum
    existed have none and load as they are).

    Raises:
        ValueError: the file is truncated or damaged, or its tensors do not match the checksum recorded at save time;
            the message names the file and the fix.
    """
    fix = (
        "download it again (from the Hub: delete its copy in the Hugging Face cache first) or save it again with "
        "save_qalora_adapter"
    )
    return read_checked_safetensors(path, "adapter", fix)


def load_qalora_adapter(
    model: nn.Module,
    path_or_repo: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """Inject the QALoRA adapter stored at ``path_or_repo`` (a folder or a Hub repo id) into ``model`` and load its
    tensors.  Safetensors only; nothing is unpickled.  If the adapter does not fit the model, a ``ValueError`` lists
    the mismatched names and the model is left untouched.

    Args:
        model (`torch.nn.Module`): the base model (e.g. ``pipe.unet``) or a ``PeftModel`` of it.
        path_or_repo (`str | os.PathLike`): an adapter folder, or a Hub repo id ``"org/name"`` (downloaded through
            the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` the cached copy is used).
        adapter_name (`str`, defaults to `"default"`): the name the adapter gets in ``model``.
        is_trainable (`bool`, defaults to `False`): load for training (step sizes and LoRA factors trainable).
        subfolder (`str`, *optional*): sub-folder of the adapter inside the folder or repo.
        revision (`str`, *optional*): branch, tag or commit of a Hub repo; ``main`` by default.
        token (`str | bool`, *optional*): Hub token for a private repo; by default ``HF_TOKEN`` or the saved one.

    Returns the model (same object), with the adapter active and frozen unless ``is_trainable``.

    Raises:
        ValueError: an adapter of another type (e.g. a plain LoRA), or one that does not fit the model.
        OSError: huggingface_hub's `RepositoryNotFoundError`, `RevisionNotFoundError`, `EntryNotFoundError` or
            `LocalEntryNotFoundError` (all `OSError`s) for a missing repo, revision, file or cache entry, each
            naming the repo, the revision and the fix.
    """
    register_peft_method()
    config_path = _resolve(path_or_repo, ADAPTER_CONFIG_NAME, subfolder, revision, token)
    config = _parse_adapter_config(config_path, _source(path_or_repo, revision))
    config.inference_mode = not is_trainable
    # From the Hub, read the weights of the very commit the config came from, even if the branch moves meanwhile.
    pinned = None if Path(path_or_repo).is_dir() else snapshot_revision(config_path)
    weights = _resolve(path_or_repo, ADAPTER_WEIGHTS_NAME, subfolder, pinned or revision, token)
    state = read_adapter_weights(weights)
    base = unwrap_peft_model(model)
    if adapter_name in (getattr(base, "peft_config", None) or {}):
        raise ValueError(f"`adapter_name` {adapter_name!r} is already used by this model; choose another name.")
    _check_against_model(base, state, str(path_or_repo))
    # Every step size and zero point is read from the file below (a missing one is an error), so the weight-step
    # search of `weight_init` would be thrown away: inject with the cheap min-max init (an MSE search over an SD1.5
    # UNet costs ~17 CPU-minutes), then record the adapter's own setting again.
    weight_init = config.weight_init
    config.weight_init = "minmax"
    with restore_on_error(base, adapter_name):
        inject_qalora_adapter(base, config, adapter_name)
        base.peft_config[adapter_name].weight_init = weight_init
        result = set_peft_model_state_dict(base, state, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if ".qal_" in k and f".{adapter_name}" in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"the adapter {path_or_repo} does not fit {type(base).__name__}: unexpected keys "
                f"{result.unexpected_keys[:10]}, missing keys {missing[:10]}."
            )
    for layer in qalora_layers(base).values():
        layer.set_adapter(layer.active_adapters, inference_mode=not is_trainable)
    attach_timestep_context(base, config.timestep_argument)
    return model
