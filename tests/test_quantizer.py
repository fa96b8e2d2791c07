"""WeightQuantizer maths (docs/method.md §1) against hand-computed values.

Every expected number below was worked out by hand from the formulas
``s = (max' - min') / (2^b - 1)``, ``z = round(-min' / s)``, ``q = clamp(round(W / s) + z, 0, 2^b - 1)``,
``W_hat = s * (q - z)`` (asymmetric) and ``s = 2 * absmax / (2^b - 1)``, ``z = 2^(b-1)`` (symmetric), with
round-half-up, and is written as a literal; none is re-derived with the code's own formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.weight_quantizer import SCALE_EPS, WeightQuantizer, clip_logit

# Row 0 spans both signs (min -1, max 2); row 1 is all >= 0, so its min is capped at 0.
W = torch.tensor([[-1.0, -0.5, 0.25, 2.0], [0.0, 0.2, 0.4, 0.6]])


def rtn(weight: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = False, clip: float = 1.0):
    """Plain (non-learnable) quantizer; returns scale [out, groups], zero, codes [out, in], dequantized."""
    quantizer = WeightQuantizer(weight, bits, group_size, sym, learnable_clip=False, clip_init=clip)
    scale, zero = quantizer.scale_zero(weight)
    codes = quantizer.codes(weight, scale, zero, None).reshape(weight.shape)
    return scale.squeeze(-1), zero.squeeze(-1), codes, quantizer.fake_quantize(weight)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- asymmetric, per channel ------------------------------------------------------------------------


def test_asymmetric_per_channel_2bit():
    # row 0: s = (2 - (-1)) / 3 = 1, z = round(1 / 1) = 1; W/s = [-1, -0.5, 0.25, 2] -> round-half-up
    #        [-1, 0, 0, 2] -> +z -> [0, 1, 1, 3]; W_hat = 1 * ([0, 1, 1, 3] - 1) = [-1, 0, 0, 2]
    # row 1: min capped at 0: s = 0.6 / 3 = 0.2, z = 0; W/s = [0, 1, 2, 3]
    scale, zero, codes, dequant = rtn(W, bits=2)
    close(scale, [[1.0], [0.2]])
    close(zero, [[1.0], [0.0]])
    close(codes, [[0.0, 1.0, 1.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    close(dequant, [[-1.0, 0.0, 0.0, 2.0], [0.0, 0.2, 0.4, 0.6]])


def test_asymmetric_per_channel_3bit():
    # row 0: s = 3 / 7 = 0.428571..., z = round(7 / 3 = 2.33) = 2;
    #        W/s = [-2.33, -1.17, 0.58, 4.67] -> [-2, -1, 1, 5] -> codes [0, 1, 3, 7]
    #        W_hat = 3/7 * [-2, -1, 1, 5] = [-6/7, -3/7, 3/7, 15/7]
    # row 1: s = 0.6 / 7 = 0.0857142..., z = 0; W/s = [0, 2.33, 4.67, 7] -> codes [0, 2, 5, 7]
    #        W_hat = 0.6/7 * [0, 2, 5, 7] = [0, 1.2/7, 3/7, 0.6]
    scale, zero, codes, dequant = rtn(W, bits=3)
    close(scale, [[0.42857143], [0.08571429]])
    close(zero, [[2.0], [0.0]])
    close(codes, [[0.0, 1.0, 3.0, 7.0], [0.0, 2.0, 5.0, 7.0]])
    close(dequant, [[-0.85714286, -0.42857143, 0.42857143, 2.14285714], [0.0, 0.17142857, 0.42857143, 0.6]])


def test_all_negative_row_caps_max_at_zero():
    # min -1.5, max capped at 0: s = 1.5 / 3 = 0.5, z = round(3) = 3 (the top code stands for 0)
    weight = torch.tensor([[-1.5, -1.0, -0.2, -0.6]])
    scale, zero, codes, dequant = rtn(weight, bits=2)
    close(scale, [[0.5]])
    close(zero, [[3.0]])
    # W/s = [-3, -2, -0.4, -1.2] -> [-3, -2, 0, -1] -> +3 -> [0, 1, 3, 2]
    close(codes, [[0.0, 1.0, 3.0, 2.0]])
    close(dequant, [[-1.5, -1.0, 0.0, -0.5]])


# --- asymmetric, per group ----------------------------------------------------------------------------


def test_asymmetric_per_group_2bit():
    weight = torch.tensor([[-1.0, -0.4, 0.25, 2.0], [0.0, 0.2, 0.4, 0.6]])
    scale, zero, codes, dequant = rtn(weight, bits=2, group_size=2)
    # row 0 group [-1, -0.4]: max capped at 0, s = 1/3, z = round(3) = 3; W/s = [-3, -1.2] -> [-3, -1]
    #                          -> codes [0, 2]; W_hat = 1/3 * [-3, -1] = [-1, -1/3]
    # row 0 group [0.25, 2]:   min capped at 0, s = 2/3, z = 0; W/s = [0.375, 3] -> codes [0, 3]
    # row 1 group [0, 0.2]:    s = 0.2/3, z = 0; W/s = [0, 3] -> codes [0, 3]
    # row 1 group [0.4, 0.6]:  min capped at 0, s = 0.2, z = 0; W/s = [2, 3] -> codes [2, 3]
    assert scale.shape == (2, 2) and zero.shape == (2, 2)
    close(scale, [[0.33333333, 0.66666667], [0.06666667, 0.2]])
    close(zero, [[3.0, 0.0], [0.0, 0.0]])
    close(codes, [[0.0, 2.0, 0.0, 3.0], [0.0, 3.0, 2.0, 3.0]])
    close(dequant, [[-1.0, -0.33333333, 0.0, 2.0], [0.0, 0.2, 0.4, 0.6]])


def test_group_size_equal_to_in_features_is_per_channel():
    per_group = rtn(W, bits=3, group_size=4)
    per_channel = rtn(W, bits=3, group_size=None)
    for a, b in zip(per_group, per_channel, strict=True):
        assert torch.equal(a, b)


# --- symmetric --------------------------------------------------------------------------------------


def test_symmetric_3bit_clamps_positive_absmax_at_top_code():
    # 3 bits: s = 2 * absmax / 7, z = 4 (codes 0..7 stand for -4..3 steps).
    # row 0: absmax 3.5 -> s = 1; W/s = [-3.5, -1, 0.25, 2.6] -> round-half-up [-3, -1, 0, 3] -> [1, 3, 4, 7]
    # row 1: absmax 3.5 -> s = 1; W/s = [3.5, -1.2, 0.6, 0] -> [4, -1, 1, 0] -> +4 -> [8 -> 7 (clamped), 3, 5, 4]
    #        so the maximum 3.5 dequantizes to 3 * s = 3: the top code is only +3 steps above zero.
    weight = torch.tensor([[-3.5, -1.0, 0.25, 2.6], [3.5, -1.2, 0.6, 0.0]])
    scale, zero, codes, dequant = rtn(weight, bits=3, sym=True)
    close(scale, [[1.0], [1.0]])
    close(zero, [[4.0], [4.0]])
    close(codes, [[1.0, 3.0, 4.0, 7.0], [7.0, 3.0, 5.0, 4.0]])
    close(dequant, [[-3.0, -1.0, 0.0, 3.0], [3.0, -1.0, 1.0, 0.0]])


def test_symmetric_2bit():
    # 2 bits: s = 2 * absmax / 3, z = 2.
    # row 0: absmax 1.5 -> s = 1; W/s = [1.5, -1.5, 0.4, -0.6] -> [2, -1, 0, -1] -> +2 -> [4 -> 3, 1, 2, 1]
    # row 1: absmax 0.75 -> s = 0.5; W/s = [1.5, 0.6, -0.4, 0] -> [2, 1, 0, 0] -> +2 -> [4 -> 3, 3, 2, 2]
    weight = torch.tensor([[1.5, -1.5, 0.4, -0.6], [0.75, 0.3, -0.2, 0.0]])
    scale, zero, codes, dequant = rtn(weight, bits=2, sym=True)
    close(scale, [[1.0], [0.5]])
    close(zero, [[2.0], [2.0]])
    close(codes, [[3.0, 1.0, 2.0, 1.0], [3.0, 3.0, 2.0, 2.0]])
    close(dequant, [[1.0, -1.0, 0.0, -1.0], [0.5, 0.5, 0.0, 0.0]])


def test_symmetric_learnable_clip_has_one_logit():
    quantizer = WeightQuantizer(W, 4, sym=True, learnable_clip=True, clip_init=0.5)
    assert quantizer.lower_logit is None
    assert quantizer.upper_logit is not None and quantizer.upper_logit.shape == (2, 1, 1)
    scale, zero = quantizer.scale_zero(W)
    # s = 2 * (0.5 * absmax) / 15: row 0 absmax 2 -> 2/15, row 1 absmax 0.6 -> 0.04
    close(scale.detach().squeeze(-1), [[0.13333333], [0.04]])
    close(zero.squeeze(-1), [[8.0], [8.0]])


# --- clipping -------------------------------------------------------------------------------------


def test_fixed_clip_ratio_clamps_values_outside_range():
    # clip 0.5: row 0 range [0.5 * -1, 0.5 * 2] = [-0.5, 1]: s = 1.5 / 3 = 0.5, z = round(1) = 1;
    #           W/s = [-2, -1, 0.5, 4] -> [-2, -1, 1, 4] -> +1 -> [-1, 0, 2, 5] -> clamp [0, 0, 2, 3]
    #           W_hat = 0.5 * ([0, 0, 2, 3] - 1) = [-0.5, -0.5, 0.5, 1]: -1 and 2 are clipped to the range.
    # row 1:    range [0, 0.3]: s = 0.1, z = 0; W/s = [0, 2, 4, 6] -> clamp [0, 2, 3, 3] -> [0, 0.2, 0.3, 0.3]
    scale, zero, codes, dequant = rtn(W, bits=2, clip=0.5)
    close(scale, [[0.5], [0.1]])
    close(zero, [[1.0], [0.0]])
    close(codes, [[0.0, 0.0, 2.0, 3.0], [0.0, 2.0, 3.0, 3.0]])
    close(dequant, [[-0.5, -0.5, 0.5, 1.0], [0.0, 0.2, 0.3, 0.3]])


def test_fixed_clip_ratio_out_of_range_raises():
    with pytest.raises(ConfigError, match="clip_init"):
        WeightQuantizer(W, 4, learnable_clip=False, clip_init=0.0)
    with pytest.raises(ConfigError, match="clip_init"):
        WeightQuantizer(W, 4, learnable_clip=False, clip_init=1.5)


def test_clip_logit_values_and_bounds():
    assert clip_logit(0.5) == 0.0
    assert clip_logit(0.75) == pytest.approx(math.log(3.0))
    for bad in (0.0, 1.0, -0.1, 1.2):
        with pytest.raises(ConfigError, match="clip_init"):
            clip_logit(bad)


def test_learnable_clip_initial_ratio_and_range():
    quantizer = WeightQuantizer(W, 2, learnable_clip=True, clip_init=0.5)
    upper, lower = quantizer.clip_ratios()
    close(upper.detach(), [[[0.5]], [[0.5]]])
    close(lower.detach(), [[[0.5]], [[0.5]]])
    # same range as the fixed ratio 0.5 above: scale [0.5, 0.1], zero [1, 0]
    scale, zero = quantizer.scale_zero(W)
    close(scale.detach().squeeze(-1), [[0.5], [0.1]])
    close(zero.detach().squeeze(-1), [[1.0], [0.0]])
    close(quantizer.fake_quantize(W).detach(), [[-0.5, -0.5, 0.5, 1.0], [0.0, 0.2, 0.3, 0.3]])


# --- degenerate inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sym", "expected_row1"),
    [
        # asym: group [1, -0.5]: s = 1.5 / 15 = 0.1, z = round(5) = 5 -> both ends exact
        (False, [0.0, 0.0, 1.0, -0.5]),
        # sym: absmax 1 -> s = 2/15, z = 8; 1 -> 7.5 steps, clamped at 7 -> 14/15;
        #      -0.5 -> -3.75 steps -> -4 -> -8/15
        (True, [0.0, 0.0, 0.93333333, -0.53333333]),
    ],
)
def test_all_zero_group_does_not_divide_by_zero(sym, expected_row1):
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, -0.5]])
    quantizer = WeightQuantizer(weight, 4, group_size=2, sym=sym, learnable_clip=False, clip_init=1.0)
    scale, zero = quantizer.scale_zero(weight)
    # the three all-zero groups get the floor scale, not 0
    assert scale[0, 0, 0].item() == pytest.approx(SCALE_EPS)
    assert scale[0, 1, 0].item() == pytest.approx(SCALE_EPS)
    assert scale[1, 0, 0].item() == pytest.approx(SCALE_EPS)
    assert torch.isfinite(zero).all()
    out = quantizer.fake_quantize(weight)
    assert torch.isfinite(out).all()
    close(out, [[0.0, 0.0, 0.0, 0.0], expected_row1])


# --- gradients --------------------------------------------------------------------------------------


def test_gradient_reaches_clip_logits():
    torch.manual_seed(0)
    weight = torch.randn(4, 8)
    quantizer = WeightQuantizer(weight, 3, group_size=4, learnable_clip=True, clip_init=0.9)
    loss = (quantizer.fake_quantize(weight) - weight).pow(2).sum()
    loss.backward()
    for logit in (quantizer.upper_logit, quantizer.lower_logit):
        assert logit.grad is not None
        assert logit.grad.shape == (4, 2, 1)
        assert (logit.grad != 0).any()
        assert torch.isfinite(logit.grad).all()


def test_gradient_reaches_symmetric_clip_logit():
    torch.manual_seed(1)
    weight = torch.randn(4, 8)
    quantizer = WeightQuantizer(weight, 3, sym=True, learnable_clip=True, clip_init=0.9)
    quantizer.fake_quantize(weight).pow(2).sum().backward()
    assert quantizer.upper_logit.grad is not None
    assert (quantizer.upper_logit.grad != 0).any()


def test_only_clip_logits_are_parameters():
    # the quantizer only owns the two clip logits
    quantizer = WeightQuantizer(W, 4, group_size=2, learnable_clip=True, clip_init=0.9)
    names = sorted(name for name, _ in quantizer.named_parameters())
    assert names == ["lower_logit", "upper_logit"]
    assert quantizer.upper_logit.shape == (2, 2, 1)
    fixed = WeightQuantizer(W, 4, learnable_clip=False, clip_init=1.0)
    assert list(fixed.parameters()) == []


# --- validation -------------------------------------------------------------------------------------


def test_group_size_not_dividing_in_features_raises():
    with pytest.raises(ConfigError, match="group_size=4 does not divide in_features=6"):
        WeightQuantizer(torch.zeros(2, 6), 4, group_size=4, learnable_clip=False, clip_init=1.0)


def test_fractional_part_matches_hand_values():
    # 2-bit row 0: s = 1 -> frac(W) = [0, 0.5, 0.25, 0]; row 1: s = 0.2 -> W/s = [0, 1, 2, 3] -> frac 0
    # (up to float error: 0.2/0.2 can land just below an integer, so use frac distance to {0, 1})
    quantizer = WeightQuantizer(W, 2, learnable_clip=False, clip_init=1.0)
    frac = quantizer.fractional_part(W)
    close(frac[0], [0.0, 0.5, 0.25, 0.0])
    distance = torch.minimum(frac[1], 1.0 - frac[1])
    close(distance, [0.0, 0.0, 0.0, 0.0], atol=1e-5)
