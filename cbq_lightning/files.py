"""Checks of the files cbq-lightning reads, before the libraries that read them see them.

Why: safetensors, transformers, tokenizers and gguf meet a truncated or foreign file with their own
exceptions - a ``SafetensorError`` about a header, a sentencepiece traceback for a broken weight file, a
``struct.error`` deep in a GGUF reader - which name neither the file nor the fix. Each check here reads only
what proves the file whole (a header, a length, a JSON parse), costs milliseconds, and raises
:class:`~cbq_lightning.errors.FileFormatError` with the path, what is wrong and what to do; the CLI prints it
as one line and exits 2.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

from cbq_lightning.errors import FileFormatError

#: a safetensors header larger than this is not a header (the format caps it at 100 MB)
_MAX_SAFETENSORS_HEADER = 100_000_000
#: the first four bytes of every GGUF file
GGUF_MAGIC = b"GGUF"


def rerun_quantize(run_dir: Path) -> str:
    """The fix for a broken file of a ``cbq quantize`` output: rerunning it (it resumes), not a download."""
    return f"rerun the cbq quantize that wrote {run_dir} (it resumes from its last finished window)"


def _fail(path: Path, problem: str, fix: str) -> FileFormatError:
    return FileFormatError(f"{path}: {problem}; {fix}")


def check_safetensors(path: Path, fix: str) -> dict[str, Any]:
    """The header of the safetensors file ``path`` (tensor name -> dtype, shape, offsets) after checking that
    the file is complete: a length-prefixed JSON header, and every tensor's bytes inside the file."""
    if not path.is_file():
        raise _fail(path, "file not found", fix)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _fail(path, f"{size} bytes, too short for a safetensors file (truncated?)", fix)
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise _fail(path, "not a safetensors file, or truncated inside its header", fix)
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(path, "the safetensors header is not valid JSON (corrupt or foreign file)", fix) from None
    if not isinstance(header, dict):
        raise _fail(path, "the safetensors header is not a table of tensors", fix)
    data_size = size - 8 - header_size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _fail(path, f"tensor {name!r} has no valid data offsets (corrupt file)", fix)
        if not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise _fail(path, f"truncated: tensor {name!r} ends at byte {offsets[1]} of {data_size} data bytes", fix)
    return header


def check_json(path: Path, fix: str) -> Any:
    """The parsed JSON file ``path``, or a clear error naming it."""
    if not path.is_file():
        raise _fail(path, "file not found", fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _fail(path, "not a text file (corrupt or foreign)", fix) from None
    except json.JSONDecodeError as error:
        raise _fail(path, f"not valid JSON ({error.msg}, line {error.lineno}; truncated?)", fix) from None


class GgufHeader(NamedTuple):
    """What a GGUF file declares and holds, without its tensor data: enough to tell which model it is.

    Attributes:
        architecture: ``general.architecture`` (``unknown`` when absent).
        name: ``general.name`` (empty when absent).
        keys: every metadata key (``gemma3.block_count``, ``clip.has_vision_encoder``...).
        tensor_names: every tensor's name (``blk.0.attn_q.weight``, ``v.blk.0.attn_q.weight``...).
    """

    architecture: str
    name: str
    keys: tuple[str, ...]
    tensor_names: tuple[str, ...]


def check_gguf(path: Path, fix: str) -> str | None:
    """The architecture a GGUF file declares (``general.architecture``), after checking that ``path`` starts
    like a GGUF file and that the gguf reader can map all of its tensors (a truncated file cannot).

    None when the ``gguf`` package is missing (the loader says how to install it).
    """
    header = read_gguf_header(path, fix)
    return header.architecture if header is not None else None


def read_gguf_header(path: Path, fix: str) -> GgufHeader | None:
    """The header of the GGUF file ``path`` (:class:`GgufHeader`), after the checks of :func:`check_gguf`.

    None when the ``gguf`` package is missing. The reader costs a few seconds on a 100 MB file, so its answer
    is kept per file version: the loader asks several times per run.
    """
    if not path.is_file():
        raise _fail(path, "file not found", fix)
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise _fail(path, "not a GGUF file (its first bytes are not 'GGUF')", fix)
    try:
        import gguf  # noqa: F401
    except ImportError:
        return None
    stat = path.stat()
    try:
        return _gguf_header(str(path), stat.st_size, stat.st_mtime_ns)
    except Exception as error:  # noqa: BLE001 - any reader failure means a broken file; its type is not API
        raise _fail(path, f"unreadable GGUF ({type(error).__name__}: {str(error).splitlines()[0][:120]}; "
                    "truncated?)", fix) from None


@functools.lru_cache(maxsize=8)
def _gguf_header(path: str, size: int, mtime_ns: int) -> GgufHeader:
    """The :class:`GgufHeader` of the GGUF at ``path`` (size and mtime key the cache to this version)."""
    import gguf

    reader = gguf.GGUFReader(path)

    def text(key: str, default: str) -> str:
        field = reader.get_field(key)
        return str(field.contents()) if field is not None else default

    return GgufHeader(
        architecture=text("general.architecture", "unknown"),
        name=text("general.name", ""),
        keys=tuple(reader.fields),
        tensor_names=tuple(tensor.name for tensor in reader.tensors),
    )


def check_checkpoint_dir(directory: Path, fix: str) -> None:
    """A Hugging Face checkpoint directory: ``config.json`` parses, each safetensors weight file is whole
    (sharded checkpoints through their index), and the tokenizer's JSON files parse where present."""
    check_json(directory / "config.json", fix)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = check_json(index, fix).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            check_safetensors(directory / shard, fix)
    else:
        for weights in sorted(directory.glob("*.safetensors")):
            check_safetensors(weights, fix)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (directory / name).exists():
            check_json(directory / name, fix)
