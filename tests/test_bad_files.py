"""Every kind of file the tool reads, truncated or replaced by random bytes: a one-line error and exit 2,
never a traceback, and nothing already written is damaged.

Each case corrupts one file of a real output (a tiny RTN run made once per module), runs the command that
reads it in-process (an uncaught exception would fail the test with its traceback) and checks the exit
status, that the message names the file, and that the files the command must not touch are byte-identical.
Corruptions are seeded, so a failure reproduces.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cbq_lightning.cli import main
from cbq_lightning.errors import FileFormatError
from cbq_lightning.files import check_json, check_safetensors
from tests.conftest import TINY_RECIPE

FAST = ["--advanced.trainer.enable_progress_bar", "false", "--eval.max_windows", "1", "--advanced.monitor.rtn_reference", "false"]


def _truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_to_7(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:7])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _random_bytes(path: Path) -> None:
    size = max(path.stat().st_size, 64)
    path.write_bytes(random.Random(f"{path.name}:{size}").randbytes(size))


def _flip_tail(path: Path) -> None:
    """Keep the header, drop the last tenth: a write cut short after the header."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - max(1, len(data) // 10)])


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "half": _truncate_half, "seven-bytes": _truncate_to_7, "empty": _empty, "random": _random_bytes,
    "tail-cut": _flip_tail,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny RTN run: ``model/``, ``quant_state.safetensors``, ``report.json``."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["quantize", "--config", str(TINY_RECIPE), "--method", "rtn", "--output_dir", str(out), *FAST]) == 0
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _broken_copy(tiny_run: Path, tmp_path: Path, relative: str, corruption: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    CORRUPTIONS[corruption](run / relative)
    return run


def _expect_clean_error(argv: list[str], names: str, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("cbq: error:")]
    assert len(message) == 1 and names in message[0], err[-2000:]
    return message[0]


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("relative", ["quant_state.safetensors", "model/model.safetensors", "model/config.json",
                                      "model/cbq_quantization.json", "model/tokenizer.json"])
def test_export_of_a_broken_run_is_a_clean_error(tiny_run: Path, tmp_path: Path, relative: str, corruption: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = _broken_copy(tiny_run, tmp_path, relative, corruption)
    before = _digest(run)
    output = tmp_path / "export"
    _expect_clean_error(["export", "--run", str(run), "--format", "compressed-tensors", "--output", str(output)],
                        Path(relative).name, capsys)
    assert not output.exists()
    assert _digest(run) == before


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("relative", ["model/model.safetensors", "model/config.json", "model/cbq_quantization.json",
                                      "model/tokenizer.json"])
def test_evaluating_a_broken_run_is_a_clean_error(tiny_run: Path, tmp_path: Path, relative: str, corruption: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = _broken_copy(tiny_run, tmp_path, relative, corruption)
    before = _digest(run)
    _expect_clean_error(["evaluate", "--model", str(run), "--data", "shipped", "--max_windows", "1"],
                        Path(relative).name, capsys)
    assert _digest(run) == before


@pytest.mark.parametrize("corruption", ["half", "random", "empty"])
def test_a_broken_calibration_file_is_a_clean_error_and_keeps_the_outputs(
    tiny_run: Path, tmp_path: Path, corruption: str, capsys: pytest.CaptureFixture[str],
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"row {i} " * 40}) + "\n" for i in range(64)))
    CORRUPTIONS[corruption](corpus)
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)  # an earlier run's outputs in the same folder
    before = _digest(out)
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), "--data.source", str(corpus),
                 *FAST])
    err = capsys.readouterr().err
    if corruption == "empty":  # an empty file is valid JSONL with no rows: too little text, also exit 2
        assert code == 2 and "Traceback" not in err
    else:
        assert code == 2 and "corpus.jsonl" in err and "Traceback" not in err, err[-2000:]
    assert _digest(out) == before


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_broken_gguf_is_a_clean_error(tmp_path: Path, corruption: str, capsys: pytest.CaptureFixture[str]) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", __import__("numpy").ones((64, 32), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    CORRUPTIONS[corruption](path)
    _expect_clean_error(["evaluate", "--model", str(path), "--data", "shipped", "--max_windows", "1"], "model.gguf",
                        capsys)


# --- the checks themselves ---------------------------------------------------------------------------------


def test_safetensors_check_accepts_a_whole_file_and_names_the_problem(tiny_run: Path, tmp_path: Path) -> None:
    header = check_safetensors(tiny_run / "quant_state.safetensors", "fix")
    assert any(name.endswith(".qweight") for name in header)
    broken = tmp_path / "x.safetensors"
    broken.write_bytes((tiny_run / "quant_state.safetensors").read_bytes()[:-1])
    with pytest.raises(FileFormatError, match=r"x\.safetensors: truncated: tensor .* ends at byte .*; fix"):
        check_safetensors(broken, "fix")
    with pytest.raises(FileFormatError, match="file not found"):
        check_safetensors(tmp_path / "missing.safetensors", "fix")


def test_json_check_says_where_the_json_breaks(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"a": 1,\n "b": ')
    with pytest.raises(FileFormatError, match=r"c\.json: not valid JSON \(.*, line 2; truncated\?\); redo"):
        check_json(path, "redo")
    path.write_text('{"a": [1, 2]}')
    assert check_json(path, "redo") == {"a": [1, 2]}
