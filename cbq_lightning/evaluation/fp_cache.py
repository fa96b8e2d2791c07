"""The full-precision reference perplexities, measured once per model and evaluation set and reused after.

Why: every run of the same model evaluates the same unquantized model on the same tokens (``eval.fp_reference``);
on the demo that is minutes of each run spent on a number that cannot have changed. The cache key is everything
the number depends on: the model's identity (its files' sizes and modification times, a hub commit, or a tiny
model's shape and seed), its dtype, a rotation folded into it, the evaluation tokens themselves (a digest of
every window), the batch size, the device type and the torch version. When any of them changes the key changes
and the reference is measured again; a model handed over in memory (the Python API) has no identity to key on
and is always measured.

Where: ``$CBQ_CACHE_DIR/fp_reference/`` when set, else ``$XDG_CACHE_HOME/cbq-lightning/fp_reference/`` (default
``~/.cache/``). Delete a file (or the folder) to measure again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbq_lightning.evaluation.perplexity import EvalSet
from cbq_lightning.io import atomic_write_json
from cbq_lightning.models.loading import ModelConfig, resolve_source
from cbq_lightning.models.tiny import tiny_model_type, tiny_shape

log = logging.getLogger("cbq_lightning")

CACHE_DIR_ENV = "CBQ_CACHE_DIR"
#: bumped when what a cached entry means changes (the protocol, the entry's fields)
_VERSION = 1


def cache_directory() -> Path:
    """Where the references are kept (see the module docstring)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser() / "fp_reference"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cbq-lightning" / "fp_reference"


def model_identity(config: ModelConfig, model: nn.Module, seed: int, revision: str | None = None) -> dict[str, Any] | None:
    """What identifies the loaded weights without reading them: None where nothing does (then never cached).
    ``revision``: the hub revision asked for (``advanced.model.revision``), kept beside the commit it gave."""
    name = config.name_or_path
    if tiny_model_type(name) is not None:  # built from its shape and the seed
        return {"tiny": name, "shape": dataclasses.asdict(tiny_shape(name)), "seed": seed}
    source, gguf_file = resolve_source(config)
    path = Path(source)
    if path.exists():
        files = [path / gguf_file] if gguf_file else sorted(p for p in path.iterdir() if p.is_file())
        stats = [(f, f.stat()) for f in files]
        return {"files": [{"path": str(f.resolve()), "bytes": s.st_size, "mtime_ns": s.st_mtime_ns} for f, s in stats]}
    commit = getattr(model.config, "_commit_hash", None)  # set by transformers for a hub download
    return {"hub": name, "revision": revision, "commit": commit} if commit else None


def reference_key(identity: dict[str, Any], *, dtype: torch.dtype, rotation: dict[str, Any] | None,
                  sets: list[EvalSet], batch_size: int, device: torch.device) -> str:
    """The cache key: a digest of everything the reference perplexities depend on."""
    tokens = [{**s.describe(), "sha256": hashlib.sha256(s.windows.contiguous().numpy().tobytes()).hexdigest()}
              for s in sets]
    facts = {"version": _VERSION, "model": identity, "dtype": str(dtype), "rotation": rotation, "sets": tokens,
             "batch_size": batch_size, "device": device.type, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_reference(key: str) -> list[dict[str, Any]] | None:
    """The cached results for ``key``, or None (absent, or unreadable: then measured again and rewritten)."""
    path = cache_directory() / f"{key}.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    log.info("full-precision reference from %s (measured by an earlier run; delete the file to measure again)", path)
    return results


def save_reference(key: str, results: list[dict[str, Any]]) -> None:
    """Keep ``results`` for later runs; a cache that cannot be written is skipped with a warning, not an error."""
    path = cache_directory() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"results": results})
    except OSError as error:
        log.warning("could not keep the full-precision reference in %s (%s); later runs will measure it again",
                    path, error)
