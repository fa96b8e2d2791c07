"""Calibration segments and corpus loading."""

from __future__ import annotations

import json

import pytest
import torch

from cbq_lightning.data.calibration import CalibrationConfig, calibration_ids, sample_segments
from cbq_lightning.data.text import SHIPPED_SOURCE, load_text
from cbq_lightning.errors import DataError

# --- sample_segments --------------------------------------------------------------------------------


def test_segments_shape_dtype_and_contiguity():
    tokens = torch.arange(1000, dtype=torch.long)
    segments = sample_segments(tokens, num_samples=4, seqlen=16, seed=0)
    assert segments.shape == (4, 16)
    assert segments.dtype == torch.long
    # each segment is a contiguous run of the corpus (tokens are their own positions here)
    steps = segments[:, 1:] - segments[:, :-1]
    assert (steps == 1).all()
    assert int(segments.min()) >= 0 and int(segments.max()) <= 999


def test_segments_are_disjoint_and_on_one_chunk_grid():
    tokens = torch.arange(1000)
    segments = sample_segments(tokens, num_samples=10, seqlen=16, seed=3)
    flat = segments.flatten().tolist()
    assert len(set(flat)) == len(flat) == 160
    # 1000 // 16 = 62 chunks, slack 8: all segments start at the same offset modulo 16, offset <= 8
    starts = segments[:, 0]
    offsets = set((starts % 16).tolist())
    assert len(offsets) == 1 and offsets.pop() <= 8


def test_segments_deterministic_for_a_seed():
    tokens = torch.arange(1000)
    a = sample_segments(tokens, 4, 16, seed=0)
    b = sample_segments(tokens, 4, 16, seed=0)
    c = sample_segments(tokens, 4, 16, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(a[:, 0].tolist()) != set(c[:, 0].tolist())


def test_segments_exact_fit_use_every_token_once():
    tokens = torch.arange(60)
    segments = sample_segments(tokens, num_samples=3, seqlen=20, seed=0)
    assert sorted(segments.flatten().tolist()) == list(range(60))
    assert sorted(segments[:, 0].tolist()) == [0, 20, 40]


def test_segments_do_not_alias_the_corpus():
    tokens = torch.arange(100)
    segments = sample_segments(tokens, 2, 10, seed=0)
    segments.zero_()
    assert torch.equal(tokens, torch.arange(100))


def test_too_short_text_raises_with_numbers():
    with pytest.raises(DataError) as info:
        sample_segments(torch.arange(50), num_samples=3, seqlen=20, seed=0)
    message = str(info.value)
    assert "50 tokens" in message
    assert "3 disjoint samples" in message
    assert "20 tokens" in message
    assert "60 needed" in message


def test_calibration_config_validation():
    with pytest.raises(DataError):
        CalibrationConfig(num_samples=0)
    with pytest.raises(DataError):
        CalibrationConfig(seqlen=1)


def test_calibration_ids_with_char_tokenizer(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz" * 4, encoding="utf-8")

    def tokenizer(text, **kwargs):
        # the GPTQ protocol: the tokenizer's own defaults (a BOS, if it adds one, once at the corpus start)
        assert "add_special_tokens" not in kwargs
        return {"input_ids": [ord(ch) - ord("a") for ch in text]}

    config = CalibrationConfig(source=str(path), num_samples=5, seqlen=20)
    ids = calibration_ids(config, tokenizer, seed=0)
    assert ids.shape == (5, 20) and ids.dtype == torch.long
    # 104 tokens, 5 chunks of 20, slack 4: consecutive letters mod 26
    assert ((ids[:, 1:] - ids[:, :-1]) % 26 == 1).all()
    assert torch.equal(ids, calibration_ids(config, tokenizer, seed=0))


# --- load_text --------------------------------------------------------------------------------------


def test_load_text_jsonl_joins_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": "first row"}, {"text": ""}, {"text": " = Heading = \n"}, {"text": "last"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_text(str(path)) == "first row\n\n\n\n = Heading = \n\n\nlast"


def test_load_text_jsonl_custom_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"content": "a", "text": "x"}\n{"content": "b"}\n', encoding="utf-8")
    assert load_text(str(path), field="content") == "a\n\nb"


def test_load_text_jsonl_missing_field_raises(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl:2 has no 'text' field"):
        load_text(str(path))


def test_load_text_txt_returns_file(tmp_path):
    path = tmp_path / "corpus.txt"
    content = "line one\n\nline two — ünïcödé\n"
    path.write_text(content, encoding="utf-8")
    assert load_text(str(path)) == content


def test_load_text_missing_file_raises(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nor an existing file"):
        load_text(str(missing))


def test_load_text_directory_raises(tmp_path):
    with pytest.raises(DataError, match="nor an existing file"):
        load_text(str(tmp_path))


def test_load_text_unsupported_extension_raises(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported extension"):
        load_text(str(path))


def test_load_text_shipped_excerpt():
    text = load_text(SHIPPED_SOURCE)
    assert isinstance(text, str) and len(text) > 1000
