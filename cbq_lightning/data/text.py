"""Text corpora for calibration and evaluation, one code path for every source.

A source is one of:

* a dataset name (``wikitext2``, ``wikitext2-tokenized``, ``c4``, ``ptb``): read from a local mirror
  (``data_dir``, or the folder in the ``CBQ_DATA_DIR`` environment variable when none is given; laid out as
  ``wikitext/wikitext-2-raw-v1/test.jsonl``) when it holds the split, else from the Hugging Face hub with the
  dataset's standard config;
* a local ``.jsonl`` file (one ``{"text": ...}`` row per line, the hub's row layout) or ``.txt`` file;
* ``shipped``: the small WikiText-2 validation excerpt inside the package (tests, smoke runs).

Rows are joined with the dataset's separator (``"\\n\\n"`` for WikiText-2 and PTB, the GPTQ/OmniQuant
convention), so a local mirror and the hub give the very same tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cbq_lightning.errors import DataError

SHIPPED_SOURCE = "shipped"
_SHIPPED_FILE = "wikitext2_validation_excerpt.txt"
ROW_SEPARATOR = "\n\n"
#: the local mirror used when a run gives no ``data_dir`` (no default folder: a path that exists on one
#: machine's layout would be a trap on every other; the test suite sets it to the checkout's data)
DATA_DIR_ENV = "CBQ_DATA_DIR"


@dataclass(frozen=True)
class NamedDataset:
    """A hub dataset the tool knows by a short name, with the conventions the papers use for it.

    Attributes:
        hub_path, hub_config: ``datasets.load_dataset(hub_path, hub_config, ...)``.
        text_field: column holding the text.
        eval_split: the split perplexity is reported on.
        mirror: folder of the local mirror under ``data_dir`` (files ``<split>.jsonl``).
        separator: joins rows into one text.
        data_files: explicit files per split (C4 is sharded; the papers use the first shard).
        max_rows: rows of the evaluation split kept (C4: the 1,100 validation documents of the GPTQ
            protocol); other splits (calibration) are read whole.
    """

    hub_path: str
    hub_config: str | None
    text_field: str
    eval_split: str
    mirror: str
    separator: str = ROW_SEPARATOR
    data_files: dict[str, str] = field(default_factory=dict)
    max_rows: int | None = None


NAMED_DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset("wikitext", "wikitext-2-raw-v1", "text", "test", "wikitext/wikitext-2-raw-v1"),
    "wikitext2-tokenized": NamedDataset("wikitext", "wikitext-2-v1", "text", "test", "wikitext/wikitext-2-v1"),
    "ptb": NamedDataset("ptb_text_only", "penn_treebank", "sentence", "test", "ptb"),
    "c4": NamedDataset(
        "allenai/c4",
        None,
        "text",
        "validation",
        "c4",
        separator=" ",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        max_rows=1100,
    ),
}


def read_jsonl_rows(path: Path, field: str = "text") -> list[str]:
    """The ``field`` of every JSON line of ``path`` (blank lines skipped; blank *rows* are ``""``)."""
    rows = []
    fix = "repair or replace the file (one JSON object per line, e.g. {\"text\": \"...\"})"
    with path.open(encoding="utf-8") as handle:
        number = 0
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or field not in record:
                    raise DataError(f"{path}:{number} has no {field!r} field: set the text field to the text key.")
                if not isinstance(record[field], str):
                    raise DataError(f"{path}:{number}: the {field!r} field is not text; {fix}.")
                rows.append(record[field])
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text after line {number} (corrupt or binary file); {fix}.") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number} is not valid JSON ({error.msg}; truncated?); {fix}.") from None
    return rows


def _hub_rows(name: str, dataset: NamedDataset, split: str, mirror: Path | None) -> list[str]:
    import datasets

    where = f" (no local copy at {mirror})" if mirror is not None else ""
    if dataset.data_files and split not in dataset.data_files:
        raise DataError(f"dataset {name!r} has no split {split!r}: use one of {', '.join(dataset.data_files)}.")
    try:
        if dataset.data_files:
            loaded = datasets.load_dataset(
                dataset.hub_path, data_files={split: dataset.data_files[split]}, split=split
            )
        else:
            loaded = datasets.load_dataset(dataset.hub_path, dataset.hub_config, split=split)
    except Exception as error:  # datasets raises many types: connection, missing split, scripts
        raise DataError(
            f"cannot load dataset {name!r} split {split!r} from the hub{where}: {error}. Offline? Put the rows "
            f"in {dataset.mirror}/{split}.jsonl under data_dir (or ${DATA_DIR_ENV}), or give a local .jsonl/.txt file."
        ) from error
    return _kept_rows(dataset, split, list(loaded[dataset.text_field]))


def _kept_rows(dataset: NamedDataset, split: str, rows: list[str]) -> list[str]:
    return rows[: dataset.max_rows] if dataset.max_rows and split == dataset.eval_split else rows


def load_named_rows(name: str, split: str, data_dir: str | None) -> list[str]:
    """Rows of a named dataset split: the local mirror under ``data_dir`` (else ``$CBQ_DATA_DIR``) if it has
    them, else the hub."""
    dataset = NAMED_DATASETS[name]
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    mirror = Path(data_dir).expanduser() / dataset.mirror / f"{split}.jsonl" if data_dir else None
    if mirror is not None and mirror.is_file():
        return _kept_rows(dataset, split, read_jsonl_rows(mirror, dataset.text_field))
    return _hub_rows(name, dataset, split, mirror)


def check_source(source: str) -> None:
    """Fail before any heavy work when ``source`` is neither a known name nor an existing file."""
    if source == SHIPPED_SOURCE or source in NAMED_DATASETS:
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"text source {source!r} is neither a dataset name ({', '.join(NAMED_DATASETS)}) nor an existing "
            f"file: give one of those names, a .jsonl (one {{\"text\": ...}} row per line) or .txt file, or "
            f"'{SHIPPED_SOURCE}' for the built-in WikiText-2 excerpt."
        )
    if path.suffix not in (".jsonl", ".txt"):
        raise DataError(f"text file {path} has an unsupported extension {path.suffix!r}: use .jsonl or .txt.")


def eval_split(source: str, split: str | None) -> str:
    """The split to evaluate on: the one asked for, else the dataset's standard one (files: ``file``)."""
    if split:
        return split
    return NAMED_DATASETS[source].eval_split if source in NAMED_DATASETS else "file"


def load_text(source: str, split: str = "test", field: str = "text", data_dir: str | None = None) -> str:
    """The whole corpus of ``source`` as one string (rows joined by the dataset's separator).

    Args:
        source: a dataset name, a ``.jsonl``/``.txt`` file, or ``shipped``.
        split: split of a named dataset (ignored for files).
        field: JSON key of the text in ``.jsonl`` files (named datasets know their own).
        data_dir: local mirror of the named datasets, tried before the hub.
    """
    check_source(source)
    if source == SHIPPED_SOURCE:
        return resources.files("cbq_lightning.data").joinpath("corpus", _SHIPPED_FILE).read_text("utf-8")
    if source in NAMED_DATASETS:
        return NAMED_DATASETS[source].separator.join(load_named_rows(source, split, data_dir))
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        return ROW_SEPARATOR.join(read_jsonl_rows(path, field))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (corrupt or binary file); give a UTF-8 .txt file.") from None


def tokenize_text(tokenizer, text: str):
    """Token ids of a whole corpus, tokenized once with the tokenizer's defaults: ``[num_tokens]`` int64.

    This is the GPTQ/OmniQuant protocol (``tokenizer("\n\n".join(rows))``): a tokenizer that adds a BOS
    adds it once, at the very start of the corpus; ``verbose=False`` silences the max-length warning,
    which does not apply to a corpus that is cut into windows afterwards.
    """
    import torch

    encoded = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(encoded, dtype=torch.long)
