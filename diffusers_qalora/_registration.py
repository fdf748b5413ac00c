"""Registration with PEFT and diffusers at the moment they are imported, so that ``import diffusers_qalora`` stays
cheap (it imports neither) and ``diffusers_qalora.quant`` stays free of Hugging Face.

* PEFT: the ``"QALORA"`` type (`diffusers_qalora.tuners.qalora.registration`), needed by ``get_peft_model`` and
  ``PeftModel.from_pretrained``;
* diffusers: the ``"qalora"`` quantization backend (`diffusers_qalora.integrations.diffusers.registry`), needed by
  ``from_pretrained`` of an exported model.

A library already imported is registered with at once; otherwise a finder on ``sys.meta_path`` wraps the library's
loader and registers right after the library's ``__init__`` ran, before the ``import`` statement returns.  Both
registrations are idempotent; the tuner and the backend also register when they are first imported themselves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

__all__ = ["install_registration_hook"]


def _register_peft() -> None:
    importlib.import_module("diffusers_qalora.tuners.qalora")  # registers on import


def _register_diffusers() -> None:
    importlib.import_module("diffusers_qalora.integrations.diffusers")  # registers on import


_ON_IMPORT: dict[str, Callable[[], None]] = {"peft": _register_peft, "diffusers": _register_diffusers}


def _run(library: str) -> None:
    try:
        _ON_IMPORT[library]()
    except Exception as err:  # never break the user's `import peft`: say why QALoRA is unavailable instead
        warnings.warn(
            f"diffusers_qalora could not register with {library}: {type(err).__name__}: {err}. "
            f"QALoRA models will not load until this is fixed (e.g. a {library} version below the supported floor).",
            UserWarning,
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, library: str) -> None:
        self.loader = loader
        self.library = library

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the library's own loader back first, so that reloads and introspection see it.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _run(self.library)


class _RegistrationFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _ON_IMPORT or fullname in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, fullname)
                return spec
        return None


def install_registration_hook() -> None:
    """Register with PEFT and diffusers now if they are imported, else when they are (idempotent)."""
    pending = [library for library in _ON_IMPORT if library not in sys.modules]
    if pending and not any(isinstance(f, _RegistrationFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistrationFinder())
    for library in _ON_IMPORT:
        if library in sys.modules:
            _run(library)
