"""The full-precision reference is measured once per model and evaluation tokens, and reused by later runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cbq_lightning import runner
from cbq_lightning.evaluation.fp_cache import model_identity
from cbq_lightning.models.loading import ModelConfig
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, load_recipe

FAST = ("--train.epochs", "1", "--advanced.trainer.enable_progress_bar", "false", "--data.num_samples", "4",
        "--eval.max_windows", "3", "--advanced.monitor.rtn_reference", "false")


def _run(out: Path, *overrides: str) -> dict:
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(out), *FAST, *overrides))
    return json.loads((out / "report.json").read_text())


def test_second_run_reuses_the_reference_and_a_change_measures_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBQ_CACHE_DIR", str(tmp_path / "cache"))
    labels: list[str] = []
    evaluate = runner._evaluate

    def counting(config, model, sets, device, label):
        labels.append(label)
        return evaluate(config, model, sets, device, label)

    monkeypatch.setattr(runner, "_evaluate", counting)
    first = _run(tmp_path / "a")
    second = _run(tmp_path / "b", "--quant.scheme", "W4A16")  # another scheme, same model and tokens
    assert labels == ["fp", "cbq", "cbq"]
    assert [e["ppl_fp"] for e in second["eval"]] == [e["ppl_fp"] for e in first["eval"]]
    assert [e["ppl_fp_cached"] for e in first["eval"]] == [False] and [e["ppl_fp_cached"] for e in second["eval"]] == [True]
    _run(tmp_path / "c", "--eval.max_windows", "2")  # other tokens
    _run(tmp_path / "d", "--seed", "1")  # the tiny model is built from the seed: another model
    assert labels == ["fp", "cbq", "cbq", "fp", "cbq", "fp", "cbq"]
    assert len(list((tmp_path / "cache" / "fp_reference").glob("*.json"))) == 3


def test_a_changed_model_file_is_another_model(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    tiny_model.save_pretrained(tmp_path / "model")
    config = ModelConfig(name_or_path=str(tmp_path / "model"))
    before = model_identity(config, tiny_model, seed=0)
    assert before is not None and before == model_identity(config, tiny_model, seed=0)
    weights = tmp_path / "model" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten in place, say
    assert model_identity(config, tiny_model, seed=0) != before


def test_a_model_in_memory_is_always_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cbq_lightning import quantize
    from cbq_lightning.models.loading import load_model, load_tokenizer

    monkeypatch.setenv("CBQ_CACHE_DIR", str(tmp_path / "cache"))
    config = load_recipe(TINY_RECIPE)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, vocab_size=len(tokenizer), seed=0)
    result = quantize(model, tokenizer, recipe=TINY_RECIPE, output_dir=tmp_path / "out",
                      overrides=dict(zip([f[2:] for f in FAST[::2]], FAST[1::2], strict=True)))
    assert [e["ppl_fp_cached"] for e in result.report["eval"]] == [False]
    assert not (tmp_path / "cache" / "fp_reference").exists()
