"""Perplexity through the CLI: ``cbq quantize`` with an eval section, then ``cbq evaluate`` on its output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cbq_lightning.cli import main
from tests.conftest import TINY_RECIPE

EVAL_KEYS = {"dataset", "split", "seqlen", "windows", "tokens", "ppl", "ppl_fp"}
EVAL_FLAGS = ["--eval.datasets", "[shipped]", "--eval.seqlen", "128", "--eval.max_windows", "4"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_eval")
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out),
                 "--advanced.trainer.enable_progress_bar", "false", *EVAL_FLAGS, "--train.epochs", "1"])
    assert code == 0
    return out


def test_report_has_one_eval_entry(quantized: Path) -> None:
    report = json.loads((quantized / "report.json").read_text())
    assert len(report["eval"]) == 1
    entry = report["eval"][0]
    assert EVAL_KEYS <= entry.keys(), EVAL_KEYS - entry.keys()
    assert entry["dataset"] == "shipped" and entry["split"] == "file"
    assert entry["seqlen"] == 128 and entry["windows"] == 4 and entry["tokens"] == 512
    assert math.isfinite(entry["ppl"]) and entry["ppl"] > 1
    assert math.isfinite(entry["ppl_fp"]) and entry["ppl_fp"] > 1
    # a random byte model is near-uniform over 257 tokens; 3-bit weights change it, but not wildly
    assert entry["ppl"] != entry["ppl_fp"]
    assert 50 < entry["ppl_fp"] < 1000


def test_evaluate_reproduces_the_report(quantized: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = quantized / "eval.json"
    code = main(["evaluate", "--model", str(quantized), "--data", "shipped", "--seqlen", "128",
                 "--max_windows", "4", "--output", str(output)])
    assert code == 0
    assert "shipped file: ppl" in capsys.readouterr().out
    summary = json.loads(output.read_text())
    assert summary["quantization"] is not None, "the cbq sidecar of the checkpoint should be reported"
    assert len(summary["results"]) == 1
    result = summary["results"][0]
    assert (result["windows"], result["tokens"], result["seqlen"]) == (4, 512, 128)
    reported = json.loads((quantized / "report.json").read_text())["eval"][0]["ppl"]
    assert math.isclose(result["ppl"], reported, rel_tol=1e-5), (result["ppl"], reported)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--data.source", "no-such-dataset"], "no-such-dataset"),
        (["--data.source", "wikitext2", "--data.split", "test"], "data.split=test"),
        (["--eval.datasets", "[no-such-eval-set]"], "no-such-eval-set"),
        (["--eval.seqlen", "1"], "eval.seqlen=1"),
        (["--eval.max_windows", "0"], "eval.max_windows=0"),
    ],
)
def test_bad_data_is_an_early_error(overrides: list[str], message: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path / "out"),
                 "--advanced.trainer.enable_progress_bar", "false", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_without_fp_reference_ppl_fp_is_none(tmp_path: Path) -> None:
    # rtn: the same evaluation path as cbq, without the training time
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), "--method", "rtn",
                 "--advanced.trainer.enable_progress_bar", "false", *EVAL_FLAGS, "--eval.max_windows", "2",
                 "--eval.fp_reference", "false"])
    assert code == 0
    entries = json.loads((tmp_path / "report.json").read_text())["eval"]
    assert len(entries) == 1
    assert entries[0]["ppl_fp"] is None
    assert entries[0]["windows"] == 2 and math.isfinite(entries[0]["ppl"])
