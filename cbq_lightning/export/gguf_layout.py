"""How llama.cpp lays out each decoder family in a GGUF: architecture name, tensor names, value conventions and the
hyperparameter keys, as its ``convert_hf_to_gguf.py`` writes them.

Why here and not in the writer: the same conventions are what transformers' GGUF reader undoes on load
(``LlamaTensorProcessor``'s q/k row order, ``Gemma2TensorProcessor``'s ``norm - 1``), so the writer and the tests
(``tests/gguf_fixtures.py``, which writes tiny GGUFs the converter's way) must agree on one description:

* ``llama`` and ``mistral`` are both written as architecture ``llama`` (llama.cpp's ``LlamaModel`` converts both)
  with the q/k rows of each head interleaved: GGML's rope rotates adjacent pairs ``(2i, 2i+1)`` where transformers
  rotates ``(i, i + d/2)``;
* ``qwen2`` / ``qwen3``: no reordering;
* ``gemma3_text`` is written as ``gemma3``; Gemma computes ``x * (1 + w)`` in its RMS norms and llama.cpp stores
  ``1 + w``; a tied output is not written (llama.cpp reads ``token_embd`` for it).

Tensor names come from the ``gguf`` package's own map (``gguf.get_tensor_name_map``), the one the converter uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cbq_lightning.errors import ConfigError


@dataclass(frozen=True)
class GgufLayout:
    """llama.cpp's conventions for one transformers model type.

    Attributes:
        architecture: ``general.architecture``.
        permute_qk: reorder the q/k projection rows for GGML's rope (llama.cpp's ``LlamaModel.permute``).
        norm_offset: added to every norm weight (Gemma: 1).
    """

    architecture: str
    permute_qk: bool = False
    norm_offset: float = 0.0


#: the model types a GGUF export supports, by transformers model type
GGUF_LAYOUTS: dict[str, GgufLayout] = {
    "llama": GgufLayout("llama", permute_qk=True),
    "mistral": GgufLayout("llama", permute_qk=True),
    "qwen2": GgufLayout("qwen2"),
    "qwen3": GgufLayout("qwen3"),
    "gemma3_text": GgufLayout("gemma3", norm_offset=1.0),
}


def layout_for(model_type: str | None) -> GgufLayout:
    """The layout of ``model_type``, or a one-line :class:`ConfigError` naming the families that have one."""
    if model_type not in GGUF_LAYOUTS:
        raise ConfigError(
            f"a GGUF export of model type {model_type!r} is not supported yet (llama.cpp's layout is known here for "
            f"{', '.join(GGUF_LAYOUTS)}): export another format, or keep the fake-quant checkpoint."
        )
    return GGUF_LAYOUTS[model_type]


def _arch_enum(architecture: str) -> Any:
    import gguf

    return next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)


class TensorNamer:
    """Maps the checkpoint's tensor names (``model.layers.0.self_attn.q_proj.weight``) to llama.cpp's
    (``blk.0.attn_q.weight``) with the ``gguf`` package's table for the architecture."""

    def __init__(self, layout: GgufLayout, num_blocks: int) -> None:
        import gguf

        self.layout = layout
        self._map = gguf.get_tensor_name_map(_arch_enum(layout.architecture), num_blocks)

    def __call__(self, hf_name: str) -> str:
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = self._map.get_name(base)
        if gguf_base is None:
            raise ConfigError(f"tensor {hf_name} has no llama.cpp name in architecture {self.layout.architecture!r}.")
        return f"{gguf_base}.{suffix}"


def is_norm(gguf_name: str) -> bool:
    """Whether a llama.cpp tensor is a norm weight (``attn_norm``, ``attn_q_norm``, ``output_norm`` ...)."""
    return gguf_name.rpartition(".")[0].endswith("norm")


def qk_heads(gguf_name: str, config: dict) -> int | None:
    """The head count whose rows llama.cpp interleaves in ``gguf_name`` (q: attention heads, k: key/value heads),
    or None for every other tensor."""
    base = gguf_name.rpartition(".")[0]
    if base.endswith(".attn_q"):
        return int(config["num_attention_heads"])
    if base.endswith(".attn_k"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def rope_row_order(rows: int, heads: int) -> np.ndarray:
    """The permutation of a q/k weight's rows into llama.cpp's order: row ``order[i]`` of the checkpoint becomes row
    ``i``. Each head's first and second halves are interleaved (GGML's rope pairs adjacent dimensions)."""
    if rows % (2 * heads):
        raise ConfigError(f"a q/k projection of {rows} rows does not split into {heads} heads of an even width.")
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, 2, half).swapaxes(1, 2).reshape(rows)


def _rope_theta(config: dict) -> float | None:
    """The global rope base (Gemma 3 keeps one per attention type; llama.cpp writes the full-attention one)."""
    parameters = config.get("rope_parameters") or {}
    if "full_attention" in parameters:
        parameters = parameters["full_attention"]
    theta = parameters.get("rope_theta", config.get("rope_theta"))
    return None if theta is None else float(theta)


def write_hyperparameters(writer: Any, layout: GgufLayout, config: dict, vocab_size: int) -> None:
    """The ``{arch}.*`` keys llama.cpp's converter writes for the family, from the checkpoint's ``config.json``."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    theta = _rope_theta(config)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if head_dim != int(config["hidden_size"]) // heads or layout.architecture == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if layout.architecture == "llama":
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if layout.architecture == "gemma3" and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
