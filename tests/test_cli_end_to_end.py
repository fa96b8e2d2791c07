"""The CLI on the tiny model: every output is written, readable, and says that CBQ trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from cbq_lightning.export.quant_state import dequantize, load_quant_state
from cbq_lightning.runner import run_quantize
from tests.conftest import REPO, TINY_RECIPE, load_recipe

REPORT_KEYS = {"method", "scheme", "window", "windows", "wall_time_s", "peak_rss_gib", "versions", "device"}


def test_cli_writes_every_output(cli_run: Path) -> None:
    for name in ("config.yaml", "report.json", "quant_state.safetensors", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json", "model/cbq_quantization.json"):
        assert (cli_run / name).is_file(), name
    assert list((cli_run / "tensorboard").glob("events.out.tfevents.*"))
    assert not [p for p in cli_run.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_report_contents(cli_run: Path) -> None:
    report = json.loads((cli_run / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["method"] == "cbq"
    assert report["scheme"] == {
        "w_bits": 3, "group_size": None, "a_bits": 16, "sym": False, "gguf_type": None, "gguf_mix": None,
        "name": "W3A16",
        "activations": None,
    }
    assert report["window"] == {"size": 2, "overlap": 1}
    assert {"torch", "lightning", "transformers", "git"} <= report["versions"].keys()
    windows = report["windows"]
    assert [w["blocks"] for w in windows] == [[0, 1], [1, 2], [2, 3]]
    for window in windows:
        assert {"blocks", "steps", "loss_first", "loss_last", "wall_s"} <= window.keys()
        assert window["steps"] == 40  # 10 epochs x 16 samples / batch 4
        assert window["train_loss_last"] < window["train_loss_first"], window
        # the hardened loss (what finalising gives) falls in every window's fit
        assert window["loss_last"] < window["loss_first"], window
        # CBQ's trainable parameters: LoRA-Rounding factors (4 blocks' 7 linears, A1 A2 at rank 4, two
        # blocks per window) and weight clipping logits (per output channel, two each: asymmetric)
        linears = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (out, in)
        rounding = 2 * sum(4 * (out + inp) for out, inp in linears)
        clip = 2 * sum(2 * out for out, _ in linears)
        assert window["trainable_parameters"] == {
            "rounding": rounding, "rounding_offset": 0, "weight_clip": clip, "activation_clip": 0, "correction": 0
        }
    assert [e["block"] for e in report["block_errors"]] == [0, 1, 2, 3]


def test_cbq_beats_rtn_at_3_bits(cli_run: Path) -> None:
    """Final reconstruction error (relative, after the last block) of CBQ is below RTN's."""
    final = json.loads((cli_run / "report.json").read_text())["final_error"]
    assert final["cbq"] < 0.9 * final["rtn"], final


def test_resolved_config_round_trips(cli_run: Path) -> None:
    written = yaml.safe_load((cli_run / "config.yaml").read_text())
    assert written["output_dir"] == str(cli_run)
    assert written["quant"]["scheme"] == "W3A16"
    reparsed = load_recipe(cli_run / "config.yaml")
    assert reparsed.output_dir == str(cli_run) and reparsed.train.epochs == 10


def test_tensorboard_scalars_read_back(cli_run: Path) -> None:
    events = EventAccumulator(str(cli_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/global_branch", "train/homologous_branch", "train/kl", "train/rounding_reg",
                "train/beta", "train/lr_rounding", "train/lr_clip", "window/loss_first", "window/loss_last",
                "window/flip_fraction", "window/clip_ratio", "block_error/cbq", "block_error/rtn",
                "eval/ppl/shipped", "eval/ppl_fp/shipped"}
    assert expected <= tags, expected - tags
    loss_steps = [event.step for event in events.Scalars("train/loss")]
    assert loss_steps == list(range(120)), "windows must continue one step axis"
    assert [event.step for event in events.Scalars("block_error/cbq")] == [0, 1, 2, 3]


def test_window_training_losses_are_epoch_means(cli_run: Path) -> None:
    """``train_loss_first/last`` average the first/last epoch's steps (4 per epoch here), not one batch."""
    events = EventAccumulator(str(cli_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [event.value for event in events.Scalars("train/reconstruction")]
    windows = json.loads((cli_run / "report.json").read_text())["windows"]
    per_epoch, offset = 4, 0
    for window in windows:
        mine = steps[offset:offset + window["steps"]]
        offset += window["steps"]
        assert window["train_loss_first"] == pytest.approx(sum(mine[:per_epoch]) / per_epoch, rel=1e-5)
        assert window["train_loss_last"] == pytest.approx(sum(mine[-per_epoch:]) / per_epoch, rel=1e-5)


def test_quant_state_matches_checkpoint(cli_run: Path) -> None:
    layers = load_quant_state(cli_run / "quant_state.safetensors")
    weights = load_file(str(cli_run / "model" / "model.safetensors"))
    assert len(layers) == 4 * 7
    for name, layer in layers.items():
        assert layer["qweight"].dtype == torch.uint8 and int(layer["qweight"].max()) <= 7
        assert int(layer["bits"]) == 3
        torch.testing.assert_close(dequantize(layer), weights[f"{name}.weight"], rtol=0, atol=0)


def test_reload_gives_in_memory_logits(tmp_path: Path) -> None:
    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--train.epochs", "2",
                         "--advanced.trainer.enable_progress_bar", "false")
    result = run_quantize(config)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = result.model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
        actual = reloaded(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_rtn_method_through_console_entry(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "cbq_lightning.cli", "quantize", "--config", str(TINY_RECIPE),
         "--method", "rtn", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "rtn" and all(w["steps"] == 0 for w in report["windows"])
    assert len(report["windows"]) == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.name_or_path", "./no/such/model"], "does not exist"),
        (["--quant.scheme", "W9A16"], "w_bits=9 is out of range"),
        (["--quant.scheme", "W1A16"], "w_bits=1 is out of range"),
        (["--quant.scheme", "W3A16G48"], "group_size=48 does not divide in_features=64 of layer blocks.0"),
        (["--quant.w_bits", "2"], "quant.w_bits"),  # one key for one fact: the scheme string says the bits
        (["--window.overlap", "2"], "window.overlap=2"),
        (["--window.size", "0"], "window.size=0"),
        (["--data.num_samples", "100", "--data.seqlen", "4096"], "too few for 100 disjoint samples"),
        (["--data.source", "/no/such/corpus.jsonl"], "nor an existing file"),
        (["--advanced.quant.clip_init", "1.0"], "advanced.quant.clip_init=1.0 must lie strictly between 0 and 1"),
        (["--quant.scheme", "W4A8", "--advanced.quant.act_clip_init", "1.0"],
         "advanced.quant.act_clip_init=1.0 must lie strictly between 0 and 1"),
        (["--advanced.rounding.reg_weight", "-1"], "advanced.rounding.reg_weight=-1.0 must be a finite number >= 0"),
        (["--rounding.form", "offset", "--rounding.rank", "8"], "rounding.rank=8 would do nothing"),
        (["--rounding.form", "offset", "--advanced.rounding.warmup", "0.5"],
         "advanced.rounding.warmup=0.5 would do nothing"),
        pytest.param(["--trainer.accelerator", "gpu"], "no CUDA device is visible",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")),
    ],
)
def test_bad_input_is_a_clear_early_error(overrides: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from cbq_lightning.cli import main

    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path / "out"), *overrides])
    err = capsys.readouterr().err
    assert code == 2  # the argument parser's refusal of an unknown key too: one line, no usage dump
    [line] = [line for line in err.splitlines() if line.startswith("cbq: error:")]
    assert message in line and "usage:" not in err
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize("overrides", [["--quant.scheme", "W3A16G48"], ["--extensions.correction.rank", "64"]])
def test_shape_checks_come_before_any_data_or_evaluation(overrides: list[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A configuration that cannot fit the model stops before calibration data are read and before the
    full-precision evaluation (on a 7B model that evaluation alone takes many minutes)."""
    from cbq_lightning import runner
    from cbq_lightning.cli import main

    def too_late(*args, **kwargs):
        raise AssertionError("heavy work started before the configuration was checked against the model")

    for name in ("calibration_ids", "prepare_eval_set", "_evaluate"):
        monkeypatch.setattr(runner, name, too_late)
    assert main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), *overrides]) == 2


def test_unsupported_architecture_names_the_model_type() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from cbq_lightning.errors import ModelSourceError
    from cbq_lightning.models.adapter import DecoderAdapter

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelSourceError, match="'gpt2' is not supported"):
        DecoderAdapter(model)


def test_help_lists_the_options() -> None:
    completed = subprocess.run([sys.executable, "-m", "cbq_lightning.cli", "quantize", "--help"],
                               capture_output=True, text=True, cwd=REPO, timeout=120)
    assert completed.returncode == 0
    for flag in ("--output_dir", "--method", "--quant.scheme", "--window.size", "--rounding.rank", "--print_config"):
        assert flag in completed.stdout, flag
