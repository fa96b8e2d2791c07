"""benchmarks/block_probe.py: the recipe's model cut to its first N blocks, quantized, errors printed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_RECIPE


def _probe():
    spec = importlib.util.spec_from_file_location("block_probe", REPO / "benchmarks" / "block_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_quantizes_only_the_first_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe = _probe()
    loader = probe.runner.load_model
    code = probe.main(["2", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path),
                       "--trainer.enable_progress_bar", "false"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [entry["block"] for entry in report["block_errors"]] == [0, 1]
    assert not report.get("eval"), "the probe does not evaluate"
    assert "final relative error after block 2" in capsys.readouterr().out
    assert probe.runner.load_model is loader, "the cut must not leak into later runs in the same process"


def test_probe_without_arguments_prints_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert _probe().main(["--config", str(TINY_RECIPE)]) == 2
    assert "block_probe.py 8 --config" in capsys.readouterr().err
