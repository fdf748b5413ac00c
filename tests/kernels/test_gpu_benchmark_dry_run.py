"""``benchmarks/gpu_kernels.py --dry_run``: every section of the GPU benchmark runs at tiny shapes on CPU (Triton
interpreter), so the script's logic is checked where there is no GPU; nothing is written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_section_and_writes_nothing(tmp_path):
    bench = _load()
    rows = bench.main(["--dry_run", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    sections = {name for name, _ in bench.SECTIONS}
    assert {r["section"] for r in rows} == sections
    for row in rows:
        assert row["ms"] > 0 and row["case"] and row["variant"]
    gemm = [r for r in rows if r["section"] == "int_gemm"]
    assert all(r["tflops"] > 0 for r in gemm)
    # The correctness columns hold what the kernels (interpreted here) give against the references.
    checked = [r for r in gemm if "max_rel_error_vs_reference" in r]
    assert len(checked) == 3 and all(r["max_rel_error_vs_reference"] < 1e-5 for r in checked)
    assert all(r["equal_to_torch"] for r in rows if "equal_to_torch" in r)
    table = bench.markdown(rows, bench.versions(), "python benchmarks/gpu_kernels.py --dry_run")
    assert all(f"## {name}" in table for name in sections)


def test_without_cuda_the_real_run_stops_with_a_message(monkeypatch):
    bench = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        bench.main(["--sections", "int_gemm"])
