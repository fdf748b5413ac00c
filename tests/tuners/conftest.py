"""Shared set-up for the tuner tests: one CPU thread (the build machines are shared) and fixtures over the tiny
models of ``tiny_models.py`` (UNet2DModel, SD1.5- and SDXL-like UNet2DConditionModel, SD3 and Flux transformers, a
tiny StableDiffusionPipeline), all built from configs without any download."""

import pytest
import torch
from tiny_models import (  # noqa: F401  (re-exported for tests that prefer plain functions)
    MODEL_KINDS,
    Case,
    make_flux,
    make_sd3,
    make_sd15_unet,
    make_sdxl_unet,
    make_tiny_sd_pipeline,
    make_tiny_tokenizer,
    make_unet2d,
    output_of,
)

torch.set_num_threads(1)


@pytest.fixture(params=sorted(MODEL_KINDS))
def model_case(request) -> Case:
    return MODEL_KINDS[request.param]


@pytest.fixture
def tiny_sd_pipeline():
    return make_tiny_sd_pipeline()
