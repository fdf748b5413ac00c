"""The package's layering, checked from its source with `ast` (function-local imports included):

* no import cycle between subpackages (``quant``, ``tuners``, ``integrations``, ...) nor between two modules;
* no private name (leading underscore) imported from another subpackage;
* ``import diffusers_qalora.quant`` pulls in no Hugging Face package, and ``import diffusers_qalora`` no tuner,
  integration or Hugging Face package until first use.

CONTRIBUTING.md ("Layering") explains how to keep these green.  Run ``python tests/test_package_layout.py`` to print
the subpackage graph.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "diffusers_qalora"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
_ROOT_INTERNALS = (f"{PACKAGE}._registration", f"{PACKAGE}._version")
HF_PACKAGES = ("peft", "diffusers", "transformers", "huggingface_hub", "accelerate")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_edges() -> list[tuple[str, str, str, int]]:
    """(importer, imported module, imported name or "", line) for every import of the package's own modules."""
    modules = _modules()
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(name, a.name, "", node.lineno) for a in node.names if a.name.startswith(PACKAGE)]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_package, node.level, node.module)
                if not target.startswith(PACKAGE):
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:  # `from . import x` imports the module x
                        edges.append((name, submodule, "", node.lineno))
                    else:
                        edges.append((name, target, alias.name, node.lineno))
    return edges


def _subpackage(module: str) -> str:
    """``diffusers_qalora.tuners.qalora.model`` -> ``tuners``; modules at the root are their own node."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def subpackage_graph(edges=None) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported, _, _ in edges if edges is not None else import_edges():
        a, b = _subpackage(importer), _subpackage(imported)
        # The root __init__ re-exports the public API lazily; an edge *into* the root package is what would close
        # a cycle, and is caught because the root's own imports are edges out of "<root>".
        if a != b:
            graph[a].add(b)
    return graph


def module_graph(edges=None) -> dict[str, set[str]]:
    """Module -> module edges, leaving out package ``__init__`` modules (re-export hubs that import their children;
    an import of a re-exported name counts as an import of the package, which a child never does, see below)."""
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported, _, _ in edges if edges is not None else import_edges():
        if importer not in packages and imported not in packages and importer != imported:
            graph[importer].add(imported)
    return graph


def test_no_cycle_between_subpackages():
    cycle = _find_cycle(subpackage_graph())
    assert cycle is None, f"import cycle between subpackages: {' -> '.join(cycle)}"


def test_no_cycle_between_modules():
    cycle = _find_cycle(module_graph())
    assert cycle is None, f"import cycle between modules: {' -> '.join(cycle)}"


def test_no_module_imports_its_own_package_init():
    # `from . import name` / `from ..pkg import name` inside pkg runs pkg/__init__.py, which imports the module
    # back: a cycle the module graph above cannot see.  Import from the defining module instead.
    offenders = [
        f"{importer}:{line} imports {name!r} from {imported}"
        for importer, imported, name, line in import_edges()
        if name and _modules()[imported].name == "__init__.py" and importer.startswith(imported + ".")
    ]
    assert not offenders, "\n".join(offenders)


def test_no_private_name_imported_across_subpackages():
    offenders = [
        f"{importer}:{line} imports {name} from {imported}"
        for importer, imported, name, line in import_edges()
        if _subpackage(importer) != _subpackage(imported)
        and (
            (name.startswith("_") and not name.startswith("__"))
            # a private module inside another subpackage (``kernels._build``); the root's own private modules
            # (``_version``, ``_registration``) serve the whole package
            or any(part.startswith("_") for part in imported.split(".")[2:])
        )
    ]
    assert not offenders, "private names used across subpackages:\n" + "\n".join(offenders)


def test_the_checks_catch_a_cycle_and_a_private_import():
    # The detectors themselves: a seeded cycle and a seeded private import must be reported.
    seeded = [
        ("diffusers_qalora.quant.x", "diffusers_qalora.tuners.qalora.model", "QALoraModel", 1),
        ("diffusers_qalora.tuners.qalora.model", "diffusers_qalora.quant.x", "_secret", 2),
    ]
    assert _find_cycle(subpackage_graph(seeded)) == ["quant", "tuners", "quant"]
    assert _find_cycle(module_graph(seeded)) is not None
    assert _find_cycle(subpackage_graph(seeded[1:])) is None


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_quant_imports_no_hugging_face_package():
    loaded = _imported_after("import diffusers_qalora.quant")
    assert not loaded & set(HF_PACKAGES), sorted(loaded & set(HF_PACKAGES))
    assert {m for m in loaded if m.startswith(PACKAGE)} <= {PACKAGE, *_ROOT_INTERNALS} | {
        m for m in loaded if m.startswith(f"{PACKAGE}.quant")
    }


@pytest.mark.parametrize("subpackage", ["export", "kernels", "winograd"])
def test_numeric_subpackages_import_no_hugging_face_package(subpackage):
    loaded = _imported_after(f"import diffusers_qalora.{subpackage}")
    assert not loaded & {"peft", "diffusers", "transformers", "huggingface_hub"}


def test_root_import_is_lazy():
    loaded = _imported_after("import diffusers_qalora")
    assert not loaded & set(HF_PACKAGES)
    assert {m for m in loaded if m.startswith(PACKAGE)} == {PACKAGE, *_ROOT_INTERNALS}


def test_root_exports_resolve():
    import diffusers_qalora as dq

    assert set(dq.__all__) == {"__version__", *dq._EXPORTS}
    for name in dq.__all__:
        assert getattr(dq, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dq.nope  # noqa: B018


def _run(code: str, cwd: Path) -> str:
    env_path = f"{ROOT.parent}{os.pathsep}{Path(__file__).parent}"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": env_path, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("peft_first", [False, True])
def test_import_registers_before_first_use(peft_first):
    # Whichever is imported first, PEFT and diffusers know QALoRA by the time the user calls them.
    first = "import peft, diffusers; import diffusers_qalora" if peft_first else "import diffusers_qalora"
    out = _run(
        f"{first}\n"
        "import sys; print('tuner loaded before peft:', 'diffusers_qalora.tuners' in sys.modules)\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "from diffusers.quantizers import auto\n"
        "print(PEFT_TYPE_TO_TUNER_MAPPING['QALORA'].__name__, auto.AUTO_QUANTIZER_MAPPING['qalora'].__name__)\n"
        "from diffusers_qalora.quant import quantizers\n"
        "print('kernels installed:', quantizers._resolver[0] is not None)\n",
        ROOT.parent,
    )
    assert "QALoraModel QALoraDiffusersQuantizer" in out and "kernels installed: True" in out
    assert "tuner loaded before peft: False" in out or peft_first


def test_saved_adapter_and_exported_model_load_after_a_bare_import(tmp_path):
    # Written by one process, read by another that only runs `import diffusers_qalora` before PEFT's and diffusers'
    # own loaders.
    _run(
        "import torch, diffusers_qalora as dq\n"
        "from tiny_models import make_unet2d, unet2d_inputs\n"
        "cfg = dq.QALoraConfig(r=2, weight_bits=4, act_bits=8, timesteps=[0, 999], weight_init='minmax',"
        " act_init='minmax')\n"
        "unet = dq.get_qalora_model(make_unet2d(), cfg)\n"
        "dq.calibrate_activations(unet, lambda: unet(**unet2d_inputs(999)))\n"
        "dq.save_qalora_adapter(unet, 'adapter')\n"
        "dq.export_quantized(unet).save_pretrained('exported')\n",
        tmp_path,
    )
    out = _run(
        "import diffusers_qalora\n"
        "from peft import PeftModel\n"
        "from diffusers import UNet2DModel\n"
        "from tiny_models import make_unet2d\n"
        "peft_model = PeftModel.from_pretrained(make_unet2d(), 'adapter')\n"
        "print(type(peft_model.base_model).__name__)\n"
        "loaded = UNet2DModel.from_pretrained('exported')\n"
        "print(type(loaded.conv_in).__name__)\n",
        tmp_path,
    )
    assert "QALoraModel" in out and "IntegerConv2d" in out


def _documented_objects() -> list[object]:
    """The objects rendered by a ``::: dotted.path`` line of docs/api."""
    import importlib
    import re

    found = []
    for page in sorted((ROOT.parent / "docs" / "api").glob("*.md")):
        for path in re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M):
            parts = path.split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
                found.append(obj)
                break
            else:
                raise AssertionError(f"{page.name}: cannot resolve `::: {path}`")
    return found


def test_public_names_are_exactly_the_documented_ones():
    # A name in any package's `__all__` is public: docs/api renders it.  (Internals stay out of `__all__`.)
    import importlib

    documented = _documented_objects()
    missing = []
    for name, path in sorted(_modules().items()):
        if path.name != "__init__.py" and name != f"{PACKAGE}.hub":
            continue
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", ()):
            obj = getattr(module, public)
            if public != "__version__" and not any(obj is d for d in documented):
                missing.append(f"{name}.{public}")
    assert not missing, f"public names without a docs/api entry: {missing}"


if __name__ == "__main__":
    for node, targets in sorted(subpackage_graph().items()):
        print(f"{node:14s} -> {', '.join(sorted(targets))}")
    print("subpackage cycle:", _find_cycle(subpackage_graph()))
    print("module cycle:", _find_cycle(module_graph()))
