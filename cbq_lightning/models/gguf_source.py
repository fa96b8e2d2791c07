"""Which model a GGUF file holds, decided by what the file holds and not by its architecture name alone.

Why: llama.cpp's converter names architectures its own way, and one name can cover several models.
``gemma3`` is every Gemma 3 text model (270M, 1B) and also the text part of the multimodal Gemma 3; ``llama``
is Llama, Mistral and, with expert tensors, Mixtral. transformers' GGUF reader maps the names to model types
(``gemma3`` -> ``gemma3_text``, ``qwen2moe`` -> ``qwen2_moe``), loads only some architectures at all, and loads a
Mixtral file as a dense llama with its experts left out. Comparing ``general.architecture`` with
cbq-lightning's model types refused a plain Gemma 3 text GGUF that transformers reads fine; this module decides
from the tensors and metadata instead, before any weight is read, and says in one line what to do when a file
cannot be used.
"""

from __future__ import annotations

from pathlib import Path

from cbq_lightning.errors import ModelSourceError
from cbq_lightning.files import GgufHeader
from cbq_lightning.models.families import SUPPORTED_MODEL_TYPES

#: llama.cpp's ``general.architecture`` -> the transformers model type its GGUF reader builds from such a file
GGUF_MODEL_TYPES: dict[str, str] = {
    # llama.cpp writes `llama` for Mistral models too; transformers reads them as llama, whose blocks they share
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    # the text model (Gemma3ForCausalLM): a file that also holds the vision tower is refused below
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    # llama.cpp writes these two, but transformers 5.25's GGUF reader has no entry for them (refused below)
    "olmo2": "olmo2",
    "granite": "granite",
}

#: llama.cpp's names for a vision or audio encoder and its projector (``v.blk.0.attn_q``, ``mm.input_projection``)
_MULTIMODAL_TENSOR_PREFIXES = ("v.", "mm.", "a.", "resampler.")
#: the metadata of such an encoder (clip.cpp's ``clip.has_vision_encoder``, ``clip.vision.image_size``...)
_MULTIMODAL_KEY_PREFIX = "clip."
#: the architecture llama.cpp gives a multimodal projector file (``mmproj-*.gguf``)
_PROJECTOR_ARCHITECTURE = "clip"
#: a tensor of stacked experts (``blk.0.ffn_gate_exps.weight``): a mixture of experts
_EXPERT_TENSOR_MARK = "_exps."


def gguf_model_type(path: Path, header: GgufHeader) -> str:
    """The model type the GGUF at ``path`` loads as, or a :class:`ModelSourceError` naming why not and the fix."""
    architecture = header.architecture
    if architecture == _PROJECTOR_ARCHITECTURE:
        raise ModelSourceError(
            f"{path.name} is a multimodal projector (llama.cpp's mmproj file: a vision or audio encoder), not a "
            "language model: give the GGUF of the text model it belongs to."
        )
    multimodal = [name for name in header.tensor_names if name.startswith(_MULTIMODAL_TENSOR_PREFIXES)]
    multimodal += [key for key in header.keys if key.startswith(_MULTIMODAL_KEY_PREFIX)]
    if multimodal:
        raise ModelSourceError(
            f"{path.name} holds a vision or audio encoder ({multimodal[0]}, {len(multimodal)} such entries) beside "
            f"its {architecture!r} text model, and cbq-lightning quantizes text models only: give a text-only GGUF "
            "(llama.cpp's convert_hf_to_gguf.py writes the encoder to a separate file with --mmproj) or the Hugging "
            "Face checkpoint."
        )
    model_type = GGUF_MODEL_TYPES.get(architecture)
    if model_type is None or model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"{path.name} holds a {architecture!r} model, which cbq-lightning does not support: use a GGUF of "
            f"architecture {', '.join(_readable_architectures())} or a checkpoint of one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    if architecture == "llama" and any(_EXPERT_TENSOR_MARK in name for name in header.tensor_names):
        raise ModelSourceError(
            f"{path.name} holds a mixture of experts (Mixtral-style) under architecture 'llama', which transformers' "
            "GGUF reader loads as a dense llama without its experts: quantize the Hugging Face checkpoint "
            "(model type mixtral) instead."
        )
    if not transformers_reads_gguf(architecture):
        import transformers

        raise ModelSourceError(
            f"{path.name} holds a {architecture!r} model, which transformers {transformers.__version__} cannot read "
            f"from a GGUF (its GGUF reader has no {architecture!r} entry): quantize the Hugging Face checkpoint "
            f"(model type {model_type}) instead."
        )
    return model_type


def transformers_reads_gguf(architecture: str) -> bool:
    """Whether the installed transformers' GGUF reader has an entry for ``architecture``.

    Asked of transformers itself (its tables of GGUF architectures), so a release that adds one is used without
    a change here; a transformers whose tables moved is trusted, and its own error names the architecture.
    """
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return True
    readable = set(GGUF_SUPPORTED_ARCHITECTURES)
    try:  # the newer reader of some architectures (transformers >= 5.2x), beside the table above
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        readable |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    # transformers renames some architectures to model types first (`qwen2moe` -> `qwen2_moe`)
    return architecture in readable or GGUF_MODEL_TYPES.get(architecture) in readable


def _readable_architectures() -> list[str]:
    """The GGUF architectures cbq-lightning loads with the installed transformers."""
    return [architecture for architecture, model_type in GGUF_MODEL_TYPES.items()
            if model_type in SUPPORTED_MODEL_TYPES and transformers_reads_gguf(architecture)]
