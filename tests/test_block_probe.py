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


def _full_precision_perplexities(probe, kept: slice) -> tuple[float, float]:
    """The tiny recipe's full-precision model on its first 2 evaluation windows: whole, and cut to the blocks
    ``kept`` (what a probe would score if it lost the blocks it puts around the probed ones)."""
    from cbq_lightning.evaluation.perplexity import evaluate_sets, prepare_eval_set
    from cbq_lightning.models.loading import load_tokenizer
    from tests.conftest import load_recipe

    config = load_recipe(TINY_RECIPE)
    tokenizer = load_tokenizer(config.model)
    eval_set = prepare_eval_set(config.eval.datasets[0], tokenizer, config.eval.seqlen, config.advanced.eval.split, 2,
                                config.data_dir)
    model = probe.runner.load_model(config.model, vocab_size=len(tokenizer), seed=config.seed)
    full = evaluate_sets(model, [eval_set], "cpu")[0]["ppl"]
    model.model.layers = model.model.layers[kept]
    model.config.num_hidden_layers = len(model.model.layers)
    return full, evaluate_sets(model, [eval_set], "cpu")[0]["ppl"]


def test_probe_quantizes_only_the_first_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe = _probe()
    loader = probe.runner.load_model
    code = probe.main(["2", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path),
                       "--advanced.trainer.enable_progress_bar", "false"])
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
    probe = _probe()
    code = probe.main(["2", "--ppl-windows", "2", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path),
                       "--method", "rtn", "--quant.scheme", "W8A16", "--advanced.trainer.enable_progress_bar", "false"])
    assert code == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("held-out perplexity")][0]
    probed = float(line.rsplit(":", 1)[1])
    full, first_two = _full_precision_perplexities(probe, slice(0, 2))
    assert abs(first_two / full - 1) > 0.01, (first_two, full)
    assert abs(probed / full - 1) < 0.005, (probed, full)


def test_probe_from_a_later_block_runs_the_blocks_before_it_in_full_precision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--from-block 1``: blocks 1-2 probed, block 0 run in full precision in front of them from the
    embedding's hook, block 3 put back after them. With 8-bit round-to-nearest on the probed blocks the
    model scores within 0.5 % of the whole FP model; without the prefix (blocks 1-3 alone) it would not."""
    probe = _probe()
    code = probe.main(["2", "--from-block", "1", "--ppl-windows", "2", "--config", str(TINY_RECIPE),
                       "--output_dir", str(tmp_path), "--method", "rtn", "--quant.scheme", "W8A16",
                       "--advanced.trainer.enable_progress_bar", "false"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["block_errors"]) == 2
    out = capsys.readouterr().out
    assert "final relative error after block 3" in out
    line = [x for x in out.splitlines() if x.startswith("held-out perplexity, blocks 1-2 quantized")][0]
    probed = float(line.rsplit(":", 1)[1])
    full, without_prefix = _full_precision_perplexities(probe, slice(1, None))
    assert abs(without_prefix / full - 1) > 0.01, (without_prefix, full)
    assert abs(probed / full - 1) < 0.005, (probed, full)
