"""Layer-wise mixed precision (``extensions.mixed.budget``, ``extensions.layer_bits``): sensitivity, allocation, wiring.

Hand values: ``W = [1, 0.4]`` at 2 bits per channel has the grid ``[0, 1]`` in steps of 1/3, so 0.4 becomes
1/3 and ``E = [0, 1/15]``; with ``H = [[2, 0.5], [0.5, 3]]`` the output error ``E H E^T = 3 / 225``.
Allocation: three groups of 100, 100 and 200 weights at a 2.5-bit budget may spend 200 bit-weights above
all-2-bit; the errors below make "first group at 4 bits" (total 6.1) beat "first and second at 3" (6.5) and
"third at 3" (3.0 + 11 = 14).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cbq_lightning.config import validate
from cbq_lightning.errors import ConfigError
from cbq_lightning.export.quant_state import load_quant_state
from cbq_lightning.quant.mixed_precision import (
    GroupSensitivity,
    MixedPrecisionConfig,
    allocate,
    check_layer_bits,
    layer_output_error,
)
from cbq_lightning.quant.scheme import parse_scheme
from cbq_lightning.runner import run_quantize
from tests.conftest import TINY_RECIPE, fast_flags, load_recipe

FAST = fast_flags(epochs=1)
TINY_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_layer_output_error_hand_value() -> None:
    weight = torch.tensor([[1.0, 0.4]])
    hessian = torch.tensor([[2.0, 0.5], [0.5, 3.0]])
    assert layer_output_error(weight, hessian, parse_scheme("W2A16"), None) == pytest.approx(3 / 225, rel=1e-5)
    # at 8 bits 0.4 sits 0.4 * 255 = 102 codes up: exactly on the grid
    assert layer_output_error(weight, hessian, parse_scheme("W8A16"), None) == pytest.approx(0.0, abs=1e-9)


def test_allocation_hand_case() -> None:
    groups = [
        GroupSensitivity(["a"], 100, {2: 10.0, 3: 1.0, 4: 0.1}),
        GroupSensitivity(["b"], 100, {2: 1.0, 3: 0.5, 4: 0.4}),
        GroupSensitivity(["c1", "c2"], 200, {2: 5.0, 3: 2.0, 4: 1.0}),
    ]
    assert allocate(groups, [2, 3, 4], 2.5) == {"a": 4, "b": 2, "c1": 2, "c2": 2}
    assert allocate(groups, [2, 3, 4], 2.0) == {"a": 2, "b": 2, "c1": 2, "c2": 2}
    assert allocate(groups, [2, 3, 4], 4.0) == {"a": 4, "b": 4, "c1": 4, "c2": 4}


def test_allocation_is_the_exhaustive_optimum_on_random_instances() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        sizes = [64 * int(s) for s in torch.randint(1, 6, (5,), generator=generator)]
        groups = []
        for index, size in enumerate(sizes):
            e2 = float(torch.rand((), generator=generator)) * 10
            groups.append(GroupSensitivity([f"g{index}"], size, {2: e2, 3: e2 * 0.3, 4: e2 * 0.08}))
        budget = 2.0 + float(torch.rand((), generator=generator)) * 2.0
        total = sum(sizes)
        best = min(
            (sum(g.errors[b] for g, b in zip(groups, choice, strict=True)), choice)
            for choice in itertools.product([2, 3, 4], repeat=len(groups))
            if sum(g.weights * b for g, b in zip(groups, choice, strict=True)) <= budget * total + 1e-9
        )
        allocation = allocate(groups, [2, 3, 4], budget)
        error = sum(g.errors[allocation[g.names[0]]] for g in groups)
        assert error == pytest.approx(best[0]), (trial, allocation, best)
        assert sum(g.weights * allocation[g.names[0]] for g in groups) <= budget * total + 1e-9


def test_layer_bits_are_checked_against_layers_and_fused_groups() -> None:
    names = [f"blocks.{i}.{n}" for i in range(2) for group in TINY_GROUPS for n in group]
    check_layer_bits({"blocks.1.mlp.down_proj": 4}, names, TINY_GROUPS, 2)
    check_layer_bits({"blocks.0.mlp.gate_proj": 3, "blocks.0.mlp.up_proj": 3}, names, TINY_GROUPS, 2)
    with pytest.raises(ConfigError, match="not a quantized layer"):
        check_layer_bits({"blocks.0.mlp.down": 4}, names, TINY_GROUPS, 2)
    with pytest.raises(ConfigError, match="out of range"):
        check_layer_bits({"blocks.0.mlp.down_proj": 9}, names, TINY_GROUPS, 2)
    with pytest.raises(ConfigError, match="same bits"):
        check_layer_bits({"blocks.0.mlp.gate_proj": 4}, names, TINY_GROUPS, 2)
    with pytest.raises(ConfigError, match="same bits"):
        check_layer_bits({"blocks.1.self_attn.q_proj": 4, "blocks.1.self_attn.k_proj": 4,
                          "blocks.1.self_attn.v_proj": 3}, names, TINY_GROUPS, 2)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"budget": 5.0}, "between the smallest and largest"),
        ({"budget": 2.5, "candidates": [2, 9]}, "2..8"),
        ({"budget": 2.5, "candidates": [2, 2, 3]}, "repeats"),
        ({"budget": 2.5, "samples": 0}, "extensions.mixed.samples"),
    ],
)
def test_mixed_settings_are_validated(settings: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MixedPrecisionConfig(**settings)


def test_budget_and_overrides_exclude_each_other_and_packed_export(tmp_path: Path) -> None:
    both = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--extensions.mixed.budget", "3.5",
                       "--extensions.layer_bits", '{"blocks.0.mlp.down_proj": 4}')
    with pytest.raises(ConfigError, match="both are set"):
        validate(both)
    packed = load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path), "--extensions.mixed.budget", "3.5",
                         "--export.format", "compressed-tensors")
    with pytest.raises(ConfigError, match="mixes bit-widths"):
        validate(packed)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(out), *FAST, "--quant.scheme", "W2A16",
                             "--extensions.mixed.budget", "3.0", "--extensions.mixed.candidates", "[2, 3, 4]"))
    return out


def test_mixed_run_meets_the_budget_and_stores_per_layer_bits(mixed_run: Path) -> None:
    report = json.loads((mixed_run / "report.json").read_text())
    summary = report["mixed_precision"]
    assert summary["budget"] == 3.0
    assert 2.9 <= summary["average_bits"] <= 3.0
    assert len(set(summary["layer_bits"].values())) > 1, "a 3-bit budget over 2/3/4 should mix"
    layers = load_quant_state(mixed_run / "quant_state.safetensors")
    for name, bits in summary["layer_bits"].items():
        _, index, inner = name.split(".", 2)
        stored = layers[f"model.layers.{index}.{inner}"]
        assert int(stored["bits"]) == bits, name
        assert int(stored["qweight"].max()) <= 2**bits - 1
    for group in summary["sensitivity"]:
        errors = [group["errors"][b] for b in ("2", "3", "4")]
        assert errors[0] > errors[1] > errors[2] > 0, group["layers"]
        assert len({summary["layer_bits"][name] for name in group["layers"]}) == 1, "a fused group shares its bits"
    events = EventAccumulator(str(mixed_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("mixed_precision/bits/mlp.down_proj")]
    assert steps == [0, 1, 2, 3]


def test_mixed_precision_lands_between_the_uniform_runs(mixed_run: Path, tmp_path: Path) -> None:
    errors, reports = {}, {}
    for bits in (2, 4):
        out = tmp_path / f"w{bits}"
        reports[bits] = run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(out), *FAST,
                                                 "--quant.scheme", f"W{bits}A16")).report
        errors[bits] = reports[bits]["final_error"]["cbq"]
    mixed = json.loads((mixed_run / "report.json").read_text())
    assert errors[4] < mixed["final_error"]["cbq"] < errors[2], (errors, mixed["final_error"])
    # the RTN reference of the monitor has the run's per-layer bits too
    assert reports[4]["final_error"]["rtn"] < mixed["final_error"]["rtn"] < reports[2]["final_error"]["rtn"]


def test_layer_bits_override_resumes_bit_for_bit(tmp_path: Path) -> None:
    from tests.test_resume import KillAtWindow, Killed

    flags = (*FAST, "--quant.scheme", "W3A16", "--extensions.layer_bits",
             '{"blocks.1.mlp.down_proj": 4, "blocks.2.self_attn.o_proj": 2}')
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "whole"), *flags))
    with pytest.raises(Killed):
        run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "killed"), *flags), [KillAtWindow(2)])
    run_quantize(load_recipe(TINY_RECIPE, "--output_dir", str(tmp_path / "killed"), *flags))
    expected = load_file(str(tmp_path / "whole" / "quant_state.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "quant_state.safetensors"))
    assert int(expected["model.layers.1.mlp.down_proj.bits"]) == 4
    assert int(expected["model.layers.2.self_attn.o_proj.bits"]) == 2
    assert int(expected["model.layers.0.mlp.down_proj.bits"]) == 3
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_packed_export_of_a_mixed_run_says_why_it_refuses(mixed_run: Path, tmp_path: Path) -> None:
    from cbq_lightning.export.packed import ExportConfig, export_run

    with pytest.raises(ConfigError, match="mixes bit-widths"):
        export_run(mixed_run, ExportConfig(format="compressed-tensors", output=str(tmp_path / "packed")))
