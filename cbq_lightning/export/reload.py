"""Reloading a packed export with stock transformers, on the path that computes what the file says.

``AutoModelForCausalLM.from_pretrained(OUT)`` reads the ``quantization_config`` by itself; two cases
need a loading override, which :func:`loading_kwargs` supplies (``cbq evaluate`` uses it):

* compressed-tensors with **asymmetric** weights: transformers 5.x's default (compressed) path cannot
  load a packed zero-point (its meta model expects the unpacked shape), so the weights are dequantized at
  load time instead (``CompressedTensorsConfig(dequantize=True)``) - which also skips the simulated
  activation quantization, so W4A8/W4A4 with asymmetric weights are evaluated weight-only (logged). The
  same holds for a quantized input embedding (``export.quantize_embedding``): the compressed path cannot build
  an embedding without its ``weight``.
* compressed-tensors of a **mixture of experts**: the experts are stored per expert (the names vLLM reads),
  and transformers 5 holds them as fused 3-D weights, which only its dequantize-at-load path assembles. That
  path passes no zero-points to the experts, so an asymmetric run's experts are stored symmetric with one bit
  more (:mod:`~cbq_lightning.export.compressed_tensors`); ``tests/test_moe.py`` reloads each family.
* GPTQ: gptqmodel's automatic CPU kernel choice for 4 bits computes in reduced precision
  (``aten._weight_int4pack_mm``); the plain torch kernel (``backend="torch"``) dequantizes to the
  float16 the scales are stored in and is the faithful reference.

After loading, :func:`release_offload` removes the module offloading that compressed-tensors puts on a model
it decompressed (``load_model`` calls it): transformers <= 5.17 dequantizes through
``ModelCompressor.decompress_model``, which wraps every module in an ``OffloadCache`` whose onload device is
where the weights were loaded (the CPU). ``model.to("cuda")`` then moves the stored tensors, but every access
copies them back to the CPU and the forward moves its inputs there: the model silently computes on the CPU
(the GPU suite's first run: ``next(model.parameters()).device`` was ``cpu`` after ``.to("cuda")``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from cbq_lightning.errors import ModelSourceError
from cbq_lightning.export import compressed_tensors
from cbq_lightning.models.families import has_experts

log = logging.getLogger("cbq_lightning")

#: packages transformers needs for each packed format, and the extra that installs them
_REQUIREMENTS = {
    "compressed-tensors": (("compressed_tensors",), "export"),
    "gptq": (("optimum", "gptqmodel"), "gptq"),
}


def _model_config(model_dir: Path) -> dict:
    """The ``config.json`` of a local checkpoint directory (empty without one)."""
    path = model_dir / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _require(method: str) -> None:
    import importlib.util

    modules, extra = _REQUIREMENTS[method]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelSourceError(
            f"loading a {method} checkpoint needs {', '.join(missing)}: pip install -e \".[{extra}]\" "
            "(or the packages themselves)."
        )


def loading_kwargs(model_dir: Path) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for a packed export in ``model_dir`` (empty for other checkpoints)."""
    model_config = _model_config(model_dir)
    config = model_config.get("quantization_config")
    method = (config or {}).get("quant_method")
    if method not in _REQUIREMENTS:
        return {}
    _require(method)
    if method == "gptq":
        from transformers import GPTQConfig

        return {"quantization_config": GPTQConfig(bits=int(config["bits"]), backend="torch")}
    groups = list(config.get("config_groups", {}).values())
    asymmetric = not all((group.get("weights") or {}).get("symmetric", True) for group in groups)
    embedding = any(compressed_tensors.EMBEDDING_TARGET in group.get("targets", []) for group in groups)
    experts = has_experts(model_config.get("model_type"))
    if not (asymmetric or embedding or experts):
        return {}
    if any(group.get("input_activations") for group in groups):
        log.warning(
            "%s has %s: transformers can only load it dequantized, which does not simulate its activation "
            "quantization; the model is evaluated weight-only.", model_dir,
            "asymmetric weights" if asymmetric else "a quantized embedding" if embedding else "fused experts",
        )
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def release_offload(model: nn.Module) -> nn.Module:
    """``model`` as plain modules: compressed-tensors' offloading removed, the tensors left where they are.

    A no-op for a model compressed-tensors never wrapped (not imported, or no module offloaded), so
    ``model.to(device)`` moves every weight afterwards (see the module docstring for why it may not before).
    """
    if "compressed_tensors" not in sys.modules:  # only its quantizer installs the offloading
        return model
    try:
        from compressed_tensors.offload import remove_dispatch
        from compressed_tensors.offload.cache.base import OffloadCache
    except ImportError:  # a release without module offloading
        return model
    if any(isinstance(module._parameters, OffloadCache) for module in model.modules()):
        remove_dispatch(model, onload_tensors=False)
    return model
