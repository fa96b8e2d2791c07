"""Atomic writes: a run that is killed never leaves a half-written output behind.

Every output goes through these helpers, so they are also where a failing write (full disk, read-only or
forbidden folder) becomes one clear :class:`~cbq_lightning.errors.OutputError` instead of a traceback: the
temporary file is removed and the previous version of the output is still in place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from cbq_lightning.errors import OutputError

#: write failures that are the environment's, not a bug: said in one line with the fix
_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _output_error(path: Path, error: OSError) -> OutputError:
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"free space under {path.parent} (or choose another output_dir)"
    else:
        fix = f"make {path.parent} writable (or choose another output_dir)"
    return OutputError(f"cannot write {path}: {reason}; {fix}, then rerun the same command: the earlier outputs "
                       "are intact and a CBQ run resumes from its last finished window.")


@contextmanager
def _reported(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if isinstance(error, OutputError) or error.errno not in _ENVIRONMENT_ERRORS:
            raise
        raise _output_error(path, error) from error


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, with the metadata in sorted key order.

    Why: safetensors serialises the ``__metadata__`` map in a hash order that changes from process to
    process, so two runs that computed the same tensors would write different files. Sorted keys make the same
    state the same bytes, and a checksum can then compare two runs. Any safetensors reader reads the result.
    """
    raw = safetensors_save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format's alignment: tensor data starts on an 8-byte boundary
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write :func:`safetensors_bytes` to ``path`` (not atomic by itself: see :func:`atomic_write_safetensors`)."""
    path.write_bytes(safetensors_bytes(tensors, metadata))


def atomic_write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically, byte for byte the same for the same tensors and metadata."""
    atomic_write_file(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then rename the result over ``path`` (for writers that take a path)."""
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block finishes without error."""
    with _reported(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with _reported(path):
            yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
