"""Small helpers shared by every subpackage (the standard library at import; safetensors and torch only inside the
function that reads tensor files)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_write"]

# safetensors metadata key of the package's own tensor files: `quant.checksum.tensor_checksum` of the file's tensors.
CHECKSUM_KEY = "qalora_checksum"


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write a file all at once or not at all: ``write(tmp)`` fills a temporary file next to ``path``, which then
    replaces ``path`` in one ``os.replace``.  If ``write`` raises, the temporary file is removed and ``path`` is left
    as it was.  Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checked_safetensors(path: str | os.PathLike, what: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (on the CPU; never unpickles), with the checksum its metadata
    records (``CHECKSUM_KEY``) verified; files saved before the checksum existed have none and load as they are.

    Raises:
        ValueError: the file is truncated or damaged, or its tensors do not match the checksum; the message names
            the file (``what``: "adapter", "Winograd", ...) and ``fix``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .quant.checksum import tensor_checksum

    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get(CHECKSUM_KEY)
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or damaged; {fix}."
        ) from err
    if expected is not None and tensor_checksum(tensors) != expected:
        raise ValueError(
            f"corrupt {what} file {path}: its tensors do not match the checksum recorded when it was saved; {fix}."
        )
    return tensors
