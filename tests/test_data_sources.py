"""Text sources: named datasets (local mirror, hub fallback), files, checks, tokenization, calibration ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cbq_lightning.data.calibration import CalibrationConfig, calibration_ids
from cbq_lightning.data.text import DATA_DIR_ENV, check_source, eval_split, load_text, tokenize_text
from cbq_lightning.errors import DataError
from cbq_lightning.models.tiny import byte_tokenizer

WIKI_ROWS = [" = A = \n", "", " b \n"]


def write_jsonl(path: Path, rows: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: row}) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


# --- named datasets from a local mirror -------------------------------------------------------------


def test_wikitext2_reads_the_local_mirror(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "wikitext" / "wikitext-2-raw-v1" / "test.jsonl", WIKI_ROWS)
    text = load_text("wikitext2", "test", data_dir=str(tmp_path))
    assert text == " = A = \n\n\n\n\n b \n"  # "\n\n".join(rows), the empty row kept
    assert text == "\n\n".join(WIKI_ROWS)


def test_wikitext2_tokenized_uses_its_own_mirror_folder(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "wikitext" / "wikitext-2-raw-v1" / "test.jsonl", ["raw"])
    write_jsonl(tmp_path / "wikitext" / "wikitext-2-v1" / "test.jsonl", ["tok", "enized"])
    assert load_text("wikitext2-tokenized", "test", data_dir=str(tmp_path)) == "tok\n\nenized"
    assert load_text("wikitext2", "test", data_dir=str(tmp_path)) == "raw"


def test_mirror_split_selects_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "wikitext" / "wikitext-2-raw-v1"
    write_jsonl(folder / "test.jsonl", ["test rows"])
    write_jsonl(folder / "validation.jsonl", ["validation rows"])
    assert load_text("wikitext2", "validation", data_dir=str(tmp_path)) == "validation rows"


def test_c4_joins_with_a_space_and_keeps_1100_rows(tmp_path: Path) -> None:
    rows = [f"doc{i}" for i in range(1105)]
    write_jsonl(tmp_path / "c4" / "validation.jsonl", rows)
    text = load_text("c4", "validation", data_dir=str(tmp_path))
    assert text == " ".join(rows[:1100])
    assert text.endswith("doc1099") and "doc1100" not in text
    assert "\n" not in text


# --- hub fallback -----------------------------------------------------------------------------------


def _hub_fails(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    import datasets

    calls: list[tuple] = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("offline for the test")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_no_data_dir_goes_to_the_hub_and_explains_the_offline_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)  # the test suite points it at the checkout's mirror
    calls = _hub_fails(monkeypatch)
    with pytest.raises(DataError) as info:
        load_text("wikitext2", "test", data_dir=None)
    message = str(info.value)
    assert "wikitext/wikitext-2-raw-v1/test.jsonl under data_dir (or $CBQ_DATA_DIR)" in message
    assert "give a local .jsonl/.txt file" in message
    assert "offline for the test" in message
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


def test_the_environment_names_the_mirror_when_a_run_gives_none(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """No data_dir: the folder in $CBQ_DATA_DIR is the mirror (the package has no default folder); a data_dir
    given wins over it."""
    calls = _hub_fails(monkeypatch)
    for folder, text in ((tmp_path / "env", "from the environment"), (tmp_path / "given", "given")):
        path = folder / "wikitext" / "wikitext-2-raw-v1" / "test.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"text": text}) + "\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert load_text("wikitext2", "test", data_dir=None) == "from the environment"
    assert load_text("wikitext2", "test", data_dir=str(tmp_path / "given")) == "given"
    assert calls == []


def test_missing_mirror_names_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _hub_fails(monkeypatch)
    with pytest.raises(DataError) as info:
        load_text("wikitext2", "validation", data_dir=str(tmp_path))
    message = str(info.value)
    assert f"no local copy at {tmp_path / 'wikitext' / 'wikitext-2-raw-v1' / 'validation.jsonl'}" in message
    assert "wikitext/wikitext-2-raw-v1/validation.jsonl under data_dir" in message
    assert "local .jsonl/.txt file" in message
    assert len(calls) == 1


class FakeHubSplit:
    """What ``datasets.load_dataset(..., split=...)`` returns, reduced to column indexing."""

    def __init__(self, columns: dict[str, list[str]]) -> None:
        self.columns = columns

    def __getitem__(self, key: str) -> list[str]:
        return self.columns[key]


def test_hub_rows_are_joined_like_the_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeHubSplit({"text": WIKI_ROWS, "other": ["wrong column"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)  # no mirror at all: the hub
    assert load_text("wikitext2", "test", data_dir=None) == "\n\n".join(WIKI_ROWS)
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]


def test_hub_ptb_reads_the_sentence_column(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: FakeHubSplit({"sentence": ["a b", "c"], "text": ["no"]})
    )
    assert load_text("ptb", "test", data_dir=None) == "a b\n\nc"


def test_hub_c4_uses_the_first_shard_and_caps_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    calls = []
    rows = [str(i) for i in range(1200)]

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeHubSplit({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_text("c4", "validation", data_dir=str(tmp_path)) == " ".join(rows[:1100])
    assert calls == [
        (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                           "split": "validation"})
    ]


def test_hub_c4_unknown_split_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hub_fails(monkeypatch)
    with pytest.raises(DataError, match="has no split 'test'"):
        load_text("c4", "test", data_dir=None)
    assert calls == []


# --- check_source / eval_split ----------------------------------------------------------------------


def test_unknown_name_lists_the_known_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        check_source("no-such-dataset")
    message = str(info.value)
    assert "'no-such-dataset'" in message
    for name in ("wikitext2", "wikitext2-tokenized", "ptb", "c4", "shipped"):
        assert name in message


def test_directory_is_not_a_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nor an existing file"):
        check_source(str(tmp_path))


def test_csv_file_is_rejected_for_its_extension(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported extension '\.csv'"):
        check_source(str(path))


@pytest.mark.parametrize("name", ["shipped", "wikitext2", "wikitext2-tokenized", "c4", "ptb"])
def test_known_names_pass(name: str) -> None:
    check_source(name)


def test_existing_text_files_pass(tmp_path: Path) -> None:
    for name in ("a.txt", "b.jsonl"):
        (tmp_path / name).write_text("x")
        check_source(str(tmp_path / name))


@pytest.mark.parametrize(
    ("source", "split", "expected"),
    [
        ("wikitext2", None, "test"),
        ("wikitext2-tokenized", None, "test"),
        ("ptb", None, "test"),
        ("c4", None, "validation"),
        ("c4", "", "validation"),
        ("wikitext2", "validation", "validation"),
        ("c4", "train", "train"),
        ("corpus.txt", None, "file"),
        ("shipped", None, "file"),
    ],
)
def test_eval_split(source: str, split: str | None, expected: str) -> None:
    assert eval_split(source, split) == expected


# --- tokenization and calibration -------------------------------------------------------------------


def test_tokenize_text_gives_one_int64_token_per_byte(tokenizer) -> None:
    text = "Hello, world!\n\n = Heading = \n"
    ids = tokenize_text(tokenizer, text)
    assert ids.dtype == torch.int64
    assert ids.dim() == 1
    assert ids.numel() == len(text.encode("utf-8")) == 29
    assert tokenizer.decode(ids.tolist()) == text


def test_tokenize_text_counts_utf8_bytes_not_characters(tokenizer) -> None:
    ids = tokenize_text(tokenizer, "café")
    assert ids.numel() == 5
    # the same text twice gives the same ids twice (no BOS or special token added)
    assert tokenize_text(tokenizer, "cafécafé").tolist() == ids.tolist() * 2


def _corpus(tmp_path: Path, rows: int = 40) -> Path:
    return write_jsonl(tmp_path / "calib.jsonl", [f"row {i:03d} of the calibration text." for i in range(rows)])


def test_calibration_ids_shape_and_segments_from_the_corpus(tmp_path: Path, tokenizer) -> None:
    path = _corpus(tmp_path)
    config = CalibrationConfig(source=str(path), num_samples=6, seqlen=32)
    ids = calibration_ids(config, tokenizer, seed=0, data_dir=None)
    assert ids.shape == (6, 32) and ids.dtype == torch.int64
    corpus = tokenize_text(tokenizer, load_text(str(path))).tolist()
    for sample in ids.tolist():
        starts = [i for i in range(len(corpus) - 31) if corpus[i : i + 32] == sample]
        assert starts, "each sample must be a contiguous run of the tokenized corpus"


def test_calibration_ids_deterministic_by_seed(tmp_path: Path, tokenizer) -> None:
    config = CalibrationConfig(source=str(_corpus(tmp_path)), num_samples=6, seqlen=32)
    first = calibration_ids(config, tokenizer, seed=5, data_dir=None)
    again = calibration_ids(config, tokenizer, seed=5, data_dir=None)
    other = calibration_ids(config, tokenizer, seed=6, data_dir=None)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_calibration_ids_from_a_named_mirror(tmp_path: Path, tokenizer) -> None:
    write_jsonl(tmp_path / "wikitext" / "wikitext-2-raw-v1" / "validation.jsonl", ["abcdefgh" * 8])
    config = CalibrationConfig(source="wikitext2", split="validation", num_samples=2, seqlen=16)
    ids = calibration_ids(config, tokenizer, seed=0, data_dir=str(tmp_path))
    assert ids.shape == (2, 16)
    # 64 tokens = 4 whole chunks, no slack: every sample is one period-8 run starting at "a"
    expected = tokenize_text(tokenizer, "abcdefgh" * 2)
    assert torch.equal(ids, expected.expand(2, 16))


def test_calibration_ids_too_little_text(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "short.jsonl", ["x" * 50, "y" * 50])  # 102 tokens
    config = CalibrationConfig(source=str(path), num_samples=4, seqlen=32)
    with pytest.raises(DataError) as info:
        calibration_ids(config, tokenizer, seed=0, data_dir=None)
    message = str(info.value)
    assert "102 tokens" in message
    assert "data.num_samples" in message and "data.seqlen" in message
    assert "4 disjoint samples of 32 tokens" in message


def test_calibration_config_rejects_impossible_sizes() -> None:
    with pytest.raises(DataError, match="num_samples=0"):
        CalibrationConfig(num_samples=0)
    with pytest.raises(DataError, match="seqlen=1"):
        CalibrationConfig(seqlen=1)
