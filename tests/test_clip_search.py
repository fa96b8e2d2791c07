"""Grid search of the initial clipping ratios (ClipSearch, WeightQuantizer.search_clip, QuantConfig)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cbq_lightning.config import validate
from cbq_lightning.errors import ConfigError
from cbq_lightning.quant.weight_quantizer import ClipSearch, WeightQuantizer
from tests.conftest import TINY_RECIPE, load_recipe

NORM = 2.4


def group_errors(quantizer: WeightQuantizer, weight: torch.Tensor, norm: float = NORM) -> torch.Tensor:
    """``sum |W - Q(W)|^norm`` per group, ``[out, groups]``, with round-to-nearest at the current clip."""
    with torch.no_grad():
        error = (weight - quantizer.fake_quantize(weight, None)).abs().pow(norm)
    return quantizer.grouped(error).sum(dim=-1)


# --- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_ratio": 0.0},
        {"min_ratio": 1.0},
        {"min_ratio": -0.5},
        {"min_ratio": 1.5},
        {"steps": 1},
        {"steps": 0},
        {"norm": 0.0},
        {"norm": -2.0},
    ],
)
def test_invalid_clip_search_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="0 < min_ratio < 1, steps >= 2 and norm > 0"):
        ClipSearch(**kwargs)


def test_valid_clip_search_settings() -> None:
    assert ClipSearch() == ClipSearch(0.5, 25, 2.4, activation_aware=True)
    ClipSearch(min_ratio=0.01, steps=2, norm=0.5)


def test_clip_search_is_an_optional_section(tmp_path: Path) -> None:
    """``extensions.clip_search``: null is off, a section (or one of its keys) is on with the rest at their defaults;
    a bad value is refused when the section is built, and a search for thresholds that are not learned is
    refused as a setting that would do nothing."""
    assert load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path)).extensions.clip_search is None
    config = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--extensions.clip_search.steps", "7")
    assert config.extensions.clip_search == ClipSearch(min_ratio=0.5, steps=7, norm=2.4)
    with pytest.raises(ConfigError, match="extensions.clip_search"):
        load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--extensions.clip_search.min_ratio", "1.2")
    unlearned = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--extensions.clip_search", "{}",
                            "--quant.learnable_clip", "false")
    with pytest.raises(ConfigError, match="would do nothing"):
        validate(unlearned)


def test_search_needs_learnable_thresholds() -> None:
    weight = torch.randn(4, 16)
    quantizer = WeightQuantizer(weight, bits=3, learnable_clip=False, clip_init=0.9)
    with pytest.raises(ConfigError, match="learnable_clip"):
        quantizer.search_clip(weight, ClipSearch())


# --- the search lowers the error --------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_search_never_increases_a_groups_error(group_size: int | None, sym: bool, bits: int) -> None:
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits * 10 + int(sym)))
    quantizer = WeightQuantizer(weight, bits, group_size, sym, learnable_clip=True, clip_init=0.99)
    before = group_errors(quantizer, weight)
    ratios = quantizer.search_clip(weight, ClipSearch(min_ratio=0.5, steps=25, norm=NORM))
    after = group_errors(quantizer, weight)
    groups = 64 // (group_size or 64)
    assert ratios.shape == (8, groups, 1)
    assert after.shape == before.shape == (8, groups)
    assert (after <= before * (1 + 1e-5)).all(), (after - before).max()
    assert after.sum() < 0.99 * before.sum()  # random Gaussian weights do profit from clipping
    # the thresholds now hold the searched ratios, both of them
    upper, lower = quantizer.clip_ratios()
    torch.testing.assert_close(upper, ratios, rtol=0, atol=1e-6)
    torch.testing.assert_close(lower, ratios, rtol=0, atol=1e-6)
    assert float(ratios.min()) >= 0.5 - 1e-6 and float(ratios.max()) <= 0.99 + 1e-6


@pytest.mark.parametrize("sym", [False, True])
def test_outlier_row_is_clipped_harder(sym: bool) -> None:
    # two evenly spread rows; row 0 also holds one outlier at 3x the range
    weight = torch.linspace(-1.0, 1.0, 64).repeat(2, 1)
    weight[0, 10] = 3.0
    quantizer = WeightQuantizer(weight, bits=2, sym=sym, learnable_clip=True, clip_init=0.99)
    ratios = quantizer.search_clip(weight, ClipSearch()).flatten()
    assert float(ratios[0]) < 0.75, ratios
    assert float(ratios[0]) < float(ratios[1]) - 0.15, ratios


def test_grid_starts_at_the_current_ratio() -> None:
    """With clip_init below min_ratio there is nothing to search: every group stays at clip_init."""
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    quantizer = WeightQuantizer(weight, bits=3, group_size=8, learnable_clip=True, clip_init=0.4)
    ratios = quantizer.search_clip(weight, ClipSearch(min_ratio=0.5, steps=5))
    torch.testing.assert_close(ratios, torch.full((4, 4, 1), 0.4), rtol=0, atol=1e-6)


# --- brute force ------------------------------------------------------------------------------------


def brute_force_ratios(weight: torch.Tensor, bits: int, group: int, sym: bool, start: float,
                       search: ClipSearch) -> list[list[float]]:
    """Best ratio per group by an explicit loop over groups and grid ratios (first best on ties)."""
    qmax = 2**bits - 1
    grid = torch.linspace(start, search.min_ratio, search.steps).tolist()
    best = []
    for row in weight:
        row_best = []
        for g in range(weight.shape[1] // group):
            values = row[g * group : (g + 1) * group]
            best_error, best_ratio = math.inf, None
            for ratio in grid:
                if sym:
                    scale = max(2.0 * float(values.abs().max()) * ratio / qmax, 1e-8)
                    zero = float(2 ** (bits - 1))
                else:
                    hi = max(float(values.max()), 0.0) * ratio
                    lo = min(float(values.min()), 0.0) * ratio
                    scale = max((hi - lo) / qmax, 1e-8)
                    zero = min(max(math.floor(-lo / scale + 0.5), 0), qmax)
                error = 0.0
                for value in values.tolist():
                    code = min(max(math.floor(value / scale + 0.5) + zero, 0), qmax)
                    error += abs(scale * (code - zero) - value) ** search.norm
                if error < best_error:
                    best_error, best_ratio = error, ratio
            row_best.append(best_ratio)
        best.append(row_best)
    return best


@pytest.mark.parametrize("sym", [False, True])
def test_search_matches_brute_force(sym: bool) -> None:
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(7)) * 0.1
    weight[1, 3] = 0.6  # one group with an outlier
    search = ClipSearch(min_ratio=0.3, steps=9, norm=NORM)
    quantizer = WeightQuantizer(weight, bits=2, group_size=8, sym=sym, learnable_clip=True, clip_init=0.95)
    start = float(torch.sigmoid(quantizer.upper_logit.detach().flatten()[0]))
    ratios = quantizer.search_clip(weight, search).squeeze(-1)
    expected = torch.tensor(brute_force_ratios(weight.double(), 2, 8, sym, start, search), dtype=torch.float64)
    torch.testing.assert_close(ratios.double(), expected, rtol=0, atol=1e-6)
    assert len(set(ratios.flatten().tolist())) > 1, "the example should not be degenerate"
