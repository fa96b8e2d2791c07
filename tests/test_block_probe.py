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
    usage = capsys.readouterr().err
    assert "block_probe.py 8" in usage and "--ppl-windows" in usage


def test_probe_perplexity_puts_the_quantized_blocks_before_the_full_precision_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--ppl-windows``: 8-bit round-to-nearest on blocks 0-1 followed by the FP blocks 2-3 scores within
    0.5 % of the whole FP model, while the first two FP blocks alone score clearly differently (so the rest
    really is put back)."""
    from cbq_lightning.evaluation.perplexity import evaluate_sets, prepare_eval_set
    from cbq_lightning.models.loading import load_tokenizer
    from tests.conftest import load_recipe

    probe = _probe()
    code = probe.main(["2", "--ppl-windows", "2", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path),
                       "--method", "rtn", "--quant.scheme", "W8A16", "--trainer.enable_progress_bar", "false"])
    assert code == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("held-out perplexity")][0]
    probed = float(line.rsplit(":", 1)[1])
    config = load_recipe(TINY_RECIPE)
    tokenizer = load_tokenizer(config.model)
    eval_set = prepare_eval_set(config.eval.datasets[0], tokenizer, config.eval.seqlen, config.eval.split, 2,
                                config.data_dir)
    model = probe.runner.load_model(config.model, vocab_size=len(tokenizer), seed=config.seed)
    full = evaluate_sets(model, [eval_set], "cpu")[0]["ppl"]
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    first_two = evaluate_sets(model, [eval_set], "cpu")[0]["ppl"]
    assert abs(first_two / full - 1) > 0.01, (first_two, full)
    assert abs(probed / full - 1) < 0.005, (probed, full)
