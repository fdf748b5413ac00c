"""Sharing on the Hugging Face Hub: push QALoRA adapters and exported integer models with a model card, and download
files from the Hub with errors that name the repo, the revision and the fix.

Only huggingface_hub's public API is used (``HfApi.create_repo`` / ``create_branch`` / ``create_commit``,
``hf_hub_download``), so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and the cache behave as everywhere else.
Every push is prepared in a temporary folder with the package's own save functions; nothing next to the user's files
is written, and a failed push leaves them (and the model) as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, constants
from huggingface_hub import hf_hub_download as _hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from ..tuners.qalora.model import qalora_layers
from .adapters import ADAPTER_CONFIG_NAME, qalora_adapter_of, save_qalora_adapter, unwrap_peft_model
from .diffusers.config import QALoraQuantConfig
from .model_card import (
    PACKAGE_NAME,
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
_SNAPSHOT_SHA = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})[\\/]")

__all__ = [
    "describe_repo_for_adapter",
    "hub_file",
    "push_qalora_adapter",
    "push_quantized_model",
    "qalora_adapter_card",
    "quantized_model_card_for",
    "snapshot_revision",
]


# -- downloads with clear errors -----------------------------------------------------------------------------------------
def _prefix(err: BaseException, message: str) -> BaseException:
    """Put ``message`` in front of ``err``'s own text, keeping its type (callers may catch huggingface_hub's)."""
    first = str(err.args[0]) if err.args else str(err)
    err.args = (f"{message}\n\n{first}", *err.args[1:])
    return err


def _where(repo_id: str, revision: str | None) -> str:
    return f"Hub repo {repo_id!r} (revision {revision or 'main'!r})"


def hub_file(
    repo_id: str,
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    missing_hint: Callable[[], str] | None = None,
) -> str:
    """``hf_hub_download`` whose errors say which repo and revision failed and what to do.

    Keeps huggingface_hub's exception types (``RepositoryNotFoundError``, ``RevisionNotFoundError``,
    ``RemoteEntryNotFoundError``, ``LocalEntryNotFoundError``), with a first paragraph naming the repo, the revision
    and the fix.  ``missing_hint`` adds to the message of a file that the repo lacks.
    """
    try:
        return _hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, token=token)
    except RevisionNotFoundError as err:
        raise _prefix(err, (
            f"Hub repo {repo_id!r} has no revision {revision!r}: pass an existing branch, tag or commit sha "
            f"(`huggingface_hub.HfApi().list_repo_refs({repo_id!r})` lists them), or leave `revision` unset for "
            f"'main'."
        )) from None
    except RepositoryNotFoundError as err:  # also GatedRepoError, a subclass
        raise _prefix(err, (
            f"Hub repo {repo_id!r} was not found at {constants.ENDPOINT}: check the id (\"org/name\"); a private "
            f"or gated repo also needs a token with access (`token=`, `HF_TOKEN` or `hf auth login`)."
        )) from None
    except RemoteEntryNotFoundError as err:
        path = f"{subfolder}/{filename}" if subfolder else filename
        hint = missing_hint() if missing_hint is not None else ""
        raise _prefix(err, f"{_where(repo_id, revision)} has no file {path!r}.{' ' + hint if hint else ''}") from None
    except LocalEntryNotFoundError as err:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise _prefix(err, (
            f"{filename!r} of {_where(repo_id, revision)} is not in the local cache ({constants.HF_HUB_CACHE}) and "
            f"the Hub cannot be reached{offline}: load it once with network access (the cache then serves it "
            f"offline), or check the revision."
        )) from None


def snapshot_revision(path: str) -> str | None:
    """The commit sha of a file downloaded into the Hub cache (``.../snapshots/<sha>/...``), used to read the
    other files of the same commit even if the branch moves meanwhile."""
    match = _SNAPSHOT_SHA.search(path)
    return match.group(1) if match else None


def describe_repo_for_adapter(repo_id: str, revision: str | None, token: str | bool | None,
                              subfolder: str | None) -> str:
    """Why a repo without ``adapter_config.json`` is not a QALoRA adapter, from its file list (best effort)."""
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except Exception:  # offline, or the listing itself failed: the missing-file message stands alone
        return "It is not a QALoRA adapter repo (written by `push_qalora_adapter` or `save_qalora_adapter`)."
    names = {f.rsplit("/", 1)[-1] for f in files}
    if "pytorch_lora_weights.safetensors" in names:
        return ("It holds a diffusers LoRA (pytorch_lora_weights.safetensors), not a QALoRA adapter: load it with "
                f"`pipe.load_lora_weights({repo_id!r})`.")
    if "config.json" in names and "model_index.json" not in names:
        return ("It holds a model (config.json), not a QALoRA adapter: an exported integer model loads with "
                f"`<diffusers model class>.from_pretrained({repo_id!r})` after `import diffusers_qalora`.")
    if subfolder and ADAPTER_CONFIG_NAME in files:
        return "The adapter is at the repo's root: leave `subfolder` unset."
    folders = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith("/" + ADAPTER_CONFIG_NAME)})
    if folders:
        return f"Adapters live in sub-folders {folders}: pass one of them as `subfolder=`."
    shown = ", ".join(sorted(files)[:12]) + (", ..." if len(files) > 12 else "")
    return f"It is not a QALoRA adapter repo (files: {shown})."


# -- push ------------------------------------------------------------------------------------------------------------------
def _check_push_args(repo_id: str, revision: str | None, create_pr: bool, model_card: Any) -> None:
    if not isinstance(repo_id, str) or not looks_like_hub_id(repo_id):
        raise ValueError(f"`repo_id` must be a Hub id like 'org/name' (or 'name' for your own namespace), got "
                         f"{repo_id!r}.")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"`revision` must be a branch name (or None for 'main'), got {revision!r}.")
    if not isinstance(create_pr, bool):
        raise TypeError(f"`create_pr` must be True or False, got {create_pr!r}.")
    if model_card is not None and not isinstance(model_card, bool | str | ModelCard):
        raise TypeError(f"`model_card` must be None, False, a ModelCard or a str, got {type(model_card).__name__}.")


def _sample_grid_path(sample_grid: str | os.PathLike | None) -> Path | None:
    if sample_grid is None:
        return None
    path = Path(sample_grid)
    if not path.is_file():
        raise FileNotFoundError(f"`sample_grid`: {path} does not exist; pass the PNG a distillation job wrote (e.g. "
                                f"grid_distilled.png in its output folder).")
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


def _write_card(folder: Path, card: ModelCard | str | bool | None, make_card: Callable[[str], ModelCard],
                repo_id: str) -> None:
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
    from .. import __version__

    api = HfApi(library_name=PACKAGE_NAME, library_version=__version__)
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        _write_card(folder, model_card, make_card, repo_id)  # the card names the final id ('name' -> 'user/name')
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        uploads = {p.relative_to(folder).as_posix(): p for p in files}
        operations: list[Any] = []
        if replace_weights:
            remote = api.list_repo_files(repo_id, revision=None if create_pr else revision, token=token)
            operations += [CommitOperationDelete(path_in_repo=p) for p in remote
                           if _WEIGHT_FILE.search(p) and p not in uploads]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in uploads.items()]
        return api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr)
    except HfHubHTTPError as err:
        err.append_to_message(f"\n\nPushing to Hub repo {where} failed; the local model and files are unchanged.")
        raise


def _recorded_base_model(config: Any, model: nn.Module) -> str | None:
    """The base model's Hub id as recorded by PEFT or diffusers' ``from_pretrained`` (never a local path)."""
    model_config = getattr(model, "config", None)
    candidates = [getattr(config, "base_model_name_or_path", None),
                  model_config.get("_name_or_path") if isinstance(model_config, Mapping) else None]
    return next((c for c in candidates if isinstance(c, str) and "/" in c and looks_like_hub_id(c)), None)


def _stage_extras(folder: Path, results: str | os.PathLike | Mapping[str, Any] | None,
                  grid: Path | None) -> str | None:
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
    *,
    base_model: str | None = None,
    base_model_subfolder: str | None = None,
    revision: str | None = None,
    results: str | os.PathLike | Mapping[str, Any] | None = None,
    distill_config: Any = None,
    sample_grid: str | None = None,
    license: str | None = None,
    pipeline_tag: str | None = None,
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """The model card [`push_qalora_adapter`] writes, to inspect or edit before passing it as ``model_card=``.

    Arguments as in [`push_qalora_adapter`]; ``sample_grid`` is the image's name in the repo.  Warns
    (``ModelCardWarning``) when no base model is known, since the card's load snippet then cannot run.
    """
    card = _adapter_card(model, repo_id, adapter_name, base_model=base_model,
                         base_model_subfolder=base_model_subfolder, revision=revision, results=results,
                         distill_config=distill_config, sample_grid=sample_grid, license=license,
                         pipeline_tag=pipeline_tag, tags=tags)
    _warn_if_no_base_model(card, repo_id)
    return card


def _warn_if_no_base_model(card: ModelCard, repo_id: str) -> None:
    if not card.data.base_model:
        warnings.warn(
            f"the model card of {repo_id} names no base model, so its load snippet cannot run; pass `base_model=` "
            f"(the Hub id of the model the adapter was trained on).", ModelCardWarning, stacklevel=3,
        )


def _adapter_card(model: nn.Module, repo_id: str, adapter_name: str, *, results: Any, base_model: str | None,
                  **card_kwargs: Any) -> ModelCard:
    base, config = qalora_adapter_of(model, adapter_name)
    results = read_results(results)
    check_results_bits(results, config.weight_bits, config.act_bits)
    layers = {name: layer for name, layer in qalora_layers(base).items() if adapter_name in layer.eight_bit}
    eight_bit = [name for name, layer in layers.items() if layer.eight_bit[adapter_name]]
    return adapter_card(
        config, repo_id, type(base), num_lora_layers=len(layers) - len(eight_bit), eight_bit_layers=eight_bit,
        base_model=base_model or _recorded_base_model(config, base), results=results, **card_kwargs,
    )


def push_qalora_adapter(
    model: nn.Module,
    repo_id: str,
    adapter_name: str = "default",
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    base_model_subfolder: str | None = None,
    results: str | os.PathLike | Mapping[str, Any] | None = None,
    distill_config: Any = None,
    sample_grid: str | os.PathLike | None = None,
    model_card: ModelCard | str | bool | None = None,
    license: str | None = None,
    pipeline_tag: str | None = None,
    tags: Sequence[str] | None = None,
) -> CommitInfo:
    """Push the QALoRA adapter ``adapter_name`` of ``model`` to the Hub repo ``repo_id``, with a model card.

    The repo receives what [`save_qalora_adapter`] writes (``adapter_config.json``, ``adapter_model.safetensors``),
    a ``README.md`` model card, and, when given, ``results.json`` and ``sample_grid.png``.  Everything is staged in a
    temporary folder and sent as one commit; the repo is created if needed, a ``revision`` branch too.
    [`load_qalora_adapter`] (or ``peft.PeftModel.from_pretrained`` after ``import diffusers_qalora``) reads it back.

    Args:
        model (`torch.nn.Module`): a model carrying the adapter (from `get_qalora_model`, `load_qalora_adapter` or
            a ``PeftModel``).
        repo_id (`str`): ``"org/name"``, or ``"name"`` for the token owner's namespace.
        adapter_name (`str`, defaults to `"default"`): the adapter to push; it is stored as the repo's adapter.
        commit_message (`str`, *optional*): default ``"Upload W4A4 QALoRA adapter with diffusers-qalora"``.
        commit_description (`str`, *optional*): the commit's (or pull request's) description.
        private (`bool`, *optional*): visibility of a repo created by this call (an existing repo keeps its own).
        token (`str | bool`, *optional*): Hub token; by default ``HF_TOKEN`` or the one saved by ``hf auth login``.
        revision (`str`, *optional*): branch to push to (created from ``main`` if missing); default ``main``.
        create_pr (`bool`, defaults to `False`): open a pull request (against ``revision``) instead of committing.
        base_model (`str`, *optional*): Hub id of the base model, for the card's metadata and load snippet; by default
            the one PEFT / diffusers recorded when the model was loaded from the Hub.
        base_model_subfolder (`str`, *optional*): sub-folder of the denoiser in ``base_model`` (e.g. ``"unet"``).
        results (`str | os.PathLike | dict`, *optional*): the ``results.json`` of a distillation job (or its output
            folder): its metrics table and distillation settings go into the card, the file into the repo.
        distill_config (`DistillConfig | dict`, *optional*): distillation settings for the card when ``results``
            has none.
        sample_grid (`str | os.PathLike`, *optional*): an image of samples (PNG/JPEG/WebP) shown in the card.
        model_card (`ModelCard | str | bool`, *optional*): `None` writes the generated card; a card (or its text)
            replaces it; `False` leaves the repo's README as it is.
        license (`str`, *optional*): the card's ``license`` (e.g. the base model's).
        pipeline_tag (`str`, *optional*): the card's ``pipeline_tag`` (e.g. ``"text-to-image"``).
        tags (`list[str]`, *optional*): extra tags after ``diffusers, diffusers-qalora, qalora, efficientdm,
            quantization, w<bits>a<bits>``.

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
    >>> dq.push_qalora_adapter(unet, "me/sd15-w4a4-qalora", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    ...                        base_model_subfolder="unet", results="outputs/distill/results.json")
    >>> dq.load_qalora_adapter(fresh_unet, "me/sd15-w4a4-qalora")
    ```
    """
    _check_push_args(repo_id, revision, create_pr, model_card)
    grid = _sample_grid_path(sample_grid)
    card_kwargs = dict(base_model=base_model, base_model_subfolder=base_model_subfolder,
                       revision=None if create_pr else revision, results=read_results(results),
                       distill_config=distill_config,
                       license=license, pipeline_tag=pipeline_tag, tags=tags)
    card = _adapter_card(model, repo_id, adapter_name, **card_kwargs)  # bad arguments fail before any request
    if model_card is None or model_card is True:
        _warn_if_no_base_model(card, repo_id)
    with tempfile.TemporaryDirectory(prefix="qalora-push-") as tmp:
        folder = Path(tmp)
        save_qalora_adapter(model, folder, adapter_name)
        grid_name = _stage_extras(folder, results, grid)
        _refuse_pickles(folder)
        adapter_config = qalora_adapter_of(model, adapter_name)[1]
        return _upload(
            folder, repo_id,
            lambda final_id: _adapter_card(model, final_id, adapter_name, sample_grid=grid_name, **card_kwargs),
            model_card,
            commit_message=commit_message or _bits_message(adapter_config.weight_bits, adapter_config.act_bits,
                                                           "QALoRA adapter"),
            commit_description=commit_description, private=private, token=token, revision=revision,
            create_pr=create_pr, replace_weights=False,
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
    *,
    weight_bytes: int,
    base_model: str | None = None,
    revision: str | None = None,
    results: str | os.PathLike | Mapping[str, Any] | None = None,
    distill_config: Any = None,
    sample_grid: str | None = None,
    license: str | None = None,
    pipeline_tag: str | None = None,
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """The model card [`push_quantized_model`] writes (arguments as there)."""
    config = _exported_config(model)
    results = read_results(results)
    check_results_bits(results, config.weight_bits, config.act_bits)
    return quantized_model_card(
        config, repo_id, type(model), weight_bytes=weight_bytes,
        base_model=base_model or _recorded_base_model(None, model), revision=revision, results=results,
        distill_config=distill_config, sample_grid=sample_grid, license=license, pipeline_tag=pipeline_tag, tags=tags,
    )


def push_quantized_model(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    results: str | os.PathLike | Mapping[str, Any] | None = None,
    distill_config: Any = None,
    sample_grid: str | os.PathLike | None = None,
    model_card: ModelCard | str | bool | None = None,
    license: str | None = None,
    pipeline_tag: str | None = None,
    tags: Sequence[str] | None = None,
    max_shard_size: int | str | None = None,
) -> CommitInfo:
    """Push an exported integer model (from [`export_quantized`]) to the Hub repo ``repo_id``, with a model card.

    The repo receives what diffusers' ``save_pretrained`` writes for it (``config.json`` with the ``"qalora"``
    ``quantization_config``, packed integer weights as safetensors), a ``README.md`` card and, when given,
    ``results.json`` and ``sample_grid.png``.  Weight files of an earlier push that this one does not replace (e.g.
    old shards) are deleted in the same commit.  ``<ModelClass>.from_pretrained(repo_id)`` loads it back after
    ``import diffusers_qalora``.

    Args:
        model (`diffusers.ModelMixin`): the exported model (e.g. ``pipe.unet`` after ``dq.export_quantized``).
        repo_id (`str`): ``"org/name"``, or ``"name"`` for the token owner's namespace.
        base_model (`str`, *optional*): Hub id of the full-precision model, for the card (``base_model_relation:
            quantized``); by default the one diffusers recorded at ``from_pretrained``.
        commit_message (`str`, *optional*): default ``"Upload W4A8 integer <ModelClass> with diffusers-qalora"``.
        commit_description (`str`, *optional*): as in [`push_qalora_adapter`].
        private (`bool`, *optional*): as in [`push_qalora_adapter`].
        token (`str | bool`, *optional*): as in [`push_qalora_adapter`].
        revision (`str`, *optional*): as in [`push_qalora_adapter`].
        create_pr (`bool`, defaults to `False`): as in [`push_qalora_adapter`].
        results (`str | os.PathLike | dict`, *optional*): as in [`push_qalora_adapter`]; the card notes that the
            numbers were measured on the fake-quantized model before export.
        distill_config (`DistillConfig | dict`, *optional*): as in [`push_qalora_adapter`].
        sample_grid (`str | os.PathLike`, *optional*): as in [`push_qalora_adapter`].
        model_card (`ModelCard | str | bool`, *optional*): as in [`push_qalora_adapter`].
        license (`str`, *optional*): as in [`push_qalora_adapter`].
        pipeline_tag (`str`, *optional*): as in [`push_qalora_adapter`].
        tags (`list[str]`, *optional*): as in [`push_qalora_adapter`].
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
    >>> dq.push_quantized_model(unet, "me/sd15-unet-w4a8", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> UNet2DConditionModel.from_pretrained("me/sd15-unet-w4a8")   # after `import diffusers_qalora`
    ```
    """
    from diffusers import DiffusionPipeline, ModelMixin

    _check_push_args(repo_id, revision, create_pr, model_card)
    model = unwrap_peft_model(model)
    if isinstance(model, DiffusionPipeline):
        raise TypeError("`push_quantized_model` takes the exported denoiser (e.g. `pipe.unet`), not a pipeline; the "
                        "other components are unchanged and load from the base model's repo.")
    if not isinstance(model, ModelMixin):
        raise TypeError(f"`model` must be a diffusers model (ModelMixin) exported by `export_quantized`, got "
                        f"{type(model).__name__}.")
    config = _exported_config(model)
    grid = _sample_grid_path(sample_grid)
    results_data = read_results(results)
    check_results_bits(results_data, config.weight_bits, config.act_bits)
    card_kwargs = dict(base_model=base_model, revision=None if create_pr else revision, results=results_data,
                       distill_config=distill_config, license=license, pipeline_tag=pipeline_tag, tags=tags)
    with tempfile.TemporaryDirectory(prefix="qalora-push-") as tmp:
        folder = Path(tmp)
        save_kwargs: dict[str, Any] = {"safe_serialization": True}
        if max_shard_size is not None:
            save_kwargs["max_shard_size"] = max_shard_size
        model.save_pretrained(folder, **save_kwargs)
        _refuse_pickles(folder)
        weight_bytes = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        grid_name = _stage_extras(folder, results, grid)
        return _upload(
            folder, repo_id,
            lambda final_id: quantized_model_card_for(model, final_id, weight_bytes=weight_bytes,
                                                      sample_grid=grid_name, **card_kwargs),
            model_card,
            commit_message=commit_message or _bits_message(config.weight_bits, config.act_bits,
                                                           f"integer {type(model).__name__}"),
            commit_description=commit_description, private=private, token=token, revision=revision,
            create_pr=create_pr, replace_weights=True,
        )

