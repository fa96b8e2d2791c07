"""The Python API (``from cbq_lightning import quantize``): the same run as ``cbq quantize`` on a model in memory.

The central check: the API on a model loaded by the caller, with the recipe's own data, writes the same integer
codes, scales and perplexities as the command line on the same recipe; then the forms of calibration it takes, the
README's example as written (only the model path and budget substituted), and its refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbq_lightning import quantize
from cbq_lightning.api import load_recipe
from cbq_lightning.data.calibration import sample_segments
from cbq_lightning.data.text import ROW_SEPARATOR, tokenize_text
from cbq_lightning.errors import CBQError, ConfigError
from cbq_lightning.models.loading import load_model, load_tokenizer
from tests.conftest import TINY_RECIPE

#: what makes a tiny run quick and quiet (the API takes the command line's dotted keys)
FAST = {"train.epochs": 1, "advanced.trainer.enable_progress_bar": False, "eval.datasets": []}


def _tiny(recipe: Path = TINY_RECIPE):
    """The tiny recipe's model and tokenizer, loaded by the caller as a user would load theirs."""
    config = load_recipe(recipe)
    tokenizer = load_tokenizer(config.model)
    return load_model(config.model, vocab_size=len(tokenizer), seed=config.seed), tokenizer


def _same_state(a: Path, b: Path) -> None:
    left, right = load_file(a / "quant_state.safetensors"), load_file(b / "quant_state.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_api_run_equals_the_command_line_run(cli_run: Path, tmp_path: Path) -> None:
    model, tokenizer = _tiny()
    result = quantize(model, tokenizer, recipe=TINY_RECIPE, output_dir=tmp_path,
                      overrides={"advanced.trainer.enable_progress_bar": False})
    _same_state(cli_run, tmp_path)
    cli_report = json.loads((cli_run / "report.json").read_text())
    assert [e["ppl"] for e in result.report["eval"]] == [e["ppl"] for e in cli_report["eval"]]
    assert result.report["model"]["in_memory"] is True and cli_report["model"]["in_memory"] is False
    assert result.model is model  # quantized in place
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_text_calibration_is_cut_as_the_recipe_cuts_its_corpus(tmp_path: Path) -> None:
    documents = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 12 for i in range(12)]
    overrides = {**FAST, "data.num_samples": 4, "data.seqlen": 64}
    model, tokenizer = _tiny()
    by_text = quantize(model, tokenizer, recipe=TINY_RECIPE, calibration=documents, output_dir=tmp_path / "text",
                       overrides=overrides)
    assert by_text.report["calibration"] == {
        "source": "supplied by the caller", "num_samples": 4, "seqlen": 64, "tokens": 256}
    ids = sample_segments(tokenize_text(tokenizer, ROW_SEPARATOR.join(documents)), 4, 64, seed=0)
    model, tokenizer = _tiny()
    quantize(model, None, recipe=TINY_RECIPE, calibration=ids, output_dir=tmp_path / "ids", overrides=overrides)
    _same_state(tmp_path / "text", tmp_path / "ids")


@pytest.mark.parametrize("call, message", [
    (lambda m, t: quantize("model", t, recipe=TINY_RECIPE), "not a transformers causal LM"),
    (lambda m, t: quantize(m, None, recipe=TINY_RECIPE), "neither calibration ids nor a tokenizer"),
    (lambda m, t: quantize(m, None, recipe=TINY_RECIPE, calibration=torch.zeros(4, 8)), "integer tensor"),
    (lambda m, t: quantize(m, None, recipe=TINY_RECIPE, calibration=torch.full((2, 8), 10_000)),
     "outside the model's vocabulary"),
    (lambda m, t: quantize(m, None, recipe=TINY_RECIPE, calibration=torch.zeros(2, 8, dtype=torch.long)),
     "eval.datasets"),
    (lambda m, t: quantize(m, None, recipe=TINY_RECIPE, calibration="some text"), "needs the model's tokenizer"),
    (lambda m, t: quantize(m, t, recipe=TINY_RECIPE, overrides={"quant.shceme": "W4A16"}), "quant.shceme"),
    (lambda m, t: quantize(m, t, recipe=42), "recipe is a int"),
])
def test_refusals_are_one_line(call, message: str) -> None:
    model, tokenizer = _tiny()
    with pytest.raises(CBQError) as raised:
        call(model, tokenizer)
    text = str(raised.value)
    assert message in text and "\n" not in text, text


def test_save_false_leaves_nothing_and_returns_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the scratch folder goes, to look at it after
    model, tokenizer = _tiny()
    result = quantize(model, tokenizer, recipe=TINY_RECIPE, overrides={**FAST, "data.num_samples": 4}, save=False)
    assert result.model is model and result.report["method"] == "cbq"
    assert sum(1 for _ in model.modules() if type(_).__name__ == "FinalizedQuantLinear") == 4 * 7
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="save=False keeps nothing"):
        quantize(model, tokenizer, recipe=TINY_RECIPE, overrides={"export.format": "compressed-tensors"}, save=False)


def test_overrides_need_a_recipe_file() -> None:
    model, tokenizer = _tiny()
    with pytest.raises(ConfigError, match="dataclasses.replace"):
        quantize(model, tokenizer, recipe=load_recipe(TINY_RECIPE), overrides={"seed": 1})
