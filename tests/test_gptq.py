"""GPTQ initialisation: the column-by-column error compensation against hand values, and its use as the
starting rounding of a quantized layer and of a CBQ run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.gptq import GPTQInit, gptq_quantize
from cbq_lightning.quant.qlinear import LayerQuantConfig, QuantLinear
from cbq_lightning.quant.rounding import RoundingConfig
from cbq_lightning.quant.scheme import QuantScheme
from cbq_lightning.quant.weight_quantizer import WeightQuantizer
from tests.conftest import TINY_RECIPE

TINY_DAMP = GPTQInit(damp=1e-9, act_order=False)


def gptq_codes(*args, **kwargs) -> torch.Tensor:
    """GPTQ's codes alone (most tests here check only the decisions)."""
    return gptq_quantize(*args, **kwargs).codes


def test_two_columns_hand_values() -> None:
    """W = [0.3, 0.12], scale 0.2, zero 2, H = [[1, .5], [.5, 1]].

    Column 0: 0.3/0.2 = 1.5 rounds half-up to 2 -> code 4, dequantized 0.4, error -0.1. GPTQ moves column 1
    by -H10/H11 * (0.4 - 0.3) = -0.05 to 0.07; 0.07/0.2 = 0.35 -> 0 -> code 2. Round-to-nearest gives
    0.12/0.2 = 0.6 -> 1 -> code 3. Output error e^T H e: RTN e = (0.1, 0.08) -> 0.0244; GPTQ e = (0.1, -0.12)
    -> 0.0124.
    """
    weight = torch.tensor([[0.3, 0.12]])
    hessian = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    scale = torch.tensor([[[0.2]]])
    zero = torch.tensor([[[2.0]]])
    codes = gptq_codes(weight, hessian, scale, zero, qmax=15, group=2, settings=TINY_DAMP)
    assert codes.tolist() == [[4.0, 2.0]]

    def output_error(codes_row: list[float]) -> float:
        e = torch.tensor(codes_row, dtype=torch.float64) * 0.2 - 0.4 - weight.double()[0]
        return float(e @ hessian.double() @ e)

    assert output_error([4.0, 2.0]) == pytest.approx(0.0124)
    assert output_error([4.0, 3.0]) == pytest.approx(0.0244)


def test_act_order_rounds_the_heaviest_column_first() -> None:
    """The same pair with the Hessian's diagonal swapped to [1, 4]: column 1 goes first.

    H = [[1, .5], [.5, 4]]; column 1: 0.12/0.2 = 0.6 -> 1 -> code 3, error +0.08 (dequantized 0.2). Column 0
    moves by -H01/H00 * 0.08 = -0.04 to 0.26; 0.26/0.2 = 1.3 -> 1 -> code 3. In index order instead, column 0
    rounds 1.5 -> code 4 first and column 1 moves by -0.5/4 * 0.1 = -0.0125 to 0.1075 -> 0.5375 -> code 3.
    """
    weight = torch.tensor([[0.3, 0.12]])
    hessian = torch.tensor([[1.0, 0.5], [0.5, 4.0]])
    scale, zero = torch.tensor([[[0.2]]]), torch.tensor([[[2.0]]])
    ordered = gptq_codes(weight, hessian, scale, zero, 15, 2, GPTQInit(damp=1e-9, act_order=True))
    in_index_order = gptq_codes(weight, hessian, scale, zero, 15, 2, TINY_DAMP)
    assert ordered.tolist() == [[3.0, 3.0]]
    assert in_index_order.tolist() == [[4.0, 3.0]]


def test_uncorrelated_inputs_give_round_to_nearest() -> None:
    """With a diagonal Hessian no column's error can be cancelled by another: GPTQ is RTN exactly."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 32, generator=generator)
    hessian = torch.diag(torch.rand(32, generator=generator) + 0.1)
    quantizer = WeightQuantizer(weight, bits=3, group_size=8, learnable_clip=False, clip_init=1.0)
    scale, zero = quantizer.scale_zero(weight)
    nearest = quantizer.codes(weight, scale, zero, None).reshape(weight.shape)
    for act_order in (False, True):
        codes = gptq_codes(weight, hessian, scale, zero, quantizer.qmax, quantizer.group, GPTQInit(act_order=act_order))
        assert torch.equal(codes.float(), nearest)


def test_dead_input_feature_keeps_its_nearest_code() -> None:
    weight = torch.tensor([[0.3, 0.12, -0.25]])
    hessian = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    scale, zero = torch.tensor([[[0.2]]]), torch.tensor([[[2.0]]])
    codes = gptq_codes(weight, hessian, scale, zero, 15, 3, TINY_DAMP)
    assert codes.tolist() == [[4.0, 2.0, 1.0]]  # -0.25/0.2 = -1.25 -> -1 -> code 1


@pytest.mark.parametrize("group_size", [None, 16])
def test_correlated_inputs_lower_the_output_error(group_size: int | None) -> None:
    """On correlated inputs GPTQ's output error is well below round-to-nearest's (measured: about half)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=generator) @ torch.randn(64, 64, generator=generator) * 0.3
    weight = torch.randn(32, 64, generator=generator)
    hessian = x.T @ x / x.shape[0]
    quantizer = WeightQuantizer(weight, bits=3, group_size=group_size, learnable_clip=False, clip_init=1.0)
    scale, zero = quantizer.scale_zero(weight)
    codes = gptq_codes(weight, hessian, scale, zero, quantizer.qmax, quantizer.group)
    gptq_weight = (scale * (quantizer.grouped(codes.float()) - zero)).reshape(weight.shape)
    rtn_weight = quantizer.fake_quantize(weight)

    def output_error(w: torch.Tensor) -> float:
        return float((x @ (w - weight).T).pow(2).mean())

    assert output_error(gptq_weight) < 0.7 * output_error(rtn_weight)


def test_singular_hessian_is_dampened() -> None:
    """A rank-one Hessian (one token) still gives codes: the dampening makes it invertible."""
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    weight = torch.tensor([[0.3, -0.2, 0.1, 0.4]])
    quantizer = WeightQuantizer(weight, bits=4, learnable_clip=False, clip_init=1.0)
    scale, zero = quantizer.scale_zero(weight)
    codes = gptq_codes(weight, x.T @ x, scale, zero, quantizer.qmax, quantizer.group)
    assert codes.shape == (1, 4) and bool(((codes >= 0) & (codes <= 15)).all())


def _layer(form_enabled: bool, hessian: torch.Tensor, linear: nn.Linear) -> QuantLinear:
    rounding = RoundingConfig(enabled=form_enabled, form="offset")
    return QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=3), rounding, learnable_clip=True, clip_init=0.9,
                                                gptq=GPTQInit()), hessian=hessian)


@pytest.mark.parametrize("learned_offset", [False, True])
def test_layer_starts_from_and_finalises_to_gptq_codes(learned_offset: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(32, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(8, 32, generator=generator))
    x = torch.randn(512, 32, generator=generator) @ torch.randn(32, 32, generator=generator)
    hessian = x.T @ x / 512
    layer = _layer(learned_offset, hessian, linear)
    quantizer = layer.quantizer
    scale, zero = quantizer.scale_zero(layer.weight)
    expected = gptq_codes(layer.weight, hessian, scale, zero, quantizer.qmax, quantizer.group)
    expected_weight = (scale * (quantizer.grouped(expected.float()) - zero)).reshape(layer.weight.shape)
    torch.testing.assert_close(layer.fake_weight(), expected_weight)
    nearest = quantizer.codes(layer.weight, scale, zero, None).reshape(layer.weight.shape)
    assert not torch.equal(expected.float(), nearest), "the test needs GPTQ to differ from RTN"
    assert layer.rounding_base is not None and "rounding_base" not in dict(layer.named_parameters())
    final = layer.finalize()
    assert torch.equal(final.qweight.float(), expected.float())
    assert final.flip_fraction == pytest.approx(float((expected.float() != nearest).float().mean()))


def test_learned_offset_moves_on_top_of_gptq() -> None:
    """GPTQ's start is a whole-number shift of round-to-nearest: a learned offset ``v`` gives
    ``clamp(floor(W/s + v + 0.5) + z + shift)``, so it can still move a decision to a neighbouring code."""
    generator = torch.Generator().manual_seed(2)
    linear = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4, 16, generator=generator))
    x = torch.randn(256, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    layer = _layer(True, x.T @ x / 256, linear)
    quantizer = layer.quantizer
    shift = layer.rounding_base
    assert torch.equal(shift, shift.round()) and bool((shift != 0).any())
    scale, zero = quantizer.scale_zero(layer.weight)
    start = quantizer.codes(layer.weight, scale, zero, None, layer.signed_offset())
    v = torch.rand(4, 16, generator=generator) - 0.5
    with torch.no_grad():
        layer.rounding.v.copy_(v)
    moved = quantizer.codes(layer.weight, scale, zero, None, layer.signed_offset())
    w_over_s = quantizer.grouped(layer.weight) / scale
    expected = torch.clamp(torch.floor(w_over_s + quantizer.grouped(v) + 0.5) + zero + quantizer.grouped(shift), 0, 7)
    assert torch.equal(moved, expected)
    assert not torch.equal(moved, start), "some offsets must cross a rounding boundary"


def _soft_layer(hessian: torch.Tensor, linear: nn.Linear, bits: int = 3) -> QuantLinear:
    rounding = RoundingConfig(form="residual", rank=2)
    return QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=bits), rounding, learnable_clip=True, clip_init=0.9,
                                                gptq=GPTQInit()), generator=torch.Generator().manual_seed(0), hessian=hessian)


def _random_layer_and_hessian(seed: int, out_features: int = 8, in_features: int = 32) -> tuple[nn.Linear, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
    x = torch.randn(512, in_features, generator=generator) @ torch.randn(in_features, in_features, generator=generator)
    return linear, x.T @ x / 512


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lora_rounding_from_gptq_hardens_to_gptq_codes(seed: int) -> None:
    """LoRA-Rounding started from GPTQ: the untrained layer's hardened decisions are exactly GPTQ's codes,
    through finalisation too, and only A1 and A2 train (the shift and V0 are buffers)."""
    linear, hessian = _random_layer_and_hessian(seed)
    layer = _soft_layer(hessian, linear)
    quantizer = layer.quantizer
    scale, zero = quantizer.scale_zero(layer.weight)
    expected = gptq_codes(layer.weight, hessian, scale, zero, quantizer.qmax, quantizer.group)
    nearest = quantizer.codes(layer.weight, scale, zero, None).reshape(layer.weight.shape)
    assert not torch.equal(expected.float(), nearest), "the test needs GPTQ to differ from RTN"
    hard = quantizer.codes(layer.weight, scale, zero, layer.rounding.hard(), layer.signed_offset())
    assert torch.equal(hard.reshape(expected.shape), expected.float())
    assert {name for name, _ in layer.named_parameters() if "rounding" in name} == {"rounding.a1", "rounding.a2"}
    final = layer.finalize()
    assert torch.equal(final.qweight.float(), expected.float())
    assert final.flip_fraction == pytest.approx(float((expected.float() != nearest).float().mean()))


def test_lora_rounding_from_gptq_starts_at_the_compensated_weight() -> None:
    """The soft layer starts at GPTQ's compensated weight and hardens to GPTQ's codes, by hand on a
    2-column layer: H = [[1, 0.5], [0.5, 1]] (dampening negligible), index order, 3 bits, W = [0.3, 2.2] on
    the min/max grid s = 2.2 / 7, z = 0. GPTQ rounds t0 = 0.3 / s to code0 with error e = t0 - code0 and
    moves column 1 by -e * Hinv[0,1] / Hinv[0,0] = +0.5 e, so t1 = 2.2 / s + 0.5 e. The soft weight is
    s * [t0, t1], the hardened one s * [code0, round(t1)] (two equal rows, so that rank 1 is low-rank)."""
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.3, 2.2], [0.3, 2.2]]))
    hessian = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    config = LayerQuantConfig(QuantScheme(w_bits=3), RoundingConfig(form="residual", rank=1), learnable_clip=False,
                              clip_init=1.0, gptq=GPTQInit(damp=1e-9, act_order=False))
    layer = QuantLinear(linear, config, generator=torch.Generator().manual_seed(0), hessian=hessian)
    # min/max grid of [0, 2.2] (min capped at 0): s = 2.2 / 7, z = 0
    s = 2.2 / 7
    t0 = 0.3 / s
    code0 = float(torch.floor(torch.tensor(t0 + 0.5)))
    t1 = 2.2 / s - (t0 - code0) * (-0.5)  # Hinv = inverse(H): Hinv[0,1] / Hinv[0,0] = -0.5
    torch.testing.assert_close(layer.fake_weight(), torch.tensor([[t0 * s, t1 * s]] * 2), rtol=1e-5, atol=1e-5)
    layer.use_hard_rounding = True
    expected_hard = torch.tensor([[code0 * s, float(torch.floor(torch.tensor(t1 + 0.5))) * s]] * 2)
    torch.testing.assert_close(layer.fake_weight(), expected_hard, rtol=1e-6, atol=1e-6)


def test_pure_low_rank_rounding_cannot_start_from_gptq() -> None:
    linear = nn.Linear(16, 4, bias=False)
    with pytest.raises(ConfigError, match="rounding.form=residual"):
        QuantLinear(linear, LayerQuantConfig(QuantScheme(w_bits=3), RoundingConfig(form="lowrank", rank=2), True, 0.9,
                                             gptq=GPTQInit()), hessian=torch.eye(16))


@pytest.mark.parametrize("damp", [0.0, 1.0, -0.1])
def test_bad_dampening_is_refused(damp: float) -> None:
    with pytest.raises(ConfigError, match="extensions.gptq.damp"):
        GPTQInit(damp=damp)


def test_cli_refuses_gptq_with_pure_low_rank_rounding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cbq_lightning.cli import main

    code = main(["quantize", "--config", str(TINY_RECIPE), "--output_dir", str(tmp_path),
                 "--extensions.gptq", "{}", "--rounding.enabled", "true", "--rounding.form", "lowrank"])
    assert code == 2
    assert "use rounding.form=residual" in capsys.readouterr().err


def test_gptq_method_rtn_beats_plain_rtn(tmp_path: Path) -> None:
    """``method: rtn`` with ``extensions.gptq`` is plain GPTQ: on the tiny model its final output error is
    below round-to-nearest's (both on min/max grids, no training), with and without true-sequential
    Hessians, which change the result (o_proj, the MLP and down_proj see the quantized stages before them)."""
    from cbq_lightning.cli import main

    errors = {}
    for name, extra in (("rtn", []), ("gptq", ["--extensions.gptq", "{}"]), ("sequential", ["--extensions.gptq.true_sequential", "true"])):
        out = tmp_path / name
        code = main(["quantize", "--config", str(TINY_RECIPE), "--method", "rtn", "--output_dir", str(out),
                     "--eval.datasets", "[]", "--advanced.trainer.enable_progress_bar", "false", *extra])
        assert code == 0
        errors[name] = json.loads((out / "report.json").read_text())["final_error"]["rtn"]
    assert errors["gptq"] < errors["rtn"]
    assert errors["sequential"] < errors["rtn"]
    assert errors["sequential"] != errors["gptq"]
