"""The fake-quant Hugging Face checkpoint: the model with dequantized weights, in safetensors.

It reloads with stock ``AutoModelForCausalLM.from_pretrained`` and computes exactly what the in-memory
quantized model computes (weight-only schemes), which makes it the research output every evaluator can
read. The integer state lives beside it in ``quant_state.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from cbq_lightning.io import atomic_directory
from cbq_lightning.quant.convert import quant_linears

SIDECAR = "cbq_quantization.json"
#: buffers of a finalised QuantLinear that are not part of a plain nn.Linear
_INTEGER_STATE = ("qweight", "scales", "zeros")


def fake_quant_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with the integer buffers dropped: a plain-``nn.Linear`` state dict."""
    integer_keys = {f"{name}.{field}" for name, _ in quant_linears(model) for field in _INTEGER_STATE}
    return {k: v for k, v in model.state_dict().items() if k not in integer_keys}


def save_fake_quant_checkpoint(model: nn.Module, tokenizer, directory: Path, quantization: dict) -> None:
    """Write ``directory`` (config, safetensors weights, tokenizer, sidecar) atomically."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, state_dict=fake_quant_state_dict(model), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json.dumps(quantization, indent=2) + "\n", encoding="utf-8")
