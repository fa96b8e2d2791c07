"""The metadata of an exported GGUF beside its tensors: the tokenizer, and everything a source GGUF carried.

Why two sources: a model that came from a GGUF (the embedded SmolLM2, any ``.gguf`` given as ``model.name_or_path``)
already has llama.cpp's own description of its tokenizer (including ``tokenizer.ggml.pre``, which llama.cpp's
converter picks by hashing a tokenization and which cannot be derived from the vocabulary) and of its
hyperparameters; the export copies those keys as they are. A Hugging Face checkpoint's tokenizer is written the
way the converter writes it, with the ``gguf`` package's vocabulary readers (``gguf.vocab``): byte-level BPE
(``gpt2``: tokens, merges) or sentencepiece (``llama``: tokens, scores, byte tokens), plus the special tokens and
chat template (``gguf.SpecialVocab``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbq_lightning.errors import CBQError, ConfigError

#: keys a GGUF export sets itself and never copies: the container's own fields, the type of its tensors, who
#: quantized them
_NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
               "general.alignment", "general.quantized_by")
#: ``tokenizer.ggml.pre`` of a Hugging Face byte-level BPE tokenizer: llama.cpp's default split (see docs/export.md)
DEFAULT_PRE = "default"


@dataclass(frozen=True)
class SourceGguf:
    """The GGUF a run's model was loaded from (its metadata is copied), when there is one."""

    path: Path
    architecture: str


def source_gguf(run_dir: Path) -> SourceGguf | None:
    """The run's source GGUF from its ``report.json`` (``model.name_or_path``), or None for a Hugging Face or tiny
    model. A GGUF named by directory plus ``model.gguf_file`` is found from the run's ``config.yaml``."""
    from cbq_lightning.files import read_gguf_header
    from cbq_lightning.models.loading import ModelConfig, resolve_source

    name, gguf_file = _model_source(run_dir)
    if name is None:
        return None
    try:
        directory, file = resolve_source(ModelConfig(name_or_path=name, gguf_file=gguf_file))
    except CBQError as error:  # the source is gone or no longer installed: the export says which
        raise ConfigError(
            f"the run's model came from {name!r}, which cannot be read now ({error}); the GGUF export copies its "
            "tokenizer and metadata from there: put it back, or quantize from a Hugging Face checkpoint."
        ) from error
    if file is None:
        return None
    path = Path(directory) / file
    header = read_gguf_header(path, "download or copy it again")
    return SourceGguf(path=path, architecture=header.architecture if header is not None else "")


def _model_source(run_dir: Path) -> tuple[str | None, str | None]:
    report = run_dir / "report.json"
    name = gguf_file = None
    if report.is_file():
        name = (json.loads(report.read_text(encoding="utf-8")).get("model") or {}).get("name_or_path")
    recipe = run_dir / "config.yaml"
    if recipe.is_file():
        import yaml

        model = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}
        name = name or model.get("name_or_path")
        gguf_file = model.get("gguf_file")
    return name, gguf_file


def copy_metadata(writer: Any, source: SourceGguf) -> list[str]:
    """Copy every key of ``source`` but the container's own and the tensor type; returns the copied keys."""
    import gguf

    reader = gguf.GGUFReader(str(source.path))
    copied = []
    for key, field in reader.fields.items():
        if key.startswith(_NOT_COPIED) or not field.types:
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)
        copied.append(key)
    return copied


def write_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> list[str]:
    """Write the tokenizer of the checkpoint in ``model_dir`` as llama.cpp's converter would; returns warnings.

    The token list is padded to ``vocab_size`` (the embedding's rows) with ``[PAD<id>]`` tokens of type UNUSED,
    as the converter pads it.
    """
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    warnings: list[str] = []
    vocab: Any = None
    # the converter's order: a sentencepiece model file first (it needs the sentencepiece package), then
    # tokenizer.json as byte-level BPE, then as sentencepiece-style BPE with byte fallback
    readers = ((SentencePieceVocab,) if (model_dir / "tokenizer.model").is_file() else ()) + (BpeVocab, LlamaHfVocab)
    for reader in readers:
        try:
            vocab = reader(model_dir)
            break
        except (FileNotFoundError, TypeError, ImportError, KeyError, RuntimeError):
            continue
    if vocab is None:
        raise ConfigError(
            f"the tokenizer in {model_dir} is neither a byte-level BPE nor a sentencepiece tokenizer (tokenizer.json "
            "or tokenizer.model), so it has no GGUF form here: quantize from the model's GGUF instead."
        )
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        scores.append(float(score))
        types.append(int(kind))
    if len(tokens) > vocab_size:
        raise ConfigError(f"the tokenizer in {model_dir} has {len(tokens)} tokens, the model's embedding {vocab_size}.")
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre(DEFAULT_PRE)
        warnings.append(
            f"tokenizer.ggml.pre is {DEFAULT_PRE!r} (llama.cpp's default split): llama.cpp names the pre-tokenizer of "
            "a Hugging Face tokenizer by hashing a tokenization, which is not done here yet; llama.cpp may split text "
            "differently from the model's tokenizer. A model quantized from a GGUF keeps its own."
        )
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
    if vocab.tokenizer_model == "gpt2" and not special.merges:
        # GGUF has no empty arrays, and llama.cpp refuses a BPE vocabulary without merges (a bare byte vocabulary)
        special.load_merges = False
        warnings.append(f"the byte-level BPE tokenizer in {model_dir} has no merges, so the GGUF has no "
                        "tokenizer.ggml.merges: transformers reads it, llama.cpp refuses its vocabulary.")
    special.add_to_gguf(writer, quiet=True)
    return warnings
