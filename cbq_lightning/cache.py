"""Where the calibration caches live: in RAM, or memory-mapped files on disk when RAM is short.

A 7B model calibrated on 128 x 2048 tokens has caches of 128 * 2048 * 4096 values each - 4 GiB in
float32 for each of ``X_fp``, ``X_q``, ``Y_fp`` and ``Y_h``, more with the RTN reference. With
``advanced.cache.location: disk`` each cache is a file under ``advanced.cache.directory`` mapped into memory: the OS pages
in the batches being read and the RAM use stays flat. Teacher targets may also be kept in bfloat16
(``advanced.cache.target_dtype``), halving their size; the loss is computed in float32 either way.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cbq_lightning.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class CacheConfig:
    """Storage of the input caches and teacher targets (``advanced.cache``).

    Attributes:
        location: ``cpu`` (RAM) or ``disk`` (memory-mapped files).
        directory: where the disk caches go; null = ``<output_dir>/cache`` (removed at the end of the run).
        target_dtype: dtype of the cached teacher outputs ``Y_fp`` / ``Y_h``: ``float32`` or ``bfloat16``.
    """

    location: Literal["cpu", "disk"] = "cpu"
    directory: str | None = None
    target_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        if self.location not in ("cpu", "disk"):
            raise ConfigError(f"advanced.cache.location={self.location!r} is unknown: use 'cpu' or 'disk'.")
        if self.target_dtype not in _DTYPES:
            raise ConfigError(f"advanced.cache.target_dtype={self.target_dtype!r} is unknown: use {' or '.join(_DTYPES)}.")

    def targets_dtype(self) -> torch.dtype:
        return _DTYPES[self.target_dtype]


class TensorStore:
    """Allocates cache tensors in RAM (``directory=None``) or as memory-mapped files in ``directory``.

    Each allocation gets a new file; the file of a cache that was replaced is removed by
    :meth:`release` (a mapping stays valid after its file is unlinked, so this is safe while a batch of
    the old cache is still being read).
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._counter = itertools.count()
        self._files: dict[int, Path] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    def allocate(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.directory is None:
            return torch.empty(shape, dtype=dtype)
        numel = 1
        for size in shape:
            numel *= size
        path = self.directory / f"{name}.{next(self._counter)}.bin"
        with open(path, "wb") as handle:
            handle.truncate(numel * torch.empty((), dtype=dtype).element_size())
        tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        self._files[tensor.untyped_storage().data_ptr()] = path
        return tensor

    def release(self, tensor: torch.Tensor | None) -> None:
        """Forget a cache that was replaced (removes its file)."""
        if tensor is None or self.directory is None:
            return
        path = self._files.pop(tensor.untyped_storage().data_ptr(), None)
        if path is not None:
            path.unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Remove every cache file (the end of the run)."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._files.clear()
