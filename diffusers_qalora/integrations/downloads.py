"""Downloads from the Hugging Face Hub with errors that name the repo, the revision and the fix.

Shared by the adapter loader (`diffusers_qalora.integrations.adapters`) and the push helpers
(`diffusers_qalora.integrations.hub`); only huggingface_hub's public API is used, so ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE`` and the cache behave as everywhere else.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from huggingface_hub import constants
from huggingface_hub import hf_hub_download as _hf_hub_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

_SNAPSHOT_SHA = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})[\\/]")

__all__ = ["hub_file", "snapshot_revision"]


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
        raise _prefix(
            err,
            (
                f"Hub repo {repo_id!r} has no revision {revision!r}: pass an existing branch, tag or commit sha "
                f"(`huggingface_hub.HfApi().list_repo_refs({repo_id!r})` lists them), or leave `revision` unset for "
                f"'main'."
            ),
        ) from None
    except RepositoryNotFoundError as err:  # also GatedRepoError, a subclass
        raise _prefix(
            err,
            (
                f'Hub repo {repo_id!r} was not found at {constants.ENDPOINT}: check the id ("org/name"); a private '
                f"or gated repo also needs a token with access (`token=`, `HF_TOKEN` or `hf auth login`)."
            ),
        ) from None
    except RemoteEntryNotFoundError as err:
        path = f"{subfolder}/{filename}" if subfolder else filename
        hint = missing_hint() if missing_hint is not None else ""
        raise _prefix(err, f"{_where(repo_id, revision)} has no file {path!r}.{' ' + hint if hint else ''}") from None
    except LocalEntryNotFoundError as err:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise _prefix(
            err,
            (
                f"{filename!r} of {_where(repo_id, revision)} is not in the local cache ({constants.HF_HUB_CACHE}) and "
                f"the Hub cannot be reached{offline}: load it once with network access (the cache then serves it "
                f"offline), or check the revision."
            ),
        ) from None


def snapshot_revision(path: str) -> str | None:
    """The commit sha of a file downloaded into the Hub cache (``.../snapshots/<sha>/...``), used to read the
    other files of the same commit even if the branch moves meanwhile."""
    match = _SNAPSHOT_SHA.search(path)
    return match.group(1) if match else None
