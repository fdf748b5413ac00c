"""The dependency floors: declared in pyproject.toml, checked on import with an error that names the upgrade."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from diffusers_qalora import integrations, versions

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def declared_floors() -> dict[str, str]:
    # The `dependencies = [...]` list of [project] (tomllib is Python 3.11+; the package supports 3.10).
    text = PYPROJECT.read_text()
    deps = text[text.index("\ndependencies = [") : text.index("]", text.index("\ndependencies = ["))]
    return {
        m.group(1).replace("-", "_").lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', deps)
    }


def test_pyproject_declares_the_floors_the_import_checks():
    floors = declared_floors()
    for name, (minimum, _) in versions.MINIMUM_VERSIONS.items():
        assert floors[name] == minimum, name
    assert floors["accelerate"] and floors["transformers"]  # floors the CI step installs too


def test_installed_environment_passes():
    assert versions.dependency_version_problems() == []
    integrations.register()


def fake_versions(monkeypatch, **found):
    real = metadata.version

    def version(name):
        if name in found:
            if found[name] is None:
                raise metadata.PackageNotFoundError(name)
            return found[name]
        return real(name)

    monkeypatch.setattr(versions.metadata, "version", version)


def test_old_peft_and_diffusers_raise_an_import_error_naming_the_upgrade(monkeypatch):
    fake_versions(monkeypatch, peft="0.20.0", diffusers="0.38.0")
    with pytest.raises(ImportError) as err:
        integrations.register()
    message = str(err.value)
    assert "peft 0.20.0 is older than 0.21" in message and "Unknown PEFT type" in message
    assert "diffusers 0.38.0 is older than 0.39" in message
    assert 'pip install -U "peft>=0.21" "diffusers>=0.39"' in message
    assert "huggingface_hub" not in message


def test_missing_package_and_prereleases(monkeypatch):
    fake_versions(monkeypatch, safetensors=None, peft="0.21.0.dev0", diffusers="0.40.0rc1")
    with pytest.raises(
        ImportError, match=r'(?s)safetensors is not installed.*pip install -U "safetensors>=0.8"$'
    ) as err:
        versions.check_dependency_versions()
    assert "peft " not in str(err.value) and "diffusers " not in str(err.value)  # a dev build of a floor passes
