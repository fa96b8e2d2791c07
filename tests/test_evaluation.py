"""Perplexity (GPTQ/OmniQuant protocol): windows, the float64 metric, the model loop, eval sets, config checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cbq_lightning.errors import ConfigError, DataError
from cbq_lightning.evaluation.perplexity import (
    EvalConfig,
    EvalTuning,
    WindowPerplexity,
    cut_windows,
    perplexity,
    prepare_eval_set,
)
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_llama, byte_tokenizer

# --- cut_windows ------------------------------------------------------------------------------------


def test_cut_windows_hand_example_drops_the_tail() -> None:
    windows = cut_windows(torch.arange(10), seqlen=3)
    assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_cut_windows_exact_fit_keeps_everything() -> None:
    assert cut_windows(torch.arange(8), seqlen=4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_cut_windows_max_windows_caps_from_the_start() -> None:
    assert cut_windows(torch.arange(10), seqlen=3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert cut_windows(torch.arange(10), seqlen=3, max_windows=1).tolist() == [[0, 1, 2]]


def test_cut_windows_max_windows_above_available() -> None:
    assert cut_windows(torch.arange(10), seqlen=3, max_windows=50).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_cut_windows_shorter_than_one_window() -> None:
    with pytest.raises(DataError, match="fewer than one window of 8"):
        cut_windows(torch.arange(7), seqlen=8)


# --- WindowPerplexity -------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [2, 7, 257])
def test_uniform_logits_give_ppl_equal_to_vocab(vocab: int) -> None:
    metric = WindowPerplexity()
    ids = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(0))
    metric.update(torch.zeros(3, 5, vocab), ids)
    assert math.isclose(float(metric.compute()), vocab, rel_tol=1e-6)


def test_hand_computed_two_predictions() -> None:
    # ids [0, 1, 2]: position 0 predicts 1 from logits [2, 0, 0] -> nll = log(e^2 + 2)
    #                position 1 predicts 2 from logits [0, 1, 0] -> nll = log(2 + e)
    #                position 2's logits predict nothing (huge values that would spoil the result if used)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [50.0, -50.0, -50.0]]])
    ids = torch.tensor([[0, 1, 2]])
    metric = WindowPerplexity()
    metric.update(logits, ids)
    e = math.e
    expected = math.exp((math.log(e**2 + 2) + math.log(2 + e)) / 2)  # = sqrt((e^2 + 2)(e + 2)) ~ 6.4
    assert math.isclose(float(metric.compute()), expected, rel_tol=1e-6)
    assert math.isclose(float(metric.nll_sum), math.log(e**2 + 2) + math.log(2 + e), rel_tol=1e-6)
    assert int(metric.count) == 2


def test_two_updates_equal_one_update_on_the_concatenation() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 6, 11, generator=generator) * 3
    ids = torch.randint(0, 11, (5, 6), generator=generator)
    split = WindowPerplexity()
    split.update(logits[:2], ids[:2])
    split.update(logits[2:], ids[2:])
    whole = WindowPerplexity()
    whole.update(logits, ids)
    assert int(split.count) == int(whole.count) == 5 * 5
    assert math.isclose(float(split.compute()), float(whole.compute()), rel_tol=1e-6)
    # and a single window on its own gives a different value (the accumulation is not a no-op)
    first = WindowPerplexity()
    first.update(logits[:1], ids[:1])
    assert not math.isclose(float(first.compute()), float(whole.compute()), rel_tol=1e-3)


def test_state_is_float64() -> None:
    metric = WindowPerplexity()
    assert metric.nll_sum.dtype == torch.float64
    metric.update(torch.randn(1, 4, 3, dtype=torch.bfloat16), torch.tensor([[0, 1, 2, 0]]))
    assert metric.nll_sum.dtype == torch.float64
    assert metric.compute().dtype == torch.float64


def test_reset_clears_the_state() -> None:
    metric = WindowPerplexity()
    metric.update(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]))
    metric.reset()
    metric.update(torch.zeros(1, 3, 9), torch.tensor([[0, 1, 2]]))
    assert math.isclose(float(metric.compute()), 9.0, rel_tol=1e-6)


# --- perplexity on the tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return build_tiny_llama(TinyModelConfig(), vocab_size=257, seed=0)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_perplexity_matches_hf_loss(tiny_model: torch.nn.Module, batch_size: int) -> None:
    windows = torch.randint(0, 257, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        losses = [float(tiny_model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    assert math.isclose(perplexity(tiny_model, windows, batch_size=batch_size), expected, rel_tol=1e-5)


def test_the_progress_bar_follows_the_switch(tiny_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]) -> None:
    """A run with ``advanced.trainer.enable_progress_bar: false`` shows no evaluation bar either."""
    windows = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(4))
    quiet = perplexity(tiny_model, windows, desc="quiet-set", progress_bar=False)
    shown = perplexity(tiny_model, windows, desc="shown-set")
    captured = capsys.readouterr()
    assert quiet == shown
    assert "quiet-set" not in captured.err + captured.out and "shown-set" in captured.err


def test_perplexity_restores_training_mode(tiny_model: torch.nn.Module) -> None:
    windows = torch.randint(0, 257, (1, 8), generator=torch.Generator().manual_seed(3))
    tiny_model.train()
    try:
        perplexity(tiny_model, windows)
        assert tiny_model.training
    finally:
        tiny_model.eval()
    perplexity(tiny_model, windows)
    assert not tiny_model.training


# --- prepare_eval_set -------------------------------------------------------------------------------


def test_prepare_eval_set_on_a_text_file(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    tokenizer = byte_tokenizer()
    eval_set = prepare_eval_set(str(path), tokenizer, seqlen=64, data_dir=None)
    assert eval_set.total_tokens == 1000
    assert eval_set.windows.shape == (15, 64) and eval_set.windows.dtype == torch.int64
    assert eval_set.describe() == {"dataset": str(path), "split": "file", "seqlen": 64, "windows": 15,
                                   "tokens": 960}
    assert tokenizer.decode(eval_set.windows[0].tolist()) == text[:64]
    assert tokenizer.decode(eval_set.windows[14].tolist()) == text[896:960]

    capped = prepare_eval_set(str(path), tokenizer, seqlen=64, max_windows=3, data_dir=None)
    assert capped.describe()["windows"] == 3 and capped.describe()["tokens"] == 192
    assert capped.total_tokens == 1000
    assert torch.equal(capped.windows, eval_set.windows[:3])


def test_prepare_eval_set_named_mirror_uses_the_standard_split(tmp_path: Path) -> None:
    folder = tmp_path / "c4"
    folder.mkdir()
    (folder / "validation.jsonl").write_text('{"text": "abcd"}\n{"text": "efgh"}\n')
    eval_set = prepare_eval_set("c4", byte_tokenizer(), seqlen=4, data_dir=str(tmp_path))
    assert eval_set.split == "validation"
    assert eval_set.total_tokens == 9  # "abcd efgh"
    assert byte_tokenizer().decode(eval_set.windows.flatten().tolist()) == "abcd efg"


def test_prepare_eval_set_too_short(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(DataError, match="4 tokens"):
        prepare_eval_set(str(path), byte_tokenizer(), seqlen=16, data_dir=None)


# --- EvalConfig.check -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"seqlen": 1}, ConfigError, "eval.seqlen=1"),
        ({"seqlen": 0}, ConfigError, "eval.seqlen=0"),
        ({"max_windows": 0}, ConfigError, "eval.max_windows=0"),
                ({"datasets": ["shipped", "no-such-dataset"]}, DataError, "'no-such-dataset'"),
    ],
)
def test_eval_config_check_rejects(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        EvalConfig(**kwargs)


def test_eval_tuning_refuses_an_empty_batch() -> None:
    with pytest.raises(ConfigError, match=r"advanced\.eval\.batch_size=0 must be >= 1"):
        EvalTuning(batch_size=0)
    assert EvalTuning(split="validation", batch_size=4).batch_size == 4


def test_eval_config_check_accepts_valid_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "x"}\n')
    EvalConfig(datasets=["wikitext2", "c4", "shipped", str(path)], seqlen=2, max_windows=1)
    EvalConfig()
