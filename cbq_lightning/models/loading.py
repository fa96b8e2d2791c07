"""Load the model to quantize (and its tokenizer) from a hub id, a local directory or the tiny builder.

Checks that can fail cheaply (path exists, architecture supported) run before any weight is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cbq_lightning.errors import ModelSourceError
from cbq_lightning.models.adapter import check_model_type
from cbq_lightning.models.tiny import TINY_MODEL_NAME, TinyModelConfig, build_tiny_llama, byte_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Where the model comes from.

    Attributes:
        name_or_path: a Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M``), a local checkpoint
            directory, a ``.gguf`` file, or ``tiny-llama`` (random tiny model, built offline).
        gguf_file: GGUF file name inside ``name_or_path`` (transformers' ``gguf_file=``).
        revision: hub revision (branch, tag or commit).
        dtype: ``float32`` (default; CPU), ``bfloat16`` or ``float16``: dtype of the frozen weights.
        trust_remote_code: allow custom model code from the hub; off unless you trust the source.
        tiny: shape of the ``tiny-llama`` model.
    """

    name_or_path: str = TINY_MODEL_NAME
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in _DTYPES:
            raise ModelSourceError(f"model.dtype={self.dtype!r} is unknown: use one of {', '.join(_DTYPES)}.")
        return _DTYPES[self.dtype]


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``org/name``; anything else with path syntax is meant as a local path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
        or name.endswith((".gguf", ".safetensors", ".bin"))
    )


def resolve_source(config: ModelConfig) -> tuple[str, str | None]:
    """``(path_or_id, gguf_file)`` after checking that local paths exist."""
    name = config.name_or_path
    if name == TINY_MODEL_NAME:
        return name, None
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelSourceError(
                    f"model path {name} is a file but not a .gguf: give a checkpoint directory "
                    "(with config.json), a .gguf file or a hub id."
                )
            return str(path.parent), path.name
        return str(path), config.gguf_file
    if _looks_like_path(name):
        raise ModelSourceError(
            f"model path {name!r} does not exist: give an existing checkpoint directory or .gguf file, a hub "
            f"id such as 'HuggingFaceTB/SmolLM2-135M', or '{TINY_MODEL_NAME}' for the built-in test model."
        )
    return name, config.gguf_file


def _hub_kwargs(config: ModelConfig, gguf_file: str | None) -> dict:
    return {
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
        **({"gguf_file": gguf_file} if gguf_file else {}),
    }


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer, after checking the architecture (cheap: no weights are read).

    Loaded before the model so that calibration text can be checked before any heavy work.
    """
    source, gguf_file = resolve_source(config)
    if source == TINY_MODEL_NAME:
        return byte_tokenizer()
    from transformers import AutoConfig, AutoTokenizer

    kwargs = _hub_kwargs(config, gguf_file)
    try:
        hf_config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load a model config from {source!r}: {error}") from error
    check_model_type(hf_config.model_type)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_model(config: ModelConfig, vocab_size: int, seed: int = 0) -> nn.Module:
    """The causal LM, frozen, in eval mode, on CPU (``vocab_size`` sizes the tiny model only)."""
    dtype = config.torch_dtype()
    source, gguf_file = resolve_source(config)
    if source == TINY_MODEL_NAME:
        model = build_tiny_llama(config.tiny, vocab_size=vocab_size, seed=seed).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **_hub_kwargs(config, gguf_file))
    model.requires_grad_(False)
    return model.eval()
