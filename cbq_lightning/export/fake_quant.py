"""The fake-quant Hugging Face checkpoint: the model with dequantized weights, in safetensors.

It reloads with stock ``AutoModelForCausalLM.from_pretrained`` and computes exactly what the in-memory
quantized model computes for weight-only schemes, which makes it the research output every evaluator can
read. The integer state lives beside it in ``quant_state.safetensors``; with activation quantization
that file also holds each layer's activation quantizer, which :func:`attach_activation_quantizers`
(``cbq evaluate`` on a run directory) puts back on the reloaded linears, and with a low-rank correction its
factors, which :func:`attach_corrections` puts back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cbq_lightning.export.quant_state import load_quant_state, load_quant_state_scheme
from cbq_lightning.io import atomic_directory
from cbq_lightning.models.adapter import replace_module
from cbq_lightning.quant.act_quantizer import ActivationQuantizer
from cbq_lightning.quant.convert import finalized_linears
from cbq_lightning.quant.correction import LowRankCorrection

SIDECAR = "cbq_quantization.json"
#: the checkpoint's folder in a ``cbq quantize`` output directory
MODEL_DIR = "model"
#: buffers of a FinalizedQuantLinear that are not part of a plain nn.Linear
INTEGER_STATE = ("qweight", "scales", "zeros", "mins", "super_scales", "super_mins")


def fake_quant_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without the integer buffers, activation quantizers and corrections: plain
    ``nn.Linear``s (the extras live in ``quant_state.safetensors``)."""
    integer_keys = {f"{name}.{field}" for name, _ in finalized_linears(model) for field in INTEGER_STATE}
    prefixes = tuple(
        f"{name}.{extra}." for name, layer in finalized_linears(model)
        for extra in ("act_quantizer", "correction") if getattr(layer, extra) is not None
    )
    return {k: v for k, v in model.state_dict().items() if k not in integer_keys and not k.startswith(prefixes)}


def attach_activation_quantizers(model: nn.Module, quant_state_path: Path) -> int:
    """Put the activation quantizers of a run back on the linears of its reloaded fake-quant model.

    Each linear named in ``quant_state.safetensors`` with activation fields gets a frozen
    :class:`ActivationQuantizer` (as its ``act_quantizer`` child) applied to its input by a forward
    pre-hook, so the reloaded model computes what the calibrated model computed. Returns the number of
    layers equipped; 0 for weight-only runs.
    """
    scheme = load_quant_state_scheme(quant_state_path)
    activations = scheme.get("activations")
    if not activations:
        return 0
    count = 0
    for name, fields in load_quant_state(quant_state_path).items():
        if "act_bits" not in fields:
            continue
        linear = model.get_submodule(name)
        quantizer = ActivationQuantizer.from_export_state(int(fields["act_bits"]), activations["mode"], fields)
        linear.add_module("act_quantizer", quantizer.to(linear.weight.device))
        linear.register_forward_pre_hook(_quantize_input)
        count += 1
    return count


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.act_quantizer(args[0]), *args[1:])


class CorrectedLinear(nn.Module):
    """A reloaded linear plus its low-rank correction: ``linear(x) + (x V) U^T``.

    The correction sees ``x`` as it enters, before the linear's own activation quantizer (a pre-hook on
    ``linear``), as in calibration.
    """

    def __init__(self, linear: nn.Module, correction: LowRankCorrection) -> None:
        super().__init__()
        self.linear = linear
        self.correction = correction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.correction(x)


def attach_corrections(model: nn.Module, quant_state_path: Path) -> int:
    """Wrap every linear with a low-rank correction in ``quant_state.safetensors`` as a :class:`CorrectedLinear`.

    Call after :func:`attach_activation_quantizers` (which finds the linears by name). Returns the number
    of layers wrapped; 0 for runs without a correction.
    """
    count = 0
    for name, fields in load_quant_state(quant_state_path).items():
        if "correction_u" not in fields:
            continue
        linear = model.get_submodule(name)
        u, v = fields["correction_u"], fields["correction_v"]
        correction = LowRankCorrection(u.shape[0], v.shape[0], u.shape[1])
        with torch.no_grad():
            correction.u.copy_(u)
            correction.v.copy_(v)
        correction.requires_grad_(False)
        corrected = CorrectedLinear(linear, correction.to(device=linear.weight.device, dtype=linear.weight.dtype))
        replace_module(model, name, corrected)  # an online rotation moves to the wrapper: both terms see it
        count += 1
    return count


def save_fake_quant_checkpoint(model: nn.Module, tokenizer, directory: Path, quantization: dict) -> None:
    """Write ``directory`` (config, safetensors weights, tokenizer, sidecar) atomically."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, state_dict=fake_quant_state_dict(model), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json.dumps(quantization, indent=2) + "\n", encoding="utf-8")
