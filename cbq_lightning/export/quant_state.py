"""``quant_state.safetensors``: integer codes, scales, zero-points, bits and group size of every layer.

Layout, per quantized linear ``NAME`` (its module path in the model, e.g. ``model.layers.0.self_attn.q_proj``):

* ``NAME.qweight`` uint8 ``[out, in]`` - integer codes in ``[0, 2**bits - 1]`` (one per byte, unpacked)
* ``NAME.scales`` float32 ``[out, in / group]``
* ``NAME.zeros`` uint8 ``[out, in / group]`` - zero-points (``2**(bits-1)`` when symmetric)
* on a GGML ``_1`` grid (``Q4_1``, ``Q5_1``): ``NAME.mins`` float32 ``[out, in / group]`` - per-block minimums
  (float16 values); the zero-points are then 0 and the weight is ``scales * qweight + mins``
* on a GGML K-quant grid (``Q2_K`` ... ``Q6_K``): ``NAME.super_scales`` (and, with a minimum, ``NAME.super_mins``)
  float32 ``[out, in / 256]`` - the float16 ``d`` (``dmin``) of each super-block; ``scales`` (``-mins``) are integer
  multiples of them
* on any GGML grid: ``NAME.ggml_type`` int32 - the block type, as ``gguf.GGMLQuantizationType``'s number (a llama.cpp
  mix gives layers different types)
* ``NAME.bits``, ``NAME.group_size`` int32 scalars (group_size = in_features when per-channel)
* with activation quantization: ``NAME.act_bits`` int32 and either ``NAME.act_clip_upper`` /
  ``NAME.act_clip_lower`` float32 scalars (dynamic per-token modes: the clipping ratios of ``max|x|``)
  or ``NAME.act_step`` (static mode: the step size); the mode is in the scheme metadata
  (``scheme.activations.mode``)
* with a low-rank correction (``extensions.correction.rank``): ``NAME.correction_u`` float32 ``[out, r]`` and
  ``NAME.correction_v`` float32 ``[in, r]``; the layer computes ``Q(W) Q(x) + (x V) U^T`` on its
  unquantized input ``x``

The dequantized weight is ``scales[:, j] * (qweight[:, j*g:(j+1)*g] - zeros[:, j])`` (with ``mins``:
``scales[:, j] * qweight[:, j*g:(j+1)*g] + mins[:, j]``). The file metadata
holds ``format = cbq-quant-state``, its version and the scheme as JSON. The packed export formats are
built from this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from cbq_lightning.errors import TrainingError
from cbq_lightning.io import atomic_write_safetensors
from cbq_lightning.quant.convert import finalized_linears, quant_linears
from cbq_lightning.quant.ggml_types import ggml_type_id
from cbq_lightning.quant.weight_quantizer import WeightQuantizer

FORMAT = "cbq-quant-state"
#: its name in a ``cbq quantize`` output directory
QUANT_STATE_FILE = "quant_state.safetensors"
VERSION = "1"


def collect_quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of every finalised quantized linear of ``model``."""
    calibrating = [name for name, _ in quant_linears(model)]
    if calibrating:
        raise RuntimeError(f"layer {calibrating[0]} is not finalised; finalise every window before saving")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in finalized_linears(model):
        if not (torch.isfinite(layer.scales).all() and torch.isfinite(layer.weight).all()):
            raise TrainingError(
                f"layer {name} has non-finite scales or weights: refusing to write them. The divergence guard "
                "(advanced.guard.*) should have caught this; rerun with advanced.guard.fallback=rtn or lower learning rates."
            )
        tensors[f"{name}.qweight"] = layer.qweight.contiguous().cpu()
        tensors[f"{name}.scales"] = layer.scales.contiguous().cpu()
        tensors[f"{name}.zeros"] = layer.zeros.contiguous().cpu()
        if layer.mins is not None:
            tensors[f"{name}.mins"] = layer.mins.contiguous().cpu()
        if layer.super_scales is not None:
            tensors[f"{name}.super_scales"] = layer.super_scales.contiguous().cpu()
        if layer.super_mins is not None:
            tensors[f"{name}.super_mins"] = layer.super_mins.contiguous().cpu()
        if layer.ggml_type is not None:
            tensors[f"{name}.ggml_type"] = torch.tensor(ggml_type_id(layer.ggml_type), dtype=torch.int32)
        tensors[f"{name}.bits"] = torch.tensor(layer.bits, dtype=torch.int32)
        tensors[f"{name}.group_size"] = torch.tensor(layer.group_size or layer.in_features, dtype=torch.int32)
        if layer.act_quantizer is not None:
            tensors[f"{name}.act_bits"] = torch.tensor(layer.act_quantizer.bits, dtype=torch.int32)
            for field, value in layer.act_quantizer.export_state().items():
                tensors[f"{name}.{field}"] = value.contiguous().cpu()
        if layer.correction is not None:
            tensors[f"{name}.correction_u"] = layer.correction.u.detach().float().contiguous().cpu()
            tensors[f"{name}.correction_v"] = layer.correction.v.detach().float().contiguous().cpu()
    return tensors


def save_quant_state(model: nn.Module, path: Path, scheme: dict) -> None:
    """Write the quantization state atomically."""
    tensors = collect_quant_state(model)
    metadata = {"format": FORMAT, "version": VERSION, "scheme": json.dumps(scheme)}
    atomic_write_safetensors(path, tensors, metadata)


def load_quant_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer_name: {"qweight", "scales", "zeros", ["mins"], "bits", "group_size", ["act_*"]}}`` (safetensors: no
    pickle)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, field = key.rpartition(".")
        layers.setdefault(name, {})[field] = tensor
    return layers


def dequantize(layer: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight a layer of the quantization state stands for, ``[out, in]`` float32."""
    q = layer["qweight"].float()
    group = int(layer["group_size"])
    out_features, in_features = q.shape
    grouped = q.reshape(out_features, in_features // group, group)
    mins = layer["mins"].unsqueeze(-1) if "mins" in layer else None
    weight = WeightQuantizer.dequantize_codes(
        grouped, layer["scales"].unsqueeze(-1), layer["zeros"].float().unsqueeze(-1), mins
    )
    return weight.reshape(out_features, in_features)


def load_quant_state_scheme(path: Path) -> dict:
    """The scheme recorded in the file's metadata (bits, group size, activations ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={metadata.get('format')!r}).")
    return json.loads(metadata["scheme"])
