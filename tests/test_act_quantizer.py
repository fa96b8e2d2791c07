"""Activation quantizers against hand-computed values, their gradients, and their place in a QuantLinear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.act_quantizer import ActivationQuantizer, ActQuantSettings
from cbq_lightning.quant.config import QuantConfig, QuantTuning
from cbq_lightning.quant.qlinear import LayerQuantConfig, QuantLinear
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import parse_scheme


def _fixed(bits: int, mode: str, ratio: float = 1.0) -> ActivationQuantizer:
    return ActivationQuantizer(ActQuantSettings(bits=bits, mode=mode, learnable=False, clip_init=ratio))


def test_dynamic_symmetric_per_token_hand_values() -> None:
    # token 1: max|x| = 3.5, 4 bits -> scale 0.5; x/scale = 2, -2.5, 1, 7 -> 2, -2 (half to even), 1, 7
    # token 2: max|x| = 1.75 -> scale 0.25; x/scale = 7, -1, 0.25, 3 -> 7, -1, 0, 3
    x = torch.tensor([[[1.0, -1.25, 0.5, 3.5], [1.75, -0.25, 0.0625, 0.75]]])
    expected = torch.tensor([[[1.0, -1.0, 0.5, 3.5], [1.75, -0.25, 0.0, 0.75]]])
    torch.testing.assert_close(_fixed(4, "dynamic_sym")(x), expected)


def test_dynamic_symmetric_clipping_ratio_clamps_the_largest_values() -> None:
    # ratio 0.5: max|x| 7 -> clip at 3.5, scale 0.5; 7 / 0.5 = 14 -> clamped to 7 -> 3.5
    x = torch.tensor([[1.0, -2.0, 0.5, 7.0]])
    torch.testing.assert_close(_fixed(4, "dynamic_sym", ratio=0.5)(x), torch.tensor([[1.0, -2.0, 0.5, 3.5]]))


def test_dynamic_asymmetric_hand_values() -> None:
    # 2 bits: range [-1, 3], scale 4/3, zero round(0.75) = 1; x/scale = -0.75, 0, 1.5, 2.25 -> -1, 0, 2, 2
    # codes +1 = 0, 1, 3, 3 -> (q - 1) * 4/3
    x = torch.tensor([[-1.0, 0.0, 2.0, 3.0]])
    expected = torch.tensor([[-4 / 3, 0.0, 8 / 3, 8 / 3]])
    torch.testing.assert_close(_fixed(2, "dynamic_asym")(x), expected)


def test_static_step_hand_values() -> None:
    # step 0.5, 4 bits (codes -8..7): 0.3 -> 0.6 -> 1; -1.2 -> -2.4 -> -2; 5.0 -> 10 -> 7
    quantizer = _fixed(4, "static_lsq")
    quantizer.fixed_step.fill_(0.5)
    quantizer.initialized.fill_(True)
    out = quantizer(torch.tensor([0.3, -1.2, 5.0]))
    torch.testing.assert_close(out, torch.tensor([0.5, -1.0, 3.5]))


def test_static_lsq_step_gets_the_scaled_lsq_gradient() -> None:
    quantizer = ActivationQuantizer(ActQuantSettings(bits=4, mode="static_lsq", learnable=True))
    with torch.no_grad():
        quantizer.step.fill_(0.5)
    quantizer.initialized.fill_(True)
    quantizer(torch.tensor([0.3, -1.2, 5.0])).sum().backward()
    # d(q*s)/ds = q - x/s inside the range (1 - 0.6, -2 + 2.4), the bound outside (7); LSQ scale 1/sqrt(3*7)
    expected = (0.4 + 0.4 + 7.0) / math.sqrt(3 * 7)
    assert quantizer.step.grad is not None
    assert float(quantizer.step.grad) == pytest.approx(expected, rel=1e-5)


def test_static_step_is_initialised_from_the_first_batch_by_least_error() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    x[0, 0] = 12.0  # one large activation: the min/max step (12/7) would round most of the batch to 0
    quantizer = ActivationQuantizer(ActQuantSettings(bits=4, mode="static_lsq", learnable=True))
    quantizer(x)
    assert bool(quantizer.initialized)
    step = float(quantizer.step.detach())
    assert step < 0.6 * 12.0 / 7, "the grid search should clip the outlier rather than cover it"

    def mse(s: float) -> float:
        return float((torch.clamp(torch.round(x / s), -8, 7) * s - x).pow(2).mean())

    assert mse(step) < 0.5 * mse(12.0 / 7)
    before = step
    quantizer(x * 3)  # initialised once: later batches do not reset it
    assert float(quantizer.step.detach()) == before


@pytest.mark.parametrize("mode", ["dynamic_sym", "dynamic_asym"])
def test_dynamic_clipping_logits_receive_gradient(mode: str) -> None:
    torch.manual_seed(0)
    quantizer = ActivationQuantizer(ActQuantSettings(bits=4, mode=mode, learnable=True, clip_init=0.9))
    x = torch.randn(8, 16, requires_grad=True)
    (quantizer(x) - x.detach() * 1.1).pow(2).sum().backward()
    params = quantizer.trainable_parameters()
    assert len(params) == (1 if mode == "dynamic_sym" else 2)
    for param in params:
        assert param.grad is not None and torch.isfinite(param.grad) and float(param.grad) != 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_eight_bits_is_nearly_lossless_and_keeps_dtype() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    out = _fixed(8, "dynamic_sym")(x)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - x.float()).abs().max()) <= float(x.float().abs().max()) / 127 / 2 + 0.02


@pytest.mark.parametrize("mode", ["dynamic_sym", "dynamic_asym", "static_lsq"])
def test_export_state_round_trip(mode: str) -> None:
    torch.manual_seed(0)
    quantizer = ActivationQuantizer(ActQuantSettings(bits=4, mode=mode, learnable=True, clip_init=0.8))
    x = torch.randn(4, 10, 32)
    expected = quantizer(x)
    with torch.no_grad():  # move the learned values away from their start
        for param in quantizer.trainable_parameters():
            param.add_(0.3)
    expected = quantizer(x)
    reloaded = ActivationQuantizer.from_export_state(4, mode, quantizer.export_state())
    assert reloaded.trainable_parameters() == []
    torch.testing.assert_close(reloaded(x), expected)


def test_settings_validation() -> None:
    with pytest.raises(ConfigError, match="act_mode"):
        ActQuantSettings(bits=8, mode="per_channel")
    with pytest.raises(ConfigError, match="advanced.quant.act_clip_init=1.0 must lie strictly between 0 and 1"):
        ActQuantSettings(bits=8, learnable=True, clip_init=1.0)
    with pytest.raises(ConfigError, match=r"advanced.quant.act_clip_init=1.5 must lie in \(0, 1\]"):
        ActQuantSettings(bits=8, learnable=False, clip_init=1.5)
    with pytest.raises(ConfigError, match="bits"):
        ActQuantSettings(bits=16)


def test_quant_config_resolves_activation_schemes() -> None:
    config = QuantConfig(scheme="W4A8")
    assert config.resolve() == parse_scheme("W4A8")
    tuning = QuantTuning(act_clip_init=0.9)
    assert config.act_settings(True, tuning) == ActQuantSettings(bits=8, mode="dynamic_sym", learnable=True, clip_init=0.9)
    assert config.act_settings(False, tuning) == ActQuantSettings(bits=8, mode="dynamic_sym", learnable=False, clip_init=1.0)
    assert QuantConfig(scheme="W4A8").act_settings(True, QuantTuning(act_learnable=False)).learnable is False
    assert QuantConfig(scheme="W4A16").act_settings(True, tuning) is None
    assert QuantConfig(scheme="W4A6").act_settings(True, tuning).bits == 6
    with pytest.raises(ConfigError, match="act_mode"):
        QuantConfig(scheme="W4A4", act_mode="bogus").resolve()


def test_quant_linear_quantizes_its_input_and_freezes_at_finalise() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    act = ActQuantSettings(bits=4, mode="dynamic_sym", learnable=True, clip_init=0.9)
    layer = QuantLinear(linear, LayerQuantConfig(parse_scheme("W4A4"), RoundingConfig(enabled=False), act=act))
    x = torch.randn(3, 5, 32)
    assert layer.act_quantizer is not None
    expected = F.linear(layer.act_quantizer(x), layer.fake_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert len(layer.act_parameters()) == 1
    layer = layer.finalize()
    assert not any(p.requires_grad for p in layer.parameters())
    assert not any(p.requires_grad for p in layer.act_quantizer.parameters())
    torch.testing.assert_close(layer(x), F.linear(layer.act_quantizer(x), layer.weight, layer.bias))
