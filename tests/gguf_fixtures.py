"""Tiny GGUF files of each decoder family, written the way llama.cpp's ``convert_hf_to_gguf.py`` writes real ones.

Why: a GGUF reaches cbq-lightning through transformers' GGUF reader, which undoes llama.cpp's conventions:
its tensor names (``blk.N.attn_q.weight``), the q/k row order of llama-style attention (GGML's rope pairs
adjacent dimensions, transformers' pairs ``i`` with ``i + d/2``), Gemma's norms stored as ``1 + weight``,
Phi-3's fused ``attn_qkv`` and ``[gate; up]`` ``ffn_up``, Gemma's tied output, and a tokenizer stored as
metadata. A fixture that skipped one of these would pass against a reader that ignores it too, so each is
applied here to a tiny random model's state dict and the tests demand the loaded model's logits equal the
source model's (float32 tensors, so the tolerance is tight).

Families transformers 5.25 cannot read back from a GGUF (``olmo2``, ``granite``: its GGUF reader has no config
mapping for them) are still written, so that the test of cbq-lightning's refusal runs on a file as llama.cpp
would write it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_model

#: the tiny shape of every family unless it says otherwise (2 blocks: one CBQ window of the tiny recipe)
_SHAPE = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@dataclass(frozen=True)
class GgufFamily:
    """How llama.cpp writes one family.

    Attributes:
        model_type: the transformers model type of the source model, and the one the GGUF must load as.
        architecture: llama.cpp's ``general.architecture`` for it.
        tokenizer: ``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE, with merges) or ``llama`` (sentencepiece,
            scores and byte tokens, no merges), as the family's real checkpoints carry.
        pre: ``tokenizer.ggml.pre``, llama.cpp's name for the pre-tokenizer's split.
        permute_qk: llama.cpp reorders the q/k rows for GGML's rope (its ``LlamaModel`` and subclasses).
        norm_offset: added to every ``*norm.weight`` (Gemma computes ``x * (1 + w)``; llama.cpp stores ``1 + w``).
        shape: the tiny model's shape.
        readable: whether transformers 5.25's GGUF reader can load this architecture at all.
    """

    model_type: str
    architecture: str
    tokenizer: str = "gpt2"
    pre: str = "default"
    permute_qk: bool = False
    norm_offset: float = 0.0
    shape: TinyModelConfig = field(default_factory=lambda: _SHAPE)
    readable: bool = True


GGUF_FAMILIES: dict[str, GgufFamily] = {
    family.model_type: family
    for family in (
        GgufFamily("llama", "llama", pre="llama-bpe", permute_qk=True),
        GgufFamily("qwen2", "qwen2", pre="qwen2"),
        # transformers' GGUF reader takes no head width for qwen3 (no `attention.key_length` in its mapping),
        # so it builds Qwen3Config's default of 128, which every released Qwen3 has: the tiny one has it too
        GgufFamily("qwen3", "qwen3", pre="qwen2",
                   shape=TinyModelConfig(hidden_size=256, num_layers=2, num_heads=2, num_kv_heads=1,
                                         intermediate_size=128)),
        # Gemma ties its output to the embedding: llama.cpp writes no `output.weight` for it
        GgufFamily("gemma2", "gemma2", tokenizer="llama", norm_offset=1.0,
                   shape=TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=128, tie_embeddings=True)),
        # every Gemma 3 text model (270M, 1B) is written as `gemma3`, the same name as the multimodal one's text part
        GgufFamily("gemma3_text", "gemma3", tokenizer="llama", norm_offset=1.0,
                   shape=TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=128, tie_embeddings=True)),
        GgufFamily("phi3", "phi3", tokenizer="llama"),
        # llama.cpp writes these, transformers 5.25 cannot read them (no `olmo2` / `granite` entry in its GGUF
        # config mapping): cbq-lightning refuses them before transformers would, naming the HF checkpoint as the fix
        GgufFamily("olmo2", "olmo2", pre="dbrx", readable=False),
        GgufFamily("granite", "granite", pre="refact", permute_qk=True, readable=False),
    )
}

#: the families whose tiny GGUF loads and quantizes
READABLE_FAMILIES = tuple(name for name, family in GGUF_FAMILIES.items() if family.readable)
#: the families llama.cpp writes but transformers cannot read back
UNREADABLE_FAMILIES = tuple(name for name, family in GGUF_FAMILIES.items() if not family.readable)


# --- tokenizers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vocabulary:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] | None
    bos: int
    eos: int
    unk: int | None
    pad: int
    add_bos: bool


def _byte_level_vocabulary() -> _Vocabulary:
    """GPT-2 style: the 256 byte symbols, a few merges (each merge's result is a token) and ``<|endoftext|>``."""
    from gguf import TokenType
    from tokenizers import pre_tokenizers

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n")]
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(pair) for pair in merges] + ["<|endoftext|>"]
    eos = len(tokens) - 1
    types = [TokenType.NORMAL] * eos + [TokenType.CONTROL]
    return _Vocabulary(tokens, [0.0] * len(tokens), [int(t) for t in types], [" ".join(pair) for pair in merges],
                       bos=eos, eos=eos, unk=None, pad=eos, add_bos=False)


def _sentencepiece_vocabulary(gemma: bool) -> _Vocabulary:
    """Sentencepiece style: control tokens, the 256 ``<0xNN>`` byte-fallback tokens, single characters (``▁`` for a
    space) and a few longer pieces, with decreasing scores (transformers rebuilds the merges from them)."""
    from gguf import TokenType

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] if gemma else ["<unk>", "<s>", "</s>"]
    characters = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    pieces = ["▁t", "he", "▁the", "in", "an", "er", "▁a", "on", "▁th"]
    tokens = specials + [f"<0x{byte:02X}>" for byte in range(256)] + characters + pieces
    types = [TokenType.UNKNOWN if token == "<unk>" else TokenType.CONTROL for token in specials]
    types += [TokenType.BYTE] * 256 + [TokenType.NORMAL] * (len(characters) + len(pieces))
    scores = [0.0] * (len(specials) + 256) + [-float(index) for index in range(len(characters) + len(pieces))]
    ids = {token: index for index, token in enumerate(specials)}
    if gemma:
        return _Vocabulary(tokens, scores, [int(t) for t in types], None, bos=ids["<bos>"], eos=ids["<eos>"],
                           unk=ids["<unk>"], pad=ids["<pad>"], add_bos=True)
    return _Vocabulary(tokens, scores, [int(t) for t in types], None, bos=ids["<s>"], eos=ids["</s>"],
                       unk=ids["<unk>"], pad=ids["</s>"], add_bos=False)


def _vocabulary(family: GgufFamily) -> _Vocabulary:
    if family.tokenizer == "gpt2":
        return _byte_level_vocabulary()
    return _sentencepiece_vocabulary(gemma=family.model_type.startswith("gemma"))


def tiny_vocab_size(model_type: str) -> int:
    """The vocabulary size of ``model_type``'s tiny GGUF (its tokenizer's, which the model's embedding matches)."""
    return len(_vocabulary(GGUF_FAMILIES[model_type]).tokens)


# --- weights ------------------------------------------------------------------------------------------------


def _gguf_row_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows in llama.cpp's order: GGML's rope rotates adjacent pairs ``(2i, 2i+1)`` of each head where
    transformers rotates ``(i, i + d/2)``, so each head's two halves are interleaved."""
    rows = weight.shape[0]
    per_half = rows // heads // 2
    return weight.reshape(heads, 2, per_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config) -> float:
    """The global rope base (Gemma 3 keeps one per attention type; llama.cpp writes the full-attention one)."""
    parameters = config.rope_parameters
    if "full_attention" in parameters:
        parameters = parameters["full_attention"]
    return float(parameters["rope_theta"])


def _write_hyperparameters(writer, family: GgufFamily, config, vocab_size: int) -> None:
    """The ``{arch}.*`` keys llama.cpp's converter writes for the family."""
    import gguf

    head_dim = config.hidden_size // config.num_attention_heads if family.model_type == "phi3" else config.head_dim
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if family.architecture in ("llama", "granite"):
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if family.architecture in ("gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    if family.architecture == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if family.architecture == "phi3":
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    if family.architecture == "granite":
        writer.add_attention_scale(config.attention_multiplier)
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_logit_scale(config.logits_scaling)


def _write_tokenizer(writer, family: GgufFamily, vocabulary: _Vocabulary) -> None:
    writer.add_tokenizer_model(family.tokenizer)
    writer.add_tokenizer_pre(family.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    if vocabulary.merges is not None:
        writer.add_token_merges(vocabulary.merges)
    writer.add_bos_token_id(vocabulary.bos)
    writer.add_eos_token_id(vocabulary.eos)
    if vocabulary.unk is not None:
        writer.add_unk_token_id(vocabulary.unk)
    writer.add_pad_token_id(vocabulary.pad)
    writer.add_add_bos_token(vocabulary.add_bos)


def _gguf_tensors(family: GgufFamily, model: nn.Module) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, with its value and layout conventions applied."""
    import gguf

    config = model.config
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == family.architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors: dict[str, np.ndarray] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied output is the embedding; llama.cpp writes it once
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = names.get_name(base)
        if gguf_base is None:
            raise ValueError(f"no llama.cpp name for {hf_name} of {family.model_type}")
        weight = tensor.detach().to(torch.float32).numpy().copy()
        if family.permute_qk and gguf_base.endswith(".attn_q"):
            weight = _gguf_row_order(weight, config.num_attention_heads)
        elif family.permute_qk and gguf_base.endswith(".attn_k"):
            weight = _gguf_row_order(weight, config.num_key_value_heads)
        if family.norm_offset and gguf_base.endswith("norm"):
            weight = weight + np.float32(family.norm_offset)
        tensors[f"{gguf_base}.{suffix}"] = np.ascontiguousarray(weight, dtype=np.float32)
    return tensors


def _vision_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A token vision tower and projector under llama.cpp's multimodal names (``v.*``, ``mm.*``)."""
    return {
        "v.patch_embd.weight": rng.standard_normal((8, 3, 2, 2), dtype=np.float32),
        "v.blk.0.attn_q.weight": rng.standard_normal((8, 8), dtype=np.float32),
        "mm.input_projection.weight": rng.standard_normal((8, 64), dtype=np.float32),
    }


def write_tiny_gguf(model_type: str, path: Path, *, seed: int = 0,
                    with_vision_tower: bool = False) -> tuple[Path, nn.Module]:
    """Write a tiny random ``model_type`` model to ``path`` as llama.cpp would (float32) and return the path and the
    source model (eval mode), whose logits the loaded GGUF must reproduce.

    ``with_vision_tower`` adds vision-tower tensors to the file, as a multimodal GGUF holds them.
    """
    import gguf

    family = GGUF_FAMILIES[model_type]
    vocabulary = _vocabulary(family)
    model = build_tiny_model(model_type, family.shape, vocab_size=len(vocabulary.tokens), seed=seed).eval()
    writer = gguf.GGUFWriter(str(path), family.architecture)
    writer.add_name(f"tiny-{model_type}")
    _write_hyperparameters(writer, family, model.config, len(vocabulary.tokens))
    _write_tokenizer(writer, family, vocabulary)
    tensors = _gguf_tensors(family, model)
    if with_vision_tower:
        tensors.update(_vision_tensors(np.random.default_rng(seed)))
    _write_out(writer, tensors)
    return path, model


def write_raw_gguf(path: Path, architecture: str, tensors: dict[str, np.ndarray],
                   metadata: dict[str, int | bool] | None = None) -> Path:
    """A GGUF with only ``tensors`` and integer/boolean ``metadata`` keys: files that are refused before their
    weights matter (a multimodal projector, a mixture of experts under ``llama``)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, value)
    _write_out(writer, tensors)
    return path


def _write_out(writer, tensors: dict[str, np.ndarray]) -> None:  # noqa: ANN001 - a gguf.GGUFWriter
    """Add ``tensors`` and write the file in the order GGUFWriter requires (header, metadata, tensors)."""
    for name, weight in tensors.items():
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
