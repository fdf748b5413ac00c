"""Share QALoRA adapters and exported integer models on the Hugging Face Hub (the public face of
``diffusers_qalora.integrations.hub``, where the Hub-specific code lives next to the other integrations).

```py
>>> import diffusers_qalora as dq
>>> from diffusers_qalora.hub import CardInfo
>>> dq.push_qalora_adapter(unet, "me/digits-w4a4", card=CardInfo(results="outputs/distill/results.json"))
>>> dq.load_qalora_adapter(fresh_unet, "me/digits-w4a4")
```
"""

from .integrations.hub import (
    CardInfo,
    push_qalora_adapter,
    push_quantized_model,
    qalora_adapter_card,
    quantized_model_card_for,
)
from .integrations.model_card import ModelCardWarning

__all__ = [
    "CardInfo",
    "ModelCardWarning",
    "push_qalora_adapter",
    "push_quantized_model",
    "qalora_adapter_card",
    "quantized_model_card_for",
]
