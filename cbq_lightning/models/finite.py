"""Refuse a model whose weights hold NaN or infinity, right after it is loaded.

Why: one non-finite weight makes every forward pass non-finite. Left in, the full-precision evaluation reports
"perplexity is nan", every calibration window diverges and falls back to round-to-nearest, and only the final
write refuses the non-finite scales - blaming the learning rates, after all the work. The input is what is
broken, so that is what the message says, before any evaluation or calibration, naming the tensor and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cbq_lightning.errors import ModelSourceError

#: elements checked at a time: bounds the temporary mask of a large embedding
_CHUNK = 1 << 24


def _non_finite_count(tensor: torch.Tensor) -> int:
    """How many elements of ``tensor`` are NaN or +-inf (0 for integer and meta tensors)."""
    if not tensor.is_floating_point() or tensor.is_meta:
        return 0
    flat = tensor.detach().reshape(-1)
    return sum(int((~torch.isfinite(chunk)).sum()) for chunk in flat.split(_CHUNK))


def _kinds(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1)
    kinds = [kind for kind, present in (("NaN", bool(torch.isnan(flat).any())), ("inf", bool(torch.isinf(flat).any())))
             if present]
    return " and ".join(kinds)


def weight_file(source: str, name: str) -> str:
    """The file of checkpoint folder ``source`` that stores parameter ``name``, or ``source`` when it is unknown
    (a hub id, a GGUF, a tied weight stored under another name)."""
    folder = Path(source)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            shard = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).get(name)
            return str(folder / shard) if shard else source
    except (OSError, ValueError):
        return source
    single = [path for path in (folder / "model.safetensors", folder / "pytorch_model.bin") if path.is_file()]
    return str(single[0]) if len(single) == 1 else source


def check_finite_parameters(model: nn.Module, source: str) -> None:
    """Raise :class:`ModelSourceError` naming the first parameter of ``model`` (loaded from ``source``) that
    holds a non-finite value; a model whose weights are all finite passes unchanged."""
    for name, parameter in model.named_parameters():
        count = _non_finite_count(parameter)
        if count:
            raise ModelSourceError(
                f"model weight {name} in {weight_file(source, name)} holds {count} non-finite value(s) "
                f"({_kinds(parameter)}) of {parameter.numel()}: the checkpoint is damaged or was saved from a "
                "diverged training, and no quantization can fix it; load an intact copy (download or save it again)."
            )
