"""Sharing on the Hub, end to end over HTTP against the fake Hub on loopback (``fake_hub_server.py``): push ->
download -> load round trips for adapters and exported integer models, branches, pull requests, private repos,
model cards whose load snippet runs, offline loading from the cache, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import pytest
import torch
from diffusers import UNet2DModel
from fake_hub_server import FakeHubServer, hub_client_environment
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from tiny_models import make_sd15_unet, make_unet2d, unet2d_inputs

import diffusers_qalora as dq
from diffusers_qalora.hub import CardInfo, ModelCardWarning
from diffusers_qalora.integrations.model_card import code_blocks

TOKEN = "hf_owner_token"
TABLE = (0.0, 250.0, 500.0, 999.0)
PROBE_TIMESTEPS = (0.0, 120.0, 999.0)  # table entries and an interpolated one
BASE_REPO = "base-org/tiny-unet2d"
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "distill_embedded_w4a4"
RESULTS, GRID = BENCH / "results.json", BENCH / "grid_distilled.png"


def qalora_unet(weight_bits: int = 4, act_bits: int = 4, seed: int = 0, calibration_seed: int = 11):
    """The tiny UNet2DModel with a QALoRA adapter: random B (a non-zero update, as after distillation), calibrated at
    every table timestep."""
    torch.manual_seed(seed)
    cfg = dq.QALoraConfig(
        r=2,
        weight_bits=weight_bits,
        act_bits=act_bits,
        timesteps=list(TABLE),
        weight_init="minmax",
        act_init="minmax",
        init_weights=False,
    )
    model = dq.get_qalora_model(make_unet2d(), cfg)
    dq.calibrate_activations(model, lambda: [model(**unet2d_inputs(t, seed=calibration_seed)) for t in TABLE])
    return model


def outputs(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**unet2d_inputs(t)).sample for t in PROBE_TIMESTEPS]


def assert_same_outputs(model, expected):
    for got, want in zip(outputs(model), expected):
        assert torch.equal(got, want)


def upload_folder(folder, repo_id):
    HfApi().create_repo(repo_id, token=TOKEN, exist_ok=True)
    return HfApi().upload_folder(repo_id=repo_id, folder_path=str(folder), token=TOKEN)


@pytest.fixture(scope="module")
def base_repo(fake_hub, tmp_path_factory):
    """The float tiny UNet on the fake Hub, as a base model that cards can name and snippets can download."""
    folder = tmp_path_factory.mktemp("base")
    make_unet2d().save_pretrained(folder)
    upload_folder(folder, BASE_REPO)
    return BASE_REPO


@pytest.fixture(scope="module")
def adapter_model():
    model = qalora_unet()
    return model, outputs(model)


@pytest.fixture(scope="module")
def pushed_adapter(fake_hub, base_repo, adapter_model):
    model, expected = adapter_model
    info = dq.push_qalora_adapter(
        model,
        "test-org/tiny-qalora",
        token=TOKEN,
        commit_message="first push",
        card=CardInfo(base_model=base_repo, results=RESULTS, sample_grid=GRID),
    )
    return "test-org/tiny-qalora", info


@pytest.fixture(scope="module")
def exported_model():
    model = dq.export_quantized(qalora_unet(4, 8))
    return model, outputs(model)


# -- the environment ------------------------------------------------------------------------------------------------------
def test_client_points_at_the_fake_hub_and_is_restored(fake_hub, tmp_path):
    assert HfApi().endpoint == fake_hub.url and constants.HF_HUB_DISABLE_XET
    assert hf_hub_url("a/b", "c.json").startswith(fake_hub.url + "/a/b/resolve/")
    import huggingface_hub.hf_api

    assert huggingface_hub.hf_api.api.endpoint == fake_hub.url  # what diffusers / PEFT call through
    with hub_client_environment("http://127.0.0.1:9", tmp_path, offline=True):
        assert constants.ENDPOINT == "http://127.0.0.1:9" and constants.HF_HUB_OFFLINE
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert constants.ENDPOINT == HfApi().endpoint == fake_hub.url
    assert not constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ


# -- adapters ---------------------------------------------------------------------------------------------------------------
def test_push_adapter_then_load_by_repo_id(fake_hub, pushed_adapter, adapter_model, tmp_path):
    repo_id, info = pushed_adapter
    model, expected = adapter_model
    server = fake_hub.server
    record = server.commits[-1]
    assert (record.repo_id, record.ref, record.summary, record.create_pr) == (repo_id, "main", "first push", False)
    assert record.authorization == f"Bearer {TOKEN}" and info.oid == record.sha
    assert info.commit_url.endswith(record.sha) and server.repos[repo_id].refs["main"] == record.sha
    files = server.files(repo_id)
    assert set(files) == {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "results.json",
        "sample_grid.png",
    }
    assert files["adapter_model.safetensors"].lfs and files["sample_grid.png"].data == GRID.read_bytes()
    assert files["results.json"].data == RESULTS.read_bytes()  # the run's own file, as it is
    # The uploaded tensors are what save_qalora_adapter writes locally.
    dq.save_qalora_adapter(model, tmp_path)
    local, remote = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(_saved(files["adapter_model.safetensors"].data, tmp_path / "remote.safetensors")),
    )
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)

    fresh = make_unet2d()
    assert dq.load_qalora_adapter(fresh, repo_id) is fresh
    assert_same_outputs(fresh, expected)
    assert not torch.equal(outputs(make_unet2d())[0], expected[0])  # the adapter changes the model
    peft_model = PeftModel.from_pretrained(make_unet2d(), repo_id)  # PEFT reads the repo too (after the import)
    assert_same_outputs(peft_model, expected)


def _saved(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def test_adapter_model_card(fake_hub, pushed_adapter, adapter_model, base_repo):
    repo_id, _ = pushed_adapter
    card = ModelCard.load(repo_id)  # downloaded from the fake Hub and parsed by huggingface_hub
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == base_repo
    assert data["base_model_relation"] == "adapter"
    assert {"diffusers", "diffusers-qalora", "quantization", "qalora", "efficientdm", "w4a4"} <= set(data["tags"])
    text = card.text
    assert "| weights / activations | 4-bit / 4-bit (W4A4) |" in text
    assert "| calibrated timesteps | 4, from 0 to 999 |" in text and "| LoRA rank / alpha | 2 / 32 |" in text
    assert "![samples of the quantized model](sample_grid.png)" in text
    base = make_unet2d()
    wrapped = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    first_last = [n for n in wrapped if n.split(".")[0] in ("conv_in", "conv_out", "time_embedding")]
    assert f"| layers with QALoRA | {len(wrapped) - len(first_last)} |" in text
    assert f"| 8-bit layers without LoRA (input, embeddings, output) | {len(first_last)}: `conv_in`" in text
    # The metrics table and the settings come from results.json, formatted as the report does.
    results = json.loads(RESULTS.read_text())
    assert f"Measured with `{results['command']}`" in text
    for row in results["methods"].values():
        fid = f"{row['fid_mean']:.2f} ± {row['fid_std']:.2f}"
        acc = f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f}"
        assert f"| {row['method']} | {row['bits']} | {fid} | {acc} |" in text
    assert f"| optimizer steps | {results['config']['distill']['max_train_steps']} |" in text
    # The load snippet is three lines and runs against the Hub: it downloads the base model and the adapter.
    (snippet,) = code_blocks(card)
    assert len(snippet.strip().splitlines()) == 3
    namespace: dict = {}
    exec(snippet, namespace)
    assert_same_outputs(namespace["unet"], adapter_model[1])
    # The card is a function of its inputs: rebuilt locally (results given as the job's output folder), it is the same.
    again = dq.hub.qalora_adapter_card(
        adapter_model[0], repo_id, info=CardInfo(base_model=base_repo, results=BENCH, sample_grid="sample_grid.png")
    )
    assert again.content.strip() == card.content.strip()


def test_base_model_recorded_by_from_pretrained(fake_hub, base_repo):
    """A model loaded from the Hub remembers its id: the card names it without `base_model=` and does not warn."""
    import warnings

    unet = dq.get_qalora_model(
        UNet2DModel.from_pretrained(base_repo),
        dq.QALoraConfig(r=2, timesteps=list(TABLE), weight_init="minmax", act_init="minmax"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelCardWarning)
        card = dq.hub.qalora_adapter_card(unet, "test-org/z")
    assert card.data.base_model == base_repo and f'from_pretrained("{base_repo}")' in code_blocks(card)[0]


def test_peft_push_to_hub_loads_back(fake_hub):
    """``PeftModel.push_to_hub`` (transformers' mixin) uploads a folder our loader reads; its card is transformers'
    own, which is why the docs point to push_qalora_adapter for a proper card."""
    cfg = dq.QALoraConfig(r=2, timesteps=list(TABLE), weight_init="minmax", act_init="minmax", init_weights=False)
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(make_unet2d(), cfg)
    dq.calibrate_activations(peft_model, lambda: [peft_model(**unet2d_inputs(t, seed=11)) for t in TABLE])
    expected = outputs(peft_model)
    peft_model.push_to_hub("test-org/peft-push", token=TOKEN, commit_message="peft push")
    assert fake_hub.server.commits[-1].summary == "peft push"
    assert_same_outputs(dq.load_qalora_adapter(make_unet2d(), "test-org/peft-push"), expected)
    assert_same_outputs(PeftModel.from_pretrained(make_unet2d(), "test-org/peft-push"), expected)
    card = ModelCard.load("test-org/peft-push")
    assert "qalora" not in (card.data.tags or []) and card.data.library_name != "peft"
    # push_qalora_adapter takes the PeftModel as well, and writes our card.
    dq.push_qalora_adapter(peft_model, "test-org/peft-push", token=TOKEN, card=CardInfo(base_model=BASE_REPO))
    assert ModelCard.load("test-org/peft-push").data.library_name == "peft"
    assert_same_outputs(dq.load_qalora_adapter(make_unet2d(), "test-org/peft-push"), expected)


def test_branch_and_pull_request(fake_hub, pushed_adapter, adapter_model):
    repo_id, _ = pushed_adapter
    server = fake_hub.server
    main_head = server.repos[repo_id].refs["main"]
    other = qalora_unet(seed=5, calibration_seed=12)
    other_expected = outputs(other)
    assert not torch.equal(other_expected[0], adapter_model[1][0])
    info = dq.push_qalora_adapter(
        other,
        repo_id,
        token=TOKEN,
        revision="v2",
        commit_message="second adapter on a branch",
        card=CardInfo(base_model=BASE_REPO),
    )
    record = server.commits[-1]
    assert (record.ref, record.revision, record.create_pr) == ("v2", "v2", False) and info.pr_url is None
    assert server.repos[repo_id].refs["main"] == main_head  # main untouched
    assert_same_outputs(dq.load_qalora_adapter(make_unet2d(), repo_id, revision="v2"), other_expected)
    assert_same_outputs(dq.load_qalora_adapter(make_unet2d(), repo_id), adapter_model[1])
    (snippet,) = code_blocks(server.file(repo_id, "README.md", "v2").decode())
    assert 'revision="v2"' in snippet

    pr = dq.push_qalora_adapter(
        other,
        repo_id,
        token=TOKEN,
        create_pr=True,
        commit_message="proposal",
        commit_description="a better adapter",
        card=CardInfo(base_model=BASE_REPO),
    )
    record = server.commits[-1]
    assert record.create_pr and record.ref == "refs/pr/1" and record.description == "a better adapter"
    assert pr.pr_url == record.pr_url and pr.pr_url.endswith("/discussions/1")
    assert server.repos[repo_id].refs["main"] == main_head
    assert_same_outputs(dq.load_qalora_adapter(make_unet2d(), repo_id, revision="refs/pr/1"), other_expected)
    dq.push_qalora_adapter(
        adapter_model[0], repo_id, token=TOKEN, create_pr=True, revision="v2", card=CardInfo(base_model=BASE_REPO)
    )
    record = server.commits[-1]
    assert (record.revision, record.ref, record.create_pr) == ("v2", "refs/pr/2", True)  # a PR against the branch
    assert_same_outputs(dq.load_qalora_adapter(make_unet2d(), repo_id, revision="refs/pr/2"), adapter_model[1])


def test_private_repo_needs_its_token(fake_hub, adapter_model):
    model, expected = adapter_model
    dq.push_qalora_adapter(
        model, "test-org/private-qalora", token=TOKEN, private=True, card=CardInfo(base_model=BASE_REPO)
    )
    assert fake_hub.server.repos["test-org/private-qalora"].private
    create = [r for r in fake_hub.server.requests if r[1] == "/api/repos/create"][-1]
    assert create[2] == f"Bearer {TOKEN}"
    with pytest.raises(RepositoryNotFoundError, match=r"Hub repo 'test-org/private-qalora' was not found(.|\n)*token"):
        dq.load_qalora_adapter(make_unet2d(), "test-org/private-qalora")
    assert_same_outputs(dq.load_qalora_adapter(make_unet2d(), "test-org/private-qalora", token=TOKEN), expected)


def test_repo_id_without_namespace_goes_to_the_token_owner(fake_hub, adapter_model):
    info = dq.push_qalora_adapter(adapter_model[0], "solo-qalora", token=TOKEN, card=CardInfo(base_model=BASE_REPO))
    assert info.repo_url.repo_id == "fake-user/solo-qalora"
    (snippet,) = code_blocks(fake_hub.server.file("fake-user/solo-qalora", "README.md").decode())
    assert '"fake-user/solo-qalora"' in snippet  # the card names the final id


# -- exported integer models ---------------------------------------------------------------------------------------------
def test_push_exported_model_then_from_pretrained(fake_hub, base_repo, exported_model):
    model, expected = exported_model
    repo_id = "test-org/tiny-unet2d-w4a8"
    dq.push_quantized_model(model, repo_id, token=TOKEN, card=CardInfo(base_model=base_repo, sample_grid=GRID))
    files = fake_hub.server.files(repo_id)
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "sample_grid.png"} <= set(files)
    config = json.loads(files["config.json"].data)["quantization_config"]
    assert config["quant_method"] == "qalora" and (config["weight_bits"], config["act_bits"]) == (4, 8)
    loaded = UNet2DModel.from_pretrained(repo_id)
    assert_same_outputs(loaded, expected)

    card = ModelCard.load(repo_id)
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["base_model_relation"] == "quantized"
    assert {"diffusers", "quantization", "qalora", "w4a8"} <= set(data["tags"]) and data["base_model"] == base_repo
    assert f"| integer layers | {len(config['layers'])} (" in card.text
    (snippet,) = code_blocks(card)
    assert len(snippet.strip().splitlines()) <= 3
    namespace: dict = {}
    exec(snippet, namespace)
    assert_same_outputs(namespace["unet"], expected)


def test_diffusers_push_to_hub_of_an_exported_model_loads_back(fake_hub, exported_model):
    """diffusers' own ``ModelMixin.push_to_hub`` also works for an exported model (its card is diffusers' generic
    one; push_quantized_model writes ours)."""
    model, expected = exported_model
    model.push_to_hub("test-org/diffusers-push-w4a8", token=TOKEN)
    assert_same_outputs(UNet2DModel.from_pretrained("test-org/diffusers-push-w4a8"), expected)
    assert "qalora" not in (ModelCard.load("test-org/diffusers-push-w4a8").data.tags or [])


def test_a_new_push_replaces_stale_weight_shards(fake_hub, exported_model):
    model, expected = exported_model
    repo_id = "test-org/sharded-w4a8"
    dq.push_quantized_model(model, repo_id, token=TOKEN, max_shard_size="100KB", card=False)
    sharded = set(fake_hub.server.files(repo_id))
    assert "diffusion_pytorch_model.safetensors.index.json" in sharded and "README.md" not in sharded
    assert_same_outputs(UNet2DModel.from_pretrained(repo_id), expected)
    dq.push_quantized_model(model, repo_id, token=TOKEN, card="---\nlicense: mit\n---\n\n# My own card\n")
    card = ModelCard.load(repo_id)
    assert card.data.license == "mit" and card.text.strip() == "# My own card"  # a given card replaces ours
    files = set(fake_hub.server.files(repo_id))
    assert [f for f in files if f.endswith(".safetensors")] == ["diffusion_pytorch_model.safetensors"]
    assert "diffusion_pytorch_model.safetensors.index.json" not in files
    assert set(fake_hub.server.commits[-1].deleted) == {f for f in sharded if ".safetensors" in f}
    assert_same_outputs(UNet2DModel.from_pretrained(repo_id, force_download=True), expected)


# -- offline --------------------------------------------------------------------------------------------------------------
def test_offline_load_from_the_cache_after_the_server_stopped(tmp_path, adapter_model, exported_model):
    """Download once online into a fresh cache, stop the server, then load by repo id in a fresh interpreter with
    HF_HUB_OFFLINE=1 (as a user would)."""
    home = tmp_path / "hf_home"
    with FakeHubServer() as server, hub_client_environment(server.url, home):
        dq.push_qalora_adapter(adapter_model[0], "off/qalora", token=TOKEN, revision="v1", card=False)
        dq.push_quantized_model(exported_model[0], "off/int", token=TOKEN, card=False)
        dq.load_qalora_adapter(make_unet2d(), "off/qalora", revision="v1")
        UNet2DModel.from_pretrained("off/int")
        dead_endpoint = server.url
    code = (
        "import sys, torch\n"
        "from diffusers import UNet2DModel\n"
        "from safetensors.torch import save_file\n"
        "import diffusers_qalora as dq\n"
        "from tiny_models import make_sd15_unet, make_unet2d, unet2d_inputs\n"
        "torch.set_num_threads(1)\n"
        "adapter = dq.load_qalora_adapter(make_unet2d(), 'off/qalora', revision='v1')\n"
        "exported = UNet2DModel.from_pretrained('off/int')\n"
        f"ts = {list(PROBE_TIMESTEPS)!r}\n"
        "with torch.no_grad():\n"
        "    out = {f'{name}{i}': m(**unet2d_inputs(t)).sample for name, m in (('a', adapter), ('e', exported))\n"
        "           for i, t in enumerate(ts)}\n"
        "save_file(out, sys.argv[1])\n"
        "try:\n"
        "    dq.load_qalora_adapter(make_unet2d(), 'off/never-downloaded')\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, '|', str(err).splitlines()[0])\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ENDPOINT": dead_endpoint,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out.safetensors")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_file(tmp_path / "out.safetensors")
    for i in range(len(PROBE_TIMESTEPS)):
        assert torch.equal(out[f"a{i}"], adapter_model[1][i]) and torch.equal(out[f"e{i}"], exported_model[1][i])
    assert result.stdout.startswith("LocalEntryNotFoundError | ")
    assert "'off/never-downloaded'" in result.stdout and "HF_HUB_OFFLINE is set" in result.stdout


# -- clear errors ---------------------------------------------------------------------------------------------------------
def test_missing_repo(fake_hub):
    model = make_unet2d()
    with pytest.raises(RepositoryNotFoundError, match=r"Hub repo 'test-org/does-not-exist' was not found at http"):
        dq.load_qalora_adapter(model, "test-org/does-not-exist")
    assert not hasattr(model, "peft_config")
    with pytest.raises(OSError, match="test-org/does-not-exist"):  # diffusers' own message names it too
        UNet2DModel.from_pretrained("test-org/does-not-exist")


def test_wrong_revision(fake_hub, pushed_adapter, exported_model):
    repo_id, _ = pushed_adapter
    model = make_unet2d()
    with pytest.raises(
        RevisionNotFoundError, match=rf"Hub repo '{repo_id}' has no revision 'no-such-branch'(.|\n)*list_repo_refs"
    ):
        dq.load_qalora_adapter(model, repo_id, revision="no-such-branch")
    assert not hasattr(model, "peft_config")
    with pytest.raises(OSError, match="no-such-branch"):
        UNet2DModel.from_pretrained(BASE_REPO, revision="no-such-branch")


def test_repos_holding_other_adapters(fake_hub, tmp_path, base_repo):
    # A PEFT LoRA: adapter_config.json with peft_type "LORA".
    peft.get_peft_model(make_unet2d(), LoraConfig(r=2, target_modules=["to_q"])).save_pretrained(tmp_path / "peft")
    upload_folder(tmp_path / "peft", "test-org/plain-lora")
    model = make_unet2d()
    with pytest.raises(
        ValueError,
        match=r"Hub repo 'test-org/plain-lora' \(revision 'main'\) holds a 'LORA' "
        r"adapter, not a QALoRA one(.|\n)*load_lora_weights",
    ):
        dq.load_qalora_adapter(model, "test-org/plain-lora")
    assert not hasattr(model, "peft_config")
    # A diffusers LoRA: pytorch_lora_weights.safetensors and no adapter_config.json.
    lora_unet = make_sd15_unet()  # UNet2DConditionModel has diffusers' LoRA mixin
    lora_unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    lora_unet.save_lora_adapter(tmp_path / "diffusers")
    upload_folder(tmp_path / "diffusers", "test-org/diffusers-lora")
    with pytest.raises(
        EntryNotFoundError,
        match=r"has no file 'adapter_config.json'(.|\n)*diffusers LoRA "
        r"\(pytorch_lora_weights.safetensors\)(.|\n)*load_lora_weights",
    ):
        dq.load_qalora_adapter(make_unet2d(), "test-org/diffusers-lora")
    # A model repo.
    with pytest.raises(EntryNotFoundError, match=r"holds a model \(config.json\)(.|\n)*from_pretrained"):
        dq.load_qalora_adapter(make_unet2d(), base_repo)


def test_offline_without_cache_is_a_clear_error(fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        LocalEntryNotFoundError,
        match=r"'test-org/never-pulled' \(revision 'main'\) is not in the "
        r"local cache(.|\n)*HF_HUB_OFFLINE is set",
    ):
        dq.load_qalora_adapter(make_unet2d(), "test-org/never-pulled")


def test_failed_push_leaves_local_files_and_model_unchanged(fake_hub, adapter_model, tmp_path):
    model, expected = adapter_model
    results, grid = tmp_path / "results.json", tmp_path / "grid.png"
    results.write_bytes(RESULTS.read_bytes())
    grid.write_bytes(GRID.read_bytes())
    stamps = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (results, grid)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    staged_before = set(Path(tempfile.gettempdir()).glob("qalora-push-*"))
    commits = len(fake_hub.server.commits)
    fake_hub.server.fail_commits = True
    try:
        with pytest.raises(
            HfHubHTTPError,
            match=r"Pushing to Hub repo 'test-org/fails' failed; the local model and "
            r"files are unchanged",
        ):
            dq.push_qalora_adapter(
                model, "test-org/fails", token=TOKEN, card=CardInfo(results=results, sample_grid=grid)
            )
    finally:
        fake_hub.server.fail_commits = False
    assert len(fake_hub.server.commits) == commits
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (results, grid)} == stamps
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "results.json"]
    assert set(Path(tempfile.gettempdir()).glob("qalora-push-*")) == staged_before
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert_same_outputs(model, expected)


def test_bad_push_arguments_fail_before_any_request(fake_hub, adapter_model, exported_model, tmp_path, monkeypatch):
    model = adapter_model[0]
    seen = len(fake_hub.server.requests)
    with pytest.raises(ValueError, match="no QALoRA adapter named 'other'"):
        dq.push_qalora_adapter(model, "test-org/x", "other", token=TOKEN)
    with pytest.raises(ValueError, match="repo_id"):
        dq.push_qalora_adapter(model, "a/b/c", token=TOKEN)
    w8a8 = {**json.loads(RESULTS.read_text()), "config": {"weight_bits": 8, "act_bits": 8}}
    with pytest.raises(ValueError, match="measured at W8A8 but the model is W4A4"):
        dq.push_qalora_adapter(model, "test-org/x", token=TOKEN, card=CardInfo(results=w8a8))
    with pytest.raises(ValueError, match="no 'methods' table"):
        dq.push_qalora_adapter(model, "test-org/x", token=TOKEN, card=CardInfo(results={"command": "x"}))
    with pytest.raises(TypeError, match="`card`"):
        dq.push_qalora_adapter(model, "test-org/x", token=TOKEN, card=3)
    with pytest.raises(FileNotFoundError, match="sample_grid"):
        dq.push_qalora_adapter(model, "test-org/x", token=TOKEN, card=CardInfo(sample_grid=tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="not an exported integer model"):
        dq.push_quantized_model(make_unet2d(), "test-org/x", token=TOKEN)
    with pytest.raises(TypeError, match="not a pipeline"):
        from tiny_models import make_tiny_sd_pipeline

        dq.push_quantized_model(make_tiny_sd_pipeline(), "test-org/x", token=TOKEN)
    # Safetensors only: a pickle file in the staged folder is refused before anything is sent.
    exported = exported_model[0]
    original = type(exported).save_pretrained

    def save_with_a_pickle(self, folder, **kwargs):
        original(self, folder, **kwargs)
        torch.save({"w": torch.zeros(1)}, Path(folder) / "diffusion_pytorch_model.bin")

    monkeypatch.setattr(type(exported), "save_pretrained", save_with_a_pickle)
    with pytest.raises(ValueError, match=r"refusing to upload pickle-based files \['diffusion_pytorch_model.bin'\]"):
        dq.push_quantized_model(exported, "test-org/x", token=TOKEN)
    assert len(fake_hub.server.requests) == seen
    assert "test-org/x" not in fake_hub.server.repos


def test_card_without_base_model_warns(fake_hub):
    torch.manual_seed(0)
    model = dq.get_qalora_model(make_unet2d(), dq.QALoraConfig(r=2, timesteps=list(TABLE), weight_init="minmax"))
    with pytest.warns(ModelCardWarning, match="names no base model"):
        card = dq.hub.qalora_adapter_card(model, "test-org/y")
    assert "base_model" not in card.data.to_dict()
    assert "the UNet2DModel this adapter was trained on" in code_blocks(card)[0]


# -- examples/distill.py --push_to_hub ----------------------------------------------------------------------------------
def test_distill_script_pushes_the_adapter_it_saved(fake_hub, tmp_path):
    from tiny_models import make_tiny_sd_pipeline

    from diffusers_qalora.distill.cli import main

    make_tiny_sd_pipeline().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    args = [
        "--pretrained_model_name_or_path",
        str(tmp_path / "pipe"),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--num_inference_steps",
        "3",
        "--train_batch_size",
        "1",
        "--calibration_samples",
        "1",
        "--rank",
        "2",
        "--guidance_scale",
        "2.0",
        "--push_to_hub",
        "--hub_model_id",
        "test-org/distilled-tiny-sd",
        "--hub_token",
        TOKEN,
    ]
    with pytest.warns(ModelCardWarning, match="no base model"):  # a local pipeline folder has no Hub id
        main(args)
    local, pulled = make_sd15_unet(), make_sd15_unet()
    dq.load_qalora_adapter(local, out / "adapter")
    dq.load_qalora_adapter(pulled, "test-org/distilled-tiny-sd", token=TOKEN)
    local_state, pulled_state = local.state_dict(), pulled.state_dict()
    assert local_state.keys() == pulled_state.keys()
    assert all(torch.equal(local_state[k], pulled_state[k]) for k in local_state)
    assert any(".qal_B." in k and local_state[k].abs().sum() > 0 for k in local_state)  # trained, not the init
    files = HfApi().list_repo_files("test-org/distilled-tiny-sd", token=TOKEN)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    card = ModelCard.load("test-org/distilled-tiny-sd", token=TOKEN)
    assert "W4A4" in card.text and "| optimizer steps | 2 |" in card.text  # the run's settings, not the defaults


def test_distill_script_pushes_a_transformer_adapter(fake_hub, tmp_path):
    """An SD3 pipeline job distils `transformer`: the push reloads that component (not a UNet) with the adapter."""
    from tiny_models import make_sd3_pipeline_transformer, make_tiny_sd3_pipeline

    from diffusers_qalora.distill.cli import main

    make_tiny_sd3_pipeline().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--output_dir", str(out)]
    args += ["--max_train_steps", "2", "--num_inference_steps", "2", "--train_batch_size", "1"]
    args += ["--calibration_samples", "1", "--rank", "2", "--max_sequence_length", "4"]
    args += ["--push_to_hub", "--hub_model_id", "test-org/distilled-tiny-sd3", "--hub_token", TOKEN]
    with pytest.warns(ModelCardWarning, match="no base model"):
        main(args)
    local, pulled = make_sd3_pipeline_transformer(), make_sd3_pipeline_transformer()
    dq.load_qalora_adapter(local, out / "adapter")
    dq.load_qalora_adapter(pulled, "test-org/distilled-tiny-sd3", token=TOKEN)
    local_state, pulled_state = local.state_dict(), pulled.state_dict()
    assert local_state.keys() == pulled_state.keys()
    assert all(torch.equal(local_state[k], pulled_state[k]) for k in local_state)
    card = ModelCard.load("test-org/distilled-tiny-sd3", token=TOKEN)
    assert "SD3Transformer2DModel" in card.text


def test_distill_script_refuses_a_bad_hub_model_id_before_any_work(tmp_path):
    from diffusers_qalora.distill.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--hub_model_id 'not a/valid/id'"):
        main(["--output_dir", str(out), "--push_to_hub", "--hub_model_id", "not a/valid/id"])
    with pytest.raises(SystemExit, match="only with --push_to_hub"):
        main(["--output_dir", str(out), "--hub_model_id", "org/name"])
    assert not out.exists()
