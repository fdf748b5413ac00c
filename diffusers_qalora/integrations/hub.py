"""Sharing on the Hugging Face Hub: push QALoRA adapters and exported integer models with a model card, and download
files from the Hub with errors that name the repo, the revision and the fix.

Only huggingface_hub's public API is used (``HfApi.create_repo`` / ``create_branch`` / ``create_commit``,
``hf_hub_download``), so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and the cache behave as everywhere else.
Every push is prepared in a temporary folder with the package's own save functions; nothing next to the user's files
is written, and a failed push leaves them (and the model) as they were.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub.errors import (
    HfHubHTTPError,
)
from torch import nn

from .._version import __version__
from ..tuners.qalora.model import qalora_layers
from .adapters import qalora_adapter_of, save_qalora_adapter, unwrap_peft_model
from .diffusers.config import QALoraQuantConfig
from .downloads import hub_file
from .model_card import (
    PACKAGE_NAME,
    CardInfo,
    ModelCardWarning,
    adapter_card,
    check_results_bits,
    looks_like_hub_id,
    quantized_model_card,
    read_results,
)

CARD_NAME = "README.md"
RESULTS_NAME = "results.json"
SAMPLE_GRID_STEM = "sample_grid"
# Formats that unpickle on load: never uploaded (every tensor file of this package is safetensors).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Weight files of an exported model that a new push replaces; stale ones (e.g. shards of an earlier push) are deleted
# in the same commit, or diffusers would load an old shard index.
_WEIGHT_FILE = re.compile(r"^[^/]+\.(safetensors|bin)(\.index\.json)?$")  # at the repo's root, where the push writes

__all__ = [
    "CardInfo",
    "hub_file",
    "push_qalora_adapter",
    "push_quantized_model",
    "qalora_adapter_card",
    "quantized_model_card_for",
]


# -- push ------------------------------------------------------------------------------------------------------------------
def _check_push_args(repo_id: str, revision: str | None, create_pr: bool) -> None:
    if not isinstance(repo_id, str) or not looks_like_hub_id(repo_id):
        raise ValueError(
            f"`repo_id` must be a Hub id like 'org/name' (or 'name' for your own namespace), got {repo_id!r}."
        )
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"`revision` must be a branch name (or None for 'main'), got {revision!r}.")
    if not isinstance(create_pr, bool):
        raise TypeError(f"`create_pr` must be True or False, got {create_pr!r}.")


def _sample_grid_path(sample_grid: str | os.PathLike | None) -> Path | None:
    if sample_grid is None:
        return None
    path = Path(sample_grid)
    if not path.is_file():
        raise FileNotFoundError(
            f"`sample_grid`: {path} does not exist; pass the PNG a distillation job wrote (e.g. "
            f"grid_distilled.png in its output folder)."
        )
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"`sample_grid` must be an image ({', '.join(IMAGE_SUFFIXES)}), got {path.name}.")
    return path


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"refusing to upload pickle-based files {pickles}: diffusers_qalora shares safetensors only. Save with "
            f"safe_serialization=True (the default)."
        )


def _bits_message(weight_bits: int, act_bits: int, what: str) -> str:
    return f"Upload W{weight_bits}A{act_bits} {what} with {PACKAGE_NAME}"


def _write_card(
    folder: Path, card: ModelCard | str | bool | None, make_card: Callable[[str], ModelCard], repo_id: str
) -> None:
    if card is False:
        return
    if card is None or card is True:
        card = make_card(repo_id)
    elif isinstance(card, str):
        card = ModelCard(card)
    card.save(folder / CARD_NAME)


def _upload(
    folder: Path,
    repo_id: str,
    make_card: Callable[[str], ModelCard],
    model_card: ModelCard | str | bool | None,
    *,
    commit_message: str,
    commit_description: str | None,
    private: bool | None,
    token: str | bool | None,
    revision: str | None,
    create_pr: bool,
    replace_weights: bool,
) -> CommitInfo:
    """create_repo (exist_ok) -> README with the final repo id -> create_branch -> one commit of ``folder``."""
    api = HfApi(library_name=PACKAGE_NAME, library_version=__version__)
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        _write_card(folder, model_card, make_card, repo_id)  # the card names the final id ('name' -> 'user/name')
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        # Not `upload_folder(delete_patterns=...)`: it refuses `create_pr` with a `revision` (a pull request against
        # a branch), and its fnmatch patterns would also delete weight files in sub-folders.
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        uploads = {p.relative_to(folder).as_posix(): p for p in files}
        operations: list[Any] = []
        if replace_weights:
            remote = api.list_repo_files(repo_id, revision=None if create_pr else revision, token=token)
            operations += [
                CommitOperationDelete(path_in_repo=p) for p in remote if _WEIGHT_FILE.search(p) and p not in uploads
            ]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in uploads.items()]
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as err:
        err.append_to_message(f"\n\nPushing to Hub repo {where} failed; the local model and files are unchanged.")
        raise


def _recorded_base_model(config: Any, model: nn.Module) -> str | None:
    """The base model's Hub id as recorded by PEFT or diffusers' ``from_pretrained`` (never a local path)."""
    model_config = getattr(model, "config", None)
    candidates = [
        getattr(config, "base_model_name_or_path", None),
        model_config.get("_name_or_path") if isinstance(model_config, Mapping) else None,
    ]
    return next((c for c in candidates if isinstance(c, str) and "/" in c and looks_like_hub_id(c)), None)


def _stage_extras(folder: Path, results: str | os.PathLike | Mapping[str, Any] | None, grid: Path | None) -> str | None:
    """Copy the results (the user's file as it is, or the dict as JSON) and the grid into the upload folder; returns
    the grid's name in the repo."""
    if isinstance(results, Mapping):
        (folder / RESULTS_NAME).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    elif results is not None:
        path = Path(results)
        shutil.copyfile(path / RESULTS_NAME if path.is_dir() else path, folder / RESULTS_NAME)
    if grid is None:
        return None
    name = SAMPLE_GRID_STEM + grid.suffix.lower()
    shutil.copyfile(grid, folder / name)
    return name


def qalora_adapter_card(
    model: nn.Module,
    repo_id: str,
    adapter_name: str = "default",
    info: CardInfo | None = None,
    revision: str | None = None,
) -> ModelCard:
    """The model card [push_qalora_adapter][diffusers_qalora.push_qalora_adapter] writes, to inspect or edit before
    passing it as ``card=``.

    Arguments as there; ``info.sample_grid`` is the image's name in the repo.  Warns
    ([ModelCardWarning][diffusers_qalora.hub.ModelCardWarning]) when no base model is known, since the card's load
    snippet then cannot run.
    """
    card = _adapter_card(model, repo_id, adapter_name, info or CardInfo(), revision)
    _warn_if_no_base_model(card, repo_id)
    return card


def _warn_if_no_base_model(card: ModelCard, repo_id: str) -> None:
    if not card.data.base_model:
        warnings.warn(
            f"the model card of {repo_id} names no base model, so its load snippet cannot run; pass "
            f"`card=CardInfo(base_model=...)` (the Hub id of the model the adapter was trained on).",
            ModelCardWarning,
            stacklevel=3,
        )


def _adapter_card(model: nn.Module, repo_id: str, adapter_name: str, info: CardInfo, revision: str | None) -> ModelCard:
    base, config = qalora_adapter_of(model, adapter_name)
    results = read_results(info.results)
    check_results_bits(results, config.weight_bits, config.act_bits)
    layers = {name: layer for name, layer in qalora_layers(base).items() if adapter_name in layer.eight_bit}
    eight_bit = [name for name, layer in layers.items() if layer.eight_bit[adapter_name]]
    info = dataclasses.replace(info, results=results, base_model=info.base_model or _recorded_base_model(config, base))
    return adapter_card(
        config,
        repo_id,
        type(base),
        info,
        num_lora_layers=len(layers) - len(eight_bit),
        eight_bit_layers=eight_bit,
        revision=revision,
    )


def _card_parts(card: CardInfo | ModelCard | str | bool | None) -> tuple[CardInfo, ModelCard | str | bool | None]:
    """``card=`` split into the information for a generated card and what `_upload` writes as README."""
    if card is not None and not isinstance(card, bool | str | ModelCard | CardInfo):
        raise TypeError(f"`card` must be None, a CardInfo, a ModelCard, a str or False, got {type(card).__name__}.")
    if isinstance(card, CardInfo):
        return card, None
    return CardInfo(), card


def push_qalora_adapter(
    model: nn.Module,
    repo_id: str,
    adapter_name: str = "default",
    *,
    card: CardInfo | ModelCard | str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Push the QALoRA adapter ``adapter_name`` of ``model`` to the Hub repo ``repo_id``, with a model card.

    The repo receives what [save_qalora_adapter][diffusers_qalora.save_qalora_adapter] writes
    (``adapter_config.json``, ``adapter_model.safetensors``), a ``README.md`` model card, and, when the card's
    information names them, ``results.json`` and ``sample_grid.png``.  Everything is staged in a temporary folder and
    sent as one commit; the repo is created if needed, a ``revision`` branch too.
    [load_qalora_adapter][diffusers_qalora.load_qalora_adapter] (or ``peft.PeftModel.from_pretrained`` after
    ``import diffusers_qalora``) reads it back.

    Args:
        model (`torch.nn.Module`): a model carrying the adapter (from `get_qalora_model`, `load_qalora_adapter` or
            a ``PeftModel``).
        repo_id (`str`): ``"org/name"``, or ``"name"`` for the token owner's namespace.
        adapter_name (`str`, defaults to `"default"`): the adapter to push; it is stored as the repo's adapter.
        card (`CardInfo | ModelCard | str | bool`, *optional*): a
            [CardInfo][diffusers_qalora.hub.CardInfo] (base model, results, sample grid, license, tags) for the
            generated card, which `None` generates without; a card (or its text) replaces it; `False` leaves the
            repo's README as it is.
        commit_message (`str`, *optional*): default ``"Upload W4A4 QALoRA adapter with diffusers-qalora"``.
        commit_description (`str`, *optional*): the commit's (or pull request's) description.
        private (`bool`, *optional*): visibility of a repo created by this call (an existing repo keeps its own).
        token (`str | bool`, *optional*): Hub token; by default ``HF_TOKEN`` or the one saved by ``hf auth login``.
        revision (`str`, *optional*): branch to push to (created from ``main`` if missing); default ``main``.
        create_pr (`bool`, defaults to `False`): open a pull request (against ``revision``) instead of committing.

    Returns:
        `huggingface_hub.CommitInfo`: ``commit_url``, ``oid``, ``repo_url`` and, with ``create_pr``, ``pr_url``.

    Raises:
        ValueError: a model without that adapter, results of other bit widths, or pickle files to upload; raised
            before any request.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused (its message names the repo).  Local files and the
            model are never modified.

    Example:

    ```py
    >>> import diffusers_qalora as dq
    >>> from diffusers_qalora.hub import CardInfo
    >>> dq.push_qalora_adapter(unet, "me/sd15-w4a4-qalora", card=CardInfo(
    ...     base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", base_model_subfolder="unet",
    ...     results="outputs/distill/results.json"))
    >>> dq.load_qalora_adapter(fresh_unet, "me/sd15-w4a4-qalora")
    ```
    """
    info, model_card = _card_parts(card)
    _check_push_args(repo_id, revision, create_pr)
    grid = _sample_grid_path(info.sample_grid)
    card_revision = None if create_pr else revision
    generated = _adapter_card(model, repo_id, adapter_name, info, card_revision)  # bad arguments fail here
    if model_card is None or model_card is True:
        _warn_if_no_base_model(generated, repo_id)
    with tempfile.TemporaryDirectory(prefix="qalora-push-") as tmp:
        folder = Path(tmp)
        save_qalora_adapter(model, folder, adapter_name)
        grid_name = _stage_extras(folder, info.results, grid)
        _refuse_pickles(folder)
        adapter_config = qalora_adapter_of(model, adapter_name)[1]
        return _upload(
            folder,
            repo_id,
            lambda final_id: _adapter_card(
                model, final_id, adapter_name, dataclasses.replace(info, sample_grid=grid_name), card_revision
            ),
            model_card,
            commit_message=commit_message
            or _bits_message(adapter_config.weight_bits, adapter_config.act_bits, "QALoRA adapter"),
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            replace_weights=False,
        )


def _exported_config(model: nn.Module) -> QALoraQuantConfig:
    """The ``"qalora"`` quantization config of an exported model (set by `export_quantized` or `from_pretrained`)."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if not isinstance(config, QALoraQuantConfig):
        model_config = getattr(model, "config", None)
        raw = model_config.get("quantization_config") if isinstance(model_config, Mapping) else None
        if isinstance(raw, Mapping) and raw.get("quant_method") == "qalora":
            config = QALoraQuantConfig.from_dict(dict(raw))
    if not isinstance(config, QALoraQuantConfig) or not config.is_exported:
        raise ValueError(
            f"{type(model).__name__} is not an exported integer model; run `dq.export_quantized(model)` on the "
            f"(distilled, calibrated) QALoRA model first, or push the adapter with `push_qalora_adapter`."
        )
    return config


def quantized_model_card_for(
    model: nn.Module,
    repo_id: str,
    info: CardInfo | None = None,
    *,
    weight_bytes: int,
    revision: str | None = None,
) -> ModelCard:
    """The model card [push_quantized_model][diffusers_qalora.push_quantized_model] writes (arguments as there;
    ``weight_bytes`` is the size of the weight files)."""
    config = _exported_config(model)
    info = info or CardInfo()
    results = read_results(info.results)
    check_results_bits(results, config.weight_bits, config.act_bits)
    info = dataclasses.replace(info, results=results, base_model=info.base_model or _recorded_base_model(None, model))
    return quantized_model_card(config, repo_id, type(model), info, weight_bytes=weight_bytes, revision=revision)


def push_quantized_model(
    model: nn.Module,
    repo_id: str,
    *,
    card: CardInfo | ModelCard | str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
) -> CommitInfo:
    """Push an exported integer model (from [export_quantized][diffusers_qalora.export_quantized]) to the Hub repo ``repo_id``, with a model card.

    The repo receives what diffusers' ``save_pretrained`` writes for it (``config.json`` with the ``"qalora"``
    ``quantization_config``, packed integer weights as safetensors), a ``README.md`` card and, when given,
    ``results.json`` and ``sample_grid.png``.  Weight files of an earlier push that this one does not replace (e.g.
    old shards) are deleted in the same commit.  ``<ModelClass>.from_pretrained(repo_id)`` loads it back after
    ``import diffusers_qalora``.

    Args:
        model (`diffusers.ModelMixin`): the exported model (e.g. ``pipe.unet`` after ``dq.export_quantized``).
        repo_id (`str`): ``"org/name"``, or ``"name"`` for the token owner's namespace.
        card (`CardInfo | ModelCard | str | bool`, *optional*): as in
            [push_qalora_adapter][diffusers_qalora.push_qalora_adapter] (``base_model`` is the full-precision model,
            named with ``base_model_relation: quantized``; results were measured on the fake-quantized model before
            export, which the card says).
        commit_message (`str`, *optional*): default ``"Upload W4A8 integer <ModelClass> with diffusers-qalora"``.
        commit_description (`str`, *optional*): as in [push_qalora_adapter][diffusers_qalora.push_qalora_adapter].
        private (`bool`, *optional*): as in [push_qalora_adapter][diffusers_qalora.push_qalora_adapter].
        token (`str | bool`, *optional*): as in [push_qalora_adapter][diffusers_qalora.push_qalora_adapter].
        revision (`str`, *optional*): as in [push_qalora_adapter][diffusers_qalora.push_qalora_adapter].
        create_pr (`bool`, defaults to `False`): as in [push_qalora_adapter][diffusers_qalora.push_qalora_adapter].
        max_shard_size (`int | str`, *optional*): passed to ``save_pretrained`` (e.g. ``"2GB"``).

    Returns:
        `huggingface_hub.CommitInfo`.

    Raises:
        TypeError: an object that is not a diffusers model (a pipeline included).
        ValueError: a model that is not exported, or results of other bit widths; raised before any request.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused.  Local files and the model are never modified.

    Example:

    ```py
    >>> unet = dq.export_quantized(unet)
    >>> dq.push_quantized_model(unet, "me/sd15-unet-w4a8",
    ...                         card=CardInfo(base_model="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    >>> UNet2DConditionModel.from_pretrained("me/sd15-unet-w4a8")   # after `import diffusers_qalora`
    ```
    """
    from diffusers import DiffusionPipeline, ModelMixin

    info, model_card = _card_parts(card)
    _check_push_args(repo_id, revision, create_pr)
    model = unwrap_peft_model(model)
    if isinstance(model, DiffusionPipeline):
        raise TypeError(
            "`push_quantized_model` takes the exported denoiser (e.g. `pipe.unet`), not a pipeline; the "
            "other components are unchanged and load from the base model's repo."
        )
    if not isinstance(model, ModelMixin):
        raise TypeError(
            f"`model` must be a diffusers model (ModelMixin) exported by `export_quantized`, got "
            f"{type(model).__name__}."
        )
    config = _exported_config(model)
    grid = _sample_grid_path(info.sample_grid)
    check_results_bits(read_results(info.results), config.weight_bits, config.act_bits)
    card_revision = None if create_pr else revision
    with tempfile.TemporaryDirectory(prefix="qalora-push-") as tmp:
        folder = Path(tmp)
        save_kwargs: dict[str, Any] = {"safe_serialization": True}
        if max_shard_size is not None:
            save_kwargs["max_shard_size"] = max_shard_size
        model.save_pretrained(folder, **save_kwargs)
        _refuse_pickles(folder)
        weight_bytes = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        grid_name = _stage_extras(folder, info.results, grid)
        return _upload(
            folder,
            repo_id,
            lambda final_id: quantized_model_card_for(
                model,
                final_id,
                dataclasses.replace(info, sample_grid=grid_name),
                weight_bytes=weight_bytes,
                revision=card_revision,
            ),
            model_card,
            commit_message=commit_message
            or _bits_message(config.weight_bits, config.act_bits, f"integer {type(model).__name__}"),
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            replace_weights=True,
        )
