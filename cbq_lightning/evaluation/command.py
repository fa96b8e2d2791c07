"""``cbq evaluate``: perplexity of any causal LM (full precision, or a cbq-lightning output)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cbq_lightning.data.text import DEFAULT_DATA_DIR
from cbq_lightning.errors import ConfigError
from cbq_lightning.evaluation.perplexity import evaluate_sets, prepare_eval_set
from cbq_lightning.export.fake_quant import MODEL_DIR, SIDECAR, attach_activation_quantizers
from cbq_lightning.io import atomic_write_json
from cbq_lightning.models.loading import ModelConfig, load_model, load_tokenizer


@dataclass
class EvaluateConfig:
    """What ``cbq evaluate`` measures.

    Attributes:
        model: a hub id, a checkpoint directory, a ``.gguf`` file, ``smollm2-135m``, or the output
            directory of ``cbq quantize`` (its ``model/`` checkpoint is used).
        data: one source or a list: dataset names (``wikitext2``, ``c4``, ``ptb``) or ``.jsonl``/``.txt`` files.
        split: split of the named datasets; empty = each dataset's standard evaluation split.
        seqlen: tokens per window.
        max_windows: evaluate the first N windows only; null = all.
        batch_size: windows per forward pass.
        data_dir: local mirror of the named datasets, tried before the hub.
        dtype: weights dtype (``float32`` reproduces the published CPU figures).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        trust_remote_code: allow custom model code from the hub.
        output: also write the results to this JSON file.
    """

    model: str
    data: list[str] | str = "wikitext2"
    split: str | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    data_dir: str | None = DEFAULT_DATA_DIR
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    output: str | None = None

    def sources(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)


def resolve_model_path(name_or_path: str) -> tuple[str, dict[str, Any] | None]:
    """A ``cbq quantize`` output directory stands for its ``model/`` checkpoint; also its quantization info."""
    path = Path(name_or_path).expanduser()
    if (path / MODEL_DIR / SIDECAR).is_file():
        path = path / MODEL_DIR
    sidecar = path / SIDECAR
    if sidecar.is_file():
        return str(path), json.loads(sidecar.read_text(encoding="utf-8"))
    return name_or_path, None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available: use --device cpu.")
    return torch.device(name)


def run_evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate and return ``{model, quantization, device, results: [{dataset, split, ..., ppl}]}``."""
    started = time.perf_counter()
    device = _device(config.device)
    path, quantization = resolve_model_path(config.model)
    model_config = ModelConfig(name_or_path=path, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(model_config)
    sets = [
        prepare_eval_set(source, tokenizer, config.seqlen, config.split, config.max_windows, config.data_dir)
        for source in config.sources()
    ]
    model = load_model(model_config, vocab_size=len(tokenizer))
    if quantization is not None and quantization.get("scheme", {}).get("activations"):
        attach_activation_quantizers(model, Path(path) / quantization["quant_state"])
    model.to(device)
    results = evaluate_sets(model, sets, device, config.batch_size, label="eval")
    summary = {
        "model": config.model,
        "quantization": quantization,
        "device": str(device),
        "dtype": config.dtype,
        "results": results,
        "wall_time_s": time.perf_counter() - started,
        "config": dataclasses.asdict(config),
    }
    if config.output:
        atomic_write_json(Path(config.output), summary)
    return summary
