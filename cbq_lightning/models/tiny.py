"""Tiny randomly initialised decoders of every supported family and a byte-level tokenizer, built offline.

Used by the tests and the ``tiny`` recipe: the whole pipeline (capture, windows, training, export,
reload with transformers) runs on them in seconds on a CPU, with no download. ``tiny-llama`` is the
default; ``tiny-<model type>`` (``tiny-gemma2``, ``tiny-opt``...) builds the same shape in another family
from transformers' own config class, so each family's real modelling code runs.

The shape is part of the name, not of the user's configuration (a test model is not something a user tunes):
``tiny-llama`` is :class:`TinyModelConfig`'s default shape, and ``tiny-llama:num_layers=2,tie_embeddings=true``
changes the keys named after the colon. A name therefore identifies its model completely (with the seed), which is
what the full-precision reference cache keys on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from cbq_lightning.errors import ConfigError
from cbq_lightning.models.families import family_for

TINY_MODEL_NAME = "tiny-llama"
#: ``tiny-<model type>`` names a tiny model of that family
TINY_PREFIX = "tiny-"
#: ``tiny-<model type>:key=value,...`` sets shape keys of :class:`TinyModelConfig`
SHAPE_SEPARATOR = ":"
EOS_TOKEN = "<|endoftext|>"


@dataclass
class TinyModelConfig:
    """Shape of the tiny model: the defaults, or the keys a ``tiny-<model type>:key=value,...`` name sets."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    init_std: float = 0.02
    #: share the input embedding with ``lm_head`` (as SmolLM2, Gemma and Qwen2-0.5B do)
    tie_embeddings: bool = False
    #: mixture-of-experts types only (qwen2_moe, qwen3_moe, mixtral): experts per block, and per token
    num_experts: int = 4
    experts_per_token: int = 2

    def __post_init__(self) -> None:
        # transformers would refuse (or crash on) these shapes only when the model is built
        sizes = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "num_heads": self.num_heads,
                 "num_kv_heads": self.num_kv_heads, "intermediate_size": self.intermediate_size,
                 "num_experts": self.num_experts, "experts_per_token": self.experts_per_token}
        for name, value in sizes.items():
            if value < 1:
                raise ConfigError(f"tiny model shape: {name}={value} must be >= 1.")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"tiny model shape: hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads of an "
                "even size (rotary embeddings pair the dimensions), e.g. hidden_size 64 with 4 heads."
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"tiny model shape: num_heads={self.num_heads} must be a multiple of num_kv_heads="
                              f"{self.num_kv_heads} (grouped-query attention).")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"tiny model shape: experts_per_token={self.experts_per_token} exceeds num_experts="
                              f"{self.num_experts}.")
        if not (math.isfinite(self.init_std) and 0 < self.init_std <= 1):  # transformers refuses above 1
            raise ConfigError(f"tiny model shape: init_std={self.init_std} must lie in (0, 1]; 0.02 is the default.")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 byte tokens + EOS): any text, no vocabulary file."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)


def tiny_model_type(name: str) -> str | None:
    """The model type a ``tiny-<model type>[:shape]`` name asks for, or None for any other name."""
    if not name.startswith(TINY_PREFIX):
        return None
    return name[len(TINY_PREFIX):].partition(SHAPE_SEPARATOR)[0]


def _shape_value(name: str, key: str, text: str, kind: str) -> int | float | bool:
    """One ``key=value`` of a tiny name, as the field's type (``kind``: its annotation)."""
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        return int(text) if kind == "int" else float(text)
    except ValueError:
        article = "an" if kind == "int" else "a"
        raise ConfigError(f"model.name_or_path={name!r}: {key}={text!r} is not {article} {kind}.") from None


def tiny_name(model_type: str, **shape: int | float | bool) -> str:
    """The name of a tiny model of ``model_type`` with the ``shape`` keys given (the inverse of :func:`tiny_shape`)."""
    spec = ",".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in shape.items())
    return f"{TINY_PREFIX}{model_type}{SHAPE_SEPARATOR + spec if spec else ''}"


def tiny_shape(name: str) -> TinyModelConfig:
    """The shape a ``tiny-<model type>[:key=value,...]`` name asks for (the defaults for the keys it leaves out)."""
    spec = name.partition(SHAPE_SEPARATOR)[2]
    kinds = {field.name: str(field.type) for field in dataclasses.fields(TinyModelConfig)}
    values: dict[str, int | float | bool] = {}
    for item in filter(None, spec.split(",")):
        key, equals, text = item.partition("=")
        if key not in kinds or not equals:
            raise ConfigError(
                f"model.name_or_path={name!r}: {item!r} is not a shape key=value; the keys are {', '.join(kinds)} "
                "(e.g. tiny-llama:num_layers=2,hidden_size=128)."
            )
        values[key] = _shape_value(name, key, text, kinds[key])
    return TinyModelConfig(**values)


def _family_config(model_type: str, config: TinyModelConfig, vocab_size: int) -> PretrainedConfig:
    """transformers' config of ``model_type`` at the tiny shape; the keys each family spells differently."""
    eos = vocab_size - 1
    shape: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "max_position_embeddings": 4096,
        "initializer_range": config.init_std, "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
    }
    if model_type == "opt":  # OPT: one head count, ffn_dim, its own embedding width; biased LayerNorms
        shape.update(ffn_dim=config.intermediate_size, word_embed_proj_dim=config.hidden_size, init_std=config.init_std)
        shape.pop("initializer_range")
    else:
        shape.update(intermediate_size=config.intermediate_size, num_key_value_heads=config.num_kv_heads,
                     head_dim=config.hidden_size // config.num_heads)
    # mixture of experts: each family's names for the expert count and width (every layer sparse)
    if model_type == "mixtral":
        shape.update(num_local_experts=config.num_experts, num_experts_per_tok=config.experts_per_token)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        shape.update(num_experts=config.num_experts, num_experts_per_tok=config.experts_per_token,
                     moe_intermediate_size=config.intermediate_size, decoder_sparse_step=1, mlp_only_layers=[])
        if model_type == "qwen2_moe":
            shape.update(shared_expert_intermediate_size=config.intermediate_size)
    return AutoConfig.for_model(model_type, **shape)


def build_tiny_model(model_type: str, config: TinyModelConfig, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of ``model_type`` with the given shape, deterministic in ``seed``."""
    if model_type == "llama":
        return build_tiny_llama(config, vocab_size, seed)
    family_for(model_type)  # a clear refusal for a type no layout covers
    hf_config = _family_config(model_type, config, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config)
    return model.eval()


def build_tiny_llama(config: TinyModelConfig, vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` with the given shape, deterministic in ``seed``."""
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    return model.eval()
