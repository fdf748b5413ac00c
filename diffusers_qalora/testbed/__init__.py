"""The embedded default model: a small class-conditional DDPM on 16x16 digits, its classifier and its recipe.

Beside the UNet, the embedded DiT (`load_testbed(model="dit")`): a class-conditional SD3-style transformer trained by
its own seeded recipe on the same digits, with the same noise schedule and classifier.

Everything loads offline from the package (safetensors, verified by sha256):

```py
>>> from diffusers_qalora.testbed import load_testbed
>>> tb = load_testbed()
>>> tb.pipeline([0, 1, 2]).images.shape
torch.Size([3, 1, 16, 16])
```
"""

from .data import DigitsSplit, load_digits_16x16, load_digits_split, to_model_range, to_unit_range
from .dit import DEFAULT_DIT_CONFIG, ClassConditionalTransformer, build_dit
from .loading import (
    TESTBED_MODELS,
    WEIGHTS_DIR,
    Testbed,
    load_testbed,
    read_dit_config,
    read_testbed_config,
    sha256_file,
    verify_weights,
)
from .models import (
    DEFAULT_CLASSIFIER_CONFIG,
    DEFAULT_SCHEDULER_CONFIG,
    DEFAULT_UNET_CONFIG,
    DigitsClassifier,
    build_ddim_scheduler,
    build_ddpm_scheduler,
    build_unet,
)
from .pipeline import ClassConditionalDDIMPipeline

__all__ = [
    "ClassConditionalDDIMPipeline",
    "ClassConditionalTransformer",
    "DigitsClassifier",
    "DigitsSplit",
    "Testbed",
    "load_digits_split",
    "load_testbed",
]
