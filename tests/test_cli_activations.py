"""Weight-and-activation quantization end to end: ``cbq quantize`` at W4A4 with CFP, then ``cbq evaluate``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cbq_lightning.cli import main
from cbq_lightning.evaluation.perplexity import evaluate_sets, prepare_eval_set
from cbq_lightning.export.fake_quant import attach_activation_quantizers
from cbq_lightning.export.quant_state import load_quant_state
from cbq_lightning.models.loading import ModelConfig, load_model, load_tokenizer
from tests.conftest import TINY_RECIPE

EVAL_FLAGS = ["--eval.datasets", "[shipped]", "--eval.seqlen", "128", "--eval.max_windows", "4"]
LINEARS_PER_BLOCK, BLOCKS = 7, 4


def _quantize(out: Path, *flags: str) -> Path:
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), "--advanced.trainer.enable_progress_bar",
                 "false", "--quant.scheme", "W4A4", "--train.epochs", "2", "--cfp.weights", "true", *EVAL_FLAGS, *flags])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _quantize(tmp_path_factory.mktemp("w4a4"))


def test_report_records_activation_scheme_and_cfp(w4a4: Path) -> None:
    report = json.loads((w4a4 / "report.json").read_text())
    assert report["scheme"]["name"] == "W4A4"
    assert report["scheme"]["activations"] == {"bits": 4, "mode": "dynamic_sym", "learnable": True, "clip_init": 0.99}
    assert report["cfp"]["weights"] is True and report["cfp"]["activations"] is True
    assert sorted(report["cfp"]["outlier_channels"]) == ["0", "1", "2", "3"]
    for index in range(BLOCKS):
        stats = report["preprocess"][str(index)]
        assert "cfp/act_max_before/input_layernorm" in stats and "cfp/weight_truncated/self_attn.q_proj" in stats
    for window in report["windows"]:
        assert window["act_clip"] is not None and 0.0 < window["act_clip"] < 1.0
    entry = report["eval"][0]
    assert math.isfinite(entry["ppl"]) and entry["ppl"] != entry["ppl_fp"]


def test_quant_state_holds_the_activation_quantizers(w4a4: Path) -> None:
    layers = load_quant_state(w4a4 / "quant_state.safetensors")
    assert len(layers) == LINEARS_PER_BLOCK * BLOCKS
    for name, fields in layers.items():
        assert int(fields["act_bits"]) == 4, name
        assert 0.0 < float(fields["act_clip_upper"]) < 1.0
    weights = load_file(str(w4a4 / "model" / "model.safetensors"))
    assert not [key for key in weights if "act_quantizer" in key], "the HF checkpoint must stay plain"


def test_evaluate_reattaches_activation_quantization(w4a4: Path) -> None:
    output = w4a4 / "eval.json"
    assert main(["evaluate", "--model", str(w4a4), "--data", "shipped", "--seqlen", "128", "--max_windows", "4",
                 "--output", str(output)]) == 0
    result = json.loads(output.read_text())["results"][0]
    reported = json.loads((w4a4 / "report.json").read_text())["eval"][0]["ppl"]
    assert math.isclose(result["ppl"], reported, rel_tol=1e-5), (result["ppl"], reported)
    # in process: the reloaded checkpoint equals the report only with its activation quantizers back on
    config = ModelConfig(name_or_path=str(w4a4 / "model"))
    tokenizer = load_tokenizer(config)
    sets = [prepare_eval_set("shipped", tokenizer, 128, None, 4, None)]
    model = load_model(config, vocab_size=len(tokenizer))
    plain = evaluate_sets(model, sets, "cpu", 1, label="plain")[0]["ppl"]
    assert attach_activation_quantizers(model, w4a4 / "quant_state.safetensors") == LINEARS_PER_BLOCK * BLOCKS
    attached = evaluate_sets(model, sets, "cpu", 1, label="attached")[0]["ppl"]
    assert math.isclose(attached, reported, rel_tol=1e-5), (attached, reported)
    assert not math.isclose(plain, reported, rel_tol=1e-4), "activation quantization should change the model"


def test_cfp_statistics_reach_tensorboard(w4a4: Path) -> None:
    events = EventAccumulator(str(w4a4 / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"cfp/act_outlier_channels/input_layernorm", "cfp/act_max_before/post_attention_layernorm",
                "cfp/act_max_after/post_attention_layernorm", "cfp/act_threshold/input_layernorm",
                "cfp/weight_truncated/mlp.down_proj", "cfp/weight_max_before/self_attn.o_proj",
                "window/act_clip"}
    assert expected <= tags, expected - tags
    assert [event.step for event in events.Scalars("cfp/act_max_before/input_layernorm")] == list(range(BLOCKS))


def test_rtn_baseline_with_activations(tmp_path: Path) -> None:
    out = _quantize(tmp_path / "rtn", "--method", "rtn", "--cfp.weights", "false", "--cfp.activations", "false")
    report = json.loads((out / "report.json").read_text())
    assert report["scheme"]["activations"] == {"bits": 4, "mode": "dynamic_sym", "learnable": False, "clip_init": 1.0}
    assert report["cfp"] == {"weights": False, "activations": False, "outlier_channels": {}}
    layers = load_quant_state(out / "quant_state.safetensors")
    assert all(float(fields["act_clip_upper"]) == 1.0 for fields in layers.values())
