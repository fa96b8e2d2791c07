"""Continuous approximations of rounding and clamping (the ``extensions.continuous`` section): maths and wiring.

Hand values, ``T = 10``: ``round_T(0.2) = sigmoid(-3) = 0.0474259``, ``round_T(1.7) = 1 + sigmoid(2) =
1.8807971``, ``round_T(0.5) = 0.5``; its slope at 0.2 is ``10 sigmoid(-3) (1 - sigmoid(-3)) = 0.4517666``.
``clamp_T(x, 0, 3)`` with ``T = 2``: at ``x = 3`` it is ``3 - ln(2)/2 + ln(1 + e^-6)/2 = 2.6546``; its slope
there is ``sigmoid(6) - sigmoid(0) = 0.4975274``, and at ``x = 4`` (beyond the bound) ``sigmoid(8) -
sigmoid(2) = 0.1189462``, where the hard clamp's is 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cbq_lightning.config import validate
from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.act_quantizer import ActivationQuantizer, ActQuantSettings
from cbq_lightning.quant.continuous import ContinuousApprox, set_temperatures, sigmoid_round, smooth_clamp
from cbq_lightning.quant.weight_quantizer import WeightQuantizer
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, load_recipe


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_sigmoid_round_hand_values_and_slope() -> None:
    x = torch.tensor([0.2, 0.5, 1.7, -0.2], requires_grad=True)
    y = sigmoid_round(x, 10.0)
    expected = [_sigmoid(-3.0), 0.5, 1.0 + _sigmoid(2.0), -1.0 + _sigmoid(3.0)]
    assert y.tolist() == pytest.approx(expected, abs=1e-6)
    y[0].backward()
    assert x.grad[0].item() == pytest.approx(10 * _sigmoid(-3.0) * (1 - _sigmoid(-3.0)), rel=1e-5)


def test_sigmoid_round_tends_to_round_as_the_temperature_grows() -> None:
    x = torch.tensor([0.1, 0.45, 0.55, 2.9, -1.3])
    assert sigmoid_round(x, 1e4).tolist() == pytest.approx(torch.round(x).tolist(), abs=1e-6)
    # and is smooth at low temperature: far from the nearest integer
    assert (sigmoid_round(x, 1.0) - torch.round(x)).abs().max() > 0.1


def test_smooth_clamp_hand_values_and_gradient_beyond_the_bound() -> None:
    x = torch.tensor([-5.0, 1.5, 3.0, 4.0], requires_grad=True)
    y = smooth_clamp(x, 0.0, 3.0, 2.0)
    at_bound = 3.0 - math.log(2.0) / 2.0 + math.log1p(math.exp(-6.0)) / 2.0
    assert y[2].item() == pytest.approx(at_bound, rel=1e-6)
    assert y[0].item() == pytest.approx(0.0, abs=1e-4)
    assert y[1].item() == pytest.approx(1.5, abs=1e-2)
    y.sum().backward()
    assert x.grad[2].item() == pytest.approx(_sigmoid(6.0) - 0.5, rel=1e-5)
    assert x.grad[3].item() == pytest.approx(_sigmoid(8.0) - _sigmoid(2.0), rel=1e-5)
    hard = x.detach().clone().requires_grad_(True)
    torch.clamp(hard, 0.0, 3.0).sum().backward()
    assert hard.grad[3].item() == 0.0, "the hard clamp passes nothing beyond the bound"
    # and tends to the hard clamp
    sharp = smooth_clamp(x.detach(), 0.0, 3.0, 1e4)
    assert sharp.tolist() == pytest.approx([0.0, 1.5, 3.0, 3.0], abs=1e-3)


def test_temperature_schedule_is_geometric_from_start_to_end() -> None:
    settings = ContinuousApprox("sigmoid", "smooth", 4.0, 64.0)
    assert settings.temperature_at(0, 5) == pytest.approx(4.0)
    assert settings.temperature_at(2, 5) == pytest.approx(16.0)  # geometric mean of 4 and 64
    assert settings.temperature_at(4, 5) == pytest.approx(64.0)
    assert settings.temperature_at(0, 1) == pytest.approx(64.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"estimator": "gumbel"}, "extensions.continuous.estimator"),
        ({"clamp": "soft"}, "extensions.continuous.clamp"),
        ({"temperature_start": 0.0}, "temperature_start"),
        ({"temperature_start": 10.0, "temperature_end": 5.0}, "start <= end"),
    ],
)
def test_settings_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ContinuousApprox(**kwargs)


def test_weight_quantizer_smooths_only_in_a_training_forward_with_gradients() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 8)
    quantizer = WeightQuantizer(weight, bits=3, learnable_clip=True)
    exact = quantizer.fake_quantize(weight).detach()
    set_temperatures(quantizer, ContinuousApprox("sigmoid", "smooth", 2.0, 2.0), 2.0)
    quantizer.train()
    smooth = quantizer.fake_quantize(weight)
    assert (smooth.detach() - exact).abs().max() > 1e-3
    with torch.no_grad():  # measurements and finalisation: exact
        assert torch.equal(quantizer.fake_quantize(weight), exact)
    quantizer.eval()
    assert torch.equal(quantizer.fake_quantize(weight).detach(), exact)
    quantizer.train()
    set_temperatures(quantizer, None, None)
    assert torch.equal(quantizer.fake_quantize(weight).detach(), exact)


def test_weight_codes_follow_the_hand_formula_when_smoothed() -> None:
    # per-channel 2-bit, range [-1, 2] -> scale 1, zero-point 1: codes = clamp_T(round_T(W) + 1, 0, 3)
    weight = torch.tensor([[-1.0, 0.2, 1.7, 2.0]])
    quantizer = WeightQuantizer(weight, bits=2, learnable_clip=False, clip_init=1.0)
    quantizer.round_temperature, quantizer.clamp_temperature = 10.0, 5.0
    scale, zero = quantizer.scale_zero(weight)
    assert scale.item() == pytest.approx(1.0) and zero.item() == 1.0
    codes = quantizer.codes(weight, scale, zero, None).reshape(-1)
    expected = smooth_clamp(sigmoid_round(weight, 10.0) + 1.0, 0.0, 3.0, 5.0).reshape(-1)
    assert torch.allclose(codes, expected, atol=1e-6)
    # only the rounding: the sigmoid estimator, hard clamp
    quantizer.clamp_temperature = None
    codes = quantizer.codes(weight, scale, zero, None).reshape(-1)
    assert torch.allclose(codes, torch.clamp(sigmoid_round(weight, 10.0) + 1.0, 0.0, 3.0).reshape(-1), atol=1e-6)


def test_soft_lora_rounding_decisions_are_not_replaced_by_the_estimator() -> None:
    weight = torch.tensor([[-1.0, 0.2, 1.7, 2.0]])
    quantizer = WeightQuantizer(weight, bits=2, learnable_clip=False, clip_init=1.0)
    scale, zero = quantizer.scale_zero(weight)
    decisions = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    before = quantizer.codes(weight, scale, zero, decisions)
    quantizer.round_temperature = 1.0
    assert torch.equal(quantizer.codes(weight, scale, zero, decisions), before)


def test_smooth_clamp_passes_gradient_from_a_clipped_activation() -> None:
    # per-token symmetric 4-bit (qmax 7), clip ratio 0.85 of max |x| = 10: scale = 8.5 / 7, so 9.5 sits at
    # 7.82 codes and rounds to 8, beyond the bound. The hard clamp passes it nothing (it is not the max, so
    # not even through the scale); with T = 1 the smooth clamp passes sigmoid(8 + 8) - sigmoid(8 - 7) = 0.2689.
    x = torch.tensor([[1.0, -10.0, 9.5, 0.5]])
    settings = ActQuantSettings(bits=4, mode="dynamic_sym", learnable=True, clip_init=0.85)
    hard, smooth = ActivationQuantizer(settings), ActivationQuantizer(settings)
    set_temperatures(smooth, ContinuousApprox("ste", "smooth", 1.0, 1.0), 1.0)
    grads = []
    for quantizer in (hard, smooth):
        inputs = x.clone().requires_grad_(True)
        quantizer(inputs)[0, 2].backward()
        grads.append(inputs.grad[0, 2].item())
    assert round(9.5 / (0.85 * 10.0 / 7.0)) == 8
    assert grads[0] == 0.0
    assert grads[1] == pytest.approx(_sigmoid(16.0) - _sigmoid(1.0), rel=1e-4)


def test_sigmoid_estimator_needs_something_to_act_on(tmp_path: Path) -> None:
    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--extensions.continuous.estimator", "sigmoid",
                         "--rounding.form", "residual")
    with pytest.raises(ConfigError, match="would change nothing"):
        validate(config)


def test_cli_fit_with_both_approximations_logs_the_temperature_and_differs_from_ste(tmp_path: Path) -> None:
    common = ("--train.epochs", "2", "--eval.datasets", "[]", "--advanced.trainer.enable_progress_bar", "false",
              "--quant.scheme", "W4A8", "--rounding.form", "offset")
    ste = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "ste"), *common)).report
    smooth = run_quantize(load_recipe(
        TINY_RECIPE, "--output_dir", str(tmp_path / "smooth"), *common,
        "--extensions.continuous.estimator", "sigmoid", "--extensions.continuous.clamp", "smooth",
        "--extensions.continuous.temperature_start", "2", "--extensions.continuous.temperature_end", "32",
    )).report
    events = EventAccumulator(str(tmp_path / "smooth" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    temperatures = [event.value for event in events.Scalars("train/temperature")]
    steps = sum(w["steps"] for w in smooth["windows"])
    assert len(temperatures) == steps
    first_window = smooth["windows"][0]["steps"]
    assert temperatures[0] == pytest.approx(2.0) and temperatures[first_window - 1] == pytest.approx(32.0)
    assert "train/temperature" not in EventAccumulator(str(tmp_path / "ste" / "tensorboard")).Reload().Tags()["scalars"]
    errors_ste = [b["quantized"] for b in ste["block_errors"]]
    errors_smooth = [b["quantized"] for b in smooth["block_errors"]]
    assert all(math.isfinite(e) for e in errors_smooth)
    assert errors_smooth != errors_ste
