"""Low-rank correction ``y = Q(W) Q(x) + U V^T x`` (``extensions.correction.rank``): maths, training, storage, reload, export.

Hand counts for the tiny model (hidden 64, 2 KV heads of 16, MLP 128, 4 blocks) at rank 2: a block's
corrections add ``2 * ((64+64) + 2 (64+32) + (64+64) + 2 (64+128) + (128+64)) = 2048`` parameters, 8192 in
all, against ``4 * 36864 = 147456`` quantized weights (0.0556 per weight).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbq_lightning.cli import main
from cbq_lightning.config import validate
from cbq_lightning.errors import ConfigError
from cbq_lightning.export.packed import ExportConfig, export_run
from cbq_lightning.export.quant_state import load_quant_state
from cbq_lightning.quant.act_quantizer import ActQuantSettings
from cbq_lightning.quant.correction import CorrectionConfig, LowRankCorrection, svd_factors
from cbq_lightning.quant.qlinear import LayerQuantConfig, QuantLinear
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import parse_scheme
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, load_recipe

EVAL_FLAGS = ["--eval.datasets", "[shipped]", "--eval.seqlen", "128", "--eval.max_windows", "4"]


def test_svd_factors_are_the_best_rank_r_approximation_split_evenly() -> None:
    # M = 3 e1 f1^T + 2 e2 f2^T + 0.5 e3 f3^T with orthonormal e, f: rank 2 keeps the first two terms
    e = torch.linalg.qr(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))[0]
    f = torch.linalg.qr(torch.randn(4, 3, generator=torch.Generator().manual_seed(2)))[0]
    matrix = 3.0 * torch.outer(e[:, 0], f[:, 0]) + 2.0 * torch.outer(e[:, 1], f[:, 1]) + 0.5 * torch.outer(e[:, 2], f[:, 2])
    u, v = svd_factors(matrix, 2)
    assert u.shape == (5, 2) and v.shape == (4, 2)
    expected = 3.0 * torch.outer(e[:, 0], f[:, 0]) + 2.0 * torch.outer(e[:, 1], f[:, 1])
    assert torch.allclose(u @ v.t(), expected, atol=1e-5)
    assert (u.norm(dim=0) ** 2).tolist() == pytest.approx([3.0, 2.0], rel=1e-5)  # sqrt(s) on each side
    assert (v.norm(dim=0) ** 2).tolist() == pytest.approx([3.0, 2.0], rel=1e-5)


def test_an_exact_grid_gets_the_zero_start_not_two_zero_factors() -> None:
    u, v = svd_factors(torch.zeros(6, 4), 2)
    assert float(u.abs().sum()) == 0.0 and float(v.abs().sum()) > 0.0


def test_rank_as_number_or_fraction_and_its_validation() -> None:
    assert CorrectionConfig(rank=3).rank_for(576, 1536) == 3
    assert CorrectionConfig(rank_fraction=0.1).rank_for(576, 1536) == 58  # round(57.6)
    assert CorrectionConfig(rank_fraction=0.001).rank_for(64, 32) == 1
    with pytest.raises(ConfigError, match="would add nothing"):
        CorrectionConfig()
    with pytest.raises(ConfigError, match="not low-rank"):
        CorrectionConfig(rank=32).rank_for(64, 32)
    with pytest.raises(ConfigError, match="both set"):
        CorrectionConfig(rank=2, rank_fraction=0.1)
    with pytest.raises(ConfigError, match="rank_fraction"):
        CorrectionConfig(rank_fraction=1.0)
    with pytest.raises(ConfigError, match="extensions.correction.rank"):
        CorrectionConfig(rank=-1)


def test_corrected_layer_computes_quantized_product_plus_correction_on_the_unquantized_input() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, bias=True)
    layer = QuantLinear(linear, LayerQuantConfig(parse_scheme("W3A4"), RoundingConfig(enabled=False), learnable_clip=False,
                                                 clip_init=1.0, act=ActQuantSettings(bits=4, learnable=False, clip_init=1.0),
                                                 correction=CorrectionConfig(rank=3)))
    x = torch.randn(5, 16) * 3
    with torch.no_grad():
        expected = F.linear(layer.act_quantizer(x), layer.fake_weight(), layer.bias)
        expected = expected + x @ layer.correction.v @ layer.correction.u.t()
        assert torch.allclose(layer(x), expected, atol=1e-6)
        assert not torch.allclose(layer(x), expected - x @ layer.correction.v @ layer.correction.u.t(), atol=1e-3)


def test_svd_start_leaves_only_the_weight_errors_rank_r_remainder() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 10, bias=False)
    plain = QuantLinear(linear, LayerQuantConfig(parse_scheme("W2A16"), RoundingConfig(enabled=False),
                                                 learnable_clip=False, clip_init=1.0))
    corrected = QuantLinear(linear, LayerQuantConfig(parse_scheme("W2A16"), RoundingConfig(enabled=False),
                                                     learnable_clip=False, clip_init=1.0, correction=CorrectionConfig(rank=4)))
    error = linear.weight.detach() - plain.fake_weight().detach()
    singular = torch.linalg.svdvals(error)
    effective = corrected.fake_weight().detach() + corrected.correction.matrix().detach()
    remainder = torch.linalg.norm(linear.weight.detach() - effective)
    assert float(remainder) == pytest.approx(float(singular[4:].pow(2).sum().sqrt()), rel=1e-4)


def test_finalise_freezes_but_keeps_the_correction_and_rtn_fallback_silences_it() -> None:
    linear = nn.Linear(12, 10)
    layer = QuantLinear(linear, LayerQuantConfig(parse_scheme("W4A16"), RoundingConfig(form="offset"),
                                                 correction=CorrectionConfig(rank=2)))
    assert [p.numel() for p in layer.correction_parameters()] == [10 * 2, 12 * 2]
    fallback = QuantLinear(linear, LayerQuantConfig(parse_scheme("W4A16"), RoundingConfig(form="offset"),
                                                    correction=CorrectionConfig(rank=2)))
    fallback.reset_to_round_to_nearest()
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(fallback.correction(x), torch.zeros(3, 10))
    layer = layer.finalize()
    assert layer.correction is not None and not any(p.requires_grad for p in layer.parameters())
    assert not any(p.requires_grad for p in layer.correction.parameters())


@pytest.fixture(scope="module")
def corrected_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corrected")
    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(out), "--advanced.trainer.enable_progress_bar",
                 "false", "--quant.scheme", "W4A8", "--train.epochs", "2", "--extensions.correction.rank", "2",
                 "--extensions.correction.init", "zero", "--extensions.lr_correction", "0.001", *EVAL_FLAGS])
    assert code == 0
    return out


def test_report_states_the_added_parameters(corrected_run: Path) -> None:
    report = json.loads((corrected_run / "report.json").read_text())
    assert report["correction"]["parameters"] == 8192
    assert report["correction"]["ranks"] == [2]
    assert report["correction"]["parameters_per_quantized_weight"] == pytest.approx(8192 / 147456)


def test_window_trains_the_correction(corrected_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(corrected_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert events.Scalars("train/lr_correction")[0].value == pytest.approx(0.001)
    layers = load_quant_state(corrected_run / "quant_state.safetensors")
    assert len(layers) == 28 and all("correction_u" in fields for fields in layers.values())
    # the zero start has U = 0 and V = LoRA's seeded draw: both moved in training
    fields = layers["model.layers.0.self_attn.q_proj"]
    assert fields["correction_u"].shape == (64, 2) and fields["correction_v"].shape == (64, 2)
    start = LowRankCorrection(64, 64, 2)
    assert float(start.u.detach().abs().sum()) == 0.0
    assert float(fields["correction_u"].abs().sum()) > 0.0
    assert not torch.allclose(fields["correction_v"], start.v)


def test_cbq_evaluate_reattaches_the_correction(corrected_run: Path) -> None:
    output = corrected_run / "eval.json"
    assert main(["evaluate", "--model", str(corrected_run), "--data", "shipped", "--seqlen", "128",
                 "--max_windows", "4", "--output", str(output)]) == 0
    result = json.loads(output.read_text())["results"][0]["ppl"]
    reported = json.loads((corrected_run / "report.json").read_text())["eval"][0]["ppl"]
    assert math.isclose(result, reported, rel_tol=1e-5), (result, reported)
    sidecar = json.loads((corrected_run / "model" / "cbq_quantization.json").read_text())
    assert sidecar["correction"]["parameters"] == 8192


def test_packed_export_refuses_a_corrected_run(corrected_run: Path, tmp_path: Path) -> None:
    """One rule, two callers: the finished run at export time and the configuration before calibration say the
    same thing, naming the run's folder or "this run"."""
    with pytest.raises(ConfigError) as at_export:
        export_run(corrected_run, ExportConfig(format="compressed-tensors", output=str(tmp_path / "packed")))
    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--extensions.correction.rank", "2",
                         "--export.format", "compressed-tensors")
    with pytest.raises(ConfigError) as at_config:
        validate(config)
    assert "cannot hold the low-rank correction of" in str(at_config.value)
    assert str(at_export.value).replace(str(corrected_run), "this run") == str(at_config.value)
    assert not (tmp_path / "packed").exists()


def test_too_large_a_rank_fails_before_calibration(tmp_path: Path) -> None:
    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--extensions.correction.rank", "40",
                         "--advanced.trainer.enable_progress_bar", "false", "--eval.datasets", "[]")
    with pytest.raises(ConfigError, match="layer blocks.0.self_attn.k_proj"):
        run_quantize(config)


def test_killed_corrected_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    from tests.test_resume import FAST, KillAtWindow, Killed

    flags = (*FAST, "--extensions.correction.rank", "2", "--quant.scheme", "W4A8")
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "whole"), *flags))
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "killed"), *flags), [KillAtWindow(2)])
    report = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "killed"), *flags)).report
    assert report["resumed_after_window"] == 1
    expected = load_quant_state(tmp_path / "whole" / "quant_state.safetensors")
    resumed = load_quant_state(tmp_path / "killed" / "quant_state.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert "correction_u" in resumed[name]
        for field in expected[name]:
            assert torch.equal(expected[name][field], resumed[name][field]), (name, field)
