"""Per-window checkpoints: a killed run resumes from the last finished window, bit for bit.

Layout of ``DIR/checkpoints/``:

* ``block_NNNN.safetensors`` - the state of block NNNN once it is finalised (integer codes, scales,
  zero-points, CFP-folded norms, activation quantizers). Written once: a finalised block never changes.
* ``caches_rank_R_wNNNN.safetensors`` (DDP ranks other than 0) - that rank's shard of both input caches
  and its RNG states after window NNNN, beside rank 0's state of the same window.
* ``state_wNNNN.safetensors`` - everything that still moves after window NNNN: both
  input caches (``x_fp``, ``x_q``, and ``x_rtn`` when the RTN reference is tracked), the calibrating state of
  the overlap blocks that warm-start the next window, the RNG states, and - as JSON in the file's
  metadata - the index of the last finished window, the run's configuration, the window summaries,
  block errors, preprocessing statistics and the FP perplexities already measured.

Block files are written before the state that names them, and the last two windows' state files are
kept, so a kill at any moment - also between two ranks' writes - leaves a window whose files are complete
on every rank: resuming takes the latest such window. (With several nodes the output directory must be
shared, as it is for the outputs.) Everything is safetensors: nothing is unpickled on resume.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.files import check_safetensors
from cbq_lightning.io import atomic_write_safetensors

FORMAT = "cbq-window-checkpoint"
VERSION = "1"
log = logging.getLogger("cbq_lightning")
#: configuration keys that may change between a run and its resumption (they do not affect what the windows
#: compute): where outputs go, progress bars, evaluation and packed-export settings, the resume and keep switches,
#: and the end-to-end phase, which runs after the last window (on resume it runs again, with its current settings).
#: Each entry covers the key itself and every key beneath it (a section switched on or off, or one of its settings).
RESUMABLE_CHANGES = ("output_dir", "resume", "keep_checkpoints", "advanced.trainer.enable_progress_bar", "eval",
                     "export", "extensions.end_to_end")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (dotted) whose values differ and matter for the calibration."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(set(old) | set(new))
    return [
        key for key in keys
        if old.get(key) != new.get(key) and not any(key == k or key.startswith(f"{k}.") for k in RESUMABLE_CHANGES)
    ]


def start_over(directory: Path) -> str:
    """The fix for a broken checkpoint file (a finished window's files are written atomically, so only a
    foreign hand or a failing disk makes one)."""
    return f"remove {directory} or pass --resume false to start over"


@dataclass
class ResumePoint:
    """What a checkpoint holds (see the module docstring)."""

    last_window: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def block_state(self, directory: Path, index: int) -> dict[str, torch.Tensor]:
        """State dict of a finalised block."""
        path = directory / f"block_{index:04d}.safetensors"
        check_safetensors(path, start_over(directory))
        return load_file(str(path))

    def overlap_state(self, index: int) -> dict[str, torch.Tensor]:
        """State dict of an overlap block (entered, not finalised) as it was after the last window."""
        prefix = f"overlap.{index}."
        return {key[len(prefix):]: value for key, value in self.tensors.items() if key.startswith(prefix)}


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state(), "rng.generator": generator.get_state()}


def _rng_meta() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_rng(point: ResumePoint, generator: torch.Generator) -> None:
    """Put every random source back to where the interrupted run was after its last window."""
    torch.set_rng_state(point.tensors["rng.torch"])
    generator.set_state(point.tensors["rng.generator"])
    version, internal, gauss = point.meta["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = point.meta["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}


class WindowCheckpointer:
    """Writes and reads ``DIR/checkpoints/`` (see the module docstring).

    Args:
        output_dir: the run's output directory.
        config: the run's resolved configuration (``dataclasses.asdict``), compared on resume.
        rank: this process's DDP rank: rank 0 writes blocks and state, the others their cache shards.
    """

    def __init__(self, output_dir: Path, config: dict[str, Any], rank: int = 0, world: int = 1) -> None:
        self.directory = Path(output_dir) / "checkpoints"
        self.config = config
        self.rank = rank
        self.world = world

    def caches_path(self, window: int, rank: int | None = None) -> Path:
        return self.directory / f"caches_rank_{self.rank if rank is None else rank}_w{window:04d}.safetensors"

    def state_path(self, window: int) -> Path:
        return self.directory / f"state_w{window:04d}.safetensors"

    def _latest_complete_window(self) -> int | None:
        """The last window whose state (rank 0) and cache shards (every other rank) are all on disk."""
        windows = sorted((int(p.stem.rsplit("_w", 1)[1]) for p in self.directory.glob("state_w*.safetensors")), reverse=True)
        for window in windows:
            if all(self.caches_path(window, rank).is_file() for rank in range(1, self.world)):
                return window
        return None

    def _prune(self, pattern: str, keep: int = 2) -> None:
        for old in sorted(self.directory.glob(pattern))[:-keep]:
            old.unlink(missing_ok=True)

    def save_block(self, index: int, block: nn.Module) -> None:
        """Write a block that has just been finalised (rank 0: every rank holds the same block)."""
        if self.rank != 0:
            return
        path = self.directory / f"block_{index:04d}.safetensors"
        tensors = _plain(block.state_dict())
        atomic_write_safetensors(path, tensors, {"format": FORMAT})

    def save_state(
        self,
        last_window: int,
        caches: dict[str, torch.Tensor],
        overlap_blocks: dict[int, nn.Module],
        generator: torch.Generator,
        meta: dict[str, Any],
    ) -> None:
        """Replace the moving state after window ``last_window`` (its finalised blocks already saved)."""
        tensors = {name: value.contiguous() for name, value in caches.items()}  # may be memory-mapped: no copy
        if self.rank != 0:  # this rank's shard of the caches and its random state
            tensors.update(_rng_tensors(generator))
            metadata = {"format": FORMAT, "version": VERSION, "last_window": str(last_window),
                        "rng": json.dumps(_rng_meta())}
            path = self.caches_path(last_window)
            atomic_write_safetensors(path, tensors, metadata)
            self._prune(f"caches_rank_{self.rank}_w*.safetensors")
            return
        for index, block in overlap_blocks.items():
            tensors.update({f"overlap.{index}.{key}": value for key, value in _plain(block.state_dict()).items()})
        tensors.update(_rng_tensors(generator))
        document = {**meta, "last_window": last_window, "config": self.config, "rng": _rng_meta()}
        metadata = {"format": FORMAT, "version": VERSION, "meta": json.dumps(document)}
        atomic_write_safetensors(self.state_path(last_window), tensors, metadata)
        self._prune("state_w*.safetensors")

    def load(self) -> ResumePoint | None:
        """The checkpoint to resume from, or None; refuses one written by a different configuration."""
        window = self._latest_complete_window() if self.directory.is_dir() else None
        if window is None:
            return None
        path = self.state_path(window)
        check_safetensors(path, start_over(self.directory))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a cbq-lightning checkpoint: remove it or use --resume false.")
        meta = json.loads(metadata["meta"])
        differences = config_differences(meta["config"], self.config)
        if differences:
            shown = ", ".join(f"{key} ({_flatten(meta['config']).get(key)!r} -> {_flatten(self.config).get(key)!r})"
                              for key in differences[:8])
            raise ConfigError(
                f"{self.directory} holds a checkpoint of a run with a different configuration: {shown}. "
                "Rerun with the original settings to resume, or pass --resume false to start over."
            )
        tensors = load_file(str(path))
        if self.rank != 0:
            tensors = self._rank_caches(tensors, window, meta)
        return ResumePoint(last_window=int(meta["last_window"]), meta=meta, tensors=tensors)

    def _rank_caches(self, tensors: dict[str, torch.Tensor], last_window: int, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Rank 0's state with this rank's caches and random state in place of rank 0's."""
        path = self.caches_path(last_window)
        check_safetensors(path, start_over(self.directory))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        own = load_file(str(path))
        meta["rng"] = json.loads(metadata["rng"])
        kept = {key: value for key, value in tensors.items() if key not in ("x_fp", "x_q", "x_rtn")}
        return {**kept, **own}

    def finish(self, keep: bool) -> None:
        """The run's outputs are written: remove the checkpoints, or (``keep_checkpoints``) keep them for a rerun that
        changes only what comes after the windows."""
        if not keep:
            self.clear()
        elif self.rank == 0:
            log.info("window checkpoints kept in %s: a rerun that changes only extensions.end_to_end, eval or export "
                     "resumes after the last window", self.directory)

    def clear(self) -> None:
        """Remove every checkpoint (a fresh start, or a finished run); rank 0's job."""
        if self.rank == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
