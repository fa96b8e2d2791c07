"""``cbq evaluate --tasks``: lm-evaluation-harness on the model cbq evaluate loads, checked offline.

A small multiple-choice task is written as an lm-eval task YAML over a local JSONL file (no hub access),
and the accuracy lm-eval reports is compared with an independent computation: the argmax over the
choices of the summed log-likelihood of ``" " + choice`` after the prompt, computed directly with the
same model. The gold answers are chosen from those direct scores, so the expected accuracy is known
exactly and any difference in what is scored (prompt, delimiter, tokens, model) changes it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cbq_lightning.cli import main
from cbq_lightning.evaluation.command import resolve_model_path
from cbq_lightning.evaluation.zero_shot import format_entry, parse_tasks, prepare_tasks, run_tasks
from cbq_lightning.export.fake_quant import attach_activation_quantizers
from cbq_lightning.models.loading import ModelConfig, load_model, load_tokenizer
from cbq_lightning.models.tiny import byte_tokenizer
from tests.conftest import TINY_RECIPE

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason='lm_eval not installed: pip install "cbq-lightning[lm-eval]"'
)
TASK = "cbq_local_mc"
PROMPT = "Question: {}\nAnswer:"


def write_task(directory: Path, rows: list[dict], name: str = TASK, data: Path | None = None) -> Path:
    """An lm-eval multiple-choice task over a local JSONL file (``question``, ``choices``, ``answer``)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = data or directory / f"{name}.jsonl"
    if rows:
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return directory


@torch.no_grad()
def choice_logliks(model: torch.nn.Module, tokenizer, question: str, choices: list[str]) -> list[float]:
    """Summed log-probability of the tokens of ``" " + choice`` after the prompt, for each choice."""
    context = tokenizer.encode(PROMPT.format(question), add_special_tokens=False)
    wholes = [tokenizer.encode(PROMPT.format(question) + " " + choice, add_special_tokens=False) for choice in choices]
    assert all(whole[: len(context)] == context for whole in wholes)
    scores = {}
    for length in {len(whole) for whole in wholes}:  # one forward pass per length, no padding
        indices = [index for index, whole in enumerate(wholes) if len(whole) == length]
        tokens = torch.tensor([wholes[index] for index in indices])
        logp = model(tokens).logits.double().log_softmax(-1)
        targets = logp[:, len(context) - 1 : -1].gather(-1, tokens[:, len(context) :, None])
        scores.update(zip(indices, targets.sum(dim=(1, 2)).tolist(), strict=True))
    return [scores[index] for index in range(len(choices))]


def argmax(values: list[float], min_gap: float = 1e-3) -> int:
    """Index of the largest value, which must lead the runner-up clearly (no tie for float noise to flip)."""
    order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
    assert values[order[0]] - values[order[1]] > min_gap, f"near tie in the test data: {values}"
    return order[0]


def permutation_choices(rng: random.Random) -> list[str]:
    """Four same-length choices (permutations of three letters): no length bias, the model decides."""
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", 3)
    return rng.sample(["".join(p) for p in itertools.permutations(letters)], 4)


# --- option handling (no lm_eval needed) ------------------------------------------------------------------


def test_parse_tasks_accepts_lists_and_comma_separated_names() -> None:
    assert parse_tasks(None) == []
    assert parse_tasks("arc_easy, hellaswag,,piqa") == ["arc_easy", "hellaswag", "piqa"]
    assert parse_tasks(["arc_easy,piqa", "piqa", "winogrande"]) == ["arc_easy", "piqa", "winogrande"]


def test_format_entry_pairs_each_metric_with_its_stderr() -> None:
    entry = {"task": "piqa", "samples": 1838, "num_fewshot": 0,
             "metrics": {"acc": 0.605, "acc_stderr": 0.0114, "acc_norm": 0.612, "acc_norm_stderr": None}}
    assert format_entry(entry) == "piqa: acc 0.6050 ± 0.0114, acc_norm 0.6120 (1838 samples, 0-shot)"


def test_missing_lm_eval_is_an_early_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    code = main(["evaluate", "--model", "tiny-llama", "--data", "[]", "--tasks", "arc_easy"])
    assert code == 2
    assert 'pip install "cbq-lightning[lm-eval]"' in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "[]"], "nothing to evaluate"),
        (["--task_dir", "tasks"], "task_dir='tasks' applies to lm-eval tasks only"),
        (["--tasks", "arc_easy", "--limit", "0"], "limit=0"),
        (["--tasks", "arc_easy", "--num_fewshot", "-1"], "num_fewshot=-1"),
        (["--tasks", "arc_easy", "--lm_eval_batch_size", "big"], "lm_eval_batch_size='big'"),
    ],
)
def test_bad_options_are_early_errors(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", "tiny-llama", *flags]) == 2
    assert message in capsys.readouterr().err


# --- the bridge on the tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_rows(tiny_model: torch.nn.Module) -> tuple[list[dict], float, float]:
    """Eight questions with gold answers set from direct scores: the expected acc and acc_norm are exact."""
    tokenizer, rng = byte_tokenizer(), random.Random(0)
    questions = [(f"Which word goes with item {i}?", permutation_choices(rng)) for i in range(6)]
    # different lengths: acc (summed log-likelihood) and acc_norm (per character) can pick differently
    questions += [("Which animal is largest?", ["ox", "bee", "lion", "horse"]),
                  ("Which is a colour?", ["blue", "grey", "green", "amber red"])]
    rows, correct, correct_norm = [], [], []
    for index, (question, choices) in enumerate(questions):
        scores = choice_logliks(tiny_model, tokenizer, question, choices)
        pred = argmax(scores)
        pred_norm = argmax([score / len(choice) for score, choice in zip(scores, choices, strict=True)])
        gold = pred if index < 5 else (pred + 1) % len(choices)  # 5 of 8 right by construction
        rows.append({"question": question, "choices": choices, "answer": gold})
        correct.append(float(pred == gold))
        correct_norm.append(float(pred_norm == gold))
    assert sum(correct) == 5
    return rows, statistics.mean(correct), statistics.mean(correct_norm)


@needs_lm_eval
def test_bridge_accuracy_equals_direct_scoring(tiny_model: torch.nn.Module, scored_rows, tmp_path: Path) -> None:
    rows, acc, acc_norm = scored_rows
    prepared = prepare_tasks([TASK], str(write_task(tmp_path / "tasks", rows)))
    [entry] = run_tasks(tiny_model, byte_tokenizer(), prepared, batch_size=8)
    assert entry["task"] == TASK and not entry["group"]
    assert entry["samples"] == entry["samples_total"] == len(rows)
    assert entry["num_fewshot"] == 0
    metrics = entry["metrics"]
    assert metrics["acc"] == pytest.approx(acc, abs=1e-12) and acc == 5 / 8
    assert metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    # lm-eval's standard error of a mean: sample standard deviation / sqrt(n)
    expected_stderr = statistics.stdev([1.0] * 5 + [0.0] * 3) / math.sqrt(len(rows))
    assert metrics["acc_stderr"] == pytest.approx(expected_stderr, rel=1e-9)


@needs_lm_eval
def test_limit_evaluates_the_first_documents(tiny_model: torch.nn.Module, scored_rows, tmp_path: Path) -> None:
    rows, _, _ = scored_rows
    prepared = prepare_tasks([TASK], str(write_task(tmp_path / "tasks", rows)))
    [entry] = run_tasks(tiny_model, byte_tokenizer(), prepared, limit=3, batch_size=4)
    assert (entry["samples"], entry["samples_total"]) == (3, len(rows))
    assert entry["metrics"]["acc"] == 1.0  # the first five golds are the model's own picks


@needs_lm_eval
def test_unknown_task_is_an_early_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = write_task(tmp_path / "tasks", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    code = main(["evaluate", "--model", "no-such-model", "--data", "[]", "--tasks", f"{TASK}x",
                 "--task_dir", str(tasks)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"unknown lm-eval task '{TASK}x'" in err and f"did you mean {TASK}" in err, err
    assert "lm-eval ls tasks" in err and "--task_dir" in err


@needs_lm_eval
def test_missing_task_data_is_an_early_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = write_task(tmp_path / "tasks", [], data=tmp_path / "missing.jsonl")
    code = main(["evaluate", "--model", "no-such-model", "--data", "[]", "--tasks", TASK, "--task_dir", str(tasks)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"lm-eval task '{TASK}' could not be loaded" in err, err


@needs_lm_eval
def test_task_requested_twice_is_an_early_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = write_task(tmp_path / "tasks", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    (tasks / "group.yaml").write_text(yaml.safe_dump({"group": "cbq_group", "task": [TASK]}), encoding="utf-8")
    code = main(["evaluate", "--model", "no-such-model", "--data", "[]", "--tasks", f"{TASK},cbq_group",
                 "--task_dir", str(tasks)])
    assert code == 2
    assert f"lm-eval task '{TASK}' is requested twice, by '{TASK}' and by 'cbq_group'" in capsys.readouterr().err


# --- end to end: cbq quantize (W4A4), then cbq evaluate --tasks on its output ------------------------------


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A W4A4 RTN run of the tiny model: its evaluation needs the activation quantizers re-attached."""
    out = tmp_path_factory.mktemp("w4a4_rtn")
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), "--method", "rtn",
                 "--quant.scheme", "W4A4", "--data.num_samples", "4", "--eval.datasets", "[]",
                 "--advanced.trainer.enable_progress_bar", "false"])
    assert code == 0
    return out


@needs_lm_eval
def test_cli_runs_tasks_on_the_activation_quantized_model(w4a4_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path, quantization = resolve_model_path(str(w4a4_run))
    model_config = ModelConfig(name_or_path=path)
    tokenizer = load_tokenizer(model_config)
    plain = load_model(model_config, vocab_size=len(tokenizer))
    quantized = load_model(model_config, vocab_size=len(tokenizer))
    assert attach_activation_quantizers(quantized, Path(path) / quantization["quant_state"]) > 0
    # a question the two models answer differently proves lm-eval scored the activation-quantized one
    rng, differ, agree = random.Random(1), [], []
    for index in range(60):
        question, choices = f"Which word goes with item {index}?", permutation_choices(rng)
        try:
            pred = argmax(choice_logliks(quantized, tokenizer, question, choices))
        except AssertionError:  # a near tie: not a usable question
            continue
        row = {"question": question, "choices": choices, "answer": pred}
        plain_pred = max(range(4), key=choice_logliks(plain, tokenizer, question, choices).__getitem__)
        (differ if plain_pred != pred else agree).append(row)
        if differ and len(differ) + len(agree) >= 8:
            break
    assert differ, "no question separates the activation-quantized model from the plain one"
    rows = (differ + agree)[:8]

    output = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(w4a4_run), "--data", "shipped", "--seqlen", "128", "--max_windows", "2",
                 "--tasks", TASK, "--task_dir", str(write_task(tmp_path / "tasks", rows)),
                 "--lm_eval_batch_size", "8", "--device", "cpu", "--output", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{TASK}: acc 1.0000 ± 0.0000, acc_norm" in printed and f"({len(rows)} samples, 0-shot)" in printed
    assert "shipped file: ppl" in printed
    summary = json.loads(output.read_text())
    assert summary["quantization"]["scheme"]["activations"], "a W4A4 run"
    assert summary["lm_eval_version"] and summary["zero_shot_s"] > 0
    [entry] = summary["zero_shot"]
    assert entry["task"] == TASK and entry["samples"] == len(rows)
    assert 0.0 <= entry["metrics"]["acc_norm"] <= 1.0
    assert entry["metrics"]["acc"] == 1.0  # the plain model would score (8 - len(differ)) / 8
    [result] = summary["results"]
    assert result["windows"] == 2 and math.isfinite(result["ppl"])
