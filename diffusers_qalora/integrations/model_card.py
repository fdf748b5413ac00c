"""Model cards (``README.md``) for QALoRA adapters and exported integer models, written with huggingface_hub's
``ModelCard`` / ``ModelCardData``.

A card states what was measured and how to load it: base model, bits, rank, calibrated timesteps, distillation
settings, the metrics table of a distillation job's ``results.json`` and a sample grid when given, and a three-line
snippet that the Hub tests execute.  Nothing in a card is invented: every number comes from the adapter config, the
model or the ``results.json`` passed in.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..tuners.qalora.config import QALoraConfig
from .diffusers.config import QALoraQuantConfig

PACKAGE_NAME = "diffusers-qalora"
PAPER_URL = "https://arxiv.org/abs/2310.03270"
BASE_TAGS = ("diffusers", PACKAGE_NAME, "qalora", "efficientdm", "quantization")
CITATION = """@inproceedings{he2024efficientdm,
  title     = {EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models},
  author    = {He, Yefei and Liu, Jing and Wu, Weijia and Zhou, Hong and Zhuang, Bohan},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""
# Hub ids are ``name`` or ``org/name`` of letters, digits, ``-``, ``_`` and ``.``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Labels and formats of the metrics the embedded job writes (``<key>_mean`` / ``<key>_std``); others print as is.
_METRICS = {
    "fid": ("digits-FID", 1.0, 2),
    "accuracy": ("accuracy (%)", 100.0, 1),
    "x0_mse": ("x0-MSE vs FP", 1.0, 5),
}
_DISTILL_KEYS = (
    ("max_train_steps", "optimizer steps"),
    ("batch_size", "trajectories per step (batch)"),
    ("num_inference_steps", "teacher DDIM steps per trajectory"),
    ("eta", "DDIM eta"),
    ("lora_lr", "LoRA learning rate"),
    ("weight_step_lr", "weight step-size learning rate"),
    ("act_step_lr", "activation step-size learning rate"),
    ("scale_aware", "scale-aware LoRA optimization"),
    ("lr_schedule", "learning-rate schedule"),
    ("seed", "seed"),
)


@dataclass
class CardInfo:
    """What a generated model card says beyond what the model records itself (every field optional).

    Args:
        base_model (`str`, *optional*): Hub id of the base (full-precision) model, for the card's metadata and load
            snippet; by default the one PEFT / diffusers recorded when the model was loaded from the Hub.
        base_model_subfolder (`str`, *optional*): sub-folder of the denoiser in ``base_model`` (e.g. ``"unet"``;
            adapters only).
        results (`str | os.PathLike | dict`, *optional*): the ``results.json`` of a distillation job (or its output
            folder): its metrics table and distillation settings go into the card, the file into the repo.
        distill_config (`DistillConfig | dict`, *optional*): distillation settings for the card when ``results``
            has none.
        sample_grid (`str | os.PathLike`, *optional*): an image of samples (PNG/JPEG/WebP) shown in the card and
            uploaded with it.
        license (`str`, *optional*): the card's ``license`` (e.g. the base model's).
        pipeline_tag (`str`, *optional*): the card's ``pipeline_tag`` (e.g. ``"text-to-image"``).
        tags (`list[str]`, *optional*): extra tags after ``diffusers, diffusers-qalora, qalora, efficientdm,
            quantization, w<bits>a<bits>``.
    """

    base_model: str | None = None
    base_model_subfolder: str | None = None
    results: str | os.PathLike | Mapping[str, Any] | None = None
    distill_config: Any = None
    sample_grid: str | os.PathLike | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    tags: Sequence[str] | None = None


class ModelCardWarning(UserWarning):
    """A model card lacks something the user can add (e.g. the base model, so the load snippet cannot run)."""


def bits_tag(weight_bits: int, act_bits: int) -> str:
    """``"w4a4"``: the Hub tag for the bit widths."""
    return f"w{weight_bits}a{act_bits}"


def looks_like_hub_id(value: str | None) -> bool:
    """Whether ``value`` can be a Hub model id (and is not an existing local path)."""
    return bool(value) and _HUB_ID.match(str(value)) is not None and not Path(str(value)).exists()


def read_results(results: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Load a distillation job's ``results.json`` (a file, the job's output folder, or the dict itself) and check its
    shape: a ``"methods"`` mapping of metric rows."""
    if results is None:
        return None
    source = "results"
    if not isinstance(results, Mapping):
        path = Path(results)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"`results`: {path} does not exist; pass the results.json a distillation job wrote "
                f"(or its output folder)."
            )
        source = str(path)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"`results`: {path} is not valid JSON ({err}).") from err
    methods = results.get("methods") if isinstance(results, Mapping) else None
    if not isinstance(methods, Mapping) or not methods or not all(isinstance(r, Mapping) for r in methods.values()):
        raise ValueError(
            f"`results` ({source}) has no 'methods' table of metric rows; pass the results.json that "
            f"`examples/distill.py` / `run_embedded_job` wrote."
        )
    return dict(results)


def check_results_bits(results: Mapping[str, Any] | None, weight_bits: int, act_bits: int) -> None:
    """Refuse a ``results.json`` measured at other bit widths than the model being pushed."""
    config = (results or {}).get("config") or {}
    if (
        "weight_bits" in config
        and "act_bits" in config
        and (config["weight_bits"], config["act_bits"]) != (weight_bits, act_bits)
    ):
        raise ValueError(
            f"`results` were measured at W{config['weight_bits']}A{config['act_bits']} but the model is "
            f"W{weight_bits}A{act_bits}; pass the results.json of this model's run."
        )


def metrics_table(results: Mapping[str, Any]) -> str:
    """The Markdown table of every method row in ``results["methods"]`` (mean ± std over seeds)."""
    rows = list(results["methods"].values())
    keys = [k[: -len("_mean")] for k in dict.fromkeys(k for r in rows for k in r) if k.endswith("_mean")]
    keys.sort(key=lambda k: (list(_METRICS).index(k) if k in _METRICS else len(_METRICS), k))
    header = ["method", "bits (W/A)"] + [_METRICS.get(k, (k,))[0] for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row.get("method", "")), str(row.get("bits", ""))]
        for key in keys:
            if f"{key}_mean" not in row:
                cells.append("—")
                continue
            _, scale, digits = _METRICS.get(key, (key, 1.0, 4))
            mean, std = scale * float(row[f"{key}_mean"]), scale * float(row.get(f"{key}_std", 0.0))
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if key in _METRICS else f"{mean:.4g} ± {std:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _protocol(results: Mapping[str, Any]) -> str:
    protocol = results.get("eval_protocol") or {}
    parts = []
    if "samples_per_seed" in protocol and "seeds" in protocol:
        parts.append(f"{protocol['samples_per_seed']} samples x seeds {list(protocol['seeds'])}")
    if "ddim_steps" in protocol:
        parts.append(f"{protocol['ddim_steps']} DDIM steps (eta {protocol.get('eta', 0.0)})")
    text = ", ".join(parts)
    if results.get("command"):
        text = f"Measured with `{results['command']}`" + (f": {text}." if text else ".")
    elif text:
        text = f"Measured on {text}."
    return text


def _distill_settings(distill: Any) -> dict[str, Any] | None:
    if distill is None:
        return None
    if is_dataclass(distill) and not isinstance(distill, type):
        return asdict(distill)
    if isinstance(distill, Mapping):
        return dict(distill)
    raise TypeError(f"`distill_config` must be a DistillConfig or a dict, got {type(distill).__name__}.")


def distillation_table(distill: Mapping[str, Any], training: Mapping[str, Any] | None = None) -> str:
    """Two-column Markdown table of the distillation hyper-parameters (and the measured training time)."""
    lines = ["| setting | value |", "|---|---|"]
    for key, label in _DISTILL_KEYS:
        if distill.get(key) is not None:
            lines.append(f"| {label} | {distill[key]} |")
    if training:
        if training.get("steps") is not None:
            lines.append(f"| steps run | {training['steps']} |")
        if training.get("train_seconds") is not None:
            lines.append(f"| training time | {training['train_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def _timesteps_line(table: Sequence[float]) -> str:
    values = [float(t) for t in table]
    if len(values) == 1:
        return f"1 ({values[0]:g})"
    return f"{len(values)}, from {min(values):g} to {max(values):g}"


def _granularity_text(granularity: str, group_size: int | None) -> str:
    return (
        "per output channel"
        if granularity == "channel"
        else (f"per output channel and group of {group_size} input channels")
    )


def _model_variable(model_class: type) -> str:
    name = model_class.__name__.lower()
    return "unet" if "unet" in name else "transformer" if "transformer" in name else "model"


def _class_expression(model_class: type) -> tuple[str, str]:
    """(import line fragment, expression naming the class), preferring ``diffusers.<Class>``."""
    import diffusers

    if getattr(diffusers, model_class.__name__, None) is model_class:
        return "diffusers", f"diffusers.{model_class.__name__}"
    return f"{model_class.__module__} as base_models", f"base_models.{model_class.__qualname__}"


def _call_args(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> str:
    args = [json.dumps(repo_id)]
    if subfolder:
        args.append(f"subfolder={json.dumps(subfolder)}")
    if revision:
        args.append(f"revision={json.dumps(revision)}")
    return ", ".join(args)


def adapter_load_snippet(
    model_class: type,
    repo_id: str,
    base_model: str | None,
    base_model_subfolder: str | None = None,
    revision: str | None = None,
) -> str:
    """Three lines that load the base model and this adapter (runnable when ``base_model`` is a Hub id)."""
    module, cls = _class_expression(model_class)
    var = _model_variable(model_class)
    if base_model:
        load_base = f"{var} = {cls}.from_pretrained({_call_args(base_model, base_model_subfolder)})"
    else:
        load_base = f"{var} = ...  # the {model_class.__name__} this adapter was trained on (base model not recorded)"
    return "\n".join(
        [
            f"import {module}, diffusers_qalora as dq",
            load_base,
            f"dq.load_qalora_adapter({var}, {_call_args(repo_id, revision=revision)})",
        ]
    )


def quantized_load_snippet(model_class: type, repo_id: str, revision: str | None = None) -> str:
    """Lines that load the exported integer model (``import diffusers_qalora`` registers the backend)."""
    module, cls = _class_expression(model_class)
    return "\n".join(
        [
            f'import {module}, diffusers_qalora  # the import registers the "qalora" quantization backend',
            f"{_model_variable(model_class)} = {cls}.from_pretrained({_call_args(repo_id, revision=revision)})",
        ]
    )


def _card_data(info: CardInfo, *, relation: str, library_name: str, weight_bits: int, act_bits: int) -> ModelCardData:
    extra = {"base_model_relation": relation} if info.base_model else {}
    return ModelCardData(
        base_model=info.base_model,
        library_name=library_name,
        license=info.license,
        pipeline_tag=info.pipeline_tag,
        tags=[*BASE_TAGS, bits_tag(weight_bits, act_bits), *(info.tags or [])],
        **extra,
    )


def _results_sections(
    results: Mapping[str, Any] | None, distill: Mapping[str, Any] | None, sample_grid: str | None, note: str = ""
) -> list[str]:
    sections = []
    distill = distill if distill is not None else ((results or {}).get("config") or {}).get("distill")
    if distill:
        sections += [
            "## Distillation",
            "",
            "Data-free: the full-precision model samples its own trajectories from noise, and the quantized "
            "model learns (LoRA factors and step sizes) to match its noise predictions (MSE).",
            "",
            distillation_table(distill, (results or {}).get("training")),
            "",
        ]
    if results is not None:
        sections += ["## Results", ""]
        protocol = " ".join(
            filter(
                None, [_protocol(results), "Every method of the run is listed (same samples, seeds and noise).", note]
            )
        )
        sections += [protocol, ""]
        sections += [metrics_table(results), ""]
    if sample_grid:
        sections += ["## Samples", "", f"![samples of the quantized model]({sample_grid})", ""]
    return sections


def _footer() -> list[str]:
    return ["## Citation", "", "```bibtex", CITATION, "```", ""]


def adapter_card(
    config: QALoraConfig,
    repo_id: str,
    model_class: type,
    info: CardInfo,
    *,
    num_lora_layers: int,
    eight_bit_layers: Sequence[str],
    revision: str | None = None,
) -> ModelCard:
    """The card of a QALoRA adapter repo (``library_name: peft``: the folder is a PEFT adapter, which
    ``PeftModel.from_pretrained`` reads after ``import diffusers_qalora``).  ``info.results`` is the parsed
    ``results.json`` and ``info.sample_grid`` the image's name in the repo."""
    bits = f"W{config.weight_bits}A{config.act_bits}"
    base_model = info.base_model
    data = _card_data(
        info, relation="adapter", library_name="peft", weight_bits=config.weight_bits, act_bits=config.act_bits
    )
    base_text = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "its base model"
    granularity = _granularity_text(config.weight_granularity, config.weight_group_size)
    shown = ", ".join(f"`{name}`" for name in eight_bit_layers[:8]) + (", ..." if len(eight_bit_layers) > 8 else "")
    eight_bit = f"{len(eight_bit_layers)}" + (f": {shown}" if eight_bit_layers else "")
    lines = [
        f"# {bits} QALoRA adapter for {base_model or model_class.__name__}",
        "",
        f"A quantization-aware LoRA adapter ([EfficientDM]({PAPER_URL}), QALoRA with temporal activation step "
        f"sizes) for the `{model_class.__name__}` of {base_text}, made with "
        f"`{PACKAGE_NAME}`. The LoRA update is merged into the weights "
        "*before* fake quantization, so it folds into the integer weights on export (`dq.export_quantized`). "
        "This is not PEFT's `LoraConfig(use_qalora=True)` (QA-LoRA for language models), a different method.",
        "",
        "## How to load",
        "",
        "```python",
        adapter_load_snippet(model_class, repo_id, base_model, info.base_model_subfolder, revision),
        "```",
        "",
        "Importing `diffusers_qalora` registers the `QALORA` PEFT type, so `peft.PeftModel.from_pretrained(model, "
        f"{json.dumps(repo_id)})` also works after it. Put the model back into its pipeline (e.g. `pipe.unet = unet`) "
        "to sample; the files are `adapter_config.json` and `adapter_model.safetensors` (safetensors only).",
        "",
        "## Quantization",
        "",
        "| setting | value |",
        "|---|---|",
        f"| weights / activations | {config.weight_bits}-bit / {config.act_bits}-bit ({bits}) |",
        f"| weight step sizes | {granularity}, {'symmetric' if config.weight_symmetric else 'asymmetric'} |",
        f"| activation step sizes | {'one per calibrated timestep' if config.temporal_activations else 'one for all timesteps'}"
        f", {'symmetric' if config.act_symmetric else 'asymmetric with a zero point'} |",
        f"| calibrated timesteps | {_timesteps_line(config.timestep_table())} |",
        f"| LoRA rank / alpha | {config.r} / {config.lora_alpha:g} |",
        f"| layers with QALoRA | {num_lora_layers} |",
        f"| {config.special_bits}-bit layers without LoRA (input, embeddings, output) | {eight_bit} |",
        "",
        *_results_sections(info.results, _distill_settings(info.distill_config), info.sample_grid),
        *_footer(),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def quantized_model_card(
    config: QALoraQuantConfig,
    repo_id: str,
    model_class: type,
    info: CardInfo,
    *,
    weight_bytes: int,
    revision: str | None = None,
) -> ModelCard:
    """The card of an exported integer model (``library_name: diffusers``: it is a diffusers model folder that
    ``from_pretrained`` loads once ``diffusers_qalora`` is imported).  ``info`` as in `adapter_card`."""
    bits = f"W{config.weight_bits}A{config.act_bits}"
    base_model = info.base_model
    data = _card_data(
        info, relation="quantized", library_name="diffusers", weight_bits=config.weight_bits, act_bits=config.act_bits
    )
    layouts = config.layouts()
    special = sum(
        1 for lay in layouts.values() if (lay.weight_bits, lay.act_bits) != (config.weight_bits, config.act_bits)
    )
    base_text = f" of [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    table = config.timesteps if config.timesteps is not None else [float(t) for t in range(0, 1000, 10)]
    granularity = _granularity_text(config.weight_granularity, config.weight_group_size)
    lines = [
        f"# {bits} integer {model_class.__name__}{' of ' + base_model if base_model else ''}",
        "",
        f"The `{model_class.__name__}`{base_text} quantized to {bits} with [EfficientDM]({PAPER_URL}) (QALoRA, "
        f"temporal activation step sizes) and exported by `{PACKAGE_NAME}`: "
        "the LoRA update is merged into integer weight codes (int4 packed two per byte, int8 one per byte), stored "
        "with their step sizes and the per-timestep activation step-size table. It runs integer matrix products "
        "(oneDNN int8 on CPU).",
        "",
        "## How to load",
        "",
        "```python",
        quantized_load_snippet(model_class, repo_id, revision),
        "```",
        "",
        "The `quantization_config` in `config.json` (`quant_method: qalora`) tells diffusers to build the integer "
        "layers; no other argument is needed. Weights are safetensors only.",
        "",
        "## Quantization",
        "",
        "| setting | value |",
        "|---|---|",
        f"| weights / activations | {config.weight_bits}-bit / {config.act_bits}-bit ({bits}) |",
        f"| weight step sizes | {granularity}, symmetric |",
        f"| activation step sizes | per timestep, {'symmetric' if config.act_symmetric else 'asymmetric with a zero point'} |",
        f"| calibrated timesteps | {_timesteps_line(table)} |",
        f"| LoRA rank (merged) | {config.r} |",
        f"| integer layers | {len(layouts)} ({special} of them at {config.special_bits} bits) |",
        f"| weight files | {weight_bytes / 1e6:.2f} MB |",
        "",
        *_results_sections(
            info.results,
            _distill_settings(info.distill_config),
            info.sample_grid,
            note=(
                "They were measured on the fake-quantized model before export; the integer model's torch path "
                '(`diffusers_qalora.set_kernel_preference(model, "torch")`) reproduces its outputs bit for bit.'
            ),
        ),
        *_footer(),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def code_blocks(card: ModelCard | str, language: str = "python") -> list[str]:
    """The fenced ``language`` code blocks of a card (what the tests execute)."""
    text = card.content if isinstance(card, ModelCard) else str(card)
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)
