"""Distillation checkpoints carry a checksum manifest: resuming from a truncated, damaged or incomplete checkpoint
fails before anything is loaded, naming the file and the way out."""

from __future__ import annotations

import json

import pytest
from test_trainer import _distiller, _model_and_scheduler

from diffusers_qalora.distill.checkpoint_files import (
    MANIFEST_NAME,
    verify_checksum_manifest,
    write_checksum_manifest,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model, scheduler = _model_and_scheduler()
    _distiller(model, scheduler, out, max_train_steps=2, checkpointing_steps=2).train()
    return out / "checkpoint-2"


def copy_tree(src, dst):
    for p in src.rglob("*"):
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    return dst


def test_manifest_lists_every_file_of_the_checkpoint(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest["files"]) == files
    assert "model.safetensors" in files and any(name.endswith("distill_state.safetensors") for name in files)
    verify_checksum_manifest(checkpoint)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate", r"model.safetensors is truncated or damaged"),
        ("flip", r"model.safetensors is corrupt"),
        ("delete", r"model.safetensors is missing"),
        ("manifest", MANIFEST_NAME + r" is damaged"),
    ],
)
def test_resume_from_a_damaged_checkpoint_names_the_file(checkpoint, tmp_path, damage, match):
    broken = copy_tree(checkpoint, tmp_path / "run" / "checkpoint-2")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) - 10])
    elif damage == "flip":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "delete":
        weights.unlink()
    else:
        (broken / MANIFEST_NAME).write_text("{")
    model, scheduler = _model_and_scheduler()
    distiller = _distiller(model, scheduler, tmp_path / "run", max_train_steps=4, checkpointing_steps=2)
    with pytest.raises(ValueError, match=rf"(?s){match}.*resume from an earlier checkpoint"):
        distiller.train(resume_from_checkpoint="latest")


def test_manifest_round_trip_on_plain_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.json").write_text("{}")
    write_checksum_manifest(tmp_path)
    verify_checksum_manifest(tmp_path)
    (tmp_path / "sub" / "b.json").write_text("[]")  # same size, other bytes
    with pytest.raises(ValueError, match=r"sub/b.json is corrupt"):
        verify_checksum_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    verify_checksum_manifest(tmp_path)  # a checkpoint saved before manifests existed: nothing to check
