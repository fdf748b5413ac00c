"""The lowest releases of PEFT, diffusers, huggingface_hub and safetensors this package works with, checked when the
integrations are imported (before anything is registered), as diffusers gates its torchao backend.

Below these releases the code does not fail cleanly by itself: PEFT before 0.21 cannot save a QALoRA adapter
("Unknown PEFT type"), and diffusers before 0.39 lacks the loader hooks, so the float32 scales of an exported model
are silently rounded to ``torch_dtype`` and no checksum is verified.  ``pyproject.toml`` declares the same floors and
``bash scripts/dev.sh test-floor`` runs the tuner, export and Hub tests with exactly these releases.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

# distribution name -> (lowest release, what breaks below it)
MINIMUM_VERSIONS: dict[str, tuple[str, str]] = {
    "peft": ("0.21", "PEFT cannot save or load a QALoRA adapter ('Unknown PEFT type')"),
    "diffusers": ("0.39", "the loader casts the float32 scales of exported models and skips their checksum"),
    "huggingface_hub": ("1.3", "the Hub helpers need its error classes (RemoteEntryNotFoundError)"),
    "safetensors": ("0.8", "diffusers 0.39 needs it"),
}


def _release(version: str) -> tuple[int, ...]:
    # Compare release numbers only, so that a pre-release or dev build of a supported version is accepted.
    try:
        return Version(version).release
    except InvalidVersion:
        return ()


def dependency_version_problems() -> list[str]:
    """One line per installed dependency older than its floor (empty when all are recent enough)."""
    problems = []
    for name, (minimum, reason) in MINIMUM_VERSIONS.items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is not installed (needs >={minimum})")
            continue
        if _release(found) < _release(minimum):
            problems.append(f"{name} {found} is older than {minimum}: {reason}")
    return problems


def check_dependency_versions() -> None:
    """Raise an ``ImportError`` naming every dependency below its floor and the ``pip`` command that upgrades it."""
    problems = dependency_version_problems()
    if problems:
        upgrade = " ".join(
            f'"{name}>={minimum}"'
            for name, (minimum, _) in MINIMUM_VERSIONS.items()
            if any(p.startswith(f"{name} ") for p in problems)
        )
        raise ImportError(
            "diffusers_qalora needs newer dependencies:\n  "
            + "\n  ".join(problems)
            + f"\nUpgrade them with: pip install -U {upgrade}"
        )
