"""Coarse-to-fine preprocessing: outlier detection on hand-made sets, truncation, exact channel scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cbq_lightning.cfp import (
    CFPConfig,
    CFPTuning,
    CoarseToFinePreprocessor,
    channel_scales,
    find_outliers,
    fold_channel_scales,
    fold_linear_channel_scales,
    judged_truncation,
    output_error,
    truncate_weight_outliers,
)
from cbq_lightning.errors import ConfigError
from cbq_lightning.models.adapter import DecoderAdapter, run_blocks_batched
from cbq_lightning.models.tiny import TinyModelConfig, build_tiny_llama, byte_tokenizer
from cbq_lightning.quant.weight_quantizer import WeightQuantizer

#: 1..20 plus two planted outliers; Q1 = 6.25, Q3 = 16.75, coarse threshold 32.5 -> candidates {100, 95}.
#: In robust-sigma units (IQR / 1.349): t=1 scores (100-95)/u - Var({1..20, 95})/u^2 < 0,
#: t=2 scores (95-20)/u - Var({1..20})/u^2 = 9.64 - 0.55 > 0 -> two outliers, threshold 20.
PLANTED = torch.tensor([float(v) for v in range(1, 21)] + [95.0, 100.0])


def test_fine_split_picks_the_planted_gap() -> None:
    split = find_outliers(PLANTED)
    assert split.coarse.tolist() == pytest.approx([32.5])
    assert split.count.tolist() == [2]
    assert split.threshold.tolist() == [20.0]


def test_fine_split_prefers_the_wider_gap_among_candidates() -> None:
    # Q1 = 6.5, Q3 = 17.5, coarse threshold 34 -> candidates 60, 58, 40
    values = torch.tensor([float(v) for v in range(1, 21)] + [40.0, 58.0, 60.0])
    split = find_outliers(values)
    # t=2 ({60, 58}) leaves 40 in the retained set, whose variance outweighs the gap 58-40; t=3 wins
    assert split.count.tolist() == [3]
    assert split.threshold.tolist() == [20.0]


def test_no_outliers_on_a_gaussian_set() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4096, generator=generator)
    split = find_outliers(values)
    assert int((values > split.coarse).sum()) > 0, "the coarse stage alone does flag a Gaussian tail"
    assert split.count.tolist() == [0]
    assert split.threshold.tolist() == [float(values.max())]


def test_gaussian_rows_are_rarely_flagged_and_scale_does_not_matter() -> None:
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(200, 1024, generator=generator)
    counts = find_outliers(rows).count
    assert float((counts > 0).float().mean()) < 0.05
    # robust-sigma units: multiplying the values changes nothing
    assert torch.equal(find_outliers(rows * 1e-3).count, counts)
    assert torch.equal(find_outliers(rows * 1e3).count, counts)


def test_rows_are_independent() -> None:
    flat = torch.linspace(1.0, 22.0, 22)
    split = find_outliers(torch.stack([PLANTED, flat]))
    assert split.count.tolist() == [2, 0]
    assert split.threshold.tolist() == [20.0, 22.0]


def test_constant_and_tiny_sets() -> None:
    assert find_outliers(torch.ones(16)).count.tolist() == [0]
    assert find_outliers(torch.tensor([3.0])).count.tolist() == [0]


def test_weight_truncation_per_row() -> None:
    weight = torch.stack([PLANTED * torch.tensor([1.0, -1.0]).repeat(11), torch.linspace(-1.0, 1.0, 22)])
    original = weight.clone()
    split = truncate_weight_outliers(weight)
    assert split.count.tolist() == [2, 0]
    # row 0: |100| and |95| clipped to 20 with their signs, every other weight unchanged
    assert weight[0, -1] == -20.0 and weight[0, -2] == 20.0
    torch.testing.assert_close(weight[0, :-2], original[0, :-2])
    torch.testing.assert_close(weight[1], original[1])


def test_channel_scales_hand_values() -> None:
    scales, split = channel_scales(PLANTED, alpha=0.7)
    expected = torch.ones(22)
    expected[20] = (95.0 / 20.0) ** 0.7
    expected[21] = (100.0 / 20.0) ** 0.7
    torch.testing.assert_close(scales, expected)
    assert split.count.tolist() == [2]


def test_fold_channel_scales_is_exact_for_a_norm_linear_pair() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    linears = [nn.Linear(8, 5), nn.Linear(8, 3)]
    x = torch.randn(4, 8)
    before = [linear(norm(x)) for linear in linears]
    scales = torch.tensor([1.0, 4.0, 1.0, 1.0, 2.5, 1.0, 1.0, 1.0])
    fold_channel_scales(norm, linears, scales)
    for linear, reference in zip(linears, before, strict=True):
        torch.testing.assert_close(linear(norm(x)), reference, atol=1e-5, rtol=1e-5)


def test_fold_linear_channel_scales_is_exact_for_a_gated_mlp() -> None:
    torch.manual_seed(0)
    gate, up, down = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 4)
    x = torch.randn(5, 6)

    def mlp() -> torch.Tensor:
        return down(torch.nn.functional.silu(gate(x)) * up(x))

    before = mlp()
    scales = torch.tensor([1.0, 1.0, 8.0, 1.0, 1.0, 1.0, 3.0, 1.0])
    with torch.no_grad():
        fold_linear_channel_scales(up, down, scales)
        # the up projection's row 2 (and its bias) shrank by 8, the down projection's column 2 grew by 8
    torch.testing.assert_close(mlp(), before, atol=1e-5, rtol=1e-5)


def _block_with_planted_outliers() -> tuple[nn.Module, torch.Tensor, dict]:
    model = build_tiny_llama(TinyModelConfig(), vocab_size=len(byte_tokenizer()), seed=0)
    block = model.model.layers[0]
    with torch.no_grad():
        block.input_layernorm.weight[[3, 17]] *= 60.0
        block.post_attention_layernorm.weight[5] *= 40.0
        block.mlp.up_proj.weight[9] *= 80.0  # channel 9 of the down projection's input
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = DecoderAdapter(model).capture_block_inputs(ids)
    return block, hidden, kwargs[0]


def test_activation_scaling_keeps_the_block_output_and_finds_the_planted_channels() -> None:
    block, hidden, kwargs = _block_with_planted_outliers()
    before = run_blocks_batched([block], hidden, kwargs, "cpu", 8)
    cfp = CoarseToFinePreprocessor(CFPConfig(weights=False), scale_activations=True)
    stats = cfp(0, block, hidden, kwargs)
    after = run_blocks_batched([block], hidden, kwargs, "cpu", 8)
    assert float((after - before).abs().max()) < 1e-4
    assert cfp.outlier_channels[0] == {"input_layernorm": [3, 17], "post_attention_layernorm": [5]}
    assert stats["cfp/act_outlier_channels/input_layernorm"] == 2.0
    assert stats["cfp/act_max_after/input_layernorm"] < stats["cfp/act_max_before/input_layernorm"] / 5
    # the scale went into the norm weight and the linears' columns
    assert float(block.input_layernorm.weight[3].detach()) < 60.0


def test_mlp_scaling_keeps_the_block_output_and_finds_the_planted_channel() -> None:
    block, hidden, kwargs = _block_with_planted_outliers()
    before = run_blocks_batched([block], hidden, kwargs, "cpu", 8)
    cfp = CoarseToFinePreprocessor(CFPConfig(weights=False), scale_activations=True, mlp=True)
    stats = cfp(0, block, hidden, kwargs)
    after = run_blocks_batched([block], hidden, kwargs, "cpu", 8)
    assert float((after - before).abs().max()) < 1e-4
    assert cfp.outlier_channels[0]["mlp.down_proj"] == [9]
    # the planted channel is the maximum; it shrinks by s = (max / threshold) ** alpha
    before_max, threshold = stats["cfp/act_max_before/mlp.down_proj"], stats["cfp/act_threshold/mlp.down_proj"]
    shrunk = before_max / (before_max / threshold) ** 0.7
    assert stats["cfp/act_max_after/mlp.down_proj"] == pytest.approx(max(shrunk, threshold), rel=1e-5)
    assert "cfp/act_max_after/mlp.down_proj" not in CoarseToFinePreprocessor(CFPConfig(weights=False), True)(
        0, *_block_with_planted_outliers()
    ), "extensions.cfp_mlp is off by default"


def test_preprocessor_weight_part_truncates_and_reports() -> None:
    block, hidden, kwargs = _block_with_planted_outliers()
    with torch.no_grad():
        block.mlp.down_proj.weight[2, 7] = 50.0
    cfp = CoarseToFinePreprocessor(CFPConfig(weights=True, truncation="always"), scale_activations=False)
    stats = cfp(0, block, hidden, kwargs)
    assert stats["cfp/weight_max_before/mlp.down_proj"] == 50.0
    assert stats["cfp/weight_max_after/mlp.down_proj"] < 1.0
    assert stats["cfp/weight_truncated/mlp.down_proj"] >= 1.0
    assert cfp.outlier_channels == {}, "the activation part was off"


def test_output_error_by_hand() -> None:
    """``d H d^T`` per row: d = [1, 0] with H = [[2, 1], [1, 3]] gives 2; d = [1, -1] gives 2 - 2 + 3 = 3."""
    weight = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    approximation = torch.tensor([[0.0, 2.0], [0.0, 3.0]])
    hessian = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    assert output_error(weight, approximation, hessian).tolist() == [2.0, 3.0]


def _row_with_outlier() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 64, generator=generator) * 0.1
    weight[1, 7] = 5.0  # one large weight in row 1, on input channel 7
    return weight


def _rtn3(weight: torch.Tensor) -> torch.Tensor:
    return WeightQuantizer(weight, 3, None, False, learnable_clip=False, clip_init=1.0).fake_quantize(weight)


@pytest.mark.parametrize(("moment", "truncated"), [(1e4, False), (1e-4, True)])
def test_judged_truncation_keeps_a_weight_its_input_depends_on(moment: float, truncated: bool) -> None:
    """The same outlier (5.0 among N(0, 0.1) weights) is kept when its input channel carries a massive
    activation (E[x_7^2] = 1e4: cutting it to ~0.3 costs 4.7^2 * 1e4 in output error, far above the grid's
    gain) and truncated when the channel is quiet (1e-4: the finer 3-bit grid for the other 63 weights wins)."""
    weight = _row_with_outlier()
    original = weight.clone()
    moments = torch.ones(64)
    moments[7] = moment
    split, accept = judged_truncation(weight, torch.diag(moments), _rtn3)
    assert int(split.count[1]) == 1, "the detection finds the outlier in row 1 either way"
    assert bool(accept[1]) is truncated
    assert (float(weight[1, 7]) < 1.0) is truncated
    assert torch.equal(weight[~accept], original[~accept]), "refused rows are left as they were"


def test_preprocessor_judged_truncation_reports_refused_rows() -> None:
    """Every row the detection flags is either truncated or refused, and the statistics say which."""
    block, hidden, kwargs = _block_with_planted_outliers()
    detected = {
        name: int((truncate_weight_outliers(linear.weight.detach().clone()).count > 0).sum())
        for name, linear in DecoderAdapter.block_linears(block)
    }
    quantize = lambda _index, _name, w: _rtn3(w)  # noqa: E731
    cfp = CoarseToFinePreprocessor(CFPConfig(weights=True), scale_activations=False, rtn=quantize)
    stats = cfp(0, block, hidden, kwargs)
    for name, rows in detected.items():
        assert stats[f"cfp/weight_rows_truncated/{name}"] + stats[f"cfp/weight_rows_refused/{name}"] == rows
    assert sum(detected.values()) > 0
    with pytest.raises(ValueError, match="rtn"):
        CoarseToFinePreprocessor(CFPConfig(weights=True), scale_activations=False)


def test_inactive_preprocessor() -> None:
    assert not CoarseToFinePreprocessor(CFPConfig(weights=False), scale_activations=False).active


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"alpha": 0.0}, "advanced.cfp.alpha"), ({"lambda1": -1.0}, "advanced.cfp.lambda1"),
     ({"max_samples": 0}, "advanced.cfp.max_samples"), ({"truncation": "sometimes"}, "cfp.truncation")],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    section = CFPConfig if "truncation" in kwargs else CFPTuning
    with pytest.raises(ConfigError, match=message):
        section(**kwargs)
