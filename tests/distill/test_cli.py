"""examples/distill.py's command line: bad input fails before any work, with a clear message."""

from __future__ import annotations

import pytest

from diffusers_qalora.distill import load_prompts
from diffusers_qalora.distill.cli import build_parser, main, validate_args


def _fails(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert match in str(info.value)
    assert not any(tmp_path.iterdir()), "a failed call must not write anything"


def test_missing_model_path_fails_before_work(tmp_path, monkeypatch):
    _fails(["--pretrained_model_name_or_path", "./no/such/pipeline"], "does not exist", tmp_path, monkeypatch)


def test_folder_without_model_index_fails(tmp_path, monkeypatch):
    folder = tmp_path / "notapipe"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="model_index.json"):
        main(["--pretrained_model_name_or_path", str(folder)])


def test_missing_or_empty_prompt_file_fails(tmp_path, monkeypatch):
    _fails(["--prompt_file", "missing.txt"], "does not exist", tmp_path, monkeypatch)
    empty = tmp_path.parent / f"{tmp_path.name}-empty.txt"
    empty.write_text("# only a comment\n\n")
    _fails(["--prompt_file", str(empty)], "holds no prompt", tmp_path, monkeypatch)


def test_bits_and_methods_validated():
    with pytest.raises(ValueError, match="--weight_bits"):
        validate_args(build_parser().parse_args(["--weight_bits", "9"]))
    with pytest.raises(SystemExit, match="--methods"):
        validate_args(build_parser().parse_args(["--methods", "fp", "magic"]))


def test_default_prompts_ship_with_the_package():
    prompts = load_prompts()
    assert len(prompts) >= 8 and all(p.strip() == p and p for p in prompts)
