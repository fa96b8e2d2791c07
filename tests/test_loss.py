"""Homologous reconstruction loss (docs/method.md §3) against hand-computed values.

Hidden size 2, two tokens. Quantized output ``b`` and the two targets:

    b    = [[0, 0], [1, 1]]
    y_fp = [[1, 0], [1, 1]]   MSE = (1 + 0 + 0 + 0) / 4 = 0.25,  mean(y_fp^2) = 3/4 -> relative 1/3
    y_h  = [[0, 2], [1, 1]]   MSE = (0 + 4 + 0 + 0) / 4 = 1.0,   mean(y_h^2)  = 6/4 -> relative 2/3

The second token matches both targets, so its KL is 0; the first token's output softmax is [1/2, 1/2] and
KL(p || q) = sum p * ln(p / q) = sum p * ln(2p), averaged over the two tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from cbq_lightning.errors import ConfigError
from cbq_lightning.loss import LossConfig, homologous_loss, reconstruction_error, token_kl

OUTPUT = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
Y_FP = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
Y_H = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])


def kl_to_uniform(p0: float, p1: float) -> float:
    return p0 * math.log(2 * p0) + p1 * math.log(2 * p1)


# softmax([1, 0]) = [e / (e + 1), 1 / (e + 1)]; softmax([0, 2]) = [1 / (1 + e^2), e^2 / (1 + e^2)]
KL_FP = kl_to_uniform(math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)) / 2  # = 0.05547...
KL_H = kl_to_uniform(1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))) / 2  # = 0.16391...

MSE_FP, MSE_H = 0.25, 1.0
REL_FP, REL_H = 1.0 / 3.0, 2.0 / 3.0


def value(t: torch.Tensor) -> float:
    return float(t.item())


def test_hand_constants_are_what_we_think():
    # guards the literals above: ~0.0555 and ~0.1639 nats per token on average
    assert KL_FP == pytest.approx(0.055472, abs=1e-6)
    assert KL_H == pytest.approx(0.163907, abs=1e-6)


def test_token_kl_hand_values():
    assert value(token_kl(Y_FP, OUTPUT)) == pytest.approx(KL_FP, abs=1e-6)
    assert value(token_kl(Y_H, OUTPUT)) == pytest.approx(KL_H, abs=1e-6)


def test_token_kl_direction_is_target_first():
    # KL(softmax(target) || softmax(output)) is not symmetric: swap gives a different number
    # KL(uniform || softmax([1, 0])) = 0.5 * ln(0.5 / p0) + 0.5 * ln(0.5 / p1), averaged over 2 tokens
    p0, p1 = math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)
    reverse = (0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / p1)) / 2
    assert value(token_kl(OUTPUT, Y_FP)) == pytest.approx(reverse, abs=1e-6)
    assert abs(reverse - KL_FP) > 1e-3


def test_reconstruction_error_plain_and_normalized():
    mse, kl = reconstruction_error(Y_FP, OUTPUT, kl_weight=1.0, normalize=False)
    assert value(mse) == pytest.approx(MSE_FP, abs=1e-7)
    assert value(kl) == pytest.approx(KL_FP, abs=1e-6)
    mse, _ = reconstruction_error(Y_FP, OUTPUT, kl_weight=1.0, normalize=True)
    assert value(mse) == pytest.approx(REL_FP, abs=1e-7)
    mse, _ = reconstruction_error(Y_H, OUTPUT, kl_weight=1.0, normalize=True)
    assert value(mse) == pytest.approx(REL_H, abs=1e-7)


def test_loss_zero_when_output_matches_both_targets():
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(2, 5, 8, generator=generator)
    parts = homologous_loss(output, output.clone(), output.clone(), LossConfig())
    for name in ("loss", "global", "homologous", "mse", "kl"):
        assert value(parts[name]) == 0.0, name


def test_loss_parts_not_normalized():
    parts = homologous_loss(OUTPUT, Y_FP, Y_H, LossConfig(kl_weight=1.0, normalize=False))
    assert value(parts["global"]) == pytest.approx(MSE_FP + KL_FP, abs=1e-6)
    assert value(parts["homologous"]) == pytest.approx(MSE_H + KL_H, abs=1e-6)
    assert value(parts["mse"]) == pytest.approx(MSE_FP + MSE_H, abs=1e-6)
    assert value(parts["kl"]) == pytest.approx(KL_FP + KL_H, abs=1e-6)
    assert value(parts["loss"]) == pytest.approx(MSE_FP + KL_FP + MSE_H + KL_H, abs=1e-6)


def test_loss_normalize_divides_mse_by_target_mean_square():
    parts = homologous_loss(OUTPUT, Y_FP, Y_H, LossConfig(kl_weight=1.0, normalize=True))
    assert value(parts["global"]) == pytest.approx(REL_FP + KL_FP, abs=1e-6)
    assert value(parts["homologous"]) == pytest.approx(REL_H + KL_H, abs=1e-6)
    assert value(parts["mse"]) == pytest.approx(1.0, abs=1e-6)  # 1/3 + 2/3
    assert value(parts["loss"]) == pytest.approx(1.0 + KL_FP + KL_H, abs=1e-6)


def test_kl_weight_scales_kl_in_branches_but_not_kl_part():
    parts = homologous_loss(OUTPUT, Y_FP, Y_H, LossConfig(kl_weight=0.5, normalize=False))
    assert value(parts["global"]) == pytest.approx(MSE_FP + 0.5 * KL_FP, abs=1e-6)
    assert value(parts["homologous"]) == pytest.approx(MSE_H + 0.5 * KL_H, abs=1e-6)
    assert value(parts["kl"]) == pytest.approx(KL_FP + KL_H, abs=1e-6)


def test_kl_weight_zero_disables_kl():
    parts = homologous_loss(OUTPUT, Y_FP, Y_H, LossConfig(kl_weight=0.0, normalize=False))
    assert value(parts["kl"]) == 0.0
    assert value(parts["global"]) == pytest.approx(MSE_FP, abs=1e-7)
    assert value(parts["homologous"]) == pytest.approx(MSE_H, abs=1e-7)
    assert value(parts["loss"]) == pytest.approx(1.25, abs=1e-7)


def test_global_branch_off():
    parts = homologous_loss(OUTPUT, Y_FP, Y_H, LossConfig(global_branch=False, normalize=False))
    assert value(parts["global"]) == 0.0
    assert value(parts["homologous"]) == pytest.approx(MSE_H + KL_H, abs=1e-6)
    assert value(parts["loss"]) == pytest.approx(MSE_H + KL_H, abs=1e-6)
    assert value(parts["mse"]) == pytest.approx(MSE_H, abs=1e-6)
    assert value(parts["kl"]) == pytest.approx(KL_H, abs=1e-6)


def test_homologous_branch_off():
    parts = homologous_loss(OUTPUT, Y_FP, Y_H, LossConfig(homologous_branch=False, normalize=False))
    assert value(parts["homologous"]) == 0.0
    assert value(parts["loss"]) == pytest.approx(MSE_FP + KL_FP, abs=1e-6)
    assert value(parts["mse"]) == pytest.approx(MSE_FP, abs=1e-6)


def test_loss_gradient_flows_to_output():
    output = OUTPUT.clone().requires_grad_(True)
    homologous_loss(output, Y_FP, Y_H, LossConfig())["loss"].backward()
    assert output.grad is not None
    # d/d b of the MSE parts: 2 (b - y) / 4 / mean(y^2) -> first token, first feature: 2 * (0 - 1) / 4 * 4/3
    # plus KL gradient (q - p) / 2 tokens: (0.5 - e/(e+1)) / 2; homologous branch adds (0.5 - 1/(1+e^2)) / 2
    e = math.exp(1)
    expected = 2 * (0 - 1) / 4 * (4 / 3) + (0.5 - e / (e + 1)) / 2 + (0.5 - 1 / (1 + math.exp(2))) / 2
    assert output.grad[0, 0, 0].item() == pytest.approx(expected, abs=1e-5)
    assert output.grad[0, 1].abs().max().item() == pytest.approx(0.0, abs=1e-7)


def test_loss_config_validation():
    with pytest.raises(ConfigError, match="at least one"):
        LossConfig(global_branch=False, homologous_branch=False)
    with pytest.raises(ConfigError, match="kl_weight"):
        LossConfig(kl_weight=-0.1)
