"""Read a text corpus from a local file or the shipped excerpt, in the Hugging Face ``wikitext`` layout.

``.jsonl`` files hold one ``{"text": ...}`` row per line (as ``../shared/data`` and
``datasets.load_dataset("json", ...)`` do); rows are joined with ``"\\n\\n"``, the GPTQ/OmniQuant
convention, so the same tokens come out as from the hub dataset.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from cbq_lightning.errors import DataError

SHIPPED_SOURCE = "shipped"
_SHIPPED_FILE = "wikitext2_validation_excerpt.txt"
ROW_SEPARATOR = "\n\n"


def read_jsonl_rows(path: Path, field: str = "text") -> list[str]:
    """The ``field`` of every JSON line of ``path``."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise DataError(f"{path}:{number} has no {field!r} field: set data.text_field to the text key.")
            rows.append(record[field])
    return rows


def load_text(source: str, field: str = "text") -> str:
    """The whole corpus of ``source`` as one string.

    Args:
        source: ``shipped`` (the WikiText-2 validation excerpt inside the package), or a ``.jsonl``
            or ``.txt`` file.
        field: JSON key of the text in ``.jsonl`` rows.
    """
    if source == SHIPPED_SOURCE:
        return resources.files("cbq_lightning.data").joinpath("corpus", _SHIPPED_FILE).read_text("utf-8")
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"text source {source!r} is not an existing file: give a .jsonl (one {{\"text\": ...}} row per "
            f"line) or .txt file, or '{SHIPPED_SOURCE}' for the built-in WikiText-2 excerpt."
        )
    if path.suffix == ".jsonl":
        return ROW_SEPARATOR.join(read_jsonl_rows(path, field))
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    raise DataError(f"text file {path} has an unsupported extension {path.suffix!r}: use .jsonl or .txt.")
