"""Which GGML type each weight of a model gets under one of llama.cpp's mixes (``quant.scheme: Q4_K_M`` ...).

Why a module between the model and :mod:`cbq_lightning.quant.ggml_mix`: the mix's rules speak llama.cpp's tensor
names and row lengths, the run speaks the checkpoint's. The plan is made twice from the same rules - before
calibration (each block linear is calibrated on the type the file will store) and at export (the embedding and the
output head, which CBQ does not calibrate, are stored in their planned types; the block linears are checked against
it) - so a run and its GGUF cannot disagree, and both sides of a comparison with ``llama-quantize`` store the same
type per tensor. Where a row is not a multiple of the planned type's block, llama.cpp falls back to another type
(SmolLM2's 576-wide rows: ``Q4_K`` -> ``Q5_0``, ``Q6_K`` -> ``Q8_0``); the plan says which, for the log and the
export summary.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.export.gguf_layout import TensorNamer, layout_for
from cbq_lightning.models.families import checkpoint_name
from cbq_lightning.quant.convert import all_block_linears
from cbq_lightning.quant.ggml_mix import MixModel, TensorType, assign_types
from cbq_lightning.quant.ggml_types import GGML_TYPES

if TYPE_CHECKING:
    from cbq_lightning.models.adapter import DecoderAdapter
    from cbq_lightning.quant.scheme import QuantScheme

log = logging.getLogger("cbq_lightning")

#: the checkpoint names of the embedding and an untied output head (every family a GGUF export supports)
EMBEDDING = "model.embed_tokens.weight"
OUTPUT_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class GgufPlan:
    """The mix's type for every weight llama.cpp quantizes, keyed by checkpoint name (``model.layers.0...weight``).

    Attributes:
        mix: the llama.cpp mix (``Q4_K_M``).
        types: checkpoint name -> :class:`TensorType` (llama.cpp's name, the type the mix wanted, the type stored).
    """

    mix: str
    types: dict[str, TensorType]

    def stored(self, checkpoint_name: str) -> str:
        """The type the file stores for ``checkpoint_name``."""
        if checkpoint_name not in self.types:
            raise ConfigError(f"tensor {checkpoint_name} is not one llama.cpp quantizes under {self.mix}.")
        return self.types[checkpoint_name].stored

    def fallbacks(self) -> list[dict[str, str]]:
        """The tensors stored in another type than the mix wanted (rows not a multiple of its block), in llama.cpp's
        name order (block by block), whatever order the weights were listed in."""
        chosen = sorted((t for t in self.types.values() if t.fallback), key=lambda t: _natural(t.name))
        return [{"tensor": t.name, "wanted": t.wanted, "stored": t.stored} for t in chosen]

    def counts(self) -> dict[str, int]:
        """How many tensors each stored type holds."""
        return dict(sorted(Counter(t.stored for t in self.types.values()).items()))

    def summary(self) -> dict[str, Any]:
        """What the report and the export summary say of the plan."""
        return {"mix": self.mix, "stored_types": self.counts(), "fallbacks": self.fallbacks()}

    def block_schemes(self, adapter: DecoderAdapter, scheme: QuantScheme) -> dict[str, QuantScheme]:
        """Each block linear's scheme under the mix (``blocks.<i>.<name>`` -> ``scheme`` on its stored GGML type):
        what the run calibrates each layer on, so the file stores exactly what was trained."""
        schemes = {}
        for name, _ in all_block_linears(adapter.blocks):
            _, index, layer = name.split(".", 2)
            key = checkpoint_name(adapter.model_type, f"{adapter.family.blocks}.{index}.{layer}.weight")
            schemes[name] = scheme.with_ggml_type(self.stored(key))
        return schemes

    def log(self) -> None:
        fallbacks = self.fallbacks()
        wanted = Counter(f"{f['wanted']} -> {f['stored']}" for f in fallbacks)
        log.info("gguf mix %s: %s per stored type%s", self.mix, self.counts(),
                 f"; {len(fallbacks)} tensors fall back as llama.cpp does (rows not a multiple of the type's block: "
                 f"{dict(wanted)})" if fallbacks else "")


def _natural(name: str) -> list[Any]:
    """``blk.10.x`` after ``blk.9.x``: numbers compared as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def mix_model(config: dict[str, Any]) -> MixModel:
    """The model facts the mix's rules read, from a transformers ``config.json`` mapping."""
    layout = layout_for(config.get("model_type"))
    heads = int(config["num_attention_heads"])
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    return MixModel(
        architecture=layout.architecture,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        num_experts=int(experts),
        tied_embeddings=bool(config.get("tie_word_embeddings")),
    )


def plan_types(mix: str, config: dict[str, Any], shapes: Iterable[tuple[str, tuple[int, ...]]]) -> GgufPlan:
    """The plan for the weights ``shapes`` (checkpoint name, shape) of a model with ``config``.

    Only 2-D weights are planned (norms and biases stay in floating point); a tied ``lm_head.weight`` is not a
    tensor of the file. A weight whose row fits no GGML type (llama.cpp would keep it in F16) is refused: CBQ
    would have nothing to calibrate it on.
    """
    layout = layout_for(config.get("model_type"))
    namer = TensorNamer(layout, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings"))
    names: dict[str, str] = {}
    rows: list[tuple[str, int]] = []
    for key, shape in shapes:
        if len(shape) != 2 or not key.endswith(".weight") or (tied and key == OUTPUT_HEAD):
            continue
        gguf_name = namer(key)
        names[gguf_name] = key
        rows.append((gguf_name, int(shape[1])))
    types = assign_types(mix, mix_model(config), rows)
    plan = {names[name]: choice for name, choice in types.items()}
    for key, choice in plan.items():
        if choice.stored not in GGML_TYPES:
            raise ConfigError(
                f"{key} ({choice.name}) has rows llama.cpp cannot store in any block type ({choice.stored} under "
                f"{mix}): this model has no {mix} GGUF form; use a W<bits>A16 scheme."
            )
    return GgufPlan(mix=mix, types=plan)


def plan_for_model(mix: str | None, model: nn.Module, adapter: DecoderAdapter) -> GgufPlan | None:
    """With a llama.cpp mix (``quant.scheme: Q4_K_M`` ...): the GGML type llama.cpp would store for each weight of
    ``model``, logged with its fallbacks; None for any other scheme."""
    if mix is None:
        return None
    shapes = [(checkpoint_name(adapter.model_type, name), tuple(p.shape)) for name, p in model.named_parameters()]
    plan = plan_types(mix, model.config.to_dict(), shapes)
    plan.log()
    return plan
