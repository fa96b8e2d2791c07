"""The next-token KL term of the last window (``extensions.output_kl_weight``): maths and wiring.

Hand values: with an identity head, a target hidden state ``[0, ln 3]`` is the distribution ``[1/4, 3/4]``
and an output ``[0, 0]`` the uniform one, so ``KL = 1/4 ln(1/2) + 3/4 ln(3/2)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.extensions import ExtensionsConfig
from cbq_lightning.loss import output_kl
from cbq_lightning.models.tiny import tiny_shape
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, load_recipe

HAND_KL = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)


def test_output_kl_hand_value_with_identity_head() -> None:
    target = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])
    output = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # the second position matches: KL 0 there
    assert output_kl(nn.Identity(), target, output, tokens=2).item() == pytest.approx(HAND_KL / 2, rel=1e-6)


def test_output_kl_goes_through_the_head() -> None:
    # a head doubling the hidden state makes the target [0, 2 ln 3] -> [1/10, 9/10] (output stays uniform);
    # a head that zeroes it makes both sides uniform (KL 0)
    double = nn.Linear(2, 2, bias=False)
    zero = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        double.weight.copy_(2.0 * torch.eye(2))
        zero.weight.zero_()
    target = torch.tensor([[[0.0, math.log(3.0)]]])
    output = torch.zeros(1, 1, 2)
    expected = 0.1 * math.log(0.2) + 0.9 * math.log(1.8)
    assert output_kl(double, target, output, tokens=1).item() == pytest.approx(expected, rel=1e-6)
    assert output_kl(zero, target, output, tokens=1).item() == pytest.approx(0.0, abs=1e-7)


def test_output_kl_samples_the_same_positions_on_both_sides() -> None:
    # every position but one matches; sampling one position gives 0 or the full KL, never a mixture of
    # a target position with a different output position
    target = torch.zeros(1, 8, 2)
    target[0, 5] = torch.tensor([0.0, math.log(3.0)])
    output = torch.zeros(1, 8, 2)
    generator = torch.Generator().manual_seed(0)
    seen = {round(output_kl(nn.Identity(), target, output, 1, generator).item(), 6) for _ in range(64)}
    assert seen == {0.0, round(HAND_KL, 6)}


def test_output_kl_gradient_reaches_the_output_only() -> None:
    head = nn.Linear(2, 3)
    head.requires_grad_(False)
    target = torch.randn(2, 4, 2, requires_grad=True)
    output = torch.randn(2, 4, 2, requires_grad=True)
    output_kl(head, target, output, tokens=3).backward()
    assert output.grad is not None and output.grad.abs().sum() > 0
    assert target.grad is None, "the teacher side is a constant"


def test_output_kl_config_validation() -> None:
    with pytest.raises(ConfigError, match="output_kl_weight"):
        ExtensionsConfig(output_kl_weight=-1.0)
    with pytest.raises(ConfigError, match="output_kl_tokens"):
        ExtensionsConfig(output_kl_tokens=0)


def test_only_the_last_window_trains_on_the_next_token_kl(tmp_path: Path) -> None:
    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--train.epochs", "2", "--eval.datasets", "[]",
                         "--advanced.trainer.enable_progress_bar", "false", "--extensions.output_kl_weight", "1.0",
                         "--extensions.output_kl_tokens", "16")
    report = run_quantize(config).report
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    windows = report["windows"]
    steps_per_window = [w["steps"] for w in windows]
    kl_steps = [event.step for event in events.Scalars("train/output_kl")]
    first_last_step = sum(steps_per_window[:-1])
    assert kl_steps == list(range(first_last_step, first_last_step + steps_per_window[-1]))
    assert all(math.isfinite(event.value) and event.value >= 0 for event in events.Scalars("train/output_kl"))
    assert windows[-1]["blocks"][-1] == tiny_shape(config.model.name_or_path).num_layers - 1
