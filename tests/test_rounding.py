"""LoRA-Rounding (docs/method.md §2), its regulariser schedule, and hardening/finalisation of QuantLinear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.export.quant_state import dequantize
from cbq_lightning.extensions import ExtensionsConfig
from cbq_lightning.quant.convert import finalize_block, finalized_linears, narrow_layers, quant_linears
from cbq_lightning.quant.qlinear import FinalizedQuantLinear, LayerQuantConfig, QuantLinear
from cbq_lightning.quant.rounding import (
    LoRARounding,
    NearestRounding,
    RoundingConfig,
    RoundingOffset,
    RoundingTuning,
    beta_at,
    column_scale_from_moments,
    inverse_rectified_sigmoid,
    logit_probes,
    rectified_sigmoid,
)
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.weight_quantizer import ClipSearch


def make_linear(out_features: int = 8, in_features: int = 16, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


# --- rectified sigmoid ------------------------------------------------------------------------------


def test_rectified_sigmoid_values():
    v = torch.tensor([0.0, math.log(3.0), -math.log(3.0), 20.0, -20.0, 3.0, -3.0])
    # sigmoid(log 3) = 0.75 -> 0.75 * 1.2 - 0.1 = 0.8; sigmoid(-log 3) = 0.25 -> 0.2
    # |V| = 3: sigmoid(3) = 0.952574 -> 1.043 -> clamped to 1; sigmoid(-3) = 0.047426 -> -0.043 -> 0
    expected = torch.tensor([0.5, 0.8, 0.2, 1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(rectified_sigmoid(v), expected, atol=1e-6, rtol=0)


def test_rectified_sigmoid_reaches_bounds_with_finite_logits():
    # h = 1 exactly from V = log(11) (sigmoid = 11/12 -> 11/12 * 1.2 - 0.1 = 1)
    assert rectified_sigmoid(torch.tensor(2.5)).item() == 1.0
    assert rectified_sigmoid(torch.tensor(-2.5)).item() == 0.0


def test_inverse_rectified_sigmoid_hand_values():
    h = torch.tensor([0.0, 0.5, 1.0, 0.8])
    # h = 0 -> p = 0.1/1.2 = 1/12 -> log(1/11); h = 1 -> log(11); h = 0.8 -> p = 0.75 -> log 3
    expected = torch.tensor([-math.log(11.0), 0.0, math.log(11.0), math.log(3.0)])
    torch.testing.assert_close(inverse_rectified_sigmoid(h), expected, atol=1e-5, rtol=0)


def test_inverse_rectified_sigmoid_round_trip():
    h = torch.tensor([0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-6, rtol=0)


# --- LoRARounding -----------------------------------------------------------------------------------


def test_residual_soft_equals_frac_at_init():
    generator = torch.Generator().manual_seed(0)
    frac = torch.rand(8, 16, generator=generator)
    rounding = LoRARounding(frac, rank=4, form="residual", generator=generator)
    assert torch.equal(rounding.a1, torch.zeros(8, 4))
    assert rounding.a2.shape == (4, 16) and rounding.a2.abs().sum() > 0
    torch.testing.assert_close(rounding.soft(), frac, atol=1e-5, rtol=0)


def test_residual_trainable_parameters_are_a1_a2_only():
    rounding = LoRARounding(torch.rand(6, 10), rank=2)
    assert sorted(name for name, _ in rounding.named_parameters()) == ["a1", "a2"]
    assert "v0" in dict(rounding.named_buffers())
    assert not rounding.v0.requires_grad


def test_lowrank_form_has_no_offset():
    generator = torch.Generator().manual_seed(0)
    rounding = LoRARounding(torch.rand(6, 10), rank=2, form="lowrank", generator=generator)
    assert rounding.v0 is None
    assert rounding.a1.abs().sum() > 0
    torch.testing.assert_close(rounding.logits(), rounding.a1 @ rounding.a2)


def test_unknown_form_raises():
    with pytest.raises(ConfigError, match="form"):
        LoRARounding(torch.rand(6, 10), rank=2, form="fullrank")


def test_same_generator_seed_same_factors():
    a = LoRARounding(torch.rand(6, 10), rank=2, generator=torch.Generator().manual_seed(3))
    b = LoRARounding(torch.rand(6, 10), rank=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.a2, b.a2)


@pytest.mark.parametrize(("shape", "rank"), [((8, 16), 8), ((8, 16), 9), ((16, 4), 4), ((2, 2), 2)])
def test_rank_not_below_min_dim_raises(shape, rank):
    with pytest.raises(ConfigError, match="rank"):
        LoRARounding(torch.rand(*shape), rank=rank)


def test_rank_just_below_min_dim_is_accepted():
    assert LoRARounding(torch.rand(8, 16), rank=7).a1.shape == (8, 7)


def test_hard_is_threshold_at_half():
    rounding = LoRARounding(torch.tensor([[0.2, 0.7, 0.0], [0.45, 0.55, 1.0], [0.9, 0.1, 0.3]]), rank=1)
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert torch.equal(rounding.hard(), expected)


def test_regularizer_zero_for_decided_values():
    rounding = LoRARounding(torch.zeros(3, 3), rank=1)
    with torch.no_grad():
        # V = +-10 puts h exactly at 1 and 0 (clamped)
        rounding.v0.copy_(torch.tensor([[10.0, -10.0, 10.0], [-10.0, -10.0, 10.0], [10.0, 10.0, -10.0]]))
    assert torch.equal(rounding.soft(), (rounding.v0 > 0).float())
    for beta in (2.0, 20.0):
        assert rounding.regularizer(beta).item() == 0.0


def test_regularizer_near_zero_when_initialised_at_zero_and_one():
    rounding = LoRARounding(torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), rank=1)
    assert rounding.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_regularizer_hand_values():
    # h = 0.5: 1 - |0|^beta = 1 for any beta > 0
    half = LoRARounding(torch.full((3, 3), 0.5), rank=1)
    assert half.regularizer(2.0).item() == pytest.approx(1.0, abs=1e-6)
    assert half.regularizer(20.0).item() == pytest.approx(1.0, abs=1e-6)
    # beta 2: h = [0.5, 0.75, 0, 1] -> 1 - [0, 0.25, 1, 1] = [1, 0.75, 0, 0] -> mean 0.4375
    mixed = LoRARounding(torch.tensor([[0.5, 0.75], [0.0, 1.0]]), rank=1)
    assert mixed.regularizer(2.0).item() == pytest.approx(0.4375, abs=1e-5)


def test_regularizer_gradient_reaches_a1():
    rounding = LoRARounding(torch.full((3, 4), 0.75), rank=1, generator=torch.Generator().manual_seed(0))
    rounding.regularizer(2.0).backward()
    assert rounding.a1.grad is not None and (rounding.a1.grad != 0).any()


# --- RoundingConfig / beta schedule -----------------------------------------------------------------


def test_rounding_config_validation():
    with pytest.raises(ConfigError, match="rounding.rank=0"):
        RoundingConfig(rank=0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="advanced.rounding.reg_weight"):
            RoundingTuning(reg_weight=bad)
    assert RoundingTuning(reg_weight=0.0).reg_weight == 0.0  # no regulariser: allowed


@pytest.mark.parametrize(("kwargs", "key"), [({"warmup": 1.0}, "warmup"), ({"warmup": -0.1}, "warmup"),
                                             ({"init_std": 0.0}, "init_std"), ({"init_std": math.inf}, "init_std")])
def test_rounding_tuning_validation(kwargs, key):
    with pytest.raises(ConfigError, match=rf"advanced\.rounding\.{key}="):
        RoundingTuning(**kwargs)


def test_beta_schedule_hand_values():
    config = RoundingTuning(beta_start=20.0, beta_end=2.0, warmup=0.2)
    # total 10, warm-up int(0.2 * 10) = 2 steps; then 7 intervals from step 2 to step 9: -18/7 per step
    betas = [beta_at(step, 10, config) for step in range(10)]
    expected = [
        None,
        None,
        20.0,
        17.428571428571427,
        14.857142857142858,
        12.285714285714286,
        9.714285714285715,
        7.142857142857143,
        4.571428571428571,
        2.0,
    ]
    assert betas[:2] == [None, None]
    assert betas[2:] == pytest.approx(expected[2:], abs=1e-9)
    steps = [b - a for a, b in zip(betas[2:], betas[3:], strict=False)]
    assert steps == pytest.approx([-18.0 / 7.0] * 7, abs=1e-9)


def test_beta_after_last_step_stays_at_end():
    config = RoundingTuning(beta_start=20.0, beta_end=2.0, warmup=0.2)
    assert beta_at(15, 10, config) == 2.0


def test_beta_without_warmup_starts_immediately():
    config = RoundingTuning(beta_start=10.0, beta_end=0.0, warmup=0.0)
    # span = 5 - 1 = 4 -> 10, 7.5, 5, 2.5, 0
    assert [beta_at(s, 5, config) for s in range(5)] == pytest.approx([10.0, 7.5, 5.0, 2.5, 0.0])


def test_beta_no_steps_is_none():
    assert beta_at(0, 0, RoundingTuning()) is None


# --- QuantLinear: soft rounding at initialisation ---------------------------------------------------


def grid_aligned_linear(seed: int = 0) -> nn.Linear:
    """Rows spanning [-0.5c, c]: at 4 bits s = 1.5c/15 = 0.1c and z = 5 exactly, so no soft code is clamped."""
    layer = make_linear(8, 16, seed)
    generator = torch.Generator().manual_seed(seed)
    c = torch.rand(8, 1, generator=generator) + 0.5
    weight = (torch.rand(8, 16, generator=generator) * 1.5 - 0.5) * c
    weight[:, 0] = -0.5 * c[:, 0]
    weight[:, 1] = c[:, 0]
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_soft_rounding_reproduces_fp_weight_at_init():
    linear = grid_aligned_linear()
    layer = QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=4), RoundingConfig(), learnable_clip=False, clip_init=1.0))
    assert layer.rounding is not None
    torch.testing.assert_close(layer.fake_weight(), linear.weight.detach(), atol=1e-5, rtol=0)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), linear(x).detach(), atol=1e-5, rtol=1e-5)


def test_soft_rounding_at_init_reproduces_all_but_clamped_extremes():
    """Generic weights: every element whose soft code stays inside [0, 2^b - 1] is reproduced exactly;
    the elements near the group's max/min that the integer zero-point pushes outside are off by <= s/2."""
    linear = make_linear()
    layer = QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=4), RoundingConfig(), learnable_clip=False, clip_init=1.0))
    weight = linear.weight.detach()
    scale, zero = layer.quantizer.scale_zero(weight)
    soft_code = weight / scale.squeeze(-1) + zero.squeeze(-1)  # [8, 16], per-channel
    inside = (soft_code >= 0) & (soft_code <= 15)
    diff = (layer.fake_weight() - weight).abs()
    assert diff[inside].max().item() < 1e-5
    assert (diff <= 0.5 * scale.squeeze(-1) + 1e-6).all()
    assert 0 < int((~inside).sum()) <= 16


def trained_like_layer(sym: bool = False) -> QuantLinear:
    """A 3-bit, group-8 calibrating layer whose rounding and clipping have moved away from their init."""
    layer = QuantLinear(
        make_linear(),
        LayerQuantConfig(QuantScheme(w_bits=3, group_size=8, sym=sym), RoundingConfig(rank=2), learnable_clip=True,
                         clip_init=0.9),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        layer.rounding.a1.copy_(torch.randn(layer.rounding.a1.shape, generator=torch.Generator().manual_seed(3)))
        layer.quantizer.upper_logit.sub_(0.5)
    return layer


@pytest.mark.parametrize("sym", [False, True])
def test_finalize_stores_integer_state(sym):
    layer = trained_like_layer(sym)
    layer.use_hard_rounding = True
    hard_weight = layer.fake_weight().detach().clone()
    layer.use_hard_rounding = False
    layer = layer.finalize()

    assert isinstance(layer, FinalizedQuantLinear)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (8, 16)
    assert int(layer.qweight.min()) >= 0 and int(layer.qweight.max()) <= 7
    assert layer.zeros.dtype == torch.uint8 and layer.zeros.shape == (8, 2)
    assert int(layer.zeros.max()) <= 7
    if sym:
        assert (layer.zeros == 4).all()
    assert layer.scales.dtype == torch.float32 and layer.scales.shape == (8, 2)
    assert (layer.scales > 0).all()
    assert 0.0 < layer.flip_fraction < 1.0

    # weight == scales * (qweight - zeros), group by group
    for j in range(2):
        cols = slice(8 * j, 8 * (j + 1))
        expected = layer.scales[:, j : j + 1] * (
            layer.qweight[:, cols].float() - layer.zeros[:, j : j + 1].float()
        )
        assert torch.equal(layer.weight[:, cols], expected)
    state = {
        "qweight": layer.qweight,
        "scales": layer.scales,
        "zeros": layer.zeros,
        "bits": torch.tensor(3, dtype=torch.int32),
        "group_size": torch.tensor(8, dtype=torch.int32),
    }
    assert torch.equal(layer.weight, dequantize(state))
    assert torch.equal(layer.weight, layer.dequantized_weight())
    # finalising gives what the hardened forward showed before
    torch.testing.assert_close(layer.weight, hard_weight, atol=1e-6, rtol=0)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_finalize_removes_all_trainable_parameters():
    layer = trained_like_layer()
    names = sorted(name for name, _ in layer.named_parameters())
    assert names == ["quantizer.lower_logit", "quantizer.upper_logit", "rounding.a1", "rounding.a2"]
    final = layer.finalize()
    assert list(final.parameters()) == []
    assert set(final.state_dict()) == {"weight", "bias", "qweight", "scales", "zeros"}


def test_finalize_block_swaps_in_finalised_layers_once():
    """finalize_block replaces each calibrating layer by its finalised one; a second call finds none left and
    changes nothing (a resumed run may finalise a block that is already final)."""
    block = nn.Sequential(trained_like_layer(), nn.ReLU(), trained_like_layer(sym=True))
    finalize_block(block)
    assert isinstance(block[0], FinalizedQuantLinear) and isinstance(block[2], FinalizedQuantLinear)
    assert not list(quant_linears(block)) and len(list(finalized_linears(block))) == 2
    state = {k: v.clone() for k, v in block.state_dict().items()}
    finalize_block(block)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize(
    ("scheme", "learnable_clip", "clip_init"),
    [
        (QuantScheme(w_bits=4), False, 1.0),
        (QuantScheme(w_bits=3, group_size=8), True, 0.9),
        (QuantScheme(w_bits=2, group_size=4, sym=True), False, 0.8),
    ],
)
def test_untrained_lora_rounding_hardens_to_round_to_nearest(scheme, learnable_clip, clip_init):
    linear = make_linear(8, 16, seed=3)
    generator = torch.Generator().manual_seed(0)
    learned = QuantLinear(linear, LayerQuantConfig(scheme, RoundingConfig(), learnable_clip, clip_init), generator)
    nearest = QuantLinear(linear, LayerQuantConfig(scheme, RoundingConfig(enabled=False), learnable_clip, clip_init))
    assert isinstance(nearest.rounding, NearestRounding)
    learned.use_hard_rounding = True
    torch.testing.assert_close(learned.fake_weight(), nearest.fake_weight(), atol=0, rtol=0)
    learned, nearest = learned.finalize(), nearest.finalize()
    assert learned.flip_fraction == 0.0
    assert torch.equal(learned.qweight, nearest.qweight)
    assert torch.equal(learned.zeros, nearest.zeros)
    assert torch.equal(learned.scales, nearest.scales)
    assert torch.equal(learned.weight, nearest.weight)


def test_rtn_finalize_codes_hand_values():
    # 2-bit per-channel RTN on a hand-made weight (see test_quantizer): codes [[0,1,1,3],[0,1,2,3]]
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[-1.0, -0.5, 0.25, 2.0], [0.0, 0.2, 0.4, 0.6]]))
    layer = QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=2), RoundingConfig(enabled=False), False, 1.0))
    layer = layer.finalize()
    assert layer.qweight.tolist() == [[0, 1, 1, 3], [0, 1, 2, 3]]
    assert layer.zeros.tolist() == [[1], [0]]
    torch.testing.assert_close(layer.scales, torch.tensor([[1.0], [0.2]]))
    torch.testing.assert_close(layer.weight, torch.tensor([[-1.0, 0.0, 0.0, 2.0], [0.0, 0.2, 0.4, 0.6]]))


# --- signed-offset rounding (form: offset) -------------------------------------------------------------


def hand_offset_layer() -> QuantLinear:
    """The 2-bit hand-made layer of ``test_rtn_finalize_codes_hand_values`` with signed rounding offsets."""
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[-1.0, -0.5, 0.25, 2.0], [0.0, 0.2, 0.4, 0.6]]))
    layer = QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=2), RoundingConfig(form="offset"), False, 1.0))
    assert isinstance(layer.rounding, RoundingOffset)
    return layer


def test_offset_starts_at_round_to_nearest():
    layer = hand_offset_layer()
    nearest = QuantLinear(nn.Linear(4, 2, bias=False), LayerQuantConfig(QuantScheme(w_bits=2), RoundingConfig(enabled=False), False, 1.0))
    nearest.weight.copy_(layer.weight)
    torch.testing.assert_close(layer.fake_weight(), nearest.fake_weight(), atol=0, rtol=0)


def test_offset_codes_hand_values():
    # row 0: W/s = [-1, -0.5, 0.25, 2], zero 1; offsets [0.3, -0.2, 0.3, 0.9 -> 0.5]
    #   round_half_up([-0.7, -0.7, 0.55, 2.5]) = [-1, -1, 1, 3] -> +1 -> [0, 0, 2, 4 -> clamp 3]
    # row 1: W/s = [0, 1, 2, 3], zero 0; offsets [-0.6 -> -0.5, 0.49, -0.49, 0]
    #   round_half_up([-0.5, 1.49, 1.51, 3]) = [0, 1, 2, 3]: a bounded offset cannot move a grid value
    layer = hand_offset_layer()
    with torch.no_grad():
        layer.rounding.v.copy_(torch.tensor([[0.3, -0.2, 0.3, 0.9], [-0.6, 0.49, -0.49, 0.0]]))
    torch.testing.assert_close(layer.fake_weight(), torch.tensor([[-1.0, -1.0, 1.0, 2.0], [0.0, 0.2, 0.4, 0.6]]))
    layer = layer.finalize()
    assert layer.qweight.tolist() == [[0, 0, 2, 3], [0, 1, 2, 3]]
    assert layer.flip_fraction == pytest.approx(2 / 8)  # row 0, positions 1 and 2 left round-to-nearest
    assert list(layer.parameters()) == []


def test_offset_gradient_is_straight_through():
    # d W_hat / d v = s inside (-0.5, 0.5) and where the code is not clamped; zero beyond the bounds
    layer = hand_offset_layer()
    with torch.no_grad():
        layer.rounding.v.copy_(torch.tensor([[0.1, -0.1, 0.7, 0.0], [0.2, 0.0, -0.2, -0.7]]))
    layer.fake_weight().sum().backward()
    grad = layer.rounding.v.grad
    # row 0: s = 1; position 2 is beyond the bound; position 3 (code 3 = top) is not clamped by the +0 offset
    # row 1: s = 0.2; position 3 beyond the bound
    torch.testing.assert_close(grad, torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.0]]))


def test_offset_has_no_regulariser_and_trains_with_clipping():
    layer = QuantLinear(make_linear(), LayerQuantConfig(QuantScheme(w_bits=3, group_size=8), RoundingConfig(form="offset"), True, 0.9))
    assert layer.rounding_regularizer(2.0) is None
    assert [p.shape for p in layer.rounding_parameters()] == [torch.Size([8, 16])]
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    layer(x).pow(2).sum().backward()
    assert layer.rounding.v.grad.abs().sum() > 0
    assert layer.quantizer.upper_logit.grad.abs().sum() > 0


def test_a_layer_too_narrow_for_the_rank_gets_half_its_smaller_dimension():
    """A recipe's rank is kept wherever it is below the layer's smaller dimension (so a recipe computes the same
    on the models it fitted), and a narrower layer gets half its smaller dimension instead of a refusal."""
    config = RoundingConfig(form="residual", rank=8)
    assert config.rank_for(16, 64) == 8 and config.rank_for(9, 64) == 8
    assert config.rank_for(8, 64) == 4 and config.rank_for(64, 6) == 3 and config.rank_for(1, 64) == 1
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 32), nn.Linear(32, 32))])
    assert narrow_layers(blocks, config) == {"blocks.0.0": 2, "blocks.0.1": 2}
    assert narrow_layers(blocks, RoundingConfig(form="offset")) == {}  # the offset form is full-rank by design
    assert narrow_layers(blocks, RoundingConfig(form="residual", rank=3)) == {}


def test_offset_form_refuses_the_settings_it_would_ignore():
    """``rank`` with ``form: offset`` (the earlier SmolLM2 recipes' rank 4 next to offsets) trains nothing different:
    refused, naming the key and its default, rather than silently ignored (the regulariser's weight, an
    ``advanced.rounding`` setting, is checked with the configuration: test_cli_end_to_end)."""
    with pytest.raises(ConfigError, match=r"rounding\.rank=64 would do nothing: set --rounding\.rank 4"):
        RoundingConfig(form="offset", rank=64)
    RoundingConfig(form="residual", rank=64)


def test_unknown_rounding_form_in_config_raises():
    with pytest.raises(ConfigError, match="rounding.form"):
        RoundingConfig(form="adaround")


def test_hardened_forward_uses_hard_decisions_with_the_soft_gradient() -> None:
    """``extensions.rounding_forward: hardened``: the forward value is ``1[h(V) >= 0.5]``, the gradient that of ``h(V)``.
    By hand for one weight with V = 0.3: h = 1.2 sigmoid(0.3) - 0.1 = 0.5893 (forward 1.0) and
    dh/dV = 1.2 sigmoid(0.3) (1 - sigmoid(0.3)) = 0.2934."""
    rounding = LoRARounding(torch.full((2, 3), 0.5), rank=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rounding.v0.fill_(0.3)
        rounding.a1.zero_()
    decisions = rounding.hardened_straight_through()
    assert torch.equal(decisions, torch.ones(2, 3))
    decisions.sum().backward()
    sig = 1.0 / (1.0 + math.exp(-0.3))
    expected_a1_grad = 1.2 * sig * (1 - sig) * rounding.a2.detach().sum(dim=1)  # dV/dA1[o, r] = sum_i A2[r, i]
    torch.testing.assert_close(rounding.a1.grad, expected_a1_grad.expand(2, 1), rtol=1e-5, atol=1e-6)


def test_hardened_forward_layer_equals_its_hardened_measurement() -> None:
    """A layer trained through hardened decisions computes, in training, exactly what finalising would give."""
    linear = make_linear()
    layer = QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=3), rounding_forward="hardened"),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.rounding.a1.normal_()
    trained_view = layer.fake_weight()
    layer.use_hard_rounding = True
    torch.testing.assert_close(trained_view, layer.fake_weight(), rtol=0, atol=0)
    soft = QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=3), rounding_forward="soft"),
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        soft.rounding.a1.copy_(layer.rounding.a1)
    assert not torch.equal(soft.fake_weight(), trained_view), "the soft forward differs from the hardened one"
    with pytest.raises(ConfigError, match="extensions.rounding_forward"):
        ExtensionsConfig(rounding_forward="sometimes")


# --- extensions.rounding_init: gradient (A2 aligned with dL/dV while A1 is zero) ------------------------------------


def test_logit_probe_gradient_is_dl_dv_by_hand() -> None:
    """``logit_probes``: the gradient of a loss with respect to the probe is ``dL/dV``. With the loss
    ``sum(C * h(V))`` it is ``C * h'(V)``, ``h'(V) = 1.2 sigmoid(V) (1 - sigmoid(V))`` inside the clamp;
    here V = V0 = 0.3 everywhere (A1 = 0), so h'(V) = 0.29335."""
    rounding = LoRARounding(torch.full((2, 3), 0.5), rank=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rounding.v0.fill_(0.3)
    weights = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    with logit_probes([rounding]) as (probe,):
        (gradient,) = torch.autograd.grad((weights * rounding.soft()).sum(), [probe])
    assert rounding.probe is None, "the probe is removed when the block ends"
    torch.testing.assert_close(gradient, weights * 0.293350, rtol=1e-5, atol=1e-7)


def test_align_to_gradient_takes_the_top_singular_directions_and_keeps_the_decisions() -> None:
    """A rank-1 gradient ``u v^T``: A2's first row becomes ``+-v`` scaled to the random start's entry size
    (norm ``init_std * sqrt(in)``), its rows stay orthogonal, and no logit moves (A1 is zero)."""
    frac = torch.rand(6, 8, generator=torch.Generator().manual_seed(1))
    rounding = LoRARounding(frac, rank=2, init_std=0.1, generator=torch.Generator().manual_seed(0))
    before = rounding.soft().detach().clone()
    u = torch.tensor([1.0, 0.0, 2.0, 0.0, -1.0, 0.5])
    v = torch.tensor([3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])  # |v| = 5
    rounding.align_to_gradient(torch.outer(u, v))
    a2 = rounding.a2.detach()
    scale = 0.1 * math.sqrt(8)
    torch.testing.assert_close(a2[0].abs(), (v / 5.0).abs() * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a2 @ a2.T, torch.eye(2) * scale**2, rtol=1e-5, atol=1e-6)
    assert torch.equal(rounding.soft().detach(), before)


def test_align_to_gradient_refuses_trained_factors() -> None:
    """With A1 != 0 a new A2 would change the logits (the overlap block carried into its second window)."""
    rounding = LoRARounding(torch.full((4, 6), 0.3), rank=2, generator=torch.Generator().manual_seed(0))
    assert rounding.product_is_zero()
    with torch.no_grad():
        rounding.a1[0, 0] = 0.5
    assert not rounding.product_is_zero()
    with pytest.raises(RuntimeError, match="A1 = 0"):
        rounding.align_to_gradient(torch.ones(4, 6))
    lowrank = LoRARounding(torch.full((4, 6), 0.3), rank=2, form="lowrank", generator=torch.Generator().manual_seed(0))
    assert not lowrank.product_is_zero(), "the pure low-rank form starts both factors random"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rounding_init": "svd"}, "extensions.rounding_init='svd' is unknown"),
    ({"rounding_init_batches": 0}, "extensions.rounding_init_batches=0 must be >= 1"),
])
def test_gradient_init_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExtensionsConfig(**kwargs)


@pytest.mark.parametrize(("flags", "message"), [
    (["--extensions.rounding_init", "gradient", "--rounding.form", "lowrank"],
     "extensions.rounding_init=gradient needs rounding.form=residual"),
    (["--extensions.rounding_init", "gradient", "--rounding.form", "offset", "--rounding.rank", "4"],
     r"extensions\.rounding_init=gradient would do nothing"),
])
def test_gradient_init_against_the_rounding_form(flags: list[str], message: str) -> None:
    """The gradient-aligned start needs a frozen ``V0`` and factors to align: refused before any work otherwise."""
    from cbq_lightning.config import validate
    from tests.conftest import TINY_RECIPE, load_recipe

    with pytest.raises(ConfigError, match=message):
        validate(load_recipe(TINY_RECIPE, *flags))


# --- column scale of the low-rank term (extensions.column_scale) ----------------------------------------


def test_column_scale_hand_values() -> None:
    """E[x^2] = (1, 4, 16, 100, 0.25): rms (1, 2, 4, 10, 0.5), median 2, ratio (0.5, 1, 2, 5, 0.25). At
    alpha 1 the scale is min(1, 1/ratio) = (1, 1, 0.5, 0.2, 1); at alpha 0.5, (1, 1, 0.7071, 0.4472, 1)."""
    moments = torch.tensor([1.0, 4.0, 16.0, 100.0, 0.25])
    torch.testing.assert_close(column_scale_from_moments(moments, 1.0), torch.tensor([1.0, 1.0, 0.5, 0.2, 1.0]))
    torch.testing.assert_close(
        column_scale_from_moments(moments, 0.5), torch.tensor([1.0, 1.0, 0.5**0.5, 0.2**0.5, 1.0]), rtol=1e-6, atol=1e-6
    )
    assert torch.equal(column_scale_from_moments(torch.zeros(3), 1.0), torch.ones(3)), "no signal: scale 1"


def test_column_scale_multiplies_the_low_rank_term_only() -> None:
    """logits = V0 + (A1 A2) diag(c): V0 unscaled, each column of the product times its c_j; the gradient
    reaching A1 is dL/dV diag(c) A2^T."""
    frac = torch.rand(3, 4, generator=torch.Generator().manual_seed(2))
    scale = torch.tensor([1.0, 0.5, 0.25, 1.0])
    rounding = LoRARounding(frac, rank=2, generator=torch.Generator().manual_seed(0), column_scale=scale)
    with torch.no_grad():
        rounding.a1.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
    product = rounding.a1.detach() @ rounding.a2.detach()
    torch.testing.assert_close(rounding.logits(), rounding.v0 + product * scale)
    upstream = torch.arange(12.0).reshape(3, 4)
    (rounding.logits() * upstream).sum().backward()
    torch.testing.assert_close(rounding.a1.grad, (upstream * scale) @ rounding.a2.detach().T)


def test_column_scale_is_built_from_the_layers_input_moments() -> None:
    """QuantLinear with ``extensions.column_scale`` keeps ``c`` from its inputs' E[x^2] as a buffer (saved and
    restored with the block), and the layer asks the run for input moments even without an activation-aware
    clip search."""
    config = LayerQuantConfig(scheme=QuantScheme(w_bits=3, group_size=8),
                              rounding=RoundingConfig(rank=2), rounding_forward="hardened", column_scale=1.0)
    assert config.needs_input_moments and not config.activation_aware
    assert not LayerQuantConfig(scheme=QuantScheme(w_bits=3, group_size=8)).needs_input_moments
    moments = torch.tensor([1.0, 4.0, 16.0, 100.0] * 4)
    layer = QuantLinear(make_linear(8, 16), config, torch.Generator().manual_seed(0), input_moments=moments)
    torch.testing.assert_close(layer.rounding.column_scale, column_scale_from_moments(moments, 1.0).reshape(1, -1))
    assert "rounding.column_scale" in layer.state_dict()


def test_column_scale_moments_do_not_reach_a_weight_error_clip_search() -> None:
    """The moments collected for the column scale are not the clip search's to use when it is not
    activation-aware: with a massive input feature on an outlier weight (which an activation-aware search keeps
    unclipped), the non-aware search sets the same clipping with or without the moments."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.rand(4, 64, generator=generator) * 2 - 1)
        linear.weight[:, 0] = 8.0
    moments = torch.ones(64)
    moments[0] = 1e4

    def clip_logit(activation_aware: bool, column_scale: float, layer_moments: torch.Tensor | None) -> torch.Tensor:
        config = LayerQuantConfig(
            scheme=QuantScheme(w_bits=3, group_size=64), rounding=RoundingConfig(rank=1), column_scale=column_scale,
            clip_search=ClipSearch(min_ratio=0.2, steps=41, norm=2.0, activation_aware=activation_aware),
        )
        layer = QuantLinear(linear, config, torch.Generator().manual_seed(0), input_moments=layer_moments)
        return layer.quantizer.upper_logit.detach().clone()

    weight_error = clip_logit(False, 1.0, moments)
    assert torch.equal(weight_error, clip_logit(False, 0.0, None))
    assert not torch.equal(weight_error, clip_logit(True, 1.0, moments)), "the moments would change the search"
