"""`export_quantized`: the public entry point from a QALoRA model to an integer model that diffusers can save."""

from __future__ import annotations

from peft import PeftModel
from torch import nn

from ...quant import KernelPreference
from ...tuners.qalora.config import QALoraConfig
from ...tuners.qalora.convert import convert_qalora_to_integer
from ...tuners.qalora.model import active_qalora_adapter
from .config import QALoraQuantConfig
from .quantizer import mark_exported


def _adapter_config(model: nn.Module, adapter_name: str | None) -> QALoraConfig | None:
    configs = getattr(model, "peft_config", None) or {}
    try:
        adapter_name = active_qalora_adapter(model, adapter_name)
    except ValueError:  # convert_qalora_to_integer raises the error that names the fix
        return None
    config = configs.get(adapter_name)
    return config if isinstance(config, QALoraConfig) else None


def export_quantized(
    model: nn.Module,
    adapter_name: str | None = None,
    kernel_preference: str | None = None,
    inplace: bool = True,
) -> nn.Module:
    """Merge a (distilled) QALoRA model into integer layers and return the integer model.

    Every QALoRA ``Linear``/``Conv2d`` (the 8-bit first and last layers too) becomes an
    [IntegerLinear][diffusers_qalora.IntegerLinear] / [IntegerConv2d][diffusers_qalora.IntegerConv2d] holding the weight codes
    of ``Q_w(W0 + scaling * B @ A)`` (int8, or int4 packed two per byte), the weight step sizes, the bias and the
    activation step-size table; the LoRA factors, quantizer parameters and float weights are gone.  The timestep hook
    stays and feeds the integer layers.  A diffusers model is marked quantized with a [QALoraQuantConfig][diffusers_qalora.QALoraQuantConfig] that
    lists every integer layer, so ``save_pretrained`` writes packed integer tensors and ``from_pretrained`` of that
    folder needs no argument.

    Args:
        model (`torch.nn.Module`): the QALoRA model, activation step sizes calibrated.
        adapter_name (`str`, *optional*): the adapter to export; the active one by default.
        kernel_preference (`"auto" | "torch" | "triton" | "onednn"`, *optional*): the integer layers' implementation
            (see [KernelPreference][diffusers_qalora.KernelPreference]: ``"auto"`` takes Triton on CUDA and oneDNN's
            int8 kernels on CPU; ``"torch"`` is the dequantized float computation, bit for bit the fake-quant model).
            By default the adapter config's ``kernel_preference`` (``"auto"`` unless it says otherwise).  Recorded
            in the model's quantization config, so ``from_pretrained`` of the saved folder uses it too.
        inplace (`bool`, defaults to `True`): convert ``model`` itself, or (`False`) a deep copy.

    Returns:
        `torch.nn.Module`: the integer model (``model`` itself when ``inplace``; the base model of a ``PeftModel``).

    Raises:
        ValueError: there is nothing to export, several adapters are active, activation step sizes are not
            calibrated, a layer is merged or another (float) adapter is present.  The model is unchanged on error.
        NotImplementedError: asymmetric weights, or an adapter that quantizes attention (``quantize_attention=True``:
            the integer layers have no place for the q/k/v step sizes).

    Example:

    ```py
    >>> import diffusers_qalora as dq
    >>> unet = dq.get_qalora_model(unet, dq.QALoraConfig(weight_bits=4, act_bits=8))
    >>> dq.calibrate_activations(unet, lambda: pipe(prompt, num_inference_steps=20))
    >>> unet = dq.export_quantized(unet)
    >>> unet.save_pretrained("unet-w4a8")      # packed int4 codes + scales + timestep table + config.json
    >>> UNet2DConditionModel.from_pretrained("unet-w4a8")   # integer layers again, no extra argument
    ```
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    qalora_config = _adapter_config(base, adapter_name)
    previous = getattr(getattr(base, "config", None), "quantization_config", None)
    if kernel_preference is None:
        kernel_preference = qalora_config.kernel_preference if qalora_config is not None else KernelPreference.AUTO
    converted, layouts = convert_qalora_to_integer(
        base, adapter_name=adapter_name, kernel_preference=kernel_preference, inplace=inplace
    )
    if hasattr(converted, "register_to_config"):  # a diffusers ModelMixin
        layers = {name: layout.to_dict() for name, layout in layouts.items()}
        own = {"layers": layers, "kernel_preference": kernel_preference}
        if isinstance(previous, QALoraQuantConfig):
            config = QALoraQuantConfig(**{**previous.to_dict(), **own})
        elif qalora_config is not None:
            config = QALoraQuantConfig.from_qalora_config(qalora_config, **own)
        else:
            first = next(iter(layouts.values()))
            config = QALoraQuantConfig(weight_bits=first.weight_bits, act_bits=first.act_bits, special_bits=8, **own)
        mark_exported(converted, config)
    return converted
