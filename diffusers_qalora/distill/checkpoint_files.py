"""A checksum manifest for distillation checkpoints: every file of a ``checkpoint-N`` folder (Accelerate's model,
optimizer, scheduler and RNG states, the trajectory state) with its size and blake2b digest, written when the
checkpoint is complete and verified before resuming, so a truncated or damaged file is named instead of loading
silently or failing deep inside Accelerate or safetensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "checkpoint_checksums.json"
_CHUNK = 1 << 20


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_checksum_manifest(directory: str | Path) -> Path:
    """Record the size and digest of every file under ``directory`` in ``checkpoint_checksums.json``."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "blake2b": _digest(p)}
        for p in _files(directory)
    }
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps({"algorithm": "blake2b-128", "files": files}, indent=1) + "\n")
    return path


def verify_checksum_manifest(directory: str | Path) -> None:
    """Check every file listed in ``directory``'s manifest (none: a checkpoint saved before manifests existed).

    Raises:
        ValueError: a file is missing, truncated or damaged, or the manifest itself is; the message names the file
            and how to resume from an earlier checkpoint.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    fix = (
        f"resume from an earlier checkpoint (pass its folder as resume_from_checkpoint), or delete {directory} so "
        f"that 'latest' picks the one before it"
    )
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({err!r}); {fix}.") from None
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise ValueError(f"checkpoint file {file} is missing; {fix}.")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise ValueError(
                f"checkpoint file {file} is truncated or damaged ({size} bytes, {expected['bytes']} when saved); {fix}."
            )
        if _digest(file) != expected["blake2b"]:
            raise ValueError(
                f"checkpoint file {file} is corrupt (its checksum differs from the one recorded when "
                f"it was saved); {fix}."
            )
