"""Every file this package writes carries a checksum or is checked on load: a truncated or damaged adapter or Winograd
file fails with an error naming the file and the fix, and the model is left unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import make_unet2d, output_of, unet2d_inputs

import diffusers_qalora as dq
from diffusers_qalora.integrations.adapters import CHECKSUM_KEY


def make_tiny_unet() -> torch.nn.Module:
    return make_unet2d(0, block_out_channels=(8, 16), norm_num_groups=4)


TIMESTEPS = [0.0, 500.0, 999.0]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    config = dq.QALoraConfig(
        r=4, weight_bits=4, act_bits=8, weight_init="minmax", act_init="minmax", timesteps=TIMESTEPS, init_weights=False
    )
    model = dq.get_qalora_model(make_unet2d(), config)
    dq.calibrate_activations(model, lambda: [model(**unet2d_inputs(t)) for t in TIMESTEPS])
    folder = tmp_path_factory.mktemp("adapter")
    dq.save_qalora_adapter(model, folder)
    with torch.no_grad():
        expected = output_of(model(**unet2d_inputs(500.0)))
    return folder, expected


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def flip_one_tensor(path: Path) -> None:
    """Same header and metadata, different bytes in one tensor (what a bit flip on disk looks like)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if tensors[k].is_floating_point() and tensors[k].numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    save_file(tensors, str(path), metadata=metadata)


def assert_untouched(model: torch.nn.Module) -> None:
    assert not hasattr(model, "peft_config")
    assert not any(".qal_" in name for name, _ in model.named_parameters())


def test_adapter_file_records_a_checksum_and_loads_exactly(adapter_dir):
    folder, expected = adapter_dir
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        assert len(f.metadata()[CHECKSUM_KEY]) == 32
    model = dq.load_qalora_adapter(make_unet2d(), folder)
    with torch.no_grad():
        assert torch.equal(output_of(model(**unet2d_inputs(500.0))), expected)


def test_truncated_adapter_names_the_file_and_the_fix(adapter_dir, tmp_path):
    folder = copy_folder(adapter_dir[0], tmp_path / "cut")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    model = make_unet2d()
    with pytest.raises(ValueError, match=rf"{WEIGHTS} is not a readable safetensors file.*save_qalora_adapter"):
        dq.load_qalora_adapter(model, folder)
    assert_untouched(model)


def test_corrupt_adapter_bytes_are_caught_by_the_checksum(adapter_dir, tmp_path):
    folder = copy_folder(adapter_dir[0], tmp_path / "flip")
    flip_one_tensor(folder / WEIGHTS)
    model = make_unet2d()
    with pytest.raises(ValueError, match=rf"corrupt adapter file .*{WEIGHTS}.*save it again"):
        dq.load_qalora_adapter(model, folder)
    assert_untouched(model)


def test_adapter_saved_without_a_checksum_still_loads(adapter_dir, tmp_path):
    folder = copy_folder(adapter_dir[0], tmp_path / "old")
    tensors = load_file(str(folder / WEIGHTS))
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", "peft_type": "QALORA"})
    model = dq.load_qalora_adapter(make_unet2d(), folder)
    with torch.no_grad():
        assert torch.equal(output_of(model(**unet2d_inputs(500.0))), adapter_dir[1])


def test_truncated_adapter_config_names_the_file(adapter_dir, tmp_path):
    folder = copy_folder(adapter_dir[0], tmp_path / "json")
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[: len(text) // 2])
    model = make_unet2d()
    with pytest.raises(ValueError, match=r"adapter_config.json .*is not valid JSON.*truncated"):
        dq.load_qalora_adapter(model, folder)
    assert_untouched(model)


# -- Winograd ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def winograd_dir(tmp_path_factory):
    model = make_tiny_unet()
    dq.apply_winograd(model, dq.WinogradConfig(tile=4, bits=8, target_modules=["conv1"]))
    folder = tmp_path_factory.mktemp("winograd")
    dq.save_winograd(model, folder)
    return folder


def test_winograd_file_records_a_checksum_and_loads(winograd_dir):
    with safe_open(str(winograd_dir / "winograd.safetensors"), framework="pt") as f:
        assert len(f.metadata()["qalora_checksum"]) == 32
    assert dq.load_winograd(make_tiny_unet(), winograd_dir).replaced


@pytest.mark.parametrize("damage", ["truncate", "flip", "config"])
def test_damaged_winograd_files_name_the_file_and_the_fix(winograd_dir, tmp_path, damage):
    folder = copy_folder(winograd_dir, tmp_path / damage)
    weights = folder / "winograd.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
        match = r"winograd.safetensors is not a readable safetensors file.*save_winograd"
    elif damage == "flip":
        flip_one_tensor(weights)
        match = r"corrupt Winograd file .*winograd.safetensors.*save_winograd"
    else:
        text = (folder / "winograd_config.json").read_text()
        (folder / "winograd_config.json").write_text(text[:50])
        match = r"winograd_config.json is not valid JSON.*save_winograd"
    model = make_tiny_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        dq.load_winograd(model, folder)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert json.loads((winograd_dir / "winograd_config.json").read_text())  # the source folder is intact
